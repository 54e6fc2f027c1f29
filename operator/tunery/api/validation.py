"""Validate a FineTuneJob manifest: schema, names and cross-field rules, each error naming its field and fix."""

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

import celpy
from pydantic import BaseModel, ValidationError

from tunery.api.resource import API_VERSION, KIND, MAX_NAME_LENGTH, FineTuneJob
from tunery.api.rules import SPEC_RULES, Rule
from tunery.api.spec import FineTuneJobSpec

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class FieldError:
    """One problem: the field path (as kubectl explain spells it) and a message that says how to fix it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Parsed:
    """A manifest read once: the typed FineTuneJob (its status left out) when it is valid, else every problem."""

    finetunejob: FineTuneJob | None
    errors: list[FieldError]


def parse_manifest(manifest: Any) -> Parsed:
    """The FineTuneJob a manifest describes, with all its problems; the model only when there are none."""
    if not isinstance(manifest, dict):
        return Parsed(
            None, [FieldError("(document)", f"expected a Kubernetes object (a mapping), got {type(manifest).__name__}")]
        )
    errors = _check_identity(manifest)
    if "spec" not in manifest:
        return Parsed(None, [*errors, FieldError("spec", "required field is missing; add the spec of the FineTuneJob")])
    spec, spec_errors = parse_spec(manifest["spec"])
    errors += spec_errors if spec is None else check_rules(spec)
    if errors or spec is None:
        return Parsed(None, errors)
    try:
        return Parsed(FineTuneJob(metadata=manifest["metadata"], spec=spec), [])
    except ValidationError as exc:
        return Parsed(None, [_metadata_error(error) for error in exc.errors(include_url=False)])


def validate_manifest(manifest: Any) -> list[FieldError]:
    """All problems of one FineTuneJob manifest; an empty list means it is valid."""
    return parse_manifest(manifest).errors


def parse_spec(raw_spec: Any) -> tuple[FineTuneJobSpec | None, list[FieldError]]:
    """The spec as a model, or the schema errors that stop it from being one."""
    try:
        return FineTuneJobSpec.model_validate(raw_spec), []
    except ValidationError as exc:
        return None, [_schema_error(error) for error in exc.errors(include_url=False)]


def check_rules(spec: FineTuneJobSpec) -> list[FieldError]:
    """The cross-field rules that the defaulted spec breaks, evaluated exactly as the API server evaluates them."""
    activation = {"self": celpy.json_to_cel(spec.model_dump(by_alias=True, mode="json", exclude_none=True))}
    return [
        FieldError("spec" + rule.field_path, rule.message)
        for rule in SPEC_RULES
        if not bool(_compiled(rule).evaluate(activation))
    ]


@functools.cache
def _compiled(rule: Rule) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule.rule))


def _check_identity(manifest: dict[str, Any]) -> list[FieldError]:
    errors = []
    if manifest.get("apiVersion") != API_VERSION:
        errors.append(FieldError("apiVersion", f"must be {API_VERSION}, got {manifest.get('apiVersion')!r}"))
    if manifest.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND}, got {manifest.get('kind')!r}"))
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        return [*errors, FieldError("metadata", "required; add metadata with a name")]
    name = metadata.get("name")
    if name is None:
        if "generateName" not in metadata:
            errors.append(FieldError("metadata.name", "required; add a name (lowercase letters, digits and '-')"))
    elif not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        errors.append(
            FieldError(
                "metadata.name",
                f"{name!r} is not a valid name: use at most {MAX_NAME_LENGTH} lowercase letters, digits and '-', "
                "starting and ending with a letter or digit (child objects add suffixes to it)",
            )
        )
    return errors


def _metadata_error(error: dict[str, Any]) -> FieldError:
    path = ".".join(str(part) for part in error["loc"])
    return FieldError(path, f"{error['msg'].replace('Input should be', 'must be')}, got {_shown(error.get('input'))}")


def _schema_error(error: dict[str, Any]) -> FieldError:
    path = "spec" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    kind = error["type"]
    given = error.get("input")
    if kind == "missing":
        return FieldError(
            path, "required field is missing; add it (kubectl explain finetunejob." + path + " describes it)"
        )
    if kind == "extra_forbidden":
        field = str(error["loc"][-1])
        close = difflib.get_close_matches(field, _all_field_names(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "; remove it or check its spelling and indentation"
        return FieldError(path, f"unknown field{hint}")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return FieldError(path, f"must be a mapping of fields, got {_shown(given)}")
    message = error["msg"].replace("Input should be", "must be").replace("String should", "must")
    if kind in ("pattern", "target_modules"):
        return FieldError(path, message)
    return FieldError(path, f"{message}, got {_shown(given)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _all_field_names() -> tuple[str, ...]:
    names: set[str] = set()
    pending: list[type[BaseModel]] = [FineTuneJobSpec]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(field.alias or name)
            pending.extend(_models_in(field.annotation))
    return tuple(sorted(names))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in getattr(annotation, "__args__", ()) for model in _models_in(argument)]
