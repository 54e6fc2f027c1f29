"""A trainer sent SIGTERM (an evicted pod) checkpoints its last step, exits retryable, and resumes losing nothing."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from local_jobs import lora_manifest, write_trainer_config
from tiny_models import decoder, sentences, write_jsonl

from tunery.api import contract

pytestmark = pytest.mark.slow

STEPS = 40
SIGNAL_AFTER = 5
MANIFEST = "tunery-manifest.json"
STEP_LINE = re.compile(r'"event": "step", "step": (\d+)')
PREEMPTED_LINE = re.compile(r"Preempted: .* checkpointed step (\d+)")
GRACE_SECONDS = 300


def trainer_config(tmp_path: Path) -> Path:
    # No scheduled checkpoint before the last step: the one a preempted run leaves can only be the SIGTERM's.
    manifest = lora_manifest(
        "preempted",
        decoder(tmp_path / "base"),
        write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in sentences(200, 3)]),
        f"file://{tmp_path}/out/",
        hyperparameters={"maxSteps": STEPS, "batchSize": 4},
        evaluation={"everySteps": 1000},
        checkpoints={"everySteps": 1000, "keep": 2},
    )
    return write_trainer_config(manifest, tmp_path / "config.json")


def start(config: Path, workdir: Path, termination: Path, processes: int = 1) -> subprocess.Popen:
    """The trainer as the pod runs it: alone, or under torchrun (gloo on CPU), in a session of its own."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    trainer = ["-m", "tunery_trainer", "train", f"--config={config}", f"--workdir={workdir}", "--log-every=1"]
    return subprocess.Popen(
        [sys.executable, *launcher, *trainer],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            "TUNERY_TERMINATION_MESSAGE_PATH": str(termination),
            contract.GRACE_SECONDS_ENV: str(GRACE_SECONDS),
        },
    )


def stop_mid_run(process: subprocess.Popen, signal_group: bool) -> str:
    """Let the run pass step SIGNAL_AFTER, send SIGTERM to the process (or to every process of its group), and
    return the whole log once it has exited."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if (match := STEP_LINE.search(line)) and int(match.group(1)) >= SIGNAL_AFTER:
            if signal_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail("".join(seen))
    rest, _ = process.communicate(timeout=120)
    return "".join(seen) + rest


def checkpointed(output: Path) -> list[str]:
    return sorted(path.name for path in (output / "checkpoints").iterdir() if (path / MANIFEST).exists())


@pytest.mark.parametrize(
    ("processes", "signal_group"),
    [(1, False), (2, True), (2, False)],
    ids=["one-process", "torchrun-every-process", "torchrun-alone"],
)
def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_from_it(
    tmp_path: Path, processes: int, signal_group: bool
) -> None:
    """torchrun alone is what a pod's PID 1 gets from the kubelet; torchrun passes the signal on to its ranks."""
    config = trainer_config(tmp_path)
    output = Path(json.loads(config.read_text())["outputUri"].removeprefix("file://"))
    termination = tmp_path / "termination.json"
    process = start(config, tmp_path / "work", termination, processes)
    log = stop_mid_run(process, signal_group)
    # The container's exit code: the Job's podFailurePolicy retries it.
    assert process.returncode == contract.EXIT_RETRYABLE, log
    reached = max(int(step) for step in STEP_LINE.findall(log))
    assert SIGNAL_AFTER <= reached < STEPS
    # Every rank stopped after the same step, the one rank 0 logged last, and checkpointed it once.
    assert PREEMPTED_LINE.findall(log) == [str(reached)] * processes, log
    assert checkpointed(output) == [f"step-{reached:08d}"], log
    assert log.count("SIGTERM: checkpointing this step and stopping within the") == processes, log
    assert re.search(rf"within the \d+ s left of the pod's {GRACE_SECONDS} s grace period", log), log
    message = json.loads(termination.read_text())
    assert message["reason"] == "Preempted" and f"of a {GRACE_SECONDS} s grace period" in message["message"]
    assert not (output / MANIFEST).exists()

    process = start(config, tmp_path / "work-retry", termination, processes)
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    assert f"step-{reached:08d}/ at step {reached}" in log
    metrics = json.loads((output / "metrics.json").read_text())
    assert [step for step, _ in metrics["trainLoss"]] == list(range(1, STEPS + 1))
