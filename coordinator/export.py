"""``epicycle export RUN_DIR --xyz OUT``: every oracle label of a run as extended XYZ.

Each frame carries the oracle's energy (eV), forces (eV/Å) and stress (eV/Å³, ASE Voigt order and
sign) on a single-point calculator, so any ASE-reading code (``epicycle fit``, other fitting codes)
reads them as labels; per atom, ``training`` marks the atoms whose environments entered the run's
training set, and — for frames labelled because the model was uncertain — ``model_forces`` and
``model_force_std`` hold the old model's prediction and per-component σ at that frame (eV/Å), so
every oracle call is also a calibration point; ``info`` holds the label index, walker, step, time (fs),
temperature (K), the model version that predicted it and the oracle worker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from protos.errors import InvalidInput


def run_frames(run_dir: str | Path, applied_only: bool = False) -> list:
    """The labels of a run directory as ASE Atoms (see the module docstring), in label order."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from coordinator.rundir import RunDirectory

    run_dir = Path(run_dir)
    if not (run_dir / "state.json").is_file():
        raise InvalidInput(f"{run_dir}: not a run directory (no state.json)")
    rd = RunDirectory.open(run_dir)
    st = rd.load_state()
    order = [i for batch in st.apply_batches for i in batch]
    trained = {index: atoms for index, atoms in zip(order, st.training_atoms)}
    indices = order if applied_only else list(range(st.oracle_calls))
    frames = []
    for i in indices:
        lab = rd.read_label(i)
        atoms = lab.atoms()
        results = {"forces": np.asarray(lab.forces)}
        if lab.energy is not None:
            results["energy"] = float(lab.energy)
        if lab.stress is not None:
            results["stress"] = np.asarray(lab.stress)
        mask = np.zeros(len(atoms), dtype=bool)
        mask[list(trained.get(i, ()))] = True
        atoms.arrays["training"] = mask
        if lab.predicted_forces is not None:
            atoms.arrays["model_forces"] = np.asarray(lab.predicted_forces)
        if lab.force_std is not None:
            atoms.arrays["model_force_std"] = np.asarray(lab.force_std)
        atoms.info.update(label=i, walker=lab.walker, step=lab.step, time_fs=lab.time_fs,
                          temperature_K=lab.temperature_K, model_version=lab.model_version,
                          oracle_worker=lab.worker, oracle_seconds=lab.oracle_seconds, applied=i in trained,
                          run=run_dir.name)
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def export_run(run_dir: str | Path, out: str | Path, applied_only: bool = False) -> int:
    from ase.io import write

    frames = run_frames(run_dir, applied_only)
    if not frames:
        raise InvalidInput(f"{run_dir}: the run has no labels yet")
    write(str(out), frames, format="extxyz")
    return len(frames)


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write every oracle label of a run as extended XYZ",
                       description="Every label of a run directory with the oracle's energy (eV), forces (eV/Å) "
                       "and stress (eV/Å³); per atom whether it entered the training set ('training') and the "
                       "old model's forces and σ at that frame ('model_forces', 'model_force_std', eV/Å); walker, "
                       "step, time (fs) and temperature (K) in each frame's info.\n\n"
                       "example (then retrain on the labels):\n"
                       "  epicycle export runs/melt --xyz melt_labels.xyz\n"
                       "  epicycle fit melt_labels.xyz --cutoffs 6.0,4.0 --out melt_gp.npz")
    p.add_argument("run_dir", type=Path, help="the run directory (runs/<name>-<time>/)")
    p.add_argument("--xyz", type=Path, required=True, metavar="OUT", help="extended XYZ file to write")
    p.add_argument("--applied-only", action="store_true",
                   help="only the labels already in the model (not those written after its last update)")
    p.set_defaults(func=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    n = export_run(args.run_dir, args.xyz, args.applied_only)
    print(f"{n} labelled frame(s) written to {args.xyz}")
    return 0
