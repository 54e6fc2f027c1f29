"""Turn prepared examples into token ids and labels: chat templates, completion-only loss, label alignment."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunery.api.spec import Task

IGNORE_INDEX = -100
# No tokenizer puts more characters than this in one token (typically 3 to 5), so text cut at maxLength times this
# still gives maxLength tokens, while a 50 MB row costs the tokenizer no more memory than maxLength allows.
CHARS_PER_TOKEN = 32

# Used when a tokenizer has no chat template of its own (base models, tokenizers trained from scratch); ChatML.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedData:
    """Training and validation sequences as lists of id lists, with what was lost to truncation."""

    train: list[dict[str, list[int] | int]]
    validation: list[dict[str, list[int] | int]]
    truncated: int = 0


def tokenize(
    task: Task,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    validation: Sequence[dict[str, Any]],
    max_length: int,
    label_names: Sequence[str],
) -> TokenizedData:
    """Token ids without padding; labels carry IGNORE_INDEX wherever no loss is wanted."""
    label_ids = {name: index for index, name in enumerate(label_names)}
    result = TokenizedData([], [])
    for examples, target in ((train, result.train), (validation, result.validation)):
        for example in examples:
            bounded, cut = _bounded(example, max_length)
            sequence, truncated = _tokenize_one(task, tokenizer, bounded, max_length, label_ids)
            result.truncated += truncated or cut
            if sequence is not None:
                target.append(sequence)
    return result


def _bounded(example: dict[str, Any], max_length: int) -> tuple[dict[str, Any], bool]:
    """The example cut to what max_length tokens can hold, and whether anything was cut."""
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
    return bounded, bounded != example


def _within(texts: list[str], chars: int, count: int) -> list[str]:
    """The first texts, at most count of them, cut so that together they hold at most chars characters."""
    kept: list[str] = []
    for text in texts[:count]:
        if chars <= 0:
            break
        kept.append(text[:chars])
        chars -= len(kept[-1])
    return kept


def _tokenize_one(
    task: Task, tokenizer: Any, example: dict[str, Any], max_length: int, label_ids: dict[str, int]
) -> tuple[dict[str, Any] | None, bool]:
    if task == "sequence-classification":
        ids = tokenizer(example["text"], truncation=False)["input_ids"]
        return {"input_ids": ids[:max_length], "label": label_ids[example["label"]]}, len(ids) > max_length
    if task == "token-classification":
        return _aligned_tags(tokenizer, example, max_length, label_ids)
    if task == "masked-lm":
        ids = tokenizer(example["text"], truncation=False)["input_ids"]
        return {"input_ids": ids[:max_length]}, len(ids) > max_length
    if "messages" in example:
        ids, labels = _chat(tokenizer, example["messages"])
    elif "prompt" in example:
        ids, labels = _prompt_completion(tokenizer, example["prompt"], example["completion"])
    else:
        ids = _with_eos(tokenizer, tokenizer(example["text"], truncation=False)["input_ids"])
        labels = list(ids)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        # Truncation left no completion token to learn from.
        return None, truncated
    return {"input_ids": ids, "labels": labels}, truncated


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _prompt_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, truncation=False)["input_ids"]
    completion_ids = _with_eos(tokenizer, tokenizer(" " + completion, add_special_tokens=False)["input_ids"])
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Render with the chat template; only the characters each assistant turn adds carry a loss."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if text.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def _aligned_tags(
    tokenizer: Any, example: dict[str, Any], max_length: int, label_ids: dict[str, int]
) -> tuple[dict[str, Any], bool]:
    """The first sub-token of each word carries the word's tag; the others and special tokens carry none."""
    encoded = tokenizer(example["tokens"], is_split_into_words=True, truncation=False)
    labels, previous = [], None
    for word in encoded.word_ids():
        labels.append(label_ids[example["tags"][word]] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    ids = encoded["input_ids"]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, len(ids) > max_length
