"""Shared fixtures: the local control plane and SeaweedFS, started once per session through hack/local-env."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "hack"))

from localenv import tools  # noqa: E402

LOCAL_ENV = REPO_ROOT / "hack" / "local-env"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))
INVALID_MANIFESTS = sorted((REPO_ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))


@dataclass(frozen=True)
class Kube:
    """A running local control plane: its kubeconfig and a kubectl bound to it."""

    kubeconfig: Path
    kubectl_path: Path
    cache_dir: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def _local_env(state_dir: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(LOCAL_ENV), *args, f"--state-dir={state_dir}"], check=True)


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok GPU nodes, on loopback."""
    state_dir = tmp_path_factory.mktemp("kube-env")
    _local_env(state_dir, "up", "--only=kube")
    try:
        yield Kube(state_dir / "kube" / "kubeconfig", tools.bin_dir() / "kubectl", state_dir / "kubectl-cache")
    finally:
        _local_env(state_dir, "down")


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """SeaweedFS as an S3 server on loopback, with access keys enforced: endpoint and keys as env variables."""
    state_dir = tmp_path_factory.mktemp("s3-env")
    _local_env(state_dir, "up", "--only=s3")
    try:
        yield json.loads((state_dir / "s3" / "settings.json").read_text())
    finally:
        _local_env(state_dir, "down")


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Debian's promtool (fetched by hack/local-env build)."""
    return tools.ensure_prometheus() / "promtool"


@pytest.fixture
def cli_env() -> dict[str, str]:
    """The environment for running the `tunery` console script of this interpreter's environment."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "COLUMNS": "200"}
