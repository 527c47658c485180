"""Run configuration validation, the durable run directory and the pluggable policies."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import ConfigError, load_config, parse_config
from coordinator.rundir import QueuedFrame, RunDirectory, StoredLabel, WalkerState
from protos.errors import InvalidInput, NotFound

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["al_melt.yaml", "cu3au.yaml", "al_ladder.yaml"])
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
        ({"walkers": [{"temperature": 300}]}, r"unknown key walkers\[0\].temperature; allowed:"),
        ({"walkers": [{"ensemble": "nvx"}]}, r"walkers\[0\].ensemble: allowed nve"),
        ({"walkers": [{"name": "a"}, {"name": "a"}]}, r"walkers\[1\].name: 'a' is used by two walkers"),
        ({"walkers": [{"name": "a b"}]}, r"walkers\[0\].name: letters, digits"),
        ({"walkers": [{"structure": {"a": -1}}]}, r"walkers\[0\].structure.a: lattice constant must be > 0"),
        ({"walkers": {"temperatures": []}}, "walkers.temperatures: expected a non-empty list"),
        ({"walkers": {"temps": [300]}}, "walkers: expected a list of walkers, or the ladder form"),
        ({"walkers": [{}] * 65}, "walkers: at most 64 walkers"),
        ({"oracle": {"max_in_flight": -1}}, "oracle.max_in_flight: must be >= 0"),
        ({"oracle": {"on_failure": "ignore"}}, "oracle.on_failure: allowed stop, skip"),
        ({"stop": {"accurate_ratio": 1.5}}, r"stop.accurate_ratio: must be in \(0, 1\]"),
        ({"stop": {"window": 10}}, "unknown key stop.window; allowed:"),
        ({"sampler": {"address": "a:1", "addresses": ["b:2"]}}, "give either sampler.address or sampler.addresses"),
        ({"structure": {"a": 0}}, "structure.a: lattice constant must be > 0"),
        ([1, 2], "config: expected a mapping"),
    ],
)
def test_bad_config_names_the_key(data, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_walkers_inherit_the_sampler_section_and_the_ladder_expands() -> None:
    base = {"seed": 4, "sampler": {"timestep_fs": 2.0, "temperature_K": 300.0, "steps": 50}}
    one = parse_config(base).walker_list()
    assert [(w.name, w.sampler.temperature_K, w.seed) for w in one] == [("w0", 300.0, 4)]
    ladder = parse_config({**base, "walkers": {"temperatures": [300, 900.5]}})
    walkers = ladder.walker_list()
    assert [(w.name, w.sampler.temperature_K, w.sampler.timestep_fs, w.sampler.steps, w.seed) for w in walkers] == [
        ("T300", 300.0, 2.0, 50, 4), ("T900.5", 900.5, 2.0, 50, 5)]
    # the stored config (config.yaml) parses back to the same walkers, as --resume needs
    assert parse_config(ladder.to_dict()).walker_list() == walkers
    mixed = parse_config({**base, "walkers": [
        {"name": "hot", "temperature_K": 1200, "ensemble": "nvt_langevin", "steps": 80, "seed": 11,
         "structure": {"generator": "bcc", "element": "Al", "a": 3.2}}, {}]}).walker_list()
    assert (mixed[0].name, mixed[0].sampler.ensemble, mixed[0].sampler.steps, mixed[0].seed,
            mixed[0].structure.generator) == ("hot", "nvt_langevin", 80, 11, "bcc")
    assert (mixed[1].name, mixed[1].sampler.temperature_K, mixed[1].structure.generator) == ("w1", 300.0, "fcc")


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
    state.labels_applied, state.training_atoms, state.apply_batches = 2, [[0, 1], [3]], [[0], [1]]
    state.set_walker("T300", WalkerState(step=40, time_fs=200.0, md_checkpoint="label:1", pending_override=1))
    state.set_walker("T600", WalkerState(step=60, time_fs=300.0, parked=4))
    state.count("deduplicated")
    rd.save_state(state)
    back = rd.load_state()
    assert back == state and back.walker("T600").parked == 4 and back.step == 100 and back.time_fs == 500.0
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


def test_walker_checkpoints_keep_the_latest_two_and_the_referenced_one(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    paths = [rd.write_walker_checkpoint("w0", step, f"state {step}".encode()) for step in (0, 100, 200, 300)]
    os.utime(rd.path / paths[0], ns=(1, 1))  # oldest
    rd.prune_walker_checkpoints("w0", keep={paths[0]})
    assert sorted(p.name for p in rd.walker_dir("w0").glob("md_*.bin")) == [
        "md_00000000.bin", "md_00000200.bin", "md_00000300.bin"]
    assert rd.read_bytes(paths[3]) == b"state 300"


def test_queue_entries_round_trip(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    rng = np.random.default_rng(2)
    q = QueuedFrame(seq=7, walker="T600", step=120, time_fs=600.0, temperature_K=612.5,
                    positions=rng.normal(size=(4, 3)), numbers=np.array([13, 13, 29, 29]), cell=np.eye(3) * 5,
                    pbc=np.array([True] * 3), force_std=rng.random((4, 3)), predicted_forces=rng.normal(size=(4, 3)),
                    selection=[2, 0], checkpoint=b"\x00\x01engine", model_version=9, max_sigma=0.12, threshold=0.05,
                    atom_std=rng.random(4))
    rd.write_queue_entry(q)
    assert rd.queued_seqs() == [7]
    back = rd.read_queue_entry(7)
    for name in ("positions", "numbers", "cell", "pbc", "force_std", "predicted_forces", "atom_std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(q, name))
    # an entry written before atom_std existed reads back with atom_std None
    rd.write_queue_entry(dataclasses.replace(q, seq=8, atom_std=None))
    assert rd.read_queue_entry(8).atom_std is None
    rd.remove_queue_entry(8)
    assert (back.selection, back.checkpoint, back.walker, back.step, back.ratio) == ([2, 0], q.checkpoint, "T600",
                                                                                   120, pytest.approx(2.4))
    rd.remove_queue_entry(7)
    assert rd.queued_seqs() == []


def test_resume_audit_refuses_a_missing_or_damaged_label_and_names_it(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    rng = np.random.default_rng(3)
    for i in range(5):
        rd.write_label(_label(i, rng))
    state = rd.load_state()
    state.oracle_calls = 4  # label 4 arrived after the last state update: accepted
    (rd.labels_dir / ".label_000005.npz.tmp99").write_bytes(b"cut")
    assert rd.audit(state) == 5
    assert not list(rd.labels_dir.glob(".*tmp*"))  # orphaned temporary files are removed
    rd.label_path(2).unlink()
    with pytest.raises(InvalidInput, match=r"label_000002.npz is missing(.|\n)*--repair"):
        rd.audit(state)
    rd.write_label(_label(2, rng))
    rd.label_path(3).write_bytes(rd.label_path(3).read_bytes()[:100])  # truncated
    with pytest.raises(InvalidInput, match="label_000003.npz is damaged"):
        rd.audit(state)
    rd.write_label(_label(3, rng))
    rd.write_label(_label(7, rng))  # after a gap: the order is unknown
    with pytest.raises(InvalidInput, match="label_000005.npz is missing or damaged but .*label_000007.npz exists"):
        rd.audit(state)


def test_damaged_state_file_is_named(tmp_path: Path) -> None:
    rd = RunDirectory.create(tmp_path / "run", "name: x\n")
    (rd.path / "state.json").write_text('{"version": 2, "oracle_ca')
    with pytest.raises(InvalidInput, match="state.json is unreadable"):
        rd.load_state()
