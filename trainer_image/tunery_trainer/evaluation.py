"""Evaluation metrics as pure functions: classification scores over labels, entity-level scores over tag sequences."""

from collections import Counter
from collections.abc import Sequence

OUTSIDE = "O"
# BILOU's Last and Unit play the roles of BIOES's End and Single, so one set of chunking rules serves both schemes.
POSITIONS = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}
PLAIN = ""


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
    spans: set[tuple[str, int, int]] = set()
    start = 0
    previous = (OUTSIDE, "")
    # A trailing OUTSIDE closes an entity that runs to the end of the sentence.
    for index, tag in enumerate([*tags, OUTSIDE]):
        current = _position_and_type(tag)
        if _continues_entity(previous, current):
            continue
        if previous[0] != OUTSIDE:
            spans.add((previous[1], start, index))
        start, previous = index, current
    return spans


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


def _position_and_type(tag: str) -> tuple[str, str]:
    """(position, entity type): position is B, I, E, S, OUTSIDE, or PLAIN for a tag that is only a type."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    if len(tag) > 1 and tag[0] in POSITIONS and tag[1] in "-_":
        return POSITIONS[tag[0]], tag[2:]
    return PLAIN, tag


def _continues_entity(previous: tuple[str, str], current: tuple[str, str]) -> bool:
    """Whether current extends the entity previous belongs to (seqeval's lenient rules); otherwise it ends there."""
    (previous_position, previous_type), (current_position, current_type) = previous, current
    if previous_type != current_type:
        return False
    if current_position in ("I", "E"):
        return previous_position in ("B", "I")
    return current_position == PLAIN and previous_position == PLAIN


def _ratio(numerator: int, denominator: int) -> float:
    # Zero when nothing was counted, as scikit-learn and seqeval do with zero_division=0.
    return numerator / denominator if denominator else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
