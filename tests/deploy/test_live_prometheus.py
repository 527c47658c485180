"""A real Prometheus scraping a live embedded run: series exist and move, rules record, every panel has data.

One module-scoped fixture starts

* Debian's ``prometheus`` on 127.0.0.1 (scrape and rule evaluation every second) with
  jobs ``coordinator``, ``oracle``, ``learner`` and ``sampler`` — the job names the
  alerts expect — and ``k8s/monitoring/rules.yaml`` loaded (its group intervals set
  to 1 s so the recording rules produce series within the test);
* ``epicycle run`` as a subprocess: a short aluminium melt with ``metrics_port`` set
  to a free base port (the coordinator on it, the embedded oracle, learner and
  sampler on the next three).  The run is longer than the test needs and is
  stopped when the module is done, so every query sees live targets (series of a
  target that went away turn stale and drop out of instant queries).

Then it waits until the counters have moved since the first complete scrape and
checks series, rules and every Grafana panel query against that Prometheus.
A missing ``prometheus`` binary fails with the install hint, never skips.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .dashboard import DASHBOARD, panel_queries
from .prometheus import PrometheusServer, start_prometheus, stop_prometheus
from .tools import K8S, REPO, require

RULES = K8S / "monitoring" / "rules.yaml"
JOBS = ("coordinator", "oracle", "learner", "sampler")  # metrics_port + 0, 1, 2, 3
#: how long the run may take to become scrapeable and to move every counter: ~35 s with Numba's cache
#: warm; the learner's JIT warm-up alone takes a minute or more when its kernels must be recompiled
DEADLINE_S = 180.0

RUN_CONFIG = {
    "name": "live-prometheus",
    "seed": 3,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [5.0, 3.5],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 1, "until_calls": 40, "max_iterations": 20}},
    # far more steps than the test waits for (it stops the run); heated at 0.5 ps so oracle calls keep coming
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0,
                "schedule": [[500.0, 2000.0]], "steps": 20000, "frame_interval": 5, "checkpoint_interval": 50},
    "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "atoms_per_call": 1},
}

#: expressions that must grow while the run is live: (what, PromQL giving one number)
MOVING = [
    ("MD steps (sampler)", "sum(epicycle_sampler_steps_total)"),
    ("simulated time (coordinator)", "max(epicycle_coordinator_simulated_time_femtoseconds)"),
    ("oracle calls (coordinator)", "sum(epicycle_coordinator_oracle_calls_total)"),
    ("Oracle/Label RPCs", 'sum(epicycle_grpc_server_handled_total{job="oracle",grpc_service="epicycle.v1.Oracle",'
                          'grpc_method="Label",grpc_code="OK"})'),
    ("oracle calculations", 'sum(epicycle_oracle_compute_seconds_count{outcome="computed"})'),
    ("Learner/PredictStream RPCs", 'sum(epicycle_grpc_server_handled_total{job="learner",'
                                   'grpc_service="epicycle.v1.Learner",grpc_method="PredictStream"})'),
    ("Learner/AddDataBatch RPCs", 'sum(epicycle_grpc_server_handled_total{job="learner",grpc_method="AddDataBatch",'
                             'grpc_code="OK"})'),
    ("Sampler/Run RPCs", 'sum(epicycle_grpc_server_handled_total{job="sampler",grpc_method="Run"})'),
    ("learner predictions", 'sum(epicycle_learner_prediction_seconds_count{rpc="PredictStream"})'),
    ("learner optimisations", "sum(epicycle_learner_optimization_seconds_count)"),
    ("training environments (learner)", "max(epicycle_learner_training_environments)"),
    ("training environments (coordinator)", "max(epicycle_coordinator_training_environments)"),
    ("model version", "max(epicycle_learner_model_version)"),
    ("coordinator oracle waits", 'sum(epicycle_coordinator_oracle_call_seconds_count{outcome="ok"})'),
    ("accepted updates", 'sum(epicycle_coordinator_updates_total{decision="accepted"})'),
]

#: metrics whose names issues 13 and 14 fixed without the role prefix (the coordinator decides rollbacks, Δt
#: and the calibration of σ)
UNPREFIXED = {"coordinator": {"epicycle_rollbacks_total", "epicycle_rollbacks_created", "epicycle_timestep_fs",
                              "epicycle_calibration_scale", "epicycle_calibration_mean_squared_z",
                              "epicycle_calibration_coverage_ratio"}}

#: recording rules that have no series in a healthy run, and why
RULES_EMPTY_WHEN_HEALTHY = {
    "epicycle:grpc_errors:rate5m": "selects only RPCs with a status other than OK; "
                                   "it must have series exactly when some RPC failed",
}



# --------------------------------------------------------------------------- fixtures


def _free_consecutive_ports(n: int = 4) -> int:
    """A base port p with p .. p+n-1 free on 127.0.0.1 (below Linux' ephemeral range)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def prometheus_config(base: int, rule_file: str) -> str:
    return yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rule_file],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{base + i}"]}]}
                           for i, job in enumerate(JOBS)],
    }, sort_keys=False)


def fast_rules(path: Path) -> None:
    """rules.yaml with every group evaluated each second (the shipped groups use 30 s)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


class LiveRun:
    def __init__(self, prometheus: PrometheusServer, proc: subprocess.Popen, log: Path, base: int) -> None:
        self.prometheus, self.proc, self.log, self.base = prometheus, proc, log, base
        self.first: dict[str, float] = {}     # MOVING values at the first complete scrape
        self.moved: dict[str, float] = {}     # ... and once all of them had grown
        self.started = time.monotonic()
        self.ready_after = self.moved_after = float("nan")

    def output(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"epicycle run exited with {self.proc.returncode} before the test was done:\n"
                        f"{self.output()}", pytrace=False)

    def vector(self, expr: str) -> list[dict]:
        reply = self.prometheus.query(expr)
        assert reply.get("status") == "success", f"{expr}: {reply}"
        result = reply["data"]["result"]
        if reply["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def number(self, expr: str) -> float | None:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None


def _wait(live: LiveRun, what: str, condition, deadline: float, poll: float = 0.5):
    while time.monotonic() < deadline:
        live.check_alive()
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {time.monotonic() - live.started:.0f} s waiting for {what}\n"
                f"--- epicycle run output ---\n{live.output()}", pytrace=False)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> LiveRun:
    require("prometheus")  # fails with the install hint (bash tests/deploy/setup_tools.sh)
    tmp = tmp_path_factory.mktemp("live-prometheus")
    fast_rules(tmp / "rules.yaml")
    base = _free_consecutive_ports(4)
    prometheus = start_prometheus(tmp, config_text=prometheus_config(base, "rules.yaml"))
    config = dict(RUN_CONFIG, metrics_port=base)
    (tmp / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = tmp / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "run", str(tmp / "run.yaml"), "--run-dir", str(tmp / "run"),
             "--quiet", "--no-report"],
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    live = LiveRun(prometheus, proc, log, base)
    try:
        deadline = live.started + DEADLINE_S

        def all_up():
            up = {r["metric"]["job"]: r["value"][1] for r in live.vector("up")}
            values = {what: live.number(expr) for what, expr in MOVING}
            if all(up.get(j) == "1" for j in JOBS) and all(v is not None for v in values.values()):
                return values
            return None

        live.first = _wait(live, "all four targets up with every series present", all_up, deadline)
        live.ready_after = time.monotonic() - live.started

        def all_moved():
            values = {what: live.number(expr) for what, expr in MOVING}
            if all(v is not None and v > live.first[w] for w, v in values.items()):
                return values
            return None

        live.moved = _wait(live, "every counter/gauge in MOVING to grow", all_moved, deadline)
        # MD gauges measured at least once (NaN before): temperature by the first frame, the drift by the
        # first run call with enough frames on one model version
        _wait(live, "finite MD temperature and energy drift", lambda: all(
            live.vector(f"{g} == {g}") for g in ("epicycle_sampler_temperature_kelvin",
                                                  "epicycle_sampler_energy_drift_ev_per_atom_ps")), deadline)
        live.moved_after = time.monotonic() - live.started
        time.sleep(2.5)  # a couple more scrapes and rule evaluations on top
        yield live
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the run and nothing else
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stop_prometheus(prometheus)


# --------------------------------------------------------------------------- tests


def test_targets_are_the_four_jobs_and_up(live: LiveRun) -> None:
    targets = live.prometheus.api("targets")["data"]["activeTargets"]
    by_job = {t["labels"]["job"]: t for t in targets}
    assert set(by_job) == set(JOBS)
    for i, job in enumerate(JOBS):
        assert by_job[job]["health"] == "up", by_job[job]
        assert by_job[job]["scrapeUrl"] == f"http://127.0.0.1:{live.base + i}/metrics"
    # several scrapes of every target (1 s apart)
    for job in JOBS:
        assert live.number(f'count_over_time(up{{job="{job}"}}[1m])') >= 3, job
    print(f"\nlive run: targets up after {live.ready_after:.1f} s, counters moved after {live.moved_after:.1f} s")


def test_series_exist_per_job(live: LiveRun) -> None:
    """Each job exports its own metrics (and the RPC metrics of its services) — checked through /api/v1/series."""
    expected = {
        "coordinator": ["epicycle_coordinator_oracle_calls_total", "epicycle_coordinator_max_sigma_ratio",
                        "epicycle_coordinator_oracle_calls_per_simulated_picosecond",
                        "epicycle_coordinator_oracle_call_seconds_bucket", "epicycle_coordinator_updates_total",
                        "epicycle_coordinator_oracle_failovers_total", "epicycle_coordinator_oracle_failures_total",
                        "epicycle_coordinator_model_update_seconds_count", "epicycle_rollbacks_total",
                        "epicycle_timestep_fs", "epicycle_calibration_scale",
                        "epicycle_calibration_mean_squared_z"],
        "oracle": ["epicycle_oracle_calls_total", "epicycle_oracle_compute_seconds_bucket",
                   "epicycle_oracle_retries_total", "epicycle_oracle_in_flight", "epicycle_oracle_queued",
                   "epicycle_grpc_server_handling_seconds_bucket", "epicycle_grpc_server_in_progress"],
        "learner": ["epicycle_learner_training_environments", "epicycle_learner_noise_ev_per_angstrom",
                    "epicycle_learner_hyperparameter", "epicycle_learner_model_version",
                    "epicycle_learner_prediction_seconds_bucket", "epicycle_learner_optimization_seconds_bucket",
                    "epicycle_learner_add_data_seconds_count", "epicycle_learner_log_marginal_likelihood"],
        "sampler": ["epicycle_sampler_steps_total", "epicycle_sampler_temperature_kelvin",
                    "epicycle_sampler_energy_drift_ev_per_atom_ps", "epicycle_sampler_steps_per_second"],
    }
    for job, names in expected.items():
        reply = live.prometheus.api("series", [("match[]", f'{{job="{job}",__name__=~"epicycle_.*"}}'),
                                               ("start", f"{time.time() - 300:.0f}")])
        assert reply["status"] == "success", reply
        have = {s["__name__"] for s in reply["data"]}
        missing = [n for n in names if n not in have]
        assert not missing, f"job {job}: no series {missing}"
        others = {n for n in have if n.startswith("epicycle_") and not n.startswith("epicycle_grpc_")
                  and not n.startswith(f"epicycle_{job}_") and n not in UNPREFIXED.get(job, ())}
        assert not others, f"job {job} exports another role's metrics: {sorted(others)}"


def test_counters_and_gauges_move(live: LiveRun) -> None:
    for what, _ in MOVING:
        assert live.moved[what] > live.first[what], f"{what}: {live.first[what]} -> {live.moved[what]}"
    # and counters moved as counters: increase() over the window sees it too
    assert live.number("sum(increase(epicycle_sampler_steps_total[1m]))") > 0
    assert live.number('sum(increase(epicycle_grpc_server_handled_total{grpc_method="PredictStream"}[1m]))') > 0


def test_rpc_counters_by_method_and_code(live: LiveRun) -> None:
    """Every RPC of the cycle is counted by the server that handled it, with the status code."""
    rows = live.vector('sum by (job, grpc_service, grpc_method, grpc_code) (epicycle_grpc_server_handled_total)')
    seen = {(r["metric"]["job"], r["metric"]["grpc_method"], r["metric"]["grpc_code"]) for r in rows}
    for job, method in (("oracle", "Label"), ("learner", "AddDataBatch"), ("learner", "Optimize"),
                        ("learner", "Checkpoint"), ("learner", "GetModelInfo"), ("sampler", "Run")):
        assert (job, method, "OK") in seen, f"{job} {method}: {sorted(seen)}"
    assert any(j == "learner" and m == "PredictStream" for j, m, _ in seen)
    codes = {c for _, _, c in seen}
    assert codes <= {"OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                     "RESOURCE_EXHAUSTED", "ABORTED", "FAILED_PRECONDITION", "INTERNAL", "UNKNOWN",
                     "UNIMPLEMENTED"}, codes  # status code names: bounded


def test_oracle_calls_agree_between_coordinator_and_oracle(live: LiveRun) -> None:
    coordinator = live.number("sum(epicycle_coordinator_oracle_calls_total)")
    oracle = live.number('sum(epicycle_oracle_calls_total{outcome=~"computed|cached|coalesced"})')
    # scraped a second apart at most: allow the calls of that second
    assert coordinator > 0 and abs(coordinator - oracle) <= 3, (coordinator, oracle)
    assert live.number("sum(epicycle_oracle_compute_seconds_sum)") > 0
    assert live.number("max(epicycle_coordinator_oracle_calls_per_simulated_picosecond)") > 0


def test_recording_rules_produce_series(live: LiveRun) -> None:
    records = [r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r]
    assert len(records) >= 9
    errors_exist = bool(live.vector('epicycle_grpc_server_handled_total{grpc_code!="OK"} > 0'))
    empty = []
    for name in records:
        if name in RULES_EMPTY_WHEN_HEALTHY and not errors_exist:
            assert not live.vector(name), f"{name} has series although no RPC failed"
            continue
        if not live.vector(name):
            empty.append(name)
    assert not empty, f"recording rules without series: {empty}"
    assert live.number("sum(epicycle:sampler_steps:rate5m)") > 0
    assert live.number('sum(epicycle:oracle_calls:rate5m{outcome="computed"})') > 0
    assert live.number("max(epicycle:oracle_failure_ratio:rate5m)") == 0  # EMT never fails
    assert live.number('sum(epicycle:grpc_requests:rate5m{job="learner"})') > 0


def test_rules_evaluate_cleanly_and_no_alert_fires_in_a_healthy_run(live: LiveRun) -> None:
    groups = live.prometheus.api("rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    shipped = [r.get("record") or r.get("alert") for g in yaml.safe_load(RULES.read_text())["groups"]
               for r in g["rules"]]
    assert set(shipped) <= set(loaded)
    bad = {name: r.get("lastError") for name, r in loaded.items() if r.get("health") != "ok"}
    assert not bad, f"rules with evaluation errors: {bad}"
    active = [(a["labels"]["alertname"], a["state"]) for a in live.prometheus.api("alerts")["data"]["alerts"]]
    assert not active, f"alerts pending/firing in a healthy run: {active}"


def test_every_dashboard_panel_returns_data(live: LiveRun) -> None:
    """Each panel query of the Grafana dashboard parses and returns a non-empty result with a finite value
    against the live run.  No exemptions: the gRPC error panel returns 0 through ``or on() vector(0)``."""
    queries = panel_queries(DASHBOARD)
    assert len(queries) >= 30
    failures = []
    for title, expr in queries:
        reply = live.prometheus.query(expr)
        if reply.get("status") != "success":
            failures.append(f"{title}: {reply.get('errorType')}: {reply.get('error')}\n    {expr}")
            continue
        data = reply["data"]
        result = data["result"] if data["resultType"] != "scalar" else [{"value": data["result"]}]
        if not result:
            failures.append(f"{title}: no data\n    {expr}")
            continue
        values = [float(r["value"][1]) for r in result]
        # a quantile over a window without observations is NaN (0/0): the fixture queries right after the
        # run moved every histogram, so each panel must show at least one real number
        if not any(math.isfinite(v) for v in values):
            failures.append(f"{title}: only NaN/Inf {values}\n    {expr}")
    assert not failures, "panels without data in a live run:\n" + "\n".join(failures)


def test_error_panel_shows_zero_rather_than_nothing(live: LiveRun) -> None:
    """The gRPC error panel falls back to 0 (``or on() vector(0)``) only when no RPC failed."""
    (expr,) = [e for t, e in panel_queries(DASHBOARD) if t.startswith("gRPC errors")]
    assert expr.endswith("or on() vector(0)")
    result = live.vector(expr)
    errors = live.vector('sum by (job, grpc_method, grpc_code) (rate(epicycle_grpc_server_handled_total'
                         '{grpc_code!="OK"}[1m]))')
    if errors:
        assert all(r["metric"] for r in result), "the 0 fallback must not be added next to real errors"
    else:
        assert [float(r["value"][1]) for r in result] == [0.0]
