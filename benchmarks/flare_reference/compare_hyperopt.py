"""FLARE 0.2.4's own ML-II optimiser vs ours at equal data (issue 13; opt-in, needs the FLARE venv).

For ``--frames`` (default 2,4) training frames of 32-atom FCC Al (``perturbed_fcc_al(n, seed=0)``,
±5 %, EMT, all atoms, r2 = 6 Å, r3 = 4 Å -- the frames of bench_hyperopt.py's seed-0 rows) FLARE's
``gp.train()`` (L-BFGS-B, ``--maxiter``) runs from the default start values; its optimum is then
put into our GP (the kernels agree with FLARE's to 1e-6, tests/learner/test_flare_crosscheck.py) and
scored on the same 20 test frames (``perturbed_fcc_al(20, seed=10000)``) as our ML-II and MAP.

    export EPICYCLE_FLARE_PYTHON=/path/to/flare-venv/bin/python
    python benchmarks/flare_reference/compare_hyperopt.py [--frames 2,4] [--maxiter 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import flare_problem as fp  # noqa: E402

from learner_service.datasets import perturbed_fcc_al  # noqa: E402
from learner_service.defaults import DEFAULT_HYPERPARAMETERS  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.model_selection import map_optimize, validation_metrics  # noqa: E402

CUTOFFS = (6.0, 4.0)


def ours(train, hyps):
    gp = GaussianProcess([13], CUTOFFS, dict(hyps))
    for f in train:
        gp.add_structure(f, forces=f.get_forces())
    return gp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", default="2,4")
    p.add_argument("--maxiter", type=int, default=30)
    args = p.parse_args(argv)
    if not fp.flare_python():
        print(f"set {fp.ENV_VAR} (benchmarks/flare_reference/setup_flare_env.sh)", file=sys.stderr)
        return 2
    test = [(f, range(32), f.get_forces()) for f in perturbed_fcc_al(20, seed=10_000)]
    for n in [int(x) for x in args.frames.split(",")]:
        train = perturbed_fcc_al(n, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            problem = fp.write_problem(
                Path(tmp) / "problem.npz", CUTOFFS, DEFAULT_HYPERPARAMETERS, [13],
                [fp.Frame.from_atoms(f, f.get_forces(), range(32)) for f in train], [],
                optimize=1, maxiter=args.maxiter, compute_lml=0, compute_predictions=0,
                compute_local_energies=0, check_neighbours=0)
            t0 = time.perf_counter()
            res = fp.run_flare(problem, Path(tmp) / "result.npz", timeout=7200)
            wall = time.perf_counter() - t0
        fh = dict(zip(fp.HYP_NAMES, (float(v) for v in res["opt_hyps"])))
        gf = ours(train, fh)
        flare_rmse = validation_metrics(gf, test)
        ml = ours(train, DEFAULT_HYPERPARAMETERS)
        r_ml = map_optimize(ml, prior="none", restarts=3, seed=0, selection="objective")
        mp = ours(train, DEFAULT_HYPERPARAMETERS)
        r_mp = map_optimize(mp, prior="data", restarts=3, seed=0)
        fixed = ours(train, DEFAULT_HYPERPARAMETERS)
        print(f"{n} frames ({32 * n} environments): FLARE gp.train() maxiter {args.maxiter}: nit "
              f"{int(res['opt_nit'])}, nfev {int(res['opt_nfev'])}, {wall:.0f} s wall, "
              f"CPU {float(res.get('t_optimize_cpu', float('nan'))):.0f} s; message {res['opt_message']}")
        print(f"  FLARE optimum  lml {float(res['opt_lml']):.3f} (ours at it {gf.log_likelihood():.3f}); "
              + ", ".join(f"{k}={v:.4g}" for k, v in fh.items()))
        print(f"  ours ML-II     lml {r_ml.log_likelihood:.3f}; "
              + ", ".join(f"{k}={r_ml.hyperparameters[k]:.4g}" for k in fp.HYP_NAMES))
        print(f"  ours MAP       lml {r_mp.log_likelihood:.3f} (selected: {r_mp.selected}); "
              + ", ".join(f"{k}={r_mp.hyperparameters[k]:.4g}" for k in fp.HYP_NAMES))
        for name, g in (("FLARE ML-II", gf), ("ours ML-II", ml), ("ours MAP", mp), ("start values", fixed)):
            m = flare_rmse if g is gf else validation_metrics(g, test)
            print(f"  {name:13s} test force RMSE {m['rmse']:.5f} eV/Å, RMS total σ / RMSE "
                  f"{m['rms_sigma'] / m['rmse']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
