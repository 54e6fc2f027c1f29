"""The chart's Argo CD health check, run by real Lua 5.4 on hand-written FineTuneJob statuses."""

import re

import pytest
from health import ARGOCD_HEALTH_LUA, argocd_health

from conftest import REPO_ROOT


def job(phase: str | None = None, generation: int = 1, observed: int | None = 1, **conditions: tuple) -> dict:
    """A FineTuneJob whose status has `phase` and conditions given as Type=(status, message)."""
    status: dict = {
        "conditions": [
            {"type": kind, "status": state, "reason": "Test", "message": message}
            for kind, (state, message) in conditions.items()
        ]
    }
    if phase is not None:
        status["phase"] = phase
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "tunery.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "chat", "namespace": "team-a", "generation": generation},
        "status": status,
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            job("Succeeded", Ready=("True", "training finished"), Stalled=("False", "")),
            ("Healthy", "training finished"),
        ),
        (
            job("Running", Ready=("False", "training is running"), Reconciling=("True", "training is running")),
            ("Progressing", "training is running"),
        ),
        (
            job("Succeeded", Ready=("False", "waiting for the endpoint"), Reconciling=("True", "")),
            ("Progressing", "waiting for the endpoint"),
        ),
        (
            job("Failed", Ready=("False", "OOMKilled: raise spec.resources.memory"), Stalled=("True", "OOMKilled")),
            ("Degraded", "OOMKilled: raise spec.resources.memory"),
        ),
        # The serving endpoint failed after training succeeded: Stalled alone says so.
        (
            job("Succeeded", Ready=("False", ""), Stalled=("True", "the endpoint never became ready")),
            ("Degraded", "the endpoint never became ready"),
        ),
        # A failed phase without conditions yet (an older operator or a hand-made status) is still Degraded.
        (job("Failed"), ("Degraded", "the FineTuneJob failed")),
        # Stalled wins over Ready, as in kstatus, so Argo CD and Flux agree.
        (job("Succeeded", Ready=("True", "ok"), Stalled=("True", "child conflict")), ("Degraded", "ok")),
        (
            job("Suspended", Ready=("False", "spec.suspend is true"), Reconciling=("True", "")),
            ("Suspended", "spec.suspend is true"),
        ),
        (job("Queued", Ready=("False", "waiting for the queue")), ("Suspended", "waiting for the queue")),
        (job("Pending", Ready=("False", "creating the training Job")), ("Progressing", "creating the training Job")),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else None,
)
def test_conditions_map_to_argocd_health(obj: dict, expected: tuple[str, str]) -> None:
    assert argocd_health(obj) == expected


def test_no_status_yet_is_progressing() -> None:
    obj = job()
    del obj["status"]
    assert argocd_health(obj) == ("Progressing", "waiting for the operator")


def test_conditions_of_an_older_generation_are_not_trusted() -> None:
    stale = job("Succeeded", generation=3, observed=2, Ready=("True", "training finished"))
    assert argocd_health(stale) == ("Progressing", "waiting for the operator to observe generation 3")


def test_the_docs_show_the_script_the_chart_ships() -> None:
    docs = (REPO_ROOT / "docs" / "operator.md").read_text()
    blocks = re.findall(r"```lua\n(.*?)```", docs, re.S)
    assert blocks == [ARGOCD_HEALTH_LUA.read_text()]
