"""Property tests of the row parser: whatever a row or a file holds, it gives typed examples or a DataError."""

import json
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tunery.api.spec import Dataset
from tunery_trainer.data import ROLES, SURROGATE, DataError, prepare, shape

TASKS = ["causal-lm", "masked-lm", "sequence-classification", "token-classification"]
SPEC = Dataset.model_validate({"train": "file:///data/train.jsonl", "validationSplit": 0})
# Lone surrogates are what an undecodable byte, or a JSON "\udc80" escape, turns into.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# Values shaped nearly right, so that rows are often accepted and the accepted ones get checked.
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "tool"]), "content": SCALARS | JSON_VALUES}), max_size=4
)
VALUES = JSON_VALUES | MESSAGES | st.lists(TEXT, max_size=4)
COLUMNS = st.sampled_from(["text", "prompt", "completion", "label", "tokens", "tags", "messages"]) | TEXT
ROWS = st.dictionaries(COLUMNS, VALUES, max_size=5)
# Bytes of CSV-ish text, of any bytes at all, and of rows as jsonl.
CSV_TEXT = st.lists(
    st.sampled_from(["a", "é", ",", '"', "\n", "\r", " ", "\ufeff", "\x00", "text", "label", "messages", "tokens"])
).map("".join)
FIELDS = st.lists(st.lists(st.sampled_from(["text", "label", "tokens", "a", "", "x,y", '"']), max_size=3), max_size=5)
FILES = (
    st.binary(max_size=200)
    | CSV_TEXT.map(str.encode)
    | FIELDS.map(lambda records: "".join(",".join(fields) + "\n" for fields in records).encode())
    | JSON_VALUES.map(lambda value: json.dumps(value).encode())
    | st.lists(ROWS, max_size=4).map(lambda rows: "".join(json.dumps(row) + "\n" for row in rows).encode())
)
SETTINGS = settings(max_examples=200, deadline=None)


def is_text(value: Any) -> bool:
    return isinstance(value, str) and not SURROGATE.search(value)


def texts(value: Any) -> set[str]:
    """Every string in a row, cleaned as the parser cleans text: what an example's strings may come from."""
    if isinstance(value, str):
        return {unicodedata.normalize("NFC", value).strip()}
    if isinstance(value, int) and not isinstance(value, bool):
        return {str(value)}
    if isinstance(value, dict):
        return set().union(*(texts(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(texts(item) for item in value))
    return set()


def example_texts(example: dict[str, Any]) -> set[str]:
    """The strings of an example, roles apart (they are checked against ROLES)."""
    turns = example.get("messages", [])
    return texts({key: value for key, value in example.items() if key != "messages"}) | texts(
        [turn["content"] for turn in turns]
    )


def assert_typed(task: str, example: dict[str, Any]) -> None:
    """The example has exactly the keys and types tokenisation expects for the task."""
    if task == "token-classification":
        assert set(example) == {"tokens", "tags"} and len(example["tokens"]) == len(example["tags"])
        assert all(is_text(value) for value in example["tokens"] + example["tags"])
    elif task == "sequence-classification":
        assert set(example) == {"text", "label"} and is_text(example["text"]) and is_text(example["label"])
        assert example["label"]
    elif "messages" in example:
        assert task == "causal-lm" and set(example) == {"messages"}
        assert all(set(turn) == {"role", "content"} and turn["role"] in ROLES for turn in example["messages"])
        assert all(is_text(turn["content"]) for turn in example["messages"])
    else:
        assert set(example) in ({"text"}, {"prompt", "completion"})
        assert all(is_text(value) for value in example.values())


@SETTINGS
@given(row=ROWS)
def test_any_row_is_a_typed_example_or_a_data_error(row: dict[str, Any]) -> None:
    for task in TASKS:
        try:
            example = shape(task, SPEC, row)
        except DataError:
            continue
        assert_typed(task, example)
        # Nothing is stringified: every string of the example was a string (or an int label) of the row.
        assert example_texts(example) <= texts(row) | {""}


@SETTINGS
@given(content=FILES, data_format=st.sampled_from(["csv", "jsonl", "json", "text"]))
def test_any_file_gives_typed_examples_or_a_data_error(content: bytes, data_format: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "train"
        path.write_bytes(content)
        for task in TASKS:
            spec = SPEC.model_copy(update={"format": data_format})
            try:
                prepared = prepare(task, spec, [path], [], seed=1)
            except DataError:
                continue
            for example in prepared.train + prepared.validation:
                assert_typed(task, example)
