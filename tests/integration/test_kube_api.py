"""The FineTuneJob API on a real kube-apiserver: the CRD installs, examples apply, invalid manifests are refused."""

import json
import time

import pytest
import yaml

from conftest import EXAMPLES, REPO_ROOT, Kube
from invalid_cases import InvalidCase, load_cases
from tunery.api.spec import FineTuneJobSpec

pytestmark = pytest.mark.integration

CRD_FILE = REPO_ROOT / "crds" / "tunery.dev_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd_installed(kube: Kube) -> Kube:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
    _eventually(lambda: kube.kubectl("get", "ftj", check=False).returncode == 0, "FineTuneJob API not discoverable")
    return kube


def _eventually(predicate, failure: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        time.sleep(0.5)


def test_nodes_are_simulated_gpu_nodes(kube: Kube) -> None:
    nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    gpus = {node["metadata"]["name"]: node["status"]["capacity"].get("nvidia.com/gpu") for node in nodes}
    assert gpus["gpu-node-0"] == "8" and gpus["gpu-node-1"] == "8"
    assert all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]) for node in nodes
    )


def test_crd_is_established_with_short_name(crd_installed: Kube) -> None:
    resources = crd_installed.kubectl("api-resources", "--api-group=tunery.dev", "-o", "wide").stdout
    assert "finetunejobs" in resources and "ftj" in resources and "FineTuneJob" in resources


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_applies_and_is_defaulted_like_pydantic(crd_installed: Kube, path) -> None:
    """Server-side apply accepts each example, and the API server's defaults equal pydantic's."""
    namespace = "examples"
    crd_installed.kubectl("create", "namespace", namespace, check=False)
    crd_installed.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    stored = json.loads(crd_installed.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout)
    expected = FineTuneJobSpec.model_validate(yaml.safe_load(path.read_text())["spec"])
    assert stored["spec"] == expected.model_dump(by_alias=True, mode="json", exclude_none=True)


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: case.path.stem)
def test_invalid_manifest_is_refused_at_apply(crd_installed: Kube, case: InvalidCase) -> None:
    result = crd_installed.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(case.path), check=False)
    if not case.rejected_by_api_server:
        # A known gap: CEL cannot see untyped fields, so only the operator's validation reports these.
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert case.field.removeprefix("spec.") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_rule_message_reaches_the_user(crd_installed: Kube) -> None:
    case = next(case for case in load_cases() if case.path.stem == "qlora-without-gpu")
    result = crd_installed.kubectl("apply", "-f", str(case.path), check=False)
    assert f"{case.field}: Invalid value" in result.stderr and case.message in result.stderr


def test_explain_prints_descriptions(crd_installed: Kube) -> None:
    def explained() -> bool:
        return "fine-tuning method" in crd_installed.kubectl("explain", "finetunejob.spec.method", check=False).stdout

    _eventually(explained, "kubectl explain has no descriptions")
    output = crd_installed.kubectl("explain", "finetunejob.spec.method").stdout
    assert "low-rank adapters" in output and "promptTuning" in output
    assert (
        "Maximum tokens per training sequence" in crd_installed.kubectl("explain", "ftj.spec.dataset.maxLength").stdout
    )


def test_get_shows_printer_columns(crd_installed: Kube) -> None:
    crd_installed.kubectl("apply", "--server-side", "-f", str(EXAMPLES[0]))
    name = yaml.safe_load(EXAMPLES[0].read_text())["metadata"]["name"]
    status = {
        "status": {
            "phase": "Running",
            "progress": {"step": 450, "totalSteps": 1000, "epoch": 1.35, "percent": 45},
            "metrics": {"trainLoss": 1.234},
            "model": {"uri": "s3://models/out/support-bot/r1/", "name": "support-bot"},
        }
    }
    crd_installed.kubectl("patch", "ftj", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    table = crd_installed.kubectl("get", "ftj", name).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "MODEL", "AGE"]
    assert table[1].split()[:5] == [name, "Running", "45", "1.234", "s3://models/out/support-bot/r1/"]


def test_status_is_validated_by_its_schema(crd_installed: Kube) -> None:
    crd_installed.kubectl("apply", "--server-side", "-f", str(EXAMPLES[0]))
    name = yaml.safe_load(EXAMPLES[0].read_text())["metadata"]["name"]
    result = crd_installed.kubectl(
        "patch",
        "ftj",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Exploded"}}',
        check=False,
    )
    assert result.returncode != 0 and "status.phase" in result.stderr
