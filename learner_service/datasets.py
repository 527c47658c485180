"""Reproducible small datasets for tests and benchmarks.

:func:`perturbed_fcc_al` is the benchmark set of seed 004 Fig. 2 (32-atom FCC Al
supercells with random displacements) labelled by ASE's EMT; the FLARE reference
harness uses the same function so both codes see identical data.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = ["perturbed_fcc_al", "training_selection"]


def perturbed_fcc_al(
    n_frames: int,
    seed: int = 0,
    delta: float = 0.05,
    a: float = 4.05,
    repeat: int = 2,
    label: bool = True,
) -> list[Atoms]:
    """``n_frames`` FCC aluminium cells (``repeat``^3 conventional cells, 32 atoms for 2).

    Every Cartesian coordinate of every atom is displaced by a uniform random amount
    in ``[-delta*a, +delta*a]`` (Å), drawn from ``numpy.random.default_rng(seed)`` frame
    after frame (x, y, z of atom 0, then atom 1, ...).  With ``label`` each frame
    carries a SinglePointCalculator with EMT energy (eV), forces (eV/Å) and stress
    (eV/Å^3, ASE Voigt order).
    """
    rng = np.random.default_rng(seed)
    ideal = bulk("Al", "fcc", a=a, cubic=True) * (repeat, repeat, repeat)
    frames = []
    for _ in range(n_frames):
        atoms = ideal.copy()
        atoms.positions = atoms.positions + rng.uniform(-delta * a, delta * a, size=atoms.positions.shape)
        if label:
            atoms.calc = EMT()
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            stress = atoms.get_stress()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        frames.append(atoms)
    return frames


def training_selection(n_environments: int, atoms_per_frame: int = 32) -> list[tuple[int, list[int]]]:
    """Which (frame, atom indices) make up the first ``n_environments`` training environments:
    frames in order, all atoms of a frame in index order."""
    out = []
    frame = 0
    left = n_environments
    while left > 0:
        take = min(left, atoms_per_frame)
        out.append((frame, list(range(take))))
        left -= take
        frame += 1
    return out
