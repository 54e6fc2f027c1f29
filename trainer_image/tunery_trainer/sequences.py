"""Token sequences stored flat, in int32 arrays with offsets: a million short sequences take megabytes, not gigabytes."""

from array import array
from collections.abc import Sequence
from typing import Any

# The label of a token that carries no loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
# A token's flag in a sequence's `learned` bytes: it is its own label.
LEARNED = b"\x01"


class Sequences(Sequence):
    """A list of tokenised sequences (`input_ids`, and `labels` per token or one class `label`), read back as dicts.

    Python lists would hold every token as a 28-byte int object behind an 8-byte pointer; here a token costs 4 bytes,
    and a chunk tokenised in a worker process comes back as a few flat buffers. A language model's labels are its
    ids with IGNORE_INDEX where no loss is wanted, so a sequence may give them as `learned` bytes (LEARNED where the
    token is its own label): one byte a token, not four.
    """

    def __init__(self) -> None:
        self._fields: tuple[str, ...] = ()
        self._ids = array("i")
        self._labels = array("i")
        self._learned = bytearray()
        self._classes = array("i")
        self._ends = array("q")

    def append(self, sequence: dict[str, Any]) -> None:
        self._fields = self._fields or tuple(sequence)
        self._ids.extend(sequence["input_ids"])
        if "labels" in sequence:
            self._labels.extend(sequence["labels"])
        if "learned" in sequence:
            self._learned += sequence["learned"]
        if "label" in sequence:
            self._classes.append(sequence["label"])
        self._ends.append(len(self._ids))

    def extend(self, other: "Sequences") -> None:
        self._fields = self._fields or other._fields
        offset = len(self._ids)
        self._ids.extend(other._ids)
        self._labels.extend(other._labels)
        self._learned += other._learned
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
        index = _position(index, len(self))
        end = self._ends[index]
        start = self._ends[index - 1] if index > 0 else 0
        ids = self._ids[start:end].tolist()
        item: dict[str, Any] = {"input_ids": ids}
        if "labels" in self._fields:
            item["labels"] = self._labels[start:end].tolist()
        if "learned" in self._fields:
            learned = self._learned[start:end]
            item["labels"] = (
                list(ids)
                if 0 not in learned
                else [token if flag else IGNORE_INDEX for token, flag in zip(ids, learned, strict=True)]
            )
        if "label" in self._fields:
            item["label"] = self._classes[index]
        return item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


class Pairs(Sequence):
    """Preference pairs over Sequences that hold each pair's chosen sequence and then its rejected one, read back as
    {chosen, rejected} dicts, with `reference`: both sequences' log-probabilities under the base model, once known."""

    def __init__(self, sequences: Sequences, reference: Any = None) -> None:
        self.sequences = sequences
        self.reference = reference

    def with_reference(self, reference: Any) -> "Pairs":
        """The same pairs with the base model's log-probabilities, one (chosen, rejected) row per pair."""
        if len(reference) != len(self):
            raise ValueError(f"{len(reference)} reference rows for {len(self)} pairs")
        return Pairs(self.sequences, reference)

    @property
    def tokens(self) -> int:
        """Tokens over both sides of every pair."""
        return self.sequences.tokens

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        index = _position(index, len(self))
        item = {"chosen": self.sequences[2 * index], "rejected": self.sequences[2 * index + 1]}
        if self.reference is not None:
            item["reference"] = self.reference[index]
        return item


def _position(index: int, length: int) -> int:
    """A list index (negative from the end) as a position in range(length), or IndexError."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(index)
    return position
