"""Which sequences make each micro-batch (a pure function of seed, epoch and step), and how they become tensors."""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer.tokenization import IGNORE_INDEX

# Prompt and prefix tuning prepend virtual tokens, which PEFT does not combine with per-document positions.
VIRTUAL_TOKEN_METHODS = ("prompt-tuning", "prefix-tuning")


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


def flattens(spec: FineTuneJobSpec) -> bool:
    """Whether micro-batches are flattened (dataset.packing, causal-LM, methods without virtual tokens)."""
    return spec.task == "causal-lm" and spec.dataset.packing and spec.method.type not in VIRTUAL_TOKEN_METHODS


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout and masking draw from a generator seeded per step and rank: a resumed run draws the same numbers."""
    return (seed * 1_000_003 + step * 101 + rank) % (2**63)


def collator(
    task: str, tokenizer: Any, flattened: bool, pairs: bool = False
) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
    """The function that lays out one micro-batch: padded to its longest sequence (never to maxLength), or, when
    `flattened` (packing), laid end to end in one row with no padding at all. A micro-batch of preference `pairs`
    lays out every chosen sequence, then every rejected one, each its own document."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if pairs:
        return lambda batch: _paired(batch, flatten if flattened else lambda sequences: _padded(sequences, pad_id))
    if task == "masked-lm":
        from transformers import DataCollatorForLanguageModeling

        masking = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
        return lambda batch: masking([{"input_ids": item["input_ids"]} for item in batch])
    if task == "sequence-classification":
        return lambda batch: {
            **_padded(batch, pad_id),
            "labels": torch.tensor([item["label"] for item in batch]),
        }
    return flatten if flattened else lambda batch: _padded(batch, pad_id)


def flatten(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The examples end to end in a single row, told apart by position ids that restart at each document and by
    the documents' cumulative lengths (what variable-length attention kernels read); no mask, no padding.

    Each document's first token has no label, so no document learns to predict the next one; unpacked, that
    token has none either (a causal model's labels shift by one).
    """
    lengths = [len(item["input_ids"]) for item in batch]
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return {
        "input_ids": torch.tensor([[token for item in batch for token in item["input_ids"]]]),
        "labels": torch.tensor([[label for item in batch for label in (IGNORE_INDEX, *item["labels"][1:])]]),
        "position_ids": torch.tensor([[position for length in lengths for position in range(length)]]),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _paired(
    batch: Sequence[dict[str, Any]], lay_out: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
) -> dict[str, Any]:
    laid = lay_out([pair["chosen"] for pair in batch] + [pair["rejected"] for pair in batch])
    laid["pairs"] = len(batch)
    if "reference" in batch[0]:
        laid["reference_logps"] = torch.stack([torch.as_tensor(pair["reference"]) for pair in batch])
    return laid


def _padded(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(item["input_ids"]) for item in batch)
    tensors: dict[str, torch.Tensor] = {
        "input_ids": _stack([item["input_ids"] for item in batch], longest, pad_id),
        "attention_mask": _stack([[1] * len(item["input_ids"]) for item in batch], longest, 0),
    }
    if "labels" in batch[0]:
        tensors["labels"] = _stack([item["labels"] for item in batch], longest, IGNORE_INDEX)
    return tensors


def _stack(rows: Sequence[Sequence[int]], length: int, fill: int) -> torch.Tensor:
    return torch.tensor([list(row) + [fill] * (length - len(row)) for row in rows], dtype=torch.long)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (copied without blocking from pinned memory on a GPU); other values as they are."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }
