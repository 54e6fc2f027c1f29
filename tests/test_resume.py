"""A trainer killed mid-run resumes from its latest complete checkpoint and ends where an uninterrupted run ends."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from local_jobs import lora_manifest, write_trainer_config
from tiny_models import decoder, sentences, write_jsonl

from tunery.local_run import local_config

pytestmark = pytest.mark.slow

MANIFEST = "tunery-manifest.json"

STEPS = 60
EVERY = 10
# Same seeds, same data order, same per-step random streams: on one CPU the resumed losses are bit-identical in
# practice; the tolerance only allows for a different summation order in another BLAS.
TOLERANCE = 1e-4


def trainer_config(tmp_path: Path, base: Path, data: Path, name: str, **spec: Any) -> Path:
    manifest = lora_manifest(
        name,
        base,
        data,
        f"file://{tmp_path}/{name}/",
        dataset={"train": f"file://{data}", "maxLength": 64, "validationSplit": 0.1},
        hyperparameters={"maxSteps": STEPS, "batchSize": 4, "learningRate": 1e-2},
        evaluation={"everySteps": 30},
        checkpoints={"everySteps": EVERY, "keep": 2},
        **spec,
    )
    return write_trainer_config(manifest, tmp_path / f"{name}.json")


def start(config: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunery_trainer", "train", f"--config={config}", f"--workdir={workdir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TUNERY_TERMINATION_MESSAGE_PATH": str(workdir.parent / "termination.json")},
    )


def published(config: Path) -> Path:
    return Path(json.loads(config.read_text())["outputUri"].removeprefix("file://"))


def losses(config: Path) -> dict[int, float]:
    metrics = json.loads((published(config) / "metrics.json").read_text())
    return {step: loss for step, loss in metrics["trainLoss"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    return decoder(root / "base"), write_jsonl(root / "train.jsonl", [{"text": text} for text in sentences(300, 3)])


@pytest.fixture(scope="module")
def preference_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_preference_training import pairs

    return write_jsonl(tmp_path_factory.mktemp("resume-pairs") / "pairs.jsonl", pairs(300, seed=3))


# DPO's reference log-probabilities are the base model's: a resumed run must compute them before it restores the
# checkpoint's weights, or its losses drift from the uninterrupted run's.
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_killed_run_resumes_exactly(
    tmp_path: Path, inputs: tuple[Path, Path], preference_pairs: Path, objective: str
) -> None:
    base, data = inputs
    spec: dict[str, Any] = {}
    if objective == "dpo":
        data, spec = preference_pairs, {"objective": {"type": "dpo"}}
    uninterrupted = trainer_config(tmp_path, base, data, "uninterrupted", **spec)
    process = start(uninterrupted, tmp_path / "work-a")
    assert process.wait(timeout=600) == 0, process.stdout.read()

    interrupted = trainer_config(tmp_path, base, data, "interrupted", **spec)
    checkpoints = published(interrupted) / "checkpoints"
    process = start(interrupted, tmp_path / "work-b")
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-00000020" / "tunery-manifest.json").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_output = process.stdout.read()
    assert "published the model" not in killed_output
    assert not (published(interrupted) / "tunery-manifest.json").exists()
    # A checkpoint that was being written when the process died: files, no manifest. It must be ignored.
    half = checkpoints / "step-00000050"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"partial")

    process = start(interrupted, tmp_path / "work-c")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    resumed_from = int(output.split("resuming from ")[1].split(" at step ")[1].split()[0])
    assert 20 <= resumed_from < STEPS and resumed_from % EVERY == 0
    expected, got = losses(uninterrupted), losses(interrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(expected[step] - got[step]) for step in range(resumed_from + 1, STEPS + 1)) < TOLERANCE
    kept = sorted(path.name for path in checkpoints.iterdir() if (path / "tunery-manifest.json").exists())
    assert kept == [f"step-{STEPS - EVERY:08d}", f"step-{STEPS:08d}"]


def owned_config(tmp_path: Path, base: Path, data: Path, uid: str, resume_from_uid: str | None = None):
    """A 20-step run with checkpoints every 10, as the FineTuneJob with this UID (the name and revision stay:
    resumeFromUid changes nothing that is trained, so the adopting run looks in the same checkpoint prefix)."""
    checkpoints = {"everySteps": EVERY, "keep": 3, **({"resumeFromUid": resume_from_uid} if resume_from_uid else {})}
    config = local_config(
        lora_manifest(
            "owned",
            base,
            data,
            f"file://{tmp_path}/owned/",
            dataset={"train": f"file://{data}", "maxLength": 64, "validationSplit": 0.1},
            hyperparameters={"maxSteps": 20, "batchSize": 4},
            checkpoints=checkpoints,
        )
    )
    return config.model_copy(update={"finetune_job": config.finetune_job.model_copy(update={"uid": uid})})


def test_checkpoints_of_another_finetunejob_are_not_resumed(
    tmp_path: Path, inputs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from tunery_trainer.job import run

    caplog.set_level(logging.INFO)
    base, data = inputs
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    config = owned_config(tmp_path, base, data, first)
    checkpoints = Path(config.checkpoint_uri.removeprefix("file://"))
    run(config, tmp_path / "work")
    manifests = [json.loads((checkpoints / f"step-{step:08d}" / MANIFEST).read_text()) for step in (10, 20)]
    assert [manifest["finetuneJobUid"] for manifest in manifests] == [first, first]

    # Deleted and created again under the same name: same revision, same checkpoints, another UID.
    caplog.clear()
    outcome = run(owned_config(tmp_path, base, data, second), tmp_path / "work")
    assert f"written by FineTuneJob UID {first}, not this one; set spec.checkpoints.resumeFromUid" in caplog.text
    assert "resuming from" not in caplog.text
    assert [step for step, _ in outcome.progress.train_loss] == list(range(1, 21))

    # Adopting them takes the spec's word for it.
    caplog.clear()
    adopting = owned_config(tmp_path, base, data, third, resume_from_uid=second)
    assert adopting.checkpoint_uri == config.checkpoint_uri
    run(adopting, tmp_path / "work")
    assert f"resuming from {config.checkpoint_uri}step-00000020/ at step 20" in caplog.text

    # A checkpoint that names no UID (pre-staged, or from an older trainer) is refused: the newest own one is used.
    newest = checkpoints / "step-00000020" / MANIFEST
    newest.write_text(
        json.dumps({key: value for key, value in json.loads(newest.read_text()).items() if key != "finetuneJobUid"})
    )
    caplog.clear()
    run(owned_config(tmp_path, base, data, second), tmp_path / "work")
    assert f"{config.checkpoint_uri}step-00000020/: it records no FineTuneJob UID" in caplog.text
    assert f"resuming from {config.checkpoint_uri}step-00000010/ at step 10" in caplog.text


def test_a_resumed_run_reports_the_stored_checkpoints_before_its_first_step(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    """status.checkpoints is read from storage: a retried pod lists the complete ones at once, no half-written one."""
    from tunery_trainer.job import run
    from tunery_trainer.progress import ProgressReporter, StatusEndpoint

    def reporter(sent: list[dict]) -> ProgressReporter:
        endpoint = StatusEndpoint("https://127.0.0.1:6443", "token", None, "default", "owned")
        return ProgressReporter(endpoint, min_interval_s=0, send=lambda _, body: sent.append(body["status"]))

    base, data = inputs
    config = owned_config(tmp_path, base, data, str(uuid.uuid4()))
    checkpoints = Path(config.checkpoint_uri.removeprefix("file://"))
    first: list[dict] = []
    run(config, tmp_path / "work", status=reporter(first))
    assert "checkpoints" not in first[0]
    step_10, _ = first[-1]["checkpoints"]
    assert step_10["step"] == 10 and step_10["uri"] == f"{config.checkpoint_uri}step-00000010/"
    # The pod died while step 20 was being written: its files are there, its manifest is not.
    (checkpoints / "step-00000020" / MANIFEST).unlink()

    retried: list[dict] = []
    outcome = run(config, tmp_path / "work", status=reporter(retried))
    assert retried[0]["progress"]["step"] == 10 and retried[0]["checkpoints"] == [step_10]
    assert retried[1]["progress"]["step"] == 11
    eval_loss = dict(outcome.progress.eval_history)[20]["evalLoss"]
    step_20 = {"step": 20, "uri": f"{config.checkpoint_uri}step-00000020/", "evalLoss": eval_loss}
    assert retried[-1]["checkpoints"] == [step_10, step_20]
