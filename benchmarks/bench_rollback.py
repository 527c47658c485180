"""The trial update policy on a case that needs it (issue 14): `accept` vs `trial` vs `trial` without retries.

32-atom FCC Al in NVE at Δt = 20 fs (four times the usual 5 fs), 1500 K start, EMT oracle, embedded
services, 160 steps per run (``--steps``), tolerance ``--tolerance`` eV/atom on the conserved energy over
a 20-step trial window.  Velocity Verlet's energy error grows as Δt², so on updated models the conserved
energy moves by several meV/atom within 20 steps at 20 fs.  Printed per policy and seed: oracle calls,
trials, rollbacks, rejections, the largest conserved-energy change in the 20 steps after a model
change on the accepted trajectory (eV/atom), the fraction of such windows above the tolerance, the final
Δt, and the wall time.  The same configuration is what tests/coordinator/test_rollback.py runs in CI.

Usage: python benchmarks/bench_rollback.py [--seeds 3] [--steps 160] [--tolerance 0.0025]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def config(seed: int, steps: int, tolerance: float, update: str, retries: int) -> dict:
    return {
        "name": f"rollback-{update}-{retries}-{seed}", "seed": seed,
        "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
        "oracle": {"backend": "emt"},
        "learner": {"cutoffs": [6.0, 4.0],
                    "hyperparameters": {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05},
                    "optimize": {"every": 1, "until_calls": 1000, "max_iterations": 10}},
        "sampler": {"ensemble": "nve", "timestep_fs": 20.0, "temperature_K": 1500.0, "steps": steps,
                    "frame_interval": 1, "checkpoint_interval": 100},
        "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "update": update,
                   "trial": {"window_steps": 20, "max_energy_change_eV_per_atom": tolerance, "recover_steps": 40,
                             "max_retries": retries}},
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from coordinator.report import energy_changes_after_updates

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--tolerance", type=float, default=0.0025)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.steps} steps at 20 fs, "
          f"tolerance {args.tolerance} eV/atom per 20-step window")
    print("| policy | seed | oracle calls | trials (probations) | rollbacks | rejected | max ΔE after a model change "
          "(eV/atom) | windows over tolerance | final Δt (fs) | steps done | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for update, retries, label in (("accept", 3, "accept"), ("trial", 3, "trial"),
                                       ("trial", 0, "trial, no retries")):
            for seed in range(args.seeds):
                data = config(seed, args.steps, args.tolerance, update, retries)
                cfg = Path(tmp) / f"{data['name']}.yaml"
                cfg.write_text(yaml.safe_dump(data))
                run_dir = Path(tmp) / data["name"]
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir",
                                       str(run_dir), "--no-report"], cwd=tmp, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-2000:])
                    return 1
                evs = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line]
                state = json.loads((run_dir / "state.json").read_text())
                w = energy_changes_after_updates(evs, 32)
                over = sum(1 for x in w if x > args.tolerance)
                count = {k: sum(1 for e in evs if e["event"] == k)
                         for k in ("trial_started", "rollback", "update_rejected")}
                dt = state["walkers"]["w0"].get("timestep_fs") or 20.0
                probations = sum(1 for e in evs if e["event"] == "trial_started" and e.get("probation"))
                halted = " (halted)" if state["walkers"]["w0"].get("halted") else ""
                summary.setdefault(label, []).append((max(w, default=0.0), over / max(len(w), 1),
                                                      state["oracle_calls"]))
                print(f"| {label} | {seed} | {state['oracle_calls']} | {count['trial_started']} ({probations}) "
                      f"| {count['rollback']} | {count['update_rejected']} | {max(w, default=0.0):.4f} | {over}/{len(w)} "
                      f"| {dt:g} | {state['walkers']['w0']['step']}{halted} | {wall:.0f} |", flush=True)
    print("\nmedians over seeds: max ΔE after a model change, share of windows over the tolerance, oracle calls")
    for label, rows in summary.items():
        print(f"  {label:18s} {statistics.median(r[0] for r in rows):.4f} eV/atom  "
              f"{statistics.median(r[1] for r in rows):.0%}  {statistics.median(r[2] for r in rows):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
