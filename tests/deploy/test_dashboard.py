"""k8s/monitoring/dashboards/epicycle.json: structure, and every query parses in a real Prometheus."""

from __future__ import annotations

import pytest
import yaml

from .dashboard import DASHBOARD, iter_panels, load, panel_queries, substitute
from .prometheus import start_prometheus, stop_prometheus
from .tools import K8S


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"))
    yield server
    stop_prometheus(server)


def test_datasource_variable_and_panel_datasources():
    dash = load()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["datasource"]["uid"] == "${datasource}"
    for panel in iter_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in t["expr"], f"{panel['title']}: query ignores $namespace"


def test_layout_ids_and_grid():
    dash = load()
    panels = list(iter_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_panels_cover_the_cycle():
    exprs = " ".join(e for _, e in panel_queries())
    for metric in ("epicycle_coordinator_max_sigma_ratio", "epicycle_oracle_calls_total", "epicycle_oracle_queued",
                   "epicycle_oracle_in_flight", "epicycle_learner_noise_ev_per_angstrom",
                   "epicycle_learner_training_environments", "epicycle_sampler_temperature_kelvin",
                   "epicycle_sampler_steps_total", "epicycle_grpc_server_handled_total",
                   "epicycle_coordinator_labels_queued", "epicycle_coordinator_labels_in_flight",
                   "epicycle_coordinator_temperature_kelvin"):
        assert metric in exprs, f"no panel shows {metric}"
    assert any("grpc_code" in e for _, e in panel_queries()), "errors by code"
    assert any("by (namespace, walker)" in e and "epicycle_coordinator_temperature_kelvin" in e
               for _, e in panel_queries()), "one temperature line per walker"


def test_panel_queries_helper():
    queries = panel_queries(DASHBOARD)
    assert len(queries) >= 20 and all(isinstance(t, str) and isinstance(e, str) for t, e in queries)
    assert all("$" not in e for _, e in queries)
    raw = panel_queries(DASHBOARD, raw=True)
    assert any("$__rate_interval" in e for _, e in raw)
    narrowed = panel_queries(DASHBOARD, variables={"namespace": "epicycle"})
    assert all('namespace=~"epicycle"' in e for _, e in narrowed)
    assert substitute("rate(x[${__rate_interval}])") == "rate(x[1m])"
    with pytest.raises(KeyError):
        substitute("x{a=\"$unknown\"}")


def test_every_panel_query_parses_in_prometheus(prometheus):
    failures = []
    for title, expr in panel_queries():
        reply = prometheus.query(expr)
        if reply.get("status") != "success":
            failures.append(f"{title}: {reply.get('errorType')}: {reply.get('error')}\n  {expr}")
    assert not failures, "\n".join(failures)


def test_prometheus_rejects_a_broken_query(prometheus):
    """The parse check above is real: a syntax error comes back as bad_data."""
    reply = prometheus.query('sum by (namespace (epicycle_oracle_queued)')
    assert reply["status"] == "error" and reply["errorType"] == "bad_data"


def test_keda_query_parses_in_prometheus(prometheus):
    so = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    query = so["spec"]["triggers"][0]["metadata"]["query"].replace("NAMESPACE", "epicycle")
    assert prometheus.query(query)["status"] == "success"
