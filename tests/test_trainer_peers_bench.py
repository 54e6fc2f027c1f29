"""benchmarks/trainer_peers.py: its choice of the best peer, its ratios, and its reading of the trainer's /metrics."""

import importlib.util

import pytest
from prometheus_client import generate_latest

from conftest import REPO_ROOT
from tunery_trainer.metrics import TrainerMetrics

BENCHMARKS = REPO_ROOT / "benchmarks"


@pytest.fixture
def peers():
    spec = importlib.util.spec_from_file_location("trainer_peers", BENCHMARKS / "trainer_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def path(tokens_per_s: float, rss: float, loss: float) -> dict[str, float]:
    return {"real_tokens_per_s": tokens_per_s, "peak_rss_mib": rss, "eval_loss": loss}


def test_the_best_peer_is_the_fastest_not_the_leanest(peers) -> None:
    paths = {
        "hf-max-length": path(100, 900, 5.0),
        "hf-flatten": path(400, 1600, 5.5),
        "hf-dynamic": path(300, 1000, 5.4),
        "tunery": path(480, 2000, 5.6),
    }
    summary = peers.scenario_summary(paths)
    assert summary["best_peer"] == "hf-flatten"
    assert summary["ratio_tokens_per_s_vs_best_peer"] == pytest.approx(1.2)
    assert summary["ratio_rss_vs_best_peer"] == pytest.approx(1.25)
    assert summary["eval_loss_tunery_minus_best_peer"] == pytest.approx(0.1)


def test_the_overall_summary_is_tuneries_worst_scenario(peers) -> None:
    results = {
        "full": {"hf-flatten": path(400, 1000, 5), "trl-packing": path(200, 900, 5), "tunery": path(600, 900, 5)},
        "lora": {"hf-flatten": path(300, 1000, 5), "trl-packing": path(330, 800, 5), "tunery": path(363, 900, 5)},
        "classifier": {"hf-dynamic": path(100, 500, 1), "tunery": path(150, 1000, 1)},
    }
    summary = peers.summary(results)
    assert summary["worst_scenario"] == "lora"
    assert summary["best_peer"] == "trl-packing"
    assert summary["ratio_tokens_per_s_vs_best_peer"] == pytest.approx(1.1)
    assert summary["ratio_rss_vs_best_peer"] == pytest.approx(2.0), "the highest memory ratio, from the classifier"
    assert summary["scenarios"]["full"]["best_peer"] == "hf-flatten"


def test_step_time_is_read_from_the_trainers_own_metrics(peers) -> None:
    metrics = TrainerMetrics("local", "bench-full")
    metrics.record_total_steps(3)
    for seconds in (0.5, 0.25, 0.75):
        metrics.record_step(
            step=1, epoch=0.1, loss=1.0, learning_rate=1e-3, grad_norm=None, tokens=10, samples=2, step_seconds=seconds
        )
    assert peers.parse_step_metrics(generate_latest(metrics.registry).decode()) == {
        "sum": 1.5,
        "count": 3.0,
        "total": 3.0,
    }


def test_medians_over_repetitions_and_tokens_per_second_of_loop_time(peers) -> None:
    runs = [
        {"loop_s": 10.0, "real_tokens": 1000, "eval_loss": 5.0, "torch_threads": 2},
        {"loop_s": 20.0, "real_tokens": 1000, "eval_loss": 4.0, "torch_threads": 2},
        {"loop_s": 5.0, "real_tokens": 1000, "eval_loss": 6.0, "torch_threads": 2},
    ]
    merged = peers.with_rates(runs)
    assert merged["loop_s"] == 10.0 and merged["eval_loss"] == 5.0 and merged["repetitions"] == 3
    assert merged["real_tokens_per_s"] == 100.0
