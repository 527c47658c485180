"""Reusing labels: `epicycle fit` on several inputs (XYZ files, run directories) and a run's
`learner.data`, which starts the training set before the first oracle call (real services)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from coordinator.config import ConfigError, load_config
from learner_service.datasets import perturbed_fcc_al
from learner_service.labelled_data import read_labelled
from protos.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}

SHORT = {
    "name": "reuse", "seed": 4,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": [5.0, 3.5], "hyperparameters": HYPS,
                "optimize": {"every": 1, "until_calls": 5, "max_iterations": 10}},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 300.0, "steps": 30, "frame_interval": 5,
                "checkpoint_interval": 30},
    "policy": {"sigma_factor": 2.0, "initial_atoms": 4},
}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


def cu_frame(seed: int = 0):
    """4-atom FCC Cu, rattled, with EMT labels (eV, eV/Å, eV/Å³)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
    return atoms


# --------------------------------------------------------------------------- reading and merging


def test_inputs_are_merged_in_order_with_duplicates_kept_once(tmp_path) -> None:
    """A structure of an earlier input is dropped from a later one; repeats within one input are kept."""
    al = perturbed_fcc_al(3, seed=1)
    write(tmp_path / "al.xyz", al, format="extxyz")
    assert len(read_labelled([tmp_path / "al.xyz", tmp_path / "al.xyz"]).frames) == 3
    write(tmp_path / "twice.xyz", [al[0], al[0]], format="extxyz")
    assert len(read_labelled([tmp_path / "twice.xyz"]).frames) == 2
    write(tmp_path / "mixed.xyz", [al[1], cu_frame()], format="extxyz")  # al[1] again: a duplicate
    data = read_labelled([tmp_path / "al.xyz", tmp_path / "mixed.xyz"])
    assert len(data.frames) == 4 and data.species == [13, 29]
    assert data.origins == [(str(tmp_path / "al.xyz"), 0), (str(tmp_path / "al.xyz"), 1),
                            (str(tmp_path / "al.xyz"), 2), (str(tmp_path / "mixed.xyz"), 1)]
    a, m = data.sources
    assert (a.frames, a.atoms, a.species, a.energies, a.duplicates) == (3, 96, {"Al": 96}, 3, 0)
    assert (m.frames, m.atoms, m.species, m.duplicates) == (1, 4, {"Cu": 4}, 1)
    lines = data.summary_lines()
    assert "1 duplicate frame(s) dropped" in lines[1] and lines[-1].startswith("merged: 4 frames from 2 inputs")
    assert "Al 96, Cu 4" in lines[-1]
    np.testing.assert_allclose(data.frames[3].get_forces(), cu_frame().get_forces(), atol=1e-6)  # XYZ text


def test_bad_inputs_are_named(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="nope.xyz: no such file"):
        read_labelled([tmp_path / "nope.xyz"])
    unlabelled = perturbed_fcc_al(1, label=False)
    write(tmp_path / "bare.xyz", unlabelled, format="extxyz")
    with pytest.raises(InvalidInput, match=r"bare.xyz: frame 0 has no forces"):
        read_labelled([tmp_path / "bare.xyz"])
    (tmp_path / "notarun").mkdir()
    with pytest.raises(InvalidInput, match="not a run directory"):
        read_labelled([tmp_path / "notarun"])


def test_fit_on_several_inputs_is_the_gp_of_all_their_frames(tmp_path) -> None:
    """The merged fit has every frame's environments and the same posterior as adding the frames by hand."""
    from learner_service.gp import GaussianProcess
    from learner_service.offline import fit_model

    al, cu = perturbed_fcc_al(2, seed=3), cu_frame(1)
    write(tmp_path / "a.xyz", al, format="extxyz")
    write(tmp_path / "b.xyz", [cu, al[0]], format="extxyz")
    lines: list[str] = []
    gp, _ = fit_model([tmp_path / "a.xyz", tmp_path / "b.xyz"], (4.0, 3.0), atoms=[0, 1, 2], optimize=False,
                      hyperparameters=HYPS, out=tmp_path / "m.npz", log=lines.append)
    assert [int(z) for z in gp.species] == [13, 29]
    assert gp.n_environments == 3 * 3  # two Al frames + one Cu frame (the duplicate Al frame once)
    assert any(line.startswith("data: merged: 3 frames from 2 inputs") for line in lines)
    ref = GaussianProcess([13, 29], (4.0, 3.0), dict(HYPS))
    al, cu = read(tmp_path / "a.xyz", index=":"), read(tmp_path / "b.xyz", index=0)  # as written (rounded)
    for frame in (al[0], al[1], cu):
        ref.add_structure(frame, forces=frame.get_forces(), atom_indices=[0, 1, 2])
    ref.train()
    probe = perturbed_fcc_al(1, seed=9)[0]
    p, q = gp.predict(probe), ref.predict(probe)
    np.testing.assert_allclose(p.forces, q.forces, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.force_std, q.force_std, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- learner.data in a run config


def test_learner_data_paths_are_checked_and_relative_to_the_config(tmp_path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    write(sub / "seed.xyz", perturbed_fcc_al(1), format="extxyz")
    cfg = sub / "run.yaml"
    cfg.write_text(yaml.safe_dump(dict(SHORT, learner=dict(SHORT["learner"], data=["seed.xyz"]))))
    assert load_config(cfg).learner.data == (str((sub / "seed.xyz").resolve()),)
    cfg.write_text(yaml.safe_dump(dict(SHORT, learner=dict(SHORT["learner"], data=["seed.xyz", "missing.xyz"]))))
    with pytest.raises(ConfigError, match=r"learner.data\[1\]: .*missing.xyz does not exist"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump(dict(SHORT, learner=dict(SHORT["learner"], data=["."]))))
    with pytest.raises(ConfigError, match=r"learner.data\[0\]: .* not a run directory"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump(dict(SHORT, learner=dict(SHORT["learner"], data=[3]))))
    with pytest.raises(ConfigError, match=r"learner.data: expected a list of paths"):
        load_config(cfg)


@pytest.mark.slow
def test_a_run_starts_from_another_runs_labels_and_a_file(tmp_path) -> None:
    source = tmp_path / "source"
    (tmp_path / "source.yaml").write_text(yaml.safe_dump(SHORT))
    first = cli("run", "source.yaml", "--run-dir", str(source), "--no-report", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    src_state = json.loads((source / "state.json").read_text())
    src_atoms = sum(len(a) for a in src_state["training_atoms"])

    # an XYZ file: two Al frames with 3 atoms marked for training, and a Cu frame (every atom; Cu is no
    # walker's element, so the embedded learner must know it from the data)
    al = perturbed_fcc_al(2, seed=7)
    for frame in al:
        frame.arrays["training"] = np.isin(np.arange(len(frame)), [0, 5, 9])
    write(tmp_path / "extra.xyz", [*al, cu_frame(2)], format="extxyz")
    cfg = dict(SHORT, name="seeded", seed=5, learner=dict(SHORT["learner"], data=["source", "extra.xyz"]))
    (tmp_path / "seeded.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "seeded"
    proc = cli("run", "seeded.yaml", "--run-dir", str(run_dir), "--no-report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "starting the training set from learner.data" in proc.stdout
    assert f"source (run directory): {src_state['oracle_calls']} frames" in proc.stdout

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.index("training_seeded") < kinds.index("oracle_call")  # before the first oracle call
    seeded = next(e for e in events if e["event"] == "training_seeded")
    assert seeded["environments"] == src_atoms + 2 * 3 + 4 == seeded["n_environments"]
    # label 0 adds policy.initial_atoms to the seeded environments
    first_update = next(e for e in events if e["event"] == "training_update")
    assert first_update["label"] == 0 and first_update["n_environments"] == seeded["n_environments"] + 4

    # resumed with more steps: the learner's checkpoint holds the seed, nothing is read or added again
    cont = cli("run", "--resume", str(run_dir), "--set", "sampler.steps=40", "--no-report", cwd=tmp_path)
    assert cont.returncode == 0, cont.stdout[-2000:] + cont.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "training_seeded" for e in events) == 1
    updates = [e for e in events if e["event"] == "training_update"]
    assert all(b["n_environments"] >= a["n_environments"] for a, b in zip(updates, updates[1:]))

    # the learner lost its checkpoints: rebuilt from learner.data and the run's labels, the same training set
    import shutil

    def manifest(checkpoint_id):
        return json.loads((run_dir / "learner" / "checkpoints" / f"{checkpoint_id}.json").read_text())

    before = manifest(json.loads((run_dir / "state.json").read_text())["learner_checkpoint"])
    shutil.rmtree(run_dir / "learner")
    rebuilt = cli("run", "--resume", str(run_dir), "--set", "sampler.steps=41", "--no-report", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stdout[-2000:] + rebuilt.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    reseeded = [e for e in events if e["event"] == "training_seeded"]
    assert len(reseeded) == 2 and reseeded[1]["rebuilding"] and reseeded[1]["digest"] == seeded["digest"]
    ck = next(e for e in events if e["event"] == "learner_rebuilt")["learner_checkpoint"]
    assert manifest(ck)["n_environments"] == before["n_environments"] > seeded["environments"]
    # ... and refuses when the data changed since the run started
    shutil.rmtree(run_dir / "learner")
    write(tmp_path / "extra.xyz", [*al, cu_frame(3)], format="extxyz")
    refused = cli("run", "--resume", str(run_dir), "--set", "sampler.steps=42", "--no-report", cwd=tmp_path)
    assert refused.returncode == 2 and "learner.data changed since the run started" in refused.stderr
    write(tmp_path / "extra.xyz", [*al, cu_frame(2)], format="extxyz")
    # the report says what the run started from
    assert cli("report", str(run_dir), cwd=tmp_path).returncode == 0
    report = (run_dir / "report.md").read_text()
    assert (f"| started from (learner.data) | {seeded['environments']} environments from "
            f"{seeded['frames']} frame(s) of `{tmp_path / 'source'}`, `{tmp_path / 'extra.xyz'}` |") in report

    # and `epicycle fit` reads both kinds of input too
    fit = cli("fit", "source", "extra.xyz", "--cutoffs", "5.0,3.5", "--no-optimize", "--atoms", "0,1",
              "--out", "m.npz", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"merged: {src_state['oracle_calls'] + 3} frames from 2 inputs" in fit.stdout
