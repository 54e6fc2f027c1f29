"""Benchmark: training on examples padded to maxLength (the textbook path) against Tunery's flattened micro-batches.

Both paths train the same randomly initialised Llama-shaped model with AdamW on the same synthetic texts,
whose token lengths are long-tailed (most short, a few past maxLength). The textbook path pads every example
to maxLength with a 2D attention mask; Tunery's path is `tokenize()` + `flatten()` (each batch's examples end to
end in one row, position ids restarting per document, no mask) under its CPU kernel, SDPA per document; both
paths see the same examples per step.
Each path times `--steps` optimiser steps after 2 warm-up steps, the two paths' steps interleaved, and
projects one pass over all the examples as batches per pass x mean step time; `--steps 0` times the whole pass
instead. Prints a markdown table last and writes packing.json beside this script.

    .venv/bin/python benchmarks/packing.py [--examples 2000] [--max-length 512] [--batch-size 8] [--steps 20]
"""

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from tunery_trainer.attention import packed_kernel
from tunery_trainer.batching import flatten
from tunery_trainer.modeling import train_tokenizer
from tunery_trainer.tokenization import IGNORE_INDEX, tokenize

WARMUP_STEPS = 2
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
VOCAB_SIZE = 2000
# Word counts are log-normal around a median of 45 words; the tail runs past maxLength and gets truncated.
MEDIAN_WORDS = 45
WORDS_SIGMA = 0.75
MIN_WORDS = 12

# What a data path makes of a group of its sequences: the model's inputs, and how many real (non-pad) tokens
# they hold.
Batch = tuple[dict[str, torch.Tensor], int]


def lexicon(generator: random.Random, size: int = 3000) -> list[str]:
    """Pseudo-words of one to four syllables, so that BPE splits the rarer ones into several tokens."""
    syllables = [consonant + vowel for consonant in "bdfgklmnprstvz" for vowel in "aeiou"]
    return sorted({"".join(generator.choices(syllables, k=generator.randint(1, 4))) for _ in range(size)})


def synthetic_texts(count: int, seed: int) -> list[str]:
    """Zipf-distributed words (frequent ones become single tokens) in texts of log-normal length."""
    generator = random.Random(seed)
    words = lexicon(generator)
    weights = [1 / rank for rank in range(1, len(words) + 1)]
    texts = []
    for _ in range(count):
        length = max(MIN_WORDS, round(generator.lognormvariate(math.log(MEDIAN_WORDS), WORDS_SIGMA)))
        texts.append(" ".join(generator.choices(words, weights, k=length)) + " .")
    return texts


def build_model(tokenizer: Any, max_length: int, seed: int, attention: str) -> torch.nn.Module:
    """Built afresh with the same seed for each path, so both start from the same weights."""
    config = transformers.LlamaConfig(
        **MODEL_CONFIG,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)


def textbook_path(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[int, Callable[[list[int]], Batch]]:
    """Every example padded to max_length; pads carry no label and are masked out of attention."""
    # Appending EOS as text gives the same ids as Tunery's tokenize(), which ends each document with EOS.
    encoded = tokenizer(
        [text + tokenizer.eos_token for text in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)

    def batch(group: list[int]) -> Batch:
        index = torch.tensor(group)
        return {"input_ids": ids[index], "attention_mask": mask[index], "labels": labels[index]}, int(mask[index].sum())

    return len(ids), batch


def tunery_path(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[int, Callable[[list[int]], Batch]]:
    """Tunery's own tokenize() and flatten(), as the trainer lays out causal-LM micro-batches with packing on."""
    sequences = tokenize("causal-lm", tokenizer, [{"text": text} for text in texts], [], max_length, []).train

    def batch(group: list[int]) -> Batch:
        chosen = [sequences[index] for index in group]
        return flatten(chosen), sum(len(sequence["input_ids"]) for sequence in chosen)

    return len(sequences), batch


def batch_groups(count: int, batch_size: int, seed: int) -> list[list[int]]:
    """One shuffled pass in batches (the last one may be short), drawn the same way for both paths."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def pass_stats(groups: list[list[int]], make_batch: Callable[[list[int]], Batch]) -> dict[str, int]:
    """Real tokens and computed tokens (rows x padded length) over one whole pass, without training."""
    real, computed = 0, 0
    for group in groups:
        batch, tokens = make_batch(group)
        real += tokens
        computed += batch["input_ids"].numel()
    return {"batches": len(groups), "real_tokens": real, "computed_tokens": computed}


class DataPath:
    """One data path under test: its batches for one pass, and a model with its own AdamW optimiser."""

    def __init__(
        self, name: str, build: Callable, attention: str, tokenizer: Any, texts: Sequence[str], args: argparse.Namespace
    ):
        self.name = name
        started = time.perf_counter()
        self.count, self.make_batch = build(tokenizer, texts, args.max_length)
        self.prep_s = time.perf_counter() - started
        self.groups = batch_groups(self.count, args.batch_size, args.seed)
        self.stats = pass_stats(self.groups, self.make_batch)
        self.model = build_model(tokenizer, args.max_length, args.seed, attention)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # Warm-up steps pay for first-call allocations and kernel selection; they are not timed.
        for group in self.groups[:WARMUP_STEPS]:
            self.step(group)
        self.timed = self.groups if args.steps == 0 else self.groups[WARMUP_STEPS : WARMUP_STEPS + args.steps]
        self.durations: list[float] = []
        self.timed_real = 0
        self.loss = float("nan")

    def step(self, group: list[int]) -> tuple[float, int]:
        """One optimiser step; its seconds include collation, which is part of the data path."""
        started = time.perf_counter()
        batch, tokens = self.make_batch(group)
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        return time.perf_counter() - started, tokens

    def next_timed(self) -> None:
        seconds, tokens = self.step(self.timed[len(self.durations)])
        self.durations.append(seconds)
        self.timed_real += tokens

    @property
    def progress(self) -> float:
        return len(self.durations) / len(self.timed)

    def result(self, whole_pass: bool) -> dict[str, Any]:
        mean_step_s = statistics.mean(self.durations)
        return {
            "sequences": self.count,
            **self.stats,
            "non_pad_fraction": self.stats["real_tokens"] / self.stats["computed_tokens"],
            "data_prep_s": self.prep_s,
            "timed_steps": len(self.durations),
            "timed_s": sum(self.durations),
            "mean_step_s": mean_step_s,
            "real_tokens_per_s": self.timed_real / sum(self.durations),
            "pass_s": sum(self.durations) if whole_pass else mean_step_s * self.stats["batches"],
            "pass_s_measured": whole_pass,
            "last_loss": self.loss,
        }


def run_interleaved(paths: Sequence[DataPath]) -> None:
    """Alternate the paths' timed steps (the least advanced goes next), so load from elsewhere hits both alike."""
    while unfinished := [path for path in paths if path.progress < 1]:
        min(unfinished, key=lambda path: path.progress).next_timed()


def length_summary(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, float]:
    lengths = sorted(len(ids) + 1 for ids in tokenizer(list(texts))["input_ids"])  # + 1: the EOS both paths add
    return {
        "min": lengths[0],
        "p50": lengths[len(lengths) // 2],
        "p90": lengths[int(0.9 * (len(lengths) - 1))],
        "p99": lengths[int(0.99 * (len(lengths) - 1))],
        "max": lengths[-1],
        "mean": statistics.mean(lengths),
        "over_max_length": sum(length > max_length for length in lengths),
    }


def table_rows(whole_pass: bool) -> list[tuple[str, str, str]]:
    """(label, result key, format) of each table row."""
    return [
        ("examples", "sequences", "{:d}"),
        ("optimiser steps per pass", "batches", "{:d}"),
        ("tokens computed per pass", "computed_tokens", "{:d}"),
        ("real tokens per pass", "real_tokens", "{:d}"),
        ("non-pad token fraction", "non_pad_fraction", "{:.3f}"),
        ("data preparation (s)", "data_prep_s", "{:.2f}"),
        ("mean step time (s)", "mean_step_s", "{:.3f}"),
        ("real tokens / s", "real_tokens_per_s", "{:.0f}"),
        (f"one pass, {'measured' if whole_pass else 'projected'} (s)", "pass_s", "{:.1f}"),
    ]


def write_and_print(
    args: argparse.Namespace, lengths: dict[str, float], vocab_size: int, textbook: dict, tunery: dict
) -> None:
    rows = table_rows(whole_pass=args.steps == 0)
    result = {
        "settings": {
            **vars(args),
            "warmup_steps": WARMUP_STEPS,
            "model": {"architecture": "llama", **MODEL_CONFIG},
            "attention": {"textbook": "sdpa", "tunery": packed_kernel(torch.device("cpu"))},
            "vocab_size": vocab_size,
            "optimizer": "AdamW(lr=1e-4)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "token_lengths": lengths,
        "textbook": textbook,
        "tunery": tunery,
        "ratios_tunery_over_textbook": {key: tunery[key] / textbook[key] for _, key, _ in rows},
    }
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.examples} examples, maxLength {args.max_length}, {args.batch_size} sequences per step, "
        f"{args.threads} CPU threads (textbook: padded to maxLength; tunery: tokenize + flatten, SDPA per document)\n"
    )
    print("| measure | textbook | tunery | ratio tunery/textbook |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        ratio = tunery[key] / textbook[key]
        print(f"| {label} | {fmt.format(textbook[key])} | {fmt.format(tunery[key])} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (both paths)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per path; 0 times a full pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = synthetic_texts(args.examples, args.seed)
    tokenizer = train_tokenizer(texts, VOCAB_SIZE, with_mask=False)
    lengths = length_summary(tokenizer, texts, args.max_length)
    print(f"{args.examples} examples, token lengths {lengths}")
    paths = [
        DataPath("textbook", textbook_path, "sdpa", tokenizer, texts, args),
        DataPath("tunery", tunery_path, packed_kernel(torch.device("cpu")), tokenizer, texts, args),
    ]
    run_interleaved(paths)
    textbook, tunery = (path.result(whole_pass=args.steps == 0) for path in paths)
    for path, measured in zip(paths, (textbook, tunery), strict=True):
        print(
            f"{path.name}: {measured['timed_steps']} timed steps, {measured['mean_step_s']:.3f} s/step, loss {path.loss:.3f}"
        )
    write_and_print(args, lengths, len(tokenizer), textbook, tunery)


if __name__ == "__main__":
    main()
