"""End-to-end on-the-fly training through real gRPC services, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

#: a short aluminium run: heated past melting by velocity rescaling halfway through
SHORT_MELT = {
    "name": "e2e",
    "seed": 3,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [5.0, 3.5],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 1, "until_calls": 20, "max_iterations": 30}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0,
                "schedule": [[1000.0, 2000.0]], "steps": 400, "frame_interval": 5, "checkpoint_interval": 50},
    "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "atoms_per_call": 1},
}


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_cli("run", str(write_config(tmp, SHORT_MELT)), "--run-dir", str(tmp / "run"), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run"


def test_run_produces_a_complete_run_directory(finished_run: Path) -> None:
    for name in ("config.yaml", "state.json", "events.jsonl", "walkers/w0/trajectory.xyz", "summary.json",
                 "report.md", "temperature.png", "oracle_calls.png", "rdf.png"):
        assert (finished_run / name).is_file(), name
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 400
    assert summary["stop_reason"] == "every walker has done its steps"
    assert not list((finished_run / "queue").glob("frame_*.npz"))  # nothing left waiting for the oracle
    # the model lives in the learner's own directory (no O(N²) export crossed the wire)
    assert (finished_run / "learner").is_dir() and summary["learner_checkpoint"]
    assert summary["oracle_calls"] == len(list((finished_run / "labels").glob("label_*.npz")))
    # trained on forces only: the learner's energy warning reaches the event log and the report
    assert summary["labels_used"] == ["forces"]
    assert any("up to a constant" in w for w in summary["model_warnings"])
    assert "WARNING: energies are defined only up to a constant" in (finished_run / "report.md").read_text()


def test_training_set_grows_and_calls_cluster_at_start_and_after_the_melt(finished_run: Path) -> None:
    ev = events(finished_run)
    updates = [e for e in ev if e["event"] == "training_update"]
    sizes = [e["n_environments"] for e in updates]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0] >= 4
    steps = [e["step"] for e in ev if e["event"] == "oracle_call"]
    assert steps[0] == 0 and len(steps) >= 3
    melt_step = 1000.0 / 5.0
    early = [s for s in steps if 0 < s < 60]
    quiet = [s for s in steps if 120 <= s < melt_step]
    after = [s for s in steps if melt_step <= s < melt_step + 100]
    # learning happens where the model has not seen the configurations: first steps and right after heating
    assert len(early) >= 1 and len(after) >= 1, steps
    assert len(quiet) <= len(early) + len(after), steps


def test_every_accepted_step_is_under_the_threshold_in_force(finished_run: Path) -> None:
    import ase.io

    frames = ase.io.read(finished_run / "walkers" / "w0" / "trajectory.xyz", index=":")
    assert len(frames) > 20
    for atoms in frames:
        if atoms.info.get("forces_from_oracle"):
            continue  # this step was integrated with the oracle's forces
        # the threshold applies to the rotation-invariant per-atom σ, which bounds every component σ
        # (per-atom arrays are written to extended XYZ with 8 decimals: ±5e-9 eV/Å)
        assert atoms.info["max_atom_std"] <= atoms.info["threshold"] + 1e-12, atoms.info["step"]
        assert atoms.info["max_atom_std"] == pytest.approx(atoms.arrays["atom_std"].max(), rel=0, abs=1e-8)
        assert np.all(atoms.arrays["atom_std"] >= atoms.arrays["force_std"].max(axis=1) - 1e-8)


def test_final_model_is_accurate_on_fresh_oracle_frames(finished_run: Path) -> None:
    import ase.io
    from ase.calculators.emt import EMT

    from learner_service.gp import GaussianProcess

    gp = GaussianProcess.load(finished_run / "learner")  # the learner's latest checkpoint, rebuilt from its data
    frames = ase.io.read(finished_run / "walkers" / "w0" / "trajectory.xyz", index=":")
    fresh = frames[len(frames) // 2::max(1, len(frames) // 12)]
    errors, scale = [], []
    for atoms in fresh:
        ref = atoms.copy()
        ref.calc = EMT()
        f_ref = ref.get_forces()
        f_gp = gp.predict(ref).forces
        errors.append(f_gp - f_ref)
        scale.append(f_ref)
    rmse = float(np.sqrt(np.mean(np.square(errors))))
    typical = float(np.sqrt(np.mean(np.square(scale))))
    assert rmse < 0.35 * typical, (rmse, typical)


def test_report_command_rewrites_the_report(finished_run: Path) -> None:
    (finished_run / "report.md").unlink()
    proc = run_cli("report", str(finished_run), cwd=finished_run)
    assert proc.returncode == 0, proc.stderr
    text = (finished_run / "report.md").read_text()
    assert "oracle calls" in text and "temperature.png" in text
    row = next(line for line in text.splitlines() if line.startswith("| hyperparameters |"))
    assert " eV/Å" in row and "ls2 " in row and " Å" in row
    assert "energy_noise" not in row and "stress_noise" not in row  # a forces-only run


def _labels(run_dir: Path) -> dict[int, bytes]:
    return {int(p.stem.split("_")[1]): p.read_bytes() for p in sorted((run_dir / "labels").glob("label_*.npz"))}


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_recomputes_no_label(tmp_path: Path) -> None:
    """Kill -9 the run at several points; every resume keeps every label file byte for byte, and the
    finished run has the same labels and training set as an uninterrupted run with the same seed."""
    data = dict(SHORT_MELT, sampler=dict(SHORT_MELT["sampler"], steps=240))
    cfg = write_config(tmp_path, data)
    ref_proc = run_cli("run", str(cfg), "--run-dir", str(tmp_path / "ref"), "--no-report", cwd=tmp_path)
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    ref_labels = _labels(tmp_path / "ref")

    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir), "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for wait_for_labels in (1, 3, 5):  # kill after the n-th label appears (and at a random moment after it)
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            # a resumed run is killed only once it has really resumed (its "resumed" event is on
            # disk), so every kill interrupts a running cycle and is counted against the events
            # (counted on the raw text: the writer may be half-way through the next line)
            started = kills == 0 or (run_dir / "events.jsonl").read_text().count('"event": "resumed"') == kills
            if started and len(list((run_dir / "labels").glob("label_*.npz"))) >= wait_for_labels:
                time.sleep(0.05 * wait_for_labels)
                break
            time.sleep(0.02)
        if proc.poll() is None:
            before = _labels(run_dir)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            after = _labels(run_dir)
            assert after == before
        else:
            proc.communicate()
        args = [sys.executable, "-m", "coordinator.cli", "run", "--resume", str(run_dir), "--no-report"]
    final = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 2
    labels = _labels(run_dir)
    # no label lost or recomputed: the same labels, bit for bit, as the uninterrupted run
    assert labels.keys() == ref_labels.keys()
    for i in labels:
        a = np.load(run_dir / "labels" / f"label_{i:06d}.npz")
        b = np.load(tmp_path / "ref" / "labels" / f"label_{i:06d}.npz")
        np.testing.assert_array_equal(a["forces"], b["forces"])
        np.testing.assert_array_equal(a["positions"], b["positions"])
    state = json.loads((run_dir / "state.json").read_text())
    ref_state = json.loads((tmp_path / "ref" / "state.json").read_text())
    assert state["finished"] and state["training_atoms"] == ref_state["training_atoms"]
    assert sum(1 for e in events(run_dir) if e["event"] == "resumed") == kills
