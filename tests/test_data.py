"""Data preparation: every format, the task shapes, cleaning, dedupe, the seeded split, and errors that name the fix."""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunery.api.spec import Dataset
from tunery_trainer import failures
from tunery_trainer.data import MESSAGE_CHARS, DataError, SourceFiles, prepare, prepare_mixture


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


# Types are checked, never stringified


def first_problems(tmp_path: Path, task: str, rows: list, **fields) -> list[str]:
    prepared = prepare(task, dataset(validationSplit=0, **fields), [jsonl(tmp_path / "t.jsonl", rows)], [], seed=1)
    return prepared.report.first_problems


def test_a_wrong_typed_value_is_a_bad_row_naming_the_row_and_the_type(tmp_path: Path) -> None:
    rows = [{"text": f"row {index}"} for index in range(16)] + [{"text": {"nested": "object"}}]
    assert first_problems(tmp_path, "causal-lm", rows) == ["t.jsonl row 17: column 'text' holds a dict, expected text"]


CLASSES = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("task", "good", "bad", "problem"),
    [
        ("sequence-classification", CLASSES, {"text": "x", "label": True}, "column 'label' holds a bool"),
        ("sequence-classification", CLASSES, {"text": "x", "label": 1.5}, "column 'label' holds a float"),
        ("sequence-classification", CLASSES, {"text": "x", "label": ["pos"]}, "column 'label' holds a list"),
        ("sequence-classification", CLASSES, {"text": 7, "label": "pos"}, "column 'text' holds an int"),
        ("causal-lm", [{"prompt": "a", "completion": "b"}], {"prompt": "a", "completion": 4}, "column 'completion'"),
        ("causal-lm", [{"messages": CHAT}], {"messages": "hello"}, "column 'messages' holds a str"),
        (
            "causal-lm",
            [{"messages": CHAT}],
            {"messages": [{"role": "assistant", "content": {"text": "hi"}}]},
            "a message's content in column 'messages' holds a dict, expected text",
        ),
        (
            "token-classification",
            [{"tokens": ["Paris"], "tags": ["B-LOC"]}, {"tokens": ["is"], "tags": ["O"]}],
            {"tokens": ["Paris", 1], "tags": ["B-LOC", "O"]},
            "an item of column 'tokens' holds an int, expected text",
        ),
        (
            "token-classification",
            [{"tokens": ["Paris"], "tags": ["B-LOC"]}, {"tokens": ["is"], "tags": ["O"]}],
            {"tokens": ["Paris"], "tags": [True]},
            "an item of column 'tags' holds a bool, expected text or an integer",
        ),
        (
            "token-classification",
            [{"tokens": ["Paris"], "tags": ["B-LOC"]}, {"tokens": ["is"], "tags": ["O"]}],
            {"tokens": ["Paris"], "tags": "B-LOC"},
            "column 'tags' holds a str, expected a list of tags (strings or integers)",
        ),
    ],
)
def test_each_column_holds_its_type(tmp_path: Path, task: str, good: list, bad: dict, problem: str) -> None:
    (first,) = first_problems(tmp_path, task, [*good, bad])
    assert first.startswith(f"t.jsonl row {len(good) + 1}: {problem}"), first


def test_an_int_label_is_kept_as_its_decimal_string(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    prepared = prepare(
        "sequence-classification", dataset(validationSplit=0), [jsonl(tmp_path / "t.jsonl", rows)], [], 1
    )
    assert prepared.label_names == ["0", "1"] and prepared.train[0] == {"text": "good", "label": "1"}


def test_int_tags_are_kept_as_their_decimal_strings(tmp_path: Path) -> None:
    """CoNLL-style exports store tags as class ids (a parquet list<int64> column)."""
    rows = [{"tokens": ["Acme", "Corp"], "tags": [3, 4]}, {"tokens": ["in", "Paris"], "tags": [0, 5]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    prepared = prepare("token-classification", dataset(validationSplit=0), [tmp_path / "t.parquet"], [], 1)
    assert prepared.label_names == ["0", "3", "4", "5"]
    assert {"tokens": ["Acme", "Corp"], "tags": ["3", "4"]} in prepared.train


def test_a_parquet_int_column_is_not_text(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"text": index} for index in range(200)]), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"no usable example \(t.parquet row 1: column 'text' holds an int, expected"):
        prepare("causal-lm", dataset(), [tmp_path / "t.parquet"], [], seed=1)


# Malformed files spoil only their bad rows


def test_csv_rows_with_the_wrong_number_of_fields_are_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label\ngood,pos\nbad,neg,extra\nshort\nfine,neg\n" + "more,pos\n" * 4)
    prepared = prepare("sequence-classification", dataset(validationSplit=0), [tmp_path / "t.csv"], [], seed=1)
    assert prepared.report.first_problems == [
        "t.csv row 3: unreadable (3 fields, the header has 2)",
        "t.csv row 4: unreadable (1 fields, the header has 2)",
    ]
    assert prepared.train[:2] == [{"text": "good", "label": "pos"}, {"text": "fine", "label": "neg"}]


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    rows = [{"text": f"example {index}"} for index in range(2)]
    (tmp_path / "a.jsonl").write_text("\ufeff" + "".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "b.json").write_text("\ufeff" + json.dumps(rows))
    (tmp_path / "c.csv").write_text("\ufefftext\nexample 0\nexample 1\n")
    (tmp_path / "d.txt").write_text("\ufeffexample 0\nexample 1\n")
    for name in ("a.jsonl", "b.json", "c.csv", "d.txt"):
        prepared = prepare("causal-lm", dataset(validationSplit=0), [tmp_path / name], [], seed=1)
        assert [example["text"] for example in prepared.train] == ["example 0", "example 1"], name
        assert not prepared.report.bad_rows, name


@pytest.mark.parametrize(
    ("name", "lines", "problem"),
    [
        ("t.jsonl", [b'{"text": "caf\xe9"}'], "column 'text' is not UTF-8 text"),
        ("t.csv", [b"text", b"caf\xe9"], "column 'text' is not UTF-8 text"),
        ("t.txt", [b"caf\xe9"], "column 'text' is not UTF-8 text"),
    ],
)
def test_an_undecodable_byte_spoils_only_its_row(tmp_path: Path, name: str, lines: list[bytes], problem: str) -> None:
    good = [b'{"text": "row %d"}' % index if name == "t.jsonl" else b"row %d" % index for index in range(3)]
    (tmp_path / name).write_bytes(b"\n".join([*lines, *good]) + b"\n")
    prepared = prepare("causal-lm", dataset(validationSplit=0), [tmp_path / name], [], seed=1)
    assert prepared.report.first_problems == [f"{name} row {len(lines)}: {problem}"]
    assert [example["text"] for example in prepared.train] == ["row 0", "row 1", "row 2"]


# Errors fit the termination message, fix included


def test_ten_thousand_unknown_labels_are_summarised(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", CLASSES)
    valid = jsonl(tmp_path / "valid.jsonl", [{"text": "x", "label": f"class-{n}-" + "x" * 80} for n in range(10_000)])
    with pytest.raises(DataError) as error:
        prepare("sequence-classification", dataset(), [train], [valid], seed=1)
    message = error.value.message
    assert len(message) <= MESSAGE_CHARS and "and 9995 more" in message
    assert message.endswith("add training examples for them or fix the labels")


def test_many_shards_still_leave_room_for_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [jsonl(tmp_path / f"part-{index:05d}-{'x' * 100}.jsonl", [{"body": "a"}]) for index in range(300)]
    with pytest.raises(DataError) as error:
        prepare("causal-lm", dataset(), shards, [], seed=1)
    monkeypatch.setenv("TUNERY_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    failures.write_termination_message(error.value.reason, error.value.message)
    written = json.loads((tmp_path / "termination-log").read_text())["message"]
    assert "and 295 more" in written and written.endswith(": check dataset.columns and dataset.format")


def test_a_long_problem_is_cut_and_the_fix_kept() -> None:
    message = DataError("row 1: " + "y" * 1_000_000, "fix this").message
    assert len(message) == MESSAGE_CHARS and message.endswith("…: fix this")


def test_nesting_past_the_recursion_limit_is_a_data_error_not_a_crash(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    rows = [deep, *({"text": f"row {index}"} for index in range(3))]
    assert first_problems(tmp_path, "causal-lm", rows)[0].startswith("t.jsonl row 1: unreadable (not JSON: maximum")
    (tmp_path / "t.json").write_text(deep)
    with pytest.raises(DataError, match="t.json: cannot be read as json"):
        prepare("causal-lm", dataset(), [tmp_path / "t.json"], [], seed=1)


# Mixing sources by weight


def mixture(tmp_path: Path, counts: dict[str, int], weights: dict[str, float]) -> list[SourceFiles]:
    sources = []
    for name, count in counts.items():
        path = jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {index}"} for index in range(count)])
        sources.append(SourceFiles(f"file://{path}", weights[name], [path]))
    return sources


def source_of(example: dict) -> str:
    return example["text"].split()[0]


def test_a_mixture_gives_each_source_its_weighted_share_of_the_examples(tmp_path: Path) -> None:
    sources = mixture(tmp_path, {"small": 10, "large": 90}, {"small": 3, "large": 1})
    prepared = prepare_mixture("causal-lm", dataset(validationSplit=0), sources, [], seed=1)
    counts = Counter(source_of(example) for example in prepared.train)
    # 100 examples in all: 75 from the small source (every example 7 or 8 times), 25 of the large one's 90.
    assert counts == {"small": 75, "large": 25}
    small = Counter(example["text"] for example in prepared.train if source_of(example) == "small")
    assert len(small) == 10 and set(small.values()) == {7, 8}
    assert len({example["text"] for example in prepared.train if source_of(example) == "large"}) == 25
    assert [(source["examples"], source["drawn"], source["rowsRead"]) for source in prepared.report.sources] == [
        (10, 75, 10),
        (90, 25, 90),
    ]
    assert prepared.train == prepare_mixture("causal-lm", dataset(validationSplit=0), sources, [], seed=1).train


def test_a_mixture_holds_out_validation_before_repeating_and_dedupes_across_sources(tmp_path: Path) -> None:
    sources = mixture(tmp_path, {"a": 20, "b": 20}, {"a": 4, "b": 1})
    jsonl(tmp_path / "b.jsonl", [{"text": "a 0"}] + [{"text": f"b {index}"} for index in range(19)])
    prepared = prepare_mixture("causal-lm", dataset(validationSplit=0.1), sources, [], seed=3)
    assert prepared.report.duplicates == 1
    held_out = {example["text"] for example in prepared.validation}
    assert len(held_out) == 2 + 1 and not held_out & {example["text"] for example in prepared.train}
    # 36 kept (18 of each), 4 to 1: round(28.8) and round(7.2).
    assert Counter(source_of(example) for example in prepared.train) == {"a": 29, "b": 7}
