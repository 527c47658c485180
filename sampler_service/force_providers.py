"""Where forces come from: the :class:`ForceProvider` protocol.

MD engines never know where forces come from.  A provider turns a
configuration into a :class:`ForceResult`: the GP learner over its gRPC
stream (with per-component σ), an ASE calculator (σ = None) for tests and
benchmarks, or the oracle's DFT labels supplied for one step after an
uncertainty stop.

Units: positions and cell Å, energy eV, forces and σ eV/Å, stress eV/Å³ in
ASE Voigt order ``(xx, yy, zz, yz, xz, xy)`` and ASE sign (compressed cell →
negative stress).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
from ase import Atoms

from protos.errors import CalculationFailed, InvalidInput


@dataclass(frozen=True)
class ForceResult:
    """Energy, forces and uncertainties for one configuration.

    energy: eV (``None`` if the provider has none; the energy observables are then NaN)
    forces: (n, 3) eV/Å
    stress: (6,) eV/Å³ Voigt, or ``None`` (needed only by barostats)
    force_std: (n, 3) eV/Å epistemic σ per force component, or ``None`` (never gates)
    atom_std: (n,) eV/Å rotation-invariant epistemic σ of each atom's force (sqrt of the
      largest eigenvalue of its 3×3 posterior covariance), or ``None`` when the provider
      has only component σ; the threshold is applied to :attr:`atom_sigma`
    noise: σn of the model, eV/Å, or ``None``
    model_version: version of the model that made the prediction (−1: not a model, e.g. DFT)
    """

    energy: float | None
    forces: np.ndarray
    stress: np.ndarray | None = None
    force_std: np.ndarray | None = None
    noise: float | None = None
    model_version: int = -1
    atom_std: np.ndarray | None = None

    def checked(self, n_atoms: int, where: str = "force provider") -> "ForceResult":
        """This result with arrays as float64, after checking shapes and finiteness.

        Raises :class:`CalculationFailed` (a provider returned garbage) with a
        message naming the field.
        """
        forces = np.array(self.forces, dtype=np.float64, copy=True)
        if forces.shape != (n_atoms, 3):
            raise CalculationFailed(f"{where} returned forces of shape {forces.shape}, expected ({n_atoms}, 3)")
        if not np.all(np.isfinite(forces)):
            raise CalculationFailed(f"{where} returned non-finite forces")
        std = None
        if self.force_std is not None:
            std = np.array(self.force_std, dtype=np.float64, copy=True)
            if std.shape != (n_atoms, 3):
                raise CalculationFailed(
                    f"{where} returned force_std of shape {std.shape}, expected ({n_atoms}, 3)"
                )
            if not np.all(np.isfinite(std)) or np.any(std < 0):
                raise CalculationFailed(f"{where} returned negative or non-finite force_std")
        atom_std = None
        if self.atom_std is not None:
            atom_std = np.array(self.atom_std, dtype=np.float64, copy=True)
            if atom_std.shape != (n_atoms,):
                raise CalculationFailed(f"{where} returned atom_std of shape {atom_std.shape}, expected ({n_atoms},)")
            if not np.all(np.isfinite(atom_std)) or np.any(atom_std < 0):
                raise CalculationFailed(f"{where} returned negative or non-finite atom_std")
        stress = None
        if self.stress is not None:
            stress = np.array(self.stress, dtype=np.float64, copy=True)
            if stress.shape == (3, 3):
                stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            if stress.shape != (6,) or not np.all(np.isfinite(stress)):
                raise CalculationFailed(f"{where} returned a stress of shape {stress.shape} or non-finite")
        energy = None if self.energy is None else float(self.energy)
        if energy is not None and not np.isfinite(energy):
            raise CalculationFailed(f"{where} returned a non-finite energy")
        noise = None if self.noise is None else float(self.noise)
        return ForceResult(energy, forces, stress, std, noise, int(self.model_version), atom_std)

    @property
    def atom_sigma(self) -> np.ndarray | None:
        """(n,) eV/Å: the σ of each atom the threshold is applied to (see :func:`per_atom_sigma`)."""
        return per_atom_sigma(self.atom_std, self.force_std)

    @property
    def max_std(self) -> float | None:
        """Largest :attr:`atom_sigma`, eV/Å (``None`` without σ)."""
        s = self.atom_sigma
        return None if s is None else float(np.max(s, initial=0.0))


def per_atom_sigma(atom_std: np.ndarray | None, force_std: np.ndarray | None) -> np.ndarray | None:
    """(n,) eV/Å: the rotation-invariant ``atom_std`` when the provider gave it, else the
    largest component σ of each atom (``force_std`` (n, 3); a lower bound of the invariant
    σ, which depends on the orientation), else ``None``."""
    if atom_std is not None:
        return np.asarray(atom_std, dtype=np.float64)
    if force_std is not None:
        return np.max(np.asarray(force_std, dtype=np.float64), axis=1, initial=0.0)
    return None


@runtime_checkable
class ForceProvider(Protocol):
    """Anything that predicts forces (and optionally σ) for a configuration."""

    def compute(
        self, positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray, pbc: np.ndarray
    ) -> ForceResult:
        """positions (n, 3) Å, cell (3, 3) Å (rows are lattice vectors), numbers (n,), pbc (3,) bool."""
        ...


class AseCalculatorProvider:
    """Adapter: any ASE calculator as a :class:`ForceProvider` (σ = None).

    ``model_version`` is reported as given (default 0).  Stress is requested
    only if the calculator implements it and ``stress=True``.
    """

    def __init__(self, calculator, stress: bool = True, model_version: int = 0) -> None:
        self.calculator = calculator
        self.want_stress = bool(stress) and "stress" in getattr(calculator, "implemented_properties", ())
        self.model_version = model_version
        self.calls = 0

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        atoms.calc = self.calculator
        self.calls += 1
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=True) if self.want_stress else None
        return ForceResult(energy=energy, forces=forces, stress=stress, model_version=self.model_version)


#: sigma_fn(positions (n,3) Å, cell, numbers) -> σ (n, 3) eV/Å
SigmaFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class SigmaFunctionProvider:
    """A provider whose forces come from ``base`` and whose σ from ``sigma_fn``.

    For benchmarks, demos and deterministic tests of uncertainty gating: e.g.
    EMT forces plus σ growing with each atom's distance from its starting
    site, so the threshold crossing is a reproducible function of the
    trajectory.  ``noise`` (σn) and ``model_version`` are reported as given.
    """

    def __init__(self, base: ForceProvider, sigma_fn: SigmaFunction, noise: float | None = None,
                 model_version: int | None = None) -> None:
        self.base = base
        self.sigma_fn = sigma_fn
        self.noise = noise
        self.model_version = model_version

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        r = self.base.compute(positions, cell, numbers, pbc)
        std = np.asarray(self.sigma_fn(positions, cell, numbers), dtype=np.float64)
        return ForceResult(
            energy=r.energy, forces=r.forces, stress=r.stress, force_std=std,
            noise=self.noise if self.noise is not None else r.noise,
            model_version=self.model_version if self.model_version is not None else r.model_version,
        )


def displacement_sigma(reference_positions: np.ndarray, scale: float = 1.0, floor: float = 0.0) -> SigmaFunction:
    """σ_iα = floor + scale·|u_iα| with u the minimum-image displacement from ``reference_positions``.

    A deterministic stand-in for a GP's epistemic uncertainty (it grows as
    atoms leave the environments "seen" at the start).
    """
    ref = np.array(reference_positions, dtype=np.float64, copy=True)

    def sigma(positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        d = np.asarray(positions) - ref
        cell = np.asarray(cell, dtype=np.float64)
        if abs(np.linalg.det(cell)) > 1e-12:
            frac = np.linalg.solve(cell.T, d.T).T
            frac -= np.round(frac)
            d = frac @ cell
        return floor + scale * np.abs(d)

    return sigma


def validate_structure(positions, numbers, cell, pbc, masses=None, velocities=None) -> tuple[np.ndarray, ...]:
    """Check a structure given to an engine; return float64/int arrays.

    Raises :class:`InvalidInput` naming what is wrong (shape, NaN, unknown
    element, singular periodic cell, non-positive mass).
    """
    from ase.data import atomic_masses

    positions = np.array(positions, dtype=np.float64, copy=True)
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise InvalidInput(f"structure positions must have shape (n_atoms ≥ 1, 3), got {positions.shape}")
    n = positions.shape[0]
    if not np.all(np.isfinite(positions)):
        bad = np.unique(np.argwhere(~np.isfinite(positions))[:, 0])
        raise InvalidInput(f"structure positions contain NaN or inf (atoms {bad[:10].tolist()})")
    numbers = np.array(numbers, copy=True)
    if numbers.shape != (n,) or not np.issubdtype(numbers.dtype, np.integer):
        raise InvalidInput(f"structure numbers must be {n} integers, got shape {numbers.shape} {numbers.dtype}")
    numbers = numbers.astype(np.int64)
    if np.any(numbers < 1) or np.any(numbers >= len(atomic_masses)):
        raise InvalidInput(f"structure has unknown atomic numbers {sorted(set(numbers[(numbers < 1) | (numbers >= len(atomic_masses))].tolist()))}")
    cell = np.array(cell, dtype=np.float64, copy=True)
    if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
        raise InvalidInput(f"structure cell must be a finite (3, 3) matrix, got shape {cell.shape}")
    pbc = np.array(pbc, dtype=bool).reshape(-1)
    if pbc.size == 1:
        pbc = np.repeat(pbc, 3)
    if pbc.shape != (3,):
        raise InvalidInput(f"structure pbc must be 3 booleans, got {pbc.shape}")
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-9:
        raise InvalidInput("structure cell is singular (zero volume) but pbc is set")
    if masses is None:
        masses = atomic_masses[numbers]
    masses = np.array(masses, dtype=np.float64, copy=True)
    if masses.shape != (n,) or not np.all(np.isfinite(masses)) or np.any(masses <= 0):
        raise InvalidInput("structure masses must be n positive finite numbers (amu)")
    if velocities is None:
        velocities = np.zeros((n, 3))
    velocities = np.array(velocities, dtype=np.float64, copy=True)
    if velocities.shape != (n, 3) or not np.all(np.isfinite(velocities)):
        raise InvalidInput(f"structure velocities must be a finite ({n}, 3) array (Å/fs)")
    return positions, numbers, cell, pbc, masses, velocities
