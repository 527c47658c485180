"""policy.update: trial through real services (embedded learner, sampler, EMT oracle on 127.0.0.1).

The case is built honestly: 32-atom Al in NVE at Δt = 20 fs, four times the usual 5 fs.  Velocity
Verlet's energy error grows as Δt², so on the updated models the conserved energy moves by
2–10 meV/atom within 20 steps at 20 fs, and by 1–2 meV/atom at 10 fs.  With a tolerance of
2.5 meV/atom per 20-step window the `accept` policy drifts past it after updates, and `trial`
rolls back and halves Δt (then recovers it); with no retries allowed the update is rejected and
the walker goes on pinned to its previous model version — visible in the version the learner
reports for every frame.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from coordinator.report import energy_changes_after_updates

ROOT = Path(__file__).resolve().parents[2]

TOLERANCE = 0.0025  # eV/atom over a 20-step window

BIG_STEP = {
    "name": "rollback",
    "seed": 3,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [6.0, 4.0],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 1, "until_calls": 1000, "max_iterations": 10}},
    "sampler": {"ensemble": "nve", "timestep_fs": 20.0, "temperature_K": 1500.0, "steps": 160,
                "frame_interval": 1, "checkpoint_interval": 100},
    "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "update": "trial",
               "trial": {"window_steps": 20, "max_energy_change_eV_per_atom": TOLERANCE, "recover_steps": 40}},
}


def run(tmp_path: Path, name: str, data: dict, *extra: str, timeout: float = 900) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir",
                           str(tmp_path / name), *extra], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / name


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def with_policy(**policy) -> dict:
    trial = dict(BIG_STEP["policy"]["trial"], **policy.pop("trial", {}))
    return dict(BIG_STEP, policy=dict(BIG_STEP["policy"], trial=trial, **policy))


def test_accept_drifts_past_the_tolerance_and_trial_rolls_back_halves_and_recovers_the_timestep(tmp_path) -> None:
    accepted = events(run(tmp_path, "accept", with_policy(update="accept"), "--no-report"))
    drift = energy_changes_after_updates(accepted, 32)
    assert drift and max(drift) > TOLERANCE, drift  # what the trial policy is there to catch

    run_dir = run(tmp_path, "trial", BIG_STEP)
    evs = events(run_dir)
    rollbacks = [e for e in evs if e["event"] == "rollback"]
    assert rollbacks, "no trial failed: the case no longer needs a rollback"
    for r in rollbacks:
        assert r["max_energy_change_eV_per_atom"] > TOLERANCE
        assert r["new_timestep_fs"] == r["timestep_fs"] / 2
        # the same version is tried again from the same step with the smaller Δt, and passes
        retry = next(e for e in evs if e["event"] in ("trial_passed", "rollback", "update_rejected")
                     and e.get("wall_time", 0) > r["wall_time"] and e["model_version"] == r["model_version"])
        assert retry["event"] == "trial_passed" and retry["step"] == r["step"]
        assert retry["timestep_fs"] == r["new_timestep_fs"]
        assert retry["max_energy_change_eV_per_atom"] <= TOLERANCE
    assert any(e["event"] == "timestep_recovered" and e["timestep_fs"] == 20.0 for e in evs)
    # the trajectory on disk is the accepted history: steps strictly increase, frames of failed trials are gone,
    # and the time between consecutive steps is the Δt in force (10 fs after a rollback, 20 fs otherwise)
    from coordinator.rundir import RunDirectory

    traj = RunDirectory.open(run_dir).read_trajectory("w0")
    steps = [a.info["step"] for a in traj]
    assert steps == sorted(set(steps))
    gaps = {round(b.info["time_fs"] - a.info["time_fs"], 6) for a, b in zip(traj, traj[1:])
            if b.info["step"] == a.info["step"] + 1}
    assert gaps == {10.0, 20.0}
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["walkers"]["w0"]["trial"] is None
    report = (run_dir / "report.md").read_text()
    assert f"{len(rollbacks)} rollbacks" in report


def test_without_retries_the_update_is_rejected_and_the_walker_stays_on_its_previous_model(tmp_path) -> None:
    evs = events(run(tmp_path, "reject", with_policy(trial={"max_retries": 0}), "--no-report"))
    rejected = [e for e in evs if e["event"] == "update_rejected"]
    assert rejected and not any(e["event"] == "rollback" for e in evs)
    pinned_frames = 0
    for r in rejected:
        assert r["continue_on_version"] < r["model_version"]
        # until the walker's next trial (or the end), every frame it integrates on the model comes from the
        # version it went back to, although the learner's newest is the rejected one or later
        i = evs.index(r)
        after = []
        for e in evs[i + 1:]:
            if e["event"] == "walker_halted" or (e["event"] == "trial_started" and not e.get("probation")):
                break
            if e["event"] == "frame" and e["model_version"] > 0:
                after.append(e["model_version"])
        # (none when the walker stopped on uncertainty again at its first step on the old model)
        assert set(after) <= {r["continue_on_version"]}, (r, after)
        pinned_frames += len(after)
    assert pinned_frames > 0
    # the version a walker falls back on is judged again from the rollback point: the next chunk is a
    # probation trial of that version; a version that fails its probation with nothing newer halts the walker
    for r in rejected:
        i = evs.index(r)
        nxt = next((e for e in evs[i + 1:] if e["event"] in ("trial_started", "walker_halted")), None)
        if nxt is None or r["previous_version"] == r["model_version"]:
            continue  # the run ended, or this was itself a failed probation
        assert nxt["event"] == "trial_started" and nxt["probation"], nxt
        assert nxt["model_version"] == r["continue_on_version"] and nxt["step"] == r["step"]
    for h in (e for e in evs if e["event"] == "walker_halted"):
        assert h["model_version"] == h["previous_version"], h  # only a failed probation halts with a model held
        assert "no other model version" in h["message"]


def test_a_run_killed_during_trials_resumes_and_trials_the_newest_model(tmp_path) -> None:
    # σn is kept ≥ 5 meV/Å: where the kill lands changes the data, and on some histories ML-II drives σn to
    # its 1 meV/Å floor, after which every step calls the oracle (a 120-call run, minutes under load)
    learner = dict(BIG_STEP["learner"], optimize=dict(BIG_STEP["learner"]["optimize"], bounds={"noise": [0.005, 0.5]}))
    data = dict(with_policy(), learner=learner, sampler=dict(BIG_STEP["sampler"], steps=120, frame_interval=5))
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "kill"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-report"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "events.jsonl").exists() and (run_dir / "events.jsonl").read_text().count("trial_passed") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", "--resume", str(run_dir), "--no-report"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    evs = events(run_dir)
    unpinned = next(i for i, e in enumerate(evs) if e["event"] == "trial_after_resume")
    assert evs[unpinned + 1]["event"] == "resumed"
    first_trial = next(e for e in evs[unpinned:] if e["event"] == "trial_started")
    assert first_trial["walker"] == "w0"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["walkers"]["w0"]["step"] == 120
    check = subprocess.run([sys.executable, "-m", "coordinator.cli", "check-run", str(run_dir)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    np.testing.assert_equal(state["walkers"]["w0"]["model_version"] > 0, True)
