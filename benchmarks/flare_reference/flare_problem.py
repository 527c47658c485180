"""Build problem files for run_flare.py and run it (Epicycle side, our Python 3.11 venv).

Used by tests/learner/test_flare_crosscheck.py and compare_speed.py. Imports only numpy/ase
(and, optionally, learner_service.datasets for the shared data generator) so that it can be
loaded by path without installing anything.

Problem format (npz) — see README.md:
    cutoffs (2,), hyps (5,) = sig2, ls2, sig3, ls3, noise, species (n_species,),
    n_train, train_positions_k, train_cell_k, train_numbers_k, train_forces_k, train_atoms_k,
    n_test, test_positions_k, test_cell_k, test_numbers_k,
    optional flags: repeats, predict_repeats, compute_lml, compute_predictions,
    compute_local_energies, optimize, maxiter, max_predict_atoms.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run_flare.py"
ENV_VAR = "EPICYCLE_FLARE_PYTHON"

HYP_NAMES = ("sig2", "ls2", "sig3", "ls3", "noise")


@dataclass
class Frame:
    """One structure: positions (n,3) Å, cell (3,3) rows = lattice vectors, atomic numbers."""

    positions: np.ndarray
    cell: np.ndarray
    numbers: np.ndarray
    forces: np.ndarray | None = None  # eV/Å, training frames only
    atoms: Sequence[int] = field(default_factory=list)  # training environments to add

    @classmethod
    def from_atoms(cls, atoms, forces=None, atom_indices=()):
        return cls(
            positions=np.array(atoms.get_positions(), dtype=float),
            cell=np.array(atoms.get_cell()[:], dtype=float),
            numbers=np.array(atoms.get_atomic_numbers(), dtype=np.int64),
            forces=None if forces is None else np.array(forces, dtype=float),
            atoms=list(atom_indices),
        )

    def to_atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=True)


def write_problem(path, cutoffs, hyps, species, train: Sequence[Frame], test: Sequence[Frame],
                  **flags) -> Path:
    """Write a problem .npz; ``hyps`` is a 5-sequence or a dict keyed by HYP_NAMES."""
    if isinstance(hyps, dict):
        hyps = [hyps[k] for k in HYP_NAMES]
    data = {
        "cutoffs": np.asarray(cutoffs, dtype=float).reshape(2),
        "hyps": np.asarray(hyps, dtype=float).reshape(5),
        "species": np.asarray(species, dtype=np.int64).ravel(),
        "n_train": np.array(len(train)),
        "n_test": np.array(len(test)),
    }
    for k, fr in enumerate(train):
        if fr.forces is None:
            raise ValueError("training frame %d has no forces" % k)
        data["train_positions_%d" % k] = np.asarray(fr.positions, dtype=float)
        data["train_cell_%d" % k] = np.asarray(fr.cell, dtype=float)
        data["train_numbers_%d" % k] = np.asarray(fr.numbers, dtype=np.int64)
        data["train_forces_%d" % k] = np.asarray(fr.forces, dtype=float)
        data["train_atoms_%d" % k] = np.asarray(list(fr.atoms), dtype=np.int64)
    for k, fr in enumerate(test):
        data["test_positions_%d" % k] = np.asarray(fr.positions, dtype=float)
        data["test_cell_%d" % k] = np.asarray(fr.cell, dtype=float)
        data["test_numbers_%d" % k] = np.asarray(fr.numbers, dtype=np.int64)
    for key, value in flags.items():
        data[key] = np.asarray(value)
    path = Path(path)
    np.savez(path, **data)
    return path


def flare_python() -> str | None:
    """The FLARE venv's python from $EPICYCLE_FLARE_PYTHON, or None if not configured."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def run_flare(problem_path, result_path, python: str | None = None, timeout: float = 3600,
              quiet: bool = True, env_overrides: dict | None = None) -> dict:
    """Run run_flare.py under the FLARE interpreter; return the result as a dict of arrays.
    ``env_overrides`` are set in the subprocess's environment (e.g. BLAS thread counts)."""
    python = python or flare_python()
    if not python:
        raise RuntimeError("set %s to the FLARE 0.2.4 venv's python "
                           "(benchmarks/flare_reference/setup_flare_env.sh)" % ENV_VAR)
    cmd = [python, str(RUNNER), str(problem_path), str(result_path)]
    if quiet:
        cmd.append("--quiet")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # never let our 3.11 packages leak into the 3.9 interpreter
    env.pop("PYTHONHOME", None)
    env.update(env_overrides or {})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(result_path).resolve().parent))
    if proc.returncode != 0:
        raise RuntimeError("run_flare.py failed (rc=%d):\n%s\n%s"
                           % (proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:]))
    with np.load(result_path, allow_pickle=False) as res:
        out = {k: res[k] for k in res.files}
    out["wall_time"] = time.perf_counter() - t0
    out["stderr"] = proc.stderr
    return out


# --------------------------------------------------------------------------------------------
# Data: the benchmark (perturbed 32-atom FCC Al, EMT labels) and variants.
# --------------------------------------------------------------------------------------------

def _emt_forces(atoms):
    from ase.calculators.emt import EMT

    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_forces()


def perturbed_fcc(symbols="Al", a=4.05, reps=(2, 2, 2), n_frames=1, seed=0, amplitude=0.05,
                  other=None, other_fraction=0.5):
    """Perturbed FCC frames with EMT forces (ASE only).

    Every Cartesian coordinate is displaced uniformly in ±amplitude·a (seeded). With ``other``
    (e.g. "Cu"), a seeded random ``other_fraction`` of the sites gets that element.
    Returns a list of (ase.Atoms, forces).
    """
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    base = bulk(symbols, "fcc", a=a, cubic=True).repeat(reps)
    out = []
    for _ in range(n_frames):
        atoms = base.copy()
        if other is not None:
            n_other = int(round(other_fraction * len(atoms)))
            idx = rng.choice(len(atoms), size=n_other, replace=False)
            numbers = atoms.get_atomic_numbers()
            from ase.data import atomic_numbers

            numbers[idx] = atomic_numbers[other]
            atoms.set_atomic_numbers(numbers)
        atoms.positions += rng.uniform(-amplitude * a, amplitude * a, size=atoms.positions.shape)
        out.append((atoms, _emt_forces(atoms)))
    return out


def perturbed_fcc_al(n_frames, seed):
    """The issue's data set: prefer learner_service.datasets.perturbed_fcc_al if it exists."""
    try:
        from learner_service.datasets import perturbed_fcc_al as shared  # type: ignore
    except Exception:
        shared = None
    if shared is not None:
        frames = shared(n_frames, seed)
        out = []
        for fr in frames:
            if isinstance(fr, tuple):
                atoms, forces = fr[0], fr[1]
            else:  # ase.Atoms with a calculator or arrays["forces"]
                atoms = fr
                forces = fr.arrays.get("forces") if "forces" in fr.arrays else fr.get_forces()
            out.append((atoms, np.asarray(forces, dtype=float)))
        return out
    return perturbed_fcc("Al", 4.05, (2, 2, 2), n_frames=n_frames, seed=seed)


def benchmark_problem(n_envs, seed=0, n_test_frames=1, envs_per_frame=None):
    """The issue's benchmark: n_envs training environments from perturbed 32-atom Al frames
    (r2 = 6 Å, r3 = 4 Å), plus n_test_frames fresh frames. Returns (train, test) Frames."""
    per = envs_per_frame or 32
    n_frames = -(-n_envs // per)
    data = perturbed_fcc_al(n_frames + n_test_frames, seed)
    try:  # the shared selection rule (frames in order, atoms in index order), if available
        from learner_service.datasets import training_selection  # type: ignore
    except Exception:
        training_selection = None
    if training_selection is not None and envs_per_frame is None:
        train = [Frame.from_atoms(data[f][0], data[f][1], idx)
                 for f, idx in training_selection(n_envs)]
        test = [Frame.from_atoms(atoms) for atoms, _ in data[len(train):len(train) + n_test_frames]]
        return train, test
    rng = np.random.default_rng(seed + 1000)
    train, left = [], n_envs
    for atoms, forces in data[:n_frames]:
        take = min(per, left)
        idx = sorted(rng.choice(len(atoms), size=take, replace=False).tolist())
        train.append(Frame.from_atoms(atoms, forces, idx))
        left -= take
    test = [Frame.from_atoms(atoms) for atoms, _ in data[n_frames:]]
    return train, test


if __name__ == "__main__":  # tiny smoke run: python flare_problem.py OUT_DIR
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    tr, te = benchmark_problem(10)
    p = write_problem(out_dir / "problem.npz", (6.0, 4.0), (1.0, 1.0, 0.1, 1.0, 0.05), [13], tr, te)
    print(p)
