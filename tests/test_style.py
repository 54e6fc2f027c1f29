"""The code follows the project's lint and format rules (ruff, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

SOURCES = ["operator", "trainer_image", "tests", "hack", "benchmarks"]
RUFF = str(Path(sys.executable).parent / "ruff")


def test_ruff_lint() -> None:
    result = subprocess.run([RUFF, "check", *SOURCES], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ruff_format() -> None:
    result = subprocess.run([RUFF, "format", "--check", *SOURCES], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + "\nrun: .venv/bin/ruff format " + " ".join(SOURCES)
