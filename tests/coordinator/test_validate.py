"""``epicycle validate`` and the run report's validation block (coordinator/validate.py).

The numbers are checked against independent computations: RMSE and P95 recomputed from the written
extended XYZ and from EMT called here, calibration on synthetic residuals whose distribution is known,
the ratio by its definition (seed 004, Table 1), the held-out block against the run's own learner
checkpoint predicting the atoms that did not enter training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from coordinator import validate as v
from coordinator.cli import main
from protos.errors import InvalidInput

HYPS = {"sig2": 0.5, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.03}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A small GP trained on EMT aluminium (2 rattled 32-atom frames, 8 atoms each) and a start structure."""
    from learner_service.datasets import perturbed_fcc_al
    from learner_service.gp import GaussianProcess

    d = tmp_path_factory.mktemp("model")
    frames = perturbed_fcc_al(2, seed=3, delta=0.02)
    gp = GaussianProcess([13], (5.0, 3.5), hyperparameters=HYPS)
    for f in frames:
        gp.add_structure(f, forces=f.get_forces(), atom_indices=range(0, 32, 4))
    gp.train()
    gp.save(d / "al.npz")
    start = perturbed_fcc_al(1, seed=11, delta=0.01, label=False)[0]
    write(d / "start.xyz", start)
    return d / "al.npz", d / "start.xyz"


def labelled_frame(ref, pred, std, noise, energy=None, model_energy=None, stress=None, model_stress=None):
    n = len(ref)
    atoms = Atoms("Al" * n, positions=np.arange(3 * n, dtype=float).reshape(n, 3), cell=[20, 20, 20], pbc=True)
    results = {"forces": np.asarray(ref)}
    if energy is not None:
        results["energy"] = energy
    if stress is not None:
        results["stress"] = np.asarray(stress)
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.arrays["model_forces"] = np.asarray(pred)
    atoms.arrays["model_force_std"] = np.asarray(std)
    atoms.info["noise"] = noise
    if model_energy is not None:
        atoms.info["model_energy"] = model_energy
    if model_stress is not None:
        atoms.info["model_stress"] = np.asarray(model_stress)
    return atoms


# ------------------------------------------------------------------------------------- metrics


def test_force_numbers_follow_their_definitions() -> None:
    rng = np.random.default_rng(0)
    frames, refs, preds = [], [], []
    for _ in range(3):
        ref = rng.normal(scale=1.0, size=(20, 3))
        pred = ref + rng.normal(scale=0.1, size=(20, 3))
        frames.append(labelled_frame(ref, pred, np.full((20, 3), 0.05), 0.02))
        refs.append(ref)
        preds.append(pred)
    m, _ = v.frames_metrics(frames)
    ref, pred = np.concatenate(refs).ravel(), np.concatenate(preds).ravel()
    rmse = math.sqrt(sum((p - r) ** 2 for p, r in zip(pred, ref)) / ref.size)
    # P95 by hand: linear interpolation between order statistics at rank 0.95·(n−1)
    s = sorted(abs(x) for x in ref)
    rank = 0.95 * (len(s) - 1)
    lo = int(math.floor(rank))
    p95 = s[lo] + (rank - lo) * (s[lo + 1] - s[lo])
    f = m["forces"]
    assert f["components"] == 180
    assert f["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert f["p95_abs_reference"] == pytest.approx(p95, rel=1e-12)
    assert f["ratio_percent"] == pytest.approx(100 * rmse / p95, rel=1e-12)
    assert f["calibration"]["rms_total_sigma"] == pytest.approx(math.sqrt(0.05 ** 2 + 0.02 ** 2))


def test_a_perfectly_calibrated_model_covers_68_and_95_percent() -> None:
    rng = np.random.default_rng(1)
    n, noise = 4000, 0.03
    frames = []
    for _ in range(5):
        ref = rng.normal(size=(n, 3))
        std = rng.uniform(0.01, 0.2, size=(n, 3))
        total = np.sqrt(std ** 2 + noise ** 2)
        frames.append(labelled_frame(ref, ref + total * rng.normal(size=(n, 3)), std, noise))
    c = v.frames_metrics(frames)[0]["forces"]["calibration"]
    tol = 4 * math.sqrt(0.32 * 0.68 / 60000)  # four binomial standard deviations
    assert c["within_1_sigma"] == pytest.approx(0.6827, abs=tol)
    assert c["within_2_sigma"] == pytest.approx(0.9545, abs=4 * math.sqrt(0.05 * 0.95 / 60000))
    assert c["mean_squared_z"] == pytest.approx(1.0, abs=4 * math.sqrt(2 / 60000))
    exp, obs = np.array(c["reliability"]["expected"]), np.array(c["reliability"]["observed"])
    assert np.max(np.abs(obs - exp)) < 0.01
    # the same errors with σ twice too large: z² drops by 4, and 1σ covers what 2σ covered
    for a in frames:
        a.arrays["model_force_std"] = 2 * a.arrays["model_force_std"]
        a.info["noise"] = 2 * noise
    c2 = v.frames_metrics(frames)[0]["forces"]["calibration"]
    assert c2["mean_squared_z"] == pytest.approx(c["mean_squared_z"] / 4, rel=1e-12)
    assert c2["within_1_sigma"] == pytest.approx(c["within_2_sigma"], abs=1e-12)


def test_energy_offset_of_a_forces_only_model_and_stress_in_gpa() -> None:
    rng = np.random.default_rng(2)
    frames, d = [], []
    for k in range(4):
        ref = rng.normal(size=(10, 3))
        e = -30.0 + k
        de = rng.normal(scale=0.005)  # eV per frame of 10 atoms
        d.append(de / 10 * 1000)
        a = labelled_frame(ref, ref, np.full((10, 3), 0.1), 0.01, energy=e, model_energy=e + 10 * 0.5 + de,
                           stress=np.zeros(6), model_stress=np.full(6, 0.001))
        a.info["energy_up_to_constant"] = True
        frames.append(a)
    m = v.frames_metrics(frames)[0]
    d = np.array(d)
    assert m["energy"]["offset_meV_per_atom"] == pytest.approx(500.0 + d.mean())
    assert m["energy"]["rmse_meV_per_atom"] == pytest.approx(np.sqrt(np.mean((d - d.mean()) ** 2)))
    assert m["stress"]["rmse_GPa"] == pytest.approx(0.001 * 160.21766208)
    # labels trained on are no validation: left out
    for a in frames:
        a.info["energy_in_training"] = True
    assert v.frames_metrics(frames)[0]["energy"] is None


def test_only_the_masked_atoms_count() -> None:
    ref = np.zeros((4, 3))
    pred = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [5.0, 0, 0]])
    a = labelled_frame(ref, pred, np.full((4, 3), 0.1), 0.01)
    a.arrays["validate"] = np.array([True, True, False, False])
    f = v.frames_metrics([a])[0]["forces"]
    assert f["components"] == 6
    assert f["rmse"] == pytest.approx(math.sqrt(1 / 6))


# ------------------------------------------------------------------------------- the command


def test_validate_with_emt_end_to_end_and_resume(model, tmp_path: Path) -> None:
    path, start = model
    out = tmp_path / "val"
    ts = v.TrajectorySettings(steps=12, frames=3, timestep_fs=2.0, temperature_K=600.0, seed=4)
    lines: list[str] = []
    r = v.validate(path, out, ts, oracle="emt", structure=start, progress=lines.append)
    for name in ("validation.json", "validation.md", "parity.png", "reliability.png", "labelled.xyz"):
        assert (out / name).is_file(), name
    assert any(line.startswith("MD ") and "steps/s" in line and "ETA" in line for line in lines)
    frames = read(out / "labelled.xyz", index=":")
    assert [a.info["step"] for a in frames] == [4, 8, 12]
    assert [a.info["time_fs"] for a in frames] == pytest.approx([8.0, 16.0, 24.0])
    # the labels are EMT's at those positions, the model's forces the GP's
    from learner_service.gp import GaussianProcess

    gp = GaussianProcess.load(path)
    err = []
    for a in frames:
        fresh = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=True)
        fresh.calc = EMT()
        np.testing.assert_allclose(a.get_forces(), fresh.get_forces(), atol=1e-5)
        np.testing.assert_allclose(a.arrays["model_forces"], gp.predict(fresh).forces, atol=1e-5)
        err.append(a.arrays["model_forces"] - fresh.get_forces())
    rmse = float(np.sqrt(np.mean(np.concatenate(err) ** 2)))
    assert r["forces"]["rmse"] == pytest.approx(rmse, rel=1e-4)
    assert json.loads((out / "validation.json").read_text())["forces"]["rmse"] == pytest.approx(rmse, rel=1e-4)
    assert r["energy"]["offset_removed"] and r["stress"] is not None
    assert r["trajectory"]["mean_temperature_K"] > 0

    # resume: the labels on disk are reused, a missing one is labelled again
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    (out / "labels" / "frame_001.xyz").unlink()
    r2 = v.validate(path, out, ts, oracle="emt", structure=start, progress=lines.append)
    assert (out / "labels" / "frame_000.xyz").stat().st_mtime_ns == stamps["frame_000.xyz"]
    assert (out / "labels" / "frame_002.xyz").stat().st_mtime_ns == stamps["frame_002.xyz"]
    assert (out / "labels" / "frame_001.xyz").is_file()
    assert r2["forces"]["rmse"] == pytest.approx(r["forces"]["rmse"], rel=1e-9)
    # other settings into the same directory: refused, naming what differs
    with pytest.raises(InvalidInput, match="steps"):
        v.validate(path, out, v.TrajectorySettings(steps=14, frames=3, timestep_fs=2.0, temperature_K=600.0, seed=4),
                   oracle="emt", structure=start)
    # the labelled frames score a model again without an oracle
    r3 = v.validate(path, tmp_path / "again", ts, frames_file=out / "labelled.xyz", progress=lines.append)
    assert r3["forces"]["rmse"] == pytest.approx(r["forces"]["rmse"], rel=1e-9)


def test_bad_inputs_are_named(model, tmp_path: Path) -> None:
    path, start = model
    ts = v.TrajectorySettings(steps=4, frames=2)
    with pytest.raises(InvalidInput, match="no such model"):
        v.validate(tmp_path / "missing.npz", tmp_path / "o1", ts, oracle="emt", structure=start)
    with pytest.raises(InvalidInput, match="--oracle"):
        v.validate(path, tmp_path / "o2", ts, structure=start)
    with pytest.raises(InvalidInput, match="--structure"):
        v.validate(path, tmp_path / "o3", ts, oracle="emt")
    with pytest.raises(InvalidInput, match="unknown oracle backend"):
        v.validate(path, tmp_path / "o4", ts, oracle="nosuchcode", structure=start)
    cu = Atoms("Cu4", positions=[[0, 0, 0], [1.8, 1.8, 0], [1.8, 0, 1.8], [0, 1.8, 1.8]], cell=[3.6] * 3, pbc=True)
    write(tmp_path / "cu.xyz", cu)
    with pytest.raises(InvalidInput, match="does not know"):
        v.validate(path, tmp_path / "o5", ts, oracle="emt", structure=tmp_path / "cu.xyz")
    with pytest.raises(InvalidInput, match="--frames"):
        v.validate(path, tmp_path / "o6", v.TrajectorySettings(steps=2, frames=5), oracle="emt", structure=start)
    with pytest.raises(InvalidInput, match="--ensemble"):
        v.validate(path, tmp_path / "o7", v.TrajectorySettings(ensemble="npt_berendsen"), oracle="emt",
                   structure=start)
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(InvalidInput, match="not an Epicycle model"):
        v.validate(tmp_path / "junk.npz", tmp_path / "o8", ts, oracle="emt", structure=start)


def test_the_cli_end_to_end(model, tmp_path: Path, capsys) -> None:
    path, start = model
    out = tmp_path / "cli"
    assert main(["validate", str(path), "--oracle", "emt", "--structure", str(start), "--steps", "6",
                 "--frames", "2", "--timestep", "2", "--temperature", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "force RMSE" in printed and "validation report" in printed
    assert json.loads((out / "validation.json").read_text())["frames"] == 2
    assert main(["validate", str(path), "--structure", str(start), "--out", str(tmp_path / "x")]) == 2
    assert "give --oracle" in capsys.readouterr().err


# ------------------------------------------------------------------------- the run's held-out block


def test_heldout_selection_prefers_labels_never_trained_on() -> None:
    a = labelled_frame(np.zeros((3, 3)), np.zeros((3, 3)), np.ones((3, 3)), 0.1)
    b = a.copy()
    b.calc = a.calc
    a.info["applied"], a.arrays["training"] = True, np.array([True, False, False])
    b.info["applied"], b.arrays["training"] = False, np.array([False, False, False])
    kind, chosen = v.heldout_selection([a, b])
    assert kind == "labels not trained on" and chosen == [b] and chosen[0].arrays["validate"].all()
    b.info["applied"], b.arrays["training"] = True, np.array([True, True, True])
    kind, chosen = v.heldout_selection([a, b])
    assert kind == "atoms not trained on" and chosen == [a]
    assert chosen[0].arrays["validate"].tolist() == [False, True, True]


def test_a_run_report_validates_the_final_model_on_the_atoms_it_did_not_train_on(tmp_path: Path) -> None:
    """A short replayed run (in-process ports): heldout.xyz is written when it finishes, and the report's
    block equals the run's own learner checkpoint predicting the atoms outside the training set."""
    import ase.io
    from ase.build import bulk

    from coordinator.config import parse_config
    from coordinator.cycle import OnTheFlyRun, Progress
    from coordinator.export import run_frames
    from coordinator.inprocess import replay_ports
    from coordinator.report import write_report
    from coordinator.rundir import RunDirectory

    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(3)
    traj = []
    for k in range(41):
        a = atoms.copy()
        a.positions += rng.normal(scale=0.02 + 0.002 * k, size=a.positions.shape)
        a.info = {"time_fs": 5.0 * k}
        traj.append(a)
    ase.io.write(tmp_path / "traj.xyz", traj, format="extxyz")
    data = {"name": "heldout", "seed": 5, "structure": {"file": str(tmp_path / "traj.xyz"), "index": 0},
            "learner": {"cutoffs": [5.0, 3.5], "hyperparameters": HYPS, "optimize": {"every": 0}},
            "sampler": {"timestep_fs": 5.0, "steps": 40, "frame_interval": 1, "checkpoint_interval": 20},
            "policy": {"absolute_threshold": 0.04, "initial_atoms": 4, "atoms_per_call": 2}}
    config = parse_config(data)
    rd = RunDirectory.create(tmp_path / "run", yaml.safe_dump(config.to_dict()))
    try:
        OnTheFlyRun(config, rd, progress=Progress(40, 5.0, quiet=True),
                    ports=replay_ports(config, rd, tmp_path / "traj.xyz")).run()
    finally:
        rd.close()
    assert (rd.path / "heldout.xyz").is_file()
    report = write_report(rd.path).read_text()
    assert "## Validation on held-out labels" in report and "did not enter its training set" in report
    assert (rd.path / "validation_parity.png").is_file() and (rd.path / "validation_reliability.png").is_file()
    block = json.loads((rd.path / "summary.json").read_text())["validation"]
    assert block["kind"] == "atoms not trained on"

    gp, _ = v.load_model(rd.path, progress=lambda s: None)
    errs, refs = [], []
    for a in run_frames(rd.path):
        held = ~a.arrays["training"]
        p = gp.predict(a)
        errs.append((p.forces - a.get_forces())[held])
        refs.append(a.get_forces()[held])
    err, ref = np.concatenate(errs).ravel(), np.concatenate(refs).ravel()
    assert block["forces"]["components"] == err.size
    assert block["forces"]["rmse"] == pytest.approx(float(np.sqrt(np.mean(err ** 2))), rel=1e-6)
    assert block["forces"]["p95_abs_reference"] == pytest.approx(float(np.percentile(np.abs(ref), 95)), rel=1e-9)


def test_a_sparse_model_file_validates_too(model, tmp_path: Path) -> None:
    from learner_service.datasets import perturbed_fcc_al
    from learner_service.sparse_gp import SparseGaussianProcess

    _, start = model
    sgp = SparseGaussianProcess([13], (5.0, 3.5), hyperparameters=HYPS)
    for f in perturbed_fcc_al(2, seed=3, delta=0.02):
        sgp.add_structure(f, forces=f.get_forces(), atom_indices=range(0, 32, 4))
    sgp.save(tmp_path / "sparse.npz")
    r = v.validate(tmp_path / "sparse.npz", tmp_path / "out", v.TrajectorySettings(steps=4, frames=2, timestep_fs=2.0),
                   oracle="emt", structure=start, progress=lambda s: None)
    assert r["model"].startswith("sparse model file")
    frames = read(tmp_path / "out" / "labelled.xyz", index=":")
    err = np.concatenate([a.arrays["model_forces"] - a.get_forces() for a in frames])
    assert r["forces"]["rmse"] == pytest.approx(float(np.sqrt(np.mean(err ** 2))), abs=1e-7)  # file: 8 decimals


def test_the_report_block_reads_the_predictions_without_importing_the_gp(tmp_path: Path) -> None:
    """The report renders the held-out block from heldout.xyz alone: no GP, no numba in its process."""
    import subprocess
    import sys

    rng = np.random.default_rng(4)
    frames = []
    for k in range(3):
        ref = rng.normal(size=(8, 3))
        a = labelled_frame(ref, ref + 0.01 * rng.normal(size=(8, 3)), np.full((8, 3), 0.01), 0.01)
        a.arrays["validate"] = np.arange(8) % 2 == 0
        a.info.update(heldout="atoms not trained on", final_model_version=7, temperature_K=300.0 + 100 * k)
        frames.append(a)
    write(tmp_path / "heldout.xyz", frames, format="extxyz")
    code = ("import json, sys; from coordinator.report import heldout_validation; "
            f"m, lines = heldout_validation({str(tmp_path)!r}); "
            "print(json.dumps([m['forces']['components'], m['model_version'], "
            "[k for k in sys.modules if k == 'numba' or k.startswith('learner_service.gp')], "
            "m['mean_temperature_K'], lines]))")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    components, version, heavy, mean_t, lines = json.loads(proc.stdout.strip().splitlines()[-1])
    assert components == 3 * 4 * 3 and version == 7 and heavy == []
    assert mean_t == 400.0 and any(line.startswith(f"| 3 | {components} | 400 |") for line in lines)
    assert (tmp_path / "validation_parity.png").is_file() and (tmp_path / "validation_reliability.png").is_file()
