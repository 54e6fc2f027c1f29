"""FSDP (resources.strategy fsdp): shard a model across the processes, and gather what a checkpoint keeps."""

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from tunery_trainer.modeling import blocks

# Gathered whole onto rank 0's CPU, as a checkpoint and the published model need them; other ranks get nothing.
_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Every rank reads the checkpoint itself, so each loads the whole state and keeps its shard.
_LOADED = StateDictOptions(full_state_dict=True, strict=False)


def shard(model: torch.nn.Module) -> None:
    """Shard each block of every layer stack (the transformer layers), then the rest, in place."""
    # One unit per block: only one block's weights are gathered whole at a time.
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on rank 0 (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=_GATHERED)


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, whole and keyed by parameter name, on rank 0 (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHERED)


def load(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Restore a checkpoint's whole trainable weights and optimizer state into the shards (a collective)."""
    set_model_state_dict(model, weights, options=_LOADED)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_LOADED)
