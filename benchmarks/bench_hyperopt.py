"""Hyperparameters that generalise (issue 13): cost and generalisation of ML-II vs MAP (prints tables).

Part 1, cost (``--sizes``, default 100,200,500 force environments of 32-atom FCC Al, ±5 % uniform
displacements, EMT labels via ``learner_service.datasets.perturbed_fcc_al``, r2 = 6 Å, r3 = 4 Å,
start at the default hyperparameters ``learner_service.defaults``): CPU seconds (process_time,
this process) of

* one log-likelihood + gradient evaluation (``GaussianProcess.log_likelihood(gradient=True)`` at
  new length scales: kernels and dK/dθ rebuilt; median of ``--repeats``),
* the old optimiser, ``GaussianProcess.optimize(max_iterations=10)`` (ML-II, flat L-BFGS-B over
  log θ, every evaluation rebuilds K and dK/dθ) with its evaluation count,
* the new MAP search with restarts, ``model_selection.map_optimize`` (data prior, 3 prior draws +
  prior centre + start values, length scales on a 120-environment subset above 120),

and the force RMSE (eV/Å) of each on 10 held-out frames.

Part 2, generalisation (seed 004 Fig. 2b style): EMT Al (32-atom FCC, ±5 %, r2 = 6, r3 = 4 Å) and
EMT Cu3Au (L1_2, a = 3.75 Å, 2x2x2 cubic cells = 32 atoms, ±5 %, r2 = 5.5, r3 = 4 Å), training
sets of 1, 2, 4, 8 frames (all atoms), 20 test frames (other seeds).  Test force RMSE of
(i) ML-II (the nested search with ``prior="none"``, restarts, the highest likelihood kept:
``selection="objective"``), (ii) MAP + restarts + the selection rule as ``epicycle fit`` does it
(``map_optimize`` defaults: candidates scored by leave-one-frame-out cross-validation, the worst
held-out frame's RMSE; one frame: the start values), (iii) the start values, unoptimised; and the ratio
RMS(total σ) / RMSE (1 = σ on the scale of the errors).  Medians over ``--repeats`` seeds.

    python benchmarks/bench_hyperopt.py [--sizes 100,200,500] [--frames 1,2,4,8] [--repeats 3]
                                        [--skip-cost] [--skip-table] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner_service.datasets import perturbed_fcc_al  # noqa: E402
from learner_service.defaults import DEFAULT_HYPERPARAMETERS  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.model_selection import map_optimize, validation_metrics  # noqa: E402

AL_CUTOFFS = (6.0, 4.0)
CU3AU_CUTOFFS = (5.5, 4.0)


def cu3au_frames(n_frames: int, seed: int, delta: float = 0.05, a: float = 3.75) -> list:
    """L1_2 Cu3Au, 2x2x2 conventional cells (32 atoms), every coordinate displaced uniformly within
    ±delta·a, EMT energy/forces (SinglePointCalculator)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    cell = bulk("Cu", "fcc", a=a, cubic=True)
    cell.numbers[0] = 79  # the corner site: Au, the three face centres: Cu
    ideal = cell * (2, 2, 2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_frames):
        at = ideal.copy()
        at.positions = at.positions + rng.uniform(-delta * a, delta * a, at.positions.shape)
        at.calc = EMT()
        f, e = at.get_forces(), at.get_potential_energy()
        at.calc = SinglePointCalculator(at, energy=e, forces=f)
        out.append(at)
    return out


def frames_of(system: str, n: int, seed: int) -> list:
    return perturbed_fcc_al(n, seed=seed) if system == "Al" else cu3au_frames(n, seed)


def model(system: str) -> GaussianProcess:
    species = [13] if system == "Al" else [29, 79]
    cut = AL_CUTOFFS if system == "Al" else CU3AU_CUTOFFS
    return GaussianProcess(species, cut, dict(DEFAULT_HYPERPARAMETERS))


def test_set(frames):
    return [(f, range(len(f)), f.get_forces()) for f in frames]


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


# ---------------------------------------------------------------------------


def cost(sizes, repeats, log, skip_old=False):
    test = test_set(perturbed_fcc_al(10, seed=1001))
    rows = []
    for n in sizes:
        frames = perturbed_fcc_al(math.ceil(n / 32), seed=1000)

        def build():
            gp = model("Al")
            left = n
            for f in frames:
                k = min(32, left)
                gp.add_structure(f, forces=f.get_forces(), atom_indices=range(k))
                left -= k
            return gp

        gp = build()
        evals = []
        for r in range(repeats):
            gp.set_hyperparameters({"ls2": 1.0 + 0.01 * (r + 1)})
            evals.append(cpu(lambda: gp.log_likelihood(gradient=True))[1])
        one = statistics.median(evals)
        start_rmse = validation_metrics(build(), test)["rmse"]
        old = build()
        if skip_old:
            res_old, t_old, rmse_old = None, math.nan, math.nan
        else:
            res_old, t_old = cpu(lambda: old.optimize(max_iterations=10))
            rmse_old = validation_metrics(old, test)["rmse"]
        new = build()
        res_new, t_new = cpu(lambda: map_optimize(new, prior="data", restarts=3, seed=0))
        rmse_new = validation_metrics(new, test)["rmse"]
        row = {"part": "cost", "environments": n, "lml_grad_cpu_s": one, "old_cpu_s": t_old,
               "old_evaluations": res_old.evaluations if res_old else None,
               "old_converged": res_old.converged if res_old else None,
               "old_warnings": list(res_old.warnings) if res_old else [], "old_rmse": rmse_old, "map_cpu_s": t_new,
               "map_kernel_builds": res_new.kernel_builds, "map_kernel_cpu_s": res_new.kernel_cpu_seconds,
               "map_inner_evaluations": res_new.inner_evaluations, "map_converged": res_new.converged,
               "map_warnings": list(res_new.warnings), "map_rmse": rmse_new, "start_rmse": start_rmse,
               "map_hyperparameters": res_new.hyperparameters, "map_gradient_norm": res_new.gradient_norm,
               "old_hyperparameters": res_old.hyperparameters if res_old else None}
        rows.append(row)
        log(f"N={n:5d}  lml+grad {one:6.2f} s | old optimize(10 it) {t_old:7.1f} s, "
            f"{res_old.evaluations if res_old else '-'} evals, "
            f"RMSE {rmse_old:.5f} | MAP+restarts {t_new:6.1f} s ({res_new.kernel_builds} kernel builds, "
            f"{res_new.kernel_cpu_seconds:.1f} s in kernels, {res_new.inner_evaluations} inner evals), "
            f"RMSE {rmse_new:.5f} | start values RMSE {start_rmse:.5f} eV/Å")
        for w in (res_old.warnings if res_old else ()):
            log(f"          old: WARNING {w}")
        for w in res_new.warnings:
            log(f"          MAP: WARNING {w}")
    return rows


def generalisation(system, n_frames, seed, log):
    train = frames_of(system, n_frames, seed)
    test = test_set(frames_of(system, 20, 10_000 + seed))
    out = {}

    def full():
        gp = model(system)
        for f in train:
            gp.add_structure(f, forces=f.get_forces())
        return gp

    def score(gp, t):
        m = validation_metrics(gp, test)
        return {"rmse": m["rmse"], "sigma_ratio": m["rms_sigma"] / m["rmse"], "cpu_s": t,
                "hyperparameters": {k: gp.hyperparameters[k] for k in gp.hyperparameter_names}}

    fixed = full()
    out["fixed"] = score(fixed, 0.0)
    ml = full()
    _, t = cpu(lambda: map_optimize(ml, prior="none", restarts=3, seed=seed, selection="objective"))
    out["ml2"] = score(ml, t)
    # MAP as `epicycle fit` does it: all frames, the selection rule inside map_optimize (every
    # candidate scored by leave-one-frame-out cross-validation, worst frame RMSE)
    gp = full()
    res, t = cpu(lambda: map_optimize(gp, prior="data", restarts=3, seed=seed))
    out["map"] = score(gp, t)
    out["map"]["selected"] = res.selected
    log(f"  {system:5s} {n_frames} frames seed {seed}: RMSE fixed {out['fixed']['rmse']:.4f}  ML-II "
        f"{out['ml2']['rmse']:.4f}  MAP {out['map']['rmse']:.4f} eV/Å ({res.selected}); σ/RMSE "
        f"{out['fixed']['sigma_ratio']:.2f} / {out['ml2']['sigma_ratio']:.2f} / {out['map']['sigma_ratio']:.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100,200,500")
    p.add_argument("--frames", default="1,2,4,8")
    p.add_argument("--systems", default="Al,Cu3Au")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-old", action="store_true", help="cost part without the old optimiser")
    p.add_argument("--json", help="append every result as a JSON line to this file")
    args = p.parse_args(argv)

    def log(s):
        print(s, flush=True)

    def record(row):
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    # warm the JIT (compile once, not counted)
    warm = model("Al")
    f = perturbed_fcc_al(1, seed=5)[0]
    warm.add_structure(f, forces=f.get_forces(), atom_indices=range(4))
    warm.log_likelihood(gradient=True)
    warm.predict(f)
    if not args.skip_cost:
        log("== cost (CPU seconds, process_time) ==")
        for row in cost([int(x) for x in args.sizes.split(",")], args.repeats, log, args.skip_old):
            record(row)
    if not args.skip_table:
        log("== generalisation: test force RMSE (eV/Å) on 20 frames, medians over seeds ==")
        for system in args.systems.split(","):
            for n in [int(x) for x in args.frames.split(",")]:
                runs = [generalisation(system, n, seed, log) for seed in range(args.repeats)]
                med = {k: {m: statistics.median(r[k][m] for r in runs) for m in ("rmse", "sigma_ratio", "cpu_s")}
                       for k in ("fixed", "ml2", "map")}
                ratio_ml = statistics.median(r["map"]["rmse"] / r["ml2"]["rmse"] for r in runs)
                ratio_fx = statistics.median(r["map"]["rmse"] / r["fixed"]["rmse"] for r in runs)
                log(f"| {system} | {n} | {med['ml2']['rmse']:.4f} | {med['map']['rmse']:.4f} | "
                    f"{med['fixed']['rmse']:.4f} | {ratio_ml:.2f} | {ratio_fx:.2f} | "
                    f"{med['ml2']['sigma_ratio']:.2f} / {med['map']['sigma_ratio']:.2f} / "
                    f"{med['fixed']['sigma_ratio']:.2f} | {med['ml2']['cpu_s']:.1f} / {med['map']['cpu_s']:.1f} |")
                record({"part": "table", "system": system, "frames": n, "runs": runs, "median": med,
                        "map_over_ml2": ratio_ml, "map_over_fixed": ratio_fx})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
