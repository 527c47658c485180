"""On-the-fly runs re-optimising with ``learner.optimize.method: ml`` vs ``map`` (issue 13): which default.

For each system (``examples/al_melt.yaml``; optionally ``examples/cu3au.yaml``), each method and each
seed, one on-the-fly run with the embedded services (EMT oracle) and a label budget
(``stop.max_labels``); everything else as the example config (al_melt: re-optimise after every call,
``max_iterations`` 10).  ``map`` uses the learner's defaults (3 restarts, 20 % of the frames held out).
Afterwards the model after k oracle calls is rebuilt offline from the run directory (the same labels,
training atoms and the hyperparameters of the latest re-optimisation at or before call k:
``bench_learning_curves.learning_curve``) and its force RMSE is measured on the common held-out EMT
trajectory of ``bench_learning_curves.held_out`` (two temperatures spanning the run's).

Printed per system: the median over seeds of the test RMSE at each k for both methods, and per run the
total time spent in Optimize (the events' ``seconds``, wall), the optimisations that stopped without
converging, and the raw mean z² of σ at the run's oracle calls (its last ``calibration`` event).

Usage: PYTHONPATH=. python benchmarks/bench_optimize_method.py [--seeds 3] [--labels 20] [--systems al_melt]
                                                              [--methods ml,map] [--holdout 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.bench_learning_curves import SYSTEMS, held_out, learning_curve

ROOT = Path(__file__).resolve().parent.parent


def run_one(system: str, method: str, seed: int, labels: int, work: Path, holdout: float | None = None) -> Path:
    data = yaml.safe_load((ROOT / SYSTEMS[system]["config"]).read_text())
    data["seed"] = seed
    data["name"] = f"{system}-{method}-{seed}" + (f"-h{holdout:g}" if holdout is not None else "")
    data["learner"].setdefault("optimize", {})["method"] = method
    if holdout is not None and method == "map":
        data["learner"]["optimize"]["holdout"] = holdout
    data.setdefault("stop", {})["max_labels"] = labels
    data["sampler"]["steps"] = max(int(data["sampler"]["steps"]), 1500)  # long enough to spend the budget
    cfg = work / f"{data['name']}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_dir = work / data["name"]
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir),
                           "--no-report", "--quiet"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{data['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return run_dir


def run_facts(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    opt = [e for e in events if e["event"] == "optimize"]
    cal = [e for e in events if e["event"] == "calibration"]
    return {"optimize_seconds": sum(e["seconds"] for e in opt), "optimisations": len(opt),
            "not_converged": sum(1 for e in opt if not e["converged"]),
            "raw_mean_z2": cal[-1]["raw"]["mean_squared_z"] if cal else float("nan"),
            "final_hyperparameters": opt[-1]["hyperparameters"] if opt else {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="al_melt", help="comma-separated: al_melt, cu3au")
    ap.add_argument("--methods", default="ml,map", help="comma-separated learner.optimize.method values")
    ap.add_argument("--seeds", type=int, default=3, help="runs per system and method (seeds 0..n-1)")
    ap.add_argument("--labels", type=int, default=20, help="oracle-call budget per run")
    ap.add_argument("--holdout", type=float, help="learner.optimize.holdout of the map runs (default: the config's, 0)")
    ap.add_argument("--keep", help="keep the run directories here")
    args = ap.parse_args()
    methods = args.methods.split(",")
    ks = sorted({1, 2, 3, 5, 8, *range(10, args.labels + 1, 5), args.labels})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for system in args.systems.split(","):
            frames, forces = held_out(system)
            print(f"## {system}: held-out {len(frames)} frames; budget {args.labels} calls, {args.seeds} seeds",
                  flush=True)
            curves = {m: [] for m in methods}
            for seed in range(args.seeds):
                for m in methods:
                    t0 = time.perf_counter()
                    run_dir = run_one(system, m, seed, args.labels, work, args.holdout)
                    curve = learning_curve(run_dir, ks, frames, forces)
                    curves[m].append(curve)
                    f = run_facts(run_dir)
                    hyps = " ".join(f"{k}={v:.3g}" for k, v in f["final_hyperparameters"].items())
                    print(f"  {m:4s} seed {seed}: final RMSE {curve[max(curve)]:.4f} eV/Å at {max(curve)} calls; "
                          f"Optimize {f['optimize_seconds']:.1f} s wall over {f['optimisations']} "
                          f"({f['not_converged']} not converged); raw mean z² at calls {f['raw_mean_z2']:.2f}; "
                          f"last {hyps}  [{time.perf_counter() - t0:.0f} s]", flush=True)
            print("\n| calls | " + " | ".join(f"{m} median RMSE (eV/Å)" for m in methods) + " |")
            print("|---|" + "---|" * len(methods))
            for k in ks:
                row = []
                for m in methods:
                    vals = [c[k] for c in curves[m] if k in c]
                    row.append(f"{statistics.median(vals):.4f}" if len(vals) == args.seeds else "—")
                print(f"| {k} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
