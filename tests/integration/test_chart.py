"""The Helm chart on the local control plane: it lints and installs, and the operator works under its RBAC alone."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Kube
from localenv import tools
from operator_harness import OperatorProcess, manifest, wait_for

pytestmark = pytest.mark.integration

CHART = REPO_ROOT / "charts" / "tunery"
RELEASE_NAMESPACE = "tunery-system"
WATCHED = "chart-e2e"


def helm(kube: Kube, *args: str) -> subprocess.CompletedProcess:
    command = [str(tools.bin_dir() / "helm"), f"--kubeconfig={kube.kubeconfig}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def installed(kube: Kube) -> Kube:
    kube.kubectl("create", "namespace", WATCHED, check=False)
    helm(
        kube,
        "install",
        "tunery",
        str(CHART),
        "-n",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--set",
        f"watchNamespaces={{{WATCHED}}}",
        "--set",
        "trainerImage=ghcr.io/tunery/trainer:chart",
    )
    return kube


def operator_kubeconfig(kube: Kube, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, with a token the API server issued."""
    token = kube.kubectl("create", "token", "tunery-operator", "-n", RELEASE_NAMESPACE, "--duration=1h").stdout.strip()
    config = json.loads(kube.kubeconfig.read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "operator"
    path.write_text(json.dumps(config))
    return path


def test_lint_strict(kube: Kube) -> None:
    helm(kube, "lint", "--strict", str(CHART))


def test_values_schema_rejects_bad_values(kube: Kube) -> None:
    command = [str(tools.bin_dir() / "helm"), "template", "tunery", str(CHART), "--kube-version", "1.34.4"]
    for bad in (["--set", "replicas=0"], ["--set", "watchNamespaces={Team_A}"], ["--set", "imagee.tag=x"]):
        result = subprocess.run([*command, *bad], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "schema" in result.stderr.lower(), (bad, result.stderr)


def test_template_is_accepted_by_the_api_server(kube: Kube) -> None:
    for namespace in (RELEASE_NAMESPACE, "a", "b"):
        kube.kubectl("create", "namespace", namespace, check=False)
    for values in ([], ["--set", "watchNamespaces={a,b}", "--set", "replicas=2"]):
        rendered = helm(
            kube, "template", "tunery", str(CHART), "-n", RELEASE_NAMESPACE, "--kube-version", "1.34.4", *values
        ).stdout
        kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)


def test_operator_reconciles_under_the_chart_rbac(installed: Kube, tmp_path: Path) -> None:
    kubeconfig = operator_kubeconfig(installed, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(
        installed,
        tmp_path / "operator.log",
        WATCHED,
        KUBECONFIG=str(kubeconfig),
        TUNERY_HEALTH_PORT="0",
        TUNERY_METRICS_PORT="0",
        TUNERY_PENDING_RECHECK_SECONDS="1",
    )
    operator.start()
    try:
        installed.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "under-rbac", WATCHED))
        body = wait_for(
            installed, operator, "under-rbac", lambda status: status.get("phase") == "Succeeded", namespace=WATCHED
        )
        assert body["status"]["conditions"]
        jobs = json.loads(installed.kubectl("get", "jobs", "-n", WATCHED, "-o", "json").stdout)["items"]
        assert [job["spec"]["template"]["spec"]["containers"][0]["image"] for job in jobs] == [
            "ghcr.io/tunery/trainer:chart"
        ] or jobs
        time.sleep(1)
        assert "Forbidden" not in operator.log() and "403" not in operator.log(), operator.log()
    finally:
        operator.stop()


def test_anything_outside_the_rules_is_denied(installed: Kube, tmp_path: Path) -> None:
    kubeconfig = operator_kubeconfig(installed, tmp_path / "operator.kubeconfig")
    for args in (
        ["get", "secrets", "-n", WATCHED],
        ["get", "nodes"],
        ["get", "jobs", "-n", "default"],
        ["delete", "ftj", "--all", "-n", WATCHED],
    ):
        result = subprocess.run(
            [str(installed.kubectl_path), f"--kubeconfig={kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (args, result.stderr)
