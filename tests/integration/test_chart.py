"""The Helm chart on the local control plane: it lints and installs, and the operator works under its RBAC alone."""

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from monitoring_files import CHART, RULES, load_dashboard

from conftest import REPO_ROOT, Kube
from localenv import tools
from operator_harness import OperatorProcess, manifest, wait_for
from tunery.controller.settings import OperatorSettings

pytestmark = pytest.mark.integration

RELEASE_NAMESPACE = "tunery-system"
WATCHED = "chart-e2e"


def helm(kube: Kube, *args: str) -> subprocess.CompletedProcess:
    command = [str(tools.bin_dir() / "helm"), f"--kubeconfig={kube.kubeconfig}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def installed(kube: Kube) -> Iterator[Kube]:
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
    yield kube
    # The admission policy is cluster-wide: later test modules start from a cluster without it.
    helm(kube, "uninstall", "tunery", "-n", RELEASE_NAMESPACE, "--wait")


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
    for bad in (
        ["--set", "replicas=0"],
        ["--set", "watchNamespaces={Team_A}"],
        ["--set", "imagee.tag=x"],
        ["--set", "trainerTerminationGracePeriodSeconds=0"],
    ):
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


def test_the_trainer_grace_period_reaches_the_operators_settings(kube: Kube) -> None:
    for values, seconds in (([], 300), (["--set", "trainerTerminationGracePeriodSeconds=900"], 900)):
        (deployment,) = rendered(kube, *values)["Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert OperatorSettings().trainer_termination_grace_seconds == seconds


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


MONITORING = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.podMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true",
]
GOLDEN = REPO_ROOT / "tests" / "golden"


def rendered(kube: Kube, *values: str) -> dict[str, list[dict]]:
    """`helm template` parsed, by kind: the monitoring.coreos.com CRDs are not in the local cluster to apply to."""
    text = helm(kube, "template", "tunery", str(CHART), "-n", RELEASE_NAMESPACE, "--kube-version", "1.34.4", *values)
    by_kind: dict[str, list[dict]] = {}
    for document in yaml.safe_load_all(text.stdout):
        if document:
            by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, and matchExpressions with In and Exists) against labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        operator, key = expression["operator"], expression["key"]
        if (operator == "Exists" and key not in labels) or (
            operator == "In" and labels.get(key) not in expression["values"]
        ):
            return False
    return True


def golden_pod(file: str, kind: str) -> dict:
    """The pod template the operator renders (the golden files of tests/test_render*.py)."""
    documents = [doc for doc in yaml.safe_load_all((GOLDEN / file).read_text()) if doc and doc["kind"] == kind]
    return documents[0]["spec"]["template"]


def test_lint_strict_with_monitoring(kube: Kube) -> None:
    helm(kube, "lint", "--strict", str(CHART), *MONITORING)


def test_monitoring_objects_are_off_by_default_but_the_dashboard(kube: Kube) -> None:
    by_kind = rendered(kube)
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & set(by_kind)
    (dashboard,) = [cm for cm in by_kind["ConfigMap"] if cm["metadata"]["name"] == "tunery-operator-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert json.loads(dashboard["data"]["tunery.json"]) == load_dashboard()
    config_maps = rendered(kube, "--set", "monitoring.dashboard.enabled=false")["ConfigMap"]
    assert [cm["metadata"]["name"] for cm in config_maps] == ["tunery-operator-policy"]


def test_service_monitor_scrapes_the_operator_service_as_tunery_operator(kube: Kube) -> None:
    by_kind = rendered(kube, *MONITORING, "--set", "monitoring.serviceMonitor.labels.release=kps")
    (monitor,) = by_kind["ServiceMonitor"]
    (service,) = by_kind["Service"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    # The FineTuneJob's namespace label must survive the scrape; the alert looks for this job name.
    assert endpoint["honorLabels"] is True
    assert {"targetLabel": "job", "replacement": "tunery-operator"} in endpoint["relabelings"]
    assert 'up{job="tunery-operator"}' in RULES.read_text()


def test_pod_monitor_scrapes_training_and_serving_pods_on_their_metrics_port(kube: Kube) -> None:
    (monitor,) = rendered(kube, *MONITORING)["PodMonitor"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # Workload pods may run tenant code: their own labels never override namespace, pod or finetunejob.
    assert endpoint["honorLabels"] is False
    relabelings = endpoint["relabelings"]
    (keep,) = [r for r in relabelings if r.get("action") == "keep"]
    for file, kind, component in (
        ("lora-sft-chat.yaml", "Job", "trainer"),
        ("qlora-multinode.yaml", "Job", "trainer"),
        ("serving-builtin.yaml", "Deployment", "serving"),
    ):
        pod = golden_pod(file, kind)
        assert selects(monitor["spec"]["selector"], pod["metadata"]["labels"]), file
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert "metrics" in {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}, file
        assert re.fullmatch(keep["regex"], f"{component};"), file
    assert re.fullmatch(keep["regex"], "trainer;0") and not re.fullmatch(keep["regex"], "trainer;1")
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_tunery_dev_finetunejob"],
        "targetLabel": "finetunejob",
    } in relabelings
    # The server labels its series by API route as `endpoint`, which the Prometheus Operator's endpoint=<port>
    # target label would otherwise push to exported_endpoint.
    assert {"action": "labeldrop", "regex": "endpoint"} in relabelings
    watched = rendered(kube, *MONITORING, "--set", "watchNamespaces={a,b}")["PodMonitor"][0]
    assert watched["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}


def test_prometheus_rule_is_the_rules_file_with_the_stall_threshold_set(kube: Kube) -> None:
    source = yaml.safe_load(RULES.read_text())
    (default,) = rendered(kube, *MONITORING)["PrometheusRule"]
    assert default["spec"] == source
    (custom,) = rendered(
        kube,
        *MONITORING,
        "--set",
        "monitoring.prometheusRule.stalledMinutes=45",
        "--set",
        "monitoring.prometheusRule.labels.release=kps",
    )["PrometheusRule"]
    assert custom["metadata"]["labels"]["release"] == "kps"
    stalled = [
        rule
        for group in custom["spec"]["groups"]
        for rule in group["rules"]
        if rule["alert"] == "TuneryTrainingStalled"
    ]
    assert "> 45 * 60" in stalled[0]["expr"] and "30 * 60" not in stalled[0]["expr"]


def test_dashboard_config_map_is_accepted_by_the_api_server(kube: Kube) -> None:
    kube.kubectl("create", "namespace", "monitoring", check=False)
    values = [
        "--set",
        "monitoring.dashboard.namespace=monitoring",
        "--set",
        "monitoring.dashboard.annotations.grafana_folder=Tunery",
    ]
    (dashboard,) = [cm for cm in rendered(kube, *values)["ConfigMap"] if cm["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Tunery"}
    kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(dashboard))
