"""LoRA FineTuneJobs of a tiny decoder on CPU, written as the trainer config the operator would render."""

from pathlib import Path
from typing import Any

from tunery.local_run import local_config


def lora_manifest(name: str, base: Path, train: Path, output: str, **spec: Any) -> dict[str, Any]:
    """A LoRA job of `base` on `train` (64 tokens a sequence), publishing to `output`; `spec` replaces whole fields."""
    return {
        "apiVersion": "tunery.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": f"file://{base}/"},
            "dataset": {"train": f"file://{train}", "maxLength": 64},
            "method": {"type": "lora"},
            "output": {"uri": output},
            "resources": {"gpus": 0},
            **spec,
        },
    }


def write_trainer_config(manifest: dict[str, Any], path: Path) -> Path:
    """The manifest's trainer config (same revision and output prefix as in a cluster) as a file for --config."""
    path.write_text(local_config(manifest).model_dump_json(by_alias=True, exclude_none=True))
    return path
