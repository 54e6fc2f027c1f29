"""`tunery run`: a manifest trained on this machine, in one process or two (torchrun, gloo), with clear refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import decoder, minilm_path, sentences, write_jsonl

from tunery.api import contract

TUNERY = str(Path(sys.executable).parent / "tunery")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def manifest(tmp_path: Path, base: str, data: str, **extra: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"""apiVersion: tunery.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: two-ranks}}
spec:
  baseModel: {{uri: "{base}"}}
  dataset: {{train: "{data}", maxLength: 64}}
  method: {{type: lora}}
  hyperparameters: {{maxSteps: 6, batchSize: 4, learningRate: 0.01}}
  checkpoints: {{everySteps: 3, keep: 1}}
  output: {{uri: "file://${{OUT_DIR}}/out/"}}
  resources: {{gpus: 0{extra.get("resources", "")}}}
"""
    )
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TUNERY, "run", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow
def test_two_processes_under_torchrun_publish_one_model(tmp_path: Path) -> None:
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(120)])
    job = manifest(tmp_path, f"file://{base}/", f"file://{data}", resources=", nodes: 1")
    result = run_cli(str(job), "--processes=2", env={"OUT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    (revision,) = [path for path in (tmp_path / "out").iterdir()]
    assert f"model published at file://{tmp_path}/out/{revision.name}/" in result.stderr.replace("\n", "")
    manifest_file = json.loads((revision / "tunery-manifest.json").read_text())
    assert manifest_file["method"] == "lora" and manifest_file["adapter"] == "adapter/"
    metrics = json.loads((revision / "metrics.json").read_text())
    # Two ranks of 4 sequences per step: the tokens counted are both ranks' tokens.
    assert [step for step, _ in metrics["trainLoss"]] == [1, 2, 3, 4, 5, 6]
    assert sorted(path.name for path in (revision / "checkpoints").iterdir()) == ["step-00000006"]
    assert result.stdout.count('"model":') == 1
    assert result.stderr.count("data: ") == 2, "both ranks prepare the data"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_trains_like_ddp_and_resumes_exactly(tmp_path: Path, method: str) -> None:
    """Sharding changes where the weights live, not the arithmetic: the same losses and weights as DDP."""
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(120)])
    published: dict[str, Path] = {}
    for strategy in ("ddp", "fsdp"):
        run_dir = tmp_path / strategy
        run_dir.mkdir()
        job = manifest(run_dir, f"file://{base}/", f"file://{data}", resources=f", strategy: {strategy}")
        job.write_text(
            job.read_text()
            .replace("type: lora", f"type: {method}")
            .replace("keep: 1", "keep: 2")
            .replace("batchSize: 4", "batchSize: 2, gradientAccumulationSteps: 2")
        )
        result = run_cli(str(job), "--processes=2", env={"OUT_DIR": str(run_dir)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.count("sharded the model across 2 processes") == (2 if strategy == "fsdp" else 0)
        (published[strategy],) = (run_dir / "out").iterdir()
    ddp, fsdp = (json.loads((published[name] / "metrics.json").read_text())["trainLoss"] for name in ("ddp", "fsdp"))
    assert [step for step, _ in fsdp] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], rel=1e-4)
    assert_same_weights(published["ddp"] / "model", published["fsdp"] / "model")

    # Lose the last checkpoint and the published model: the run resumes from step 3's sharded state.
    shutil.rmtree(published["fsdp"] / "checkpoints" / "step-00000006")
    (published["fsdp"] / "tunery-manifest.json").unlink()
    shutil.move(published["fsdp"] / "model", tmp_path / "first-model")
    result = run_cli(str(tmp_path / "fsdp" / "job.yaml"), "--processes=2", env={"OUT_DIR": str(tmp_path / "fsdp")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at step 3" in result.stderr
    resumed = json.loads((published["fsdp"] / "metrics.json").read_text())["trainLoss"]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in fsdp], rel=1e-4)
    assert_same_weights(tmp_path / "first-model", published["fsdp"] / "model")


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    from safetensors.torch import load_file

    expected, actual = load_file(expected_dir / "model.safetensors"), load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].allclose(tensor, rtol=1e-3, atol=1e-5), name


def test_invalid_manifest_names_the_field(tmp_path: Path) -> None:
    job = manifest(tmp_path, "ftp://nowhere/model", "file:///data/train.jsonl")
    result = run_cli(str(job), env={"OUT_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "spec.baseModel.uri" in result.stderr


def test_unset_variable_is_named(tmp_path: Path) -> None:
    job = manifest(tmp_path, "file:///models/base/", "file:///data/train.jsonl")
    env = {key: value for key, value in os.environ.items() if key != "OUT_DIR"}
    result = subprocess.run([TUNERY, "run", str(job)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and "${OUT_DIR}: not set" in result.stderr


@pytest.mark.slow
def test_the_readme_quickstart_trains_and_says_where_the_model_is(tmp_path: Path) -> None:
    """`make quickstart` as the README gives it, with its checkout copied so that the model lands in tmp_path."""
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "examples" / "quickstart", tmp_path / "examples" / "quickstart")
    result = run_cli(
        str(tmp_path / "examples" / "quickstart" / "finetunejob.yaml"),
        env={"TUNERY_HOME": str(tmp_path), "MINILM_DIR": str(minilm_path())},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (published,) = (tmp_path / ".local" / "quickstart").iterdir()
    assert f"model published at file://{published}/" in result.stderr.replace("\n", "")
    final = json.loads((published / "metrics.json").read_text())["final"]
    assert final["evalAccuracy"] >= 0.9
    assert {"adapter", "model", "README.md", "loss_curve.png", "tunery-manifest.json"} <= {
        path.name for path in published.iterdir()
    }


@pytest.mark.slow
@pytest.mark.skipif(torch_cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_qlora_without_a_gpu_is_refused_with_exit_67(tmp_path: Path) -> None:
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(40)])
    job = manifest(tmp_path, f"file://{base}/", f"file://{data}")
    job.write_text(job.read_text().replace("type: lora", "type: qlora").replace("gpus: 0", "gpus: 1"))
    termination = tmp_path / "termination.json"
    result = run_cli(str(job), env={"OUT_DIR": str(tmp_path), "TUNERY_TERMINATION_MESSAGE_PATH": str(termination)})
    assert result.returncode == 67, result.stderr
    message = json.loads(termination.read_text())
    assert message["reason"] == "Unsupported" and "method.type qlora" in message["message"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("tunery-manifest.json"))


@pytest.mark.slow
def test_a_stopped_run_stops_its_trainer_and_exits_with_its_code(tmp_path: Path) -> None:
    """SIGTERM to `tunery run` (a terminal closed, a CI job cancelled) reaches the trainer instead of orphaning it;
    the trainer checkpoints its step and ends retryable, as a preempted pod does."""
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(120)])
    job = manifest(tmp_path, f"file://{base}/", f"file://{data}")
    job.write_text(job.read_text().replace("maxSteps: 6", "maxSteps: 100000"))
    run = subprocess.Popen(
        [TUNERY, "run", str(job)], env={**os.environ, "OUT_DIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("out/*/checkpoints/step-*")):
        assert run.poll() is None and time.monotonic() < deadline, "training never wrote a checkpoint"
        time.sleep(0.5)
    trainers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert trainers, "tunery run has no trainer child"
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == contract.EXIT_RETRYABLE
    run.stderr.close()
    for pid in map(int, trainers):
        deadline = time.monotonic() + 30
        while running(pid):
            assert time.monotonic() < deadline, f"trainer {pid} still runs after tunery run stopped"
            time.sleep(0.2)


def running(pid: int) -> bool:
    """Whether the process is alive (a zombie waiting for its reparented parent counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
