"""Evaluation metrics as pure functions: classification scores over labels, entity-level scores over tag sequences."""

from collections import Counter
from collections.abc import Sequence

from tunery_trainer.tagging import entity_chunks


def classification_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy and macro-averaged precision, recall and f1 over all num_labels classes."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: they must pair up")
    if not references:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    predicted_counts = Counter(predictions)
    reference_counts = Counter(references)
    correct_counts = Counter(
        prediction for prediction, reference in zip(predictions, references, strict=True) if prediction == reference
    )
    labels = range(num_labels)
    precisions = [_ratio(correct_counts[label], predicted_counts[label]) for label in labels]
    recalls = [_ratio(correct_counts[label], reference_counts[label]) for label in labels]
    f1s = [_ratio(2 * correct_counts[label], predicted_counts[label] + reference_counts[label]) for label in labels]
    return {
        "accuracy": correct_counts.total() / len(references),
        "precision": _mean(precisions),
        "recall": _mean(recalls),
        "f1": _mean(f1s),
    }


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities (type, start, end-exclusive) in one sentence's tags: IOB2, IOB1, BIOES/BILOU, or plain type tags."""
    return set(entity_chunks(tags))


def entity_metrics(predicted: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and f1 (micro over entities, as seqeval's default), plus token accuracy."""
    if len(predicted) != len(references):
        raise ValueError(f"{len(predicted)} predicted sentences for {len(references)} reference sentences")
    found = expected = matched = 0
    tokens = correct_tokens = 0
    for index, (predicted_tags, reference_tags) in enumerate(zip(predicted, references, strict=True)):
        if len(predicted_tags) != len(reference_tags):
            raise ValueError(
                f"sentence {index}: {len(predicted_tags)} predicted tags for {len(reference_tags)} reference tags"
            )
        predicted_spans, reference_spans = entity_spans(predicted_tags), entity_spans(reference_tags)
        found += len(predicted_spans)
        expected += len(reference_spans)
        matched += len(predicted_spans & reference_spans)
        tokens += len(reference_tags)
        correct_tokens += sum(guess == truth for guess, truth in zip(predicted_tags, reference_tags, strict=True))
    return {
        "precision": _ratio(matched, found),
        "recall": _ratio(matched, expected),
        "f1": _ratio(2 * matched, found + expected),
        "accuracy": _ratio(correct_tokens, tokens),
    }


def _ratio(numerator: int, denominator: int) -> float:
    # Zero when nothing was counted, as scikit-learn and seqeval do with zero_division=0.
    return numerator / denominator if denominator else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
