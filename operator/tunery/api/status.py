"""The FineTuneJob status: phase, kstatus conditions, progress, metrics, checkpoints, model and serving."""

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from tunery.api.base import ApiModel

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
ConditionType = Literal[
    "Ready", "Reconciling", "Stalled", "Validated", "Complete", "Failed", "ModelPublished", "Serving"
]
# The status fields the trainer reports; the operator's status patches never name them.
TRAINER_FIELDS = frozenset({"progress", "metrics", "checkpoints"})


class StatusModel(ApiModel):
    """A part of the status: built by the operator and the trainer by field name, read from the API by alias."""

    model_config = ConfigDict(**ApiModel.model_config, validate_by_name=True)


class Condition(StatusModel):
    """A kstatus condition (the shape of metav1.Condition), read by kubectl wait, Argo CD and Flux."""

    type: ConditionType
    """Condition type."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    observed_generation: int | None = Field(None, ge=0)
    """The metadata.generation this condition was computed from."""
    last_transition_time: datetime
    """When status last changed."""
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase reason for the last transition."""
    message: str = Field("", max_length=32768)
    """Human-readable details."""


class Progress(StatusModel):
    """Training progress as reported by the trainer."""

    step: int = Field(0, ge=0)
    """Optimiser steps done."""
    total_steps: int = Field(0, ge=0)
    """Optimiser steps planned."""
    epoch: float = Field(0, ge=0)
    """Epochs done (fractional)."""
    percent: int = Field(0, ge=0, le=100)
    """step / totalSteps, in percent."""
    eta_seconds: int | None = Field(None, ge=0)
    """Estimated seconds until training ends."""


class CheckpointRecord(StatusModel):
    """A complete checkpoint in storage."""

    step: int = Field(ge=0)
    """Optimiser step of the checkpoint."""
    uri: str
    """Where the checkpoint is stored."""
    eval_loss: float | None = None
    """Validation loss at this step, when evaluated."""


class ModelRecord(StatusModel):
    """The published model."""

    uri: str
    """Where the published model is stored."""
    name: str
    """The name it is served under."""


class ServingStatus(StatusModel):
    """The inference endpoint's state."""

    phase: Literal["Deploying", "Ready", "Failed"]
    """Deploying until the ready replicas serve the current model."""
    endpoint: str = ""
    """In-cluster base URL of the OpenAI-compatible API."""
    ready_replicas: int = Field(0, ge=0)
    """Replicas ready to serve."""
    message: str = Field("", max_length=4096)
    """Why the endpoint is not ready yet, or why its rollout failed."""


class Failure(StatusModel):
    """Why the job failed, in terms a user can act on."""

    reason: str = Field(max_length=256)
    """CamelCase failure class, for example InvalidSpec, OOMKilled, DeadlineExceeded, DataError."""
    message: str = Field(max_length=32768)
    """What happened and how to fix it."""


class FineTuneJobStatus(StatusModel):
    """The observed state of a FineTuneJob."""

    phase: Phase = "Pending"
    """Lifecycle phase."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """kstatus conditions: Ready, Reconciling, Stalled, Validated, Complete, Failed, ModelPublished, Serving."""
    observed_generation: int = Field(0, ge=0)
    """The metadata.generation the status describes; 0 until the operator has seen the FineTuneJob."""
    progress: Progress | None = None
    """Training progress."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest training and evaluation metrics (trainLoss, evalLoss, learningRate, ...)."""
    revision: str = Field("", max_length=64)
    """The training revision the current Job runs: a hash of the spec without serving, suspend and the retry limits."""
    attempts: int = Field(0, ge=0)
    """Training attempts started, including retries."""
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, max_length=100)
    """Complete checkpoints of the current revision, newest last."""
    model: ModelRecord | None = None
    """The published model."""
    model_revision: str = Field("", max_length=64)
    """The training revision that produced status.model."""
    serving: ServingStatus | None = None
    """The inference endpoint."""
    start_time: datetime | None = None
    """When training started."""
    completion_time: datetime | None = None
    """When training finished."""
    failure: Failure | None = None
    """Why the job failed."""
