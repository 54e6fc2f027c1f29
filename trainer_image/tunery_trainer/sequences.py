"""Token sequences stored flat, in int32 arrays with offsets: a million short sequences take megabytes, not gigabytes."""

from array import array
from collections.abc import Sequence
from typing import Any


class Sequences(Sequence):
    """A list of tokenised sequences (`input_ids`, and `labels` per token or one class `label`), read back as dicts.

    Python lists would hold every token as a 28-byte int object behind an 8-byte pointer; here a token costs 4 bytes
    (8 with per-token labels), and a chunk tokenised in a worker process comes back as a few flat buffers.
    """

    def __init__(self) -> None:
        self._fields: tuple[str, ...] = ()
        self._ids = array("i")
        self._labels = array("i")
        self._classes = array("i")
        self._ends = array("q")

    def append(self, sequence: dict[str, Any]) -> None:
        self._fields = self._fields or tuple(sequence)
        self._ids.extend(sequence["input_ids"])
        if "labels" in sequence:
            self._labels.extend(sequence["labels"])
        if "label" in sequence:
            self._classes.append(sequence["label"])
        self._ends.append(len(self._ids))

    def extend(self, other: "Sequences") -> None:
        self._fields = self._fields or other._fields
        offset = len(self._ids)
        self._ids.extend(other._ids)
        self._labels.extend(other._labels)
        self._classes.extend(other._classes)
        self._ends.extend(end + offset for end in other._ends)

    @property
    def tokens(self) -> int:
        """Tokens over all the sequences."""
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        end = self._ends[index]
        start = self._ends[index - 1] if index > 0 else 0
        item: dict[str, Any] = {"input_ids": self._ids[start:end].tolist()}
        if "labels" in self._fields:
            item["labels"] = self._labels[start:end].tolist()
        if "label" in self._fields:
            item["label"] = self._classes[index]
        return item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)
