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
            "EpicycleLearnerAbsent", "EpicycleLearnerNotReady", "EpicycleCoordinatorStalled",
            "EpicycleLabelsNotDispatched", "EpicycleOraclePoolDown"} <= alerts


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


#: (what, coordinator {queued, in_flight} or None, oracle pods [(queued, in_flight)], expected demand)
KEDA_SCENARIOS = [
    ("the coordinator's in-flight requests are the oracles' queued + in flight: counted once",
     {"queued": 3, "in_flight": 2}, [(0, 1), (0, 1)], 5),
    ("oracle work beyond the coordinator's requests (another client) is added",
     {"queued": 0, "in_flight": 1}, [(2, 1)], 3),
    ("a request still on its way to the oracle is not subtracted twice (clamped at 0)",
     {"queued": 1, "in_flight": 2}, [(0, 1)], 3),
    ("no coordinator: the oracles' own queued + in flight, as before",
     None, [(1, 1), (0, 1)], 3),
    ("nothing running anywhere: 0, not an empty result",
     None, [], 0),
]


def test_keda_demand_counts_each_request_once(tmp_path):
    """The ScaledObject's query, evaluated by promtool on synthetic gauges (with another namespace's
    series present, which it must ignore)."""
    so = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    query = so["spec"]["triggers"][0]["metadata"]["query"].replace("NAMESPACE", "epicycle")
    tests = []
    for what, coordinator, oracles, expected in KEDA_SCENARIOS:
        series = [  # a busy neighbour namespace
            {"series": 'epicycle_coordinator_labels_queued{namespace="other",service="coordinator-metrics"}',
             "values": "7x10"},
            {"series": 'epicycle_oracle_in_flight{namespace="other",service="oracle-headless",pod="o"}',
             "values": "5x10"},
        ]
        if coordinator is not None:
            for key, value in coordinator.items():
                series.append({"series": f'epicycle_coordinator_labels_{key}{{namespace="epicycle",'
                                         f'service="coordinator-metrics",pod="coordinator-x"}}',
                               "values": f"{value}x10"})
        for i, (queued, in_flight) in enumerate(oracles):
            for name, value in (("queued", queued), ("in_flight", in_flight)):
                series.append({"series": f'epicycle_oracle_{name}{{namespace="epicycle",service="oracle-headless",'
                                         f'pod="oracle-{i}",backend="qe"}}',
                               "values": f"{value}x10"})
        tests.append({"name": what, "interval": "1m", "input_series": series,
                      "promql_expr_test": [{"expr": query, "eval_time": "5m",
                                            "exp_samples": [{"labels": "{}", "value": expected}]}]})
    (tmp_path / "empty_rules.yaml").write_text("groups: []\n")
    (tmp_path / "keda_test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["empty_rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    proc = run([require("promtool"), "test", "rules", "keda_test.yaml"], cwd=tmp_path)
    assert "SUCCESS" in proc.stdout + proc.stderr
