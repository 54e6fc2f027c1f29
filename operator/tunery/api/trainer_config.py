"""The trainer's configuration, as the operator renders it into the ConfigMap and the trainer reads it."""

from typing import Literal

from tunery.api.base import ApiModel
from tunery.api.resource import API_VERSION
from tunery.api.spec import FineTuneJobSpec


class FineTuneJobRef(ApiModel):
    """The FineTuneJob this configuration belongs to."""

    name: str
    """Its name."""
    namespace: str
    """Its namespace."""
    uid: str
    """Its UID."""


class TrainerConfig(ApiModel):
    """What one revision trains and where it writes; never a secret."""

    api_version: Literal["tunery.dev/v1alpha1"] = API_VERSION
    """API version."""
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    """Kind."""
    finetune_job: FineTuneJobRef
    """The FineTuneJob."""
    revision: str
    """The training revision."""
    output_uri: str
    """Where this revision publishes its model."""
    checkpoint_uri: str
    """Where this revision keeps its checkpoints."""
    spec: FineTuneJobSpec
    """The defaulted spec."""
