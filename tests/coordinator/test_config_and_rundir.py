"""Run configuration validation, the durable run directory and the pluggable policies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import ConfigError, load_config, parse_config
from coordinator.policies import ACQUISITION, MaxSigma, RandomAtoms
from coordinator.rundir import RunDirectory, StoredLabel
from protos.errors import InvalidInput, NotFound

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["al_melt.yaml", "cu3au.yaml"])
def test_examples_validate(name: str) -> None:
    config = load_config(ROOT / "examples" / name)
    assert config.sampler.steps > 0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"samplr": {}}, "unknown key samplr; allowed:"),
        ({"sampler": {"timestep": 1}}, "unknown key sampler.timestep; allowed:"),
        ({"sampler": {"timestep_fs": -1}}, "sampler.timestep_fs: must be > 0 fs"),
        ({"sampler": {"timestep_fs": "fast"}}, "sampler.timestep_fs: expected a number"),
        ({"sampler": {"ensemble": "nvx"}}, "sampler.ensemble: allowed nve"),
        ({"sampler": {"steps": 2.5}}, "sampler.steps: expected an integer"),
        ({"sampler": {"schedule": [[100]]}}, r"sampler.schedule\[0\]: expected \[time_fs, temperature_K\]"),
        ({"sampler": {"temperature_K": -5}}, "sampler.temperature_K: must be >= 0 K"),
        ({"learner": {"cutoffs": [4.0, 6.0]}}, "learner.cutoffs: the 3-body cutoff"),
        ({"learner": {"cutoffs": [4.0]}}, "learner.cutoffs: expected a list of 2 numbers"),
        ({"learner": {"hyperparameters": {"sig9": 1}}}, "learner.hyperparameters: unknown"),
        ({"learner": {"hyperparameters": {"noise": -1}}}, "learner.hyperparameters.noise: must be a positive"),
        ({"learner": {"optimize": {"bounds": {"noise": [0.01, 0.001]}}}},
         r"learner.optimize.bounds.noise: expected \[lower, upper\] with 0 < lower < upper"),
        ({"learner": {"optimize": {"bounds": {"noise": 0.01}}}}, r"learner.optimize.bounds.noise: expected"),
        ({"learner": {"optimize": {"bounds": {"energy_noise": [0.01, 1]}}}},
         "learner.optimize.bounds: unknown hyperparameter 'energy_noise'"),
        ({"learner": {"optimize": {"bounds": {"noise": [0.1, 1]}}}},
         r"learner.optimize.bounds.noise: the initial value 0.05 lies outside \[0.1, 1\]"),
        ({"learner": {"optimize": {"space": "sqrt"}}}, "learner.optimize.space: allowed linear, log"),
        ({"oracle": {"backend": "vasp"}}, "oracle.backend: unknown backend 'vasp'; allowed:"),
        ({"oracle": {"addresses": ["dns:///o:1", "h:2"]}}, "a dns:/// name must be the only address"),
        ({"policy": {"acquisition": "psychic"}}, "policy.acquisition: allowed"),
        ({"policy": {"initial_atoms": True}}, "policy.initial_atoms: expected an atom count"),
        ({"policy": {"sigma_factor": 0}}, "policy.sigma_factor: must be > 0"),
        ({"structure": {"generator": "hcp"}}, "structure.generator: allowed"),
        ({"structure": {"a": 0}}, "structure.a: lattice constant must be > 0"),
        ([1, 2], "config: expected a mapping"),
    ],
)
def test_bad_config_names_the_key(data, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampler:\n  timestep_fs: -2\n")
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2
    assert "sampler.timestep_fs: must be > 0 fs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing created for a rejected config


def _label(i: int, rng) -> StoredLabel:
    n = 4
    return StoredLabel(index=i, step=10 * i, time_fs=50.0 * i, positions=rng.normal(size=(n, 3)),
                       numbers=np.array([13] * n), cell=np.eye(3) * 8, pbc=np.array([True] * 3),
                       energy=-3.25 * i, forces=rng.normal(size=(n, 3)), stress=rng.normal(size=6),
                       force_std=rng.random((n, 3)) if i else None, checkpoint=bytes(range(i * 7 % 256)),
                       structure_hash=f"h{i}", oracle_seconds=0.5, worker="w")


def test_labels_round_trip_exactly(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    rng = np.random.default_rng(0)
    written = [_label(i, rng) for i in range(3)]
    for lab in written:
        rd.write_label(lab)
    assert rd.label_count() == 3
    for lab in written:
        back = rd.read_label(lab.index)
        for field in ("positions", "numbers", "cell", "pbc", "forces", "stress"):
            np.testing.assert_array_equal(getattr(back, field), getattr(lab, field))
        assert back.energy == lab.energy and back.checkpoint == lab.checkpoint and back.step == lab.step
        if lab.force_std is None:
            assert back.force_std is None
        else:
            np.testing.assert_array_equal(back.force_std, lab.force_std)


def test_label_count_stops_at_a_gap_and_ignores_temporary_files(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    rng = np.random.default_rng(1)
    rd.write_label(_label(0, rng))
    rd.write_label(_label(1, rng))
    (rd.labels_dir / ".label_000002.npz.tmp123").write_bytes(b"partial write from a killed process")
    assert rd.label_count() == 2


def test_state_and_events(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    state = rd.load_state()
    assert state.labels_applied == 0 and not state.finished
    state.labels_applied, state.md_checkpoint, state.training_atoms = 2, "label:1", [[0, 1], [3]]
    rd.save_state(state)
    assert rd.load_state() == state
    rd.event("frame", step=3, time_fs=15.0, value=np.float64(1.5))
    with open(rd.path / "events.jsonl", "a") as handle:
        handle.write('{"event": "frame", "step": 4, "ti')  # a line cut by a kill
    rd.close()
    events = list(RunDirectory.open(rd.path).events())
    assert events == [dict(events[0])] and events[0]["value"] == 1.5


def test_existing_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    RunDirectory.create(tmp_path / "run", "name: x\n")
    with pytest.raises(InvalidInput, match="--resume"):
        RunDirectory.create(tmp_path / "run", "name: y\n")
    with pytest.raises(NotFound, match="not an Epicycle run directory"):
        RunDirectory.open(tmp_path)


def test_model_files_keep_the_latest_two(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    for i in range(4):
        rd.write_model(i, f"model {i}".encode())
    assert sorted(p.name for p in rd.models_dir.iterdir()) == ["model_000002.npz", "model_000003.npz"]


def test_max_sigma_picks_the_most_uncertain_atoms() -> None:
    std = np.zeros((6, 3))
    std[4, 2] = 0.9
    std[1, 0] = 0.5
    std[2, 1] = 0.7
    rng = np.random.default_rng(0)
    assert MaxSigma().select(std, np.ones(6, int), 2, rng).tolist() == [2, 4]
    assert MaxSigma().select(std, np.ones(6, int), 10, rng).tolist() == list(range(6))


def test_random_acquisition_is_seeded_and_unique() -> None:
    a = RandomAtoms().select(np.zeros((20, 3)), np.ones(20, int), 5, np.random.default_rng(3))
    b = RandomAtoms().select(np.zeros((20, 3)), np.ones(20, int), 5, np.random.default_rng(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 5
    assert set(ACQUISITION) >= {"max_sigma", "random"}
