"""Why Kueue holds a queued Job: read from the conditions of the Workload Kueue made for it."""

import re
from typing import Any

# What a condition's reason may be (metav1.Condition); a Workload's reason that is not one is not passed on.
_REASON = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")
_MAX_MESSAGE = 4096


def queue_reason(workload: dict[str, Any]) -> tuple[str, str] | None:
    """Kueue's (reason, message) for holding the Workload's Job; None once it has quota, or before Kueue looked."""
    conditions = {condition["type"]: condition for condition in (workload.get("status") or {}).get("conditions", [])}

    def holds(kind: str, status: str) -> dict[str, Any] | None:
        condition = conditions.get(kind)
        return condition if condition and condition["status"] == status else None

    # An evicted Workload (deactivated, preempted) says why it was stopped until it is admitted again.
    held = holds("Evicted", "True") or holds("QuotaReserved", "False")
    if not held:
        return None
    reason = str(held.get("reason") or "")
    message = str(held.get("message") or "")[:_MAX_MESSAGE]
    return (reason if _REASON.fullmatch(reason) and len(reason) <= 256 else "Queued"), message
