"""Kopf handlers: every watch event about a FineTuneJob, its Jobs, Deployments or pods reconciles that FineTuneJob."""

import asyncio
import logging
import secrets
from typing import Any

import kopf
from lightkube import AsyncClient

from tunery.api.resource import GROUP, PLURAL, VERSION
from tunery.controller import decisions
from tunery.controller.kube import KubeApi
from tunery.controller.metrics import OperatorMetrics
from tunery.controller.naming import FIELD_MANAGER, FINETUNEJOB_LABEL, MANAGED_BY
from tunery.controller.reconcile import Reconciler
from tunery.controller.settings import OperatorSettings

# Kopf does not retry event handlers; a failed reconciliation is retried after these delays, the last repeating.
RETRY_SECONDS = (1.0, 5.0, 15.0, 60.0)

logger = logging.getLogger(__name__)


def _post_event(body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(body, type=kind, reason=reason, message=message)


class _ReconcileScheduler:
    """Runs reconciliations; retries failures with backoff, and looks again at jobs whose pods have not started.

    A Job whose pods cannot be created changes nothing that is watched, so a starting job is re-checked
    every `recheck_seconds` until it runs; at most one retry or re-check is pending per FineTuneJob.
    """

    def __init__(self, reconciler: Reconciler, recheck_seconds: float) -> None:
        self._reconciler = reconciler
        self._recheck_seconds = recheck_seconds
        self._pending: dict[tuple[str, str], asyncio.Task] = {}

    async def __call__(self, namespace: str, name: str, attempt: int = 0) -> None:
        try:
            verdict = await self._reconciler.reconcile(namespace, name)
        except Exception:
            delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
            logger.exception("reconciling %s/%s failed; retrying in %.0fs", namespace, name, delay)
            self._later(delay, namespace, name, attempt + 1)
            return
        if verdict is not None and verdict.reason in decisions.STARTING:
            self._later(self._recheck_seconds, namespace, name, 0)

    def forget(self, namespace: str, name: str) -> None:
        self._reconciler.metrics.forget(namespace, name)

    def _later(self, delay: float, namespace: str, name: str, attempt: int) -> None:
        key = (namespace, name)
        if key in self._pending:
            return

        async def run() -> None:
            await asyncio.sleep(delay)
            del self._pending[key]
            await self(namespace, name, attempt)

        self._pending[key] = asyncio.create_task(run())


def build_registry(operator_settings: OperatorSettings) -> kopf.OperatorRegistry:
    """The operator's handlers, registered on a registry of their own (nothing registers at import time)."""
    registry = kopf.OperatorRegistry()
    owned = {"app.kubernetes.io/managed-by": MANAGED_BY, FINETUNEJOB_LABEL: kopf.PRESENT}
    reconcile: dict[str, _ReconcileScheduler] = {}

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
        reconciler = Reconciler(api, operator_settings, _post_event, metrics)
        reconcile["run"] = _ReconcileScheduler(reconciler, operator_settings.pending_recheck_seconds)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_changed(type: str, namespace: str, name: str, **_: Any) -> None:
        if type == "DELETED":
            reconcile["run"].forget(namespace, name)
        else:
            await reconcile["run"](namespace, name)

    @kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry)
    async def job_changed(namespace: str, labels: dict[str, str], **_: Any) -> None:
        await reconcile["run"](namespace, labels[FINETUNEJOB_LABEL])

    @kopf.on.event("apps", "v1", "deployments", labels=owned, registry=registry)
    async def deployment_changed(namespace: str, labels: dict[str, str], **_: Any) -> None:
        await reconcile["run"](namespace, labels[FINETUNEJOB_LABEL])

    @kopf.on.event("", "v1", "pods", labels=owned, registry=registry)
    async def pod_changed(namespace: str, labels: dict[str, str], **_: Any) -> None:
        await reconcile["run"](namespace, labels[FINETUNEJOB_LABEL])

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
