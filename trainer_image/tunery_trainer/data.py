"""Read and check the training data before any model is loaded: formats, columns, cleaning, dedupe and the split."""

import csv
import json
import random
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tunery.api.spec import Dataset, Task
from tunery_trainer.redaction import redact

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
# More bad rows than this fraction is not noise but the wrong file or the wrong column mapping.
MAX_BAD_FRACTION = 0.5
# Data can be anything (a file of credentials, megabytes on one line): messages quote bounded excerpts of it.
EXCERPT_CHARS = 60
EXCERPT_VALUES = 5


class DataError(Exception):
    """A data problem the user must fix, naming the file, row or field; reported as reason DataError."""

    reason = "DataError"

    def __init__(self, message: str) -> None:
        self.message = redact(message)
        super().__init__(self.message)


@dataclass
class DataReport:
    """What happened to the rows: kept, dropped and why, with the first problems verbatim."""

    rows_read: int = 0
    bad_rows: Counter = field(default_factory=Counter)
    empty_rows: int = 0
    duplicates: int = 0
    first_problems: list[str] = field(default_factory=list)

    def note(self, problem: str, where: str) -> None:
        self.bad_rows[problem] += 1
        if len(self.first_problems) < 5:
            self.first_problems.append(f"{where}: {problem}")


@dataclass
class PreparedData:
    """Examples in a task-specific shape, ready for tokenisation."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    report: DataReport
    label_names: list[str] = field(default_factory=list)


def prepare(
    task: Task, dataset: Dataset, train_files: list[Path], validation_files: list[Path], seed: int
) -> PreparedData:
    """Read, check, clean, dedupe and split; raise DataError for anything that must stop the run."""
    report = DataReport()
    train = _examples(task, dataset, train_files, report)
    validation = _examples(task, dataset, validation_files, report) if validation_files else []
    if dataset.dedupe:
        train = _dedupe(train, report)
    if not validation and dataset.validation_split > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held_out = max(1, int(len(train) * dataset.validation_split))
        validation = [train[index] for index in order[:held_out]]
        train = [train[index] for index in order[held_out:]]
    return PreparedData(train, validation, report, _label_names(task, train, validation))


def _examples(task: Task, dataset: Dataset, files: list[Path], report: DataReport) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = []
    seen_columns: set[str] = set()
    for path in files:
        for row_number, row in _rows(path, dataset.format):
            report.rows_read += 1
            where = f"{path.name} row {row_number}"
            if isinstance(row, Exception):
                report.note(f"unreadable ({row})", where)
                continue
            seen_columns.update(row)
            example = _shape(task, dataset, row, report, where)
            if example is None:
                continue
            if not any(example.values()):
                report.empty_rows += 1
                continue
            examples.append(example)
    bad = sum(report.bad_rows.values())
    names = ", ".join(path.name for path in files)
    if not examples:
        problem = report.first_problems[0] if report.first_problems else "every row is empty after cleaning"
        hint = f"; the data has columns {quoted(sorted(seen_columns))}" if seen_columns else ""
        raise DataError(f"{names}: no usable example ({problem}){hint}: check dataset.columns and dataset.format")
    if report.rows_read and bad / report.rows_read > MAX_BAD_FRACTION:
        raise DataError(
            f"{names}: {bad} of {report.rows_read} rows are bad, first: {'; '.join(report.first_problems)}; "
            f"the data has columns {quoted(sorted(seen_columns))}: check dataset.columns and dataset.format"
        )
    return examples


def _rows(path: Path, declared_format: str) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    data_format = declared_format if declared_format != "auto" else SUFFIX_FORMATS.get(path.suffix.lower(), "jsonl")
    try:
        if data_format == "jsonl":
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        yield number, _as_row(_json(line))
        elif data_format == "json":
            content = json.loads(path.read_text(encoding="utf-8"))
            records = content if isinstance(content, list) else content.get("data", [content])
            for number, record in enumerate(records, start=1):
                yield number, _as_row(record)
        elif data_format == "csv":
            with path.open(encoding="utf-8", newline="") as stream:
                for number, record in enumerate(csv.DictReader(stream), start=2):
                    yield number, record
        elif data_format == "parquet":
            for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield number, record
        else:
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    yield number, {"text": line.rstrip("\n")}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise DataError(f"{path.name}: cannot be read as {data_format} ({exc}): check dataset.format") from exc


def _json(line: str) -> dict[str, Any] | Exception:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return ValueError(f"not JSON: {exc.msg}")


def _as_row(value: Any) -> dict[str, Any] | Exception:
    if isinstance(value, Exception | dict):
        return value
    return ValueError(f"expected an object with columns, got {type(value).__name__}")


def _clean(value: Any) -> str:
    return unicodedata.normalize("NFC", str(value)).strip() if value is not None else ""


def _shape(task: Task, dataset: Dataset, row: dict[str, Any], report: DataReport, where: str) -> dict[str, Any] | None:
    """The example in the shape the task needs, or None (counted) when the row does not have it."""
    columns = dataset.columns
    if task == "token-classification":
        tokens, tags = row.get(columns.tokens), row.get(columns.tags)
        if not isinstance(tokens, list) or not isinstance(tags, list):
            report.note(f"needs list columns {columns.tokens!r} and {columns.tags!r}", where)
            return None
        if len(tokens) != len(tags):
            report.note(f"{len(tokens)} tokens but {len(tags)} tags", where)
            return None
        return {"tokens": [_clean(token) for token in tokens], "tags": [_clean(tag) for tag in tags]}
    if task == "sequence-classification":
        if columns.text not in row or columns.label not in row or row[columns.label] in (None, ""):
            report.note(f"needs columns {columns.text!r} and {columns.label!r}", where)
            return None
        return {"text": _clean(row[columns.text]), "label": _clean(row[columns.label])}
    if task == "causal-lm" and columns.messages and isinstance(row.get(columns.messages), list):
        return _chat(row[columns.messages], report, where)
    if task == "causal-lm" and columns.prompt and columns.completion and columns.prompt in row:
        if columns.completion not in row:
            report.note(f"has {columns.prompt!r} but no {columns.completion!r}", where)
            return None
        return {"prompt": _clean(row[columns.prompt]), "completion": _clean(row[columns.completion])}
    if columns.text in row:
        return {"text": _clean(row[columns.text])}
    wanted = (
        [name for name in (columns.messages, columns.prompt, columns.text) if name]
        if task == "causal-lm"
        else [columns.text]
    )
    report.note(f"has none of the columns {wanted}", where)
    return None


def _chat(messages: list[Any], report: DataReport, where: str) -> dict[str, Any] | None:
    turns = []
    for turn in messages:
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ("system", "user", "assistant")
            or "content" not in turn
        ):
            report.note("messages must be {role: system|user|assistant, content} objects", where)
            return None
        turns.append({"role": turn["role"], "content": _clean(turn["content"])})
    if not any(turn["role"] == "assistant" and turn["content"] for turn in turns):
        report.note("a conversation without an assistant turn has nothing to learn", where)
        return None
    return {"messages": turns}


def _dedupe(examples: list[dict[str, Any]], report: DataReport) -> list[dict[str, Any]]:
    seen: set[str] = set()
    kept = []
    for example in examples:
        key = json.dumps(example, sort_keys=True, ensure_ascii=False)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        kept.append(example)
    return kept


def _label_names(task: Task, train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> list[str]:
    """The label map, from the training data; a validation label never seen in training is an error."""
    if task == "sequence-classification":
        known = sorted({example["label"] for example in train})
        unknown = sorted({example["label"] for example in validation} - set(known))
    elif task == "token-classification":
        known = sorted({tag for example in train for tag in example["tags"]})
        unknown = sorted({tag for example in validation for tag in example["tags"]} - set(known))
    else:
        return []
    if unknown:
        raise DataError(
            f"validation data has labels the training data never shows: {quoted(unknown)}; "
            f"known labels are {quoted(known)}: "
            "add training examples for them or fix the labels"
        )
    if len(known) < 2:
        raise DataError(f"classification needs at least two labels in the training data, found {quoted(known)}")
    return known


def quoted(values: list[Any]) -> str:
    """Data values as a message quotes them: the first few, each redacted and then cut short."""
    shown = []
    for value in values[:EXCERPT_VALUES]:
        # Redacted before cutting: a cut secret would no longer be recognised.
        text = redact(str(value))
        shown.append(repr(text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"))
    more = f", and {len(values) - EXCERPT_VALUES} more" if len(values) > EXCERPT_VALUES else ""
    return f"[{', '.join(shown)}{more}]"
