"""The operator as a tenant's deputy on the real control plane: it refuses what the policy forbids, never takes
over or deletes objects it does not own, and renders exactly what `tunery render` shows."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import Kube
from invalid_cases import REFUSED_DIR, load_cases
from operator_harness import CRD_FILE, OperatorProcess, condition, manifest, wait_for, wait_for_event

pytestmark = pytest.mark.integration

NAMESPACE = "tenancy-e2e"
TENANT = "tenant-ops"
GATEWAY_LABELS = {"tunery.dev/gateway": "true"}


@pytest.fixture(scope="module")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    # The tenant may do what a team member usually may: FineTuneJobs in their namespace, nothing else.
    kube.kubectl(
        "create", "role", "finetunejobs", "-n", NAMESPACE, "--verb=create,get,list,watch,update,patch,delete",
        "--resource=finetunejobs.tunery.dev", check=False,
    )  # fmt: skip
    kube.kubectl("create", "rolebinding", "finetunejobs", "-n", NAMESPACE, "--role=finetunejobs", f"--user={TENANT}",
                 check=False)  # fmt: skip
    # Their own Secrets (the examples' S3 credentials, an endpoint's API key) and claim, as admission asks.
    kube.kubectl("create", "role", "own-secrets", "-n", NAMESPACE, "--verb=get", "--resource=secrets",
                 "--resource-name=s3-creds", "--resource-name=preview-keys", check=False)  # fmt: skip
    kube.kubectl("create", "role", "own-claims", "-n", NAMESPACE, "--verb=get", "--resource=persistentvolumeclaims",
                 "--resource-name=team-data", check=False)  # fmt: skip
    for role in ("own-secrets", "own-claims"):
        kube.kubectl("create", "rolebinding", role, "-n", NAMESPACE, f"--role={role}", f"--user={TENANT}", check=False)
    workdir = tmp_path_factory.mktemp("tenancy-operator")
    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump({"servingClientNamespaceLabels": GATEWAY_LABELS}))
    process = OperatorProcess(kube, workdir / "operator.log", namespace=NAMESPACE, TUNERY_POLICY_FILE=str(policy))
    process.start()
    yield process
    process.stop()


def as_tenant(kube: Kube, document: str) -> None:
    kube.kubectl("apply", f"--as={TENANT}", "-n", NAMESPACE, "-f", "-", input=document)


def get(kube: Kube, kind: str, name: str) -> dict | None:
    result = kube.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_the_tenant_cannot_create_what_the_operator_would(kube: Kube, operator: OperatorProcess) -> None:
    """The premise: without the operator this identity gets no pods, Secrets or Roles."""
    for verb, resource in (("create", "pods"), ("list", "secrets"), ("create", "roles"), ("create", "deployments")):
        answer = kube.kubectl("auth", "can-i", verb, resource, f"--as={TENANT}", "-n", NAMESPACE, check=False)
        assert answer.stdout.strip() == "no", (verb, resource)


@pytest.mark.parametrize("case", load_cases(REFUSED_DIR), ids=lambda case: case.path.stem)
def test_what_the_policy_forbids_fails_with_the_field_and_no_children(
    kube: Kube, operator: OperatorProcess, case
) -> None:
    document = yaml.safe_load(case.path.read_text())
    document["metadata"]["namespace"] = NAMESPACE
    # As the admin: admission would stop some of these from a tenant first; the operator refuses them from anyone.
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    name = document["metadata"]["name"]
    status = wait_for(kube, operator, name, lambda s: s.get("phase") == "Failed", namespace=NAMESPACE)["status"]
    assert status["failure"]["reason"] == "InvalidSpec"
    assert f"{case.field}: " in status["failure"]["message"] and case.message in status["failure"]["message"]
    assert condition(status, "Stalled")["status"] == "True"
    listed = kube.kubectl("get", "jobs,configmaps,serviceaccounts", "-n", NAMESPACE, "-l", f"tunery.dev/finetunejob={name}",
                          "-o", "name").stdout  # fmt: skip
    assert listed.strip() == ""


def test_existing_objects_under_a_childs_name_are_never_taken_over(kube: Kube, operator: OperatorProcess) -> None:
    kube.kubectl("create", "serviceaccount", "ci-trainer", "-n", NAMESPACE)
    kube.kubectl("create", "role", "ci-trainer", "-n", NAMESPACE, "--verb=get", "--resource=pods")
    as_tenant(kube, manifest("lora-sft-chat.yaml", "ci", namespace=NAMESPACE))
    status = wait_for(
        kube, operator, "ci", lambda s: condition(s, "Stalled").get("reason") == "ChildConflict", namespace=NAMESPACE
    )["status"]
    assert "ServiceAccount tenancy-e2e/ci-trainer" in condition(status, "Stalled")["message"]
    assert condition(status, "Ready")["status"] == "False"
    assert "ci-trainer" in wait_for_event(kube, "ci", "ChildConflict", namespace=NAMESPACE)["message"]
    role = get(kube, "role", "ci-trainer")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    assert "ownerReferences" not in role["metadata"]
    assert "ownerReferences" not in get(kube, "serviceaccount", "ci-trainer")["metadata"]
    assert get(kube, "jobs", f"ci-{status['revision'] or 'x'}") is None
    # Once the owner of those objects removes them, the job goes on by itself.
    kube.kubectl("delete", "serviceaccount,role", "ci-trainer", "-n", NAMESPACE)
    status = wait_for(kube, operator, "ci", lambda s: s.get("phase") == "Succeeded", namespace=NAMESPACE)["status"]
    assert condition(status, "Stalled")["status"] == "False"


def foreign_deployment(kube: Kube, name: str) -> None:
    kube.kubectl("create", "deployment", name, "-n", NAMESPACE, "--image=registry.example/web:1")
    kube.kubectl("create", "service", "clusterip", name, "-n", NAMESPACE, "--tcp=80:8080")


def test_a_foreign_serving_deployment_is_neither_changed_nor_deleted(kube: Kube, operator: OperatorProcess) -> None:
    foreign_deployment(kube, "web-serving")
    as_tenant(kube, manifest("lora-sft-chat.yaml", "web", namespace=NAMESPACE))
    status = wait_for(
        kube, operator, "web", lambda s: condition(s, "Serving").get("reason") == "ChildConflict", namespace=NAMESPACE
    )["status"]
    assert status["phase"] == "Succeeded" and condition(status, "Stalled")["status"] == "True"
    assert "web-serving" in condition(status, "Serving")["message"]
    deployment = get(kube, "deployment", "web-serving")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/web:1"
    # Turning serving off deletes only what this FineTuneJob owns.
    as_tenant(kube, manifest("lora-sft-chat.yaml", "web", namespace=NAMESPACE, serving={"enabled": False}))
    wait_for(kube, operator, "web", lambda s: condition(s, "Ready").get("status") == "True", namespace=NAMESPACE)
    assert get(kube, "deployment", "web-serving") is not None and get(kube, "service", "web-serving") is not None


def test_only_its_own_jobs_of_old_revisions_are_stopped(kube: Kube, operator: OperatorProcess) -> None:
    """Anyone who may label a Job could point it at a FineTuneJob; a new revision must not delete it."""
    labels = {"tunery.dev/finetunejob": "relabel", "app.kubernetes.io/managed-by": "tunery-operator",
              "tunery.dev/revision": "00000000"}  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "someone-elses", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "x"}]}},
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(job))
    as_tenant(kube, manifest("lora-sft-chat.yaml", "relabel", namespace=NAMESPACE))
    wait_for(kube, operator, "relabel", lambda s: s.get("phase") == "Succeeded", namespace=NAMESPACE)
    assert get(kube, "job", "someone-elses") is not None


def test_the_children_are_what_tunery_render_shows(kube: Kube, operator: OperatorProcess, tmp_path: Path) -> None:
    kube.kubectl("create", "secret", "generic", "preview-keys", "-n", NAMESPACE, "--from-literal=api-key=k")
    sneaky = manifest(
        "lora-sft-chat.yaml",
        "preview",
        namespace=NAMESPACE,
        output={"uri": "s3://models/out/$(AWS_SECRET_ACCESS_KEY)/", "name": "preview"},
        serving={"apiKeySecret": "preview-keys", "clientNamespaceLabels": {"team": "ops"}},
    )
    (tmp_path / "preview.yaml").write_text(sneaky)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"servingClientNamespaceLabels": GATEWAY_LABELS}))
    env = {"TUNERY_TRAINER_IMAGE": "ghcr.io/tunery/trainer:e2e", "PATH": str(Path(sys.executable).parent)}
    rendered = subprocess.run(
        ["tunery", "render", "--policy", str(policy), str(tmp_path / "preview.yaml")],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    wanted = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(rendered)}
    as_tenant(kube, sneaky)
    status = wait_for(
        kube, operator, "preview", lambda s: (s.get("serving") or {}).get("phase") == "Ready", namespace=NAMESPACE
    )["status"]
    for (kind, name), document in wanted.items():
        stored = get(kube, kind.lower(), name)
        assert stored is not None, (kind, name)
        if kind in ("Job", "Deployment"):
            want, have = document["spec"]["template"]["spec"], stored["spec"]["template"]["spec"]
            for field in ("containers", "initContainers"):
                for mine, theirs in zip(want.get(field, []), have.get(field, []), strict=True):
                    assert theirs["command"] == mine["command"] and theirs["env"] == mine["env"]
                    assert theirs["volumeMounts"] == mine["volumeMounts"]
            assert [v["name"] for v in have["volumes"]] == [v["name"] for v in want["volumes"]]
        if kind == "NetworkPolicy":
            assert stored["spec"] == document["spec"]
    fetch = get(kube, "deployment", "preview-serving")["spec"]["template"]["spec"]["initContainers"][0]
    assert f"--uri=s3://models/out/$$(AWS_SECRET_ACCESS_KEY)/{status['revision']}/" in fetch["command"]


def test_pvc_uris_are_mounted_from_their_claim(kube: Kube, operator: OperatorProcess) -> None:
    as_tenant(
        kube,
        manifest(
            "lora-sft-chat.yaml", "claims", namespace=NAMESPACE, dataset={"train": "pvc://team-data/chat/train.jsonl"}
        ),
    )
    revision = wait_for(kube, operator, "claims", lambda s: bool(s.get("revision")), namespace=NAMESPACE)["status"][
        "revision"
    ]
    pod = get(kube, "job", f"claims-{revision}")["spec"]["template"]["spec"]
    (claim,) = [volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
    assert claim["persistentVolumeClaim"] == {"claimName": "team-data"}
    (mount,) = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["name"] == claim["name"]]
    assert mount == {"name": claim["name"], "mountPath": "/mnt/pvc/team-data/chat", "subPath": "chat", "readOnly": True}
