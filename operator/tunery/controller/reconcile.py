"""Reconcile one FineTuneJob: validate, apply its revision's children, observe them, patch the status if it changed."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from tunery.api.policy import Policy, parse_for_cluster
from tunery.api.resource import FineTuneJob, ObjectMeta
from tunery.api.status import FineTuneJobStatus, ModelRecord
from tunery.api.validation import Parsed
from tunery.controller import decisions, naming, queueing
from tunery.controller.kube import KubeApi, NotOwned, owned_by
from tunery.controller.metrics import OperatorMetrics
from tunery.controller.render import TrainingTarget, render_training_children, training_target
from tunery.controller.serving import render_serving_children, serving_target
from tunery.controller.settings import OperatorSettings
from tunery.controller.watched import Watched

# Posts a Kubernetes Event about a FineTuneJob: (metadata, type, reason, message).
EventPoster = Callable[[ObjectMeta, str, str, str], None]
_APPLIED_AFTER = ("RoleBinding", "Job")
# The Job controller reports pods it could not create only in Events; they are read once it has had time to try.
_PODS_EXPECTED_SECONDS = 10.0

logger = logging.getLogger(__name__)


class Reconciler:
    """Level-triggered reconciliation of one FineTuneJob from its stored state and its watched children."""

    def __init__(
        self,
        api: KubeApi,
        watched: Watched,
        settings: OperatorSettings,
        post_event: EventPoster,
        metrics: OperatorMetrics,
    ) -> None:
        self._api = api
        self._watched = watched
        self._settings = settings
        self._policy: Policy = settings.policy()
        self._post_event = post_event
        self.metrics = metrics
        # The spec checks' outcome per FineTuneJob, for the (uid, generation) it was computed from.
        self._parsed: dict[tuple[str, str], tuple[tuple[str, int], Parsed]] = {}

    async def reconcile(self, namespace: str, name: str) -> decisions.Verdict | None:
        """Reconcile and return the verdict (None once the FineTuneJob is gone)."""
        with self.metrics.reconciling():
            return await self._reconcile(namespace, name)

    async def _reconcile(self, namespace: str, name: str) -> decisions.Verdict | None:
        body = await self._api.get_finetunejob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget(namespace, name)
            self._parsed.pop((namespace, name), None)
            return None
        metadata = ObjectMeta.model_validate(body["metadata"])
        stored = _stored_status(body, metadata)
        parsed = self._parse(body, metadata)
        finetunejob = parsed.finetunejob
        if finetunejob is None:
            observation = decisions.Observation(metadata.generation, revision="", spec_errors=parsed.errors)
        else:
            observation = await self._observe(finetunejob, stored)
        now = datetime.now(UTC)
        verdict = decisions.decide(observation)
        if finetunejob is not None:
            observation = await self._serve(finetunejob, observation, verdict, stored)
        wanted = decisions.operator_status(observation, verdict, stored, now)
        patch = decisions.changed_fields(wanted, stored)
        if patch:
            await self._api.patch_status(namespace, name, patch)
        previous_phase = stored.phase if "phase" in stored.model_fields_set else None
        self._record(metadata, finetunejob, wanted, previous_phase, now)
        if observation.child_conflict:
            verdict = decisions.Verdict(verdict.phase, decisions.CHILD_CONFLICT, observation.child_conflict)
        if wanted.phase != previous_phase or _ready_reason(stored) != verdict.reason:
            self._post_event(metadata, _event_type(verdict), verdict.reason, f"{verdict.phase}: {verdict.message}")
        return verdict

    def _parse(self, body: dict[str, Any], metadata: ObjectMeta) -> Parsed:
        """The FineTuneJob as the operator reads it. The spec's checks (CEL rules, policy) hold for its generation,
        so they run once per generation; the metadata (labels such as Kueue's queue) is always the current one."""
        key = (metadata.namespace, metadata.name)
        cached = self._parsed.get(key)
        if cached is None or cached[0] != (metadata.uid, metadata.generation):
            parsed = parse_for_cluster({part: value for part, value in body.items() if part != "status"}, self._policy)
            self._parsed[key] = ((metadata.uid, metadata.generation), parsed)
            return parsed
        finetunejob = cached[1].finetunejob
        if finetunejob is None:
            return cached[1]
        return Parsed(finetunejob.model_copy(update={"metadata": metadata}), [])

    def _record(
        self,
        metadata: ObjectMeta,
        finetunejob: FineTuneJob | None,
        wanted: FineTuneJobStatus,
        previous_phase: str | None,
        now: datetime,
    ) -> None:
        phase = wanted.phase
        resources = finetunejob.spec.resources if finetunejob else None
        gpus = resources.gpus * resources.nodes if resources else 0
        self.metrics.observe_phase(metadata.namespace, metadata.name, phase, previous_phase, gpus)
        if phase == previous_phase:
            return
        if phase == "Running" and metadata.creation_timestamp:
            self.metrics.queue_wait.observe((now - metadata.creation_timestamp).total_seconds())
        if phase in ("Succeeded", "Failed") and wanted.start_time and wanted.completion_time:
            duration = wanted.completion_time - wanted.start_time
            self.metrics.job_duration.labels(outcome=phase).observe(duration.total_seconds())

    async def _observe(self, finetunejob: FineTuneJob, stored: FineTuneJobStatus) -> decisions.Observation:
        spec, generation = finetunejob.spec, finetunejob.metadata.generation
        revision = naming.revision(spec, stored.revision or None)
        target = training_target(
            finetunejob,
            revision,
            spec.image or self._settings.trainer_image,
            self._settings.trainer_termination_grace_seconds,
        )
        children = render_training_children(target)
        # Independent children go at once; a RoleBinding after its Role (the API server checks the binder holds
        # the Role's rights), the Job last.
        after = [child for child in children if child["kind"] in _APPLIED_AFTER]
        try:
            await asyncio.gather(
                *(self._api.apply_owned(child) for child in children if child["kind"] not in _APPLIED_AFTER)
            )
            for child in after:
                job = await self._apply_training_child(child, target)
        except NotOwned as conflict:
            return decisions.Observation(generation, revision, child_conflict=str(conflict))
        await self._stop_stale_revisions(target)
        pods = self._watched.training_pods(target.namespace, target.job_name)
        workload = None
        if target.queue_name and job and job["spec"].get("suspend"):
            workload = await self._api.get_workload(target.namespace, job)
        return decisions.Observation(
            generation,
            revision,
            job=job,
            pods=pods,
            job_warnings=await self._job_warnings(job, pods, target),
            queued=target.queue_name is not None,
            queue_reason=queueing.queue_reason(workload) if workload else None,
            model=ModelRecord(uri=target.output_prefix, name=spec.output.name or target.name),
        )

    async def _job_warnings(
        self, job: dict[str, Any] | None, pods: list[dict[str, Any]], target: TrainingTarget
    ) -> list[dict[str, Any]]:
        """The Job's Warning Events, read only when it has had time to create pods and has none."""
        if pods or job is None or job["spec"].get("suspend"):
            return []
        created = job["metadata"].get("creationTimestamp")
        if created and (datetime.now(UTC) - _timestamp(created)).total_seconds() < _PODS_EXPECTED_SECONDS:
            return []
        return await self._api.list_job_warnings(target.namespace, target.job_name)

    async def _serve(
        self,
        finetunejob: FineTuneJob,
        observation: decisions.Observation,
        verdict: decisions.Verdict,
        stored: FineTuneJobStatus,
    ) -> decisions.Observation:
        """Serve the latest successful revision's model; a running or failed revision leaves the served one alone."""
        metadata, spec = finetunejob.metadata, finetunejob.spec
        namespace, name, uid = metadata.namespace, metadata.name, metadata.uid
        if observation.child_conflict:
            return replace(observation, serving_enabled=spec.serving.enabled)
        if not spec.serving.enabled:
            await self._remove_serving(namespace, name, uid, stored)
            return observation
        if verdict.phase == "Succeeded" and observation.model:
            model, model_revision = observation.model, observation.revision
        else:
            model, model_revision = stored.model, stored.model_revision
        if not model or not model_revision:
            return replace(observation, serving_enabled=True)
        target = serving_target(finetunejob, model, model_revision, self._settings, self._policy)
        try:
            for child in render_serving_children(target):
                if child["kind"] == "Deployment":
                    deployment = await self._apply_deployment(child, namespace, name, uid)
                else:
                    await self._api.apply_owned(child)
        except NotOwned as conflict:
            return replace(observation, serving_enabled=True, child_conflict=str(conflict))
        serving = decisions.ServingObservation(deployment, self._watched.serving_pods(namespace, name), target.endpoint)
        return replace(observation, serving_enabled=True, serving=serving)

    async def _remove_serving(self, namespace: str, name: str, uid: str, stored: FineTuneJobStatus) -> None:
        """Delete the serving children, looked for only while the status or the watch shows an endpoint (a
        FineTuneJob that never served costs no request)."""
        serving_name = naming.serving_name(name)
        if stored.serving is None and self._watched.deployment(namespace, name, serving_name) is None:
            return
        if await self._api.delete_serving(namespace, serving_name, uid):
            logger.info("removed the serving Deployment of %s/%s: spec.serving.enabled is false", namespace, name)

    async def _apply_deployment(self, child: dict[str, Any], namespace: str, name: str, uid: str) -> dict[str, Any]:
        deployment_name = child["metadata"]["name"]
        stored = self._watched.deployment(namespace, name, deployment_name) or await self._api.get_deployment(
            namespace, deployment_name
        )
        if stored is not None and not owned_by(stored, uid):
            raise NotOwned("Deployment", namespace, deployment_name)
        if stored is not None and self._api.unchanged(child, stored):
            return stored
        return await self._api.apply(child)

    async def _apply_training_child(self, child: dict[str, Any], target: TrainingTarget) -> dict[str, Any] | None:
        """Apply a child. Pod templates are immutable, so a Job rendered otherwise is handled apart: one whose
        storage settings changed is replaced while unfinished (the new pods resume from its checkpoints; None while
        the old pods go), any other (an older operator, another trainer image) keeps its template and only has
        spec.suspend brought in line."""
        if child["kind"] != "Job":
            await self._api.apply_owned(child)
            return None
        existing_job = self._watched.job(target.namespace, target.name, target.job_name) or await self._api.get_job(
            target.namespace, target.job_name
        )
        if existing_job is None:
            return await self._api.apply(child)
        if not owned_by(existing_job, target.uid):
            raise NotOwned("Job", target.namespace, target.job_name)
        if existing_job["metadata"].get("deletionTimestamp"):
            return None
        if self._api.unchanged(child, existing_job):
            return existing_job
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
        for job in self._watched.jobs(target.namespace, target.name):
            stale = job["metadata"]["labels"].get(naming.REVISION_LABEL) != target.revision
            # Anyone who may label a Job could point it at this FineTuneJob: only its own Jobs are stopped.
            if (
                stale
                and owned_by(job, target.uid)
                and not job["metadata"].get("deletionTimestamp")
                and decisions.finished_condition(job) is None
            ):
                logger.info("stopping Job %s of a superseded revision", job["metadata"]["name"])
                await self._api.delete_job(target.namespace, job["metadata"]["name"])


def _stored_status(body: dict[str, Any], metadata: ObjectMeta) -> FineTuneJobStatus:
    """The stored status as a model; one the model refuses (written by a hostile trainer image) counts as none."""
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValidationError as exc:
        logger.warning("%s/%s: ignoring a status that is not valid: %s", metadata.namespace, metadata.name, exc)
        return FineTuneJobStatus()


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _ready_reason(status: FineTuneJobStatus) -> str | None:
    return next((condition.reason for condition in status.conditions if condition.type == "Ready"), None)


def _event_type(verdict: decisions.Verdict) -> str:
    troubled = verdict.phase == "Failed" or verdict.reason in (*decisions.WAITING_PROBLEMS, decisions.CHILD_CONFLICT)
    return "Warning" if troubled else "Normal"
