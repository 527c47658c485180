"""``epicycle run --resume DIR --set KEY=VALUE``: continue a run with changed settings (real services)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator.settings_change import MUTABLE, apply_assignments, parse_assignments
from protos.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]

SHORT = {
    "name": "reset", "seed": 4,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [5.0, 3.5],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 1, "until_calls": 5, "max_iterations": 10}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0, "steps": 60, "frame_interval": 5,
                "checkpoint_interval": 30},
    "policy": {"sigma_factor": 2.0, "initial_atoms": 4},
}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_assignments_are_parsed_as_yaml_and_only_mutable_keys_pass() -> None:
    assert parse_assignments(["sampler.steps=200", "sampler.schedule=[[100, 900]]", "stop.max_labels=5"]) == [
        ("sampler.steps", 200), ("sampler.schedule", [[100, 900]]), ("stop.max_labels", 5)]
    assert ("policy.trial.max_retries", 1) in parse_assignments(["policy.trial.max_retries=1"])  # a .* section
    assert parse_assignments(["learner.optimize.method=map", "learner.optimize.restarts=2"]) == [
        ("learner.optimize.method", "map"), ("learner.optimize.restarts", 2)]  # the method steers what comes next
    for bad, message in (("learner.cutoffs=[4, 3]", "cannot change in the middle of a run"),
                         ("sampler.timestep_fs=2", "cannot change"), ("structure.a=4.1", "cannot change"),
                         ("sampler.steps", "KEY=VALUE"), ("sampler.steps=[1,", "not valid YAML")):
        with pytest.raises(InvalidInput, match=message):
            parse_assignments([bad])
    new, changes = apply_assignments({"sampler": {"steps": 10}}, [("sampler.steps", 20), ("stop.max_labels", 3)])
    assert new == {"sampler": {"steps": 20}, "stop": {"max_labels": 3}}
    assert changes == {"sampler.steps": [10, 20], "stop.max_labels": [None, 3]}
    assert "sampler.steps" in MUTABLE


def test_a_finished_run_continues_with_more_steps_and_a_new_schedule(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(SHORT))
    run_dir = tmp_path / "run"
    first = cli("run", str(cfg), "--run-dir", str(run_dir), "--no-report", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("run", "--resume", str(run_dir), "--no-report", cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
    refused = cli("run", "--resume", str(run_dir), "--set", "learner.cutoffs=[4.0, 3.0]", cwd=tmp_path)
    assert refused.returncode == 2 and "cannot change in the middle of a run" in refused.stderr
    invalid = cli("run", "--resume", str(run_dir), "--set", "sampler.steps=-3", cwd=tmp_path)
    assert invalid.returncode == 2 and "sampler.steps: must be >= 1" in invalid.stderr
    # nothing was written by the refused changes
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["sampler"]["steps"] == 60

    # 60 steps of 5 fs = 300 fs done; heat to 1500 K at 400 fs (ahead), run to 120 steps
    cont = cli("run", "--resume", str(run_dir), "--set", "sampler.steps=120", "--set",
               "sampler.schedule=[[400.0, 1500.0]]", "--no-report", cwd=tmp_path)
    assert cont.returncode == 0, cont.stdout[-2000:] + cont.stderr[-3000:]
    assert "setting sampler.steps: 60 -> 120" in cont.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["sampler"]["steps"] == 120 and config["sampler"]["schedule"] == [[400.0, 1500.0]]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    changed = [e for e in events if e["event"] == "settings_changed"]
    assert len(changed) == 1 and changed[0]["changes"]["sampler.steps"] == [60, 120]
    assert changed[0]["reopened_walkers"] == ["w0"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["walkers"]["w0"]["step"] == 120
    frames = [e for e in events if e["event"] == "frame"]
    before = [f["temperature_K"] for f in frames if 300 < f["time_fs"] < 400]
    after = [f["temperature_K"] for f in frames if f["time_fs"] >= 400]
    # the new event was applied once, at 400 fs: the rescale to 1500 K (equipartition then halves it)
    assert before and after and max(before) < 400 and after[0] > 1000
    assert sum(1 for e in events if e["event"] == "resumed") >= 1


def test_export_writes_every_label_with_its_training_atoms_and_the_old_models_prediction(tmp_path) -> None:
    """epicycle export: the labels read back equal the stored ones; `fit` and `evaluate` read a run directory."""
    from ase.io import read

    from coordinator.rundir import RunDirectory
    from learner_service.offline import read_frames

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(dict(SHORT, sampler=dict(SHORT["sampler"], steps=30))))
    run_dir = tmp_path / "run"
    assert cli("run", str(cfg), "--run-dir", str(run_dir), "--no-report", cwd=tmp_path).returncode == 0
    out = tmp_path / "labels.xyz"
    proc = cli("export", str(run_dir), "--xyz", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frames = read(str(out), index=":")
    rd = RunDirectory.open(run_dir)
    st = rd.load_state()
    assert len(frames) == st.oracle_calls >= 2 and f"{st.oracle_calls} labelled frame(s)" in proc.stdout
    for i, atoms in enumerate(frames):
        lab = rd.read_label(i)
        assert atoms.info["label"] == i and atoms.info["walker"] == "w0" and atoms.info["step"] == lab.step
        assert np.allclose(atoms.get_forces(), lab.forces, atol=1e-8)
        assert atoms.get_potential_energy() == pytest.approx(lab.energy, abs=1e-8)
        assert sorted(np.flatnonzero(atoms.arrays["training"])) == sorted(st.training_atoms[i])
        if i > 0:  # labelled because the model was uncertain: its prediction is kept
            assert np.allclose(atoms.arrays["model_forces"], lab.predicted_forces, atol=1e-8)
            assert np.allclose(atoms.arrays["model_force_std"], lab.force_std, atol=1e-8)
    assert len(read_frames(run_dir)) == len(frames)
    bad = cli("export", str(tmp_path), "--xyz", str(out), cwd=tmp_path)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
