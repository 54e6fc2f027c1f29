"""Decide a FineTuneJob's status from what was observed: the validation result, its Job and the Job's pods."""

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tunery.api.status import (
    TRAINER_FIELDS,
    Condition,
    ConditionType,
    Failure,
    FineTuneJobStatus,
    ModelRecord,
    ServingStatus,
)
from tunery.api.validation import FieldError


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    generation: int
    revision: str
    spec_errors: list[FieldError] = field(default_factory=list)
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    job_warnings: list[dict[str, Any]] = field(default_factory=list)
    queued: bool = False
    queue_reason: tuple[str, str] | None = None
    """Kueue's (reason, message) for holding a queued Job, from its Workload."""
    model: ModelRecord | None = None
    """Where this revision publishes its model ({uri, name}); it becomes status.model once the revision succeeds."""
    serving: "ServingObservation | None" = None
    """The serving Deployment, when spec.serving.enabled and a model has been published."""
    serving_enabled: bool = False
    child_conflict: str | None = None
    """Why a child could not be applied: its name is taken by an object this FineTuneJob does not own."""


@dataclass(frozen=True)
class ServingObservation:
    """The serving Deployment as stored, its pods, and where it answers."""

    deployment: dict[str, Any]
    pods: list[dict[str, Any]]
    endpoint: str


@dataclass(frozen=True)
class Verdict:
    """The phase and why: the reason and message behind it."""

    phase: str
    reason: str
    message: str


# Reasons that keep pods from starting and need someone to act.
WAITING_PROBLEMS = ("Unschedulable", "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "FailedCreate")
CHILD_CONFLICT = "ChildConflict"
# Reasons worth looking again soon, since nothing watched may change: a Job without running pods yet, a
# child name taken by another object (which its owner may remove, or the garbage collector may still delete),
# and a queued Job whose Workload (not watched) Kueue has not given a reason yet (the fallback reason "Queued").
STARTING = ("Creating", "Starting", "FailedCreate", CHILD_CONFLICT, "Queued")


def decide(observation: Observation) -> Verdict:
    """The lifecycle phase, with a reason a user can act on."""
    if observation.spec_errors:
        return Verdict("Failed", "InvalidSpec", "; ".join(str(error) for error in observation.spec_errors))
    job = observation.job
    if job is None and observation.child_conflict:
        return Verdict("Pending", CHILD_CONFLICT, observation.child_conflict)
    if job is None:
        return Verdict("Pending", "Creating", "creating the training Job")
    finished = finished_condition(job)
    if finished and finished["type"] == "Complete":
        return Verdict("Succeeded", "TrainingSucceeded", "training finished")
    if finished:
        reason, message = _failure(finished, observation.pods)
        return Verdict("Failed", reason, message)
    if job["spec"].get("suspend"):
        if observation.queued:
            reason, message = observation.queue_reason or ("Queued", "waiting for the queue to admit the Job")
            return Verdict("Queued", reason, message)
        return Verdict(
            "Suspended", "Suspended", "spec.suspend is true; set it to false to resume from the latest checkpoint"
        )
    waiting = _waiting_reason(observation.pods) or _pods_not_created(observation)
    if waiting:
        return Verdict("Pending", *waiting)
    phases = {pod.get("status", {}).get("phase") for pod in observation.pods}
    if "Running" in phases:
        return Verdict("Running", "Training", "training is running")
    # Between the trainer's exit and the Job's Complete condition the run is not starting over.
    if "Succeeded" in phases:
        return Verdict("Running", "Finishing", "the trainer finished; waiting for the Job to complete")
    return Verdict("Pending", "Starting", "waiting for the training pods to start")


def operator_status(
    observation: Observation, verdict: Verdict, previous: FineTuneJobStatus, now: datetime
) -> FineTuneJobStatus:
    """The status for `decide(observation)`: the operator's fields computed, the trainer's kept as stored.

    Conditions keep their transition time while their status holds. Built through the status model, so a phase,
    condition or reason the CRD would refuse fails here, not at the API server.
    """
    terminal = verdict.phase in ("Succeeded", "Failed")
    serving = serving_status(observation.serving) if observation.serving_enabled and observation.serving else None
    serving_phase = serving.phase if serving else None
    serving_holds, serving_reason, serving_message = _serving_condition(observation, serving)
    # With serving requested, the job is Ready (and done reconciling) only once the endpoint serves its model.
    ready = verdict.phase == "Succeeded" and (not observation.serving_enabled or serving_phase == "Ready")
    waiting_for_serving = verdict.phase == "Succeeded" and not ready
    ready_reason, ready_message = (
        (serving_reason, serving_message) if waiting_for_serving else (verdict.reason, verdict.message)
    )
    stalled_reason, stalled_message = verdict.reason, verdict.message if verdict.phase == "Failed" else ""
    if observation.child_conflict:
        stalled_reason, stalled_message = CHILD_CONFLICT, observation.child_conflict
    elif serving_phase == "Failed" and verdict.phase != "Failed":
        stalled_reason, stalled_message = serving_reason, serving_message
    model, model_revision = previous.model, previous.model_revision
    # The served model changes only when a revision succeeds; until then the previous one stays in the status.
    if verdict.phase == "Succeeded" and observation.model:
        model, model_revision = observation.model, observation.revision
    conditions = _Conditions(previous.conditions, observation.generation, now)
    conditions.set(
        "Validated",
        not observation.spec_errors,
        "InvalidSpec" if observation.spec_errors else "Valid",
        verdict.message if observation.spec_errors else "",
    )
    conditions.set("Ready", ready, ready_reason, ready_message)
    reconciling = not terminal or (waiting_for_serving and serving_phase != "Failed")
    conditions.set("Reconciling", reconciling, ready_reason, verdict.message if reconciling else "")
    stalled = verdict.phase == "Failed" or serving_phase == "Failed" or observation.child_conflict is not None
    conditions.set("Stalled", stalled, stalled_reason, stalled_message if stalled else "")
    conditions.set("Complete", verdict.phase == "Succeeded", verdict.reason, _if(verdict.phase == "Succeeded", verdict))
    conditions.set("Failed", verdict.phase == "Failed", verdict.reason, _if(verdict.phase == "Failed", verdict))
    conditions.set(
        "ModelPublished",
        model is not None,
        "Published" if model else "NotPublished",
        f"revision {model_revision} published its model to {model.uri}"
        if model
        else "no revision has published a model yet",
    )
    conditions.set("Serving", serving_holds, serving_reason, serving_message)
    job_status = (observation.job or {}).get("status", {})
    return FineTuneJobStatus.model_validate(
        {
            **previous.model_dump(by_alias=True, include=TRAINER_FIELDS),
            "phase": verdict.phase,
            "conditions": conditions.all(),
            "observedGeneration": observation.generation,
            "revision": observation.revision,
            "attempts": job_status.get("failed", 0) + job_status.get("succeeded", 0) + job_status.get("active", 0),
            # The Job controller may record its start after the pods are seen running; the first pod's start stands in.
            "startTime": job_status.get("startTime") or _first_pod_start(observation.pods),
            "completionTime": job_status.get("completionTime"),
            "failure": Failure(reason=verdict.reason, message=verdict.message) if verdict.phase == "Failed" else None,
            "model": model,
            "modelRevision": model_revision,
            "serving": serving,
        }
    )


def _if(holds: bool, verdict: Verdict) -> str:
    return verdict.message if holds else ""


class _Conditions:
    """The conditions being set, each keeping its transition time from `before` while its status holds."""

    def __init__(self, before: list[Condition], generation: int, now: datetime) -> None:
        self._before = {condition.type: condition for condition in before}
        self._generation = generation
        self._now = now.replace(microsecond=0)
        self._set: list[Condition] = []

    def set(self, kind: ConditionType, holds: bool, reason: str, message: str) -> None:
        status = "True" if holds else "False"
        earlier = self._before.get(kind)
        unchanged = earlier is not None and earlier.status == status
        self._set.append(
            Condition(
                type=kind,
                status=status,
                observed_generation=self._generation,
                last_transition_time=earlier.last_transition_time if unchanged else self._now,
                reason=reason,
                message=message,
            )
        )

    def all(self) -> list[Condition]:
        return self._set


def serving_status(observed: ServingObservation) -> ServingStatus:
    """status.serving: Ready once every replica runs the current template, Failed when the rollout cannot finish."""
    deployment = observed.deployment
    status = deployment.get("status", {})
    wanted_replicas = deployment["spec"].get("replicas", 1)
    ready_replicas = status.get("readyReplicas", 0)

    def result(phase: str, message: str = "") -> ServingStatus:
        return ServingStatus(phase=phase, endpoint=observed.endpoint, ready_replicas=ready_replicas, message=message)

    keeps_serving = "; the ready replicas keep serving the previous model" if ready_replicas else ""
    fetch_failure = _fetch_failure(observed.pods)
    if fetch_failure:
        return result("Failed", f"{fetch_failure}{keeps_serving}")
    progressing = next((c for c in status.get("conditions", []) if c["type"] == "Progressing"), None)
    if progressing and progressing["status"] == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        waiting = _waiting_reason(observed.pods)
        cause = f" ({waiting[0]}: {waiting[1]})" if waiting else ""
        deadline = deployment["spec"].get("progressDeadlineSeconds")
        return result("Failed", f"the new serving pods did not become ready within {deadline}s{cause}{keeps_serving}")
    settled = (
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 1)
        and status.get("updatedReplicas", 0) == wanted_replicas
        and status.get("replicas", 0) == wanted_replicas
        and ready_replicas >= wanted_replicas
    )
    if settled:
        return result("Ready")
    waiting = _waiting_reason(observed.pods)
    return result(
        "Deploying",
        f"{waiting[0]}: {waiting[1]}" if waiting else f"{ready_replicas} of {wanted_replicas} replicas ready",
    )


def _serving_condition(observation: Observation, serving: ServingStatus | None) -> tuple[bool, str, str]:
    if not observation.serving_enabled:
        return False, "ServingDisabled", "spec.serving.enabled is false"
    if serving is None and observation.child_conflict:
        return False, CHILD_CONFLICT, observation.child_conflict
    if serving is None:
        return False, "WaitingForModel", "the endpoint is deployed once a revision has published its model"
    if serving.phase == "Ready":
        return True, "Serving", f"serving at {serving.endpoint}"
    if serving.phase == "Failed":
        return False, "ServingFailed", serving.message
    return False, "Deploying", serving.message


def _fetch_failure(pods: list[dict[str, Any]]) -> str | None:
    """The init container's own JSON reason when it could not fetch the model (missing, incomplete, no access)."""
    for pod in pods:
        for container in pod.get("status", {}).get("initContainerStatuses", []):
            terminated = container.get("state", {}).get("terminated") or container.get("lastState", {}).get(
                "terminated"
            )
            if terminated and terminated.get("exitCode", 0) != 0:
                reported = _trainer_message(terminated.get("message", ""))
                return f"{reported[0]}: {reported[1]}" if reported else f"fetching the model failed ({terminated})"
    return None


def _first_pod_start(pods: list[dict[str, Any]]) -> str | None:
    starts = [pod.get("status", {}).get("startTime") for pod in pods]
    return min((start for start in starts if start), default=None)


def changed_fields(wanted: FineTuneJobStatus, stored: FineTuneJobStatus) -> dict[str, Any]:
    """The operator's fields that differ from the stored status, as a merge patch (None deletes a field).

    The trainer's fields (progress, metrics, checkpoints) are never named, so the patch cannot clobber them.
    """
    new = wanted.model_dump(by_alias=True, mode="json", exclude=TRAINER_FIELDS)
    old = stored.model_dump(by_alias=True, mode="json", exclude=TRAINER_FIELDS)
    return {key: value for key, value in new.items() if old.get(key) != value}


def finished_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's Complete or Failed condition when it has finished, else None."""
    return _job_condition(job, "Complete") or _job_condition(job, "Failed")


def _job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions", []):
        if condition["type"] == kind and condition["status"] == "True":
            return condition
    return None


def _failure(condition: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str]:
    """The most specific reason: the trainer's own JSON message, an OOM kill, else the Job's reason."""
    for pod in sorted(pods, key=lambda pod: pod["metadata"].get("creationTimestamp", ""), reverse=True):
        for container in pod.get("status", {}).get("containerStatuses", []):
            terminated = container.get("state", {}).get("terminated") or container.get("lastState", {}).get(
                "terminated"
            )
            if not terminated:
                continue
            if terminated.get("reason") == "OOMKilled":
                return "OOMKilled", (
                    f"the trainer ran out of memory in pod {pod['metadata']['name']}: raise spec.resources.memory, "
                    "lower hyperparameters.batchSize or dataset.maxLength, or enable gradientCheckpointing"
                )
            reported = _trainer_message(terminated.get("message", ""))
            if reported:
                return reported
    reason = condition.get("reason") or "TrainingFailed"
    message = condition.get("message") or "the training Job failed"
    if reason == "DeadlineExceeded":
        message += "; raise spec.activeDeadlineSeconds or lower the training budget"
    elif reason == "BackoffLimitExceeded":
        message += "; each retry resumed from the latest checkpoint, see the trainer's logs"
    return reason, message


def _trainer_message(text: str) -> tuple[str, str] | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("reason"), str) and isinstance(parsed.get("message"), str):
        return parsed["reason"], parsed["message"]
    return None


def _pods_not_created(observation: Observation) -> tuple[str, str] | None:
    """The Job controller's latest complaint (quota, PriorityClass, admission) when it created no pod."""
    if observation.pods:
        return None
    complaints = [event for event in observation.job_warnings if event.get("reason") == "FailedCreate"]
    if not complaints:
        return None
    latest = max(complaints, key=lambda event: event.get("lastTimestamp") or event.get("eventTime") or "")
    return "FailedCreate", latest.get("message", "the Job controller could not create the training pods")


def _waiting_reason(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why pods are not running yet, when Kubernetes says: unschedulable, or an image that cannot be pulled."""
    for pod in pods:
        status = pod.get("status", {})
        for condition in status.get("conditions", []):
            if (
                condition["type"] == "PodScheduled"
                and condition["status"] == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return "Unschedulable", condition.get("message", "no node fits the training pod")
        for container in status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") in WAITING_PROBLEMS:
                return waiting[
                    "reason"
                ], f"{container.get('image', 'the image')}: {waiting.get('message', 'cannot be pulled')}"
    return None
