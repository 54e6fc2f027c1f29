"""Reconcile one FineTuneJob: validate, apply its revision's children, observe them, patch the status if it changed."""

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from tunery.api.policy import Policy, validate_for_cluster
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import decisions, naming
from tunery.controller.kube import KubeApi, NotOwned, owned_by
from tunery.controller.metrics import OperatorMetrics
from tunery.controller.render import TrainingTarget, render_training_children, training_target
from tunery.controller.serving import render_serving_children, serving_target
from tunery.controller.settings import OperatorSettings

# Posts a Kubernetes Event about a FineTuneJob: (body, type, reason, message).
EventPoster = Callable[[dict[str, Any], str, str, str], None]

logger = logging.getLogger(__name__)


class Reconciler:
    """Level-triggered reconciliation; one FineTuneJob at a time, however many watch events point at it."""

    def __init__(
        self, api: KubeApi, settings: OperatorSettings, post_event: EventPoster, metrics: OperatorMetrics
    ) -> None:
        self._api = api
        self._settings = settings
        self._policy: Policy = settings.policy()
        self._post_event = post_event
        self.metrics = metrics
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def reconcile(self, namespace: str, name: str) -> decisions.Verdict | None:
        """Reconcile and return the verdict (None once the FineTuneJob is gone)."""
        async with self._locks[(namespace, name)]:
            with self.metrics.reconciling():
                return await self._reconcile(namespace, name)

    async def _reconcile(self, namespace: str, name: str) -> decisions.Verdict | None:
        body = await self._api.get_finetunejob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget(namespace, name)
            return None
        observation = await self._observe(body)
        previous = body.get("status") or {}
        now = datetime.now(UTC)
        verdict = decisions.decide(observation)
        observation = await self._serve(body, observation, verdict, previous)
        wanted = decisions.operator_status(observation, verdict, previous, now)
        patch = decisions.changed_fields(wanted, previous)
        if patch:
            await self._api.patch_status(namespace, name, patch)
        self._record(body, wanted, previous.get("phase"), now)
        if observation.child_conflict:
            verdict = decisions.Verdict(verdict.phase, decisions.CHILD_CONFLICT, observation.child_conflict)
        if wanted["phase"] != previous.get("phase") or _reason(previous) != verdict.reason:
            self._post_event(body, _event_type(verdict), verdict.reason, f"{verdict.phase}: {verdict.message}")
        return verdict

    def _record(self, body: dict[str, Any], wanted: dict[str, Any], previous_phase: str | None, now: datetime) -> None:
        phase = wanted["phase"]
        resources = body["spec"].get("resources") or {}
        gpus = int(resources.get("gpus", 0)) * int(resources.get("nodes", 1))
        metadata = body["metadata"]
        self.metrics.observe_phase(metadata["namespace"], metadata["name"], phase, previous_phase, gpus)
        if phase == previous_phase:
            return
        if phase == "Running":
            self.metrics.queue_wait.observe((now - _timestamp(metadata["creationTimestamp"])).total_seconds())
        if phase in ("Succeeded", "Failed") and wanted.get("startTime") and wanted.get("completionTime"):
            duration = _timestamp(wanted["completionTime"]) - _timestamp(wanted["startTime"])
            self.metrics.job_duration.labels(outcome=phase).observe(duration.total_seconds())

    async def _observe(self, body: dict[str, Any]) -> decisions.Observation:
        metadata = body["metadata"]
        generation = metadata.get("generation", 1)
        errors = validate_for_cluster(_without_status(body), self._policy)
        if errors:
            return decisions.Observation(generation, revision="", spec_errors=errors)
        spec = FineTuneJobSpec.model_validate(body["spec"])
        revision = naming.revision(spec, (body.get("status") or {}).get("revision"))
        target = training_target(metadata, spec, revision, spec.image or self._settings.trainer_image)
        existing = await self._api.get_job(target.namespace, target.job_name)
        try:
            applied = [
                await self._apply_training_child(child, existing, target) for child in render_training_children(target)
            ]
        except NotOwned as conflict:
            return decisions.Observation(generation, revision, child_conflict=str(conflict))
        job = applied[-1]
        await self._stop_stale_revisions(target)
        pods = await self._api.list_pods(target.namespace, target.job_name)
        warnings = [] if pods or job is None else await self._api.list_job_warnings(target.namespace, target.job_name)
        model = {"uri": target.output_prefix, "name": spec.output.name or target.name}
        return decisions.Observation(
            generation,
            revision,
            job=job,
            pods=pods,
            job_warnings=warnings,
            queued=target.queue_name is not None,
            model=model,
        )

    async def _serve(
        self,
        body: dict[str, Any],
        observation: decisions.Observation,
        verdict: decisions.Verdict,
        previous: dict[str, Any],
    ) -> decisions.Observation:
        """Serve the latest successful revision's model; a running or failed revision leaves the served one alone."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        if observation.spec_errors:
            return observation
        spec = FineTuneJobSpec.model_validate(body["spec"])
        if observation.child_conflict:
            return replace(observation, serving_enabled=spec.serving.enabled)
        if not spec.serving.enabled:
            if await self._api.delete_serving(namespace, naming.serving_name(name), metadata["uid"]):
                logger.info("removed the serving Deployment of %s/%s: spec.serving.enabled is false", namespace, name)
            return observation
        if verdict.phase == "Succeeded" and observation.model:
            model, model_revision = observation.model, observation.revision
        else:
            model, model_revision = previous.get("model"), previous.get("modelRevision")
        if not model or not model_revision:
            return replace(observation, serving_enabled=True)
        target = serving_target(metadata, spec, model, model_revision, self._settings, self._policy)
        try:
            applied = [await self._api.apply_owned(child) for child in render_serving_children(target)]
        except NotOwned as conflict:
            return replace(observation, serving_enabled=True, child_conflict=str(conflict))
        deployment = next(child for child in applied if child["kind"] == "Deployment")
        pods = await self._api.list_serving_pods(namespace, name)
        serving = decisions.ServingObservation(deployment, pods, target.endpoint)
        return replace(observation, serving_enabled=True, serving=serving)

    async def _apply_training_child(
        self, child: dict[str, Any], existing_job: dict[str, Any] | None, target: TrainingTarget
    ) -> dict[str, Any] | None:
        """Apply a child. Pod templates are immutable, so a Job rendered otherwise is handled apart: one whose
        storage settings changed is replaced while unfinished (the new pods resume from its checkpoints; None while
        the old pods go), any other (an older operator, another trainer image) keeps its template and only has
        spec.suspend brought in line."""
        if child["kind"] != "Job":
            return await self._api.apply_owned(child)
        # The Job was read already: its ownership is checked here rather than read again.
        if existing_job is None:
            return await self._api.apply(child)
        if not owned_by(existing_job, target.uid):
            raise NotOwned("Job", target.namespace, target.job_name)
        if existing_job["metadata"].get("deletionTimestamp"):
            return None
        have = existing_job["metadata"].get("annotations") or {}
        want = child["metadata"]["annotations"]
        if have.get(naming.TEMPLATE_HASH_ANNOTATION) == want[naming.TEMPLATE_HASH_ANNOTATION]:
            return await self._api.apply(child)
        storage_changed = have.get(naming.STORAGE_HASH_ANNOTATION) not in (None, want[naming.STORAGE_HASH_ANNOTATION])
        if storage_changed and decisions.finished_condition(existing_job) is None:
            logger.info("replacing Job %s: spec.storage changed; it resumes from its checkpoints", target.job_name)
            await self._api.delete_job(target.namespace, target.job_name, wait_for_pods=True)
            return None
        wanted = child["spec"].get("suspend")
        if wanted is None or existing_job["spec"].get("suspend") == wanted:
            return existing_job
        return await self._api.set_job_suspended(target.namespace, target.job_name, wanted)

    async def _stop_stale_revisions(self, target: TrainingTarget) -> None:
        """A new revision replaces the old one: its unfinished Job is stopped (its checkpoints stay in storage)."""
        for job in await self._api.list_jobs(target.namespace, target.name):
            stale = job["metadata"]["labels"].get(naming.REVISION_LABEL) != target.revision
            # Anyone who may label a Job could point it at this FineTuneJob: only its own Jobs are stopped.
            if stale and owned_by(job, target.uid) and decisions.finished_condition(job) is None:
                logger.info("stopping Job %s of a superseded revision", job["metadata"]["name"])
                await self._api.delete_job(target.namespace, job["metadata"]["name"])


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _reason(status: dict[str, Any]) -> str | None:
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
    return ready["reason"] if ready else None


def _event_type(verdict: decisions.Verdict) -> str:
    troubled = verdict.phase == "Failed" or verdict.reason in (*decisions.WAITING_PROBLEMS, decisions.CHILD_CONFLICT)
    return "Warning" if troubled else "Normal"


def _without_status(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "status"}
