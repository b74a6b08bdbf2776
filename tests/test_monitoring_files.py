"""The Prometheus alert rules, their unit tests, the Grafana dashboard and the README's metric
table agree with what the agent exports: the collector's own describe() is the one list of
names (metrics.exposed_sample_names), never a list kept by hand here.

PromQL is parsed with promql-parser (GreptimeDB's parser); promtool, when `make tools` could
install it, checks the rules and runs their unit tests (deploy/prometheus/alerts.test.yml).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import redis
import yaml

from ponos_tasks.metrics import PonosCollector, exposed_sample_names
from tests.tool_venvs import tool_bin

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ponos-vast.json"
README = ROOT / "README.md"

# Grafana's variables, replaced by a value of the same kind so that the query parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported() -> set[str]:
    # describe() reads no Redis: the client below never connects.
    return exposed_sample_names(PonosCollector(redis.Redis(host="127.0.0.1", port=1)))


def allowed() -> set[str]:
    return exported()


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (ValueError when it does not parse)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def alert_rules() -> list[dict]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query with Grafana's variables replaced) of every panel target."""
    data = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in data["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


# --------------------------------------------------------------------------- the alert rules


def test_alert_rules_are_complete_and_parse():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert metric_names(rule["expr"]), f"{rule['alert']}: no metric in {rule['expr']!r}"


def test_alert_rules_use_only_exported_metrics():
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - allowed()
        assert not unknown, f"{rule['alert']} uses metrics the agent does not export: {unknown}"


def test_a_misspelt_metric_is_caught():
    """The check above would see a typo (the parser finds names inside any expression)."""
    expr = 'sum by (api) (rate(ponos_api_call_total{api="vast"}[5m])) > on() ponos_redis_up'
    assert metric_names(expr) - allowed() == {"ponos_api_call_total"}
    with pytest.raises(ValueError):
        metric_names("rate(ponos_api_calls_total[5m)")


def test_every_alert_has_a_unit_test_that_fires_it_on_exported_series():
    data = yaml.safe_load(ALERT_TESTS.read_text())
    assert data["rule_files"] == [ALERTS.name]
    fired = set()
    for case in data["tests"]:
        for series in case["input_series"]:
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", series["series"]).group(0)
            assert name in allowed(), f"{case['name']}: {name} is not a metric of the agent"
        for check in case["alert_rule_test"]:
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
    assert fired == {rule["alert"] for rule in alert_rules()}


@pytest.mark.stack  # runs a program
def test_promtool_checks_the_rules():
    promtool = tool_bin("promtool", "promtool")
    result = subprocess.run(
        [promtool, "check", "rules", ALERTS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.stack  # runs a program
def test_promtool_runs_the_alert_unit_tests():
    promtool = tool_bin("promtool", "promtool")
    result = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_queries_parse_and_use_only_exported_metrics():
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, expr in queries:
        unknown = metric_names(expr) - allowed()
        assert not unknown, f"panel {title!r} uses metrics the agent does not export: {unknown}"


def test_dashboard_is_importable():
    """Grafana's import: one datasource input that every panel and query uses, unique panel
    ids, panels inside the 24-column grid."""
    data = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_every_exported_metric_is_on_the_dashboard_or_in_an_alert():
    used = set()
    for _, expr in dashboard_queries():
        used |= metric_names(expr)
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    families_used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    unseen = {
        name
        for name in exported()
        if re.sub(r"_(bucket|count|sum)$", "", name) not in families_used
    }
    assert not unseen


# --------------------------------------------------------------------------- the README


def test_readme_metric_table_lists_exactly_the_exported_metrics():
    """README.md's table under `ponos-vast metrics`: one row per family, named as PromQL sees
    it (a counter with _total, a histogram by its base name)."""
    text = README.read_text()
    table = text.split("endpoint `/metrics` with the agent's domain metrics", 1)[1]
    table = table.split("\n\n", 2)[1]  # the table follows the sentence
    documented = set(re.findall(r"^\s*\| `(ponos_[a-z_]+)", table, flags=re.M))
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in PonosCollector(redis.Redis(host="127.0.0.1", port=1)).describe()
    }
    assert documented == families
