"""One training run, from trainer config to published model: fetch, check, tokenise, train with checkpoints, publish."""

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_distributed

from tunery.api.spec import FineTuneJobSpec
from tunery.api.trainer_config import TrainerConfig
from tunery_trainer import checkpoints, sharding
from tunery_trainer.attention import attention_kernel
from tunery_trainer.batching import flattens
from tunery_trainer.checkpoints import Progress
from tunery_trainer.data import DataError, PreparedData, prepare_mixture
from tunery_trainer.metrics import TrainerMetrics
from tunery_trainer.modeling import load_model, load_tokenizer, restore_weights
from tunery_trainer.progress import ProgressReporter
from tunery_trainer.publishing import publish_model
from tunery_trainer.reporting import Reporter
from tunery_trainer.sequences import Pairs
from tunery_trainer.storage import S3Settings, Storage, download_from_hub, fetch_sources
from tunery_trainer.tokenization import TokenizedData, tokenize
from tunery_trainer.training import Distributed, Hooks, is_sharded, train

logger = logging.getLogger("tunery_trainer")


@dataclass(frozen=True)
class Outcome:
    """What a finished run produced."""

    output_uri: str
    manifest: dict[str, Any]
    progress: Progress


def start_distributed() -> Distributed:
    """Join the torchrun group when there is one (gloo on CPU, NCCL on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_distributed.is_initialized():
        torch_distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=device)


def run(
    config: TrainerConfig,
    workdir: Path,
    metrics: TrainerMetrics | None = None,
    status: ProgressReporter | None = None,
    log_every: int = 10,
) -> Outcome:
    """Train the configured revision, resuming from its latest complete checkpoint, and publish the model."""
    spec = config.spec
    distributed = start_distributed()
    layout = _layout(spec, distributed)
    logger.info(
        "training on %d process(es), %s: objective %s; a step is %d examples; micro-batches %s; attention %s",
        distributed.world_size,
        distributed.device,
        layout["objective"],
        layout["examplesPerStep"],
        layout["layout"],
        layout["attention"],
    )
    storage = Storage(S3Settings.from_spec(spec.storage))
    fetch_started = time.perf_counter()
    prepared = _fetch_and_prepare(config, storage, workdir)
    model_dir, tokenizer_dir = _fetch_model(spec, storage, workdir)
    tokenizer = load_tokenizer(spec, model_dir, tokenizer_dir, lambda: _texts(prepared))
    tokenized = _tokenized(spec, tokenizer, prepared)
    data_stats = _data_stats(prepared, tokenized) | layout
    # Tokenised, the examples are held flat; their spool's disk goes back before the model is loaded.
    prepared.spool.remove()
    if metrics is not None:
        metrics.observe_data_loading(time.perf_counter() - fetch_started)
        metrics.add_s3_bytes("download", storage.bytes_downloaded)
    logger.info(
        "data: %d training and %d validation %s from %d rows (%d duplicates, %d empty, %d bad, %d truncated)",
        len(tokenized.train),
        len(tokenized.validation),
        "preference pairs" if isinstance(tokenized.train, Pairs) else "sequences",
        prepared.report.rows_read,
        prepared.report.duplicates,
        prepared.report.empty_rows,
        sum(prepared.report.bad_rows.values()),
        tokenized.truncated,
    )
    if "mixture" in data_stats:
        logger.info("data mixture: %s", data_stats["mixture"])
    torch.manual_seed(spec.hyperparameters.seed)
    # FSDP moves each block to the GPU as it shards it: a whole copy on every GPU first would defeat sharding.
    sharded = is_sharded(spec, distributed)
    model = load_model(
        spec, model_dir, tokenizer, prepared.label_names, torch.device("cpu") if sharded else distributed.device
    )

    owner = checkpoints.Owner(config.finetune_job.uid, spec.checkpoints.resume_from_uid)
    progress, resume = Progress(config_hash=config.revision), None
    stored = checkpoints.stored(storage, config.checkpoint_uri, config.revision, owner)
    if stored:
        latest = stored[-1].uri
        progress, weights, training_state = checkpoints.load(storage, latest, workdir / f"rank-{distributed.rank}")
        resume = (weights, training_state)
        logger.info("resuming from %s at step %d", latest, progress.step)

    reporter = Reporter(metrics, status, log_every, terminal=None if distributed.is_main else False)

    def start(current: Progress, total_steps: int) -> None:
        reporter.started(current, total_steps, stored)

    def save_checkpoint(current: Progress, trainable: dict[str, torch.Tensor], training_state: dict) -> None:
        started = time.perf_counter()
        uploaded = storage.bytes_uploaded
        kept = checkpoints.save(
            storage, config.checkpoint_uri, workdir, current, trainable, training_state, spec.checkpoints.keep, owner
        )
        reporter.checkpointed(current, time.perf_counter() - started, kept)
        if metrics is not None:
            metrics.add_s3_bytes("upload", storage.bytes_uploaded - uploaded)

    hooks = (
        Hooks(on_start=start, on_step=reporter.step, on_eval=reporter.evaluated, save_checkpoint=save_checkpoint)
        if distributed.is_main
        else Hooks()
    )
    progress = train(spec, model, tokenizer, tokenized, prepared.label_names, distributed, progress, resume, hooks)
    if sharded:
        # Only the shards exist: rank 0 publishes an unsharded copy holding the gathered weights.
        trained_weights = sharding.gather_trainable(model)
        if distributed.is_main:
            model = load_model(spec, model_dir, tokenizer, prepared.label_names, torch.device("cpu"))
            restore_weights(model, trained_weights)
    manifest: dict[str, Any] = {}
    if distributed.is_main:
        uploaded = storage.bytes_uploaded
        manifest = publish_model(
            config,
            storage,
            model,
            tokenizer,
            model_dir,
            progress,
            data_stats,
            prepared.label_names,
            workdir,
        )
        if metrics is not None:
            metrics.add_s3_bytes("upload", storage.bytes_uploaded - uploaded)
        reporter.finish(progress, progress.step)
        logger.info("published the model to %s", config.output_uri)
    distributed.barrier()
    if torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()
    return Outcome(config.output_uri, manifest, progress)


def _fetch_and_prepare(config: TrainerConfig, storage: Storage, workdir: Path) -> PreparedData:
    spec = config.spec
    data_dir = workdir / "data"
    # Every process on a node fetches into its own directory: simple, and the data is small next to the model.
    rank_dir = data_dir / f"rank-{os.environ.get('LOCAL_RANK', '0')}"
    validation_files = (
        storage.fetch(spec.dataset.validation, rank_dir / "validation") if spec.dataset.validation else []
    )
    sources = fetch_sources(storage, spec.dataset, rank_dir)
    return prepare_mixture(
        spec.task,
        spec.dataset,
        sources,
        validation_files,
        spec.hyperparameters.seed,
        spool_directory=rank_dir,
        objective=spec.objective.type,
    )


def _fetch_model(spec: FineTuneJobSpec, storage: Storage, workdir: Path) -> tuple[Path | None, Path | None]:
    """Local directories for the base model and the tokenizer override (None when built from scratch)."""
    rank = os.environ.get("LOCAL_RANK", "0")
    model_dir = _fetch_directory(spec.base_model.uri, storage, workdir / f"base-model-{rank}")
    tokenizer_uri = spec.base_model.tokenizer.uri if spec.base_model.tokenizer else None
    tokenizer_dir = _fetch_directory(tokenizer_uri, storage, workdir / f"tokenizer-{rank}")
    return model_dir, tokenizer_dir


def _fetch_directory(uri: str | None, storage: Storage, target: Path) -> Path | None:
    if uri is None:
        return None
    if uri.startswith("hf://"):
        return download_from_hub(uri)
    storage.fetch(uri if uri.endswith("/") else uri + "/", target)
    return target


def _texts(prepared: PreparedData) -> list[str]:
    """The training text, for training a tokenizer from scratch."""
    texts = []
    for example in prepared.train:
        if "text" in example:
            texts.append(example["text"])
        elif "prompt" in example:
            texts += [example["prompt"], example["completion"]]
        elif "messages" in example:
            texts += [turn["content"] for turn in example["messages"]]
        else:
            texts.append(" ".join(example["tokens"]))
    return texts


def _tokenized(spec: FineTuneJobSpec, tokenizer: Any, prepared: PreparedData) -> TokenizedData:
    dataset = spec.dataset
    tokenized = tokenize(
        spec.task,
        tokenizer,
        prepared.train,
        prepared.validation,
        dataset.max_length,
        prepared.label_names,
        processes=tokenizing_processes(),
    )
    if not tokenized.train:
        raise DataError(
            f"{dataset.train or 'dataset.mixture'}: no training sequence is left after tokenisation with maxLength {dataset.max_length} "
            "(every completion was truncated away): raise dataset.maxLength or shorten the prompts"
        )
    return tokenized


def _layout(spec: FineTuneJobSpec, distributed: Distributed) -> dict[str, Any]:
    """What one optimiser step is and how its examples are laid out: the first log line and the model card say it."""
    settings = spec.hyperparameters
    return {
        "objective": spec.objective.type
        if spec.objective.type == "sft"
        else f"{spec.objective.type} (beta {spec.objective.effective_beta:g}; a step's examples are preference pairs)",
        "examplesPerStep": settings.batch_size * settings.gradient_accumulation_steps * distributed.world_size,
        "layout": "flattened into one row, no padding" if flattens(spec) else "padded to their longest example",
        "attention": attention_kernel(spec, distributed.device),
    }


def tokenizing_processes() -> int:
    """This rank's share of the CPUs it may use (affinity, and the container's CPU limit), among its node's ranks."""
    cpus = len(os.sched_getaffinity(0))
    limit = Path("/sys/fs/cgroup/cpu.max")
    if limit.is_file():
        quota, period = (limit.read_text().split() + ["100000"])[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _data_stats(prepared: PreparedData, tokenized: TokenizedData) -> dict[str, Any]:
    report = prepared.report
    return {
        "rowsRead": report.rows_read,
        "trainExamples": len(prepared.train),
        "validationExamples": len(prepared.validation),
        **(
            {"trainPairs": len(tokenized.train), "trainSequences": len(tokenized.train.sequences)}
            if isinstance(tokenized.train, Pairs)
            else {"trainSequences": len(tokenized.train)}
        ),
        "trainTokens": tokenized.train.tokens,
        "duplicatesDropped": report.duplicates,
        "emptyRowsDropped": report.empty_rows,
        "badRows": sum(report.bad_rows.values()),
        "truncated": tokenized.truncated,
        "labels": len(prepared.label_names),
        **({"mixture": _mixture(report.sources)} if len(report.sources) > 1 else {}),
    }


def _mixture(sources: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{source['uri']}: {source['drawn']} drawn of {source['examples']} ({source['rowsRead']} rows read)"
        for source in sources
    )
