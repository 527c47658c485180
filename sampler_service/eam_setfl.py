"""A reference EAM for aluminium, tabulated as a LAMMPS ``eam/alloy`` (DYNAMO setfl) file.

Used as the classical yardstick of the production-MD benchmark and tests (issue 15): the cost of
a mapped Epicycle model in LAMMPS is compared with an EAM in the same run.  The file is generated
at run time from the analytic form below (never committed).

Form: the generalized EAM of X. W. Zhou, R. A. Johnson and H. N. G. Wadley,
"Misfit-energy-increasing dislocations in vapor-deposited CoFe/NiFe multilayers",
Phys. Rev. B 69, 144113 (2004), Eqs. (1)–(5)::

    E     = Σ_i F(ρ_i) + ½ Σ_i Σ_{j≠i} φ(r_ij),        ρ_i = Σ_{j≠i} f(r_ij)

    φ(r)  = A exp[−α(r/r_e − 1)] / (1 + (r/r_e − κ)^20)  −  B exp[−β(r/r_e − 1)] / (1 + (r/r_e − λ)^20)
    f(r)  = f_e exp[−β(r/r_e − 1)] / (1 + (r/r_e − λ)^20)

    F(ρ)  = Σ_{i=0..3} F_ni (ρ/ρ_n − 1)^i                 ρ <  ρ_n = 0.85 ρ_e
          = Σ_{i=0..3} F_i  (ρ/ρ_e − 1)^i                 ρ_n ≤ ρ < ρ_0 = 1.15 ρ_e
          = F_e [1 − ln((ρ/ρ_s)^η)] (ρ/ρ_s)^η            ρ_0 ≤ ρ

Parameters for Al (Table III of the paper; the same numbers are in the LAMMPS
``tools/eam_database`` of X. W. Zhou): r_e = 2.863924 Å, f_e = 1.403115, ρ_e = 20.418205,
ρ_s = 23.195740, α = 6.613165, β = 3.527021, A = 0.314873 eV, B = 0.365551 eV, κ = 0.379846,
λ = 0.759692, F_n0..F_n3 = −2.807602, −0.301435, 1.258562, −1.247604 eV,
F_0..F_3 = −2.83, 0, 0.622245, −2.488244 eV, η = 0.785902, F_e = −2.824528 eV.
The Al set was fitted to the fcc lattice constant a0 = √2 r_e = 4.05 Å and the cohesive energy
3.58 eV/atom of Johnson's EAM tables (Phys. Rev. B 39, 12554 (1989)); :func:`fcc_energy_per_atom`
evaluates the analytic form directly (4.050 Å, 3.580 eV).

Tabulation (the conventions of LAMMPS ``pair_style eam/alloy``): F on ρ_k = k Δρ, f and r·φ on
r_k = k Δr, k = 0..N−1, cut-off r_c = √10/2 · a0 ≈ 6.40 Å (as Zhou's own generator; φ(r_c)
and f(r_c) are < 1e-5 of their values at r_e).  Below r = 0.5 Å the functions are held at their
r = 0.5 Å values (never reached in MD).  LAMMPS interpolates the tables with cubic splines; the
tabulation error of energies with the default 2,000 points is < 1e-6 eV/atom (see the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.errors import InvalidInput


@dataclass(frozen=True)
class ZhouEAMParameters:
    """One element of the Zhou–Johnson–Wadley (2004) EAM (units: Å, eV; densities arbitrary)."""

    symbol: str
    number: int
    mass: float               # amu
    re: float                 # Å
    fe: float
    rhoe: float
    rhos: float
    alpha: float
    beta: float
    A: float                  # eV
    B: float                  # eV
    kappa: float
    lam: float
    Fn: tuple[float, float, float, float]   # eV
    F: tuple[float, float, float, float]    # eV
    eta: float
    Fe: float                 # eV
    rho_low: float = 0.85     # ρ_n / ρ_e
    rho_high: float = 1.15    # ρ_0 / ρ_e

    @property
    def a0(self) -> float:
        """fcc lattice constant √2 r_e, Å."""
        return math.sqrt(2.0) * self.re


#: Al of Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004)
ZHOU_AL = ZhouEAMParameters(
    symbol="Al", number=13, mass=26.981539, re=2.863924, fe=1.403115, rhoe=20.418205, rhos=23.195740,
    alpha=6.613165, beta=3.527021, A=0.314873, B=0.365551, kappa=0.379846, lam=0.759692,
    Fn=(-2.807602, -0.301435, 1.258562, -1.247604), F=(-2.83, 0.0, 0.622245, -2.488244),
    eta=0.785902, Fe=-2.824528,
)

#: the fcc Al values the potential was fitted to: a0 (Å), cohesive energy (eV/atom)
AL_FITTED = {"a0": 4.05, "cohesive_energy": 3.58}


def pair(p: ZhouEAMParameters, r: np.ndarray) -> np.ndarray:
    """φ(r), eV (r in Å)."""
    x = np.asarray(r, dtype=np.float64) / p.re
    return (p.A * np.exp(-p.alpha * (x - 1.0)) / (1.0 + (x - p.kappa) ** 20)
            - p.B * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20))


def density(p: ZhouEAMParameters, r: np.ndarray) -> np.ndarray:
    """f(r), the density an atom contributes at distance r (Å)."""
    x = np.asarray(r, dtype=np.float64) / p.re
    return p.fe * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20)


def embedding(p: ZhouEAMParameters, rho: np.ndarray) -> np.ndarray:
    """F(ρ), eV (continuous at ρ_n and ρ_0 to the precision of the published parameters)."""
    rho = np.asarray(rho, dtype=np.float64)
    rn, r0 = p.rho_low * p.rhoe, p.rho_high * p.rhoe
    low = sum(c * (rho / rn - 1.0) ** i for i, c in enumerate(p.Fn))
    mid = sum(c * (rho / p.rhoe - 1.0) ** i for i, c in enumerate(p.F))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (np.maximum(rho, 1e-300) / p.rhos) ** p.eta
        high = p.Fe * (1.0 - np.log(s)) * s
    return np.where(rho < rn, low, np.where(rho < r0, mid, high))


def default_cutoff(p: ZhouEAMParameters) -> float:
    """√10/2 · a0, Å (between the 4th and 5th fcc neighbour shells)."""
    return math.sqrt(10.0) / 2.0 * p.a0


def fcc_energy_per_atom(p: ZhouEAMParameters, a: float, cutoff: float | None = None) -> float:
    """Energy per atom (eV) of the perfect fcc crystal with lattice constant ``a`` (Å), summed
    directly from the analytic functions over all neighbours within ``cutoff``."""
    rc = default_cutoff(p) if cutoff is None else cutoff
    n = int(math.ceil(rc / a)) + 1
    rng = np.arange(-n, n + 1)
    cells = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), axis=-1).reshape(-1, 3)
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    pts = (cells[:, None, :] + basis[None, :, :]).reshape(-1, 3) * a
    r = np.linalg.norm(pts, axis=1)
    r = r[(r > 1e-9) & (r < rc)]
    return float(embedding(p, density(p, r).sum()) + 0.5 * pair(p, r).sum())


def write_setfl(path: str | Path, params: ZhouEAMParameters = ZHOU_AL, nr: int = 2000, nrho: int = 2000,
                cutoff: float | None = None) -> Path:
    """Write a one-element ``eam/alloy`` setfl file for ``params``; return its path.

    LAMMPS: ``pair_style eam/alloy`` + ``pair_coeff * * PATH Al``.
    """
    if nr < 5 or nrho < 5:
        raise InvalidInput(f"setfl tables need at least 5 points (got nr={nr}, nrho={nrho})")
    p = params
    rc = default_cutoff(p) if cutoff is None else float(cutoff)
    if not (math.isfinite(rc) and rc > p.re):
        raise InvalidInput(f"EAM cut-off must be a number of Å above r_e = {p.re} Å, got {cutoff!r}")
    dr = rc / (nr - 1)
    r = np.arange(nr) * dr
    r_eval = np.maximum(r, 0.5)
    f = density(p, r_eval)
    rphi = r * pair(p, r_eval)
    rho_max = max(float(f.max()), 2.0 * p.rhoe, 100.0)  # as Zhou's generator: ρ up to ≥ 100
    drho = rho_max / (nrho - 1)
    F = embedding(p, np.arange(nrho) * drho)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def block(values: np.ndarray) -> str:
        rows = [" ".join(f"{v:.16e}" for v in values[i:i + 5]) for i in range(0, len(values), 5)]
        return "\n".join(rows) + "\n"

    header = (
        f"EAM {p.symbol}: Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004), analytic form\n"
        "tabulated by Epicycle sampler_service/eam_setfl.py (units: Angstrom, eV)\n"
        f"nr={nr} nrho={nrho} cutoff={rc:.6f} A\n"
        f"1 {p.symbol}\n"
        f"{nrho} {drho:.16e} {nr} {dr:.16e} {rc:.16e}\n"
        f"{p.number} {p.mass} {p.a0:.6f} fcc\n"
    )
    path.write_text(header + block(F) + block(f) + block(rphi))
    return path


__all__ = ["ZhouEAMParameters", "ZHOU_AL", "AL_FITTED", "pair", "density", "embedding", "default_cutoff",
           "fcc_energy_per_atom", "write_setfl"]
