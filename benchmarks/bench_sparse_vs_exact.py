"""Sparse vs exact GP on data small enough for both (issue 16): do their predictions agree within
the sparse approximation's own stated error?

Data: ``--frames`` 32-atom FCC Al cells of ``perturbed_fcc_al`` (±``--delta`` of a, seed 0), every force of
every atom a label (EMT); held-out: ``--test`` frames of seed 1.  Both models: 2+3-body, r2 = 6 Å,
r3 = 4 Å, the same fixed hyperparameters (those of bench_sparse.py), no energy labels.  The exact GP
holds every force; the sparse GP (DTC) holds every force too, with ``--functionals`` inducing variables (``energy_force``, the run default, or ``energy``,
FLARE 1.x's) and m inducing environments chosen by its variance rule (the first m/frames of each
frame's largest residual local-energy variance, tolerance 0), for each m of ``--inducing``; with m =
every environment it is the exact GP (module docstring of learner_service/sparse_gp.py).

The stated error of the sparse model is its DTC epistemic σ (the SoR variance plus the prior variance
the inducing set does not explain, k − Q).  Printed per m, over every force component of the test
frames: RMS of d = F_sparse − F_exact, RMS of the DTC σ and of the exact σ, the share of |d| ≤ σ_DTC
and ≤ 2 σ_DTC, mean (d/σ_DTC)², and each model's RMSE against EMT.

    PYTHONPATH=. python benchmarks/bench_sparse_vs_exact.py [--frames 4] [--test 4] [--inducing 8,16,32,64,128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner_service.datasets import perturbed_fcc_al  # noqa: E402
from learner_service.environment import build_environments  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.sparse_gp import SparseGaussianProcess  # noqa: E402

CUTOFFS = (6.0, 4.0)
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--inducing", default="1,2,4,8,16,32,64", help="inducing environments m, comma-separated")
    p.add_argument("--delta", type=float, default=0.1, help="random displacement, fraction of a")
    p.add_argument("--functionals", default="energy_force,energy")
    args = p.parse_args(argv)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, "
          f"nproc {os.cpu_count()}, load average {tuple(round(x, 1) for x in os.getloadavg())}")
    train = perturbed_fcc_al(args.frames, seed=0, delta=args.delta)
    test = perturbed_fcc_al(args.test, seed=1, delta=args.delta)
    ref = np.concatenate([f.get_forces().ravel() for f in test])
    t0 = time.process_time()
    exact = GaussianProcess([13], CUTOFFS, HYPS)
    for f in train:
        exact.add_structure(f, forces=f.get_forces())
    exact.train()
    pe = [exact.predict(f) for f in test]
    fe = np.concatenate([q.forces.ravel() for q in pe])
    se = np.concatenate([q.force_std.ravel() for q in pe])
    print(f"# exact GP: {exact.n_labels} force labels, {time.process_time() - t0:.1f} s CPU; "
          f"RMSE vs EMT {np.sqrt(np.mean((fe - ref) ** 2)):.4f} eV/Å, RMS σ {np.sqrt(np.mean(se ** 2)):.4f} eV/Å")
    print("functionals | m | RMS d (eV/Å) | RMS σ_DTC | |d| ≤ σ_DTC | |d| ≤ 2σ_DTC | mean (d/σ_DTC)² | "
          "sparse RMSE vs EMT | CPU s")
    n_env = sum(len(f) for f in train)
    for functionals, m in [(fn, int(x)) for fn in args.functionals.split(",")
                           for x in args.inducing.split(",") + [str(n_env)]]:
        t0 = time.process_time()
        sgp = SparseGaussianProcess([13], CUTOFFS, HYPS, inducing_functionals=functionals,
                                    inducing_per_structure=0, inducing_tolerance=0.0)
        per, extra = divmod(m, len(train))
        for f in train:
            sgp.add_structure(f, forces=f.get_forces(), inducing=None)
        for k, f in enumerate(train):  # the variance rule over all frames' environments, spread evenly
            envs = build_environments(f.get_positions(), f.get_atomic_numbers(), f.get_cell().array, f.get_pbc(),
                                      sgp.cutoffs)
            pick = sgp.select_inducing(envs, per + (k < extra))
            if len(pick):
                sgp.add_inducing(f, pick)
        sgp.train()
        ps = [sgp.predict(f) for f in test]
        fs = np.concatenate([q.forces.ravel() for q in ps])
        ss = np.concatenate([q.force_std.ravel() for q in ps])
        d = fs - fe
        z = d / ss
        print(f"{functionals:12s} | {sgp.n_inducing:4d} | {np.sqrt(np.mean(d ** 2)):.2e} | {np.sqrt(np.mean(ss ** 2)):.2e} | "
              f"{np.mean(np.abs(z) <= 1):6.1%} | {np.mean(np.abs(z) <= 2):6.1%} | {np.mean(z ** 2):.3g} | "
              f"{np.sqrt(np.mean((fs - ref) ** 2)):.4f} | {time.process_time() - t0:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
