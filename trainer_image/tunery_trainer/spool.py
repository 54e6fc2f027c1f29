"""Prepared examples spooled to a file as canonical JSON lines, and read back by byte span: disk, not memory."""

import hashlib
import json
import os
import tempfile
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


class Spool:
    """One file of examples, written once, then read by any process: Python dicts of a million rows would take
    gigabytes, a span of the file takes 16 bytes. The file is removed when the spool is garbage."""

    def __init__(self, directory: Path | None = None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix="examples-", suffix=".jsonl", dir=directory)
        self.path = Path(name)
        self._writer = os.fdopen(descriptor, "wb")
        self._reader = os.open(name, os.O_RDONLY)
        self._size = 0
        self.remove = weakref.finalize(self, _remove, self.path, self._writer, self._reader)
        """Close and delete the file now (it is deleted anyway when the spool is garbage)."""

    def add(self, example: dict[str, Any]) -> tuple[int, int, bytes]:
        """Append the example; its span (start, length) and the 16-byte digest of its canonical JSON."""
        line = json.dumps(example, sort_keys=True, ensure_ascii=False).encode(errors="surrogatepass")
        self._writer.write(line + b"\n")
        start, self._size = self._size, self._size + len(line) + 1
        return start, len(line), hashlib.blake2b(line, digest_size=16).digest()

    def examples(self, starts: array, lengths: array) -> "Examples":
        """The examples at these spans (start and length in bytes), readable from here on."""
        self._writer.flush()
        return Examples(str(self.path), starts, lengths, self)

    def read(self, start: int, length: int) -> bytes:
        return os.pread(self._reader, length, start)


def _remove(path: Path, writer: Any, reader: int) -> None:
    writer.close()
    os.close(reader)
    path.unlink(missing_ok=True)


class Examples(Sequence):
    """A list of examples in a spool, read back as dicts: slicing and `take` give views, never copies of the data.

    Pickled (to a worker process) it is its file's path and its spans, so a chunk of examples costs its spans.
    """

    def __init__(self, path: str, starts: array, lengths: array, spool: Spool | None = None) -> None:
        self._path, self._starts, self._lengths, self._spool = path, starts, lengths, spool
        self._descriptor: int | None = None

    def take(self, positions: Iterable[int]) -> "Examples":
        """The examples at these positions, in their order (repeats allowed)."""
        positions = list(positions)
        return Examples(
            self._path,
            array("q", (self._starts[position] for position in positions)),
            array("q", (self._lengths[position] for position in positions)),
            self._spool,
        )

    def __add__(self, other: "Examples") -> "Examples":
        if not isinstance(other, Examples) or other._path != self._path:
            return NotImplemented
        return Examples(self._path, self._starts + other._starts, self._lengths + other._lengths, self._spool)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Examples(self._path, self._starts[index], self._lengths[index], self._spool)
        return json.loads(self._read(self._starts[index], self._lengths[index]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start, length in zip(self._starts, self._lengths, strict=True):
            yield json.loads(self._read(start, length))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __reduce__(self):
        return Examples, (self._path, self._starts, self._lengths)

    def _read(self, start: int, length: int) -> bytes:
        if self._spool is not None:
            return self._spool.read(start, length)
        if self._descriptor is None:
            # In a worker process: a descriptor of its own, closed with this view.
            self._descriptor = os.open(self._path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._descriptor)
        return os.pread(self._descriptor, length, start)
