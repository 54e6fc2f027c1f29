"""Benchmark: GPU training throughput, MFU and peak memory of Tunery beside HF Trainer (padding-free) and TRL SFTTrainer.

Three cases, each a Llama-shaped model with random weights built from a config and written to local disk (no
downloads), trained at maxLength 4096 in bf16 on synthetic documents of long-tailed token lengths, packed:
  full   Llama-3.2-1B shape, full fine-tuning
  lora   Llama-3.1-8B shape, LoRA (rank 16, alpha 32, all linear layers: Tunery's defaults)
  qlora  Llama-3.1-8B shape, QLoRA (bitsandbytes 4-bit nf4, double quantisation, bf16 compute)
Each case trains the same model directory and documents through three paths, one after another in one run (the
order rotates from case to case), each in a process of its own so that peak memory is its own:
  tunery     a FineTuneJob spec through the trainer's entry point (what `tunery run` runs); tokens and step
             seconds are what the trainer reports to its metrics, not taken from its internals
  hf-flatten transformers Trainer with DataCollatorWithFlattening (position ids restart per document, no mask)
  trl-pack   TRL SFTTrainer with packing into rows of maxLength (skipped, with a line saying so, where TRL is not
             importable; so is a case whose method needs a package that is missing, e.g. bitsandbytes)
Every path sees about the same tokens per step (--tokens-per-step): Tunery and HF take that many tokens' worth of
examples per step; TRL takes that many tokens' worth of packed rows. `--warmup` steps are not timed; the next
`--steps` are; tokens/s is real (non-pad) tokens over the timed steps' seconds.

Model FLOPs per token (MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s):
  4 N + 2 N_trainable + 6 L h T
  N            parameters in matrix products: every linear layer's weight, the LM head included (counted once when
               tied to the embedding, which is a lookup), and for LoRA/QLoRA the adapters' too
  N_trainable  N for full fine-tuning (so 6 N, the usual figure); only the adapters for LoRA/QLoRA
  4 N          forward (2 N) and the gradients of the activations, which flow back through frozen weights too (2 N)
  2 N_trainable  the gradients of the trained weights
  6 L h T      attention scores and values: 12 L h T per token forward and backward for full attention over T
               tokens (L layers, h = heads x head dim), halved for causality. T is the token-weighted mean document
               length (sum of squared lengths over the sum of lengths): packed documents attend only within
               themselves, so T = maxLength would credit work that a padding-free kernel rightly skips.
QLoRA is counted as LoRA (its matrix products run in bf16 on dequantised weights). The peak comes from a table by
device name (H100 and H200 989 TFLOP/s, A100 312, L4 121) or --peak-tflops. Targets, printed beside the numbers:
LoRA 8B >= 12,500 tokens/s on one H100-class GPU and >= 45% MFU.

`--smoke` runs the same code on the CPU with a tiny shape (hidden 64, 2 layers, maxLength 128, fp32, no QLoRA).
Prints a markdown table last and writes --output (gpu_throughput.json beside this script).

    .venv/bin/python benchmarks/gpu_throughput.py [--only full,lora,qlora] [--paths tunery,hf-flatten,trl-pack]
        [--steps 10] [--warmup 3] [--tokens-per-step 8192] [--peak-tflops N] [--gradient-checkpointing] [--smoke]
"""

import argparse
import importlib.util
import json
import math
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LLAMA_VOCAB = 128_256
SHAPES = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": LLAMA_VOCAB,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": LLAMA_VOCAB,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
    },
}
CASES = {"full": ("1b", "full"), "lora": ("8b", "lora"), "qlora": ("8b", "qlora")}
SMOKE_CASES = {"full": ("tiny", "full"), "lora": ("tiny", "lora")}
PATHS = ("tunery", "hf-flatten", "trl-pack")
# Tunery's defaults (LoraSettings, QloraSettings), given to the peers as well.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
LEARNING_RATE = 2e-4
# Dense bf16 tensor-core peaks, by a pattern of the device name (the H100 figure is the SXM part's).
PEAK_TFLOPS = {r"\bH100\b": 989.0, r"\bH200\b": 989.0, r"\bA100\b": 312.0, r"\bL4\b": 121.0}
TARGETS = {"lora": {"tokens_per_s": 12_500, "mfu": 0.45}}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Document lengths in tokens are log-normal around a median of maxLength / 8, clipped to [MIN_TOKENS, maxLength].
MEDIAN_FRACTION = 1 / 8
LENGTH_SIGMA = 1.0
MIN_TOKENS = 8


def matmul_parameters(shape: dict[str, Any]) -> int:
    """Weights of a Llama model's matrix products: attention and MLP projections of every layer, and the LM head."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * shape["intermediate_size"]
    return layers * per_layer + hidden * shape["vocab_size"]


def lora_parameters(shape: dict[str, Any], rank: int) -> int:
    """LoRA's A and B on every linear layer but the LM head (PEFT's all-linear): rank x (inputs + outputs) each."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    ends = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inner), (hidden, inner)]
    ends.append((inner, hidden))
    return shape["num_hidden_layers"] * sum(rank * (inputs + outputs) for inputs, outputs in ends)


def flops_per_token(shape: dict[str, Any], method: str, context: float) -> float:
    """4 N + 2 N_trainable + 6 L h T (see the module docstring)."""
    base = matmul_parameters(shape)
    adapters = 0 if method == "full" else lora_parameters(shape, LORA["r"])
    trainable = base if method == "full" else adapters
    attention = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * context
    return 4 * (base + adapters) + 2 * trainable + attention


def attended_context(lengths: list[int]) -> float:
    """The token-weighted mean document length: T in 6 L h T, for documents that attend only within themselves."""
    return sum(length * length for length in lengths) / sum(lengths)


def mfu(tokens_per_s: float, flops: float, peak_tflops: float) -> float:
    return tokens_per_s * flops / (peak_tflops * 1e12)


def peak_tflops_for(device_name: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS.items():
        if re.search(pattern, device_name):
            return tflops
    return None


def document_lengths(count: int, max_length: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    median = max_length * MEDIAN_FRACTION
    return [
        min(max_length, max(MIN_TOKENS, round(generator.lognormvariate(math.log(median), LENGTH_SIGMA))))
        for _ in range(count)
    ]


def word_tokenizer(vocab_size: int) -> Any:
    """One token per whitespace-separated word `w<id>`, so that a text of n words is n tokens (plus EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [f"w{index}" for index in range(vocab_size - len(SPECIAL_TOKENS))]
    model = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk)


def write_model(directory: Path, shape_name: str, max_length: int, dtype_name: str, seed: int) -> None:
    """A random-weight Llama of the shape, with the word tokenizer, saved as a checkpoint would be."""
    import torch
    import transformers

    shape = SHAPES[shape_name]
    tokenizer = word_tokenizer(shape["vocab_size"])
    config = transformers.LlamaConfig(
        **shape,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    # Initialised on the GPU when there is one: 8B parameters take minutes to initialise on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # The workers need the GPU's memory: this process's cached blocks would otherwise keep the model's 16 GB.
    del model
    torch.cuda.empty_cache()


def write_documents(path: Path, lengths: list[int], vocab_size: int, seed: int) -> None:
    """JSON lines of {"text": ...}: each document's length less one (for EOS) of uniformly drawn words."""
    generator = random.Random(seed)
    words = vocab_size - len(SPECIAL_TOKENS)
    with path.open("w") as out:
        for length in lengths:
            text = " ".join(f"w{generator.randrange(words)}" for _ in range(length - 1))
            out.write(json.dumps({"text": text}) + "\n")


def tokenized_documents(model_dir: Path, data: Path) -> list[list[int]]:
    """The peers' input: each document's ids followed by EOS, as Tunery tokenises a causal-LM text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Job:
    """What one worker process trains: a case through a path, and the settings all paths share."""

    case: str
    method: str
    path: str
    model_dir: str
    data: str
    workdir: str
    max_length: int
    warmup: int
    steps: int
    examples_per_step: int
    rows_per_step: int
    precision: str
    gradient_checkpointing: bool
    seed: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


class StepClock:
    """Per-step (tokens, seconds) of one path, and the peak memory once the last timed step is done."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.steps: list[tuple[int, float]] = []
        self.peak_memory: dict[str, float | None] = {}

    def record(self, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))
        if len(self.steps) == self.job.total_steps:
            self.peak_memory = peak_memory()

    def result(self) -> dict[str, Any]:
        timed = self.steps[self.job.warmup : self.job.total_steps]
        if len(timed) < self.job.steps:
            raise RuntimeError(f"{self.job.path} reported {len(self.steps)} steps, {self.job.total_steps} expected")
        tokens, seconds = sum(tokens for tokens, _ in timed), sum(seconds for _, seconds in timed)
        return {
            "timed_steps": len(timed),
            "timed_tokens": tokens,
            "timed_s": seconds,
            "mean_step_s": statistics.mean(seconds for _, seconds in timed),
            "tokens_per_step": tokens / len(timed),
            "tokens_per_s": tokens / seconds,
            **self.peak_memory,
        }


def peak_memory() -> dict[str, float | None]:
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_gpu_memory_gib": gpu, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_tunery(job: Job) -> dict[str, Any]:
    """The FineTuneJob through the trainer's job entry, with a metrics sink that keeps each step's report."""
    import logging

    from tunery.local_run import local_config
    from tunery_trainer.job import run
    from tunery_trainer.metrics import TrainerMetrics

    clock = StepClock(job)

    class StepMetrics(TrainerMetrics):
        def record_step(self, *, tokens: int, step_seconds: float, **values: Any) -> None:
            super().record_step(tokens=tokens, step_seconds=step_seconds, **values)
            clock.record(tokens, step_seconds)

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("tunery_trainer").addHandler(handler)
    logging.getLogger("tunery_trainer").setLevel(logging.INFO)
    manifest = {
        "apiVersion": "tunery.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{job.case}"},
        "spec": {
            "baseModel": {"uri": f"file://{job.model_dir}/"},
            "dataset": {"train": f"file://{job.data}", "maxLength": job.max_length, "validationSplit": 0},
            "method": {"type": job.method},
            "hyperparameters": {
                "maxSteps": job.total_steps,
                "batchSize": job.examples_per_step,
                "learningRate": LEARNING_RATE,
                "precision": job.precision,
                "gradientCheckpointing": job.gradient_checkpointing,
                "seed": job.seed,
            },
            "checkpoints": {"everySteps": 0},
            "output": {"uri": f"file://{job.workdir}/out/", "mergeAdapter": False},
            "resources": {"gpus": 1 if job.precision == "bf16" else 0},
        },
    }
    run(local_config(manifest), Path(job.workdir) / "work", metrics=StepMetrics("local", f"bench-{job.case}"))
    return clock.result() | {"trainer_log": next((line for line in lines if "attention" in line), None)}


def peer_model(job: Job) -> tuple[Any, str]:
    """The base model as a peer user loads it for the method (bf16 or 4-bit frozen base, PEFT LoRA adapters)."""
    import torch
    import transformers

    attention = "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"
    options: dict[str, Any] = {"attn_implementation": attention}
    if job.method == "lora" and job.precision == "bf16":
        options["dtype"] = torch.bfloat16
    if job.method == "qlora":
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        options["dtype"] = torch.bfloat16
        options["device_map"] = {"": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(job.model_dir, **options)
    if job.method == "full":
        return model, attention
    import peft

    if job.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.gradient_checkpointing)
    config = peft.LoraConfig(**LORA, target_modules="all-linear", task_type=peft.TaskType.CAUSAL_LM)
    return peft.get_peft_model(model, config), attention


def peer_arguments(job: Job, batch_size: int) -> dict[str, Any]:
    """TrainingArguments both peers share: the same steps, learning rate, precision and no saving or reporting."""
    return {
        "output_dir": str(Path(job.workdir) / "out"),
        "per_device_train_batch_size": batch_size,
        "max_steps": job.total_steps,
        "learning_rate": LEARNING_RATE,
        "bf16": job.precision == "bf16",
        "use_cpu": job.precision != "bf16",
        "gradient_checkpointing": job.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "seed": job.seed,
    }


def counting(collate: Any, tokens: list[int]) -> Any:
    """The collator, noting each batch's real tokens (the Trainer collates in this process, in step order)."""

    def collate_and_count(features: list[dict]) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    return collate_and_count


def step_callback(clock: StepClock, tokens: list[int]) -> Any:
    """Each optimiser step's seconds, end to end (data included, as Tunery's step seconds are), the GPU drained."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimes(TrainerCallback):
        last = 0.0

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.last = now()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            ended = now()
            clock.record(tokens[len(clock.steps)], ended - self.last)
            self.last = ended

    return StepTimes()


def run_hf_flatten(job: Job) -> dict[str, Any]:
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    documents = [{"input_ids": ids} for ids in tokenized_documents(Path(job.model_dir), Path(job.data))]
    model, attention = peer_model(job)
    clock, tokens = StepClock(job), []
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**peer_arguments(job, job.examples_per_step), remove_unused_columns=False),
        train_dataset=documents,
        data_collator=counting(DataCollatorWithFlattening(), tokens),
        callbacks=[step_callback(clock, tokens)],
    )
    trainer.train()
    return clock.result() | {"attention": attention}


def run_trl_pack(job: Job) -> dict[str, Any]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    documents = datasets.Dataset.from_list(
        [{"input_ids": ids} for ids in tokenized_documents(Path(job.model_dir), Path(job.data))]
    )
    model, attention = peer_model(job)
    clock, tokens = StepClock(job), []
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**peer_arguments(job, job.rows_per_step), packing=True, max_length=job.max_length),
        train_dataset=documents,
        callbacks=[step_callback(clock, tokens)],
    )
    trainer.data_collator = counting(trainer.data_collator, tokens)
    trainer.train()
    return clock.result() | {"attention": attention}


RUNNERS = {"tunery": run_tunery, "hf-flatten": run_hf_flatten, "trl-pack": run_trl_pack}


def worker(job: Job) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = RUNNERS[job.path](job)
    print("RESULT " + json.dumps(result), flush=True)


def missing_module(path: str, method: str) -> str | None:
    """The package a path needs and this environment lacks, if any."""
    needed = {"trl-pack": ["trl", "datasets"]}.get(path, []) + {"qlora": ["bitsandbytes"]}.get(method, [])
    needed += ["peft"] if method != "full" else []
    return next((name for name in needed if importlib.util.find_spec(name) is None), None)


def run_job(job: Job, timeout_s: int) -> dict[str, Any]:
    """One path of one case in a fresh process; a failure (out of memory, say) is recorded, not raised."""
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(job))]
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s} s"}
    wall_s = time.perf_counter() - started
    line = next((line for line in reversed(finished.stdout.splitlines()) if line.startswith("RESULT ")), None)
    if finished.returncode != 0 or line is None:
        tail = (finished.stderr or finished.stdout).strip().splitlines()[-12:]
        return {"error": f"exit {finished.returncode}: " + " | ".join(tail), "wall_s": wall_s}
    return json.loads(line.removeprefix("RESULT ")) | {"wall_s": wall_s}


def device_settings(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or peak_tflops_for(name)
    return {"device": name, "peak_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else "table"}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "flash-attn", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_case(case: str, rotation: int, args: argparse.Namespace, scratch: Path, models: dict) -> dict[str, Any]:
    shape_name, method = (SMOKE_CASES if args.smoke else CASES)[case]
    shape, max_length = SHAPES[shape_name], args.max_length
    lengths = document_lengths(args.documents, max_length, args.seed)
    mean_length = statistics.mean(lengths)
    if shape_name not in models:
        models[shape_name] = scratch / f"model-{shape_name}"
        started = time.perf_counter()
        write_model(models[shape_name], shape_name, max_length, "float32" if args.smoke else "bfloat16", args.seed)
        print(f"wrote the random {shape_name} model in {time.perf_counter() - started:.0f} s", flush=True)
    data = scratch / f"documents-{shape_name}.jsonl"
    if not data.exists():
        write_documents(data, lengths, shape["vocab_size"], args.seed)
    context = attended_context(lengths)
    flops = flops_per_token(shape, method, context)
    outcome: dict[str, Any] = {
        "shape": shape_name,
        "method": method,
        "model": shape,
        "attended_context": context,
        "flops_per_token": flops,
        "paths": {},
    }
    chosen = [path for path in PATHS if path in args.paths]
    for path in chosen[rotation % len(chosen) :] + chosen[: rotation % len(chosen)]:
        if missing := missing_module(path, method):
            outcome["paths"][path] = {"skipped": f"{missing} is not importable here"}
            print(f"{case}/{path}: skipped, {missing} is not importable here", flush=True)
            continue
        workdir = scratch / f"{case}-{path}"
        job = Job(
            case=case,
            method=method,
            path=path,
            model_dir=str(models[shape_name]),
            data=str(data),
            workdir=str(workdir),
            max_length=max_length,
            warmup=args.warmup,
            steps=args.steps,
            examples_per_step=max(1, round(args.tokens_per_step / mean_length)),
            rows_per_step=max(1, round(args.tokens_per_step / max_length)),
            precision="fp32" if args.smoke else "bf16",
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
        )
        result = run_job(job, args.path_timeout)
        shutil.rmtree(workdir, ignore_errors=True)
        if "tokens_per_s" in result and args.device["peak_tflops"]:
            result["mfu"] = mfu(result["tokens_per_s"], flops, args.device["peak_tflops"])
        outcome["paths"][path] = result
        print(f"{case}/{path}: {json.dumps(result)}", flush=True)
    return outcome


def cell(result: dict[str, Any], key: str, fmt: str) -> str:
    value = result.get(key)
    return "–" if value is None else fmt.format(value)


def target_note(case: str, result: dict[str, Any], smoke: bool) -> str:
    target = None if smoke else TARGETS.get(case)
    if not target or "tokens_per_s" not in result:
        return ""
    met = result["tokens_per_s"] >= target["tokens_per_s"]
    note = f"≥ {target['tokens_per_s']:,} tokens/s: {'met' if met else 'missed'}"
    if "mfu" in result:
        note += f"; ≥ {target['mfu']:.0%} MFU: {'met' if result['mfu'] >= target['mfu'] else 'missed'}"
    return note


def print_table(report: dict[str, Any]) -> None:
    device = report["settings"]["device"]
    peak = device["peak_tflops"]
    print(
        f"\n{device['device']}, peak {peak or 'unknown (pass --peak-tflops)'} TFLOP/s; maxLength "
        f"{report['settings']['max_length']}, ~{report['settings']['tokens_per_step']} tokens per step, "
        f"{report['settings']['steps']} timed steps after {report['settings']['warmup']}\n"
    )
    print("| case | path | tokens/s | MFU | peak GPU memory (GiB) | peak RSS (MiB) | step (s) | target |")
    print("|---|---|---|---|---|---|---|---|")
    for case, outcome in report["cases"].items():
        for path, result in outcome["paths"].items():
            if "tokens_per_s" not in result:
                reason = result.get("skipped") or result.get("error", "")
                print(f"| {case} | {path} | {'skipped' if 'skipped' in result else 'failed'}: {reason[:200]} ||||||")
                continue
            print(
                f"| {case} | {path} | {cell(result, 'tokens_per_s', '{:,.0f}')} | {cell(result, 'mfu', '{:.1%}')} "
                f"| {cell(result, 'peak_gpu_memory_gib', '{:.1f}')} | {cell(result, 'peak_rss_mib', '{:,.0f}')} "
                f"| {cell(result, 'mean_step_s', '{:.3f}')} | {target_note(case, result, report['settings']['smoke'])} |"
            )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated cases: full, lora, qlora (default: all)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated paths (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 8192 (smoke: 512)")
    parser.add_argument("--documents", type=int, default=None, help="synthetic documents (default 600; smoke 400)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, overriding the table"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--path-timeout", type=int, default=300, help="seconds one path of one case may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, fp32, no QLoRA")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    args.only = args.only.split(",") if args.only else list(cases)
    args.paths = args.paths.split(",")
    for name in args.only:
        if name not in cases:
            parser.error(f"--only: no case {name!r}; choose from {', '.join(cases)}")
    for name in args.paths:
        if name not in PATHS:
            parser.error(f"--paths: no path {name!r}; choose from {', '.join(PATHS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    args.max_length = 128 if args.smoke else 4096
    args.tokens_per_step = args.tokens_per_step or (512 if args.smoke else 8192)
    args.documents = args.documents or (400 if args.smoke else 600)
    return args


def main() -> None:
    if "--worker" in sys.argv:
        worker(Job(**json.loads(sys.argv[sys.argv.index("--worker") + 1])))
        return
    args = parse_arguments()
    args.device = device_settings(args)
    if args.device["peak_tflops"] is None:
        print(f"no peak FLOP/s known for {args.device['device']}: MFU is left out (pass --peak-tflops)", flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "output")}
    report: dict[str, Any] = {"settings": settings | {"versions": versions()}, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="tunery-gpu-bench-") as scratch:
        models: dict[str, Path] = {}
        for rotation, case in enumerate(args.only):
            report["cases"][case] = run_case(case, rotation, args, Path(scratch), models)
    args.output.write_text(json.dumps(report, indent=2))
    print_table(report)
    failed = [
        f"{case}/{path}"
        for case, outcome in report["cases"].items()
        for path, result in outcome["paths"].items()
        if "error" in result
    ]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in the table and {args.output})")


if __name__ == "__main__":
    main()
