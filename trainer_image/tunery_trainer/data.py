"""Read and check the training data before any model is loaded: formats, columns, types, cleaning, dedupe and the split."""

import csv
import json
import random
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from tunery.api.spec import Dataset, DatasetColumns, ObjectiveType, Task
from tunery_trainer.redaction import redact
from tunery_trainer.spool import Examples, Spool

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
# failures.write_termination_message keeps this many characters (Kubernetes keeps 4096 bytes): the fix must fit.
MESSAGE_CHARS = 3500
ROLES = ("system", "user", "assistant")
# Files are decoded with surrogateescape, so an undecodable byte reads as a lone surrogate in its own row only.
SURROGATE = re.compile("[\ud800-\udfff]")
COLUMNS_FIX = "check dataset.columns and dataset.format"


class DataError(Exception):
    """A data problem the user must fix, naming the file, row or field; reported as reason DataError."""

    reason = "DataError"

    def __init__(self, problem: str, fix: str = "") -> None:
        self.message = _fitted(redact(problem), redact(fix))
        super().__init__(self.message)


class BadRow(DataError):
    """One row the task cannot use: counted in the report, and the run goes on."""


def _fitted(problem: str, fix: str) -> str:
    """The problem, cut short where needed so that it and the fix fit the termination message."""
    suffix = f": {fix}" if fix else ""
    room = MESSAGE_CHARS - len(suffix)
    return (problem if len(problem) <= room else problem[: room - 1] + "…") + suffix


@dataclass
class DataReport:
    """What happened to the rows: kept, dropped and why, with the first problems verbatim."""

    rows_read: int = 0
    bad_rows: Counter = field(default_factory=Counter)
    empty_rows: int = 0
    duplicates: int = 0
    first_problems: list[str] = field(default_factory=list)
    # Per source of a mixture: its URI, rows read, examples it holds after dedupe and split, and examples drawn.
    sources: list[dict[str, Any]] = field(default_factory=list)

    def note(self, problem: str, where: str) -> None:
        self.bad_rows[problem] += 1
        if len(self.first_problems) < 5:
            self.first_problems.append(f"{where}: {problem}")


@dataclass
class PreparedData:
    """Examples in a task-specific shape, spooled to disk, ready for tokenisation."""

    train: Examples
    validation: Examples
    report: DataReport
    spool: Spool
    label_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceFiles:
    """One training source's local files, and its weight in the mixture."""

    uri: str
    weight: float
    files: list[Path]


def prepare(
    task: Task,
    dataset: Dataset,
    train_files: list[Path],
    validation_files: list[Path],
    seed: int,
    spool_directory: Path | None = None,
    objective: ObjectiveType = "sft",
) -> PreparedData:
    """Read, check, clean, dedupe and split one training source; raise DataError for anything that must stop the run."""
    source = SourceFiles(dataset.train or "", 1.0, train_files)
    return prepare_mixture(task, dataset, [source], validation_files, seed, spool_directory, objective)


def prepare_mixture(
    task: Task,
    dataset: Dataset,
    sources: list[SourceFiles],
    validation_files: list[Path],
    seed: int,
    spool_directory: Path | None = None,
    objective: ObjectiveType = "sft",
) -> PreparedData:
    """Read, check, clean, dedupe (across the sources) and split each source, then mix the sources by weight.

    Each source's validation share is held out before mixing, so no example repeated for its weight can also be
    a validation example. The examples go to a spool file in `spool_directory` (the system's temporary directory
    by default). Objectives dpo and orpo read preference pairs: a prompt (or messages), chosen and rejected.
    """
    report = DataReport()
    spool = Spool(spool_directory)
    seen: set[bytes] = set()
    parts = []
    for source in sources:
        rows_before = report.rows_read
        examples, digests = _examples(task, objective, dataset, source.files, report, spool)
        parts.append(_dedupe(examples, digests, report, seen) if dataset.dedupe else examples)
        report.sources.append({"uri": source.uri, "rowsRead": report.rows_read - rows_before})
    validation = (
        _examples(task, objective, dataset, validation_files, report, spool)[0] if validation_files else parts[0][:0]
    )
    if not validation and dataset.validation_split > 0:
        held_out = [_split(examples, dataset.validation_split, seed) for examples in parts]
        parts = [kept for kept, _ in held_out]
        validation = _joined([out for _, out in held_out])
    train = parts[0] if len(parts) == 1 else _mixed(parts, [source.weight for source in sources], seed, report)
    return PreparedData(train, validation, report, spool, _label_names(task, train, validation))


def _joined(parts: list[Examples]) -> Examples:
    joined = parts[0]
    for part in parts[1:]:
        joined += part
    return joined


def _split(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(kept, held out): a seeded fraction held out, at least one, when there are two examples or more."""
    if len(examples) < 2:
        return examples, examples[:0]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, int(len(examples) * fraction))
    return examples.take(order[count:]), examples.take(order[:count])


def _mixed(parts: list[Examples], weights: list[float], seed: int, report: DataReport) -> Examples:
    """As many examples as the sources hold together, each source's share by its weight: whole seeded passes over
    a source while its share exceeds what it holds, then a seeded part of one more pass."""
    total = sum(map(len, parts))
    mixed = []
    for number, (examples, weight, source) in enumerate(zip(parts, weights, report.sources, strict=True)):
        share = max(1, round(total * weight / sum(weights))) if examples else 0
        generator = random.Random(seed * 1_000_003 + number)
        drawn: list[int] = []
        while len(drawn) < share:
            order = list(range(len(examples)))
            generator.shuffle(order)
            drawn += order[: share - len(drawn)]
        mixed.append(examples.take(drawn))
        source |= {"examples": len(examples), "drawn": share}
    return _joined(mixed)


def _examples(
    task: Task, objective: ObjectiveType, dataset: Dataset, files: list[Path], report: DataReport, spool: Spool
) -> tuple[Examples, bytes]:
    """The files' usable examples, spooled, with the 16-byte digests of their canonical JSON, end to end."""
    starts, lengths, digests = array("q"), array("q"), bytearray()
    seen_columns: set[str] = set()
    for path in files:
        for row_number, row in _rows(path, dataset.format):
            report.rows_read += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                seen_columns.update(row)
                example = shape(task, dataset, row, objective)
            except BadRow as bad:
                report.note(bad.message, f"{path.name} row {row_number}")
                continue
            if not any(example.values()):
                report.empty_rows += 1
                continue
            start, length, digest = spool.add(example)
            starts.append(start)
            lengths.append(length)
            digests += digest
    bad = sum(report.bad_rows.values())
    names = quoted([path.name for path in files])
    if not starts:
        problem = report.first_problems[0] if report.first_problems else "every row is empty after cleaning"
        hint = f"; the data has columns {quoted(sorted(seen_columns))}" if seen_columns else ""
        raise DataError(f"{names}: no usable example ({problem}){hint}", COLUMNS_FIX)
    if report.rows_read and bad / report.rows_read > MAX_BAD_FRACTION:
        raise DataError(
            f"{names}: {bad} of {report.rows_read} rows are bad, first: {'; '.join(report.first_problems)}; "
            f"the data has columns {quoted(sorted(seen_columns))}",
            COLUMNS_FIX,
        )
    return spool.examples(starts, lengths), bytes(digests)


def _rows(path: Path, declared_format: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    data_format = declared_format if declared_format != "auto" else SUFFIX_FORMATS.get(path.suffix.lower(), "jsonl")
    try:
        if data_format == "parquet":
            yield from enumerate(pq.read_table(path).to_pylist(), start=1)
            return
        # utf-8-sig: a byte order mark would otherwise stick to the first column name or the first row.
        with path.open(
            encoding="utf-8-sig", errors="surrogateescape", newline="" if data_format == "csv" else None
        ) as stream:
            yield from _records(stream, data_format)
    except (OSError, ValueError, RecursionError, csv.Error) as exc:
        raise DataError(f"{path.name}: cannot be read as {data_format} ({exc})", "check dataset.format") from exc


def _records(stream: IO[str], data_format: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """The rows of a text file by number, each a dict of columns or the BadRow it is."""
    if data_format == "jsonl":
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, _as_row(_json(line))
    elif data_format == "json":
        content = json.loads(stream.read())
        if isinstance(content, dict):
            content = content.get("data", [content])
        for number, record in enumerate(content if isinstance(content, list) else [content], start=1):
            yield number, _as_row(record)
    elif data_format == "csv":
        yield from _csv(stream)
    else:
        for number, line in enumerate(stream, start=1):
            yield number, {"text": line.rstrip("\n")}


def _csv(stream: IO[str]) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """Rows by record number (the header is row 1); a row that does not match the header is bad, not fatal."""
    reader = csv.reader(stream)
    header = next(reader, [])
    for number, fields in enumerate(_csv_records(reader), start=2):
        if isinstance(fields, BadRow):
            yield number, fields
        elif len(fields) != len(header):
            yield number, BadRow(f"unreadable ({len(fields)} fields, the header has {len(header)})")
        else:
            yield number, dict(zip(header, fields, strict=True))


def _csv_records(reader: Iterator[list[str]]) -> Iterator[list[str] | BadRow]:
    """Each record's fields, or its csv error; blank lines are skipped, as csv.DictReader does."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader goes on with the next record, so one broken record spoils only itself.
            yield BadRow(f"unreadable ({exc})")
            continue
        if fields:
            yield fields


def _json(line: str) -> Any:
    """The line's JSON value, or the BadRow saying why it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(f"unreadable (not JSON: {exc.msg})")
    except (ValueError, RecursionError) as exc:
        # Numbers past Python's digit limit, or nesting deeper than the recursion limit.
        return BadRow(f"unreadable (not JSON: {exc})")


def _as_row(value: Any) -> dict[str, Any] | BadRow:
    if isinstance(value, BadRow | dict):
        return value
    return BadRow(f"unreadable (expected an object with columns, got {type(value).__name__})")


def shape(task: Task, dataset: Dataset, row: dict[str, Any], objective: ObjectiveType = "sft") -> dict[str, Any]:
    """The example in the shape and types the task needs; BadRow when the row does not have them."""
    columns = dataset.columns
    if objective != "sft":
        return _pair(row, columns)
    if task == "token-classification":
        tokens, tags = _strings(row, columns.tokens), _tags(row, columns.tags)
        if len(tokens) != len(tags):
            raise BadRow(f"{len(tokens)} tokens but {len(tags)} tags")
        return {"tokens": tokens, "tags": tags}
    if task == "sequence-classification":
        if columns.text not in row:
            raise BadRow(f"needs columns {columns.text!r} and {columns.label!r}")
        return {"text": _text(row, columns.text), "label": _label(row, columns.text, columns.label)}
    if task == "causal-lm" and columns.messages and row.get(columns.messages) is not None:
        return _chat(row[columns.messages], columns.messages)
    if task == "causal-lm" and columns.prompt and columns.completion and columns.prompt in row:
        if columns.completion not in row:
            raise BadRow(f"has {columns.prompt!r} but no {columns.completion!r}")
        return {"prompt": _text(row, columns.prompt), "completion": _text(row, columns.completion)}
    if columns.text in row:
        return {"text": _text(row, columns.text)}
    wanted = (
        [name for name in (columns.messages, columns.prompt, columns.text) if name]
        if task == "causal-lm"
        else [columns.text]
    )
    raise BadRow(f"has none of the columns {wanted}")


def _pair(row: dict[str, Any], columns: DatasetColumns) -> dict[str, Any]:
    """A preference pair: the prompt (text, or the shared messages) with its chosen and rejected completions."""
    for column in (columns.chosen, columns.rejected):
        if row.get(column) is None:
            raise BadRow(f"a preference pair needs columns {columns.chosen!r} and {columns.rejected!r}: no {column!r}")
    chosen, rejected = _reply(row, columns.chosen), _reply(row, columns.rejected)
    for column, reply in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not reply:
            raise BadRow(f"column {column!r} is empty: a pair needs two completions")
    if chosen == rejected:
        raise BadRow(f"columns {columns.chosen!r} and {columns.rejected!r} are identical: the pair prefers nothing")
    prompt = row.get(columns.prompt) if columns.prompt else None
    # TRL's conversational pairs keep the shared turns under prompt; Tunery's chat data under messages.
    column = columns.prompt if isinstance(prompt, list) else columns.messages
    messages = row.get(column) if column else None
    if messages is not None:
        turns = _chat(messages, column, learns=False)["messages"]
        if not turns or turns[-1]["role"] == "assistant":
            raise BadRow("the shared messages must end with a user or system turn: chosen and rejected are the reply")
        return {"messages": turns, "chosen": chosen, "rejected": rejected}
    if prompt is None:
        raise BadRow(f"a preference pair needs a prompt: column {columns.prompt!r} or {columns.messages!r}")
    return {"prompt": _text(row, columns.prompt), "chosen": chosen, "rejected": rejected}


def _reply(row: dict[str, Any], column: str) -> str:
    """A completion: text, or the assistant's turn (alone, or as a one-turn list, as TRL's conversational pairs)."""
    value = row[column]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        turn = _turn(value, column)
        if turn["role"] != "assistant":
            raise BadRow(f"column {column!r} holds a {turn['role']} turn, expected the assistant's reply")
        return turn["content"]
    return _clean(value, f"column {column!r}", "text or an assistant turn")


def _text(row: dict[str, Any], column: str) -> str:
    """The column's text, cleaned; a missing or null value is empty (and the row then counts as empty)."""
    value = row.get(column)
    return "" if value is None else _clean(value, f"column {column!r}")


def _label(row: dict[str, Any], text_column: str, column: str) -> str:
    """A string label, or an int label as its decimal string; bools and floats are not labels."""
    value = row.get(column)
    label = "" if value is None else _class_name(value, f"column {column!r}")
    if not label:
        raise BadRow(f"needs columns {text_column!r} and {column!r}")
    return label


def _strings(row: dict[str, Any], column: str) -> list[str]:
    """The column's list of strings, each cleaned."""
    values = row.get(column)
    if not isinstance(values, list):
        raise BadRow(f"column {column!r} holds {_kind(values)}, expected a list of strings")
    return [_clean(value, f"an item of column {column!r}") for value in values]


def _tags(row: dict[str, Any], column: str) -> list[str]:
    """The column's tags: strings, or int class ids (as CoNLL-style exports store them) as their decimal strings."""
    values = row.get(column)
    if not isinstance(values, list):
        raise BadRow(f"column {column!r} holds {_kind(values)}, expected a list of tags (strings or integers)")
    return [_class_name(value, f"an item of column {column!r}") for value in values]


def _class_name(value: Any, where: str) -> str:
    """A label or tag: text, cleaned, or an int class id as its decimal string; bools and floats are not classes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _clean(value, where, "text or an integer")


def _chat(messages: Any, column: str, learns: bool = True) -> dict[str, Any]:
    """Column `column`'s conversation of {role, content} turns, with an assistant turn to learn from if it `learns`."""
    if not isinstance(messages, list):
        raise BadRow(f"column {column!r} holds {_kind(messages)}, expected a list of {{role, content}} messages")
    turns = [_turn(message, column) for message in messages]
    if learns and not any(turn["role"] == "assistant" and turn["content"] for turn in turns):
        raise BadRow("a conversation without an assistant turn has nothing to learn")
    return {"messages": turns}


def _turn(message: Any, column: str) -> dict[str, str]:
    """One message as {role, content}, its content cleaned text (null is empty)."""
    if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
        raise BadRow("messages must be {role: system|user|assistant, content} objects")
    content = message["content"]
    what = f"a message's content in column {column!r}"
    return {"role": message["role"], "content": "" if content is None else _clean(content, what)}


def _clean(value: Any, what: str, expected: str = "text") -> str:
    """The value NFC-normalised and stripped, if it is text: nothing is stringified into training data."""
    if not isinstance(value, str):
        raise BadRow(f"{what} holds {_kind(value)}, expected {expected}")
    if SURROGATE.search(value):
        raise BadRow(f"{what} is not UTF-8 text")
    return unicodedata.normalize("NFC", value).strip()


def _kind(value: Any) -> str:
    """A value's type as a message names it: 'a dict', 'an int', 'null'."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _dedupe(examples: Examples, digests: bytes, report: DataReport, seen: set[bytes]) -> Examples:
    """The examples whose digest was not `seen` before (in these or an earlier source's), in order."""
    # 16-byte digests, not the examples' text: a million rows cost tens of megabytes to remember.
    kept = []
    for position in range(len(examples)):
        key = digests[16 * position : 16 * position + 16]
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        kept.append(position)
    return examples if len(kept) == len(examples) else examples.take(kept)


def _label_names(task: Task, train: Examples, validation: Examples) -> list[str]:
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
            f"known labels are {quoted(known)}",
            "add training examples for them or fix the labels",
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
