"""Data preparation: every format, the task shapes, cleaning, dedupe, the seeded split, and errors that name the fix."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunery.api.spec import Dataset
from tunery_trainer.data import DataError, prepare


def dataset(**fields) -> Dataset:
    return Dataset.model_validate({"train": "file:///data/train.jsonl", **fields})


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_every_format_reads_the_same_rows(tmp_path: Path) -> None:
    rows = [{"text": f"example {index}"} for index in range(4)]
    jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("text\n" + "".join(f"example {index}\n" for index in range(4)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("".join(f"example {index}\n" for index in range(4)))
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet", "e.txt"):
        prepared = prepare("causal-lm", dataset(validationSplit=0), [tmp_path / name], [], seed=1)
        assert sorted(example["text"] for example in prepared.train) == [f"example {index}" for index in range(4)], name


def test_shards_cleaning_and_dedupe(tmp_path: Path) -> None:
    jsonl(tmp_path / "part-0.jsonl", [{"body": "  Cafe\u0301  "}, {"body": "same"}, {"body": "   "}])
    jsonl(tmp_path / "part-1.jsonl", [{"body": "same"}, {"body": "other"}])
    prepared = prepare(
        "masked-lm", dataset(columns={"text": "body"}, validationSplit=0), sorted(tmp_path.glob("*.jsonl")), [], seed=1
    )
    assert [example["text"] for example in prepared.train] == ["Café", "same", "other"]
    assert prepared.report.duplicates == 1 and prepared.report.empty_rows == 1 and prepared.report.rows_read == 5


def test_split_is_seeded(tmp_path: Path) -> None:
    files = [jsonl(tmp_path / "t.jsonl", [{"text": f"row {index}"} for index in range(100)])]
    first = prepare("causal-lm", dataset(validationSplit=0.1), files, [], seed=7)
    again = prepare("causal-lm", dataset(validationSplit=0.1), files, [], seed=7)
    other = prepare("causal-lm", dataset(validationSplit=0.1), files, [], seed=8)
    assert len(first.validation) == 10 and len(first.train) == 90
    assert first.validation == again.validation and first.validation != other.validation


def test_causal_lm_shapes(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    pair = {"prompt": "2+2=", "completion": "4"}
    prepared = prepare("causal-lm", dataset(validationSplit=0), [jsonl(tmp_path / "t.jsonl", [chat, pair])], [], seed=1)
    assert prepared.train == [chat, pair]


def test_classification_labels(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", [{"review": "good", "stars": "pos"}, {"review": "bad", "stars": "neg"}])
    valid = jsonl(tmp_path / "valid.jsonl", [{"review": "fine", "stars": "pos"}])
    spec = dataset(columns={"text": "review", "label": "stars"})
    prepared = prepare("sequence-classification", spec, [train], [valid], seed=1)
    assert prepared.label_names == ["neg", "pos"] and prepared.validation == [{"text": "fine", "label": "pos"}]
    jsonl(valid, [{"review": "meh", "stars": "neutral"}])
    with pytest.raises(DataError, match=r"labels the training data never shows: \['neutral'\]"):
        prepare("sequence-classification", spec, [train], [valid], seed=1)


def test_token_classification_needs_aligned_lists(tmp_path: Path) -> None:
    rows = [
        {"words": ["Acme", "Corp"], "ner": ["B-ORG", "I-ORG"]},
        {"words": ["Paris"], "ner": ["B-LOC"]},
        {"words": ["broken", "row"], "ner": ["O"]},
    ]
    prepared = prepare(
        "token-classification",
        dataset(columns={"tokens": "words", "tags": "ner"}, validationSplit=0),
        [jsonl(tmp_path / "t.jsonl", rows)],
        [],
        seed=1,
    )
    assert len(prepared.train) == 2 and prepared.label_names == ["B-LOC", "B-ORG", "I-ORG"]
    assert prepared.report.first_problems == ["t.jsonl row 3: 2 tokens but 1 tags"]


def test_missing_column_names_the_columns_and_the_fix(tmp_path: Path) -> None:
    files = [jsonl(tmp_path / "t.jsonl", [{"body": "a"}, {"body": "b"}])]
    with pytest.raises(DataError) as error:
        prepare("masked-lm", dataset(), files, [], seed=1)
    assert "t.jsonl" in error.value.message and "['body']" in error.value.message
    assert "dataset.columns" in error.value.message


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable example"):
        prepare("causal-lm", dataset(), [tmp_path / "t.jsonl"], [], seed=1)


def test_a_few_malformed_rows_are_counted_many_stop_the_run(tmp_path: Path) -> None:
    good = [{"text": f"row {index}"} for index in range(9)]
    prepared = prepare(
        "causal-lm", dataset(validationSplit=0), [jsonl(tmp_path / "few.jsonl", [*good, "{broken"])], [], seed=1
    )
    assert len(prepared.train) == 9 and sum(prepared.report.bad_rows.values()) == 1
    assert prepared.report.first_problems[0].startswith("few.jsonl row 10: unreadable (not JSON")
    with pytest.raises(DataError, match="3 of 4 rows are bad"):
        prepare(
            "causal-lm", dataset(), [jsonl(tmp_path / "many.jsonl", ["{x", "{y", "[1]", {"text": "ok"}])], [], seed=1
        )


def test_unreadable_file_names_the_format(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"t.parquet: cannot be read as parquet .*dataset.format"):
        prepare("causal-lm", dataset(), [tmp_path / "t.parquet"], [], seed=1)
