"""Checkpoints that describe themselves: trained weights, optimiser, scheduler and position, published atomically."""

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunery_trainer.storage import Storage

logger = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
STATE = "state.json"
TRAINING_STATE = "optimizer.pt"


@dataclass
class Progress:
    """What a resumed run needs besides tensors; the data position follows from the step (see batching.Schedule)."""

    step: int = 0
    epoch: float = 0.0
    config_hash: str = ""
    tokens_seen: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}/"


def save(
    storage: Storage,
    checkpoint_uri: str,
    workdir: Path,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    keep: int,
) -> str:
    """Publish one checkpoint (manifest last), then drop all but the `keep` newest complete ones."""
    local = workdir / "checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in trainable.items()}, local / WEIGHTS)
    torch.save(training_state, local / TRAINING_STATE)
    (local / STATE).write_text(json.dumps(asdict(progress)))
    uri = checkpoint_uri + checkpoint_name(progress.step)
    storage.publish(local, uri, {"step": progress.step, "configHash": progress.config_hash})
    shutil.rmtree(local)
    complete = _complete(storage, checkpoint_uri, progress.config_hash)
    for stale in complete[keep:]:
        storage.delete(stale)
    return uri


def latest(storage: Storage, checkpoint_uri: str, config_hash: str) -> str | None:
    """The newest checkpoint whose manifest exists and whose config matches; half-written ones have no manifest."""
    complete = _complete(storage, checkpoint_uri, config_hash)
    return complete[0] if complete else None


def _complete(storage: Storage, checkpoint_uri: str, config_hash: str) -> list[str]:
    found = []
    for uri in reversed(storage.children(checkpoint_uri)):
        manifest = storage.read_manifest(uri)
        if manifest is None:
            logger.info("ignoring %s: no manifest, it was being written when the trainer stopped", uri)
        elif manifest.get("configHash") != config_hash:
            logger.info("ignoring %s: written for another configuration", uri)
        else:
            found.append(uri)
    return found


def load(storage: Storage, uri: str, workdir: Path) -> tuple[Progress, dict[str, torch.Tensor], dict[str, Any]]:
    """Fetch a checkpoint: its progress, trained weights and optimiser/scheduler state."""
    local = workdir / "resume"
    shutil.rmtree(local, ignore_errors=True)
    storage.fetch_published(uri, local)
    raw = json.loads((local / STATE).read_text())
    progress = Progress(
        step=raw["step"],
        epoch=raw["epoch"],
        config_hash=raw["config_hash"],
        tokens_seen=raw["tokens_seen"],
        train_loss=[(step, loss) for step, loss in raw["train_loss"]],
        eval_history=[(step, metrics) for step, metrics in raw["eval_history"]],
    )
    weights = load_file(local / WEIGHTS)
    training_state = torch.load(local / TRAINING_STATE, weights_only=False)
    shutil.rmtree(local)
    return progress, weights, training_state
