"""The example spool: examples read back as they went in, views that share one file, pickled as spans, removed."""

import gc
import pickle
from array import array
from pathlib import Path

from tunery_trainer.spool import Spool

EXAMPLES = [
    {"text": "line\nbreak, and a line separator \u2028 too"},
    {"prompt": "Café", "completion": "ünïcödé 🙂"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"tokens": ["Acme", "Corp"], "tags": ["B-ORG", "I-ORG"]},
]


def spooled(spool: Spool, examples: list[dict]):
    starts, lengths = array("q"), array("q")
    for example in examples:
        start, length, _ = spool.add(example)
        starts.append(start)
        lengths.append(length)
    return spool.examples(starts, lengths)


def test_examples_read_back_as_they_went_in_and_views_share_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    examples = spooled(spool, EXAMPLES)
    assert spool.path.parent == tmp_path / "spool"
    assert examples == EXAMPLES and list(examples) == EXAMPLES and examples[3] == EXAMPLES[3]
    assert examples[1:3] == EXAMPLES[1:3] and examples[:0] == [] and not examples[:0]
    assert examples.take([3, 0, 3]) == [EXAMPLES[3], EXAMPLES[0], EXAMPLES[3]]
    assert examples[2:] + examples[:1] == EXAMPLES[2:] + EXAMPLES[:1]
    assert EXAMPLES[0] in examples and {"text": "elsewhere"} not in examples
    # Views are spans: the file holds each example once, one line each.
    assert spool.path.read_bytes().count(b"\n") == len(EXAMPLES)


def test_the_digest_is_of_the_canonical_example_so_key_order_does_not_matter(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.add({"prompt": "a", "completion": "b"})[2]
    assert first == spool.add({"completion": "b", "prompt": "a"})[2] != spool.add({"prompt": "b", "completion": "a"})[2]
    assert len(first) == 16


def test_a_pickled_view_is_its_spans_and_reads_the_file_itself(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    examples = spooled(spool, [{"text": "x" * 10_000} for _ in range(50)] + EXAMPLES)
    # 500 kB of examples travel to a worker as 50 spans.
    assert len(pickle.dumps(examples[:50])) < 2_000
    assert pickle.loads(pickle.dumps(examples[-4:])) == EXAMPLES


def test_the_file_goes_when_removed_or_when_the_spool_is_garbage(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spooled(spool, EXAMPLES)
    spool.remove()
    assert not spool.path.exists()
    path = Spool(tmp_path).path
    gc.collect()
    assert not path.exists() and not list(tmp_path.iterdir())
