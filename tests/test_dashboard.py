"""The Grafana dashboard and the alert rules in the chart: well-formed, complete, and naming only metrics that exist."""

import re

import pytest
from monitoring_files import CHART, RULES, alert_rules, load_dashboard, query_panels, series_names
from tunery_server.metrics import ServerMetrics

from conftest import REPO_ROOT
from tunery.controller.metrics import OperatorMetrics
from tunery_trainer.metrics import TrainerMetrics

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# What the dashboard must show: a panel title and a metric that one of its queries reads.
REQUIRED_PANELS = {
    "FineTuneJobs by phase": "tunery_finetunejobs",
    "GPUs in use": "tunery_gpus_requested",
    "Training loss": "tunery_trainer_loss",
    "Eval loss": "tunery_trainer_eval",
    "Learning rate": "tunery_trainer_learning_rate",
    "Training tokens per second": "tunery_trainer_tokens_per_second",
    "Progress": "tunery_trainer_total_steps",
    "ETA": "tunery_trainer_step_duration_seconds_sum",
    "Reconcile latency": "tunery_reconcile_duration_seconds_bucket",
    "Reconciles and errors": "tunery_reconcile_errors_total",
    "Request rate": "tunery_server_requests_total",
    "Request latency": "tunery_server_request_duration_seconds_bucket",
    "Time to first token": "tunery_server_time_to_first_token_seconds_bucket",
}
# The series Prometheus adds itself.
PROMETHEUS_SERIES = {"up"}


def exposed_series() -> set[str]:
    return (
        series_names(OperatorMetrics().registry.collect())
        | series_names(TrainerMetrics("ns", "job").registry.collect())
        | series_names(ServerMetrics("model").registry.collect())
        | PROMETHEUS_SERIES
    )


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(tunery_[a-z0-9_]+|up)\b(?!\s*\()", expr))


def test_dashboard_is_grafana_json_with_a_templated_datasource() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "tunery" and dashboard["title"] == "Tunery"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "finetunejob"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert re.fullmatch(rf"label_values\(.*tunery_trainer_step.*, {name}\)", variables[name]["query"])
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    # The job list follows the chosen namespaces.
    assert 'namespace=~"$namespace"' in variables["finetunejob"]["query"]


def test_every_panel_has_the_datasource_and_a_query() -> None:
    dashboard = load_dashboard()
    panels = query_panels(dashboard)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert len({panel["title"] for panel in panels}) == len(panels), "panel titles name panels in docs and tests"
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, (panel["title"], target)
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"


def test_panels_stay_inside_the_grid() -> None:
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize(("title", "metric"), REQUIRED_PANELS.items())
def test_required_panel_exists(title: str, metric: str) -> None:
    panels = {panel["title"]: panel for panel in query_panels(load_dashboard())}
    assert title in panels, f"no panel {title!r}"
    assert any(metric in target["expr"] for target in panels[title]["targets"]), (title, metric)


def test_job_panels_follow_the_template_variables() -> None:
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = target["expr"]
            if "tunery_trainer_" in expr or "tunery_server_" in expr:
                assert 'namespace=~"$namespace"' in expr and 'finetunejob=~"$finetunejob"' in expr, expr
            elif "tunery_finetunejobs" in expr or "tunery_gpus_requested" in expr:
                assert 'namespace=~"$namespace"' in expr, expr


def test_dashboard_and_rules_read_only_metrics_that_exist() -> None:
    """Every series a query names is one the operator, trainer or server registry exposes (or Prometheus adds)."""
    exposed = exposed_series()
    expressions = [target["expr"] for panel in query_panels(load_dashboard()) for target in panel["targets"]]
    expressions += [rule["expr"] for rule in alert_rules()]
    unknown = {name: expr for expr in expressions for name in metrics_in(expr) if name not in exposed}
    assert not unknown, unknown


def test_every_alert_says_how_bad_what_and_where_to_look() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "TuneryFineTuneJobFailed",
        "TuneryTrainingStalled",
        "TuneryOperatorDown",
        "TuneryReconcileErrors",
        "TuneryServingDown",
    }
    docs = (REPO_ROOT / "docs" / "observability.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert f"docs/observability.md#{rule['alert'].lower()}" in rule["annotations"]["runbook"], rule["alert"]
        assert f"### {rule['alert']}" in docs, f"docs/observability.md does not explain {rule['alert']}"
        # Trainer and serving series carry the job's labels: their alerts must name the job.
        if re.search(r"tunery_trainer_|tunery_server_|tunery-serving", rule["expr"]):
            assert "{{ $labels.finetunejob }}" in rule["annotations"]["summary"], rule["alert"]


def test_the_chart_replaces_the_stall_threshold_text_that_the_rules_file_holds() -> None:
    """templates/prometheusrule.yaml swaps this exact text for stalledMinutes; it must stay in the rules file."""
    template = (CHART / "templates" / "prometheusrule.yaml").read_text()
    marker = re.search(r'\$marker := "([^"]+)"', template).group(1)
    assert RULES.read_text().count(marker) == 1
