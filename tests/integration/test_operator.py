"""The operator process against the real control plane: kwok runs the pods, the status tells the story."""

import dataclasses
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, Kube
from operator_harness import (
    CRD_FILE,
    HEALTH_PORT,
    METRICS_PORT,
    NAMESPACE,
    OperatorProcess,
    children,
    condition,
    get,
    manifest,
    outcome,
    wait_for,
    wait_for_event,
)
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import naming
from tunery.controller.render import TrainingTarget, render_job
from tunery_trainer.progress import ProgressReporter, StatusEndpoint, send_apply

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    process = OperatorProcess(kube, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    yield process
    process.stop()


def test_apply_trains_to_complete(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "chat"))
    # Ready also waits for the serving endpoint (kwok makes its pods ready at once).
    body = wait_for(kube, operator, "chat", lambda status: condition(status, "Ready").get("status") == "True")
    kube.kubectl("wait", "-n", NAMESPACE, "--for=condition=Complete", "ftj/chat", "--timeout=10s")
    status = body["status"]
    assert condition(status, "Ready")["status"] == "True" and condition(status, "Stalled")["status"] == "False"
    assert status["observedGeneration"] == body["metadata"]["generation"] and status["attempts"] == 1
    assert status["model"] == {"uri": f"s3://models/out/support-bot/{status['revision']}/", "name": "support-bot"}
    assert status["modelRevision"] == status["revision"]
    jobs = children(kube, "jobs", "chat")
    assert [job["metadata"]["name"] for job in jobs] == [f"chat-{status['revision']}"]
    pod_spec = jobs[0]["spec"]["template"]["spec"]
    assert pod_spec["containers"][0]["image"] == "ghcr.io/tunery/trainer:e2e"
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert jobs[0]["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert len(children(kube, "configmaps", "chat")) == 1
    wait_for_event(kube, "chat", "TrainingSucceeded", kind="Normal")


def test_invalid_spec_fails_without_children(kube: Kube, operator: OperatorProcess) -> None:
    bad = (REPO_ROOT / "tests" / "manifests" / "invalid" / "bad-target-modules.yaml").read_text()
    kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=bad)
    body = wait_for(kube, operator, "bad-target-modules", lambda status: status.get("phase") == "Failed")
    status = body["status"]
    assert (
        status["failure"]["reason"] == "InvalidSpec"
        and "spec.method.lora.targetModules" in status["failure"]["message"]
    )
    assert condition(status, "Validated")["status"] == "False" and condition(status, "Stalled")["status"] == "True"
    assert (
        children(kube, "jobs", "bad-target-modules") == [] and children(kube, "configmaps", "bad-target-modules") == []
    )
    assert "spec.method.lora.targetModules" in wait_for_event(kube, "bad-target-modules", "InvalidSpec")["message"]


def test_image_override_is_refused_by_policy(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl(
        "apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "own-image", image="evil.example/trainer:latest")
    )
    body = wait_for(kube, operator, "own-image", lambda status: status.get("phase") == "Failed")
    assert "spec.image" in body["status"]["failure"]["message"]
    assert children(kube, "jobs", "own-image") == []


def test_unschedulable_reason_reaches_the_status(kube: Kube, operator: OperatorProcess) -> None:
    huge = {"gpus": 16, "memory": "64Gi"}
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "too-big", resources=huge))
    body = wait_for(
        kube,
        operator,
        "too-big",
        lambda status: (
            (status.get("failure") or {}).get("reason") == "Unschedulable"
            or condition(status, "Ready").get("reason") == "Unschedulable"
        ),
    )
    assert body["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in condition(body["status"], "Ready")["message"]
    wait_for_event(kube, "too-big", "Unschedulable")


def test_suspend_and_resume(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "paused", suspend=True))
    wait_for(kube, operator, "paused", lambda status: status.get("phase") == "Suspended")
    [job] = children(kube, "jobs", "paused")
    assert job["spec"]["suspend"] is True
    kube.kubectl("patch", "ftj", "paused", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    body = wait_for(kube, operator, "paused", lambda status: status.get("phase") == "Succeeded")
    assert [job["metadata"]["name"] for job in children(kube, "jobs", "paused")] == [
        f"paused-{body['status']['revision']}"
    ]


def test_training_change_starts_a_new_revision_and_reapply_is_a_no_op(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "revised"))
    first = wait_for(kube, operator, "revised", lambda status: status.get("phase") == "Succeeded")["status"]["revision"]
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "revised"))
    time.sleep(2)
    assert len(children(kube, "jobs", "revised")) == 1
    changed = {"epochs": 1, "learningRate": 1.0e-4, "batchSize": 8}
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "revised", hyperparameters=changed))
    body = wait_for(
        kube,
        operator,
        "revised",
        lambda status: status.get("revision") not in (None, first) and status.get("phase") == "Succeeded",
    )
    assert sorted(
        job["metadata"]["labels"]["tunery.dev/revision"] for job in children(kube, "jobs", "revised")
    ) == sorted([first, body["status"]["revision"]])


def test_operator_restart_creates_no_duplicates(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "restarted", suspend=True))
    wait_for(kube, operator, "restarted", lambda status: status.get("phase") == "Suspended")
    [job] = children(kube, "jobs", "restarted")
    operator.kill()
    kube.kubectl("patch", "ftj", "restarted", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    operator.start()
    wait_for(kube, operator, "restarted", lambda status: status.get("phase") == "Succeeded")
    [after] = children(kube, "jobs", "restarted")
    assert after["metadata"]["uid"] == job["metadata"]["uid"]


def test_delete_cascades_to_children(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "doomed", suspend=True))
    wait_for(kube, operator, "doomed", lambda status: status.get("phase") == "Suspended")
    assert children(kube, "jobs", "doomed") and children(kube, "configmaps", "doomed")
    kube.kubectl("delete", "ftj", "doomed", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 60
    while children(kube, "jobs", "doomed") or children(kube, "configmaps", "doomed"):
        assert time.monotonic() < deadline, "children were not garbage-collected"
        time.sleep(0.5)


def test_multi_node_job_and_rendezvous_service(kube: Kube, operator: OperatorProcess) -> None:
    spec = yaml.safe_load((REPO_ROOT / "examples" / "qlora-multinode.yaml").read_text())["spec"]
    resources = {**spec["resources"], "priorityClassName": ""}
    kube.kubectl("apply", "-f", "-", input=manifest("qlora-multinode.yaml", "multi", resources=resources))
    body = wait_for(kube, operator, "multi", lambda status: status.get("phase") == "Succeeded")
    name = f"multi-{body['status']['revision']}"
    [job] = children(kube, "jobs", "multi")
    services = {service["metadata"]["name"]: service for service in children(kube, "services", "multi")}
    assert job["spec"]["completionMode"] == "Indexed" and job["status"]["succeeded"] == 2
    # The rendezvous Service, and the serving one once the model is published.
    assert set(services) <= {name, "multi-serving"} and services[name]["spec"]["clusterIP"] == "None"
    pods = json.loads(
        kube.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"batch.kubernetes.io/job-name={name}", "-o", "json").stdout
    )["items"]
    hostnames = sorted(f"{pod['spec']['hostname']}.{pod['spec']['subdomain']}" for pod in pods)
    assert hostnames == [f"{name}-0.{name}", f"{name}-1.{name}"]
    env = {item["name"]: item.get("value") for item in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == hostnames[0]


def test_metrics_describe_jobs_and_reconciliations(kube: Kube, operator: OperatorProcess, promtool: Path) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "measured"))
    wait_for(kube, operator, "measured", lambda status: status.get("phase") == "Succeeded")
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert samples[("tunery_finetunejobs", (("namespace", NAMESPACE), ("phase", "Succeeded")))] >= 1
    to_succeeded = [
        value
        for (name, labels), value in samples.items()
        if name == "tunery_phase_transitions_total" and dict(labels)["to_phase"] == "Succeeded"
    ]
    assert sum(to_succeeded) >= 1
    assert samples[("tunery_reconcile_duration_seconds_count", ())] > 0
    assert ("tunery_gpus_requested", (("namespace", NAMESPACE),)) in samples
    lint = subprocess.run([str(promtool), "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def trainer_endpoint(kube: Kube, name: str) -> StatusEndpoint:
    """The endpoint the trainer pod of `name` would use: a token of its ServiceAccount and the cluster's CA."""
    token = kube.kubectl("create", "token", f"{name}-trainer", "-n", NAMESPACE).stdout.strip()
    config = json.loads(kube.kubeconfig.read_text())["clusters"][0]["cluster"]
    return StatusEndpoint(config["server"], token, config["certificate-authority"], NAMESPACE, name)


def test_progress_channel_is_least_privilege_and_survives_reconciliation(kube: Kube, operator: OperatorProcess) -> None:
    for name in ("reporting", "neighbour"):
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", name, suspend=True))
        wait_for(kube, operator, name, lambda status: status.get("phase") == "Suspended")
    endpoint = trainer_endpoint(kube, "reporting")
    reporter = ProgressReporter(endpoint)
    assert reporter.report(0, 400, 0.0, {"trainLoss": 2.9})
    time.sleep(0.1)
    assert reporter.report(180, 400, 1.35, {"trainLoss": 1.234, "learningRate": 1.8e-4}, final=True)
    row = kube.kubectl("get", "ftj", "reporting", "-n", NAMESPACE, "--no-headers").stdout.split()
    assert row[1:4] == ["Suspended", "45", "1.234"]

    kube.kubectl("patch", "ftj", "reporting", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    status = wait_for(kube, operator, "reporting", lambda status: status.get("phase") == "Succeeded")["status"]
    assert status["progress"]["step"] == 180 and status["metrics"]["trainLoss"] == 1.234

    with pytest.raises(urllib.error.HTTPError) as other_job:
        send_apply(
            dataclasses.replace(endpoint, name="neighbour"),
            {
                "apiVersion": "tunery.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "neighbour", "namespace": NAMESPACE},
                "status": {"metrics": {"trainLoss": 0.0}},
            },
        )
    assert other_job.value.code == 403
    spec_patch = urllib.request.Request(
        endpoint.status_url.replace("/status?", "?"),
        method="PATCH",
        data=b'{"spec": {"suspend": true}}',
        headers={"Authorization": f"Bearer {endpoint.token}", "Content-Type": "application/merge-patch+json"},
    )
    with pytest.raises(urllib.error.HTTPError) as spec_change:
        urllib.request.urlopen(spec_patch, context=ssl.create_default_context(cafile=endpoint.ca_file))
    assert spec_change.value.code == 403


def test_running_pods_make_the_job_running(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "busy", resources=outcome("running")))
    body = wait_for(kube, operator, "busy", lambda status: status.get("phase") == "Running")
    assert condition(body["status"], "Reconciling")["status"] == "True"
    assert condition(body["status"], "Ready")["status"] == "False"
    assert body["status"]["startTime"]
    kube.kubectl("delete", "ftj", "busy", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def test_oom_killed_reaches_the_status_and_an_event(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl(
        "apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "greedy", resources=outcome("oom"), backoffLimit=0)
    )
    body = wait_for(kube, operator, "greedy", lambda status: status.get("phase") == "Failed")
    assert body["status"]["failure"]["reason"] == "OOMKilled"
    assert "spec.resources.memory" in body["status"]["failure"]["message"]
    wait_for_event(kube, "greedy", "OOMKilled")


def test_trainer_data_error_fails_at_once_with_its_message(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=manifest("lora-sft-chat.yaml", "bad-data", resources=outcome("data-error"), backoffLimit=3),
    )
    body = wait_for(kube, operator, "bad-data", lambda status: status.get("phase") == "Failed")
    assert body["status"]["failure"] == {
        "reason": "DataError",
        "message": "s3://data/train.jsonl line 17: no column text; set dataset.columns.text",
    }
    [job] = children(kube, "jobs", "bad-data")
    assert job["status"]["failed"] == 1, "a bad-data exit code must not be retried"


def test_pods_the_job_cannot_create_are_explained(kube: Kube, operator: OperatorProcess) -> None:
    resources = {"gpus": 1, "memory": "64Gi", "priorityClassName": "no-such-class"}
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "blocked", resources=resources))
    body = wait_for(
        kube, operator, "blocked", lambda status: condition(status, "Ready").get("reason") == "FailedCreate"
    )
    assert body["status"]["phase"] == "Pending"
    assert "no PriorityClass with name no-such-class" in condition(body["status"], "Ready")["message"]
    wait_for_event(kube, "blocked", "FailedCreate")


def test_liveness_endpoint_answers(kube: Kube, operator: OperatorProcess) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/healthz", timeout=5) as response:
                assert response.status == 200
                return
        except OSError:
            assert time.monotonic() < deadline, operator.log()
            time.sleep(0.5)


def test_two_replicas_one_works_and_the_other_takes_over(kube: Kube, operator: OperatorProcess, tmp_path: Path) -> None:
    kube.kubectl(
        "apply", "--server-side", "-f", str(REPO_ROOT / "charts" / "tunery" / "crds" / "kopf.dev_peerings.yaml")
    )
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    namespace = "operator-peering"
    kube.kubectl("create", "namespace", namespace, check=False)
    peering = {
        "TUNERY_PEERING": "tunery",
        "TUNERY_PEERING_LIFETIME_SECONDS": "5",
        "TUNERY_METRICS_PORT": "0",
        "TUNERY_HEALTH_PORT": "0",
    }
    leader = OperatorProcess(kube, tmp_path / "leader.log", namespace, TUNERY_PEERING_PRIORITY="200", **peering)
    standby = OperatorProcess(kube, tmp_path / "standby.log", namespace, TUNERY_PEERING_PRIORITY="100", **peering)
    leader.start()
    try:
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "first", namespace))
        wait_for(kube, leader, "first", lambda status: status.get("phase") == "Succeeded", namespace=namespace)
        # Started once the leader announces itself, the standby stays paused (Kopf pre-pauses peered replicas).
        standby.start()
        time.sleep(8)
        assert "Resuming operations" not in standby.log(), standby.log()
        leader.kill()
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "second", namespace))
        wait_for(kube, standby, "second", lambda status: status.get("phase") == "Succeeded", namespace=namespace)
        assert "Resuming operations after the pause" in standby.log()
    finally:
        standby.stop()
        leader.stop()


def test_a_new_revision_stops_the_running_one(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "replaced", resources=outcome("running")))
    first = wait_for(kube, operator, "replaced", lambda status: status.get("phase") == "Running")["status"]["revision"]
    changed = {"epochs": 1, "learningRate": 5.0e-5, "batchSize": 8}
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=manifest("lora-sft-chat.yaml", "replaced", resources=outcome("running"), hyperparameters=changed),
    )
    body = wait_for(kube, operator, "replaced", lambda status: status.get("revision") not in (None, first))
    deadline = time.monotonic() + 60
    while [job["metadata"]["labels"]["tunery.dev/revision"] for job in children(kube, "jobs", "replaced")] != [
        body["status"]["revision"]
    ]:
        assert time.monotonic() < deadline, "the superseded revision's Job is still there"
        time.sleep(0.5)
    kube.kubectl("delete", "ftj", "replaced", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def test_an_operator_upgrade_to_another_trainer_image_leaves_running_revisions_alone(
    kube: Kube, operator: OperatorProcess, tmp_path: Path
) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "upgraded", suspend=True))
    wait_for(kube, operator, "upgraded", lambda status: status.get("phase") == "Suspended")
    operator.stop()
    upgraded = OperatorProcess(kube, tmp_path / "upgraded.log", TUNERY_TRAINER_IMAGE="ghcr.io/tunery/trainer:next")
    upgraded.start()
    try:
        kube.kubectl("patch", "ftj", "upgraded", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"suspend": false}}')
        wait_for(kube, upgraded, "upgraded", lambda status: status.get("phase") == "Succeeded")
        [job] = children(kube, "jobs", "upgraded")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/tunery/trainer:e2e"
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "fresh"))
        wait_for(kube, upgraded, "fresh", lambda status: status.get("phase") == "Succeeded")
        [fresh] = children(kube, "jobs", "fresh")
        assert fresh["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/tunery/trainer:next"
    finally:
        upgraded.stop()
        operator.start()


def test_a_job_an_older_operator_rendered_is_left_as_it_is(kube: Kube, operator: OperatorProcess) -> None:
    """Pod templates are immutable: applying today's rendering over an older one would fail every reconciliation."""
    operator.kill()
    try:
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "older", suspend=True))
        body = get(kube, "ftj", "older")
        spec = FineTuneJobSpec.model_validate(body["spec"])
        target = TrainingTarget("older", NAMESPACE, body["metadata"]["uid"], spec, naming.revision(spec), "trainer:old")
        older = render_job(target)
        del older["metadata"]["annotations"]
        for container in older["spec"]["template"]["spec"]["containers"]:
            for bound in container["resources"].values():
                bound.pop("ephemeral-storage")
        kube.kubectl("apply", "--server-side", "--field-manager=tunery-operator", "-f", "-", input=json.dumps(older))
        uid = get(kube, "job", target.job_name)["metadata"]["uid"]
    finally:
        operator.start()
    wait_for(kube, operator, "older", lambda status: status.get("phase") == "Suspended")
    kube.kubectl("patch", "ftj", "older", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    wait_for(kube, operator, "older", lambda status: status.get("phase") == "Succeeded")
    job = get(kube, "job", target.job_name)
    assert job["metadata"]["uid"] == uid and "annotations" not in job["metadata"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "trainer:old" and "ephemeral-storage" not in container["resources"]["limits"]
    assert "immutable" not in operator.log(), operator.log()


def test_moving_the_storage_replaces_the_unfinished_job_in_the_same_revision(
    kube: Kube, operator: OperatorProcess
) -> None:
    """Rotating the credentials Secret or moving the endpoint resumes the revision: same prefix, same checkpoints."""
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "moved", suspend=True))
    revision = wait_for(kube, operator, "moved", lambda status: status.get("phase") == "Suspended")["status"][
        "revision"
    ]
    [job] = children(kube, "jobs", "moved")
    storage = {"endpoint": "http://s3.elsewhere:9000", "credentialsSecret": "rotated-creds", "addressing": "path"}
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "moved", suspend=True, storage=storage))

    def replaced(status: dict) -> bool:
        jobs = children(kube, "jobs", "moved")
        return bool(jobs) and jobs[0]["metadata"]["uid"] != job["metadata"]["uid"]

    status = wait_for(kube, operator, "moved", lambda status: replaced(status) and status.get("phase") == "Suspended")[
        "status"
    ]
    assert status["revision"] == revision
    [after] = children(kube, "jobs", "moved")
    env = {item["name"]: item for item in after["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.elsewhere:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "rotated-creds"


@pytest.mark.slow
def test_real_training_reports_progress_metrics_and_checkpoints_into_the_status(
    kube: Kube, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The trainer's whole reporting path, as in a pod: real steps on a tiny model, the trainer's own token."""
    from tiny_models import decoder, sentences, write_jsonl

    from tunery.local_run import local_config
    from tunery_trainer.job import run

    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "live", suspend=True))
    wait_for(kube, operator, "live", lambda status: status.get("phase") == "Suspended")
    base = decoder(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(80)])
    config = local_config(
        {
            "apiVersion": "tunery.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "live", "namespace": NAMESPACE},
            "spec": {
                "baseModel": {"uri": f"file://{base}/"},
                "dataset": {"train": f"file://{data}", "maxLength": 64},
                "hyperparameters": {"maxSteps": 8, "batchSize": 4},
                "evaluation": {"everySteps": 4},
                "checkpoints": {"everySteps": 4, "keep": 1},
                "output": {"uri": f"file://{tmp_path}/out/"},
                "resources": {"gpus": 0},
            },
        }
    )
    run(config, tmp_path / "work", status=ProgressReporter(trainer_endpoint(kube, "live"), min_interval_s=0))
    status = json.loads(kube.kubectl("get", "ftj", "live", "-n", NAMESPACE, "-o", "json").stdout)["status"]
    assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100
    assert {"trainLoss", "learningRate", "evalLoss", "tokensPerSecond"} <= set(status["metrics"])
    assert [checkpoint["step"] for checkpoint in status["checkpoints"]] == [8]
    assert status["checkpoints"][0]["uri"].endswith("/checkpoints/step-00000008/")


def _samples(exposition: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    }


def _applies(kube: Kube) -> dict[str, float]:
    """Server-side applies the API server has answered, by resource (only the operator applies children)."""
    counts: dict[str, float] = {}
    for labels, value in _samples(kube.kubectl("get", "--raw", "/metrics").stdout, "apiserver_request_total").items():
        fields = dict(labels)
        if fields.get("verb") == "APPLY":
            counts[fields["resource"]] = counts.get(fields["resource"], 0) + value
    return counts


def _reconciliations() -> float:
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    return _samples(exposition, "tunery_reconcile_duration_seconds_count")[()]


def test_reconciling_an_unchanged_job_applies_nothing_and_a_change_is_applied(
    kube: Kube, operator: OperatorProcess
) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "steady", resources=outcome("running")))
    wait_for(kube, operator, "steady", lambda status: status.get("phase") == "Running")
    before, reconciled = _applies(kube), _reconciliations()
    for touch in range(5):
        kube.kubectl("annotate", "-n", NAMESPACE, "ftj/steady", f"example.com/touch={touch}", "--overwrite")
    deadline = time.monotonic() + 30
    while _reconciliations() < reconciled + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert _reconciliations() >= reconciled + 1
    children_applied = {kind: count - before.get(kind, 0) for kind, count in _applies(kube).items()}
    assert not {kind: n for kind, n in children_applied.items() if n and kind != "finetunejobs"}, children_applied
    # backoffLimit reaches the Job but not the revision: the Job is applied again, in place.
    kube.kubectl("patch", "-n", NAMESPACE, "ftj/steady", "--type=merge", "-p", '{"spec": {"backoffLimit": 5}}')
    job_name = f"steady-{get(kube, 'ftj', 'steady')['status']['revision']}"
    deadline = time.monotonic() + 30
    while get(kube, "job", job_name)["spec"]["backoffLimit"] != 5:
        assert time.monotonic() < deadline, "the changed backoffLimit never reached the Job"
        time.sleep(0.5)
    assert _applies(kube)["jobs"] > before["jobs"]
    # A pod that never ends would hold the running node's GPUs for later tests (Kueue's).
    kube.kubectl("delete", "ftj", "steady", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
