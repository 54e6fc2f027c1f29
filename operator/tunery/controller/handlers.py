"""Kopf handlers: every watch event about a FineTuneJob, its Jobs, Deployments or pods queues that FineTuneJob."""

import logging
import secrets
from typing import Any

import kopf
from lightkube import AsyncClient

from tunery.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION, ObjectMeta
from tunery.controller import decisions
from tunery.controller.kube import KubeApi
from tunery.controller.metrics import OperatorMetrics
from tunery.controller.naming import FIELD_MANAGER, FINETUNEJOB_LABEL, MANAGED_BY
from tunery.controller.reconcile import Reconciler
from tunery.controller.settings import OperatorSettings
from tunery.controller.watched import (
    DEPLOYMENTS_INDEX,
    JOBS_INDEX,
    PODS_INDEX,
    Watched,
    finetunejob_key,
    pod_key,
)
from tunery.controller.workqueue import WorkQueue

# Kopf does not retry event handlers; a failed reconciliation is retried after these delays, the last repeating.
RETRY_SECONDS = (1.0, 5.0, 15.0, 60.0)

logger = logging.getLogger(__name__)


def _post_event(metadata: ObjectMeta, kind: str, reason: str, message: str) -> None:
    involved = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": metadata.name, "namespace": metadata.namespace, "uid": metadata.uid},
    }
    kopf.event(involved, type=kind, reason=reason, message=message)


def build_registry(operator_settings: OperatorSettings) -> kopf.OperatorRegistry:
    """The operator's handlers, registered on a registry of their own (nothing registers at import time).

    Jobs, Deployments and pods are indexed (Kopf fills every index before any handler runs), and every event only
    queues its FineTuneJob: reconciliations read the indexes, never list.
    """
    registry = kopf.OperatorRegistry()
    owned = {"app.kubernetes.io/managed-by": MANAGED_BY, FINETUNEJOB_LABEL: kopf.PRESENT}
    watched = Watched()
    queue: dict[str, WorkQueue] = {}
    reconcilers: dict[str, Reconciler] = {}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod, the ServiceAccount; elsewhere, KUBECONFIG or ~/.kube/config."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.execution.max_workers = operator_settings.workers
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.peering.lifetime = operator_settings.peering_lifetime_seconds
        metrics = OperatorMetrics()
        if operator_settings.metrics_port:
            metrics.serve(operator_settings.metrics_port)
        api = KubeApi(AsyncClient(field_manager=FIELD_MANAGER))
        if operator_settings.peering:
            await api.ensure_peering(operator_settings.peering, operator_settings.namespaces)
        reconciler = Reconciler(api, watched, operator_settings, _post_event, metrics)
        reconcilers["run"] = reconciler

        async def work(key: tuple[str, str]) -> float | None:
            verdict = await reconciler.reconcile(*key)
            # A Job whose pods cannot be created changes nothing that is watched: it is looked at again.
            if verdict is not None and verdict.reason in decisions.STARTING:
                return operator_settings.pending_recheck_seconds
            return None

        queue["run"] = WorkQueue(work, operator_settings.workers, RETRY_SECONDS)

    @kopf.index("batch", "v1", "jobs", labels=owned, id=JOBS_INDEX, registry=registry)
    def tunery_jobs(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {finetunejob_key(namespace, labels): dict(body)}

    @kopf.index("apps", "v1", "deployments", labels=owned, id=DEPLOYMENTS_INDEX, registry=registry)
    def tunery_deployments(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {finetunejob_key(namespace, labels): dict(body)}

    @kopf.index("", "v1", "pods", labels=owned, id=PODS_INDEX, registry=registry)
    def tunery_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
        key = pod_key(namespace, labels)
        return {key: dict(body)} if key else None

    def changed(namespace: str, name: str, indexes: dict[str, Any]) -> None:
        watched.attach({index: indexes[index] for index in (JOBS_INDEX, PODS_INDEX, DEPLOYMENTS_INDEX)})
        queue["run"].add((namespace, name))

    # What of each FineTuneJob the decisions read, as last queued: a change of its status alone (the operator's own
    # patch, the trainer's progress) needs no reconciliation.
    last_queued: dict[tuple[str, str], tuple[Any, ...]] = {}

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_changed(type: str, namespace: str, name: str, meta: kopf.Meta, **kwargs: Any) -> None:
        key = (namespace, name)
        if type == "DELETED":
            last_queued.pop(key, None)
            queue["run"].forget(key)
            reconcilers["run"].metrics.forget(namespace, name)
            return
        seen = (meta.uid, meta.get("generation"), dict(meta.labels), meta.get("deletionTimestamp"))
        if last_queued.get(key) != seen:
            last_queued[key] = seen
            changed(namespace, name, kwargs)

    @kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry)
    async def job_changed(namespace: str, labels: dict[str, str], **kwargs: Any) -> None:
        changed(namespace, labels[FINETUNEJOB_LABEL], kwargs)

    @kopf.on.event("apps", "v1", "deployments", labels=owned, registry=registry)
    async def deployment_changed(namespace: str, labels: dict[str, str], **kwargs: Any) -> None:
        changed(namespace, labels[FINETUNEJOB_LABEL], kwargs)

    @kopf.on.event("", "v1", "pods", labels=owned, registry=registry)
    async def pod_changed(namespace: str, labels: dict[str, str], **kwargs: Any) -> None:
        changed(namespace, labels[FINETUNEJOB_LABEL], kwargs)

    return registry


def run(operator_settings: OperatorSettings) -> None:
    """Run the operator until it is stopped."""
    kopf.configure(log_format=kopf.LogFormat.PLAIN)
    # lightkube's HTTP client logs every request at INFO; the operator's own log says what matters.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{operator_settings.health_port}/healthz" if operator_settings.health_port else None
    priority = operator_settings.peering_priority
    if priority is None:
        # Equal priorities make every Kopf replica freeze; distinct random ones elect the highest.
        priority = secrets.randbelow(2**31)
    kopf.run(
        registry=build_registry(operator_settings),
        clusterwide=not operator_settings.namespaces,
        namespaces=operator_settings.namespaces,
        standalone=not operator_settings.peering,
        peering_name=operator_settings.peering or None,
        priority=priority,
        liveness_endpoint=liveness,
    )
