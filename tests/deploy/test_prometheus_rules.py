"""k8s/monitoring/rules.yaml: promtool check + unit tests, the PrometheusRule copy, metric names."""

from __future__ import annotations

import re

import pytest
import yaml

from .prometheus import exported_metric_names
from .tools import K8S, require, run

MONITORING = K8S / "monitoring"
RULES = MONITORING / "rules.yaml"


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    out = run([require("promtool"), "check", "rules", str(RULES)], cwd=MONITORING).stdout
    assert "SUCCESS" in out


def test_promtool_unit_tests():
    """rules_test.yaml: every alert fires when it should (labels, annotations) and not before."""
    proc = run([require("promtool"), "test", "rules", "rules_test.yaml"], cwd=MONITORING)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_is_unit_tested():
    tested = set()
    for t in yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]:
        for a in t.get("alert_rule_test", []):
            if a.get("exp_alerts"):
                tested.add(a["alertname"])
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"
    assert {"EpicycleOracleFailureRateHigh", "EpicycleOracleQueueSaturated", "EpicycleNoMDProgress",
            "EpicycleLearnerAbsent", "EpicycleLearnerNotReady", "EpicycleCoordinatorStalled"} <= alerts


def test_alerts_have_for_severity_and_annotations():
    for rule in _rules():
        if "alert" not in rule:
            assert re.fullmatch(r"epicycle:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            continue
        assert rule.get("for"), f"{rule['alert']}: needs `for:` (no paging on one bad scrape)"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80


def test_prometheusrule_is_rendered_from_rules_yaml():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("render_prometheusrule", MONITORING / "render_prometheusrule.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (MONITORING / "prometheusrule.yaml").read_text() == module.render(), (
        "prometheusrule.yaml is stale: run python k8s/monitoring/render_prometheusrule.py")
    assert yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"] == yaml.safe_load(
        RULES.read_text())


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    return exported_metric_names()


def referenced_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(epicycle_[a-z0-9_]+)\b", expr))


def test_rules_reference_only_exported_metrics(metric_names):
    assert "epicycle_oracle_calls_total" in metric_names and "epicycle_sampler_steps_total" in metric_names
    unknown = {m for r in _rules() for m in referenced_metrics(r["expr"])} - metric_names
    assert not unknown, f"rules use metrics no service exports: {sorted(unknown)}"


def test_keda_query_references_only_exported_metrics(metric_names):
    so = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    query = so["spec"]["triggers"][0]["metadata"]["query"]
    assert referenced_metrics(query) and referenced_metrics(query) <= metric_names


def test_dashboard_references_only_exported_metrics(metric_names):
    from .dashboard import panel_queries

    unknown = {m for _, e in panel_queries() for m in referenced_metrics(e)} - metric_names
    assert not unknown, f"dashboard uses metrics no service exports: {sorted(unknown)}"
