#!/usr/bin/env python
"""Side-by-side speed comparison: FLARE 0.2.4 (reference) vs our GP, same problems, same run.

    EPICYCLE_FLARE_PYTHON=$PWD/.flare-ref/venv/bin/python \\
        .venv/bin/python benchmarks/flare_reference/compare_speed.py [--sizes 25 50 100 200]

The problem is the issue's benchmark: perturbed 32-atom FCC Al (a = 4.05 Å, ±5 % of a, seeded),
EMT labels, r2 = 6 Å, r3 = 4 Å, N training environments taken from ceil(N/32) frames; a fresh
frame is the test structure. For each N, FLARE runs in a subprocess (run_flare.py, its own venv,
JIT warm-up excluded) and our GP in this process (after a warm-up on a small problem). Reported
medians:

  cov      covariance build: FLARE get_Ky_mat (+ factorisation) vs ours train(optimize=False)
  lml+grad one log marginal likelihood and its gradient from scratch at new hyperparameters
  predict  forces + σ for one atom (environment build included), median over test atoms
  optim    (--optimize, sizes <= --optimize-max-envs) full hyperparameter optimisation

FLARE is slow (≈ 21 s / 31 s / 0.22 s at 200 envs on this kind of machine), so its repeats are
kept small (--flare-repeats, default 1); ours default to 3. Both are stated in the table.
The machine may be shared: the 1-min load average at the start/end of each side is printed;
compare ratios only from runs where both sides saw a similar load.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("flare_problem", HERE / "flare_problem.py")
fp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("flare_problem", fp)
_spec.loader.exec_module(fp)

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def _median(fn, repeats):
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


# --------------------------------------------------------------------------------------------
# our GP (adapter: keep every API assumption in this block)
# --------------------------------------------------------------------------------------------

def _ours_build(train, hyps):
    from learner_service.gp import GaussianProcess

    gp = GaussianProcess(species=[13], cutoffs=(R2, R3), hyperparameters=dict(hyps))
    for fr in train:
        gp.add_structure(fr.to_atoms(), forces=fr.forces, atom_indices=list(fr.atoms))
    return gp


def _fresh_timed(train, repeats, action, cpu=None, label=None):
    """Median of ``action(gp)`` on a freshly built GP each time (our GP caches kernel matrices
    and factorisations, so repeating on one object would time cache hits). Building the
    environments is not part of the timed region (FLARE's timings exclude it as well).
    The median process CPU time goes to ``cpu[label]``."""
    times, cpus, out = [], [], None
    for _ in range(max(1, repeats)):
        gp = _ours_build(train, HYPS)
        t0, c0 = time.perf_counter(), time.process_time()
        out = action(gp)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if cpu is not None:
        cpu[label] = float(np.median(cpus))
    return float(np.median(times)), out


def run_ours(train, test, repeats, optimize, maxiter):
    out = {}
    cpu = out["cpu"] = {}
    out["build_envs"], _ = _median(lambda: _ours_build(train, HYPS), 1)
    # covariance K + sigma_n^2 I and its Cholesky factorisation, alpha (no optimisation)
    out["cov"], _ = _fresh_timed(train, repeats, lambda gp: gp.train(optimize=False), cpu, "cov")
    # one log likelihood + analytic gradient from scratch (K and dK/dls built inside)
    out["lml_grad"], lg = _fresh_timed(train, repeats, lambda gp: gp.log_likelihood(gradient=True), cpu,
                                       "lml_grad")
    out["lml"] = float(lg[0])
    gp = _ours_build(train, HYPS)
    gp.train(optimize=False)
    atoms = test[0].to_atoms()
    t_frame, _ = _median(lambda: gp.predict(atoms), repeats)
    out["predict"] = t_frame / len(atoms)  # whole frame in one call, per atom
    out["predict_one"], _ = _median(lambda: gp.predict(atoms, atom_indices=[0]), repeats)
    if optimize:
        gp2 = _ours_build(train, HYPS)
        t0, c0 = time.perf_counter(), time.process_time()
        res = gp2.optimize(max_iterations=maxiter)
        out["optim"] = time.perf_counter() - t0
        cpu["optim"] = time.process_time() - c0
        out["optim_info"] = (f"nit={res.iterations} nfev={res.evaluations} "
                             f"lml={res.log_likelihood:.4f} converged={res.converged}")
    return out


def warm_up_ours():
    tr, te = fp.benchmark_problem(4, seed=99)
    run_ours(tr, te, 1, False, 1)


# --------------------------------------------------------------------------------------------

def run_flare(train, test, work, repeats, optimize, maxiter, predict_atoms):
    problem = fp.write_problem(
        Path(work) / "problem.npz", (R2, R3), HYPS, [13], train, test,
        repeats=repeats, compute_local_energies=0, max_predict_atoms=predict_atoms,
        optimize=int(optimize), maxiter=maxiter,
    )
    # serial like ours: FLARE's numpy BLAS single-threaded (its K_y is built serially anyway)
    serial = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    res = fp.run_flare(problem, Path(work) / "result.npz", timeout=6 * 3600, quiet=False,
                       env_overrides=serial)
    out = {
        "build_envs": float(res["t_build_envs"]),
        "cov_only": float(res["t_cov_build"]),
        "cov": float(res["t_cov_build"]) + float(res["t_factorize"]),
        "lml_grad": float(res["t_lml_grad"]),
        "predict": float(res["t_predict_per_atom"]),
        "jit": float(res["t_jit_warmup"]),
    }
    out["cpu"] = {"cov": float(res["t_cov_build_cpu"]) + float(res["t_factorize_cpu"]),
                  "lml_grad": float(res["t_lml_grad_cpu"])}
    if optimize:
        out["cpu"]["optim"] = float(res["t_optimize_cpu"])
        out["optim"] = float(res["t_optimize"])
        out["optim_info"] = "nit=%d nfev=%d lml=%.4f" % (int(res["opt_nit"]), int(res["opt_nfev"]),
                                                          float(res["opt_lml"]))
    out["lml"] = float(res["lml"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flare-repeats", type=int, default=1)
    ap.add_argument("--ours-repeats", type=int, default=3)
    ap.add_argument("--predict-atoms", type=int, default=8,
                    help="FLARE predicts this many test atoms (median per atom); ours predicts "
                         "the whole 32-atom frame and divides")
    ap.add_argument("--optimize", action="store_true", help="also time a full optimisation")
    ap.add_argument("--optimize-max-envs", type=int, default=50)
    ap.add_argument("--maxiter", type=int, default=10, help="optimiser iterations (FLARE default 10)")
    ap.add_argument("--skip-flare", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "flare_speed.json"))
    args = ap.parse_args(argv)

    if not args.skip_flare and not fp.flare_python():
        sys.exit("set EPICYCLE_FLARE_PYTHON (benchmarks/flare_reference/setup_flare_env.sh)")

    print("warming up our GP (numba)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    warm_up_ours()
    jit_ours = time.perf_counter() - t0

    rows = []
    for n in args.sizes:
        train, test = fp.benchmark_problem(n, seed=args.seed)
        opt = args.optimize and n <= args.optimize_max_envs
        print(f"--- {n} environments ---", file=sys.stderr, flush=True)
        load0 = os.getloadavg()[0]
        ours = run_ours(train, test, args.ours_repeats, opt, args.maxiter)
        ours["loadavg"] = (load0, os.getloadavg()[0])
        print("ours:", {k: v for k, v in ours.items()}, file=sys.stderr, flush=True)
        flare = None
        if not args.skip_flare:
            with tempfile.TemporaryDirectory(prefix="flare_speed_") as work:
                load0 = os.getloadavg()[0]
                flare = run_flare(train, test, work, args.flare_repeats, opt, args.maxiter,
                                  args.predict_atoms)
                flare["loadavg"] = (load0, os.getloadavg()[0])
            print("flare:", flare, file=sys.stderr, flush=True)
        rows.append({"n_envs": n, "ours": ours, "flare": flare})

    def fmt(v, unit):
        if v is None:
            return "—"
        return f"{v * 1e3:.2f} ms" if unit == "ms" else f"{v:.3f} s"

    cols = [("cov", "s", "covariance build"), ("lml_grad", "s", "lml + gradient"),
            ("predict", "ms", "forces+σ per atom"), ("optim", "s", "optimisation")]
    print()
    print(f"FLARE 0.2.4 vs ours — perturbed FCC Al 32-atom frames, EMT, r2={R2} Å, r3={R3} Å; "
          f"medians (FLARE repeats={args.flare_repeats}, ours repeats={args.ours_repeats})")
    header = "| envs | " + " | ".join(f"{title}: FLARE | ours | ratio" for _, _, title in cols) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(cols)))
    for row in rows:
        cells = [str(row["n_envs"])]
        for key, unit, _ in cols:
            f = (row["flare"] or {}).get(key)
            o = row["ours"].get(key)
            ratio = f"{f / o:.1f}×" if (f is not None and o) else "—"
            cells += [fmt(f, unit), fmt(o, unit), ratio]
        print("| " + " | ".join(cells) + " |")
    print("\nprocess CPU time (medians; less sensitive to other jobs than wall time):")
    ckeys = [("cov", "covariance build"), ("lml_grad", "lml + gradient"), ("optim", "optimisation")]
    print("| envs | " + " | ".join(f"{t}: FLARE | ours | ratio" for _, t in ckeys) + " |")
    print("|" + "---|" * (1 + 3 * len(ckeys)))
    for row in rows:
        cells = [str(row["n_envs"])]
        for key, _ in ckeys:
            f = ((row["flare"] or {}).get("cpu") or {}).get(key)
            o = row["ours"]["cpu"].get(key)
            cells += [fmt(f, "s"), fmt(o, "s"), f"{f / o:.1f}×" if (f is not None and o) else "—"]
        print("| " + " | ".join(cells) + " |")
    print("\ncovariance build = K + σn²I and its factorisation (FLARE: get_Ky_mat + set_L_alpha's "
          "Cholesky/inverse; ours: train(optimize=False) on a fresh model).")
    print("forces+σ per atom: FLARE median over single atoms (environment build included); ours "
          "one predict() of the 32-atom frame / 32, and in brackets a single-atom predict().")
    for row in rows:
        o, f = row["ours"], row["flare"] or {}
        extra = f"  {row['n_envs']:4d} envs: lml FLARE {f.get('lml', float('nan')):.8f} ours {o['lml']:.8f}"
        extra += f"; ours single-atom predict {o['predict_one'] * 1e3:.2f} ms"
        extra += "; 1-min load average (start, end) ours %.1f→%.1f" % tuple(o["loadavg"])
        if f.get("loadavg"):
            extra += ", FLARE %.1f→%.1f" % tuple(f["loadavg"])
        if "optim" in o:
            extra += f"; optimisation FLARE [{f.get('optim_info', '—')}] ours [{o['optim_info']}]"
        print(extra)
    jit_flare = [row["flare"]["jit"] for row in rows if row["flare"]]
    print(f"JIT (excluded above): ours {jit_ours:.2f} s once per process (numba cache=True: compiled or loaded "
          f"from the cache) incl. a 4-environment warm-up run"
          + (f"; FLARE {min(jit_flare):.1f}–{max(jit_flare):.1f} s per subprocess" if jit_flare else ""))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "args": vars(args), "jit_ours": jit_ours,
                               "nproc": os.cpu_count()}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
