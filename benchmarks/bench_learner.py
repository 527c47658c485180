"""Learner benchmark (prints a table; not a test).

FCC aluminium, 32-atom cells (2x2x2 conventional, a = 4.05 Å), every coordinate displaced
by up to ±5 % of a (learner_service.datasets.perturbed_fcc_al, seed 0), EMT labels,
r2 = 6 Å, r3 = 4 Å, forces only, one process.  Training environments: frames in order,
all atoms of a frame (datasets.training_selection).  For 25/50/100/200 environments:

* covariance build (K_y and its Cholesky factor from scratch),
* one log-likelihood + analytic gradient evaluation at different length scales (no cache),
* a full hyperparameter optimisation (L-BFGS-B, from the fixed starting point below),
* prediction of forces + σ of all 32 atoms of an unseen cell, per atom.

Medians over repeats; numba JIT compilation is warmed up first and reported separately.

    python benchmarks/bench_learner.py [--sizes 25,50,100,200] [--repeats 3] [--no-optimize]
"""

from __future__ import annotations

import argparse
import statistics
import time


from learner_service.datasets import perturbed_fcc_al, training_selection
from learner_service.gp import GaussianProcess

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
HYPS_LML = {"sig2": 0.19, "ls2": 0.95, "sig3": 0.021, "ls3": 0.8, "noise": 0.041}
FLARE_200 = {"covariance": 20.9, "lml+grad": 30.7, "predict/atom": 0.218}  # s, FLARE 0.2.4 on this machine


def build(frames, n_envs, hyps=HYPS):
    gp = GaussianProcess([13], (R2, R3), dict(hyps))
    for frame, idx in training_selection(n_envs):
        gp.add_structure(frames[frame], forces=frames[frame].get_forces(), atom_indices=idx)
    return gp


CPU = {}


def median_time(fn, repeats, label=None):
    """Median wall time; the median CPU time of this process is kept in CPU[label]
    (the fairer number on a machine shared with other jobs)."""
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if label is not None:
        CPU[label] = statistics.median(cpu)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="25,50,100,200")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-optimize", action="store_true")
    ap.add_argument("--max-iterations", type=int, default=200)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    frames = perturbed_fcc_al(max(sizes) // 32 + 2, seed=0)
    test = frames[-1]

    t0 = time.perf_counter()
    warm = build(frames, 4)
    warm.log_likelihood(gradient=True)
    warm.train()
    warm.predict(test, stress=True)
    jit = time.perf_counter() - t0
    print(f"JIT warm-up (compile or load cached kernels): {jit:.2f} s")

    rows = []
    for n in sizes:
        gp = build(frames, n)

        def covariance():
            gp._k_ls = None  # drop cached kernel matrices: full rebuild
            gp._state = None
            gp.train()

        cov = median_time(covariance, args.repeats, (n, "cov"))

        def lml():
            gp._grad_cache = None
            gp._k_ls = None
            gp.log_likelihood(gradient=True, hyperparameters=HYPS_LML)

        lml_t = median_time(lml, args.repeats, (n, "lml"))
        gp.set_hyperparameters(HYPS)
        gp.train()
        pred = median_time(lambda: gp.predict(test), args.repeats, (n, "pred")) / len(test)
        opt = None
        if not args.no_optimize:
            g2 = build(frames, n)
            t0 = time.perf_counter()
            res = g2.optimize(max_iterations=args.max_iterations)
            opt = (time.perf_counter() - t0, res)
        rows.append((n, cov, lml_t, pred, opt))
        print(f"  {n} environments done", flush=True)

    print()
    print("wall time (CPU time of this process in brackets)")
    print("| envs | covariance + Cholesky (s) | lml + gradient (s) | optimisation (s) [iters, converged] | forces+σ per atom (ms) |")
    print("|-----:|----:|----:|----:|----:|")
    for n, cov, lml_t, pred, opt in rows:
        o = "-" if opt is None else f"{opt[0]:.2f} [{opt[1].iterations}, {opt[1].converged}]"
        print(f"| {n} | {cov:.3f} ({CPU[(n, 'cov')]:.3f}) | {lml_t:.3f} ({CPU[(n, 'lml')]:.3f}) | {o} | "
              f"{1000 * pred:.2f} ({1000 * CPU[(n, 'pred')] / len(test):.2f}) |")
    last = [r for r in rows if r[0] == 200]
    if last:
        n, cov, lml_t, pred, _ = last[0]
        print()
        print("speed-up vs FLARE 0.2.4 at 200 environments: "
              f"covariance {FLARE_200['covariance'] / cov:.1f}x, lml+gradient {FLARE_200['lml+grad'] / lml_t:.1f}x, "
              f"forces+σ {FLARE_200['predict/atom'] / pred:.1f}x")
    for n, _, _, _, opt in rows:
        if opt is not None:
            h = ", ".join(f"{k}={v:.4g}" for k, v in opt[1].hyperparameters.items())
            bound = f"; AT A BOUND: {opt[1].bound_note()}" if opt[1].at_bounds else ""
            print(f"optimised at {n}: {h}; log L = {opt[1].log_likelihood:.3f}{bound}")


if __name__ == "__main__":
    main()
