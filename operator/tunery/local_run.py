"""`tunery run`: train a FineTuneJob manifest on this machine with the trainer config the operator would render."""

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.api.trainer_config import TrainerConfig
from tunery.api.validation import parse_manifest
from tunery.controller.naming import revision
from tunery.controller.render import TrainingTarget, trainer_config

LOCAL_NAMESPACE = "local"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class LocalRunError(Exception):
    """The manifest cannot be run: each problem names the field (or variable) and the fix."""

    problems: list[str]


def expand_variables(document: Any) -> Any:
    """Replace ${NAME} in every string value with the environment's value, so one manifest works from any checkout."""
    found: set[str] = set()
    _walk(document, lambda text: found.update(_VARIABLE.findall(text)) or text)
    missing = sorted(name for name in found if name not in os.environ)
    if missing:
        raise LocalRunError(
            [f"${{{name}}}: not set in the environment; export it or write the value" for name in missing]
        )
    return _walk(document, lambda text: _VARIABLE.sub(lambda match: os.environ[match.group(1)], text))


def _walk(value: Any, change: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {key: _walk(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_walk(item, change) for item in value]
    return value


def local_config(manifest: Any) -> TrainerConfig:
    """The trainer config for a manifest, exactly as the operator renders it (same revision, same output prefix)."""
    parsed = parse_manifest(manifest)
    if parsed.finetunejob is None:
        raise LocalRunError([f"{error.path}: {error.message}" for error in parsed.errors])
    metadata, spec = parsed.finetunejob.metadata, parsed.finetunejob.spec
    target = TrainingTarget(
        name=metadata.name,
        namespace=metadata.namespace or LOCAL_NAMESPACE,
        uid="local",
        spec=spec,
        revision=revision(spec),
        image="",
    )
    return trainer_config(target)


def train_locally(config: TrainerConfig, processes: int, workdir: Path | None, metrics_port: int | None) -> int:
    """Run `tunery-trainer train` on the config (under torchrun for several processes); return its exit code."""
    with tempfile.TemporaryDirectory(prefix="tunery-run-") as scratch:
        config_file = Path(scratch) / "trainer.json"
        config_file.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
        trainer = ["train", f"--config={config_file}", f"--workdir={workdir or Path(scratch) / 'work'}"]
        if metrics_port is not None:
            trainer.append(f"--metrics-port={metrics_port}")
        if processes > 1:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={processes}",
                "-m",
                "tunery_trainer",
                *trainer,
            ]
        else:
            command = [sys.executable, "-m", "tunery_trainer", *trainer]
        return _run_forwarding_signals(command)


def _run_forwarding_signals(command: list[str]) -> int:
    """Run the trainer until it exits, passing on SIGTERM, SIGINT and SIGHUP (else a stopped `tunery run` leaves
    it training, reparented); a trainer ended by a signal exits 128 + the signal's number, as a shell reports."""
    process = subprocess.Popen(command)
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {number: signal.signal(number, lambda number, _: process.send_signal(number)) for number in forwarded}
    try:
        code = process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return code if code >= 0 else 128 - code
