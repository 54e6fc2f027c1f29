"""Serving on the local control plane: success deploys the endpoint, kwok-ready pods make it Ready, changes roll."""

import json
from collections.abc import Iterator

import pytest

from conftest import Kube
from operator_harness import CRD_FILE, OperatorProcess, condition, manifest, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "serving-e2e"
DEADLINE_SECONDS = 15


@pytest.fixture(scope="module")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    process = OperatorProcess(
        kube,
        tmp_path_factory.mktemp("serving-operator") / "operator.log",
        namespace=NAMESPACE,
        TUNERY_SERVING_PROGRESS_DEADLINE_SECONDS=str(DEADLINE_SECONDS),
    )
    process.start()
    yield process
    process.stop()


def apply(kube: Kube, name: str, **spec_changes) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", name, namespace=NAMESPACE, **spec_changes))


def deployment(kube: Kube, name: str) -> dict | None:
    result = kube.kubectl("get", "deployment", f"{name}-serving", "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def serving_ready(status: dict) -> bool:
    return (status.get("serving") or {}).get("phase") == "Ready"


def test_success_deploys_an_endpoint_that_becomes_ready(kube: Kube, operator: OperatorProcess) -> None:
    apply(kube, "served")
    body = wait_for(kube, operator, "served", serving_ready, namespace=NAMESPACE)
    status = body["status"]
    assert status["serving"] == {
        "phase": "Ready",
        "endpoint": f"http://served-serving.{NAMESPACE}.svc.cluster.local/v1",
        "readyReplicas": 1,
        "message": "",
    }
    assert condition(status, "Serving")["status"] == "True" and condition(status, "Ready")["status"] == "True"
    kube.kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", "ftj/served", "--timeout=10s")
    served = deployment(kube, "served")
    assert served["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    pod = served["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == "ghcr.io/tunery/trainer:e2e"
    assert f"--uri={status['model']['uri']}" in fetch["command"] and "--dest=/models/current" in fetch["command"]
    (server,) = pod["containers"]
    assert server["command"][:3] == ["tunery", "serve", "/models/current"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "50Gi"}
    assert {volume["name"] for volume in pod["volumes"]} >= {"model", "tmp"}
    service = json.loads(kube.kubectl("get", "service", "served-serving", "-n", NAMESPACE, "-o", "json").stdout)
    assert service["spec"]["ports"][0]["port"] == 80


def test_a_replica_change_rolls_without_retraining(kube: Kube, operator: OperatorProcess) -> None:
    apply(kube, "scaled")
    first = wait_for(kube, operator, "scaled", serving_ready, namespace=NAMESPACE)["status"]
    apply(kube, "scaled", serving={"enabled": True, "runtime": "builtin", "replicas": 2})
    status = wait_for(
        kube,
        operator,
        "scaled",
        lambda status: serving_ready(status) and status["serving"]["readyReplicas"] == 2,
        namespace=NAMESPACE,
    )["status"]
    assert status["revision"] == first["revision"]
    assert deployment(kube, "scaled")["spec"]["replicas"] == 2


def test_a_new_revision_rolls_out_only_after_training_and_readiness(kube: Kube, operator: OperatorProcess) -> None:
    apply(kube, "rolled")
    first = wait_for(kube, operator, "rolled", serving_ready, namespace=NAMESPACE)["status"]
    apply(kube, "rolled", hyperparameters={"epochs": 1, "learningRate": 1.0e-4, "batchSize": 8})
    status = wait_for(
        kube,
        operator,
        "rolled",
        lambda status: status.get("modelRevision") not in (None, first["revision"]) and serving_ready(status),
        namespace=NAMESPACE,
    )["status"]
    template = deployment(kube, "rolled")["spec"]["template"]
    assert template["metadata"]["labels"]["tunery.dev/model-revision"] == status["revision"]
    assert template["metadata"]["annotations"]["tunery.dev/model-uri"] == status["model"]["uri"]
    assert status["model"]["uri"] != first["model"]["uri"]


def test_a_failed_rollout_leaves_the_old_model_serving_and_says_why(kube: Kube, operator: OperatorProcess) -> None:
    apply(kube, "stuck")
    wait_for(kube, operator, "stuck", serving_ready, namespace=NAMESPACE)
    apply(kube, "stuck", serving={"enabled": True, "replicas": 1, "resources": {"gpus": 64}})
    status = wait_for(
        kube,
        operator,
        "stuck",
        lambda status: (status.get("serving") or {}).get("phase") == "Failed",
        timeout=DEADLINE_SECONDS + 90,
        namespace=NAMESPACE,
    )["status"]
    assert status["serving"]["readyReplicas"] == 1
    message = condition(status, "Serving")["message"]
    assert f"within {DEADLINE_SECONDS}s" in message and "keep serving the previous model" in message
    assert condition(status, "Stalled")["status"] == "True" and condition(status, "Ready")["status"] == "False"


def test_disabling_serving_removes_the_endpoint(kube: Kube, operator: OperatorProcess) -> None:
    apply(kube, "unserved")
    wait_for(kube, operator, "unserved", serving_ready, namespace=NAMESPACE)
    apply(kube, "unserved", serving={"enabled": False})
    status = wait_for(
        kube,
        operator,
        "unserved",
        lambda status: "serving" not in status and condition(status, "Ready").get("status") == "True",
        namespace=NAMESPACE,
    )["status"]
    assert condition(status, "Serving")["reason"] == "ServingDisabled"
    assert deployment(kube, "unserved") is None
