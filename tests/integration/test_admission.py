"""The chart's ValidatingAdmissionPolicy on the real API server: a tenant with only FineTuneJob rights cannot borrow
the operator's rights to Secrets, claims and PriorityClasses; an admin, and updates that leave the spec, pass."""

import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml
from monitoring_files import CHART

from conftest import REPO_ROOT, Kube
from localenv import tools

pytestmark = pytest.mark.integration

NAMESPACE = "admission-e2e"
TENANT = "tenant-a"
OPEN_CLASS = "training"


def policy_documents(*values: str) -> str:
    rendered = subprocess.run(
        [str(tools.bin_dir() / "helm"), "template", "tunery", str(CHART), "--kube-version", "1.34.4", *values],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] in kinds]
    assert len(documents) == 2
    return yaml.safe_dump_all(documents)


def finetunejob(name: str = "bot", **spec_changes) -> str:
    document = yaml.safe_load((REPO_ROOT / "examples" / "lora-sft-chat.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": NAMESPACE}
    for section, changes in spec_changes.items():
        document["spec"][section] = {**document["spec"].get(section, {}), **changes}
    return yaml.safe_dump(document)


def as_tenant(kube: Kube, document: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    args = ["apply", f"--as={TENANT}", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return kube.kubectl(*args, input=document, check=False)


def grant(kube: Kube, name: str, verb: str, resource: str, resource_name: str, cluster: bool = False) -> None:
    """A Role (or ClusterRole) for one verb on one named object, bound to the tenant; applied as YAML because
    kubectl create refuses verbs it does not know, like `use`."""
    plural, _, group = resource.partition(".")
    scope = {} if cluster else {"namespace": NAMESPACE}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole" if cluster else "Role",
        "metadata": {"name": name, **scope},
        "rules": [{"apiGroups": [group], "resources": [plural], "resourceNames": [resource_name], "verbs": [verb]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding" if cluster else "RoleBinding",
        "metadata": {"name": name, **scope},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"], "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
    }
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))


def refused(result: subprocess.CompletedProcess, *fragments: str) -> bool:
    return result.returncode != 0 and all(fragment in result.stderr for fragment in fragments)


@pytest.fixture(scope="module")
def admission(kube: Kube) -> Iterator[Kube]:
    kube.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds" / "tunery.dev_finetunejobs.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", NAMESPACE)
    kube.kubectl("create", "role", "finetunejobs", "-n", NAMESPACE, "--verb=create,get,list,watch,update,patch,delete",
                 "--resource=finetunejobs.tunery.dev")  # fmt: skip
    kube.kubectl("create", "rolebinding", "finetunejobs", "-n", NAMESPACE, "--role=finetunejobs", f"--user={TENANT}")
    # Without the policy the operator's rights are the tenant's: this is what it closes.
    assert as_tenant(kube, finetunejob()).returncode == 0
    policy = policy_documents("--set", f"admission.priorityClassesForAll={{{OPEN_CLASS}}}")
    kube.kubectl("apply", "-f", "-", input=policy)
    # Admission policies take effect a moment after they are stored.
    deadline = time.monotonic() + 60
    while as_tenant(kube, finetunejob()).returncode == 0:
        assert time.monotonic() < deadline, "the admission policy never took effect"
        time.sleep(0.5)
    # The examples' own Secret is the tenant's: each test below asks for one more right.
    grant(kube, "read-s3-creds", "get", "secrets", "s3-creds")
    yield kube
    kube.kubectl("delete", "-f", "-", input=policy)
    kube.kubectl("delete", "clusterrole,clusterrolebinding", "admission-e2e-use-high", check=False)


@pytest.mark.parametrize(
    ("changes", "fragments", "kind", "name"),
    [
        (
            {"storage": {"credentialsSecret": "team-creds"}},
            ("spec.storage.credentialsSecret", f"user {TENANT} may not get Secret team-creds"),
            "secrets",
            "team-creds",
        ),
        (
            {"serving": {"apiKeySecret": "bot-keys"}},
            ("spec.serving.apiKeySecret", "may not get Secret bot-keys"),
            "secrets",
            "bot-keys",
        ),
        (
            {"dataset": {"train": "pvc://shared-data/train.jsonl"}},
            ("may not get every PersistentVolumeClaim", "(shared-data)"),
            "persistentvolumeclaims",
            "shared-data",
        ),
    ],
    ids=["credentials-secret", "api-key-secret", "claim"],
)
def test_what_the_tenant_cannot_get_is_refused_until_they_may(
    admission: Kube, changes: dict, fragments: tuple[str, ...], kind: str, name: str
) -> None:
    document = finetunejob(**changes)
    assert refused(as_tenant(admission, document), *fragments)
    grant(admission, f"read-{name}", "get", kind, name)
    assert as_tenant(admission, document).returncode == 0


def test_a_priority_class_needs_use_unless_it_is_open_to_all(admission: Kube) -> None:
    high = finetunejob(resources={"priorityClassName": "high"})
    assert refused(as_tenant(admission, high), "spec.resources.priorityClassName", "may not use PriorityClass high")
    assert as_tenant(admission, finetunejob(resources={"priorityClassName": OPEN_CLASS})).returncode == 0
    grant(admission, "admission-e2e-use-high", "use", "priorityclasses.scheduling.k8s.io", "high", cluster=True)
    assert as_tenant(admission, high).returncode == 0


def test_the_admin_is_not_refused(admission: Kube) -> None:
    document = finetunejob("admins", storage={"credentialsSecret": "platform-creds"})
    assert admission.kubectl("apply", "--dry-run=server", "-f", "-", input=document, check=False).returncode == 0


def test_only_changes_of_the_spec_are_checked_again(admission: Kube) -> None:
    """A label edit (or the garbage collector, or Argo CD re-applying) passes; a spec edit by the tenant does not."""
    admission.kubectl("apply", "-f", "-", input=finetunejob("shared", storage={"credentialsSecret": "platform-creds"}))
    labelled = admission.kubectl(
        "label", "ftj", "shared", "-n", NAMESPACE, "team=a", f"--as={TENANT}", check=False
    )  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    edited = admission.kubectl(
        "patch", "ftj", "shared", "-n", NAMESPACE, f"--as={TENANT}", "--type=merge",
        "-p", '{"spec": {"hyperparameters": {"epochs": 1}}}', check=False,
    )  # fmt: skip
    assert refused(edited, "spec.storage.credentialsSecret", "may not get Secret platform-creds")
