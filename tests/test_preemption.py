"""A trainer sent SIGTERM (an evicted pod) checkpoints its last step, exits retryable, and resumes losing nothing."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import decoder, sentences, write_jsonl

from tunery.api import contract
from tunery.local_run import local_config

pytestmark = pytest.mark.slow

STEPS = 40
SIGNAL_AFTER = 5
MANIFEST = "tunery-manifest.json"
STEP_LINE = re.compile(r'"event": "step", "step": (\d+)')


def trainer_config(tmp_path: Path) -> Path:
    # No scheduled checkpoint before the last step: the one a preempted run leaves can only be the SIGTERM's.
    config = local_config(
        {
            "apiVersion": "tunery.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "preempted"},
            "spec": {
                "baseModel": {"uri": f"file://{decoder(tmp_path / 'base')}/"},
                "dataset": {
                    "train": f"file://{write_jsonl(tmp_path / 'train.jsonl', [{'text': t} for t in sentences(200, 3)])}",
                    "maxLength": 64,
                },
                "method": {"type": "lora"},
                "hyperparameters": {"maxSteps": STEPS, "batchSize": 4},
                "evaluation": {"everySteps": 1000},
                "checkpoints": {"everySteps": 1000, "keep": 2},
                "output": {"uri": f"file://{tmp_path}/out/"},
                "resources": {"gpus": 0},
            },
        }
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


def start(config: Path, workdir: Path, termination: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunery_trainer",
            "train",
            f"--config={config}",
            f"--workdir={workdir}",
            "--log-every=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TUNERY_TERMINATION_MESSAGE_PATH": str(termination)},
    )


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_from_it(tmp_path: Path) -> None:
    config = trainer_config(tmp_path)
    output = Path(json.loads(config.read_text())["outputUri"].removeprefix("file://"))
    termination = tmp_path / "termination.json"
    process = start(config, tmp_path / "work", termination)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if (match := STEP_LINE.search(line)) and int(match.group(1)) >= SIGNAL_AFTER:
            process.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail("".join(seen))
    rest, _ = process.communicate(timeout=120)
    log = "".join(seen) + rest
    assert process.returncode == contract.EXIT_RETRYABLE, log
    reached = max(int(step) for step in STEP_LINE.findall(log))
    assert SIGNAL_AFTER <= reached < STEPS
    checkpoints = output / "checkpoints"
    kept = sorted(path.name for path in checkpoints.iterdir() if (path / MANIFEST).exists())
    assert kept == [f"step-{reached:08d}"], log
    assert json.loads(termination.read_text())["reason"] == "Preempted"
    assert not (output / MANIFEST).exists()

    process = start(config, tmp_path / "work-retry", termination)
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    assert f"step-{reached:08d}/ at step {reached}" in log
    metrics = json.loads((output / "metrics.json").read_text())
    assert [step for step, _ in metrics["trainLoss"]] == list(range(1, STEPS + 1))
