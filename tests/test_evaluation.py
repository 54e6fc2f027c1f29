"""Evaluation metrics: macro classification scores as scikit-learn computes them, entity spans and scores as seqeval."""

import pytest

from tunery_trainer.evaluation import classification_metrics, entity_metrics, entity_spans


def test_classification_matches_sklearn_macro_average() -> None:
    # class 0: predicted 3, true 1, correct 1 -> precision 1/3, recall 1,   f1 2*1/(3+1) = 1/2
    # class 1: predicted 2, true 3, correct 2 -> precision 1,   recall 2/3, f1 2*2/(2+3) = 4/5
    # class 2: predicted 1, true 2, correct 1 -> precision 1,   recall 1/2, f1 2*1/(1+2) = 2/3
    # macro: precision 7/9, recall 13/18, f1 (1/2 + 4/5 + 2/3)/3 = 59/90; accuracy 4/6
    metrics = classification_metrics([0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2], num_labels=3)
    assert metrics == pytest.approx({"accuracy": 4 / 6, "precision": 7 / 9, "recall": 13 / 18, "f1": 59 / 90})


def test_a_class_never_seen_counts_as_zero_in_the_macro_average() -> None:
    metrics = classification_metrics([0, 1, 0, 1], [0, 1, 0, 1], num_labels=3)
    assert metrics == pytest.approx({"accuracy": 1.0, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def test_perfect_classification_scores_one() -> None:
    metrics = classification_metrics([2, 0, 1, 1], [2, 0, 1, 1], num_labels=3)
    assert metrics == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_classification_of_nothing_scores_zero() -> None:
    assert classification_metrics([], [], num_labels=2) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_classification_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        classification_metrics([0, 1], [0, 1, 1], num_labels=2)


def test_iob2_spans() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert entity_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)}


def test_iob1_spans_start_at_an_inside_tag() -> None:
    assert entity_spans(["I-PER", "I-PER", "O", "I-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}


def test_a_type_change_mid_chunk_starts_a_new_entity() -> None:
    assert entity_spans(["B-PER", "I-LOC", "I-LOC", "O"]) == {("PER", 0, 1), ("LOC", 1, 3)}


def test_bioes_spans() -> None:
    tags = ["S-PER", "B-ORG", "I-ORG", "E-ORG", "O", "E-LOC", "S-LOC", "E-MISC", "E-MISC"]
    assert entity_spans(tags) == {
        ("PER", 0, 1),
        ("ORG", 1, 4),
        ("LOC", 5, 6),
        ("LOC", 6, 7),
        ("MISC", 7, 8),
        ("MISC", 8, 9),
    }


def test_bilou_spans_and_underscore_separator() -> None:
    assert entity_spans(["U-PER", "B-ORG", "I-ORG", "L-ORG", "O"]) == {("PER", 0, 1), ("ORG", 1, 4)}
    assert entity_spans(["B_PER", "I_PER", "O", "B_LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}


def test_plain_type_tags_group_consecutive_identical_tags() -> None:
    assert entity_spans(["PER", "PER", "O", "LOC", "ORG", "ORG"]) == {("PER", 0, 2), ("LOC", 3, 4), ("ORG", 4, 6)}


def test_no_tags_no_entities() -> None:
    assert entity_spans([]) == set()
    assert entity_spans(["O", "O"]) == set()


def test_a_partial_entity_match_counts_as_wrong() -> None:
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"]]
    # predicted PER(0,1), LOC(3,4), ORG(0,1); reference PER(0,2), LOC(3,4): only LOC matches.
    # precision 1/3, recall 1/2, f1 2*1/(3+2); tokens right: 3 of 4, then 1 of 2.
    assert entity_metrics(predicted, references) == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "accuracy": 4 / 6}
    )


def test_perfect_entities_score_one() -> None:
    sentences = [["B-PER", "I-PER", "O"], ["O", "S-LOC"]]
    assert entity_metrics(sentences, sentences) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}


def test_no_entities_anywhere_scores_zero_but_tokens_still_count() -> None:
    metrics = entity_metrics([["O", "O"], ["O"]], [["O", "O"], ["O"]])
    assert metrics == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0}


def test_sentence_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="sentence 1: 2 predicted tags for 1 reference tags"):
        entity_metrics([["O"], ["O", "B-PER"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="1 predicted sentences for 2 reference sentences"):
        entity_metrics([["O"]], [["O"], ["O"]])
