"""benchmarks/gpu_throughput.py: its FLOP and MFU arithmetic against hand-computed values, and its --smoke run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_throughput.py"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}


def bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_by_hand() -> None:
    gpu = bench()
    # Per layer: q and o 64x64, k and v 64x32 (2 of 4 heads' width), gate, up and down 64x256; the head 64x1024.
    assert gpu.matmul_parameters(TINY) == 2 * (2 * 4096 + 2 * 2048 + 3 * 16384) + 65536 == 188_416
    # Rank 16 on q, o (64+64), k, v (64+32), gate, up, down (64+256): 16 x 1344 per layer.
    assert gpu.lora_parameters(TINY, 16) == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 320) == 45_056
    attention = 6 * 2 * 64 * 100  # 6 L h T at T = 100
    assert gpu.flops_per_token(TINY, "full", 100) == 6 * 188_416 + attention == 1_207_296
    assert gpu.flops_per_token(TINY, "lora", 100) == 4 * (188_416 + 45_056) + 2 * 45_056 + attention == 1_100_800
    assert gpu.flops_per_token(TINY, "qlora", 100) == gpu.flops_per_token(TINY, "lora", 100)
    # The Llama-3.1-8B shape: 7.50e9 parameters in matrix products (its 8.03e9 less the 0.53e9 embedding lookup).
    assert gpu.matmul_parameters(gpu.SHAPES["8b"]) == 32 * 218_103_808 + 4096 * 128_256 == 7_504_658_432


def test_attended_context_weights_documents_by_their_tokens() -> None:
    # Documents of 100 and 300 tokens: a token is three times as likely to sit in the longer one.
    assert bench().attended_context([100, 300]) == (100 * 100 + 300 * 300) / 400 == 250


def test_mfu_and_the_peak_table() -> None:
    gpu = bench()
    assert gpu.mfu(tokens_per_s=12_500, flops=4e10, peak_tflops=1000) == pytest.approx(0.5)
    assert gpu.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops_for("NVIDIA H200") == 989
    assert gpu.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops_for("NVIDIA L4") == 121
    assert gpu.peak_tflops_for("NVIDIA L40S") is None, "an L40S is not an L4"
    assert gpu.peak_tflops_for("cpu") is None


def test_parameter_counts_match_the_real_model_and_peft() -> None:
    import peft
    import torch
    import transformers

    gpu = bench()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    assert gpu.matmul_parameters(TINY) == linear
    config = peft.LoraConfig(**gpu.LORA, target_modules="all-linear", task_type=peft.TaskType.CAUSAL_LM)
    adapted = peft.get_peft_model(model, config)
    trainable = sum(parameter.numel() for parameter in adapted.parameters() if parameter.requires_grad)
    assert gpu.lora_parameters(TINY, gpu.LORA["r"]) == trainable


def test_smoke_run_measures_tunery_from_its_reported_steps(tmp_path: Path) -> None:
    output = tmp_path / "gpu_throughput.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--only=full", "--paths=tunery", "--steps=2", "--warmup=1"]
    result = subprocess.run([*command, f"--output={output}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    case = report["cases"]["full"]
    measured = case["paths"]["tunery"]
    assert "error" not in measured, measured
    assert measured["timed_steps"] == 2 and measured["tokens_per_s"] > 0
    # About --tokens-per-step (512) worth of examples per step, as the trainer reported them.
    assert 256 < measured["tokens_per_step"] < 1024
    assert "attention" in measured["trainer_log"]
    assert case["flops_per_token"] == bench().flops_per_token(TINY, "full", case["attended_context"])
    assert "| full | tunery |" in result.stdout.splitlines()[-1]
