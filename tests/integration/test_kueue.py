"""FineTuneJobs queued through a real Kueue: a ClusterQueue of 8 GPUs admits two 4-GPU jobs and holds the third."""

import json
import time
from collections.abc import Iterator

import pytest
import yaml

from conftest import Kube
from localenv import kueue as local_kueue
from localenv import tools
from localenv.kube import OUTCOME_LABEL
from operator_harness import CRD_FILE, OperatorProcess, condition, get, manifest, wait_for
from tunery.controller import naming

pytestmark = pytest.mark.integration

NAMESPACE = "kueue-e2e"
LOCAL_QUEUE = "training"
CLUSTER_QUEUE = "tunery-gpus"
GPUS_PER_JOB = 4


@pytest.fixture(scope="module")
def kueue(kube: Kube) -> Iterator[None]:
    """Kueue against the session's control plane, for this module only (its webhooks go with it)."""
    state_dir = kube.kubeconfig.parent.parent
    local_kueue.up(state_dir, tools.bin_dir(), kube.kubeconfig)
    try:
        yield
    finally:
        local_kueue.down(state_dir, tools.bin_dir(), kube.kubeconfig)


@pytest.fixture(scope="module")
def operator(kube: Kube, kueue: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": _queues()}))
    process = OperatorProcess(kube, tmp_path_factory.mktemp("operator") / "operator.log", namespace=NAMESPACE)
    process.start()
    yield process
    # Deleted while Kueue still runs, so that its finalizers on the Workloads are removed.
    kube.kubectl("delete", "ftj", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
    process.stop()


@pytest.fixture(autouse=True)
def empty_queue(kube: Kube, operator: OperatorProcess) -> Iterator[None]:
    """Each test starts with the ClusterQueue's quota free: the jobs it made are gone, their Workloads too."""
    yield
    kube.kubectl("delete", "ftj", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 60
    while json.loads(kube.kubectl("get", "workloads", "-n", NAMESPACE, "-o", "json").stdout)["items"]:
        assert time.monotonic() < deadline, "Workloads of deleted FineTuneJobs were not removed"
        time.sleep(0.5)


def _queues() -> list[dict]:
    """One flavor, a ClusterQueue of 8 GPUs (and room for three jobs' CPU, memory and disk), a LocalQueue."""
    quota = {"cpu": "64", "memory": "512Gi", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "8"}
    api = "kueue.x-k8s.io/v1beta2"
    return [
        {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": "kwok-gpu"}},
        {
            "apiVersion": api,
            "kind": "ClusterQueue",
            "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": "kwok-gpu",
                                "resources": [{"name": name, "nominalQuota": value} for name, value in quota.items()],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": api,
            "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": NAMESPACE},
            "spec": {"clusterQueue": CLUSTER_QUEUE},
        },
    ]


def _apply_queued(kube: Kube, name: str) -> None:
    """A FineTuneJob of 4 GPUs in the LocalQueue, whose pods kwok keeps Running."""
    resources = {
        "gpus": GPUS_PER_JOB,
        "cpu": "8",
        "memory": "64Gi",
        "nodeSelector": {OUTCOME_LABEL: "running"},
        "tolerations": [{"key": OUTCOME_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    }
    document = yaml.safe_load(
        manifest("lora-sft-chat.yaml", name, NAMESPACE, resources=resources, serving={"enabled": False})
    )
    document["metadata"].setdefault("labels", {})[naming.KUEUE_QUEUE_LABEL] = LOCAL_QUEUE
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))


def _job(kube: Kube, name: str) -> dict:
    listed = kube.kubectl("get", "jobs", "-n", NAMESPACE, "-l", f"{naming.FINETUNEJOB_LABEL}={name}", "-o", "json")
    [job] = json.loads(listed.stdout)["items"]
    return job


def _pods(kube: Kube, job: dict) -> list[dict]:
    selector = f"batch.kubernetes.io/job-name={job['metadata']['name']}"
    listed = kube.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json")
    return [pod for pod in json.loads(listed.stdout)["items"] if not pod["metadata"].get("deletionTimestamp")]


def _workload(kube: Kube, job: dict) -> dict:
    """The Workload Kueue made for the Job, found as the operator finds it: by the Job's UID label."""
    selector = f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}"
    deadline = time.monotonic() + 30
    while True:
        listed = json.loads(kube.kubectl("get", "workloads", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)
        if listed["items"]:
            [workload] = listed["items"]
            return workload
        assert time.monotonic() < deadline, f"Kueue made no Workload for Job {job['metadata']['name']}"
        time.sleep(0.5)


def _running(status: dict) -> bool:
    return status.get("phase") == "Running"


def test_a_full_queue_holds_the_third_job_with_kueues_reason_and_admits_it_when_one_finishes(
    kube: Kube, operator: OperatorProcess
) -> None:
    for name in ("first", "second"):
        _apply_queued(kube, name)
    for name in ("first", "second"):
        wait_for(kube, operator, name, _running, namespace=NAMESPACE)
        assert _job(kube, name)["spec"]["suspend"] is False

    _apply_queued(kube, "third")
    body = wait_for(
        kube,
        operator,
        "third",
        lambda status: status.get("phase") == "Queued" and condition(status, "Ready").get("reason") != "Queued",
        namespace=NAMESPACE,
    )
    ready = condition(body["status"], "Ready")
    workload = _workload(kube, _job(kube, "third"))
    quota = next(c for c in workload["status"]["conditions"] if c["type"] == "QuotaReserved")
    # Kueue's own words, as its Workload states them.
    assert (ready["reason"], ready["message"]) == (quota["reason"], quota["message"])
    assert "insufficient unused quota for nvidia.com/gpu" in ready["message"], ready
    third_job = _job(kube, "third")
    assert third_job["spec"]["suspend"] is True
    assert _pods(kube, third_job) == []

    kube.kubectl("delete", "ftj", "first", "-n", NAMESPACE)
    wait_for(kube, operator, "third", _running, timeout=120, namespace=NAMESPACE)
    assert _job(kube, "third")["metadata"]["uid"] == third_job["metadata"]["uid"]
    assert get(kube, "ftj", "second", NAMESPACE)["status"]["phase"] == "Running"


def test_a_job_kueue_evicts_is_queued_with_kueues_reason_and_runs_again_in_the_same_job(
    kube: Kube, operator: OperatorProcess
) -> None:
    _apply_queued(kube, "evicted")
    before = wait_for(kube, operator, "evicted", _running, timeout=120, namespace=NAMESPACE)
    job = _job(kube, "evicted")
    [pod] = _pods(kube, job)
    workload = _workload(kube, job)["metadata"]["name"]

    patch = json.dumps({"spec": {"active": False}})
    kube.kubectl("patch", "workload", workload, "-n", NAMESPACE, "--type=merge", "-p", patch)
    body = wait_for(kube, operator, "evicted", lambda status: status.get("phase") == "Queued", namespace=NAMESPACE)
    evicted = next(c for c in _workload(kube, job)["status"]["conditions"] if c["type"] == "Evicted")
    ready = condition(body["status"], "Ready")
    assert (ready["reason"], ready["message"]) == (evicted["reason"], evicted["message"])
    assert _job(kube, "evicted")["spec"]["suspend"] is True

    patch = json.dumps({"spec": {"active": True}})
    kube.kubectl("patch", "workload", workload, "-n", NAMESPACE, "--type=merge", "-p", patch)
    after = wait_for(kube, operator, "evicted", _running, timeout=120, namespace=NAMESPACE)
    # The same Job of the same revision runs again in a new pod: on a real cluster that pod's trainer resumes
    # from the revision's latest checkpoint (kwok runs no trainer).
    assert after["status"]["revision"] == before["status"]["revision"]
    resumed = _job(kube, "evicted")
    assert resumed["metadata"]["uid"] == job["metadata"]["uid"]
    [new_pod] = _pods(kube, resumed)
    assert new_pod["metadata"]["uid"] != pod["metadata"]["uid"]
