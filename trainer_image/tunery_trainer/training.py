"""The training loop: micro-batches, accumulation, precision, clipping, evaluation and checkpoints on schedule."""

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_distributed

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer import preemption, sharding
from tunery_trainer.batching import Schedule, collator, step_seed
from tunery_trainer.checkpoints import Progress
from tunery_trainer.evaluator import evaluate
from tunery_trainer.failures import UnsupportedError
from tunery_trainer.modeling import restore_weights, trainable_parameters
from tunery_trainer.tokenization import TokenizedData

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant-with-warmup": "constant_with_warmup",
    "polynomial": "polynomial",
}


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (one process when torchrun is not used)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_distributed.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_distributed.all_reduce(tensor)
        return float(tensor) / self.world_size

    def any_rank(self, flag: bool) -> bool:
        """Whether any rank's flag is set: every rank takes the same branch, so collectives stay matched."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        torch_distributed.all_reduce(tensor, op=torch_distributed.ReduceOp.MAX)
        return bool(tensor)


@dataclass
class Hooks:
    """What the loop tells the outside world: rank 0's metrics, status reports and checkpoint writes."""

    on_start: Callable[[Progress, int], None] = lambda *_: None
    on_step: Callable[[Progress, int, dict[str, float], dict[str, Any]], None] = lambda *_: None
    on_eval: Callable[[Progress, dict[str, float]], None] = lambda *_: None
    save_checkpoint: Callable[[Progress, dict[str, torch.Tensor], dict[str, Any]], None] = lambda *_: None


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and precision == "fp16":
        raise UnsupportedError("hyperparameters.precision fp16 needs a GPU: use bf16, fp32 or auto on CPU")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def build_optimizer(spec: FineTuneJobSpec, parameters: list[torch.nn.Parameter], device: torch.device):
    settings = spec.hyperparameters
    if settings.optimizer == "adamw-8bit":
        if device.type != "cuda":
            raise UnsupportedError("hyperparameters.optimizer adamw-8bit needs a GPU (bitsandbytes): use adamw")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            scale_parameter=False,
            relative_step=False,
        )
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.learning_rate, momentum=0.9, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=device.type == "cuda"
    )


def is_sharded(spec: FineTuneJobSpec, distributed: Distributed) -> bool:
    """Whether this run shards the model with FSDP (resources.strategy fsdp and more than one process)."""
    return spec.resources.strategy == "fsdp" and distributed.world_size > 1


def train(
    spec: FineTuneJobSpec,
    model: Any,
    tokenizer: Any,
    data: TokenizedData,
    label_names: list[str],
    distributed: Distributed,
    progress: Progress,
    resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    hooks: Hooks,
) -> Progress:
    """Train from `progress.step` (0, or a checkpoint's step) to the last step; return the final progress."""
    settings = spec.hyperparameters
    device = distributed.device
    schedule = Schedule(
        len(data.train),
        settings.batch_size,
        settings.gradient_accumulation_steps,
        distributed.world_size,
        settings.seed,
    )
    total_steps = schedule.total_steps(settings.epochs, settings.max_steps)
    collate = collator(spec.task, tokenizer, model.config._attn_implementation or "sdpa")
    autocast_dtype = precision_dtype(settings.precision, device)
    sharded = is_sharded(spec, distributed)
    if sharded and autocast_dtype == torch.float16:
        raise UnsupportedError(
            "resources.strategy fsdp trains in bf16 or fp32, and these GPUs have no bf16: "
            "set hyperparameters.precision fp32, or use strategy ddp"
        )
    if sharded:
        sharding.shard(model)
        logger.info("sharded the model across %d processes (FSDP)", distributed.world_size)

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    parameters = list(trainable_parameters(model).values())
    optimizer = build_optimizer(spec, parameters, device)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        SCHEDULER_NAMES[settings.scheduler],
        optimizer,
        num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    if resume is not None:
        weights, training_state = resume
        if sharded:
            sharding.load(model, optimizer, weights, training_state["optimizer"])
        else:
            restore_weights(model, weights)
            optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        scaler.load_state_dict(training_state["scaler"])
    trained = model
    if distributed.world_size > 1 and not sharded:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def run_evaluation() -> dict[str, float]:
        metrics: dict[str, float] = {}
        # A sharded model's forward pass is a collective, so every rank evaluates; rank 0 reports.
        if (distributed.is_main or sharded) and data.validation:
            raw = evaluate(
                model,
                spec.task,
                data.validation,
                collate,
                settings.batch_size,
                device,
                label_names,
                autocast,
                spec.evaluation.metrics,
            )
            metrics = {f"eval{name[0].upper()}{name[1:]}": value for name, value in raw.items()}
        if metrics and distributed.is_main:
            progress.eval_history.append((progress.step, metrics))
            hooks.on_eval(progress, metrics)
        distributed.barrier()
        return metrics

    def save() -> None:
        weights = sharding.gather_trainable(model) if sharded else trainable_parameters(model)
        training_state = {
            "optimizer": sharding.gather_optimizer_state(model, optimizer) if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }
        if distributed.is_main:
            hooks.save_checkpoint(progress, weights, training_state)
        distributed.barrier()

    hooks.on_start(progress, total_steps)
    model.train()
    for step in range(progress.step, total_steps):
        torch.manual_seed(step_seed(settings.seed, step, distributed.rank))
        started = time.perf_counter()
        micro_batches = schedule.micro_batches(step, distributed.rank)
        loss_sum, tokens, samples = 0.0, 0, 0
        for number, indices in enumerate(micro_batches):
            sequences = [data.train[index] for index in indices]
            batch = {key: value.to(device) for key, value in collate(sequences).items()}
            tokens += sum(len(sequence["input_ids"]) for sequence in sequences)
            samples += sum(len(set(sequence.get("document_ids", [0]))) for sequence in sequences)
            last = number == len(micro_batches) - 1
            if sharded:
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or trained is model else trained.no_sync()
            with sync:
                with autocast():
                    loss = trained(**batch).loss / len(micro_batches)
                scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        scaler.unscale_(optimizer)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
            if settings.max_grad_norm > 0
            else None
        )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_loss = distributed.mean(loss_sum)
        progress.step = step + 1
        progress.epoch = progress.step / schedule.steps_per_epoch
        progress.tokens_seen += tokens * distributed.world_size
        progress.train_loss.append((progress.step, step_loss))
        hooks.on_step(
            progress,
            total_steps,
            {"trainLoss": step_loss, "learningRate": scheduler.get_last_lr()[0]},
            {
                "grad_norm": grad_norm,
                "tokens": tokens * distributed.world_size,
                "samples": samples * distributed.world_size,
                "step_seconds": time.perf_counter() - started,
            },
        )
        end_of_epoch = progress.step % schedule.steps_per_epoch == 0
        finished = progress.step == total_steps
        every_eval, every_checkpoint = spec.evaluation.every_steps, spec.checkpoints.every_steps
        if finished or (progress.step % every_eval == 0 if every_eval else end_of_epoch):
            run_evaluation()
        saved = finished or (progress.step % every_checkpoint == 0 if every_checkpoint else end_of_epoch)
        if saved:
            save()
        if not finished and distributed.any_rank(preemption.requested()):
            if not saved:
                save()
            raise preemption.Preempted(progress.step)
    return progress
