"""On-the-fly runs with ``learner.model: sparse`` (issue 16): every label of every oracle call enters
the model, the atoms the acquisition selects become inducing environments; in-process (replay),
embedded over gRPC on loopback, killed and resumed; and a run that starts from a saved model
(``learner.model: FILE``, issue 17)."""

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

from coordinator.config import ConfigError, parse_config
from learner_service.model import load_model, model_file_kind
from learner_service.sparse_gp import SparseGaussianProcess

from tests.coordinator.test_replay import BrokenOracle, config_for, events, replay, trajectory

_FIXTURES = (trajectory,)  # pytest fixture used by name below

ROOT = Path(__file__).resolve().parents[2]


def sparse_config(trajectory: Path, **kw) -> dict:
    data = config_for(trajectory, **kw)
    data["learner"]["model"] = "sparse"
    return data


def test_sparse_replay_trains_on_every_label_and_calls_where_the_model_was_uncertain(trajectory, tmp_path):
    state, rd, ports = replay(tmp_path, sparse_config(trajectory), trajectory)
    assert state.finished
    calls = events(rd, "oracle_call")
    assert 2 <= len(calls) == state.oracle_calls
    learner = ports.learner
    final = learner.history[max(learner.history)]
    assert isinstance(final, SparseGaussianProcess)
    # every force of every labelled frame (32 atoms x 3) is a label (the default labels: forces) ...
    n_atoms = 32
    assert final.n_labels == state.oracle_calls * 3 * n_atoms and final.n_energy_labels == 0
    assert final.n_environments == state.oracle_calls * n_atoms
    # ... and exactly the selected atoms are the inducing environments
    selected = [rd.read_label(k).selection for k in range(state.oracle_calls)]
    assert final.n_inducing == sum(len(s) for s in selected)
    info = learner.info()
    assert info.model_kind == "sparse" and info.n_inducing == final.n_inducing
    # the decisions are the sparse model's: each call's frame was above the threshold under the
    # model of the time, and every step since the previous call below it
    frames = ports.samplers[0].frames
    steps = [c["step"] for c in calls]
    for k in range(1, len(calls)):
        label = rd.read_label(k)
        model = learner.history[label.model_version]
        sigma = model.predict(frames[label.step]).atom_std
        assert sigma.max() > 0.12 and sigma.max() == pytest.approx(calls[k]["max_sigma"], rel=1e-9)
        assert label.selection == [int(np.argmax(sigma))]
        for s in range(steps[k - 1] + 1, label.step):
            assert model.predict(frames[s]).atom_std.max() <= 0.12, (k, s)


def test_sparse_replay_stopped_by_the_oracle_resumes_to_the_same_run(trajectory, tmp_path):
    """The resumed learner rebuilds the sparse model from its checkpoint bit for bit: the resumed
    run calls the oracle at the same steps as an uninterrupted one."""
    data = sparse_config(trajectory, checkpoint_interval=10)
    full, rd_full, _ = replay(tmp_path, data, trajectory, "full")
    assert full.oracle_calls >= 4
    from coordinator.cycle import RunStopped

    with pytest.raises(RunStopped, match="could not label frame"):
        replay(tmp_path, data, trajectory, "part", oracle=BrokenOracle(fail_at=3))
    resumed, rd2, ports = replay(tmp_path, data, trajectory, "part", resume=True)
    assert resumed.finished and resumed.oracle_calls == full.oracle_calls
    assert [e["step"] for e in events(rd2, "oracle_call")] == [e["step"] for e in events(rd_full, "oracle_call")]
    assert [e.get("max_sigma") for e in events(rd2, "oracle_call")] == \
        [e.get("max_sigma") for e in events(rd_full, "oracle_call")]
    assert ports.learner.info().model_kind == "sparse"


def test_a_run_starts_from_a_saved_model_of_either_kind(trajectory, tmp_path):
    """``learner.model: FILE``: the learner serves that model (kind from the file) from the start;
    the run labels its first frame as every run does, and then needs fewer calls on a trajectory
    the model has seen."""
    state, _, ports = replay(tmp_path, sparse_config(trajectory), trajectory, "first")
    learner = ports.learner
    model_path = learner.history[max(learner.history)].save(tmp_path / "sparse.npz")
    assert model_file_kind(model_path) == "sparse"
    data = config_for(trajectory)
    data["learner"]["model"] = str(model_path)
    again, rd, ports2 = replay(tmp_path, data, trajectory, "again")
    start = ports2.learner.history[min(ports2.learner.history)]
    assert isinstance(start, SparseGaussianProcess) and start.n_labels == load_model(model_path).n_labels
    assert again.oracle_calls < state.oracle_calls
    final = ports2.learner.history[max(ports2.learner.history)]
    assert final.n_labels == start.n_labels + again.oracle_calls * 3 * 32


def test_learner_model_is_validated_with_messages_that_name_the_key(trajectory, tmp_path):
    with pytest.raises(ConfigError, match="learner.model: expected exact, sparse or the path"):
        parse_config({**config_for(trajectory), "learner": {"model": "sparce"}})
    bad = tmp_path / "not_a_model.npz"
    bad.write_bytes(b"hello")
    with pytest.raises(ConfigError, match="learner.model: .*not an Epicycle model file"):
        parse_config({**config_for(trajectory), "learner": {"model": str(bad)}})
    with pytest.raises(ConfigError, match="learner.sparse.max_inducing: must be >= 1"):
        parse_config({**config_for(trajectory), "learner": {"model": "sparse", "sparse": {"max_inducing": 0}}})
    with pytest.raises(ConfigError, match="learner.sparse.inducing_rule"):
        parse_config({**config_for(trajectory), "learner": {"model": "sparse", "sparse": {"inducing_rule": "fps"}}})


def test_sparse_labels_forces_trains_on_every_force_and_no_energy(trajectory, tmp_path):
    """``learner.sparse.labels: forces``: each call adds its 32 x 3 forces and nothing else; the
    model's mean then equals a sparse model built offline from those forces alone (not with energies)."""
    data = sparse_config(trajectory)
    data["learner"]["sparse"] = {"labels": "forces"}
    state, rd, ports = replay(tmp_path, data, trajectory)
    final = ports.learner.history[max(ports.learner.history)]
    assert state.oracle_calls >= 2
    assert final.n_labels == state.oracle_calls * 3 * 32 and final.n_energy_labels == 0
    labels = [rd.read_label(k) for k in range(state.oracle_calls)]
    assert final.inducing_functionals == "energy_force"  # the default
    offline, with_energy = (SparseGaussianProcess(final.species, (final.cutoffs.r2, final.cutoffs.r3),
                                                  final.hyperparameters, inducing_functionals="energy_force")
                            for _ in range(2))
    for lab in labels:
        offline.add_frame(lab.atoms(), forces=lab.forces, selected=lab.selection)
        with_energy.add_frame(lab.atoms(), forces=lab.forces, selected=lab.selection, energy=lab.energy)
    probe = labels[-1].atoms()
    got = final.train().predict(probe).forces
    assert np.allclose(got, offline.train().predict(probe).forces, rtol=1e-8, atol=1e-10)
    assert not np.allclose(got, with_energy.train().predict(probe).forces, rtol=1e-6, atol=1e-8)


def test_sparse_labels_are_validated(trajectory):
    with pytest.raises(ConfigError, match="learner.sparse.labels: allowed forces, forces\\+energy, all"):
        parse_config({**config_for(trajectory), "learner": {"model": "sparse", "sparse": {"labels": "energy"}}})
    with pytest.raises(ConfigError, match="learner.use_energy: true contradicts learner.sparse.labels: forces"):
        parse_config({**config_for(trajectory),
                      "learner": {"model": "sparse", "use_energy": True, "sparse": {"labels": "forces"}}})
    with pytest.raises(ConfigError, match="learner.use_stress: true contradicts learner.sparse.labels"):
        parse_config({**config_for(trajectory),
                      "learner": {"model": "sparse", "use_stress": True, "sparse": {"labels": "forces+energy"}}})
    with pytest.raises(ConfigError, match="learner.sparse.tolerance: must be in \\[0, 1\\)"):
        parse_config({**config_for(trajectory), "learner": {"model": "sparse", "sparse": {"tolerance": -0.1}}})
    cfg = parse_config({**config_for(trajectory),
                        "learner": {"model": "sparse", "sparse": {"labels": "forces+energy", "tolerance": 0}}})
    assert cfg.learner.sparse.labels == "forces+energy"
    from coordinator.services import learner_model_settings

    assert learner_model_settings(cfg.learner)["sparse"].kwargs()["inducing_tolerance"] == 0.0


@pytest.mark.parametrize("learner, energy, stress", [
    ({}, False, False),
    ({"use_energy": True, "use_stress": True}, True, True),
    ({"model": "sparse"}, False, False),  # labels: forces (default)
    ({"model": "sparse", "sparse": {"labels": "all"}}, True, False),  # stresses only with use_stress
    ({"model": "sparse", "use_stress": True, "sparse": {"labels": "all"}}, True, True),
    ({"model": "sparse", "sparse": {"labels": "forces+energy"}}, True, False),
    ({"model": "sparse", "sparse": {"labels": "forces"}}, False, False),
])
def test_one_rule_says_which_labels_a_run_trains_on(trajectory, learner, energy, stress):
    """The cycle's labels, the seeded training set (learner.data) and the held-out block follow one rule."""
    from coordinator.config import trained_labels

    cfg = parse_config({**config_for(trajectory), "learner": learner})
    assert trained_labels(cfg.learner) == (energy, stress)


# --------------------------------------------------------------------------- embedded over gRPC

SPARSE_MELT = {
    "name": "sparse-e2e",
    "seed": 3,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    # not the defaults: FLARE 1.x's local-energy inducing variables and each call's energy as a label,
    # so the non-default path runs end to end too (the replays above use the defaults)
    "learner": {"model": "sparse", "cutoffs": [5.0, 3.5],
                "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                "optimize": {"every": 0}, "sparse": {"functionals": "energy", "labels": "forces+energy"}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0,
                "schedule": [[300.0, 1500.0]], "steps": 160, "frame_interval": 5, "checkpoint_interval": 40},
    "policy": {"absolute_threshold": 0.12, "initial_atoms": 4, "atoms_per_call": 1},
}


def _run_cli(args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _labels(run_dir: Path) -> dict[int, bytes]:
    return {int(p.stem.split("_")[1]): p.read_bytes() for p in sorted((run_dir / "labels").glob("label_*.npz"))}


def test_embedded_sparse_run_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """``epicycle run`` with ``learner.model: sparse`` through the gRPC services on loopback; killed
    with SIGKILL twice and resumed, it ends with the same labels (bit for bit) and training atoms as
    an uninterrupted run, and the learner's checkpoint holds a sparse model with every label."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(SPARSE_MELT))
    ref = _run_cli(["run", str(cfg), "--run-dir", str(tmp_path / "ref"), "--no-report"], tmp_path)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ref_labels = _labels(tmp_path / "ref")
    assert len(ref_labels) >= 3
    ref_state = json.loads((tmp_path / "ref" / "state.json").read_text())
    # the learner's own checkpoint: a sparse model holding every force and energy of every call
    model = load_model(tmp_path / "ref" / "learner")
    assert model.kind == "sparse"
    n_atoms = 32
    assert model.n_labels == len(ref_labels) * (3 * n_atoms + 1)
    assert model.n_inducing == sum(len(a) for a in ref_state["training_atoms"])

    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir), "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for wait_for_labels in (1, 3):
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            started = kills == 0 or (run_dir / "events.jsonl").read_text().count('"event": "resumed"') == kills
            if started and len(list((run_dir / "labels").glob("label_*.npz"))) >= wait_for_labels:
                time.sleep(0.05 * wait_for_labels)
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            proc.communicate()
        args = [sys.executable, "-m", "coordinator.cli", "run", "--resume", str(run_dir), "--no-report"]
    final = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 1
    labels = _labels(run_dir)
    assert labels.keys() == ref_labels.keys()
    for i in labels:
        a = np.load(run_dir / "labels" / f"label_{i:06d}.npz")
        b = np.load(tmp_path / "ref" / "labels" / f"label_{i:06d}.npz")
        np.testing.assert_array_equal(a["forces"], b["forces"])
        np.testing.assert_array_equal(a["positions"], b["positions"])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["training_atoms"] == ref_state["training_atoms"]
    assert load_model(run_dir / "learner").kind == "sparse"
