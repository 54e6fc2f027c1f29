"""Run the model over the validation sequences and compute the metrics the spec asks for."""

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from tunery.api.spec import EvalMetric, Task
from tunery_trainer.batching import to_device
from tunery_trainer.evaluation import classification_metrics, entity_metrics
from tunery_trainer.preference import PreferenceOutput, report_metrics
from tunery_trainer.tokenization import IGNORE_INDEX

Batch = dict[str, Any]
# Scored from the predicted labels or tags, which only these metrics need collected.
PREDICTION_METRICS = frozenset({"accuracy", "precision", "recall", "f1"})


@torch.no_grad()
def evaluate(
    model: Any,
    task: Task,
    validation: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], Batch],
    batch_size: int,
    device: torch.device,
    label_names: Sequence[str],
    autocast: Callable[[], Any],
    metrics: Collection[EvalMetric],
) -> dict[str, float]:
    """Loss (token-weighted), always, and those of `metrics` that the task has (spec validation refuses the others).

    Loss is never left out: the forward pass yields it for free, and the loss curve, status.checkpoints' evalLoss
    and the other metrics' meaning (perplexity is exp(loss)) all rest on it. Preference pairs (a model that gives
    PreferenceOutput) are weighted per pair, and always report the reward accuracy and margin and both sides'
    log-probabilities.
    """
    wanted = {"loss", *metrics}
    predicts = bool(wanted & PREDICTION_METRICS) and task in ("sequence-classification", "token-classification")
    was_training = model.training
    model.eval()
    # Masked-LM masking draws random numbers: the same positions every evaluation make the losses comparable.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    # Summed on the device: reading it once at the end keeps the host from waiting on every batch.
    total_loss, total_weight = torch.zeros((), device=device), 0
    predictions: list[Any] = []
    references: list[Any] = []
    preference_sums: torch.Tensor | None = None
    for start in range(0, len(validation), batch_size):
        batch = collate(validation[start : start + batch_size])
        weight = batch["pairs"] if "pairs" in batch else _loss_weight(task, batch["labels"])
        batch = to_device(batch, device)
        with autocast():
            output = model(**batch)
        if isinstance(output, PreferenceOutput):
            summed = output.metrics.float() * weight
            preference_sums = summed if preference_sums is None else preference_sums + summed
        total_loss += output.loss.detach().float() * weight
        total_weight += weight
        if predicts and task == "sequence-classification":
            predictions += output.logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
        elif predicts:
            _collect_tags(output.logits.argmax(-1), batch["labels"], label_names, predictions, references)
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    loss = float(total_loss) / max(total_weight, 1)
    scores = {"loss": loss}
    if preference_sums is not None:
        return scores | report_metrics(preference_sums / max(total_weight, 1), "")
    if task in ("causal-lm", "masked-lm"):
        scores["perplexity"] = math.exp(min(loss, 50.0))
    elif predicts and task == "sequence-classification":
        scores |= classification_metrics(predictions, references, len(label_names))
    elif predicts:
        scores |= entity_metrics(predictions, references)
    return {name: value for name, value in scores.items() if name in wanted}


def _loss_weight(task: Task, labels: torch.Tensor) -> int:
    if task == "sequence-classification":
        return labels.shape[0]
    # Causal models shift labels by one: the first position never carries a loss.
    counted = labels[:, 1:] if task == "causal-lm" else labels
    return int((counted != IGNORE_INDEX).sum())


def _collect_tags(
    predicted: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    predictions: list[list[str]],
    references: list[list[str]],
) -> None:
    """Tags of the first sub-token of each word (the positions that carry a label)."""
    for predicted_row, label_row in zip(predicted.tolist(), labels.tolist(), strict=True):
        keep = [index for index, label in enumerate(label_row) if label != IGNORE_INDEX]
        predictions.append([label_names[predicted_row[index]] for index in keep])
        references.append([label_names[label_row[index]] for index in keep])
