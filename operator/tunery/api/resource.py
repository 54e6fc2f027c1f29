"""The FineTuneJob resource as a whole, and the names that identify its API."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tunery.api.base import ApiModel
from tunery.api.spec import FineTuneJobSpec
from tunery.api.status import FineTuneJobStatus

GROUP = "tunery.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
# Child objects append a suffix (revision hash, pod index) and must stay within 63 characters.
MAX_NAME_LENGTH = 45


class ObjectMeta(BaseModel):
    """The metadata fields the operator reads; the API server owns the rest (managedFields and others are ignored)."""

    model_config = ConfigDict(alias_generator=to_camel, extra="ignore", frozen=True)

    name: str = ""
    namespace: str = ""
    uid: str = ""
    generation: int = 1
    resource_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class FineTuneJob(ApiModel):
    """Fine-tune a language model from S3 data and publish and serve the result."""

    api_version: Literal["tunery.dev/v1alpha1"] = Field(API_VERSION)
    """API version."""
    kind: Literal["FineTuneJob"] = KIND
    """Kind."""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """The desired fine-tuning job."""
    status: FineTuneJobStatus | None = None
    """The observed state, written by the operator and the trainer."""
