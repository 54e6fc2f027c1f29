"""Running the operator as a real process in tests, and reading what it did from the cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import REPO_ROOT, Kube
from localenv.processes import free_port

NAMESPACE = "operator-e2e"
METRICS_PORT = free_port()
HEALTH_PORT = free_port()
CRD_FILE = REPO_ROOT / "crds" / "tunery.dev_finetunejobs.yaml"


class OperatorProcess:
    """`tunery operator` as a real process, watching one namespace; it can be killed and started again."""

    def __init__(self, kube: Kube, log_path: Path, namespace: str = NAMESPACE, **settings: str) -> None:
        self._env = {
            **os.environ,
            "KUBECONFIG": str(kube.kubeconfig),
            "TUNERY_NAMESPACES": namespace,
            "TUNERY_HEALTH_PORT": str(HEALTH_PORT),
            "TUNERY_METRICS_PORT": str(METRICS_PORT),
            "TUNERY_PENDING_RECHECK_SECONDS": "1",
            "TUNERY_TRAINER_IMAGE": "ghcr.io/tunery/trainer:e2e",
            **settings,
        }
        self._log_path = log_path
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self._log_path, "ab")
        self._process = subprocess.Popen(
            [str(Path(sys.executable).parent / "tunery"), "operator"],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=30)

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-5000:]


def manifest(example: str, name: str, namespace: str = NAMESPACE, **spec_changes) -> str:
    document = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
    document["metadata"] = {
        "name": name,
        "namespace": namespace,
        **{k: v for k, v in document["metadata"].items() if k == "labels"},
    }
    document["spec"].update(spec_changes)
    return yaml.safe_dump(document)


def outcome(fate: str) -> dict:
    """Resources that put the training pod on the kwok node where pods meet `fate` (hack/localenv/kwok-stages.yaml)."""
    return {
        "gpus": 1,
        "memory": "64Gi",
        "nodeSelector": {"tunery.dev/kwok-outcome": fate},
        "tolerations": [{"key": "tunery.dev/kwok-outcome", "operator": "Exists", "effect": "NoSchedule"}],
    }


def get(kube: Kube, kind: str, name: str, namespace: str = NAMESPACE) -> dict:
    return json.loads(kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def wait_for(
    kube: Kube, operator: OperatorProcess, name: str, predicate, timeout: float = 90.0, namespace: str = NAMESPACE
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = get(kube, "ftj", name, namespace)
        if predicate(body.get("status") or {}):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} did not reach the expected state; status: {body.get('status')}\n{operator.log()}"
            )
        time.sleep(0.5)


def children(kube: Kube, kind: str, name: str) -> list[dict]:
    listed = kube.kubectl("get", kind, "-n", NAMESPACE, "-l", f"tunery.dev/finetunejob={name}", "-o", "json").stdout
    return json.loads(listed)["items"]


def events(kube: Kube, name: str, namespace: str = NAMESPACE) -> list[dict]:
    listed = kube.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return json.loads(listed.stdout)["items"]


def wait_for_event(
    kube: Kube, name: str, reason: str, kind: str = "Warning", timeout: float = 30.0, namespace: str = NAMESPACE
) -> dict:
    """The event of this reason about NAME: Kopf posts events in the background, so they may follow the status."""
    deadline = time.monotonic() + timeout
    while True:
        seen = events(kube, name, namespace)
        found = [event for event in seen if event["type"] == kind and event["reason"] == reason]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} event {reason} about {name}; events: {[e['reason'] for e in seen]}")
        time.sleep(0.5)


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})
