"""Checkpoints that describe themselves: trained weights, optimiser, scheduler and position, published atomically."""

import json
import logging
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunery.api.status import CheckpointRecord
from tunery_trainer import disk
from tunery_trainer.storage import Storage, StorageError

logger = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
STATE = "state.json"
TRAINING_STATE = "optimizer.pt"
UID_KEY = "finetuneJobUid"
EVAL_LOSS_KEY = "evalLoss"


@dataclass
class Progress:
    """What a resumed run needs besides tensors; the data position follows from the step (see batching.Schedule)."""

    step: int = 0
    epoch: float = 0.0
    config_hash: str = ""
    tokens_seen: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Owner:
    """Whose checkpoints a run resumes: its FineTuneJob's (by UID), and those of the one it was told to adopt."""

    uid: str
    adopt_uid: str | None = None

    def refusal(self, manifest: dict[str, Any]) -> str | None:
        """Why a checkpoint with this manifest is not this run's to resume, or None when it is."""
        written_by = manifest.get(UID_KEY)
        if not written_by:
            return "it records no FineTuneJob UID (pre-staged, or written by an older trainer)"
        if written_by not in (self.uid, self.adopt_uid):
            return (
                f"written by FineTuneJob UID {written_by}, not this one; set spec.checkpoints.resumeFromUid to adopt it"
            )
        return None


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
    owner: Owner,
) -> list[CheckpointRecord]:
    """Publish one checkpoint (manifest last), drop all but the `keep` newest complete ones, and return those kept,
    oldest first (so the new one last), as `stored` would list them."""
    local = workdir / "checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    uri = checkpoint_uri + checkpoint_name(progress.step)
    with disk.writing(local, f"checkpoint {uri}", tensor_bytes(trainable) + tensor_bytes(training_state)):
        local.mkdir(parents=True)
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in trainable.items()}, local / WEIGHTS)
        torch.save(training_state, local / TRAINING_STATE)
        (local / STATE).write_text(json.dumps(asdict(progress)))
    metadata = {"step": progress.step, "configHash": progress.config_hash, UID_KEY: owner.uid}
    # Kept in the manifest so that status.checkpoints can be read back from storage alone (see stored).
    evaluated = dict(progress.eval_history).get(progress.step, {})
    if "evalLoss" in evaluated:
        metadata[EVAL_LOSS_KEY] = evaluated["evalLoss"]
    storage.publish(local, uri, metadata)
    shutil.rmtree(local)
    # Only checkpoints this run may resume are pruned: another FineTuneJob's are not its to delete.
    complete = _complete(storage, checkpoint_uri, progress.config_hash, owner)
    for stale, _ in complete[keep:]:
        storage.delete(stale)
    return _records(complete[:keep])


def tensor_bytes(value: Any) -> int:
    """The bytes the tensors in a (nested) state hold: what writing it needs on disk, near enough."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def stored(storage: Storage, checkpoint_uri: str, config_hash: str, owner: Owner) -> list[CheckpointRecord]:
    """The complete checkpoints whose config matches and that the owner may resume, oldest first (resume the last).

    Read from storage alone, this is status.checkpoints: a retried pod reports what the one before it wrote.
    """
    return _records(_complete(storage, checkpoint_uri, config_hash, owner))


def _records(complete: list[tuple[str, dict[str, Any]]]) -> list[CheckpointRecord]:
    return [
        CheckpointRecord(step=manifest["step"], uri=uri, eval_loss=manifest.get(EVAL_LOSS_KEY))
        for uri, manifest in reversed(complete)
    ]


def _complete(
    storage: Storage, checkpoint_uri: str, config_hash: str, owner: Owner
) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints a run with this config may resume, newest first, each with its manifest."""
    found = []
    for uri in reversed(storage.children(checkpoint_uri)):
        manifest = storage.read_manifest(uri)
        if manifest is None and not storage.holds_files(uri):
            continue
        if manifest is None:
            logger.info("ignoring %s: no manifest, it was being written when the trainer stopped", uri)
        elif manifest.get("configHash") != config_hash:
            logger.info("ignoring %s: written for another configuration", uri)
        elif (refusal := owner.refusal(manifest)) is not None:
            logger.warning("ignoring %s: %s", uri, refusal)
        else:
            found.append((uri, manifest))
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
    try:
        # Tensors and plain values only: anyone who can write the checkpoint prefix could plant a pickle that runs code.
        training_state = torch.load(local / TRAINING_STATE, weights_only=True)
    except pickle.UnpicklingError as error:
        raise StorageError(
            "UnsafeCheckpoint",
            f"{uri}{TRAINING_STATE} holds more than tensors and plain values, which the trainer refuses to unpickle "
            "(it could run code): delete this checkpoint, or find out who wrote it",
        ) from error
    shutil.rmtree(local)
    return progress, weights, training_state
