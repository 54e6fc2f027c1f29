"""Turn prepared examples into token ids and labels: chat templates, completion-only loss, label alignment."""

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tunery.api.spec import Task
from tunery_trainer.sequences import IGNORE_INDEX, LEARNED, Pairs, Sequences

__all__ = ["IGNORE_INDEX", "TokenizedData", "tokenize"]
# No tokenizer puts more characters than this in one token (typically 3 to 5), so text cut at maxLength times this
# still gives maxLength tokens, while a 50 MB row costs the tokenizer no more memory than maxLength allows.
CHARS_PER_TOKEN = 32

# Examples per batched tokenizer call, and per piece of work a worker process takes.
CHUNK_EXAMPLES = 1024

# Used when a tokenizer has no chat template of its own (base models, tokenizers trained from scratch); ChatML.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedData:
    """Training and validation sequences (or preference pairs of them), stored flat, with how many examples
    truncation cut."""

    train: Sequences | Pairs
    validation: Sequences | Pairs
    truncated: int = 0


def tokenize(
    task: Task,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    validation: Sequence[dict[str, Any]],
    max_length: int,
    label_names: Sequence[str],
    processes: int = 1,
) -> TokenizedData:
    """Token ids without padding; labels carry IGNORE_INDEX wherever no loss is wanted.

    Examples go in chunks, each tokenised with batched tokenizer calls; with more than one chunk and more than one
    process, `processes` forked workers take the chunks, and the results keep the examples' order. Preference pairs
    (examples with chosen and rejected) become Pairs, each pair kept only if both its sequences are.
    """
    work = _Chunk(
        task, tokenizer, max_length, {name: index for index, name in enumerate(label_names)}, tokenizer.eos_token_id
    )
    result = TokenizedData(Sequences(), Sequences())
    for examples, target in ((train, result.train), (validation, result.validation)):
        chunks = [examples[start : start + CHUNK_EXAMPLES] for start in range(0, len(examples), CHUNK_EXAMPLES)]
        for sequences, truncated in _mapped(work, chunks, processes):
            target.extend(sequences)
            result.truncated += truncated
    if train and "chosen" in train[0]:
        return TokenizedData(Pairs(result.train), Pairs(result.validation), result.truncated)
    return result


@dataclass(frozen=True)
class _Chunk:
    """Tokenises one chunk of examples: the work each process does."""

    task: Task
    tokenizer: Any
    max_length: int
    label_ids: dict[str, int]
    eos_id: int | None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> tuple[Sequences, int]:
        sequences, truncated = Sequences(), 0
        if examples and "chosen" in examples[0]:
            # A pair's chosen and rejected sequence, one after the other; both, or neither when either is lost.
            sides = self._tokenized([side for pair in examples for side in _sides(pair)])
            for chosen, rejected in zip(sides[::2], sides[1::2], strict=True):
                truncated += chosen[1] or rejected[1]
                if chosen[0] is not None and rejected[0] is not None:
                    sequences.append(chosen[0])
                    sequences.append(rejected[0])
            return sequences, truncated
        for sequence, cut in self._tokenized(examples):
            truncated += cut
            if sequence is not None:
                sequences.append(sequence)
        return sequences, truncated

    def _tokenized(self, examples: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, bool]]:
        """Each example's sequence (None when nothing is left to learn), and whether it was truncated."""
        cuts = [_too_long(example, self.max_length) for example in examples]
        bounded = [
            _bounded(example, self.max_length) if cut else example for example, cut in zip(examples, cuts, strict=True)
        ]
        results = []
        for example, cut, encoded in zip(bounded, cuts, self._encoded(bounded), strict=True):
            sequence, cut_here = _tokenize_one(self, example, encoded)
            results.append((sequence, bool(cut_here or cut)))
        return results

    def _encoded(self, examples: list[dict[str, Any]]) -> list[Any]:
        """The tokenizer's output for each example, from one batched call per field (chats render one by one)."""
        tokenizer = self.tokenizer
        encoded: list[Any] = [None] * len(examples)
        if self.task == "token-classification":
            words = tokenizer([example["tokens"] for example in examples], is_split_into_words=True, truncation=False)
            return [(words["input_ids"][row], words.word_ids(row)) for row in range(len(examples))]
        texts = [row for row, example in enumerate(examples) if "text" in example]
        for row, ids in zip(texts, _ids(tokenizer, [examples[row]["text"] for row in texts]), strict=True):
            encoded[row] = ids
        prompted = [row for row, example in enumerate(examples) if "prompt" in example]
        prompts = _ids(tokenizer, [examples[row]["prompt"] for row in prompted])
        completions = _ids(tokenizer, [" " + examples[row]["completion"] for row in prompted], add_special_tokens=False)
        for row, prompt, completion in zip(prompted, prompts, completions, strict=True):
            encoded[row] = (prompt, completion)
        return encoded


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Each text's token ids, from the Rust tokenizer directly where there is one: without the offsets and the
    Python-side encodings the wrapper builds, which cost as much as the tokenizing itself."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, truncation=False, add_special_tokens=add_special_tokens)["input_ids"]
    # As the wrapper does for truncation=False: a tokenizer.json may ship with truncation or padding switched on.
    if backend.truncation:
        backend.no_truncation()
    if backend.padding:
        backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


# The chunk function a forked worker runs, installed before the fork so that the tokenizer is never pickled.
_installed: _Chunk | None = None


def _mapped(work: _Chunk, chunks: list[Sequence[dict[str, Any]]], processes: int) -> Iterator[tuple[Sequences, int]]:
    global _installed
    if processes <= 1 or len(chunks) <= 1:
        yield from map(work, chunks)
        return
    _installed = work
    try:
        with multiprocessing.get_context("fork").Pool(min(processes, len(chunks))) as pool:
            yield from pool.imap(_run_installed, chunks)
    finally:
        _installed = None


def _run_installed(examples: Sequence[dict[str, Any]]) -> tuple[Sequences, int]:
    assert _installed is not None
    return _installed(examples)


def _sides(pair: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference pair as two examples to tokenise: the prompt (or messages) with each completion, learning only
    the completion (the messages' own assistant turns are context)."""
    if "messages" in pair:
        return tuple(
            {
                "messages": [*pair["messages"], {"role": "assistant", "content": pair[side]}],
                "learned_from": len(pair["messages"]),
            }
            for side in ("chosen", "rejected")
        )
    return tuple({"prompt": pair["prompt"], "completion": pair[side]} for side in ("chosen", "rejected"))


def _too_long(example: dict[str, Any], max_length: int) -> bool:
    """Whether the example holds more than max_length tokens can (so _bounded cuts it)."""
    chars = max_length * CHARS_PER_TOKEN
    if "tokens" in example:
        pieces = example["tokens"]
    elif "messages" in example:
        pieces = [message["content"] for message in example["messages"]]
    else:
        return any(len(example.get(key, "")) > chars for key in ("text", "prompt", "completion"))
    return len(pieces) > max_length or sum(map(len, pieces)) > chars


def _bounded(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The example cut to what max_length tokens can hold."""
    chars = max_length * CHARS_PER_TOKEN
    bounded = dict(example)
    for key in ("text", "prompt", "completion"):
        if key in example:
            bounded[key] = example[key][:chars]
    if "tokens" in example:
        # Every word is at least one token; tags stay as they are, looked up by word index.
        bounded["tokens"] = _within(example["tokens"], chars, max_length)
    if "messages" in example:
        # Every message is at least one token of the template's markers.
        contents = _within([message["content"] for message in example["messages"]], chars, max_length)
        bounded["messages"] = [
            {**message, "content": content} for message, content in zip(example["messages"], contents, strict=False)
        ]
    return bounded


def _within(texts: list[str], chars: int, count: int) -> list[str]:
    """The first texts, at most count of them, cut so that together they hold at most chars characters."""
    kept: list[str] = []
    for text in texts[:count]:
        if chars <= 0:
            break
        kept.append(text[:chars])
        chars -= len(kept[-1])
    return kept


def _tokenize_one(work: _Chunk, example: dict[str, Any], encoded: Any) -> tuple[dict[str, Any] | None, bool]:
    """One example's sequence (None when nothing is left to learn), and whether it was truncated; `encoded` is the
    tokenizer's batched output for it (ids; prompt and completion ids; ids and word ids; None for a chat)."""
    task, max_length, label_ids = work.task, work.max_length, work.label_ids
    if task == "sequence-classification":
        return {"input_ids": encoded[:max_length], "label": label_ids[example["label"]]}, len(encoded) > max_length
    if task == "token-classification":
        return _aligned_tags(example, max_length, label_ids, *encoded)
    if task == "masked-lm":
        return {"input_ids": encoded[:max_length]}, len(encoded) > max_length
    if "messages" in example:
        ids, learned = _chat(work.tokenizer, example["messages"], example.get("learned_from", 0))
    elif "prompt" in example:
        prompt_ids, completion_ids = encoded
        ids = prompt_ids + _with_eos(completion_ids, work.eos_id)
        learned = bytes(len(prompt_ids)) + LEARNED * (len(ids) - len(prompt_ids))
    else:
        ids = _with_eos(encoded, work.eos_id)
        learned = LEARNED * len(ids)
    truncated = len(ids) > max_length
    if truncated:
        ids, learned = ids[:max_length], learned[:max_length]
    if learned.find(LEARNED, 1) < 0:
        # Truncation left no completion token to learn from.
        return None, truncated
    return {"input_ids": ids, "learned": learned}, truncated


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _chat(tokenizer: Any, messages: list[dict[str, str]], learned_from: int = 0) -> tuple[list[int], bytes]:
    """Render with the chat template; only the characters each assistant turn from `learned_from` on adds carry a
    loss."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < learned_from:
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if text.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    learned = bytes(any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"])
    return encoded["input_ids"], learned


def _aligned_tags(
    example: dict[str, Any], max_length: int, label_ids: dict[str, int], ids: list[int], word_ids: list[int | None]
) -> tuple[dict[str, Any], bool]:
    """The first sub-token of each word carries the word's tag; the others and special tokens carry none."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(label_ids[example["tags"][word]] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, len(ids) > max_length
