"""The Grafana dashboard and the Prometheus alert rules in deploy/ parse (every query as PromQL, with promql-parser:
`pip install -e '.[deploy-check]'`), the rules have what Prometheus reads, and every pagedllm metric they query,
and every label they select or group by, is one a live server exports on /metrics (histograms through their
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
_GRAFANA_RANGE = re.compile(r"\$__(?:rate_interval|interval|range)\b")  # Grafana fills these in with a duration
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")  # a Grafana variable's query, around a selector
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}  # Prometheus refuses others


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pagedllm.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"]]
    return exprs


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def as_promql(expr: str) -> str:
    """A dashboard or rule query as Prometheus receives it: Grafana's range variables filled in, the selector of a
    ``label_values(...)`` variable query."""
    expr = _GRAFANA_RANGE.sub("5m", expr.strip())
    label_values = _LABEL_VALUES.match(expr)
    return label_values.group(1) if label_values else expr


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


def test_every_query_is_valid_promql():
    promql_parser = pytest.importorskip("promql_parser")
    invalid = {}
    for expr in dashboard_exprs() + alert_exprs():
        try:
            promql_parser.parse(as_promql(expr))
        except ValueError as exc:
            invalid[expr] = str(exc)
    assert not invalid, json.dumps(invalid, indent=1)
    with pytest.raises(ValueError):  # the parser does refuse a broken query
        promql_parser.parse(as_promql("sum(rate(pagedllm:prompt_tokens_total[$__rate_interval])"))


def test_alert_rules_have_what_prometheus_and_alertmanager_read():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert set(rule) <= RULE_KEYS, f"{rule['alert']}: keys Prometheus does not know: {set(rule) - RULE_KEYS}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_and_label_queried_is_exported(source, exported):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    problems = {expr: found for expr in exprs if (found := check_expr(expr, exported))}
    assert not problems, json.dumps(problems, indent=1)


def test_the_check_catches_a_wrong_name(exported):
    assert check_expr('rate(pagedllm:generation_tokens[1m])', exported) == ["metric pagedllm:generation_tokens"]
    assert check_expr('sum by (reason) (pagedllm:num_requests_waiting{model="x"})', exported) == [
        "label model of pagedllm:num_requests_waiting", "grouping label reason"]
