"""The operator's settings, read from TUNERY_* environment variables."""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tunery.api import contract
from tunery.api.policy import Policy, load_policy


class OperatorSettings(BaseSettings):
    """How this operator process runs; every field can be set as TUNERY_<NAME> (for example TUNERY_NAMESPACES)."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch (comma-separated); empty watches the whole cluster."""
    trainer_image: str = "ghcr.io/tunery/trainer:0.1.0"
    """The trainer image for Jobs whose spec.image is empty."""
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    """The vLLM image for spec.serving.runtime vllm."""
    trainer_termination_grace_seconds: int = Field(contract.TERMINATION_GRACE_SECONDS, ge=1)
    """Trainer pods' terminationGracePeriodSeconds: how long a preempted or evicted trainer may take to finish its
    step and upload a checkpoint before it is killed (a tenant cannot choose it: it holds the node)."""
    serving_progress_deadline_seconds: int = Field(900, ge=10)
    """How long a serving rollout may take before it is reported Failed (the previous model keeps serving)."""
    policy_file: Path | None = None
    """The platform's policy (YAML, tunery.api.policy.Policy; the chart mounts its `policy` values); empty applies
    the default policy."""
    workers: int = Field(20, ge=1)
    """Concurrent reconciliations."""
    pending_recheck_seconds: float = Field(15.0, gt=0)
    """How often a job whose pods have not started is looked at again (a Job that cannot create pods changes nothing watched)."""
    peering: str = ""
    """Kopf peering name for running several replicas (the one of highest priority works); empty runs standalone."""
    peering_priority: int | None = Field(None, ge=0)
    """This replica's peering priority; empty picks a random one, so that replicas of one Deployment differ."""
    peering_lifetime_seconds: int = Field(60, ge=1)
    """How long a replica that stopped announcing itself is still counted (the takeover delay after a crash)."""
    metrics_port: int = Field(8080, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    health_port: int = Field(8081, ge=0, le=65535)
    """Port of the liveness endpoint (/healthz); 0 disables it."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def policy(self) -> Policy:
        """The policy file's, or the default policy."""
        return load_policy(self.policy_file) if self.policy_file else Policy()
