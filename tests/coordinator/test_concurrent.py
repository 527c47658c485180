"""Concurrent learning: several walkers on one learner, several labels in flight, stop rules, outages,
and kill -9 with labels in flight — all through real gRPC services and real oracle processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator.config import parse_config
from coordinator.cycle import OnTheFlyRun, Progress, RunStopped, run_species
from coordinator.rundir import RunDirectory
from coordinator.services import start_services

ROOT = Path(__file__).resolve().parents[2]
HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}

#: 32-atom aluminium, a temperature ladder of walkers
LADDER = {
    "name": "ladder", "seed": 2,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt", "settings": {"latency_s": 0.4}, "workers": 2},
    "learner": {"cutoffs": [5.0, 3.5], "hyperparameters": HYPS,
                "optimize": {"every": 2, "until_calls": 10, "max_iterations": 10}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "steps": 60, "frame_interval": 5, "checkpoint_interval": 20},
    "walkers": {"temperatures": [300, 700, 1100, 1500]},
    "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "atoms_per_call": 1},
}


def events(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def check_training_set_follows_arrival_order(run_dir: Path) -> dict:
    """The learner was given every label, in label-index (= arrival) order, with the atoms recorded per label."""
    rd = RunDirectory.open(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    n = state["oracle_calls"]
    assert state["labels_applied"] == n == rd.label_count()
    assert [i for batch in state["apply_batches"] for i in batch] == list(range(n))
    selections = [rd.read_label(i).selection for i in range(n)]
    assert state["training_atoms"] == selections
    from learner_service.gp import GaussianProcess

    gp = GaussianProcess.load(run_dir / "learner")
    assert gp.n_environments == sum(len(s) for s in selections)
    return state


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ladder")
    (tmp / "run.yaml").write_text(yaml.safe_dump(LADDER))
    proc = cli("run", str(tmp / "run.yaml"), "--run-dir", str(tmp / "run"), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run"


def test_every_walker_runs_its_steps_on_one_learner(ladder_run: Path) -> None:
    summary = json.loads((ladder_run / "summary.json").read_text())
    assert summary["finished"] and summary["stop_reason"] == "every walker has done its steps"
    assert set(summary["walkers"]) == {"T300", "T700", "T1100", "T1500"}
    assert all(w["steps"] == 60 for w in summary["walkers"].values())
    ev = events(ladder_run)
    for name in summary["walkers"]:
        frames = [e for e in ev if e["event"] == "frame" and e["walker"] == name]
        assert frames and frames[-1]["step"] > 40
        assert (ladder_run / "walkers" / name / "trajectory.xyz").is_file()
    # hotter walkers leave the training data sooner: labels come from several walkers
    assert len({e["walker"] for e in ev if e["event"] == "oracle_call" and e["label"] > 0}) >= 2
    report = (ladder_run / "report.md").read_text()
    assert "| walker | MD steps |" in report and "| T1500 | 60 |" in report


def test_two_labels_are_computed_at_once(ladder_run: Path) -> None:
    ev = events(ladder_run)
    requested = [e for e in ev if e["event"] == "label_requested"]
    assert max(e["in_flight"] for e in requested) == 2  # oracle.workers = 2 = max_in_flight by default
    # a walker is parked while its frame is labelled, and the others go on meanwhile (checked over every
    # label: when all walkers stop in the same instant, the first labels may find the others parked too)
    calls = [e for e in ev if e["event"] == "oracle_call" and e["label"] > 0]
    assert len(calls) >= 3
    sent = {e["seq"]: e["wall_time"] for e in requested}
    others = [e for c in calls for e in ev if e["event"] in ("frame", "frame_queued", "md_checkpoint")
              and e["walker"] != c["walker"] and sent[c["seq"]] < e["wall_time"] < c["wall_time"]]
    assert others, "no other walker moved while a label was computed"


def test_training_set_is_the_labels_in_arrival_order(ladder_run: Path) -> None:
    state = check_training_set_follows_arrival_order(ladder_run)
    ev = events(ladder_run)
    # labels that arrived together were applied together: fewer AddData batches than labels, once busy
    assert len(state["apply_batches"]) <= state["oracle_calls"]
    assert all(e.get("learner_checkpoint") for e in ev if e["event"] == "update_decision")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def oracle_processes(tmp_path: Path):
    """Two real oracle processes (EMT with 2 s of latency each, as a stand-in for DFT)."""
    procs, addresses = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "oracle", "--backend", "emt", "--port", str(port),
             "--set", "latency_s=2.0"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.mark.slow
def test_kill_with_labels_in_flight_loses_no_written_label(tmp_path: Path, oracle_processes) -> None:
    """kill -9 while labels are being computed by two oracle processes: every written label survives byte for
    byte, the in-flight ones are recomputed (and counted), and the resumed run applies every label in its
    recorded arrival order."""
    # the 4-walker ladder in remote mode: two oracle processes, two labels in flight
    data = dict(LADDER, oracle={"addresses": oracle_processes, "timeout_s": 60, "max_in_flight": 2},
                sampler=dict(LADDER["sampler"], steps=80))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-report"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    killed_in_flight = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "events.jsonl").exists():
            ev = events(run_dir)
            answered = {e.get("seq") for e in ev if e["event"] == "oracle_call"}
            # requests sent less than 1 s ago: well inside the 2 s latency, so still being computed when the
            # kill lands (an older unanswered request may already be written as a label: under load this poll
            # can lag the run by more than a second)
            fresh = {e["seq"] for e in ev if e["event"] == "label_requested" and e["seq"] not in answered
                     and time.time() - e["wall_time"] < 1.0}
            labels = len(list((run_dir / "labels").glob("label_*.npz")))
            if labels >= 3 and fresh:
                killed_in_flight = len(fresh)
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a label was in flight: " + proc.stderr.read().decode()[-2000:]
    # at once, well inside the 2 s oracle latency: the request is still being computed (a sleep here, or a
    # snapshot of the labels taken before the kill, raced with labels arriving under load)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in (run_dir / "labels").glob("label_*.npz")}
    assert killed_in_flight >= 1 and len(before) >= 3

    final = cli("run", "--resume", str(run_dir), "--no-report", cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    for name, data_bytes in before.items():
        assert (run_dir / "labels" / name).read_bytes() == data_bytes, name
    ev = events(run_dir)
    resumed = [e for e in ev if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["recomputed_in_flight"] >= 1
    state = check_training_set_follows_arrival_order(run_dir)
    assert state["finished"] and state["counters"].get("recomputed", 0) >= 1
    assert all(w["step"] == 80 for w in state["walkers"].values())
    assert RunDirectory.open(run_dir).queued_seqs() == []  # nothing waiting; labelled entries archived
    labelled = [e["label"] for e in ev if e["event"] == "oracle_call"]
    assert len(labelled) == len(set(labelled))  # no label index used twice


def run_in_process(tmp_path: Path, data: dict, name: str = "run"):
    config = parse_config(data)
    rd = RunDirectory.create(tmp_path / name, yaml.safe_dump(config.to_dict()))
    services = start_services(config, run_species(config), learner_dir=rd.path / "learner")
    try:
        state = OnTheFlyRun(config, rd, services, Progress(config.sampler.steps, 5.0, quiet=True)).run()
    finally:
        services.close()
        rd.close()
    return state, rd


def test_label_budget_stops_the_run(tmp_path: Path) -> None:
    data = dict(LADDER, oracle={"backend": "emt", "workers": 2}, stop={"max_labels": 3},
                sampler=dict(LADDER["sampler"], steps=400))
    state, rd = run_in_process(tmp_path, data)
    assert state.finished and state.stop_reason == "label budget of 3 spent"
    assert state.oracle_calls == 3 == rd.label_count() == state.labels_applied


def test_convergence_window_stops_the_run_early(tmp_path: Path) -> None:
    # a threshold no force σ reaches: after the first label the model is never uncertain
    data = dict(LADDER, oracle={"backend": "emt"}, walkers={"temperatures": [300, 500]},
                policy=dict(LADDER["policy"], sigma_factor=None, absolute_threshold=50.0),  # absolute only
                stop={"window_steps": 40, "accurate_ratio": 0.99},
                sampler=dict(LADDER["sampler"], steps=2000))
    state, rd = run_in_process(tmp_path, data)
    assert state.finished and state.stop_reason.startswith("converged: no oracle call in the last 40 steps")
    assert state.oracle_calls == 1
    assert all(40 <= w["step"] < 2000 for w in state.walkers.values())
    assert any(e["event"] == "stopping" for e in rd.events())


def test_an_oracle_outage_stops_the_run_resumably(tmp_path: Path) -> None:
    """Every oracle worker gone: retried for oracle.outage_timeout_s, then the run stops with an error naming
    the way out — it never continues MD on an unlabelled model."""
    from oracle_service.server import OracleServiceConfig, start_oracle_server

    oracle = start_oracle_server(OracleServiceConfig(settings={"latency_s": 0.2}))
    data = dict(LADDER, walkers={"temperatures": [900, 1500]},
                oracle={"addresses": [oracle.address], "timeout_s": 5, "attempts": 1, "outage_timeout_s": 2.0},
                sampler=dict(LADDER["sampler"], steps=400))
    stopper = threading.Thread(target=lambda: (time.sleep(4.0), oracle.stop(grace=0)), daemon=True)
    stopper.start()
    with pytest.raises(RunStopped, match=r"unreachable .*outage_timeout_s.*epicycle run --resume"):
        run_in_process(tmp_path, data)
    rd = RunDirectory.open(tmp_path / "run")
    state = rd.load_state()
    assert not state.finished and state.oracle_calls == rd.label_count() >= 1
    assert any(e["event"] == "oracle_failed" and e["outage"] for e in rd.events())
    # nothing was integrated on the model where a label was missing: every walker stopped at a durable point
    assert not any(e["event"] == "frame_skipped" for e in rd.events())


def test_damaged_run_directory_is_refused_by_name_and_repaired(tmp_path: Path) -> None:
    """A missing, truncated or altered label stops --resume with a message naming the file; check-run says the
    same; --repair labels the same structure again under the same index (nothing renumbered)."""
    data = dict(LADDER, oracle={"backend": "emt"}, walkers={"temperatures": [900]}, stop={"max_labels": 5},
                sampler=dict(LADDER["sampler"], steps=400))
    state, rd = run_in_process(tmp_path, data)
    assert state.oracle_calls == 5
    forces = {i: rd.read_label(i).forces for i in range(5)}

    def unfinish() -> None:  # resume needs an unfinished run: the budget is spent, so it ends at once
        raw = json.loads((rd.path / "state.json").read_text())
        raw["finished"] = False
        (rd.path / "state.json").write_text(json.dumps(raw))

    unfinish()
    assert cli("check-run", str(rd.path), cwd=tmp_path).returncode == 0
    rd.label_path(2).unlink()
    rd.label_path(3).write_bytes(rd.label_path(3).read_bytes()[:200])
    (rd.labels_dir / ".label_000005.npz.tmp4242").write_bytes(b"cut by a kill")
    check = cli("check-run", str(rd.path), cwd=tmp_path)
    assert check.returncode == 1
    assert "label_000002.npz is missing" in check.stdout and "label_000003.npz is damaged" in check.stdout
    refused = cli("run", "--resume", str(rd.path), "--no-report", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "label_000002.npz is missing" in refused.stderr and "--repair" in refused.stderr
    assert cli("run", "--resume", str(rd.path), "--no-report", "--repair", cwd=tmp_path).returncode == 0
    for i in range(5):  # the oracle is deterministic: the repaired labels are the lost ones
        np.testing.assert_array_equal(rd.read_label(i).forces, forces[i])
    assert sorted(e["label"] for e in rd.events() if e["event"] == "label_repaired") == [2, 3]
    assert not list(rd.labels_dir.glob(".*tmp*"))
    assert len(list(rd.labels_dir.glob("label_*.npz"))) == 5

    # a label replaced by another valid file is caught by its SHA-256
    unfinish()
    altered = rd.read_label(1)
    altered.forces = altered.forces + 1e-3
    rd.write_label(altered)  # readable, right index, other numbers
    check = cli("check-run", str(rd.path), cwd=tmp_path)
    assert check.returncode == 1 and "label_000001.npz is not the file the run wrote" in check.stdout
    # a truncated state.json names itself
    (rd.path / "state.json").write_text('{"version": 2, "oracle_calls": 5, "labe')
    broken = cli("run", "--resume", str(rd.path), cwd=tmp_path)
    assert broken.returncode == 2 and "state.json is unreadable" in broken.stderr and "Traceback" not in broken.stderr


def test_a_whole_cycle_over_mutual_tls(tmp_path: Path, pki) -> None:
    """Every connection of the run — coordinator → oracle, learner, sampler and sampler → learner — over mutual
    TLS; the services refuse a plaintext client and a TLS client without a certificate."""
    from learner_service.client import LearnerClient
    from protos.client import ClientTLS
    from protos.errors import EpicycleError

    data = dict(LADDER, oracle={"backend": "emt", "workers": 2}, walkers={"temperatures": [600, 1200]},
                sampler=dict(LADDER["sampler"], steps=40),
                tls={"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key),
                     "server_cert_file": str(pki.server_cert), "server_key_file": str(pki.server_key)})
    config = parse_config(data)
    rd = RunDirectory.create(tmp_path / "run", yaml.safe_dump(config.to_dict()))
    services = start_services(config, run_species(config), learner_dir=rd.path / "learner")
    try:
        for tls in (None, ClientTLS(pki.ca)):  # plaintext; TLS without a client certificate
            with LearnerClient(services.learner_address, tls=tls, timeout=5) as intruder:
                with pytest.raises(EpicycleError):
                    intruder.info()
        state = OnTheFlyRun(config, rd, services, Progress(40, 5.0, quiet=True)).run()
    finally:
        services.close()
        rd.close()
    assert state.finished and state.oracle_calls >= 2
    assert all(w["step"] == 40 for w in state.walkers.values())


def test_tls_config_is_checked_up_front(tmp_path: Path, pki) -> None:
    from coordinator.config import ConfigError

    with pytest.raises(ConfigError, match="tls: give both tls.cert_file and tls.key_file"):
        parse_config({"tls": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                              "server_cert_file": str(pki.server_cert), "server_key_file": str(pki.server_key)}})
    with pytest.raises(ConfigError, match="tls.server_cert_file: the embedded oracle, learner, sampler service"):
        parse_config({"tls": {"ca_file": str(pki.ca)}})
    with pytest.raises(ConfigError, match="tls.ca_file: file not found"):
        parse_config({"tls": {"ca_file": str(tmp_path / "nope.pem"), "server_cert_file": str(pki.server_cert),
                              "server_key_file": str(pki.server_key)}})
