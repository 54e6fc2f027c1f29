"""The FineTuneJob resource as a whole, and the names that identify its API."""

from typing import Any, Literal

from pydantic import Field

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


class FineTuneJob(ApiModel):
    """Fine-tune a language model from S3 data and publish and serve the result."""

    api_version: Literal["tunery.dev/v1alpha1"] = Field(API_VERSION)
    """API version."""
    kind: Literal["FineTuneJob"] = KIND
    """Kind."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """The desired fine-tuning job."""
    status: FineTuneJobStatus | None = None
    """The observed state, written by the operator and the trainer."""
