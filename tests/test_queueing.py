"""Kueue's reason for holding a Job, read from Workload conditions as Kueue v0.17 wrote them (hack/localenv/kueue.py)."""

import pytest

from tunery.controller.queueing import queue_reason


def workload(*conditions: tuple[str, str, str, str], active: bool = True) -> dict:
    """A v1beta2 Workload with these (type, status, reason, message) conditions."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": "job-ft-1234abcd-dda4d", "labels": {"kueue.x-k8s.io/job-uid": "8291cedd"}},
        "spec": {"active": active, "queueName": "training"},
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "message": message}
                for kind, status, reason, message in conditions
            ]
        },
    }


NO_QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor kwok-gpu, "
    "4 more needed"
)


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        # A full ClusterQueue.
        (workload(("QuotaReserved", "False", "Pending", NO_QUOTA)), ("Pending", NO_QUOTA)),
        # A queue label naming no LocalQueue.
        (
            workload(("QuotaReserved", "False", "Inadmissible", "LocalQueue nope doesn't exist")),
            ("Inadmissible", "LocalQueue nope doesn't exist"),
        ),
        # Deactivated while running: the eviction says why, not the (generic) missing quota.
        (
            workload(
                ("QuotaReserved", "False", "Pending", "The workload is deactivated"),
                ("Evicted", "True", "Deactivated", "The workload is deactivated"),
                ("Admitted", "False", "NoReservation", "The workload has no reservation"),
                ("Requeued", "False", "Deactivated", "The workload is deactivated"),
                active=False,
            ),
            ("Deactivated", "The workload is deactivated"),
        ),
    ],
)
def test_a_held_workload_gives_kueues_reason_and_message(observed: dict, expected: tuple[str, str]) -> None:
    assert queue_reason(observed) == expected


@pytest.mark.parametrize(
    "observed",
    [
        # Just created: Kueue has not looked at it yet.
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": {"name": "w"}, "spec": {}},
        workload(
            ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue tunery-gpus"),
            ("Admitted", "True", "Admitted", "The workload is admitted"),
        ),
        # Reactivated and admitted again: the eviction is history.
        workload(
            ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue tunery-gpus"),
            ("Evicted", "False", "QuotaReserved", "Previously: The workload is deactivated"),
            ("Admitted", "True", "Admitted", "The workload is admitted"),
            ("Requeued", "True", "Reactivated", "The workload was reactivated"),
        ),
        workload(
            ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue tunery-gpus"),
            ("Admitted", "True", "Admitted", "The workload is admitted"),
            ("Finished", "True", "Succeeded", "Reached expected number of succeeded pods"),
        ),
    ],
    ids=["unseen", "admitted", "readmitted", "finished"],
)
def test_a_workload_kueue_does_not_hold_gives_no_reason(observed: dict) -> None:
    assert queue_reason(observed) is None


def test_a_reason_that_is_not_a_condition_reason_is_not_passed_on() -> None:
    held = workload(("QuotaReserved", "False", "not a reason!", "x" * 10_000))
    reason, message = queue_reason(held)
    assert reason == "Queued" and len(message) == 4096
