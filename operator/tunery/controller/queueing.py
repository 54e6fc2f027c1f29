"""Why Kueue holds a queued Job: read from the conditions of the Workload Kueue made for it."""

from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource

from tunery.controller.kube import owned_by

# Kueue v0.17 stores Workloads as v1beta2; it names them itself and labels them with their Job's UID.
Workload = create_namespaced_resource("kueue.x-k8s.io", "v1beta2", "Workload", "workloads")
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


def queue_reason(workload: dict[str, Any]) -> tuple[str, str] | None:
    """Kueue's (reason, message) for holding the Workload's Job; None once it has quota, or before Kueue looked."""
    conditions = {condition["type"]: condition for condition in (workload.get("status") or {}).get("conditions", [])}

    def holds(kind: str, status: str) -> dict[str, Any] | None:
        condition = conditions.get(kind)
        return condition if condition and condition["status"] == status else None

    # An evicted Workload (deactivated, preempted) says why it was stopped until it is admitted again.
    held = holds("Evicted", "True") or holds("QuotaReserved", "False")
    return (held["reason"], held["message"]) if held else None


async def read_workload(client: AsyncClient, namespace: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """The Workload of this Job (owned by it, labelled with its UID); None without one, or without Kueue's API."""
    uid = job["metadata"]["uid"]
    try:
        listed = [
            item.to_dict() async for item in client.list(Workload, namespace=namespace, labels={JOB_UID_LABEL: uid})
        ]
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    owned = [workload for workload in listed if owned_by(workload, uid)]
    return max(owned, key=lambda workload: workload["metadata"]["creationTimestamp"], default=None)
