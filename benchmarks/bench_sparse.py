"""Sparse GP (issue 16): cost and accuracy per oracle call against the exact GP (prints tables; not a test).

Data: 32-atom FCC Al cells of ``learner_service.datasets.perturbed_fcc_al`` (a = 4.05 Å, every
coordinate displaced uniformly by up to ±5 % of a), EMT labels.  Training frames: seed 0, in
order; held-out test set: 20 frames of seed 1.  Kernel: 2+3-body, r2 = 6 Å, r3 = 4 Å, fixed
hyperparameters (those of bench_learner.py; no optimisation inside the scan, so that both
models see the same kernel).

Per oracle-call budget N (= frames labelled):

* sparse GP: every label of each of the N frames (32×3 forces, the energy, 6 stresses = 103
  labels per call), inducing environments picked by the model's rule (``--per-frame`` per frame,
  tolerance 1e-6), ``add_structure`` + ``train`` after every frame as an on-the-fly run does.
  Reported: cumulative seconds for add+train, the last frame's add+train, predict of one
  32-atom frame (median of ``--repeats``), peak traced memory (tracemalloc, numpy's arrays included)
  of the model build, force RMSE on the test set, mean z² and 2σ coverage (σ² = epistemic +
  noise²).
* exact GP: force labels of 1 and of 4 atoms per call (the atoms of largest predicted σ under
  the model so far, as the on-the-fly loop picks them; the first call takes atoms 0..k-1), the
  same test metrics.
* sparse GP on the force labels of all atoms only (no energy, no stress): the same inducing rule.

One optional optimisation of the sparse model's hyperparameters (all labels, L-BFGS-B, at most 50
iterations) is timed at ``--optimize-at`` N.  Prints machine information first.

    .venv/bin/python benchmarks/bench_sparse.py [--sizes 1,2,4,8,16,32] [--per-frame 4] [--tolerance 0]
                                                [--functionals energy|energy_force] [--optimize-at 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time
import tracemalloc

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T0 = time.perf_counter()
from learner_service.datasets import perturbed_fcc_al  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.sparse_gp import SparseGaussianProcess  # noqa: E402

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def metrics(model, test_frames):
    err, var = [], []
    for at in test_frames:
        p = model.predict(at)
        err.append(p.forces - at.get_forces())
        var.append(p.force_var + p.noise ** 2)
    err, var = np.concatenate(err).ravel(), np.concatenate(var).ravel()
    z2 = err ** 2 / var
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "z2": float(np.mean(z2)),
            "cover2": float(np.mean(np.abs(err) <= 2 * np.sqrt(var)))}


def build_sparse(frames, per_frame, tolerance=1e-6, functionals="energy", labels="all"):
    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=per_frame,
                                inducing_tolerance=tolerance, inducing_functionals=functionals)
    t_total, t_last = 0.0, 0.0
    for at in frames:
        t = time.perf_counter()
        if labels == "all":
            sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
        else:
            sgp.add_structure(at, forces=at.get_forces())
        sgp.train()
        t_last = time.perf_counter() - t
        t_total += t_last
    return sgp, t_total, t_last


def build_exact(frames, k):
    gp = GaussianProcess([13], (R2, R3), dict(HYPS))
    for i, at in enumerate(frames):
        if i == 0:
            idx = list(range(k))
        else:
            std = gp.predict(at).force_std.max(axis=1)
            idx = [int(j) for j in np.argsort(-std, kind="stable")[:k]]
        gp.add_structure(at, forces=at.get_forces(), atom_indices=idx)
        gp.train()
    return gp


def median_predict(model, at, repeats):
    model.predict(at)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(at)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def scale_probe(frames):
    """Unit costs for the extrapolation to the issue's 50,000 labels / 2,000 inducing environments:
    seconds per (label-environment, inducing-environment) pair of K_fU through the fast kernels and
    through the general gradient kernels, and the QR of A ((n+m) x m) at a measurable size."""
    from scipy.linalg import qr_multiply

    from learner_service.kernels import kernel_blocks
    from learner_service.sparse_gp import _label_groups

    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=0)
    for at in frames[:4]:
        sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
        sgp.add_inducing(at, range(0, 32, 2))
    train, U = sgp._training_batch(), sgp._inducing_batch()
    groups = _label_groups(sgp._groups)
    pairs = int(np.diff(groups.ptr).sum()) * len(U)
    t = time.perf_counter()
    sgp._cov(train, groups, U)
    fast = (time.perf_counter() - t) / pairs
    t = time.perf_counter()
    kernel_blocks(train, groups, sgp._u_groups(), HYPS["ls2"], HYPS["ls3"], grad=True, batch_b=U)
    general = (time.perf_counter() - t) / pairs
    n, m = 10000, 500
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n + m, m))
    b = rng.standard_normal((1, n + m))
    t = time.perf_counter()
    qr_multiply(A, b, mode="right", overwrite_a=True)
    qr_s = time.perf_counter() - t
    coef = qr_s / (n * m * m)
    print(f"\nscale probe ({pairs} env pairs; {len(U)} inducing): K_fU fast kernels {1e6 * fast:.1f} µs/pair, "
          f"general gradient kernels {1e6 * general:.1f} µs/pair; QR of A ({n + m}x{m}) {qr_s:.2f} s "
          f"= {1e12 * coef:.1f} s per 1e12 n·m²")
    # 50,000 labels = 485 frames of 103 labels; each frame is 64 label-environments (32 force + 32 in
    # the energy/stress group) against each inducing environment
    frames_50k, m_big = 50000 / 103, 2000
    pairs_big = frames_50k * 64 * m_big
    print(f"extrapolated to 50,000 labels ({frames_50k:.0f} frames), m = {m_big} (energy functionals): "
          f"K_fU {pairs_big * fast / 3600:.2f} h once (fast kernels; incremental adds pay only the new rows "
          f"and columns), QR {coef * 50000 * m_big ** 2:.0f} s per train, one likelihood gradient "
          f"{pairs_big * general / 3600:.1f} h (general kernels); memory: K_fU 2 unit-variance copies + "
          f"A = {3 * 50000 * m_big * 8 / 2 ** 30:.1f} GiB to train, ~{13 * 50000 * m_big * 8 / 2 ** 30:.0f} GiB "
          f"for a gradient (about 13 n×m arrays)")


def machine():
    print(f"python {platform.python_version()}, nproc {os.cpu_count()}, load average {os.getloadavg()}")
    try:
        print("\n".join(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:15]))
    except OSError:
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--per-frame", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="inducing_tolerance: residual/prior local-energy variance below which no environment is added")
    ap.add_argument("--functionals", default="energy", choices=("energy", "energy_force"))
    ap.add_argument("--optimize-at", type=int, default=0, help="also optimise the sparse model at this N (slow)")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--scale-probe", action="store_true", help="only the unit costs and the extrapolation")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    machine()
    print(f"inducing: {args.functionals} functionals, up to {args.per_frame} per frame, tolerance {args.tolerance:g}")
    frames = perturbed_fcc_al(max(sizes + [4]), seed=0)
    if args.scale_probe:
        scale_probe(frames)
        return
    test = perturbed_fcc_al(20, seed=1)
    t = time.perf_counter()
    warm = SparseGaussianProcess([13], (R2, R3), dict(HYPS))
    warm.add_structure(frames[0], forces=frames[0].get_forces(), energy=frames[0].get_potential_energy(),
                       stress=frames[0].get_stress())
    warm.train().predict(test[0])
    print(f"imports {t - T0:.2f} s, JIT warm-up {time.perf_counter() - t:.2f} s")
    print()
    print("| calls N | labels | m | add+train total (s) | last add+train (s) | predict 32 atoms (ms) | "
          "peak traced MiB | sparse RMSE (eV/Å) | z² / 2σ cover | sparse, forces only: RMSE | z² / cover | exact k=1 RMSE | z² / cover | "
          "exact k=4 RMSE | z² / cover |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in sizes:
        tracemalloc.start()
        sgp, t_total, t_last = build_sparse(frames[:n], args.per_frame, args.tolerance, args.functionals)
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
        t_pred = median_predict(sgp, test[0], args.repeats)
        ms = metrics(sgp, test)
        row = {"n": n, "labels": sgp.n_labels, "m": sgp.n_inducing, "t_total": t_total, "t_last": t_last,
               "t_pred": t_pred, "peak_mib": peak, "sparse": ms}
        cells = [f"{n}", f"{sgp.n_labels}", f"{sgp.n_inducing}", f"{t_total:.2f}", f"{t_last:.3f}",
                 f"{1e3 * t_pred:.1f}", f"{peak:.1f}", f"{ms['rmse']:.4f}", f"{ms['z2']:.2f} / {ms['cover2']:.2f}"]
        mf = metrics(build_sparse(frames[:n], args.per_frame, args.tolerance, args.functionals, "forces")[0], test)
        row["sparse_forces"] = mf
        cells += [f"{mf['rmse']:.4f}", f"{mf['z2']:.2f} / {mf['cover2']:.2f}"]
        if not args.no_exact:
            for k in (1, 4):
                me = metrics(build_exact(frames[:n], k), test)
                row[f"exact{k}"] = me
                cells += [f"{me['rmse']:.4f}", f"{me['z2']:.2f} / {me['cover2']:.2f}"]
        rows.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nmax RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if not args.no_exact:
        final1, final4 = rows[-1]["exact1"]["rmse"], rows[-1]["exact4"]["rmse"]
        for k, final in ((1, final1), (4, final4)):
            for key in ("sparse", "sparse_forces"):
                reach = next((r["n"] for r in rows if r[key]["rmse"] <= final), None)
                print(f"exact GP k={k} after {rows[-1]['n']} calls: RMSE {final:.4f} eV/Å; {key} reaches it after "
                      f"{reach} calls" if reach else f"exact GP k={k} ({final:.4f} eV/Å): {key} does not reach it")
    if args.optimize_at:
        n_opt = args.optimize_at
        sgp, _, _ = build_sparse(frames[:n_opt], args.per_frame, args.tolerance, args.functionals)
        t = time.perf_counter()
        v, g = sgp.log_likelihood(gradient=True)
        t_grad = time.perf_counter() - t
        res = sgp.optimize(max_iterations=50)
        ms = metrics(sgp.train(), test)
        print(f"\nlikelihood + gradient at N={n_opt} ({sgp.n_labels} labels, m={sgp.n_inducing}): {t_grad:.2f} s")
        print(f"optimisation: {res}")
        print(f"after optimisation: RMSE {ms['rmse']:.4f} eV/Å, z² {ms['z2']:.2f}, 2σ cover {ms['cover2']:.2f}")


if __name__ == "__main__":
    main()
