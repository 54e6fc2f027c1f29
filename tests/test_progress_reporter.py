"""The trainer's progress reports: what they contain, how often they go out, and that failures never stop training."""

import urllib.error

from tunery_trainer.progress import FIELD_MANAGER, ProgressReporter, StatusEndpoint

ENDPOINT = StatusEndpoint("https://127.0.0.1:6443", "token", None, "team-a", "chat")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_report_is_an_apply_of_progress_and_metrics() -> None:
    sent = []
    clock = FakeClock()
    reporter = ProgressReporter(ENDPOINT, send=lambda endpoint, body: sent.append(body), clock=clock)
    reporter.report(0, 1000, 0.0, {"trainLoss": 2.5})
    clock.now += 100
    assert reporter.report(250, 1000, 0.75, {"trainLoss": 1.5, "learningRate": 2e-4}, final=True)
    body = sent[-1]
    assert body["metadata"] == {"name": "chat", "namespace": "team-a"} and body["kind"] == "FineTuneJob"
    assert body["status"]["progress"] == {
        "step": 250,
        "totalSteps": 1000,
        "epoch": 0.75,
        "percent": 25,
        "etaSeconds": 300,
    }
    assert body["status"]["metrics"] == {"trainLoss": 1.5, "learningRate": 2e-4}
    assert f"fieldManager={FIELD_MANAGER}" in ENDPOINT.status_url and ENDPOINT.status_url.split("?")[0].endswith(
        "/finetunejobs/chat/status"
    )


def test_rate_limited_except_the_final_report() -> None:
    sent = []
    clock = FakeClock()
    reporter = ProgressReporter(ENDPOINT, min_interval_s=15, send=lambda endpoint, body: sent.append(body), clock=clock)
    assert reporter.report(1, 100, 0.01, {})
    clock.now += 5
    assert not reporter.report(2, 100, 0.02, {})
    clock.now += 11
    assert reporter.report(3, 100, 0.03, {})
    clock.now += 1
    assert reporter.report(100, 100, 1.0, {}, final=True)
    assert [body["status"]["progress"]["step"] for body in sent] == [1, 3, 100]


def test_non_finite_metrics_are_left_out() -> None:
    sent = []
    ProgressReporter(ENDPOINT, send=lambda endpoint, body: sent.append(body)).report(
        1, 10, 0.1, {"trainLoss": float("nan"), "gradNorm": 1.0}
    )
    assert sent[0]["status"]["metrics"] == {"gradNorm": 1.0}


def test_a_failed_report_does_not_raise_and_is_retried_next_time() -> None:
    attempts = []

    def flaky(endpoint, body):
        attempts.append(body)
        if len(attempts) == 1:
            raise urllib.error.URLError("connection refused")

    reporter = ProgressReporter(ENDPOINT, send=flaky, clock=FakeClock())
    assert reporter.report(1, 10, 0.1, {}) is False
    assert reporter.report(2, 10, 0.2, {}) is True
    assert [body["status"]["progress"]["step"] for body in attempts] == [1, 2]
