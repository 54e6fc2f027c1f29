"""The operator's metrics: per-phase job counts and GPUs of running jobs are computed at scrape time."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tunery.controller.metrics import OperatorMetrics


def samples(metrics: OperatorMetrics) -> dict:
    exposition = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def test_phases_gpus_and_transitions() -> None:
    metrics = OperatorMetrics()
    metrics.observe_phase("team-a", "one", "Pending", None, gpus=8)
    metrics.observe_phase("team-a", "one", "Running", "Pending", gpus=8)
    metrics.observe_phase("team-a", "two", "Suspended", None, gpus=4)
    values = samples(metrics)
    assert values[("tunery_finetunejobs", (("namespace", "team-a"), ("phase", "Running")))] == 1
    assert values[("tunery_finetunejobs", (("namespace", "team-a"), ("phase", "Pending")))] == 0
    assert values[("tunery_gpus_requested", (("namespace", "team-a"),))] == 8
    assert values[("tunery_phase_transitions_total", (("from_phase", "Pending"), ("to_phase", "Running")))] == 1
    metrics.forget("team-a", "one")
    assert samples(metrics)[("tunery_gpus_requested", (("namespace", "team-a"),))] == 0


def test_failed_reconciliations_are_counted_by_reason() -> None:
    metrics = OperatorMetrics()
    try:
        with metrics.reconciling():
            raise TimeoutError
    except TimeoutError:
        pass
    assert samples(metrics)[("tunery_reconcile_errors_total", (("reason", "TimeoutError"),))] == 1
    assert samples(metrics)[("tunery_reconcile_duration_seconds_count", ())] == 1
