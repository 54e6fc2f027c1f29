"""Render the FineTuneJob CustomResourceDefinition from the API models (pure; `tunery crd` prints it)."""

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from tunery.api.resource import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, FineTuneJob
from tunery.api.rules import SPEC_RULES
from tunery.api.spec import FineTuneJobSpec
from tunery.api.status import FineTuneJobStatus

CRD_FILE_NAME = f"{GROUP}_{PLURAL}.yaml"
GENERATED_HEADER = "# Generated from the API models in operator/tunery/api by `make generate`. Do not edit.\n"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Training progress, %",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss", "description": "Latest training loss"},
    {"name": "Model", "type": "string", "jsonPath": ".status.model.uri", "description": "Published model"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON-schema keywords that a structural OpenAPI v3 schema has no use for.
_DROPPED_KEYWORDS = {"title", "additionalProperties", "$defs"}


class _DefaultFactoryAwareSchema(GenerateJsonSchema):
    """Emits defaults that come from default factories, so the API server defaults exactly as pydantic does."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> dict[str, Any]:
        if "default_factory" not in schema:
            return super().default_schema(schema)
        json_schema = self.generate_inner(schema["schema"])
        default = schema["default_factory"]()
        # An object defaults to {} so that the API server applies the defaults of its own fields.
        json_schema["default"] = {} if isinstance(default, BaseModel) else self.encode_default(default)
        return json_schema


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_DefaultFactoryAwareSchema)
    return _structural(raw, raw.get("$defs", {}))


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn pydantic's JSON schema into a Kubernetes structural schema: refs inlined, nulls dropped, bounds in 3.0 form."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return _structural({**target, **siblings}, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        variants = [variant for variant in node["anyOf"] if variant.get("type") != "null"]
        rest = {
            key: value for key, value in node.items() if key != "anyOf" and not (key == "default" and value is None)
        }
        if len(variants) == 1:
            return _structural({**variants[0], **rest}, defs)
        # A field of several shapes (a string or a list): only pydantic can check it (see fields.TargetModules).
        return {**_structural(rest, defs), "x-kubernetes-preserve-unknown-fields": True}
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            result["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            result[key] = True
        elif key == "properties":
            result[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            result[key] = _structural(value, defs)
        else:
            result[key] = value
    if node.get("additionalProperties") is True:
        result["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(node.get("additionalProperties"), dict):
        result["additionalProperties"] = _structural(node["additionalProperties"], defs)
    return result


def render_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the FineTuneJob, with the cross-field rules on the spec."""
    spec = _model_schema(FineTuneJobSpec)
    spec["x-kubernetes-validations"] = [
        {"rule": rule.rule, "message": rule.message, "fieldPath": rule.field_path} for rule in SPEC_RULES
    ]
    return {
        "type": "object",
        "description": FineTuneJob.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            # Defaulted, so that a FineTuneJob the operator has not seen yet reads observedGeneration 0: kstatus (Flux)
            # calls an object without status Current, this one InProgress.
            "status": {**_model_schema(FineTuneJobStatus), "default": {}},
        },
    }


def render_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "tunery"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["tunery"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": render_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML file checked in under crds/ and the chart."""
    return GENERATED_HEADER + yaml.safe_dump(render_crd(), sort_keys=False, width=120, allow_unicode=True)
