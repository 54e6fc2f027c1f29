"""Every method on the tasks it applies to trains a tiny model for real, the loss falls, and the output loads back."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import WARM, decoder, encoder, minilm_path, sentence_parts, sentences, write_jsonl

from tunery.api.spec import FineTuneJobSpec
from tunery.local_run import local_config
from tunery_trainer.job import run
from tunery_trainer.metrics import TrainerMetrics
from tunery_trainer.progress import ProgressReporter, StatusEndpoint
from tunery_trainer.publishing import ADAPTER_DIR, MODEL_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": decoder(root / "llama"),
        "gpt2": decoder(root / "gpt2", "gpt2"),
        "bert": encoder(root / "bert"),
        "minilm": minilm_path(),
    }


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    parts = sentence_parts(240, seed=1)
    return {
        "text": write_jsonl(root / "text.jsonl", [{"text": text} for text in sentences(240, seed=1)]),
        "chat": write_jsonl(
            root / "chat.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": f"what colour are {number} {thing}?"},
                        {"role": "assistant", "content": colour},
                    ]
                }
                for number, thing, colour in parts
            ],
        ),
        "labelled": write_jsonl(
            root / "labelled.jsonl",
            [
                {"text": f"{number} {thing} is {colour} .", "label": "warm" if colour in WARM else "cool"}
                for number, thing, colour in parts
            ],
        ),
        "tagged": write_jsonl(
            root / "tagged.jsonl",
            [
                {"tokens": [number, thing, "is", colour, "."], "tags": ["O", "B-THING", "O", "B-COLOUR", "O"]}
                for number, thing, colour in parts
            ],
        ),
    }


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "tunery.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def train_case(
    tmp_path: Path, spec: dict[str, Any], metrics: TrainerMetrics | None = None, status: ProgressReporter | None = None
):
    spec = {
        "resources": {"gpus": 0},
        "output": {"uri": f"file://{tmp_path}/out/"},
        "checkpoints": {"everySteps": 0, "keep": 1},
        **spec,
    }
    config = local_config(manifest("case", spec))
    outcome = run(config, tmp_path / "work", metrics, status)
    return outcome, Path(config.output_uri.removeprefix("file://"))


def loss_fell(losses: list[tuple[int, float]]) -> bool:
    values = [loss for _, loss in losses]
    # Adapters on a random tiny base learn slowly (its embeddings are frozen and random): any steady drop counts, and
    # with fixed seeds the run is deterministic, so a pass is not luck.
    return sum(values[-4:]) / 4 < sum(values[:4]) / 4


CASES = [
    # (id, base, task, data, method, learning rate)
    ("causal-full", "llama", "causal-lm", "chat", {"type": "full"}, 3e-3),
    ("causal-lora", "llama", "causal-lm", "chat", {"type": "lora", "lora": {"rank": 8, "alpha": 16}}, 1e-2),
    ("causal-ia3", "llama", "causal-lm", "text", {"type": "ia3"}, 5e-2),
    ("causal-prompt", "llama", "causal-lm", "text", {"type": "prompt-tuning"}, 5e-2),
    ("causal-prefix", "llama", "causal-lm", "text", {"type": "prefix-tuning"}, 5e-2),
    ("causal-bitfit", "gpt2", "causal-lm", "text", {"type": "bitfit"}, 3e-2),
    ("mlm-full", "bert", "masked-lm", "text", {"type": "full"}, 3e-3),
    ("mlm-lora", "bert", "masked-lm", "text", {"type": "lora"}, 1e-2),
    ("mlm-bitfit", "bert", "masked-lm", "text", {"type": "bitfit"}, 3e-2),
    ("seqcls-full", "minilm", "sequence-classification", "labelled", {"type": "full"}, 3e-3),
    ("seqcls-lora", "minilm", "sequence-classification", "labelled", {"type": "lora"}, 2e-3),
    ("seqcls-ia3", "minilm", "sequence-classification", "labelled", {"type": "ia3"}, 1e-2),
    ("seqcls-prompt", "minilm", "sequence-classification", "labelled", {"type": "prompt-tuning"}, 5e-2),
    ("seqcls-bitfit", "minilm", "sequence-classification", "labelled", {"type": "bitfit"}, 3e-2),
    ("tokcls-full", "minilm", "token-classification", "tagged", {"type": "full"}, 3e-3),
    ("tokcls-lora", "minilm", "token-classification", "tagged", {"type": "lora"}, 2e-3),
    ("tokcls-bitfit", "minilm", "token-classification", "tagged", {"type": "bitfit"}, 3e-2),
]


@pytest.mark.parametrize(
    ("base", "task", "data", "method", "learning_rate"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_method_trains_and_loads_back(
    tmp_path: Path,
    bases: dict[str, Path],
    datasets: dict[str, Path],
    base: str,
    task: str,
    data: str,
    method: dict[str, Any],
    learning_rate: float,
) -> None:
    outcome, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases[base]}/"},
            "task": task,
            "dataset": {"train": f"file://{datasets[data]}", "maxLength": 128, "validationSplit": 0.1},
            "method": method,
            "hyperparameters": {"maxSteps": 24, "batchSize": 8, "learningRate": learning_rate, "warmupRatio": 0.0},
            "evaluation": {"everySteps": 12, "metrics": ["loss"]},
        },
    )
    assert outcome.progress.step == 24
    assert {name for _, evaluated in outcome.progress.eval_history for name in evaluated} == {"evalLoss"}
    assert loss_fell(outcome.progress.train_loss), " ".join(f"{loss:.3f}" for _, loss in outcome.progress.train_loss)
    assert (published / "tunery-manifest.json").is_file()
    assert (published / "README.md").is_file() and (published / "loss_curve.png").is_file()
    model = load_published(published, task, method["type"], bases[base])
    check_inference(model, published, task)


def test_only_the_listed_metrics_and_loss_are_computed_and_reported(
    tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path]
) -> None:
    """metrics [loss, accuracy] on a classifier: the status, metrics.json, the card and Prometheus carry no f1."""
    sent: list[dict[str, Any]] = []
    endpoint = StatusEndpoint("https://127.0.0.1:6443", "token", None, "team-a", "case")
    status = ProgressReporter(endpoint, min_interval_s=0, send=lambda _, body: sent.append(body))
    prometheus = TrainerMetrics("team-a", "case")
    _, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases['minilm']}/"},
            "task": "sequence-classification",
            "dataset": {"train": f"file://{datasets['labelled']}", "maxLength": 64, "validationSplit": 0.1},
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 4, "batchSize": 8},
            "evaluation": {"everySteps": 2, "metrics": ["loss", "accuracy"]},
        },
        prometheus,
        status,
    )
    evaluated = {"evalLoss", "evalAccuracy"}
    assert {name for name in sent[-1]["status"]["metrics"] if name.startswith("eval")} == evaluated
    results = json.loads((published / "metrics.json").read_text())
    assert [set(metrics) for _, metrics in results["eval"]] == [evaluated, evaluated]
    assert set(results["final"]) == evaluated | {"trainLoss"}
    card = (published / "README.md").read_text().split("## Results")[1].split("##")[0]
    assert {row.split("|")[1].strip() for row in card.splitlines()[4:] if row} == evaluated | {"trainLoss"}
    gauges = {
        sample.labels["metric"]
        for family in prometheus.registry.collect()
        if family.name == "tunery_trainer_eval"
        for sample in family.samples
    }
    assert gauges == {"loss", "accuracy"}


def load_published(published: Path, task: str, method: str, base_dir: Path):
    from tunery_trainer.modeling import auto_class

    if (published / MODEL_DIR).is_dir():
        return auto_class(task).from_pretrained(published / MODEL_DIR)
    from peft import PeftModel

    assert method in ("prompt-tuning", "prefix-tuning")
    base = auto_class(task).from_pretrained(base_dir, **_labels(published / ADAPTER_DIR, task))
    return PeftModel.from_pretrained(base, published / ADAPTER_DIR)


def _labels(adapter_dir: Path, task: str) -> dict[str, Any]:
    if task != "sequence-classification":
        return {}
    return {"num_labels": 2}


def check_inference(model, published: Path, task: str) -> None:
    from transformers import AutoTokenizer

    tokenizer_dir = published / MODEL_DIR if (published / MODEL_DIR).is_dir() else published / ADAPTER_DIR
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    inputs = tokenizer(["three apple is"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        if task == "causal-lm":
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert generated.shape[1] > inputs["input_ids"].shape[1]
        else:
            logits = model(**inputs).logits
            expected = {"masked-lm": len(tokenizer), "sequence-classification": 2, "token-classification": 3}[task]
            assert logits.shape[-1] == expected


def test_lora_changes_only_adapter_weights(tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path]) -> None:
    _, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases['llama']}/"},
            "dataset": {"train": f"file://{datasets['chat']}", "maxLength": 128},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "learningRate": 1e-2},
        },
    )
    adapter = load_file(published / ADAPTER_DIR / "adapter_model.safetensors")
    assert adapter and all("lora_A" in name or "lora_B" in name for name in adapter)
    assert any(float(tensor.abs().sum()) > 0 for name, tensor in adapter.items() if "lora_B" in name)
    base = load_file(bases["llama"] / "model.safetensors")
    merged = load_file(published / MODEL_DIR / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed, "the merged model equals the base: the adapter learned nothing"
    assert all(name.endswith("proj.weight") for name in changed), changed


@pytest.mark.parametrize("variant", ["useDora", "useRslora"])
def test_dora_and_rslora_train_only_their_adapter(
    tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path], variant: str
) -> None:
    _, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases['llama']}/"},
            "dataset": {"train": f"file://{datasets['chat']}", "maxLength": 128},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8, variant: True}},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "learningRate": 1e-2},
        },
    )
    adapter_config = json.loads((published / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (variant == "useDora")
    assert adapter_config["use_rslora"] is (variant == "useRslora")
    adapter = load_file(published / ADAPTER_DIR / "adapter_model.safetensors")
    # DoRA adds a trained magnitude vector per adapted layer; rsLoRA only rescales.
    assert any("lora_magnitude_vector" in name for name in adapter) is (variant == "useDora")
    assert all("lora_" in name for name in adapter)
    base = load_file(bases["llama"] / "model.safetensors")
    merged = load_file(published / MODEL_DIR / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed), changed
    import peft
    import transformers

    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(bases["llama"]), published / ADAPTER_DIR
    )
    scalings = {
        module.scaling["default"] for module in loaded.modules() if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    # alpha 8, rank 4: rsLoRA scales by 8 / sqrt(4), plain LoRA (and DoRA) by 8 / 4.
    assert scalings == {4.0 if variant == "useRslora" else 2.0}


def test_bitfit_changes_only_biases(tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path]) -> None:
    _, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases['gpt2']}/"},
            "dataset": {"train": f"file://{datasets['text']}", "maxLength": 128},
            "method": {"type": "bitfit"},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "learningRate": 1e-2},
        },
    )
    base = load_file(bases["gpt2"] / "model.safetensors")
    trained = load_file(published / MODEL_DIR / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed and all(name.endswith(".bias") for name in changed), changed


def test_pretraining_from_scratch_trains_a_tokenizer(tmp_path: Path, datasets: dict[str, Path]) -> None:
    outcome, published = train_case(
        tmp_path,
        {
            "baseModel": {
                "architecture": "llama",
                "config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                },
                "tokenizer": {"trainVocabSize": 300},
            },
            "dataset": {"train": f"file://{datasets['text']}", "maxLength": 128},
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 24, "batchSize": 8, "learningRate": 3e-3, "warmupRatio": 0.0},
        },
    )
    assert loss_fell(outcome.progress.train_loss)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(published / MODEL_DIR)
    assert len(tokenizer) <= 300 and tokenizer.eos_token == "</s>"
    check_inference(load_published(published, "causal-lm", "full", Path()), published, "causal-lm")


@pytest.mark.parametrize(
    ("method", "precision", "device", "expected"),
    [
        ("lora", "bf16", "cuda", torch.bfloat16),
        ("ia3", "bf16", "cuda", torch.bfloat16),
        ("full", "bf16", "cuda", None),
        ("bitfit", "bf16", "cuda", None),
        ("qlora", "bf16", "cuda", None),
        ("lora", "fp32", "cuda", None),
        ("lora", "bf16", "cpu", None),
    ],
)
def test_frozen_base_weights_are_bf16_only_for_adapters_computing_in_bf16_on_a_gpu(
    method: str, precision: str, device: str, expected: torch.dtype | None
) -> None:
    from tunery_trainer.modeling import frozen_base_dtype

    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///base/"},
            "dataset": {"train": "file:///train.jsonl"},
            "output": {"uri": "file:///out/"},
            "method": {"type": method},
            "hyperparameters": {"precision": precision},
        }
    )
    assert frozen_base_dtype(spec, torch.device(device)) == expected


def test_ranks_on_one_node_share_its_cpus_for_tokenising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunery_trainer import job

    cpu_limit = tmp_path / "cpu.max"
    monkeypatch.setattr(job.os, "sched_getaffinity", lambda _: set(range(8)))
    monkeypatch.setattr(job, "Path", lambda _: cpu_limit)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert job.tokenizing_processes() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert job.tokenizing_processes() == 1
    # A container limited to 3.5 CPUs, one rank.
    cpu_limit.write_text("350000 100000\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert job.tokenizing_processes() == 4
    cpu_limit.write_text("max 100000\n")
    assert job.tokenizing_processes() == 8


def test_a_compiled_run_takes_the_steps_an_eager_run_takes(
    tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    def losses(compiled: bool) -> list[float]:
        outcome, _ = train_case(
            tmp_path / str(compiled),
            {
                "baseModel": {"uri": f"file://{bases['llama']}/"},
                "dataset": {"train": f"file://{datasets['text']}", "maxLength": 64},
                "method": {"type": "full"},
                "hyperparameters": {"maxSteps": 3, "batchSize": 4, "learningRate": 3e-3, "compile": compiled},
            },
        )
        return [loss for _, loss in outcome.progress.train_loss]

    with caplog.at_level("INFO", logger="tunery_trainer"):
        compiled = losses(True)
    assert "compiling the model's 2 blocks" in caplog.text
    # Inductor fuses and reorders float operations: the same steps, not the same bits.
    assert compiled == pytest.approx(losses(False), rel=1e-3)


def test_a_mixture_of_chats_and_texts_trains_and_its_card_says_what_was_drawn(
    tmp_path: Path, bases: dict[str, Path], datasets: dict[str, Path]
) -> None:
    outcome, published = train_case(
        tmp_path,
        {
            "baseModel": {"uri": f"file://{bases['llama']}/"},
            "dataset": {
                "mixture": [
                    {"uri": f"file://{datasets['chat']}", "weight": 3},
                    {"uri": f"file://{datasets['text']}", "weight": 1},
                ],
                "maxLength": 64,
            },
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 2, "batchSize": 4},
        },
    )
    card = (published / "README.md").read_text()
    # 240 rows each, 105 distinct, 10 held out for validation: 95 kept of each, 190 drawn 3 to 1.
    assert f"file://{datasets['chat']}: 142 drawn of 95 (240 rows read)" in card
    assert f"file://{datasets['text']}: 48 drawn of 95 (240 rows read)" in card
    assert "| trainExamples | 190 |" in card
    assert outcome.progress.step == 2
