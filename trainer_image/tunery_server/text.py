"""Turn generated tokens into text deltas: whole characters only, cut at the first stop sequence."""

from collections.abc import Callable, Sequence


class StopText:
    """Accumulates decoded text and releases only what can no longer change or be part of a stop sequence.

    Decoding token by token splits multi-byte characters (shown as U+FFFD until complete), and a stop sequence
    may arrive over several tokens: text that could still be either is held back until the next token decides.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = [stop for stop in stops if stop]
        self._ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one more token; return the newly released text (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        full = self._decode(self._ids)
        cut = min((index for index in (full.find(stop) for stop in self._stops) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(full[:cut])
        if full.endswith("\ufffd"):
            return ""
        return self._release(full[: len(full) - self._held_back(full)])

    def finish(self) -> str:
        """The end of generation: release what was held back (a partial stop sequence is text after all)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids).rstrip("\ufffd"))

    def _held_back(self, full: str) -> int:
        """The length of the longest tail of `full` that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: str) -> str:
        # Decoding a longer sequence can re-space earlier text (some tokenizers strip a leading space); never
        # take back what was released, only add what lies beyond it.
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta
