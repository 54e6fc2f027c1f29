"""Token ids and labels: completion-only loss for prompts and chats, tag alignment to word pieces, batching."""

from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from test_spool import spooled
from tiny_models import decoder, minilm_path, sentences

from tunery_trainer import tokenization
from tunery_trainer.sequences import Sequences
from tunery_trainer.spool import Spool
from tunery_trainer.tokenization import CHARS_PER_TOKEN, DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, tokenize

# What the ChatML template puts after every message; an assistant turn's loss may cover it (it ends the turn).
END_OF_TURN = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama's byte-level BPE, as the trainer loads it for causal-lm: with the default chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder(tmp_path_factory.mktemp("decoder")))
    assert tokenizer.chat_template is None
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def wordpiece() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def one(task: str, tokenizer: Any, example: dict[str, Any], max_length: int = 512, labels=()) -> dict[str, Any]:
    data = tokenize(task, tokenizer, [example], [], max_length, labels)
    assert len(data.train) == 1 and data.truncated == 0
    return data.train[0]


def labelled_runs(tokenizer: Any, sequence: dict[str, list[int]]) -> list[str]:
    """The text of each maximal run of tokens that carries a loss."""
    runs = []
    for has_loss, group in groupby(
        zip(sequence["input_ids"], sequence["labels"], strict=True), lambda pair: pair[1] != IGNORE_INDEX
    ):
        pairs = list(group)
        if has_loss:
            assert all(token == label for token, label in pairs), "a labelled token must be its own target"
            runs.append(tokenizer.decode([token for token, _ in pairs]))
    return runs


# Prompt and completion


def test_prompt_carries_no_loss_and_completion_is_learnt_through_eos(tokenizer: Any) -> None:
    prompt = "what colour is the sky?"
    sequence = one("causal-lm", tokenizer, {"prompt": prompt, "completion": "blue"})
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids, labels = sequence["input_ids"], sequence["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert len(ids) > len(prompt_ids) + 1
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[len(prompt_ids) : -1]).strip() == "blue"


def test_prompt_completion_truncation_keeps_a_single_completion_token_and_drops_none_left(tokenizer: Any) -> None:
    example = {"prompt": "what colour is the sky?", "completion": "blue sky"}
    prompt_length = len(tokenizer(example["prompt"])["input_ids"])

    kept = tokenize("causal-lm", tokenizer, [example], [], prompt_length + 1, [])
    assert kept.truncated == 1
    (sequence,) = kept.train
    assert len(sequence["input_ids"]) == prompt_length + 1
    assert [label for label in sequence["labels"] if label != IGNORE_INDEX] == sequence["input_ids"][-1:]

    dropped = tokenize("causal-lm", tokenizer, [example], [example], prompt_length, [])
    assert dropped.train == [] and dropped.validation == []
    assert dropped.truncated == 2


# Chat


def test_chat_labels_exactly_the_assistant_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "answer with a colour"},
        {"role": "user", "content": "what colour is the sky?"},
        {"role": "assistant", "content": "blue"},
    ]
    sequence = one("causal-lm", tokenizer, {"messages": messages})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert sequence["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert labelled_runs(tokenizer, sequence) == ["blue" + END_OF_TURN]
    # Everything up to and including the assistant header is context.
    header = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    unlabelled = [
        token for token, label in zip(sequence["input_ids"], sequence["labels"], strict=True) if label == IGNORE_INDEX
    ]
    assert tokenizer.decode(unlabelled) == header


def test_chat_labels_every_assistant_turn_and_no_user_text(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "what colour is the sky?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and the grass?"},
        {"role": "assistant", "content": "green ."},
    ]
    sequence = one("causal-lm", tokenizer, {"messages": messages})
    runs = labelled_runs(tokenizer, sequence)
    assert runs == ["blue" + END_OF_TURN, "green ." + END_OF_TURN]
    assert not any(word in "".join(runs) for word in ("sky", "grass", "user", "assistant"))


def test_chat_labels_by_position_not_by_text(tokenizer: Any) -> None:
    """A user turn with the assistant's words must stay unlabelled: the spans come from the template, not a search."""
    messages = [
        {"role": "user", "content": "blue"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "blue"},
    ]
    sequence = one("causal-lm", tokenizer, {"messages": messages})
    assert labelled_runs(tokenizer, sequence) == ["blue" + END_OF_TURN]
    first_assistant = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prefix = len(tokenizer(first_assistant, add_special_tokens=False)["input_ids"])
    assert set(sequence["labels"][:prefix]) == {IGNORE_INDEX}
    assert sequence["labels"][-1] == IGNORE_INDEX


def test_chat_without_an_assistant_turn_is_dropped(tokenizer: Any) -> None:
    data = tokenize("causal-lm", tokenizer, [{"messages": [{"role": "user", "content": "hello"}]}], [], 512, [])
    assert data.train == []


# Plain text


def test_text_learns_every_token_and_ends_with_eos(tokenizer: Any) -> None:
    sequence = one("causal-lm", tokenizer, {"text": "two apple is red ."})
    assert sequence["labels"] == sequence["input_ids"]
    assert sequence["input_ids"] == tokenizer("two apple is red .")["input_ids"] + [tokenizer.eos_token_id]


def test_text_truncation_is_counted_over_train_and_validation(tokenizer: Any) -> None:
    short, long = {"text": "red"}, {"text": "one apple is red . two sky is blue . three grass is green ."}
    data = tokenize("causal-lm", tokenizer, [short, long], [long], 6, [])
    assert data.truncated == 2
    assert [len(sequence["input_ids"]) for sequence in data.train] == [2, 6]
    assert [len(sequence["input_ids"]) for sequence in data.validation] == [6]
    truncated = data.train[1]
    assert truncated["input_ids"] == tokenizer(long["text"])["input_ids"][:6]
    assert truncated["labels"] == truncated["input_ids"]


def test_text_truncated_to_one_token_is_dropped(tokenizer: Any) -> None:
    """A lone token predicts nothing."""
    data = tokenize("causal-lm", tokenizer, [{"text": "one apple is red ."}], [], 1, [])
    assert data.train == [] and data.truncated == 1


# Classification and masked LM


def test_token_classification_tags_the_first_word_piece_only(wordpiece: Any) -> None:
    words = ["Tunery", "learns", "photosynthesis"]
    assert wordpiece.tokenize("Tunery") == ["tune", "##ry"]
    assert wordpiece.tokenize("learns") == ["learns"]
    assert wordpiece.tokenize("photosynthesis") == ["photos", "##yn", "##thesis"]
    labels = ["O", "B-ORG", "B-MISC"]
    sequence = one(
        "token-classification", wordpiece, {"tokens": words, "tags": ["B-ORG", "O", "B-MISC"]}, labels=labels
    )
    tokens = wordpiece.convert_ids_to_tokens(sequence["input_ids"])
    assert tokens == ["[CLS]", "tune", "##ry", "learns", "photos", "##yn", "##thesis", "[SEP]"]
    assert sequence["labels"] == [IGNORE_INDEX, 1, IGNORE_INDEX, 0, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_token_classification_truncates_ids_and_labels_together(wordpiece: Any) -> None:
    example = {"tokens": ["Tunery", "learns", "photosynthesis"], "tags": ["B-ORG", "O", "B-MISC"]}
    data = tokenize("token-classification", wordpiece, [example], [], 5, ["O", "B-ORG", "B-MISC"])
    assert data.truncated == 1
    (sequence,) = data.train
    assert len(sequence["input_ids"]) == len(sequence["labels"]) == 5
    assert sequence["labels"] == [IGNORE_INDEX, 1, IGNORE_INDEX, 0, 2]


def test_sequence_classification_label_ids_follow_label_names(wordpiece: Any) -> None:
    train = [{"text": "the sky is blue", "label": "pos"}, {"text": "grass is red", "label": "neg"}]
    validation = [{"text": "plums", "label": "neutral"}]
    data = tokenize("sequence-classification", wordpiece, train, validation, 512, ["neg", "pos", "neutral"])
    assert [sequence["label"] for sequence in [*data.train, *data.validation]] == [1, 0, 2]
    assert data.train[0]["input_ids"] == wordpiece("the sky is blue")["input_ids"]
    assert "labels" not in data.train[0]
    reordered = tokenize("sequence-classification", wordpiece, train, validation, 512, ["neutral", "neg", "pos"])
    assert [sequence["label"] for sequence in [*reordered.train, *reordered.validation]] == [2, 1, 0]


def test_masked_lm_keeps_ids_only_and_truncates(wordpiece: Any) -> None:
    data = tokenize("masked-lm", wordpiece, [{"text": "the sky is blue and the grass is green"}], [], 4, [])
    assert data.truncated == 1
    assert data.train == [{"input_ids": wordpiece("the sky is blue and the grass is green")["input_ids"][:4]}]


# A huge row

# About 50 MB in one row: the tokenizer must only ever see its first maxLength * CHARS_PER_TOKEN characters.
HUGE = "word " * 10_000_000
HUGE_LENGTH = 64
# What a chat template or the space before a completion adds to the bounded text.
TEMPLATE_CHARS = 100


def characters(text: str | list) -> int:
    """The characters of the longest text of a call: one text, a batch of texts, or a batch of pre-split words."""
    if isinstance(text, str):
        return len(text)
    return max((characters(item) if isinstance(item, str) else sum(map(len, item)) for item in text), default=0)


class Spy:
    """A tokenizer that fails a call given more text than the bound, and otherwise passes it on."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, text: str | list, **options: Any) -> Any:
        seen = characters(text)
        assert seen <= HUGE_LENGTH * CHARS_PER_TOKEN + TEMPLATE_CHARS, f"the tokenizer was given {seen} characters"
        return self.tokenizer(text, **options)


@pytest.mark.parametrize(
    ("task", "tokenizer_name", "example"),
    [
        ("causal-lm", "tokenizer", {"text": HUGE}),
        ("causal-lm", "tokenizer", {"prompt": "say it:", "completion": HUGE}),
        (
            "causal-lm",
            "tokenizer",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": HUGE}]},
        ),
        ("masked-lm", "wordpiece", {"text": HUGE}),
        ("sequence-classification", "wordpiece", {"text": HUGE, "label": "pos"}),
        ("token-classification", "wordpiece", {"tokens": ["word"] * 1_000_000, "tags": ["O"] * 1_000_000}),
    ],
)
def test_a_huge_row_is_cut_before_the_tokenizer_sees_it(
    request: pytest.FixtureRequest, task: str, tokenizer_name: str, example: dict[str, Any]
) -> None:
    spy = Spy(request.getfixturevalue(tokenizer_name))
    data = tokenize(task, spy, [example], [], HUGE_LENGTH, ["O", "pos"])
    assert data.truncated == 1
    assert len(data.train[0]["input_ids"]) == HUGE_LENGTH


# Batched, parallel, stored flat


def mixed_examples(task: str) -> list[dict[str, Any]]:
    words = [" ".join(sentences(3, seed=seed)) for seed in range(40)]
    if task == "token-classification":
        return [
            {"tokens": text.split(), "tags": ["pos" if len(word) > 4 else "O" for word in text.split()]}
            for text in words
        ]
    if task == "sequence-classification":
        return [{"text": text, "label": "pos" if len(text) % 2 else "O"} for text in words]
    if task == "masked-lm":
        return [{"text": text} for text in words]
    return (
        [{"text": text} for text in words[:15]]
        + [{"prompt": text, "completion": words[-1 - number]} for number, text in enumerate(words[15:30])]
        + [
            {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]}
            for text in words[30:]
        ]
    )


@pytest.mark.parametrize(
    ("task", "tokenizer_name"),
    [
        ("causal-lm", "tokenizer"),
        ("masked-lm", "wordpiece"),
        ("sequence-classification", "wordpiece"),
        ("token-classification", "wordpiece"),
    ],
)
def test_batched_and_parallel_tokenisation_gives_what_one_by_one_does(
    request: pytest.FixtureRequest, task: str, tokenizer_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    examples = mixed_examples(task)
    # Some examples lose their completion to truncation: they must drop out in the same places.
    arguments = (task, tokenizer, examples[5:], examples[:5], 16, ["O", "pos"])
    monkeypatch.setattr(tokenization, "CHUNK_EXAMPLES", 1)
    one_by_one = tokenize(*arguments)
    monkeypatch.setattr(tokenization, "CHUNK_EXAMPLES", 4)
    batched = tokenize(*arguments)
    parallel = tokenize(*arguments, processes=2)
    spool = Spool(tmp_path)
    train, validation = spooled(spool, examples[5:]), spooled(spool, examples[:5])
    from_spool = tokenize(task, tokenizer, train, validation, *arguments[4:], processes=2)
    assert one_by_one.truncated > 0
    for data in (batched, parallel, from_spool):
        assert data.truncated == one_by_one.truncated
        assert list(data.train) == list(one_by_one.train) and list(data.validation) == list(one_by_one.validation)
    if task == "causal-lm":
        assert len(one_by_one.train) < len(examples) - 5


def test_a_tokenizer_that_ships_with_truncation_or_padding_on_still_gives_whole_sequences(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(decoder(tmp_path))
    text = " ".join(sentences(4, seed=3))
    whole = shipped(text)["input_ids"] + [shipped.eos_token_id]
    shipped.backend_tokenizer.enable_truncation(4)
    shipped.backend_tokenizer.enable_padding(length=600)
    data = tokenize("causal-lm", shipped, [{"text": text}], [], 512, [])
    assert len(whole) > 4 and data.train[0]["input_ids"] == whole and data.truncated == 0


def test_sequences_read_back_what_was_stored() -> None:
    stored = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    first, second = Sequences(), Sequences()
    first.append(stored[0])
    second.append(stored[1])
    first.extend(second)
    assert len(first) == 2 and first.tokens == 4
    assert first[0] == stored[0] and first[1] == stored[1] and first[-1] == stored[1]
    assert first[0:2] == stored and list(first) == stored and first == stored
    with pytest.raises(IndexError):
        first[2]
    with pytest.raises(IndexError):
        first[-3]
    classes = Sequences()
    classes.append({"input_ids": [1, 2], "label": 3})
    assert classes[0] == {"input_ids": [1, 2], "label": 3}
    assert Sequences() == []
