"""Preference objectives: per-sequence log-probabilities and the DPO, ORPO and pairwise reward losses."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from tunery.api.spec import Objective
from tunery_trainer.loss import CHUNK_LOGITS_BYTES
from tunery_trainer.tokenization import IGNORE_INDEX

# The order of the values `preference_metrics` stacks into one tensor (status metric names, after their prefix).
PREFERENCE_METRICS = ("RewardAccuracy", "RewardMargin", "ChosenLogps", "RejectedLogps")


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss and the implicit rewards of each pair's chosen and rejected sequences (detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its label tokens, and how many tokens it counted.

    `logits` (batch, length, vocab) predict `labels` (batch, length) shifted by one, as a causal LM's do; labels equal
    to IGNORE_INDEX count for nothing. With `cu_seq_lens` (the cumulative document lengths of a flattened row, as
    `batching.flatten` lays it out) the one row holds several sequences and the result has one entry per document;
    without, one per row.
    """
    if cu_seq_lens is not None and logits.shape[0] != 1:
        raise ValueError(
            f"sequence_logps: cu_seq_lens describes one flattened row, but logits hold {logits.shape[0]} rows; "
            "flatten the batch into one row (batching.flatten) or pass cu_seq_lens=None for padded rows"
        )
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    if cu_seq_lens is not None:
        bounds = cu_seq_lens.to(targets.device).long()
        # A document's first token would be predicted from the previous document's last: never a label.
        targets[0, bounds[1:-1] - 1] = IGNORE_INDEX
    # Labels moved back one place, so each position scores the token after it and the logits need no shifted copy.
    token_logps = _TokenLogps.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    counted = targets != IGNORE_INDEX
    if cu_seq_lens is None:
        return token_logps.sum(dim=1), counted.sum(dim=1)
    documents = bounds.numel() - 1
    positions = torch.arange(targets.shape[1], device=targets.device)
    # Position i scores token i + 1, which belongs to the document whose span holds i + 1 (the last position scores
    # nothing: it goes to the last document).
    document = (torch.searchsorted(bounds, positions + 1, right=True) - 1).clamp(max=documents - 1)
    sums = token_logps.new_zeros(documents).index_add(0, document, token_logps[0])
    counts = counted.new_zeros(documents, dtype=torch.long).index_add(0, document, counted[0].long())
    return sums, counts


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per position (0 where the target is IGNORE_INDEX), a chunk of positions at a time.

    Only one chunk's fp32 logits exist at once, forward or backward; backward keeps the caller's logits and each
    position's log-normaliser, never a (positions x vocab) log-softmax.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        kept = targets != IGNORE_INDEX
        picked_targets = targets.clamp(min=0)
        chunk = max(1, CHUNK_LOGITS_BYTES // (4 * logits.shape[-1]))
        # At least fp32, whatever the logits' dtype.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_normaliser = torch.empty(logits.shape[0], device=logits.device, dtype=dtype)
        picked = torch.empty(logits.shape[0], device=logits.device, dtype=dtype)
        for start in range(0, logits.shape[0], chunk):
            part = logits[start : start + chunk].to(dtype)
            log_normaliser[start : start + chunk] = part.logsumexp(-1)
            picked[start : start + chunk] = part.gather(1, picked_targets[start : start + chunk, None])[:, 0]
        ctx.save_for_backward(logits, log_normaliser, picked_targets, kept)
        return (picked - log_normaliser) * kept

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        logits, log_normaliser, picked_targets, kept = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        weights = grad_output * kept
        chunk = max(1, CHUNK_LOGITS_BYTES // (4 * logits.shape[-1]))
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            # d(logit[target] - logsumexp)/d(logits) = one-hot - softmax; not in place, as the
            # logits may already be in that dtype (then the conversion is the caller's tensor itself).
            part = torch.exp(logits[rows].to(log_normaliser.dtype) - log_normaliser[rows, None]).neg_()
            part[torch.arange(part.shape[0], device=part.device), picked_targets[rows]] += 1
            grad_logits[rows] = part.mul_(weights[rows, None]).to(logits.dtype)
        return grad_logits, None


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """Sigmoid DPO over pairs' summed log-probabilities: -log σ(β·((πc - refc) - (πr - refr))), averaged over pairs.

    The rewards are β·(policy - reference) log-probabilities, as DPO (and TRL) define them.
    """
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def orpo_loss(
    chosen_nll: torch.Tensor, chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float
) -> PreferenceLoss:
    """ORPO as TRL defines it: the chosen sequences' NLL minus β times the mean of log σ(log odds ratio).

    `chosen_nll` is the language-model loss on the chosen sequences (TRL takes it over prompt and completion, one mean
    over all their tokens); the mean log-probabilities are per pair, over each completion's tokens. The log odds of a
    mean log-probability p is p - log(1 - exp(p)); the rewards are β·p.
    """
    chosen, rejected = chosen_mean_logp.float(), rejected_mean_logp.float()
    log_odds_ratio = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    loss = chosen_nll - beta * F.logsigmoid(log_odds_ratio).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x <= 0: log1p near -inf, expm1 near 0, each where the other loses precision.
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry loss of a reward model's scalar scores: -log σ(chosen - rejected), averaged over pairs."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The means over pairs, in PREFERENCE_METRICS order, as one tensor: it stays on the device until reported."""
    return torch.stack(
        [
            (chosen_rewards > rejected_rewards).float().mean(),
            (chosen_rewards - rejected_rewards).float().mean(),
            chosen_logps.detach().float().mean(),
            rejected_logps.detach().float().mean(),
        ]
    )


def report_metrics(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """`preference_metrics` values as floats named like status metrics (prefix "eval": evalRewardAccuracy, ...),
    read from the device in one transfer."""
    return {f"{prefix}{name}": value for name, value in zip(PREFERENCE_METRICS, values.tolist(), strict=True)}


@dataclass
class PreferenceOutput(ModelOutput):
    """A preference micro-batch's loss, its `preference_metrics` (on the device) and how many pairs it held."""

    loss: torch.Tensor | None = None
    metrics: torch.Tensor | None = None
    pairs: int | None = None


class PreferenceModel(torch.nn.Module):
    """A causal LM scored on preference pairs (as `batching.collator` lays them out, chosen then rejected) with the
    objective's loss. DPO's reference log-probabilities come with the batch (`reference_logps`, computed once with
    `pair_logps` before training), so no reference model is held."""

    def __init__(self, model: Any, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def pair_logps(
        self, labels: torch.Tensor, pairs: int, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen and rejected sequences' summed completion log-probabilities, and their token counts."""
        inputs.pop("reference_logps", None)
        logits = self.model(**inputs, use_cache=False).logits
        logps, counts = sequence_logps(logits, labels, inputs.get("cu_seq_lens_q"))
        return logps[:pairs], logps[pairs:], counts[:pairs], counts[pairs:]

    def forward(
        self, labels: torch.Tensor, pairs: int, reference_logps: torch.Tensor | None = None, **inputs: Any
    ) -> PreferenceOutput:
        chosen, rejected, chosen_counts, rejected_counts = self.pair_logps(labels, pairs, **inputs)
        beta = self.objective.effective_beta
        if self.objective.type == "dpo":
            if reference_logps is None:
                raise ValueError("objective dpo scores a batch against its reference_logps, and this one has none")
            reference = reference_logps.to(chosen.dtype)
            result = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], beta)
            metrics = preference_metrics(result.chosen_rewards, result.rejected_rewards, chosen, rejected)
        else:
            # The paper's SFT term: the chosen completions' NLL given their prompts, one mean over their tokens.
            chosen_mean = chosen / chosen_counts.clamp(min=1)
            rejected_mean = rejected / rejected_counts.clamp(min=1)
            chosen_nll = -chosen.sum() / chosen_counts.sum().clamp(min=1)
            result = orpo_loss(chosen_nll, chosen_mean, rejected_mean, beta)
            metrics = preference_metrics(result.chosen_rewards, result.rejected_rewards, chosen_mean, rejected_mean)
        return PreferenceOutput(loss=result.loss, metrics=metrics, pairs=pairs)
