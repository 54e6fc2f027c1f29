"""The training loop: micro-batches, accumulation, precision, clipping, evaluation and checkpoints on schedule."""

import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as torch_distributed

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer import preemption, sharding
from tunery_trainer.batching import Schedule, collator, flattens, step_seed, to_device
from tunery_trainer.checkpoints import Progress
from tunery_trainer.evaluator import evaluate
from tunery_trainer.failures import UnsupportedError
from tunery_trainer.loss import ChunkedLoss, chunks_the_loss
from tunery_trainer.modeling import (
    blocks,
    compile_blocks,
    precision_dtype,
    restore_weights,
    trainable_parameters,
)
from tunery_trainer.preference import PreferenceModel
from tunery_trainer.sequences import Pairs
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

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `values` over the ranks, in one collective (the values themselves with one rank)."""
        if self.world_size > 1:
            torch_distributed.all_reduce(values)
        return values


@dataclass
class Hooks:
    """What the loop tells the outside world: rank 0's metrics, status reports and checkpoint writes."""

    on_start: Callable[[Progress, int], None] = lambda *_: None
    on_step: Callable[[Progress, int, dict[str, float], dict[str, Any]], None] = lambda *_: None
    on_eval: Callable[[Progress, dict[str, float]], None] = lambda *_: None
    save_checkpoint: Callable[[Progress, dict[str, torch.Tensor], dict[str, Any]], None] = lambda *_: None


def build_optimizer(spec: FineTuneJobSpec, parameters: list[torch.nn.Parameter], device: torch.device, sharded: bool):
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
    # The fused kernel updates every tensor in one pass (on a CPU too: 15 ms a step for MiniLM's 22M weights, against
    # 37 ms); FSDP's sharded parameters on a CPU take the per-tensor path.
    fused = device.type == "cuda" or not sharded
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=fused)


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
    preference = spec.objective.type != "sft"
    collate = collator(spec.task, tokenizer, flattens(spec), pairs=preference)
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

    if settings.compile:
        # After sharding: FSDP's hooks around each block stay outside the compiled graph.
        compile_blocks(model)
        logger.info("compiling the model's %d blocks (torch.compile, dynamic shapes)", len(blocks(model)))
    parameters = list(trainable_parameters(model).values())
    optimizer = build_optimizer(spec, parameters, device, sharded)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        SCHEDULER_NAMES[settings.scheduler],
        optimizer,
        num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    if spec.objective.type == "dpo":
        # The base model's log-probabilities, before a checkpoint's weights replace it: a resumed run's are the same.
        started = time.perf_counter()
        reference = PreferenceModel(model, spec.objective)
        data = replace(
            data,
            **{
                split: _with_reference(
                    reference, pairs, collate, settings.batch_size, device, autocast, distributed, sharded
                )
                for split, pairs in (("train", data.train), ("validation", data.validation))
            },
        )
        logger.info(
            "scored %d pairs with the reference model in %.1f s",
            len(data.train) + len(data.validation),
            time.perf_counter() - started,
        )
    if resume is not None:
        weights, training_state = resume
        if sharded:
            sharding.load(model, optimizer, weights, training_state["optimizer"])
        else:
            restore_weights(model, weights)
            optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        scaler.load_state_dict(training_state["scaler"])
    # The module whose forward pass gives the loss: FSDP gathers the head's weights only inside the model's own.
    if preference:
        scored = PreferenceModel(model, spec.objective)
    else:
        scored = model if sharded or not chunks_the_loss(spec, model) else ChunkedLoss(model)
    trained = scored
    if distributed.world_size > 1 and not sharded:
        trained = torch.nn.parallel.DistributedDataParallel(
            scored, device_ids=[device.index] if device.type == "cuda" else None
        )

    def run_evaluation() -> dict[str, float]:
        metrics: dict[str, float] = {}
        # A sharded model's forward pass is a collective, so every rank evaluates; rank 0 reports.
        if (distributed.is_main or sharded) and data.validation:
            raw = evaluate(
                scored,
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

    def collated(step: int) -> list[dict[str, Any]]:
        micro_batches = [
            collate([data.train[index] for index in indices])
            for indices in schedule.micro_batches(step, distributed.rank)
        ]
        # Pinned host memory lets the copy to the GPU run without blocking the step that is computing.
        return [_pinned(batch) for batch in micro_batches] if device.type == "cuda" else micro_batches

    # Masked-LM masking draws from the generator seeded for each step, so its batches are laid out in step order.
    in_background = spec.task != "masked-lm"
    hooks.on_start(progress, total_steps)
    model.train()
    # The next step's micro-batches are laid out in the background while this step computes.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate") as prefetcher:
        upcoming = prefetcher.submit(collated, progress.step) if in_background else None
        for step in range(progress.step, total_steps):
            torch.manual_seed(step_seed(settings.seed, step, distributed.rank))
            started = time.perf_counter()
            micro_batches = upcoming.result() if upcoming is not None else collated(step)
            if in_background and step + 1 < total_steps:
                upcoming = prefetcher.submit(collated, step + 1)
            # Kept on the device: the only host sync of a step reads it with the gradient norm, after the update.
            loss_sum = torch.zeros((), device=device)
            tokens = samples = 0
            for number, batch in enumerate(micro_batches):
                tokens += _real_tokens(batch)
                samples += _examples(batch)
                last = number == len(micro_batches) - 1
                if sharded:
                    model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or trained is scored else trained.no_sync()
                with sync:
                    with autocast():
                        loss = trained(**to_device(batch, device)).loss / len(micro_batches)
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = (
                _local(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
                if settings.max_grad_norm > 0
                else None
            )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # One collective and one host sync per step: the loss and the gradient norm (the same on every rank)
            # summed over the ranks, with how many ranks were asked to stop.
            stopping = torch.tensor(float(preemption.requested()), device=device)
            norm = torch.zeros((), device=device) if grad_norm is None else grad_norm.detach().float()
            summed = distributed.sum(torch.stack([loss_sum.float(), norm, stopping])).tolist()
            step_loss, norm_value = summed[0] / distributed.world_size, summed[1] / distributed.world_size
            progress.step = step + 1
            progress.epoch = progress.step / schedule.steps_per_epoch
            progress.tokens_seen += tokens * distributed.world_size
            progress.train_loss.append((progress.step, step_loss))
            hooks.on_step(
                progress,
                total_steps,
                {"trainLoss": step_loss, "learningRate": scheduler.get_last_lr()[0]},
                {
                    "grad_norm": None if grad_norm is None else norm_value,
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
            if not finished and summed[2] > 0:
                if not saved:
                    save()
                raise preemption.Preempted(progress.step)
    return progress


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _real_tokens(batch: dict[str, Any]) -> int:
    """The tokens of a micro-batch that are not padding (a flattened one has none, and no mask)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())


def _examples(batch: dict[str, Any]) -> int:
    if "pairs" in batch:
        return batch["pairs"]
    if "cu_seq_lens_q" in batch:
        return len(batch["cu_seq_lens_q"]) - 1
    return int(batch["input_ids"].shape[0])


@torch.no_grad()
def _with_reference(
    reference: PreferenceModel,
    pairs: Pairs,
    collate: Callable,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    distributed: Distributed,
    sharded: bool,
) -> Pairs:
    """The pairs with both sequences' log-probabilities under `reference`, in eval mode. Each rank scores its share
    of the batches and one collective gathers them; a sharded model's forward pass is itself a collective, so then
    every rank scores every batch."""
    was_training = reference.training
    reference.eval()
    logps = torch.zeros(len(pairs), 2, device=device)
    starts = range(0, len(pairs), batch_size)
    for start in starts if sharded else starts[distributed.rank :: distributed.world_size]:
        batch = to_device(collate(pairs[start : start + batch_size]), device)
        with autocast():
            chosen, rejected, _, _ = reference.pair_logps(**batch)
        logps[start : start + batch["pairs"]] = torch.stack([chosen, rejected], dim=1).float()
    reference.train(was_training)
    return pairs.with_reference((logps if sharded else distributed.sum(logps)).cpu())


def _local(norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm as a plain tensor (FSDP returns it as a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
