"""Where rank 0's progress goes: JSON log lines, a terminal progress bar, Prometheus and the FineTuneJob status."""

import json
import logging
import math
import sys
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunery.api.status import CheckpointRecord
from tunery_trainer.checkpoints import Progress as TrainingProgress
from tunery_trainer.metrics import TrainerMetrics
from tunery_trainer.progress import ProgressReporter

logger = logging.getLogger("tunery_trainer")


class Reporter:
    """Fans each step, evaluation and checkpoint out to every sink; none of them can stop training."""

    def __init__(
        self,
        metrics: TrainerMetrics | None,
        status: ProgressReporter | None,
        log_every: int,
        terminal: bool | None = None,
    ) -> None:
        self.metrics = metrics
        self.status = status
        self.log_every = max(1, log_every)
        self.latest: dict[str, float] = {}
        self.checkpoints: list[dict[str, Any]] = []
        show_bar = sys.stderr.isatty() if terminal is None else terminal
        self._bar = (
            Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            if show_bar
            else None
        )
        self._task: Any = None

    def step(self, progress: TrainingProgress, total_steps: int, values: dict[str, float], timing: dict) -> None:
        self.latest |= values
        if self.metrics is not None:
            self.metrics.record_total_steps(total_steps)
            self.metrics.record_step(
                step=progress.step,
                epoch=progress.epoch,
                loss=values["trainLoss"],
                learning_rate=values["learningRate"],
                grad_norm=timing["grad_norm"],
                tokens=timing["tokens"],
                samples=timing["samples"],
                step_seconds=timing["step_seconds"],
            )
            self.metrics.record_gpu_memory()
        seconds = timing["step_seconds"]
        self.latest["tokensPerSecond"] = timing["tokens"] / seconds if seconds > 0 else 0.0
        if timing["grad_norm"] is not None:
            self.latest["gradNorm"] = timing["grad_norm"]
        if progress.step % self.log_every == 0 or progress.step == total_steps:
            logger.info(
                json.dumps(
                    {
                        "event": "step",
                        "step": progress.step,
                        "totalSteps": total_steps,
                        "epoch": round(progress.epoch, 4),
                    }
                    | {key: _rounded(value) for key, value in self.latest.items()}
                )
            )
        self._advance(progress.step, total_steps)
        self._send(progress, total_steps, final=False)

    def evaluated(self, progress: TrainingProgress, values: dict[str, float]) -> None:
        self.latest |= values
        if self.metrics is not None:
            self.metrics.record_eval(values)
        logger.info(json.dumps({"event": "eval", "step": progress.step} | {k: _rounded(v) for k, v in values.items()}))

    def started(self, progress: TrainingProgress, total_steps: int, stored: list[CheckpointRecord]) -> None:
        """Report at once where the run starts: a retried pod restores what the one before it had reported."""
        self._store(stored)
        if progress.eval_history:
            self.latest |= progress.eval_history[-1][1]
        if progress.train_loss:
            self.latest["trainLoss"] = progress.train_loss[-1][1]
        self._send(progress, total_steps, final=False)

    def checkpointed(self, progress: TrainingProgress, seconds: float, stored: list[CheckpointRecord]) -> None:
        """After a save: `stored` holds the complete checkpoints kept, the new one last."""
        self._store(stored)
        uri = stored[-1].uri
        if self.metrics is not None:
            self.metrics.observe_checkpoint(seconds)
        logger.info(
            json.dumps({"event": "checkpoint", "step": progress.step, "uri": uri, "seconds": round(seconds, 2)})
        )

    def finish(self, progress: TrainingProgress, total_steps: int) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._send(progress, total_steps, final=True)

    def _store(self, stored: list[CheckpointRecord]) -> None:
        self.checkpoints = [record.model_dump(by_alias=True, exclude_none=True) for record in stored]

    def _advance(self, step: int, total_steps: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("training", total=total_steps, loss="-")
        loss = self.latest.get("trainLoss", math.nan)
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}")

    def _send(self, progress: TrainingProgress, total_steps: int, final: bool) -> None:
        if self.status is not None:
            self.status.report(
                progress.step, total_steps, progress.epoch, self.latest, final=final, checkpoints=self.checkpoints
            )


def _rounded(value: float) -> float:
    return round(value, 6) if math.isfinite(value) else value
