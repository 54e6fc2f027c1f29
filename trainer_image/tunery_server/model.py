"""Load a published model and run it: generate text for causal LMs, label texts and words for classifiers."""

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunery_server.schemas import Entity
from tunery_server.source import Source, SourceError, fetch_base_model, materialize
from tunery_server.text import StopText
from tunery_trainer.tagging import entity_chunks

GENERATIVE = ("causal-lm",)
CLASSIFIERS = ("sequence-classification", "token-classification")
# Chat templates end a turn with a marker of their own; a model tuned on chat emits it where it would stop.
TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_WORD = re.compile(r"\S+")
# Below it logits divided by the temperature overflow float32 (inf, then NaN probabilities); sampling there is
# greedy in all but ties anyway, so it is greedy (vLLM draws the line at the same place).
GREEDY_BELOW = 1e-5
# torch takes seeds in [0, 2^64); the API's int64 seeds map onto that range one to one.
SEEDS = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: temperature 0 (or below GREEDY_BELOW) is greedy; a seed makes sampling repeatable."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str  # "stop": an end-of-sequence token or a stop sequence; "length": max_new_tokens reached
    completion_tokens: int


class ServedModel:
    """A model and its tokenizer, used by one thread at a time (the lock): simple, and safe on CPU and GPU."""

    def __init__(self, task: str, model: Any, tokenizer: Any, labels: Sequence[str], device: torch.device) -> None:
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.device = device
        self.lock = threading.Lock()
        self.max_positions = _max_positions(model, tokenizer)
        self._stop_ids = _stop_token_ids(model, tokenizer)

    # Generation ---------------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def encode_prompt(self, prompt: str) -> list[int]:
        """A completion prompt's ids, with the tokenizer's special tokens, as training tokenised prompts."""
        with self.lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the chat template, ending where the assistant's reply starts."""
        with self.lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template writes its own special tokens (as in training): add none.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Generated:
        """Generate, calling on_text with each released piece of text (maybe "", once per token); blocking."""
        from transformers import StoppingCriteriaList

        with self.lock:
            watcher = _TokenWatcher(StopText(self._decode, params.stops), self._stop_ids, on_text, cancelled)
            if cancelled.is_set():
                return Generated("", "stop", 0)
            if params.seed is not None:
                torch.manual_seed(params.seed % SEEDS)
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=params.max_new_tokens,
                    stopping_criteria=StoppingCriteriaList([watcher]),
                    eos_token_id=sorted(self._stop_ids) or None,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **_sampling(params),
                )
            tail = watcher.text.finish()
            if tail:
                on_text(tail)
            finish = "stop" if watcher.ended or watcher.text.stopped else "length"
            return Generated(watcher.text.text, finish, watcher.count)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # Classification -----------------------------------------------------------------------------------------------

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each input takes, encoded as classification encodes it."""
        with self.lock:
            encoded = self._encode_inputs(texts, tensors=False)
            return [len(ids) for ids in encoded["input_ids"]]

    def classify(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Each text's probability for every label."""
        with self.lock, torch.inference_mode():
            encoded = self._encode_inputs(texts, tensors=True)
            probabilities = self.model(**encoded).logits.float().softmax(dim=-1).tolist()
        names = self._label_names(len(probabilities[0]))
        return [dict(zip(names, row, strict=True)) for row in probabilities]

    def tag(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Each text's entities: its words tagged (by their first sub-token, as training labels them), B-/I- grouped."""
        spans = [[(match.start(), match.end()) for match in _WORD.finditer(text)] for text in texts]
        results: list[list[Entity]] = [[] for _ in texts]
        tagged = [index for index, words in enumerate(spans) if words]
        if not tagged:
            return results
        with self.lock, torch.inference_mode():
            encoded = self._encode_inputs([texts[index] for index in tagged], tensors=True)
            probabilities = self.model(**encoded).logits.float().softmax(dim=-1)
            best, chosen = probabilities.max(dim=-1)
            word_ids = [encoded.word_ids(row) for row in range(len(tagged))]
        names = self._label_names(probabilities.shape[-1])
        for row, index in enumerate(tagged):
            words: dict[int, tuple[str, float]] = {}
            for position, word in enumerate(word_ids[row]):
                if word is not None and word not in words:
                    words[word] = (names[int(chosen[row, position])], float(best[row, position]))
            results[index] = group_entities(texts[index], spans[index], [words[word] for word in sorted(words)])
        return results

    def _encode_inputs(self, texts: Sequence[str], tensors: bool) -> Any:
        if self.task == "token-classification":
            # Split on whitespace as the training data was split into words.
            words = [[match.group() for match in _WORD.finditer(text)] for text in texts]
            kwargs: dict[str, Any] = {"is_split_into_words": True}
            texts = words  # type: ignore[assignment]
        else:
            kwargs = {}
        if tensors:
            return self.tokenizer(list(texts), padding=True, return_tensors="pt", **kwargs).to(self.device)
        return self.tokenizer(list(texts), **kwargs)

    def _label_names(self, count: int) -> list[str]:
        if len(self.labels) == count:
            return self.labels
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(index, f"LABEL_{index}")) for index in range(count)]


class _TokenWatcher:
    """A stopping criterion: generate() calls it after every new token, so it streams text and decides to stop."""

    def __init__(
        self, text: StopText, stop_ids: set[int], on_text: Callable[[str], None], cancelled: threading.Event
    ) -> None:
        self.text = text
        self.count = 0
        self.ended = False
        self._stop_ids = stop_ids
        self._on_text = on_text
        self._cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        token = int(input_ids[0, -1])
        self.count += 1
        if token in self._stop_ids:
            self.ended = True
            self._on_text("")
        else:
            self._on_text(self.text.add(token))
        done = self.ended or self.text.stopped or self._cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def group_entities(text: str, spans: Sequence[tuple[int, int]], tags: Sequence[tuple[str, float]]) -> list[Entity]:
    """Group tagged words (character spans in text) into entities as evaluation does, scored by their words' mean."""
    entities = []
    for label, first, last in entity_chunks([tag for tag, _ in tags]):
        start, end = spans[first][0], spans[last - 1][1]
        scores = [score for _, score in tags[first:last]]
        entities.append(
            Entity(text=text[start:end], label=label, score=sum(scores) / len(scores), start=start, end=end)
        )
    return entities


def load(source: Source, workdir: Path) -> ServedModel:
    """Fetch the published model if remote and load it: model/ when there is one, else the base with adapter/."""
    from transformers import AutoTokenizer

    from tunery_trainer.modeling import auto_class, label_arguments

    manifest = source.manifest
    task = manifest["task"]  # one that locate() accepted
    root = materialize(source, workdir)
    labels = list(manifest.get("labels") or [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(device)
    auto = auto_class(task)
    model_dir, adapter_dir = _published_dir(source, root, "model"), _published_dir(source, root, "adapter")
    # trust_remote_code stays False throughout: a published model's own Python code never runs in the server.
    if model_dir is not None and model_dir.is_dir():
        tokenizer_dir = model_dir
        model = auto.from_pretrained(tokenizer_dir, dtype=dtype)
    elif adapter_dir is not None and adapter_dir.is_dir():
        from peft import PeftModel

        tokenizer_dir = adapter_dir
        base_dir = fetch_base_model(manifest.get("baseModel"), root, workdir)
        base = auto.from_pretrained(base_dir, dtype=dtype, **label_arguments(labels))
        model = PeftModel.from_pretrained(base, tokenizer_dir)
    else:
        raise SourceError(f"{source.uri}: the manifest lists neither a model/ nor an adapter/ directory present here")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if task == "token-classification" and getattr(tokenizer, "add_prefix_space", None) is False:
        # Byte-level BPE tokenizers need it to tokenise pre-split words (as the trainer loads them).
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, add_prefix_space=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(device).eval()
    return ServedModel(task, model, tokenizer, labels, device)


def _published_dir(source: Source, root: Path, kind: str) -> Path | None:
    """The manifest's model/ or adapter/ directory, refused when the manifest points outside the published model."""
    name = source.manifest.get(kind)
    if not name:
        return None
    directory = (root / str(name)).resolve()
    if not directory.is_relative_to(root.resolve()):
        raise SourceError(f"{source.uri}: the manifest's {kind} {name!r} is outside the published model: refusing it")
    return directory


def _dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _sampling(params: SamplingParams) -> dict[str, Any]:
    if params.temperature < GREEDY_BELOW:
        return {"do_sample": False}
    # top_k 0: OpenAI's API has no top-k, and transformers would otherwise apply its default of 50.
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}


def _max_positions(model: Any, tokenizer: Any) -> int | None:
    config = model.config
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel.
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[marker] for marker in TURN_END_MARKERS if marker in vocabulary)
    return ids
