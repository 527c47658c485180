"""Sparse GP at scale (issue 16): add, optimise and predict against the number of labels, memory.

Data: 32-atom FCC Al cells of ``learner_service.datasets.perturbed_fcc_al`` (a = 4.05 Å, every
coordinate displaced by up to ±5 % of a, seed 0), EMT labels; kernel 2+3-body, r2 = 6 Å, r3 = 4 Å,
the hyperparameters of bench_sparse.py; local-energy inducing functionals (FLARE 1.x's choice,
one K_fU column per inducing environment).

``--schedule`` lists steps ``LABELS:INDUCING``.  At each step frames are added (force labels of
every atom, with ``--energy-stress`` also the energy and the six stresses) until at least LABELS
force labels are held, and inducing environments (atoms spread evenly over the new frames) until
INDUCING are held.  Reported per step, CPU seconds (time.process_time, this process and its numba
threads): ``add`` (add_structure of the new frames, total and per frame), ``train`` (K_fU extended
by the new rows and columns, then the QR), ``+1 frame`` (one more frame added and trained, as an
on-the-fly step: its K_fU rows and a full QR), one likelihood + gradient, ``optimise`` (L-BFGS-B
capped at ``--opt-iterations``), predict of one fixed 32-atom test frame (median of
``--repeats``, per atom), the peak RSS so far (ru_maxrss) and the model's own arrays (K_fU cache,
K_UU, factor, environments).  Steps with the same INDUCING and growing LABELS show whether the
prediction cost depends on the number of labels.  A non-negative least-squares fit ``t = a n m + b n m²`` of
the gradient, train and optimise times extrapolates to ``--target`` (stated as extrapolated).

``--memory-probe LABELS:INDUCING``: the gradient's linear algebra alone at a size whose kernels
would take hours (random kernel arrays handed in through the optimiser's cache): its peak
allocation (tracemalloc) in units of n×m float64 arrays, and its CPU time.

``--compare LABELS:INDUCING``: the likelihood + gradient through the former code path (reference
kernels, the B = K̃⁻¹K_Uf algebra; kept below as :func:`old_lml_and_grad`) and the current one,
alternating, ``--repeats`` times each, CPU-time medians and their ratio, and the gradients' largest
relative difference (with energy and stress labels, as an on-the-fly run has them).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sparse_scale.py --compare 3000:200 --repeats 3
    PYTHONPATH=. .venv/bin/python benchmarks/bench_sparse_scale.py --memory-probe 20000:500
    PYTHONPATH=. .venv/bin/python benchmarks/bench_sparse_scale.py \\
        --schedule 1000:100,2000:100,4000:100,4000:200,8000:400 [--energy-stress] [--target 50000:2000]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import statistics
import time

import numpy as np
from scipy.linalg import cho_solve, qr, solve_triangular
from scipy.optimize import nnls

from learner_service.datasets import perturbed_fcc_al
from learner_service.kernels import kernel_blocks
from learner_service.sparse_gp import _NOISE_KIND, SparseGaussianProcess, _label_groups

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
ATOMS = 32


def old_lml_and_grad(self, h):
    """The sparse likelihood + gradient as it was before (commit 96cac32): reference kernels
    (kernel_blocks, grad=True) every call, B = K̃⁻¹K_Uf, G, C⁻¹Bᵀ formed explicitly."""
    ls = (h["ls2"], h["ls3"])
    train, U = self._training_batch(), self._inducing_batch()
    F2, F3, dF2, dF3 = kernel_blocks(train, _label_groups(self._groups), self._u_groups(), *ls, grad=True,
                                     batch_b=U)
    U2, U3, dU2, dU3 = kernel_blocks(U, self._u_groups(), None, *ls, grad=True)
    s2, s3 = h["sig2"], h["sig3"]
    Kfu = s2 ** 2 * F2 + s3 ** 2 * F3
    Kuu = self._jittered(s2 ** 2 * U2 + s3 ** 2 * U3)
    L = self._cholesky(Kuu)
    lam = self._noise_var(h)
    n, mu = Kfu.shape
    y = self.labels
    A = np.vstack([Kfu / np.sqrt(lam)[:, None], L.T])
    R = np.triu(qr(A, mode="r", overwrite_a=True, check_finite=False)[0][:mu, :mu])
    diagR = np.abs(np.diag(R))
    KlT = (Kfu / lam[:, None]).T
    Gt = solve_triangular(R, KlT, trans="T", lower=False, check_finite=False)
    Gty = Gt @ y
    alpha = solve_triangular(R, Gty, lower=False, check_finite=False)
    r = y - Kfu @ alpha
    value = (-0.5 * (r @ (r / lam) + np.sum((L.T @ alpha) ** 2)) - 0.5 * np.log(lam).sum()
             - np.log(diagR).sum() + np.log(np.diag(L)).sum() - 0.5 * n * math.log(2 * math.pi))
    a = r / lam
    B = cho_solve((L, True), Kfu.T, check_finite=False)
    Ba = B @ a
    CiBt = B.T / lam[:, None] - Gt.T @ (Gt @ B.T)
    WBt = np.outer(a, Ba) - CiBt
    BWBt = np.outer(Ba, Ba) - B @ CiBt
    diagW = a * a - (1.0 / lam - np.einsum("ij,ij->j", Gt, Gt))
    kinds = np.asarray(self._kinds)
    grad = []
    for name in self.hyperparameter_names:
        if name in ("sig2", "sig3"):
            s = h[name]
            dF, dU = (F2, U2) if name == "sig2" else (F3, U3)
            g = np.vdot(WBt, 2 * s * dF) - 0.5 * np.vdot(BWBt, self._jittered(2 * s * dU))
        elif name in ("ls2", "ls3"):
            s = s2 if name == "ls2" else s3
            dF, dU = (dF2, dU2) if name == "ls2" else (dF3, dU3)
            g = np.vdot(WBt, s * s * dF) - 0.5 * np.vdot(BWBt, self._jittered(s * s * dU))
        else:
            g = 0.5 * diagW[kinds == _NOISE_KIND[name]].sum() * 2 * h[name]
        grad.append(float(g))
    return float(value), np.asarray(grad)


def cpu(fn, *args, **kw):
    t = time.process_time()
    out = fn(*args, **kw)
    return time.process_time() - t, out


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def model_bytes(sgp) -> int:
    arrs = list(sgp._Kfu) + list(sgp._Kuu)
    if sgp._factor is not None:
        arrs += [sgp._factor.L, sgp._factor.R, sgp._factor.alpha]
    arrs += list(sgp._training_batch().arrays().values()) + list(sgp._inducing_batch().arrays().values())
    return int(sum(a.nbytes for a in arrs)) + 8 * 3 * sgp.n_labels


def parse_steps(text):
    out = []
    for item in text.split(","):
        n, m = item.split(":")
        out.append((int(n), int(m)))
    return out


def add_frame(sgp, at, n_ind, energy_stress):
    ind = [int(i) for i in np.linspace(0, len(at) - 1, n_ind).round()] if n_ind else None
    if energy_stress:
        sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress(),
                          inducing=ind)
    else:
        sgp.add_structure(at, forces=at.get_forces(), inducing=ind)


def machine():
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, "
          f"nproc {os.cpu_count()}, load average {os.getloadavg()}; predict threads "
          f"{SparseGaussianProcess([13], (R2, R3)).predict_threads}")


def compare(n_labels, m, repeats):
    frames = perturbed_fcc_al(-(-n_labels // (3 * ATOMS + 7)), seed=0)
    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=0)
    per = -(-m // len(frames))
    for at in frames:
        add_frame(sgp, at, min(per, m - sgp.n_inducing), True)
    h = sgp.hyperparameters
    print(f"\ncompare: {sgp.n_labels} labels (forces, energies, stresses of {len(frames)} frames), "
          f"{sgp.n_inducing} inducing environments")
    sgp._lml_and_grad(h)  # warm-up: numba compile or cache load of both paths
    old_lml_and_grad(sgp, h)
    t_old, t_new = [], []
    for _ in range(repeats):
        t, (vo, go) = cpu(old_lml_and_grad, sgp, h)
        t_old.append(t)
        t, (vn, gn) = cpu(sgp._lml_and_grad, h)
        t_new.append(t)
    mo, mn = statistics.median(t_old), statistics.median(t_new)
    print(f"likelihood + gradient, CPU s: old {[round(x, 2) for x in t_old]} median {mo:.2f}; "
          f"new {[round(x, 2) for x in t_new]} median {mn:.2f}; old/new {mo / mn:.1f}x")
    print(f"value old {vo:.10g} new {vn:.10g}")
    for name, a, b in zip(sgp.hyperparameter_names, go, gn):
        print(f"  d/d{name}: old {a:.8g} new {b:.8g} (relative difference {abs(b - a) / max(abs(a), 1e-300):.1e})")
    cache = {}
    sgp._lml_and_grad(h, cache)
    t, _ = cpu(sgp._lml_and_grad, {**h, "sig2": 1.1 * h["sig2"], "noise": 0.9 * h["noise"]}, cache)
    print(f"new, same length scales (kernels reused from the optimiser's cache): {t:.2f} s CPU")


def scale(steps, energy_stress, opt_iterations, repeats, target):
    n_frames = -(-max(n for n, _ in steps) // (3 * ATOMS)) + len(steps)
    t, frames = cpu(perturbed_fcc_al, n_frames, seed=0)
    test = perturbed_fcc_al(1, seed=1)[0]
    print(f"\n{n_frames} EMT frames labelled in {t:.1f} s CPU; energy+stress labels: {energy_stress}")
    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=0)
    rows, used = [], 0
    hdr = (f"{'F labels':>8} {'labels':>7} {'m':>5} {'frames':>6} {'add s':>7} {'add/frame ms':>12} {'train s':>8} "
           f"{'+1 frame s':>10} {'lml+grad s':>10} {'opt s':>8} {'evals':>5} {'pred ms/atom':>12} {'RSS GiB':>8} "
           f"{'model MiB':>9} "
           f"{'est. grad GiB':>13}")
    print(hdr)
    for n_force, m in steps:
        new = []
        while 3 * ATOMS * (used + len(new)) < n_force:
            new.append(frames[used + len(new)])
        need = max(0, m - sgp.n_inducing)
        t_add = 0.0
        if new:
            per = [need // len(new) + (1 if k < need % len(new) else 0) for k in range(len(new))]
            for at, k in zip(new, per):
                t, _ = cpu(add_frame, sgp, at, min(k, ATOMS), energy_stress)
                t_add += t
        elif need:
            t_add, _ = cpu(sgp.add_inducing, frames[0], [int(i) for i in np.arange(need) % ATOMS])
        used += len(new)
        t_train, _ = cpu(sgp.train)
        t_grad, _ = cpu(sgp._lml_and_grad, sgp.hyperparameters)
        t_opt, evals = 0.0, 0
        if opt_iterations:
            t_opt, res = cpu(sgp.optimize, max_iterations=opt_iterations)
            evals = res.evaluations
            sgp.set_hyperparameters(HYPS)  # the next step starts from the same point
            sgp.train()
        # one more frame as an on-the-fly step adds it: its labels, new K_fU rows, a full QR
        t_inc, _ = cpu(add_frame, sgp, frames[used], 0, energy_stress)
        used += 1
        t, _ = cpu(sgp.train)
        t_inc += t
        sgp.predict(test)
        ts = [cpu(sgp.predict, test)[0] for _ in range(repeats)]
        t_pred = statistics.median(ts)
        n, mu = sgp.n_labels, sgp.n_inducing
        est = 8 * n * mu * 8 / 2 ** 30  # the K_fU cache (2), the gradient's cache (4), K, A
        print(f"{3 * ATOMS * used:>8} {n:>7} {mu:>5} {used:>6} {t_add:>7.2f} {1e3 * t_add / max(1, len(new)):>12.1f} "
              f"{t_train:>8.2f} {t_inc:>10.2f} {t_grad:>10.2f} {t_opt:>8.2f} {evals:>5} "
              f"{1e3 * t_pred / len(test):>12.3f} "
              f"{rss_gib():>8.2f} {model_bytes(sgp) / 2 ** 20:>9.1f} {est:>13.2f}", flush=True)
        rows.append((n, mu, t_train, t_grad, t_opt, evals))
    nt, mt = target
    X = np.array([[n * m, n * m * m] for n, m, *_ in rows], dtype=float)
    print(f"\nfit t = a·n·m + b·n·m² (non-negative least squares over the steps), extrapolated to {nt} labels, "
          f"m = {mt} (EXTRAPOLATED, not measured):")
    for name, col in (("train (K_fU once + QR)", 2), ("likelihood + gradient", 3)):
        coef, _ = nnls(X, np.array([r[col] for r in rows]))
        pred = coef @ [nt * mt, nt * mt * mt]
        print(f"  {name}: a = {coef[0]:.3g} s, b = {coef[1]:.3g} s -> {pred:.0f} s CPU ({pred / 3600:.2f} h)")
    print(f"  memory of one likelihood + gradient at that size: 8 n×m float64 arrays = "
          f"{8 * nt * mt * 8 / 2 ** 30:.1f} GiB (+ m×m matrices, {5 * mt * mt * 8 / 2 ** 30:.2f} GiB)")


def memory_probe(n_labels, m):
    """Peak of the arrays one likelihood + gradient allocates (tracemalloc sees numpy's buffers) at
    ``n_labels`` force labels and ``m`` inducing environments, with the kernel arrays supplied
    (random, K_UU positive definite) so that the size is reachable without hours of kernels: the
    algebra's own memory and CPU time at that size; the cached kernels (4 n×m + 4 m×m) come on top."""
    import tracemalloc

    frames = perturbed_fcc_al(-(-n_labels // (3 * ATOMS)), seed=0, label=False)
    sgp = SparseGaussianProcess([13], (R2, R3), dict(HYPS), inducing_per_structure=0)
    rng = np.random.default_rng(0)
    per = -(-m // len(frames))
    for at in frames:
        k = min(per, m - sgp.n_inducing)
        sgp.add_structure(at, forces=rng.normal(0, 0.3, (len(at), 3)), inducing=list(range(k)) if k else None)
    n, mu = sgp.n_labels, sgp.n_inducing
    X = rng.random((mu, mu + 10))
    U = X @ X.T / mu + np.eye(mu)
    F = [rng.random((n, mu)) * 0.1 for _ in range(4)]
    kernels = (F[0], F[1], F[2], F[3], U, 0.1 * U, 0.01 * U, 0.001 * U)
    key = (HYPS["ls2"], HYPS["ls3"], n, mu, sgp.inducing_functionals)
    tracemalloc.start()
    t, (v, g) = cpu(sgp._lml_and_grad, sgp.hyperparameters, {"key": key, "kernels": kernels})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\nmemory probe: {n} labels, m = {mu}: algebra of one likelihood + gradient {t:.1f} s CPU, "
          f"peak allocation {peak / 2 ** 30:.3f} GiB = {peak / (8 * n * mu):.2f} n×m arrays "
          f"(+ the 4 cached n×m kernel arrays = {4 * 8 * n * mu / 2 ** 30:.3f} GiB); finite: {np.isfinite(g).all()}; "
          f"process peak RSS {rss_gib():.2f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", default="1000:100,2000:100,4000:100,4000:200,8000:400",
                    help="steps LABELS:INDUCING (force labels held, inducing environments held)")
    ap.add_argument("--energy-stress", action="store_true", help="also the energy and stress label of every frame")
    ap.add_argument("--opt-iterations", type=int, default=2, help="L-BFGS-B iteration cap per step (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of predict (and of --compare), medians")
    ap.add_argument("--target", default="50000:2000", help="LABELS:INDUCING to extrapolate to")
    ap.add_argument("--compare", help="LABELS:INDUCING: old vs new likelihood + gradient only")
    ap.add_argument("--memory-probe", help="LABELS:INDUCING: memory and CPU of the gradient's algebra only "
                                           "(kernel arrays supplied; see memory_probe)")
    args = ap.parse_args(argv)
    machine()
    if args.compare:
        compare(*parse_steps(args.compare)[0], args.repeats)
        return
    if args.memory_probe:
        memory_probe(*parse_steps(args.memory_probe)[0])
        return
    scale(parse_steps(args.schedule), args.energy_stress, args.opt_iterations, args.repeats,
          parse_steps(args.target)[0])


if __name__ == "__main__":
    main()
