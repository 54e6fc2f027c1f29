"""Which sequences make each micro-batch (a pure function of seed, epoch and step), and how they become tensors."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunery_trainer.tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class Schedule:
    """The order of the data: every rank can compute which sequences any step uses, so resuming needs only the step."""

    sequences: int
    batch_size: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.sequences / self.per_step))

    def total_steps(self, epochs: float, max_steps: int) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * self.steps_per_epoch))

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The sequence indices of each micro-batch this rank runs for optimiser step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = within * self.per_step
        batches = []
        for micro in range(self.accumulation):
            offset = start + (micro * self.world_size + rank) * self.batch_size
            # The last step of an epoch wraps around, so every rank always gets full micro-batches.
            batches.append([order[(offset + i) % len(order)] for i in range(self.batch_size)])
        return batches

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.sequences, generator=generator).tolist()


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout and masking draw from a generator seeded per step and rank: a resumed run draws the same numbers."""
    return (seed * 1_000_003 + step * 101 + rank) % (2**63)


def collator(
    task: str, tokenizer: Any, attention: str
) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
    """The function that pads one micro-batch to its longest sequence (never to maxLength)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if task == "masked-lm":
        from transformers import DataCollatorForLanguageModeling

        masking = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
        return lambda batch: masking([{"input_ids": item["input_ids"]} for item in batch])
    if task == "sequence-classification":
        return lambda batch: {
            **_padded(batch, pad_id),
            "labels": torch.tensor([item["label"] for item in batch]),
        }
    return lambda batch: _padded(batch, pad_id, attention)


def _padded(batch: Sequence[dict[str, Any]], pad_id: int, attention: str = "") -> dict[str, torch.Tensor]:
    longest = max(len(item["input_ids"]) for item in batch)
    tensors: dict[str, torch.Tensor] = {
        "input_ids": _stack([item["input_ids"] for item in batch], longest, pad_id),
    }
    if "labels" in batch[0]:
        tensors["labels"] = _stack([item["labels"] for item in batch], longest, IGNORE_INDEX)
    if "document_ids" in batch[0]:
        tensors["position_ids"] = torch.stack(
            [torch.tensor(item["position_ids"] + list(range(longest - len(item["position_ids"])))) for item in batch]
        )
        tensors["attention_mask"] = document_mask(
            _stack([item["document_ids"] for item in batch], longest, -1), attention
        )
    else:
        tensors["attention_mask"] = _stack([[1] * len(item["input_ids"]) for item in batch], longest, 0)
    return tensors


def _stack(rows: Sequence[Sequence[int]], length: int, fill: int) -> torch.Tensor:
    return torch.tensor([list(row) + [fill] * (length - len(row)) for row in rows], dtype=torch.long)


def document_mask(document_ids: torch.Tensor, attention: str) -> torch.Tensor:
    """A causal mask that is also block-diagonal by document: packed examples never attend to each other.

    Shape (batch, 1, query, key). SDPA takes it as booleans; the eager implementation adds it to the scores.
    Padding is a document of its own (id -1), so no row is fully masked.
    """
    length = document_ids.shape[1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed = (same_document & causal)[:, None]
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
