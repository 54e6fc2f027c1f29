"""GPU-only checks, run on a lent GPU machine (`-m gpu`): QLoRA and bf16 LoRA on a tiny Llama train and publish."""

from pathlib import Path

import pytest
from local_jobs import lora_manifest
from tiny_models import decoder, sentences, write_jsonl

from tunery.local_run import local_config
from tunery_trainer.job import run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_adapter_on_gpu_trains_and_publishes(tmp_path: Path, method: str) -> None:
    import torch

    assert torch.cuda.is_available(), "the gpu tier runs only where a GPU is visible"
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(200)])
    manifest = lora_manifest(
        method,
        base,
        data,
        f"file://{tmp_path}/out/",
        method={"type": method},
        hyperparameters={"maxSteps": 20, "batchSize": 8, "learningRate": 1e-2, "precision": "bf16"},
        resources={"gpus": 1},
    )
    config = local_config(manifest)
    outcome = run(config, tmp_path / "work")
    losses = [loss for _, loss in outcome.progress.train_loss]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert (Path(config.output_uri.removeprefix("file://")) / "model" / "model.safetensors").is_file()
