"""Mapped uncertainty of a 2+3-body GP (issue 15, item 2; prints a table, not a test): rank R vs
error against the exact σ vs per-step cost.

For each ``--rtol3`` (3-body tensor products below rtol3 x the largest 1-D eigenvalue product
are dropped) the GP is mapped with :func:`learner_service.mapped_variance.map_variance`, and

* the mapped per-atom force σ (``quantity="force"``) is compared with the exact GP's
  ``atom_std`` (sqrt of the largest eigenvalue of the 3x3 force covariance), and the mapped
  local-energy σ (``quantity="local_energy"``) with the exact local-energy σ
  (``exact_local_energy_std``): median / 95th percentile / max relative error on the training
  frames and on unseen frames; Spearman rank correlation of each mapped σ with the exact force σ;
* CPU time (``time.process_time``, median of ``--repeats`` after a warm-up) of one σ evaluation
  of a 1,372-atom rattled fcc Al cell, per atom, against the mapped model's in-process force
  evaluation (``MappedModel.predict``, the same cell, same run) — both include the neighbour list.

Model: ``--gp FILE`` (a saved GaussianProcess, e.g. ``bench_mapped.py --out DIR`` leaves
``DIR/gp_100.npz``; or a learner directory of ``epicycle run``); default: the 100-environment GP of
``bench_mapped.py`` (EMT Al, r2 = 6 Å, r3 = 4 Å, its fixed hyperparameters), built here.  Training
frames: ``--train`` (extended XYZ / run directory), default the first 3 frames of
``perturbed_fcc_al(seed=0)``; test frames: 3 of ``perturbed_fcc_al(seed=11)`` (EMT, 32 atoms).

    PYTHONPATH=. python benchmarks/bench_mapped_variance.py [--gp FILE] [--rtol3 1e-8,1e-10,1e-12] [--repeats 3]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402


def cpu(f, repeats):
    f()  # warm-up (Numba, caches)
    ts = []
    for _ in range(repeats):
        c = time.process_time()
        f()
        ts.append(time.process_time() - c)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gp", default=None, help="saved GaussianProcess (.npz or learner directory); default: build "
                    "bench_mapped.py's 100-environment GP")
    ap.add_argument("--train", default=None, help="training frames to report on (extended XYZ or run directory)")
    ap.add_argument("--rtol3", default="1e-8,1e-10,1e-12", help="comma-separated rtol3 values (rank of the 3-body part)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    args = ap.parse_args(argv)

    from learner_service.datasets import perturbed_fcc_al
    from learner_service.gp import GaussianProcess
    from learner_service.mapped_variance import exact_local_energy_std, map_variance
    from learner_service.mapping import map_gp

    if args.gp:
        gp = GaussianProcess.load(args.gp)
    else:
        from bench_mapped import build_gp

        gp = build_gp(perturbed_fcc_al(6, seed=0), 100)
    if args.train:
        from learner_service.offline import read_frames

        train = list(read_frames(args.train))
    else:
        train = perturbed_fcc_al(3, seed=0)
    test = perturbed_fcc_al(3, seed=11)
    print(f"model: {gp}; hyperparameters {gp.hyperparameters}; {len(train)} train / {len(test)} test frames; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    mapped = map_gp(gp)
    big = bulk("Al", "fcc", a=4.05, cubic=True).repeat(7)
    big.rattle(0.05, seed=1)
    t_force = cpu(lambda: mapped.predict(big), args.repeats) / len(big)
    print(f"mapped forces (MappedModel.predict, 1,372 atoms): {t_force:.3e} CPU s/atom", flush=True)
    sets = {"train": train, "test": test}
    exF = {k: np.concatenate([gp.predict(a).atom_std for a in fr]) for k, fr in sets.items()}
    exE = {k: np.concatenate([exact_local_energy_std(gp, a) for a in fr]) for k, fr in sets.items()}
    rows = []
    for rtol3 in (float(x) for x in args.rtol3.split(",") if x):
        c0 = time.process_time()
        mvF = map_variance(gp, rtol3=rtol3)
        t_map = time.process_time() - c0
        mvE = map_variance(gp, rtol3=rtol3, quantity="local_energy")
        row = {"rtol3": rtol3, "R": mvF.rank, "R3": mvF.metadata.get("rank3", 0), "n1": mvF.metadata.get("n1"),
               "kernel_err": mvF.metadata["kernel_rel_err"], "map_s": t_map}
        for k, fr in sets.items():
            mF = np.concatenate([mvF.atom_std(a) for a in fr])
            mE = np.concatenate([mvE.atom_std(a) for a in fr])
            rF, rE = np.abs(mF / exF[k] - 1), np.abs(mE / exE[k] - 1)
            row[k] = (np.median(rF), np.percentile(rF, 95), rF.max(), spearmanr(mF, exF[k])[0],
                      np.median(rE), np.percentile(rE, 95), spearmanr(mE, exF[k])[0], spearmanr(exE[k], exF[k])[0])
        row["tF"] = cpu(lambda: mvF.atom_std(big), args.repeats) / len(big)
        row["tE"] = cpu(lambda: mvE.atom_std(big), args.repeats) / len(big)
        rows.append(row)
        print(f"rtol3 {rtol3:g}: R {row['R']} (R3 {row['R3']}, n1 {row['n1']}), kernel err {row['kernel_err']:.1e}, "
              f"mapping {t_map:.1f} s CPU", flush=True)
        for k in sets:
            v = row[k]
            print(f"  {k:5s} force σ rel err median {v[0]:.4f} p95 {v[1]:.4f} max {v[2]:.4f} (Spearman {v[3]:.3f}) | "
                  f"local-energy σ median {v[4]:.4f} p95 {v[5]:.4f}; Spearman with the exact force σ: mapped "
                  f"{v[6]:.3f}, exact {v[7]:.3f}", flush=True)
        print(f"  cost: force σ {row['tF']:.3e} s/atom ({row['tF'] / t_force:.1f}x mapped forces), local-energy σ "
              f"{row['tE']:.3e} s/atom ({row['tE'] / t_force:.1f}x)", flush=True)
    print()
    print("| rtol3 | R (R3) | force σ median / p95 (train; test) | local-energy σ median (train; test) | "
          "force σ cost × mapped F | local-energy σ cost × |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rtol3']:g} | {r['R']} ({r['R3']}) | {r['train'][0]:.3f} / {r['train'][1]:.3f}; "
              f"{r['test'][0]:.3f} / {r['test'][1]:.3f} | {r['train'][4]:.4f}; {r['test'][4]:.4f} | "
              f"{r['tF'] / t_force:.1f} | {r['tE'] / t_force:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
