"""FineTuneJobs the operator drove, judged as Flux does (cli-utils' kstatus) and as Argo CD does (the chart's Lua)."""

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import yaml
from health import argocd_health, kstatus
from monitoring_files import CHART

from conftest import REPO_ROOT, Kube
from localenv import tools
from operator_harness import CRD_FILE, OperatorProcess, condition, manifest, outcome

pytestmark = pytest.mark.integration

NAMESPACE = "health-e2e"
# The Argo CD health each kstatus verdict must go with, so Argo CD and Flux never disagree on a job.
AGREEING = {"InProgress": {"Progressing", "Suspended"}, "Current": {"Healthy"}, "Failed": {"Degraded"}}


@pytest.fixture(scope="module")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    process = OperatorProcess(kube, tmp_path_factory.mktemp("health-operator") / "operator.log", namespace=NAMESPACE)
    process.start()
    yield process
    process.stop()


class Judged:
    """One stored version of a FineTuneJob with its kstatus and Argo CD verdicts."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.status = body.get("status") or {}
        self.kstatus = kstatus(body)
        self.argocd = argocd_health(body)

    def __repr__(self) -> str:
        phase = self.status.get("phase")
        return f"<{phase} kstatus={self.kstatus} argocd={self.argocd} conditions={self.status.get('conditions')}>"


def history(kube: Kube, operator: OperatorProcess, name: str, apply: Callable[[], None], until, timeout=90.0):
    """The versions of NAME the API server stores after APPLY, until UNTIL(status) holds, each judged both ways.

    A watch, not polling, so a short-lived state (trained, endpoint not ready yet) cannot slip between samples.
    """
    watch = subprocess.Popen(
        [
            str(kube.kubectl_path),
            f"--kubeconfig={kube.kubeconfig}",
            f"--cache-dir={kube.cache_dir}",
            *("get", "ftj", "-n", NAMESPACE, f"--field-selector=metadata.name={name}", "--watch", "-o", "json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    versions: queue.Queue[dict] = queue.Queue()
    threading.Thread(target=_read_objects, args=(watch.stdout, versions), daemon=True).start()
    seen: list[Judged] = []
    deadline = time.monotonic() + timeout
    try:
        apply()
        while not seen or not until(seen[-1].status):
            try:
                seen.append(Judged(versions.get(timeout=max(deadline - time.monotonic(), 0))))
            except queue.Empty:
                raise AssertionError(
                    f"{name} did not reach the expected state; seen: {seen}\n{operator.log()}"
                ) from None
    finally:
        watch.terminate()
        watch.wait(timeout=30)
    # The version before the operator's first status is test_a_job_without_status_yet_is_not_current's.
    seen = [version for version in seen if version.status]
    for version in seen:
        assert version.argocd[0] in AGREEING[version.kstatus[0]], version
    return seen


def _read_objects(stream, versions: queue.Queue) -> None:
    """kubectl prints each watched object as indented JSON: decode them one after another."""
    decoder = json.JSONDecoder()
    buffer = ""
    for line in stream:
        buffer += line
        try:
            body, _ = decoder.raw_decode(buffer.strip())
        except json.JSONDecodeError:
            continue
        versions.put(body)
        buffer = ""


def apply_example(kube: Kube, name: str, **spec_changes) -> Callable[[], None]:
    document = manifest("lora-sft-chat.yaml", name, namespace=NAMESPACE, **spec_changes)
    return lambda: kube.kubectl("apply", "-f", "-", input=document)


def phase_is(phase: str):
    return lambda status: status.get("phase") == phase


def is_ready(status: dict) -> bool:
    return condition(status, "Ready").get("status") == "True"


def test_a_job_the_operator_has_not_seen_is_in_progress(kube: Kube, operator: OperatorProcess) -> None:
    # A namespace the operator does not watch keeps the moment before its first status for as long as needed.
    kube.kubectl("create", "namespace", "health-unwatched", check=False)
    document = manifest("lora-sft-chat.yaml", "unseen", namespace="health-unwatched")
    kube.kubectl("apply", "-f", "-", input=document)
    body = json.loads(kube.kubectl("get", "ftj", "unseen", "-n", "health-unwatched", "-o", "json").stdout)
    # The CRD defaults the status, so that the object reads as not yet observed.
    assert body["status"]["observedGeneration"] == 0 and body["status"]["phase"] == "Pending"
    assert argocd_health(body) == ("Progressing", "waiting for the operator to observe generation 1")
    assert kstatus(body)[0] == "InProgress", kstatus(body)


def test_training_is_in_progress(kube: Kube, operator: OperatorProcess) -> None:
    seen = history(
        kube, operator, "training", apply_example(kube, "training", resources=outcome("running")), phase_is("Running")
    )
    assert {version.kstatus[0] for version in seen} == {"InProgress"}, seen
    message = condition(seen[-1].status, "Ready")["message"]
    assert seen[-1].kstatus == ("InProgress", message) and seen[-1].argocd == ("Progressing", message)
    # A pod that never ends would hold the running node's GPUs for later tests.
    kube.kubectl("delete", "ftj", "training", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def test_served_job_is_current_only_once_its_endpoint_serves(kube: Kube, operator: OperatorProcess) -> None:
    seen = history(kube, operator, "served", apply_example(kube, "served"), is_ready)
    *before, last = seen
    assert before and {version.kstatus[0] for version in before} == {"InProgress"}, seen
    # Trained, endpoint still deploying: the moment a Ready that ignored serving would call Current.
    assert any(version.status["phase"] == "Succeeded" for version in before), seen
    assert last.status["serving"]["phase"] == "Ready"
    assert last.kstatus == ("Current", "Resource is Ready") and last.argocd == ("Healthy", "training finished")


def test_job_without_serving_is_current_when_trained(kube: Kube, operator: OperatorProcess) -> None:
    apply = apply_example(kube, "unserved", serving={"enabled": False})
    seen = history(kube, operator, "unserved", apply, phase_is("Succeeded"))
    *before, last = seen
    assert {version.kstatus[0] for version in before} <= {"InProgress"}, seen
    assert last.kstatus == ("Current", "Resource is Ready") and last.argocd == ("Healthy", "training finished")


def invalid_job(kube: Kube, operator: OperatorProcess) -> Judged:
    """bad-target-modules, applied and failed by the operator."""
    bad = (REPO_ROOT / "tests" / "manifests" / "invalid" / "bad-target-modules.yaml").read_text()
    apply = lambda: kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=bad)  # noqa: E731
    return history(kube, operator, "bad-target-modules", apply, phase_is("Failed"))[-1]


def test_invalid_spec_is_failed(kube: Kube, operator: OperatorProcess) -> None:
    last = invalid_job(kube, operator)
    message = last.status["failure"]["message"]
    assert "spec.method.lora.targetModules" in message
    assert last.kstatus == ("Failed", message) and last.argocd == ("Degraded", message)


@pytest.mark.parametrize(("fate", "reason"), [("oom", "OOMKilled"), ("data-error", "DataError")])
def test_failed_run_is_failed(kube: Kube, operator: OperatorProcess, fate: str, reason: str) -> None:
    name = f"failed-{fate}"
    apply = apply_example(kube, name, resources=outcome(fate), backoffLimit=0)
    seen = history(kube, operator, name, apply, phase_is("Failed"))
    *before, last = seen
    assert {version.kstatus[0] for version in before} <= {"InProgress"}, seen
    assert last.status["failure"]["reason"] == reason
    message = last.status["failure"]["message"]
    assert last.kstatus == ("Failed", message) and last.argocd == ("Degraded", message)


def test_suspended_job_is_in_progress_for_flux_and_suspended_for_argocd(kube: Kube, operator: OperatorProcess) -> None:
    last = history(kube, operator, "paused", apply_example(kube, "paused", suspend=True), phase_is("Suspended"))[-1]
    message = condition(last.status, "Ready")["message"]
    assert last.kstatus == ("InProgress", message) and last.argocd == ("Suspended", message)


def test_a_spec_change_is_in_progress_until_the_operator_observes_it(kube: Kube, operator: OperatorProcess) -> None:
    history(
        kube, operator, "changed", apply_example(kube, "changed", serving={"enabled": False}), phase_is("Succeeded")
    )
    operator.stop()
    try:
        kube.kubectl("patch", "ftj", "changed", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"backoffLimit": 5}}')
        body = json.loads(kube.kubectl("get", "ftj", "changed", "-n", NAMESPACE, "-o", "json").stdout)
    finally:
        operator.start()
    generation = body["metadata"]["generation"]
    assert body["status"]["observedGeneration"] == generation - 1
    assert kstatus(body) == (
        "InProgress",
        f"FineTuneJob generation is {generation}, but latest observed generation is {generation - 1}",
    )
    assert argocd_health(body) == ("Progressing", f"waiting for the operator to observe generation {generation}")


def test_the_chart_check_merged_into_argocd_cm_as_the_notes_say(kube: Kube, operator: OperatorProcess) -> None:
    helm = [str(tools.bin_dir() / "helm"), f"--kubeconfig={kube.kubeconfig}"]
    values = ["-n", NAMESPACE, "--set", "argocd.healthCheck.enabled=true"]
    rendered = subprocess.run(
        [
            *helm,
            "template",
            "tunery",
            str(CHART),
            *values,
            "--kube-version",
            "1.34.4",
            "-s",
            "templates/argocd-health.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Before the ConfigMap exists: Helm refuses to install over an object it does not own, even in a dry run.
    install = subprocess.run(
        [*helm, "install", "tunery", str(CHART), *values, "--dry-run"], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    [command] = [line.strip() for line in install.stdout.splitlines() if "patch configmap argocd-cm" in line]
    kube.kubectl("apply", "-f", "-", input=rendered)
    kube.kubectl("create", "namespace", "argocd", check=False)
    other_check = {"resource.customizations.health.example.com_Other": 'return {status = "Healthy"}'}
    argocd_cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm", "namespace": "argocd"}}
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump({**argocd_cm, "data": other_check}))
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "PATH": f"{tools.bin_dir()}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", command], env=env, check=True, capture_output=True, timeout=60)

    data = json.loads(kube.kubectl("get", "configmap", "argocd-cm", "-n", "argocd", "-o", "json").stdout)["data"]
    assert data.keys() == {*other_check, "resource.customizations.health.tunery.dev_FineTuneJob"}
    script = data["resource.customizations.health.tunery.dev_FineTuneJob"]
    failed = invalid_job(kube, operator)
    assert argocd_health(failed.body, script) == failed.argocd == ("Degraded", failed.status["failure"]["message"])
