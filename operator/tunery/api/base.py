"""The base model every API object derives from: camelCase on the wire, unknown fields rejected."""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A Kubernetes-style API object: camelCase keys, no unknown fields, field docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
    )
