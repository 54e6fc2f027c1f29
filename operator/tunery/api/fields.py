"""Constrained field types shared by the API models; each check and its CRD pattern use one regex."""

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

# Every regex below must mean the same in Python's `re` and in Go's RE2 (the API server): no lookarounds.
_S3 = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
# A claim's path is mounted as a subPath: no empty, "." or ".." segments, so it cannot leave the claim.
_PVC_SEGMENT = r"([^./\s][^/\s]*|\.[^./\s][^/\s]*|\.\.[^/\s]+)"
_PVC = rf"pvc://[a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?(/({_PVC_SEGMENT}(/{_PVC_SEGMENT})*/?)?)?"
_HF = r"hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^\s@]+)?"
_FILE = r"file:///[^\s]*"

SOURCE_URI_PATTERN = f"^({_S3}|{_PVC}|{_HF}|{_FILE})$"
OUTPUT_URI_PATTERN = f"^({_S3}|{_PVC}|{_FILE})$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
RESOURCE_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
HTTP_URL_PATTERN = r"^https?://[^\s/?#]+(/[^\s]*)?$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

_SOURCE_FORMS = "s3://BUCKET/KEY, pvc://CLAIM/PATH, hf://ORG/NAME[@REVISION] or file:///PATH"
_OUTPUT_FORMS = "s3://BUCKET/PREFIX/, pvc://CLAIM/PATH or file:///PATH"


def _pattern_string(pattern: str, max_length: int, describe_error: Callable[[str], str]) -> Any:
    """A string type checked against `pattern` in Python and, through its JSON schema, by the API server."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise PydanticCustomError("pattern", "{detail}", {"detail": describe_error(value)})
        return value

    return Annotated[
        str,
        Field(max_length=max_length),
        AfterValidator(check),
        WithJsonSchema({"type": "string", "pattern": pattern, "maxLength": max_length}),
    ]


def _invalid_uri(forms: str) -> Callable[[str], str]:
    def describe(value: str) -> str:
        hint = f"use {forms}"
        if value.startswith("s3://"):
            hint += " (S3 bucket names are 3-63 lowercase letters, digits, dots and hyphens)"
        if value.startswith("pvc://"):
            hint += " (a claim's path has no empty, '.' or '..' parts: it cannot leave the claim)"
        return f"{value!r} is not a valid URI: {hint}"

    return describe


def _not_a(what: str, example: str) -> Callable[[str], str]:
    return lambda value: f"{value!r} is not {what}; write it like {example}"


def _quantity_to_string(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


SourceUri = _pattern_string(SOURCE_URI_PATTERN, 2048, _invalid_uri(_SOURCE_FORMS))
OutputUri = _pattern_string(OUTPUT_URI_PATTERN, 2048, _invalid_uri(_OUTPUT_FORMS))
ObjectName = _pattern_string(DNS_SUBDOMAIN_PATTERN, 253, _not_a("a Kubernetes object name", '"s3-creds"'))
ResourceName = _pattern_string(RESOURCE_NAME_PATTERN, 253, _not_a("a Kubernetes resource name", '"nvidia.com/gpu"'))
HttpUrl = _pattern_string(HTTP_URL_PATTERN, 2048, _not_a("an http(s) URL", '"http://minio.minio:9000"'))
ModelName = _pattern_string(
    MODEL_NAME_PATTERN, 128, _not_a("a model name of letters, digits, '.', '_' and '-'", '"support-bot"')
)

# Kubernetes accepts quantities as integers or strings; the API keeps them as strings.
Quantity = Annotated[
    _pattern_string(QUANTITY_PATTERN, 64, _not_a("a Kubernetes quantity", '"8", "500m" or "64Gi"')),
    BeforeValidator(_quantity_to_string),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]


def _check_target_modules(value: Any) -> Any:
    if value == "all-linear" or (
        isinstance(value, list) and value and all(isinstance(item, str) and item for item in value)
    ):
        return value
    raise PydanticCustomError(
        "target_modules",
        "{detail}",
        {"detail": f"{value!r} is not all-linear or a list of module names; write it like [q_proj, v_proj]"},
    )


# A string or a list: structural schemas cannot express that and CEL cannot see untyped fields, so the API
# server keeps the value as it is and only pydantic (tunery validate, the operator) checks its shape.
TargetModules = Annotated[
    str | list[str],
    BeforeValidator(_check_target_modules),
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]
