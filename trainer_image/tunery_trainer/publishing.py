"""Write the trained model's directory (adapter, merged or full weights, tokenizer, metrics, model card) and publish it."""

import json
import shutil
from pathlib import Path
from typing import Any

from tunery.api.trainer_config import TrainerConfig
from tunery_trainer import disk
from tunery_trainer.checkpoints import Progress, tensor_bytes
from tunery_trainer.model_card import write_model_card
from tunery_trainer.modeling import ADAPTER_METHODS, MERGEABLE_METHODS, auto_class, label_arguments
from tunery_trainer.storage import Storage

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


def publish_model(
    config: TrainerConfig,
    storage: Storage,
    model: Any,
    tokenizer: Any,
    base_model_dir: Path | None,
    progress: Progress,
    data_stats: dict[str, Any],
    label_names: list[str],
    workdir: Path,
) -> dict[str, Any]:
    """Lay the model out under workdir, upload it to the output URI with its manifest last; return the manifest."""
    spec = config.spec
    local = workdir / "publish"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    # The weights in memory: about what their files take (a merged copy beside an adapter takes as much again).
    with disk.writing(local, f"the model for {config.output_uri}", tensor_bytes(list(model.parameters()))):
        layout = _lay_out(config, model, tokenizer, base_model_dir, progress, data_stats, label_names, local)
    manifest = storage.publish(
        local,
        config.output_uri,
        {"revision": config.revision, "name": spec.output.name or config.finetune_job.name, **layout},
    )
    shutil.rmtree(local)
    return manifest


def _lay_out(
    config: TrainerConfig,
    model: Any,
    tokenizer: Any,
    base_model_dir: Path | None,
    progress: Progress,
    data_stats: dict[str, Any],
    label_names: list[str],
    local: Path,
) -> dict[str, Any]:
    """Write the model's directory under `local`; return the manifest's description of it."""
    spec = config.spec
    method = spec.method.type
    layout = {"task": spec.task, "method": method, "labels": label_names, "baseModel": spec.base_model.uri}
    if method in ADAPTER_METHODS:
        model.save_pretrained(local / ADAPTER_DIR)
        tokenizer.save_pretrained(local / ADAPTER_DIR)
        layout["adapter"] = ADAPTER_DIR + "/"
        if spec.output.merge_adapter and method in MERGEABLE_METHODS and base_model_dir is not None:
            _merged(config, local / ADAPTER_DIR, base_model_dir, label_names).save_pretrained(local / MODEL_DIR)
            tokenizer.save_pretrained(local / MODEL_DIR)
            layout["model"] = MODEL_DIR + "/"
    else:
        model.save_pretrained(local / MODEL_DIR)
        tokenizer.save_pretrained(local / MODEL_DIR)
        layout["model"] = MODEL_DIR + "/"
    final_metrics = _final_metrics(progress)
    (local / "metrics.json").write_text(
        json.dumps(
            {
                "final": final_metrics,
                "trainLoss": progress.train_loss,
                "eval": progress.eval_history,
                "tokensSeen": progress.tokens_seen,
            },
            indent=1,
        )
    )
    write_model_card(
        local,
        name=spec.output.name or config.finetune_job.name,
        spec=spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        data_stats=data_stats,
        final_metrics=final_metrics,
        train_loss=progress.train_loss,
        eval_loss=[(step, metrics["evalLoss"]) for step, metrics in progress.eval_history if "evalLoss" in metrics],
        base_model=spec.base_model.uri or f"{spec.base_model.architecture} (from scratch)",
        revision=config.revision,
    )
    return layout


def _merged(config: TrainerConfig, adapter_dir: Path, base_model_dir: Path, label_names: list[str]) -> Any:
    """The adapter folded into a fresh full-precision copy of the base (never into a quantised one)."""
    from peft import PeftModel

    base = auto_class(config.spec.task).from_pretrained(
        base_model_dir, trust_remote_code=config.spec.base_model.trust_remote_code, **label_arguments(label_names)
    )
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _final_metrics(progress: Progress) -> dict[str, float]:
    metrics = dict(progress.eval_history[-1][1]) if progress.eval_history else {}
    if progress.train_loss:
        metrics["trainLoss"] = progress.train_loss[-1][1]
    return metrics
