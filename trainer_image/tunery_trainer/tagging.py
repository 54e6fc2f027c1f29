"""Token-classification tag schemes: the entities a sentence's IOB2, IOB1, BIOES, BILOU or plain type tags mark."""

from collections.abc import Sequence

OUTSIDE = "O"
# BILOU's Last and Unit play the roles of BIOES's End and Single, so one set of chunking rules serves both schemes.
POSITIONS = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}
PLAIN = ""


def entity_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities (type, start, end-exclusive) in one sentence's tags, in order (seqeval's lenient rules)."""
    chunks: list[tuple[str, int, int]] = []
    start = 0
    previous = (OUTSIDE, "")
    # A trailing OUTSIDE closes an entity that runs to the end of the sentence.
    for index, tag in enumerate([*tags, OUTSIDE]):
        current = _position_and_type(tag)
        if _continues_entity(previous, current):
            continue
        if previous[0] != OUTSIDE:
            chunks.append((previous[1], start, index))
        start, previous = index, current
    return chunks


def _position_and_type(tag: str) -> tuple[str, str]:
    """(position, entity type): position is B, I, E, S, OUTSIDE, or PLAIN for a tag that is only a type."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    if len(tag) > 1 and tag[0] in POSITIONS and tag[1] in "-_":
        return POSITIONS[tag[0]], tag[2:]
    return PLAIN, tag


def _continues_entity(previous: tuple[str, str], current: tuple[str, str]) -> bool:
    """Whether current extends the entity previous belongs to; otherwise that entity ends before current."""
    (previous_position, previous_type), (current_position, current_type) = previous, current
    if previous_type != current_type:
        return False
    if current_position in ("I", "E"):
        return previous_position in ("B", "I")
    return current_position == PLAIN and previous_position == PLAIN
