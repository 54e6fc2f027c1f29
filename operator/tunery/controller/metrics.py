"""The operator's Prometheus metrics, on a registry of their own, served on /metrics."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tunery.api.status import Phase

PHASES = get_args(Phase)


@dataclass
class _Tracked:
    phase: str
    gpus: int


class _JobsCollector(Collector):
    """Gauges computed at scrape time from the last phase seen for each FineTuneJob."""

    def __init__(self, tracked: dict[tuple[str, str], _Tracked]) -> None:
        self._tracked = tracked

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_phase = GaugeMetricFamily(
            "tunery_finetunejobs", "FineTuneJobs by namespace and phase.", labels=["namespace", "phase"]
        )
        gpus = GaugeMetricFamily(
            "tunery_gpus_requested", "GPUs requested by running training Jobs.", labels=["namespace"]
        )
        counts: dict[tuple[str, str], int] = {}
        running_gpus: dict[str, int] = {}
        for (namespace, _), job in self._tracked.items():
            counts[(namespace, job.phase)] = counts.get((namespace, job.phase), 0) + 1
            if job.phase == "Running":
                running_gpus[namespace] = running_gpus.get(namespace, 0) + job.gpus
        for namespace in sorted({namespace for namespace, _ in counts}):
            for phase in PHASES:
                by_phase.add_metric([namespace, phase], counts.get((namespace, phase), 0))
            gpus.add_metric([namespace], running_gpus.get(namespace, 0))
        yield by_phase
        yield gpus


class OperatorMetrics:
    """Everything the operator measures: reconciliations, transitions, job durations, queue waits, GPUs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self.registry.register(_JobsCollector(self._tracked))
        self.reconcile_duration = Histogram(
            "tunery_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.reconcile_errors = Counter(
            "tunery_reconcile_errors", "Failed reconciliations, by reason.", ["reason"], registry=self.registry
        )
        self.transitions = Counter(
            "tunery_phase_transitions", "FineTuneJob phase changes.", ["from_phase", "to_phase"], registry=self.registry
        )
        self.job_duration = Histogram(
            "tunery_training_duration_seconds",
            "Training Job run time, from start to completion, by outcome.",
            ["outcome"],
            registry=self.registry,
            buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
        )
        self.queue_wait = Histogram(
            "tunery_queue_wait_seconds",
            "Time from a FineTuneJob's creation to its training pods running.",
            registry=self.registry,
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 14400),
        )

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    @contextmanager
    def reconciling(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.reconcile_errors.labels(reason=type(exc).__name__).inc()
            raise
        finally:
            self.reconcile_duration.observe(time.perf_counter() - started)

    def observe_phase(self, namespace: str, name: str, phase: str, previous: str | None, gpus: int) -> None:
        self._tracked[(namespace, name)] = _Tracked(phase, gpus)
        if phase != previous:
            self.transitions.labels(from_phase=previous or "None", to_phase=phase).inc()

    def forget(self, namespace: str, name: str) -> None:
        self._tracked.pop((namespace, name), None)
