"""The Grafana dashboard and the Prometheus alert rules in deploy/ parse, and every pagedllm metric they query, and
every label they select or group by, is one a live server exports on /metrics (histograms through their
_bucket / _sum / _count series)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
_METRIC = re.compile(r"(pagedllm:[A-Za-z0-9_:]+)(\{[^}]*\})?")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job", "namespace", "pod"}  # added by Prometheus when it scrapes


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pagedllm.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(server) -> dict[str, set[str]]:
    """Sample name -> its label names, read from the live server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url_for("/metrics"), timeout=10).text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def check_expr(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What ``expr`` uses that the server does not export: unknown metrics, labels no metric of it carries."""
    problems, known_labels = [], set(TARGET_LABELS)
    for name, selector in _METRIC.findall(expr):
        if name not in exported:
            problems.append(f"metric {name}")
            continue
        known_labels |= exported[name]
        problems += [f"label {label} of {name}" for label in _MATCHER_LABEL.findall(selector or "")
                     if label not in exported[name] | TARGET_LABELS]
    for grouping in _GROUPING.findall(expr):
        problems += [f"grouping label {label}" for label in map(str.strip, grouping.split(","))
                     if label and label not in known_labels]
    return problems


def test_dashboard_and_alerts_parse_and_use_something():
    assert len(dashboard_exprs()) >= 12 and len(alert_exprs()) >= 4
    assert all(_METRIC.search(expr) for expr in alert_exprs() if "up{" not in expr)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_and_label_queried_is_exported(source, exported):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    problems = {expr: found for expr in exprs if (found := check_expr(expr, exported))}
    assert not problems, json.dumps(problems, indent=1)


def test_the_check_catches_a_wrong_name(exported):
    assert check_expr('rate(pagedllm:generation_tokens[1m])', exported) == ["metric pagedllm:generation_tokens"]
    assert check_expr('sum by (reason) (pagedllm:num_requests_waiting{model="x"})', exported) == [
        "label model of pagedllm:num_requests_waiting", "grouping label reason"]
