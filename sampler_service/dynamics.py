"""Pure numerical pieces of MD on NumPy arrays: kinetic energy, temperature,
Maxwell–Boltzmann velocities, thermostat/barostat factors, wrapping.

Units: masses amu, velocities Å/fs, energies eV, temperatures K, forces
eV/Å, pressure eV/Å³ (GPa only at the settings boundary).
"""

from __future__ import annotations

import math

import numpy as np
from ase import units

#: eV/(Å·amu) → Å/fs²  (a = F/m · ACCEL)
ACCEL: float = units.fs**2
#: amu·(Å/fs)² → eV
KINETIC: float = 1.0 / units.fs**2
KB: float = units.kB  # eV/K


def kinetic_energy(masses: np.ndarray, velocities: np.ndarray) -> float:
    """Σ ½ m v², eV.  masses (n,) amu, velocities (n, 3) Å/fs."""
    return 0.5 * KINETIC * float(np.dot(masses, np.einsum("ij,ij->i", velocities, velocities)))


def com_kinetic_energy(masses: np.ndarray, velocities: np.ndarray) -> float:
    """Kinetic energy of the centre-of-mass motion, eV."""
    p = masses @ velocities
    return 0.5 * KINETIC * float(p @ p) / float(masses.sum())


def degrees_of_freedom(n_atoms: int, conserves_momentum: bool) -> int:
    """3N, or 3N − 3 when the total momentum is a constant of motion (at least 1)."""
    return max(1, 3 * n_atoms - (3 if conserves_momentum and n_atoms > 1 else 0))


def internal_kinetic_energy(masses, velocities, conserves_momentum: bool) -> float:
    """Kinetic energy that enters the temperature: without the COM part when momentum is conserved."""
    ke = kinetic_energy(masses, velocities)
    if conserves_momentum and len(masses) > 1:
        ke -= com_kinetic_energy(masses, velocities)
    return ke


def temperature(masses: np.ndarray, velocities: np.ndarray, conserves_momentum: bool) -> float:
    """Instantaneous kinetic temperature, K, with the right number of degrees of freedom.

    With momentum conserved: T = 2 (K − K_com) / ((3N − 3) k_B); otherwise T = 2K / (3N k_B).
    """
    dof = degrees_of_freedom(len(masses), conserves_momentum)
    return 2.0 * internal_kinetic_energy(masses, velocities, conserves_momentum) / (dof * KB)


def maxwell_boltzmann(
    masses: np.ndarray,
    temperature_K: float,
    rng: np.random.Generator,
    zero_momentum: bool = True,
    exact: bool = False,
) -> np.ndarray:
    """Velocities (n, 3) Å/fs drawn from Maxwell–Boltzmann at ``temperature_K``.

    ``zero_momentum`` removes the centre-of-mass velocity; ``exact`` then rescales
    so that :func:`temperature` (3N − 3 dof if ``zero_momentum`` else 3N) is
    exactly ``temperature_K``.
    """
    masses = np.asarray(masses, dtype=np.float64)
    n = len(masses)
    if temperature_K <= 0:
        return np.zeros((n, 3))
    sigma = np.sqrt(KB * temperature_K / (masses * KINETIC))  # Å/fs
    v = rng.standard_normal((n, 3)) * sigma[:, None]
    if zero_momentum and n > 1:
        v -= (masses @ v) / masses.sum()
    if exact:
        t = temperature(masses, v, conserves_momentum=zero_momentum)
        if t > 0:
            v *= math.sqrt(temperature_K / t)
    return v


def rescale_to_temperature(masses, velocities, temperature_K: float, conserves_momentum: bool) -> np.ndarray:
    """Velocities scaled so that :func:`temperature` is ``temperature_K`` (unchanged if T = 0 now)."""
    t = temperature(masses, velocities, conserves_momentum)
    if t <= 0:
        return velocities.copy()
    return velocities * math.sqrt(temperature_K / t)


def berendsen_lambda(current_K: float, target_K: float, dt_fs: float, taut_fs: float) -> float:
    """Berendsen velocity scale λ = sqrt(1 + Δt/τ (T₀/T − 1)), clipped to [0.9, 1.1] like ASE."""
    if current_K <= 0:
        return 1.0
    lam = math.sqrt(max(0.0, 1.0 + dt_fs / taut_fs * (target_K / current_K - 1.0)))
    return min(max(lam, 0.9), 1.1)


def csvr_alpha(kinetic_eV: float, target_K: float, dof: int, dt_fs: float, taut_fs: float,
               rng: np.random.Generator) -> float:
    """Velocity scale of canonical sampling through velocity rescaling (Bussi et al. 2007, Eq. A7).

    ``kinetic_eV``: current kinetic energy of the ``dof`` thermalised degrees of freedom.
    Draws one normal and one χ²(dof−1) number from ``rng``.
    """
    if kinetic_eV <= 0:
        return 1.0
    sigma = 0.5 * dof * KB * target_K  # target kinetic energy
    c = math.exp(-dt_fs / taut_fs)
    r1 = float(rng.standard_normal())
    s = float(rng.chisquare(dof - 1)) if dof > 1 else 0.0
    k_new = (
        kinetic_eV
        + (1.0 - c) * (sigma * (s + r1 * r1) / dof - kinetic_eV)
        + 2.0 * r1 * math.sqrt(kinetic_eV * sigma / dof * (1.0 - c) * c)
    )
    return math.sqrt(max(k_new, 0.0) / kinetic_eV)


def langevin_o_step(velocities, masses, target_K: float, friction: float, dt_fs: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Exact Ornstein–Uhlenbeck update over ``dt_fs``: v ← c v + sqrt(1−c²) sqrt(kT/m) ξ, c = e^{−γΔt}."""
    c = math.exp(-friction * dt_fs)
    sigma = np.sqrt(KB * target_K / (masses * KINETIC))
    xi = rng.standard_normal(velocities.shape)
    return c * velocities + math.sqrt(max(0.0, 1.0 - c * c)) * sigma[:, None] * xi


def pressure(stress_voigt: np.ndarray, kinetic_eV: float, volume: float) -> float:
    """Instantaneous pressure, eV/Å³: −tr(σ)/3 + 2K/(3V) (ASE stress sign)."""
    return -float(np.sum(stress_voigt[:3])) / 3.0 + 2.0 * kinetic_eV / (3.0 * volume)


def berendsen_mu(pressure_eVA3: float, target_eVA3: float, compressibility_per_eVA3: float,
                 dt_fs: float, taup_fs: float) -> float:
    """Isotropic Berendsen scale μ = 1 − β Δt/(3 τ_P) (P₀ − P) for positions and cell (as ASE)."""
    return 1.0 - dt_fs / taup_fs * compressibility_per_eVA3 / 3.0 * (target_eVA3 - pressure_eVA3)


def wrap(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions wrapped into the cell along periodic directions, and the integer image shifts.

    Returns (wrapped (n, 3), shift (n, 3) int) with positions = wrapped + shift @ cell.
    """
    if not np.any(pbc):
        return positions, np.zeros(positions.shape, dtype=np.int64)
    frac = np.linalg.solve(cell.T, positions.T).T
    shift = np.floor(frac).astype(np.int64)
    shift[:, ~np.asarray(pbc, dtype=bool)] = 0
    if not shift.any():
        return positions, shift
    return positions - shift @ cell, shift
