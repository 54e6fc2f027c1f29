"""Padding-free attention for flattened micro-batches: which kernel a run uses, and SDPA run per document."""

import importlib.util
from typing import Any

import torch

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer.batching import flattens

# Registered with transformers under this name; it attends within each document of a flattened row.
PER_DOCUMENT_SDPA = "tunery_per_document_sdpa"


def attention_kernel(spec: FineTuneJobSpec, device: torch.device) -> str:
    """The attention a run trains with: padding-free for flattened micro-batches, transformers' SDPA otherwise."""
    return packed_kernel(device) if flattens(spec) else "sdpa"


def packed_kernel(device: torch.device) -> str:
    """The fastest attention here that keeps the documents of a flattened row apart, without a dense mask.

    flash-attention's varlen kernel reads the documents' cumulative lengths directly (GPU, when installed);
    without it, on a GPU, flex attention skips the masked blocks of a block-sparse document mask that transformers
    builds from the restarting position ids; on a CPU, SDPA runs once per document with its causal kernel (flex
    attention there would compile for every new row length).
    """
    if device.type == "cuda":
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    _register()
    return PER_DOCUMENT_SDPA


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PER_DOCUMENT_SDPA, per_document_sdpa)


def per_document_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with its causal kernel over each document's span of a one-row batch (bounds from `cu_seq_lens_q`).

    Without the bounds (one unpadded sequence, as in generation) this is transformers' own SDPA; transformers builds
    no mask for an attention it does not know, so a flattened run never feeds it a padded batch.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # split, not slicing: its backward joins the documents' gradients once, where each slice's would fill a whole
    # row of zeros.
    lengths = cu_seq_lens_q.diff().tolist()
    outputs = [
        sdpa_attention_forward(module, query_part, key_part, value_part, None, is_causal=True, **kwargs)[0]
        for query_part, key_part, value_part in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2), strict=True
        )
    ]
    # sdpa_attention_forward returns (batch, length, heads, head_dim): documents join along the length.
    return torch.cat(outputs, dim=1), None
