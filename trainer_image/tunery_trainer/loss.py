"""Causal-LM cross-entropy taken a chunk of positions at a time, so the full logits never exist at once."""

from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutput

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer.batching import VIRTUAL_TOKEN_METHODS
from tunery_trainer.tokenization import IGNORE_INDEX

# One chunk's fp32 logits take at most this much memory: at a 128k vocabulary, 512 positions (a whole 4096-token
# row's logits would take 2 GiB); at a small vocabulary, the whole batch in one chunk.
CHUNK_LOGITS_BYTES = 256 * 2**20
# Architectures whose causal-LM head is a plain projection of the decoder's last hidden state (no logit soft-capping
# or scaling, no auxiliary loss), so the chunked loss is exactly the model's own.
PLAIN_HEAD_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo2", "smollm3"})


def chunks_the_loss(spec: FineTuneJobSpec, model: Any) -> bool:
    """Whether `ChunkedLoss` can take this run's loss: a causal LM whose head is a plain projection, its inputs the
    tokens themselves (PEFT prepends prompt and prefix tuning's virtual tokens in its own forward pass)."""
    return (
        spec.task == "causal-lm"
        and spec.method.type not in VIRTUAL_TOKEN_METHODS
        and model.config.model_type in PLAIN_HEAD_ARCHITECTURES
    )


class ChunkedLoss(torch.nn.Module):
    """A causal LM's forward pass up to its last hidden state, then the head and the loss by chunks of positions.

    Each chunk's gradient is computed with its loss (the fused approach of Liger's and Apple's cut cross-entropy),
    so backward stores no logits either. The result carries only the loss: nothing downstream reads causal-LM
    logits during training or evaluation.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs: Any) -> CausalLMOutput:
        head = self.model.get_output_embeddings()
        if labels.numel() * head.weight.shape[0] * 4 <= CHUNK_LOGITS_BYTES:
            # The logits fit in one chunk: the model's own loss takes no more memory, and its kernels are faster.
            return self.model(labels=labels, **inputs, use_cache=False)
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        # A causal model predicts position i + 1 from position i.
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        return CausalLMOutput(loss=_ChunkedCrossEntropy.apply(hidden, head.weight, targets, torch.is_grad_enabled()))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX counts for nothing)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, gradients: bool):
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        chunk = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
        loss = torch.zeros((), device=hidden.device)
        wants_hidden, wants_weight = (gradients and wanted for wanted in ctx.needs_input_grad[:2])
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        for start in range(0, hidden.shape[0], chunk):
            part, target, kept = (
                hidden[start : start + chunk],
                targets[start : start + chunk],
                valid[start : start + chunk],
            )
            logits = (part @ weight.T).float()
            log_normaliser = logits.logsumexp(-1)
            picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
            loss += ((log_normaliser - picked) * kept).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss)/d(logits) = softmax - one-hot, for the counted positions, over the count.
            grad_logits = logits.sub_(log_normaliser[:, None]).exp_()
            grad_logits[torch.arange(len(target), device=target.device), target.clamp(min=0)] -= 1
            grad_logits *= (kept / count)[:, None]
            grad_logits = grad_logits.to(part.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits @ weight.to(part.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ part).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_output,
            None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype),
            None,
            None,
        )
