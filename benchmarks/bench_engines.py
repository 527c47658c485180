"""Per-step wall time of the MD engines with in-process EMT forces.

    python benchmarks/bench_engines.py [--atoms 32 1000] [--engines builtin lammps] [--steps N]

Reports ms/step for each engine and ensemble, with EMT forces and with a zero-force
provider (the engine's own overhead).  EMT is ASE's pure-Python EMT, so with it
the force evaluation dominates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from sampler_service.engine_registry import create_engine
from sampler_service.force_providers import AseCalculatorProvider, ForceResult
from sampler_service.settings import SamplerSettings


class ZeroForces:
    """A provider returning zero forces instantly: measures engine overhead."""

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        return ForceResult(0.0, np.zeros_like(positions))


def cu_cell(n_atoms: int):
    """FCC Cu with 4·a·b·c ≈ n_atoms atoms, as cubic as possible (exact when n_atoms/4 factorises)."""
    cells = max(1, round(n_atoms / 4))
    best = min(((a, b, cells // (a * b)) for a in range(1, cells + 1) for b in range(a, cells + 1)
                if cells % a == 0 and (cells // a) % b == 0 and cells // (a * b) >= b),
               key=lambda r: max(r) / min(r))
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(best)


def time_engine(engine: str, ensemble: str, atoms, provider, steps: int) -> float:
    s = SamplerSettings(engine=engine, ensemble=ensemble, timestep_fs=2.0, initial_temperature_K=300.0, seed=1)
    e = create_engine(s, provider, atoms)
    try:
        e.run(2, frame_interval=0)
        t = time.perf_counter()
        e.run(steps, frame_interval=0)
        return (time.perf_counter() - t) / steps
    finally:
        e.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, nargs="+", default=[32, 1000])
    p.add_argument("--engines", nargs="+", default=["builtin", "lammps"])
    p.add_argument("--ensembles", nargs="+", default=["nve", "nvt_langevin"])
    p.add_argument("--steps", type=int, default=0, help="steps per measurement (default: ~3 s of EMT)")
    args = p.parse_args(argv)
    print(f"{'atoms':>6} {'engine':8} {'ensemble':13} {'EMT ms/step':>12} {'zero-force ms/step':>19}")
    for n in args.atoms:
        atoms = cu_cell(n)
        steps = args.steps or max(10, int(600 / len(atoms)))
        for engine in args.engines:
            for ens in args.ensembles:
                t_emt = time_engine(engine, ens, atoms, AseCalculatorProvider(EMT()), steps)
                t_zero = time_engine(engine, ens, atoms, ZeroForces(), 10 * steps)
                print(f"{len(atoms):6d} {engine:8} {ens:13} {t_emt * 1e3:12.3f} {t_zero * 1e3:19.3f}")


if __name__ == "__main__":
    main()
