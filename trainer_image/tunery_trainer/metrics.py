"""The trainer's Prometheus metrics (rank 0 only), on a registry of their own, served on /metrics."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

JOB_LABELS = ("namespace", "finetunejob")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DATA_LOADING_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
CHECKPOINT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainerMetrics:
    """Everything the trainer measures, on a registry of its own, labelled with the FineTuneJob."""

    def __init__(self, namespace: str, finetunejob: str) -> None:
        self.registry = CollectorRegistry()
        self._job = {"namespace": namespace, "finetunejob": finetunejob}
        self._step = self._gauge("tunery_trainer_step", "Optimizer steps completed.")
        self._total_steps = self._gauge("tunery_trainer_total_steps", "Optimizer steps the run will take.")
        self._epoch = self._gauge("tunery_trainer_epoch", "Passes over the training data so far (fractional).")
        self._loss = self._gauge("tunery_trainer_loss", "Training loss of the last step.")
        self._learning_rate = self._gauge("tunery_trainer_learning_rate", "Learning rate of the last step.")
        self._grad_norm = self._gauge("tunery_trainer_grad_norm", "Gradient norm before clipping, last step.")
        self._tokens_per_second = self._gauge("tunery_trainer_tokens_per_second", "Tokens per second, last step.")
        self._samples_per_second = self._gauge("tunery_trainer_samples_per_second", "Samples per second, last step.")
        self._last_step_timestamp = self._gauge(
            "tunery_trainer_last_step_timestamp_seconds", "Unix time of the last completed step."
        )
        self._eval = Gauge(
            "tunery_trainer_eval", "Latest evaluation metrics.", [*JOB_LABELS, "metric"], registry=self.registry
        )
        self._gpu_memory = Gauge(
            "tunery_trainer_gpu_memory_bytes",
            "GPU memory held by tensors: allocated now, and the peak.",
            [*JOB_LABELS, "kind"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "tunery_trainer_tokens", "Tokens trained on.", JOB_LABELS, registry=self.registry
        ).labels(**self._job)
        self._samples = Counter(
            "tunery_trainer_samples", "Samples trained on.", JOB_LABELS, registry=self.registry
        ).labels(**self._job)
        self._s3_bytes = Counter(
            "tunery_trainer_s3_bytes",
            "Bytes moved to and from S3, by direction.",
            [*JOB_LABELS, "direction"],
            registry=self.registry,
        )
        self._step_duration = self._histogram(
            "tunery_trainer_step_duration_seconds", "Time per optimizer step.", STEP_BUCKETS
        )
        self._data_loading = self._histogram(
            "tunery_trainer_data_loading_seconds", "Time to fetch and prepare the data.", DATA_LOADING_BUCKETS
        )
        self._checkpoint = self._histogram(
            "tunery_trainer_checkpoint_seconds", "Time to save and upload a checkpoint.", CHECKPOINT_BUCKETS
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def record_step(
        self,
        *,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        step_seconds: float,
    ) -> None:
        self._step.set(step)
        self._epoch.set(epoch)
        # A non-finite loss is set as is: NaN on the dashboard is the signal that training diverged.
        self._loss.set(loss)
        self._learning_rate.set(learning_rate)
        if grad_norm is not None:
            self._grad_norm.set(grad_norm)
        self._tokens.inc(tokens)
        self._samples.inc(samples)
        self._tokens_per_second.set(_rate(tokens, step_seconds))
        self._samples_per_second.set(_rate(samples, step_seconds))
        self._step_duration.observe(step_seconds)
        self._last_step_timestamp.set(time.time())

    def record_eval(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._eval.labels(**self._job, metric=eval_metric_name(key)).set(value)

    def record_total_steps(self, total_steps: int) -> None:
        self._total_steps.set(total_steps)

    def observe_data_loading(self, seconds: float) -> None:
        self._data_loading.observe(seconds)

    def observe_checkpoint(self, seconds: float) -> None:
        self._checkpoint.observe(seconds)

    def add_s3_bytes(self, direction: str, count: int) -> None:
        self._s3_bytes.labels(**self._job, direction=direction).inc(count)

    def record_gpu_memory(self) -> None:
        # Imported here: the metrics themselves need no torch, and importing it is slow.
        import torch

        if not torch.cuda.is_available():
            return
        self._gpu_memory.labels(**self._job, kind="allocated").set(torch.cuda.memory_allocated())
        self._gpu_memory.labels(**self._job, kind="peak").set(torch.cuda.max_memory_allocated())

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, JOB_LABELS, registry=self.registry).labels(**self._job)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, documentation, JOB_LABELS, registry=self.registry, buckets=buckets).labels(**self._job)


def eval_metric_name(key: str) -> str:
    """The `metric` label for an evaluation key: evalLoss -> loss, evalF1 -> f1."""
    name = key.removeprefix("eval") or key
    return name[0].lower() + name[1:]


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
