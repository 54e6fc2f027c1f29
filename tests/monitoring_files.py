"""The chart's Grafana dashboard and alert rules as the tests read them, and the series a metric family exposes."""

import json
from collections.abc import Iterable

import yaml
from prometheus_client.metrics_core import Metric

from conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "tunery"
DASHBOARD = CHART / "dashboards" / "tunery.json"
RULES = CHART / "rules" / "tunery-alerts.yaml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    """Every panel that queries Prometheus: rows only group panels (and collapsed rows hold theirs)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def series_names(families: Iterable[Metric]) -> set[str]:
    """The series names of these metric families, whether or not a labelled metric has a child yet."""
    return {family.name + suffix for family in families for suffix in _SUFFIXES.get(family.type, ("",))}
