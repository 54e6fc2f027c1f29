"""The trainer's Prometheus metrics: names and labels the dashboard and alerts depend on, and the /metrics endpoint."""

import math
import socket
import time
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest

from tunery_trainer.metrics import TrainerMetrics, eval_metric_name

JOB = {"namespace": "team-a", "finetunejob": "support-bot"}


def value(metrics: TrainerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**JOB, **labels})


def record_one_step(metrics: TrainerMetrics, **overrides) -> None:
    step = dict(
        step=10,
        epoch=0.5,
        loss=1.25,
        learning_rate=2e-4,
        grad_norm=0.75,
        tokens=4096,
        samples=8,
        step_seconds=2.0,
    )
    metrics.record_step(**(step | overrides))


def test_a_step_sets_the_gauges_counters_and_step_histogram() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    before = time.time()
    record_one_step(metrics)
    metrics.record_total_steps(100)
    assert value(metrics, "tunery_trainer_step") == 10
    assert value(metrics, "tunery_trainer_total_steps") == 100
    assert value(metrics, "tunery_trainer_epoch") == 0.5
    assert value(metrics, "tunery_trainer_loss") == 1.25
    assert value(metrics, "tunery_trainer_learning_rate") == 2e-4
    assert value(metrics, "tunery_trainer_grad_norm") == 0.75
    assert value(metrics, "tunery_trainer_tokens_per_second") == 2048
    assert value(metrics, "tunery_trainer_samples_per_second") == 4
    assert value(metrics, "tunery_trainer_tokens_total") == 4096
    assert value(metrics, "tunery_trainer_samples_total") == 8
    assert value(metrics, "tunery_trainer_step_duration_seconds_count") == 1
    assert value(metrics, "tunery_trainer_step_duration_seconds_sum") == 2.0
    assert before <= value(metrics, "tunery_trainer_last_step_timestamp_seconds") <= time.time()


def test_counters_accumulate_and_a_missing_grad_norm_keeps_the_last_one() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    record_one_step(metrics)
    record_one_step(metrics, step=11, grad_norm=None, tokens=1000, samples=2)
    assert value(metrics, "tunery_trainer_tokens_total") == 5096
    assert value(metrics, "tunery_trainer_samples_total") == 10
    assert value(metrics, "tunery_trainer_grad_norm") == 0.75
    assert value(metrics, "tunery_trainer_step") == 11


def test_a_zero_length_step_has_zero_throughput_and_a_nan_loss_is_exposed() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    record_one_step(metrics, step_seconds=0.0, loss=math.nan)
    assert value(metrics, "tunery_trainer_tokens_per_second") == 0
    assert value(metrics, "tunery_trainer_samples_per_second") == 0
    assert math.isnan(value(metrics, "tunery_trainer_loss"))
    assert 'tunery_trainer_loss{finetunejob="support-bot",namespace="team-a"} NaN' in exposition(metrics)


@pytest.mark.parametrize(
    ("key", "metric"),
    [("evalLoss", "loss"), ("evalAccuracy", "accuracy"), ("evalF1", "f1"), ("evalPerplexity", "perplexity")],
)
def test_eval_metric_names_drop_the_prefix(key: str, metric: str) -> None:
    assert eval_metric_name(key) == metric


def test_evaluations_are_one_gauge_labelled_by_metric() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    metrics.record_eval({"evalLoss": 0.9, "evalPerplexity": 2.46})
    metrics.record_eval({"evalLoss": 0.8})
    assert value(metrics, "tunery_trainer_eval", metric="loss") == 0.8
    assert value(metrics, "tunery_trainer_eval", metric="perplexity") == 2.46


def test_s3_bytes_data_loading_and_checkpoints() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    metrics.add_s3_bytes("download", 1000)
    metrics.add_s3_bytes("upload", 300)
    metrics.add_s3_bytes("upload", 200)
    metrics.observe_data_loading(12.0)
    metrics.observe_checkpoint(4.0)
    assert value(metrics, "tunery_trainer_s3_bytes_total", direction="download") == 1000
    assert value(metrics, "tunery_trainer_s3_bytes_total", direction="upload") == 500
    assert value(metrics, "tunery_trainer_data_loading_seconds_count") == 1
    assert value(metrics, "tunery_trainer_data_loading_seconds_bucket", le="15.0") == 1
    assert value(metrics, "tunery_trainer_checkpoint_seconds_sum") == 4.0


def test_gpu_memory_is_recorded_only_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    metrics.record_gpu_memory()
    assert value(metrics, "tunery_trainer_gpu_memory_bytes", kind="allocated") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * 2**30)
    metrics.record_gpu_memory()
    assert value(metrics, "tunery_trainer_gpu_memory_bytes", kind="allocated") == 3 * 2**30
    assert value(metrics, "tunery_trainer_gpu_memory_bytes", kind="peak") == 5 * 2**30


def test_every_metric_is_on_its_own_registry_with_the_job_labels() -> None:
    first = TrainerMetrics("team-a", "one")
    second = TrainerMetrics("team-b", "two")
    record_one_step(first)
    assert second.registry.get_sample_value("tunery_trainer_step", {"namespace": "team-b", "finetunejob": "two"}) == 0
    families = [family.name for family in first.registry.collect()]
    assert families == [
        "tunery_trainer_step",
        "tunery_trainer_total_steps",
        "tunery_trainer_epoch",
        "tunery_trainer_loss",
        "tunery_trainer_learning_rate",
        "tunery_trainer_grad_norm",
        "tunery_trainer_tokens_per_second",
        "tunery_trainer_samples_per_second",
        "tunery_trainer_last_step_timestamp_seconds",
        "tunery_trainer_eval",
        "tunery_trainer_gpu_memory_bytes",
        "tunery_trainer_tokens",
        "tunery_trainer_samples",
        "tunery_trainer_s3_bytes",
        "tunery_trainer_step_duration_seconds",
        "tunery_trainer_data_loading_seconds",
        "tunery_trainer_checkpoint_seconds",
    ]


def test_serve_answers_on_metrics() -> None:
    metrics = TrainerMetrics("team-a", "support-bot")
    record_one_step(metrics)
    port = free_port()
    metrics.serve(port, address="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert response.status == 200
    assert 'tunery_trainer_step{finetunejob="support-bot",namespace="team-a"} 10.0' in body


def exposition(metrics: TrainerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
