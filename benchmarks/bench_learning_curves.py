"""Learning curves per acquisition function from full on-the-fly runs (issue 14): test force RMSE against oracle calls.

For each system (the aluminium melt, ``examples/al_melt.yaml``, and Cu3Au, ``examples/cu3au.yaml``),
each acquisition function (``policy.acquisition``) and each seed, one on-the-fly run with the embedded
services (EMT oracle) and a label budget (``stop.max_labels``).  Afterwards the model after k oracle
calls is rebuilt offline from the run directory — the same labels, the same training atoms, the
hyperparameters of the latest re-optimisation at or before call k — and its force RMSE is measured on
one common held-out EMT trajectory per system (Langevin MD started from the ideal lattice, frames
at two temperatures spanning the run's, independent of every run).

Printed: per system and function, the median RMSE over seeds at each k, and the number of calls each
function needs to reach the final median RMSE of ``max_sigma`` (the paper's rule): the goal is that
``info_gain`` or ``hybrid`` needs ≥ 20 % fewer.

Usage:
  python benchmarks/bench_learning_curves.py [--functions max_sigma,random,fps,info_gain,hybrid]
                                         [--seeds 5] [--labels 30] [--systems al_melt,cu3au]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # ASE's Langevin fixcm notice

SYSTEMS = {
    # the held-out trajectory's temperatures, K
    "al_melt": {"config": "examples/al_melt.yaml", "temperatures": (300.0, 1500.0)},
    "cu3au": {"config": "examples/cu3au.yaml", "temperatures": (600.0, 900.0)},
}


def held_out(system: str, n_per_temperature: int = 10, seed: int = 11):
    """EMT Langevin frames of the system's own cell (its config's structure, not rattled) at each of its
    temperatures, every 20th step of 2 fs after 300 steps of equilibration."""
    import dataclasses

    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from coordinator.config import load_config
    from coordinator.cycle import build_structure

    spec = SYSTEMS[system]
    config = load_config(ROOT / spec["config"])
    config = dataclasses.replace(config, structure=dataclasses.replace(config.structure, rattle=0.0))
    frames, forces = [], []
    rng = np.random.default_rng(seed)
    for t in spec["temperatures"]:
        atoms = build_structure(config)
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=t, rng=rng)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=t, friction=0.02, rng=rng)
        dyn.run(300)
        for _ in range(n_per_temperature):
            dyn.run(20)
            frames.append(atoms.copy())
            forces.append(atoms.get_forces().copy())
    return frames, np.array(forces)


def run_one(system: str, function: str, seed: int, labels: int, work: Path) -> Path:
    data = yaml.safe_load((ROOT / SYSTEMS[system]["config"]).read_text())
    data["seed"] = seed
    data["name"] = f"{system}-{function}-{seed}"
    data.setdefault("policy", {})["acquisition"] = function
    data.setdefault("stop", {})["max_labels"] = labels
    data["sampler"]["steps"] = max(int(data["sampler"]["steps"]), 1500)  # long enough to spend the budget
    cfg = work / f"{data['name']}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_dir = work / data["name"]
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(cfg), "--run-dir", str(run_dir),
                           "--no-report"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{data['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return run_dir


def learning_curve(run_dir: Path, ks: list[int], frames, forces) -> dict[int, float]:
    """Force RMSE (eV/Å) of the model after each k in ``ks`` oracle calls, rebuilt from the run directory."""
    from coordinator.config import load_config
    from coordinator.rundir import RunDirectory
    from learner_service.gp import GaussianProcess

    rd = RunDirectory.open(run_dir)
    config = load_config(run_dir / "config.yaml")
    state = rd.load_state()
    events = list(rd.events())
    optimised = {e["label"]: e["hyperparameters"] for e in events if e["event"] == "optimize"}
    species = sorted({int(z) for a in frames for z in a.numbers})
    labels = [rd.read_label(i) for batch in state.apply_batches for i in batch]
    atoms_of = state.training_atoms
    out = {}
    for k in ks:
        if k > len(labels):
            break
        hyps = dict(config.learner.hyperparameters)
        for idx in sorted(optimised):
            if idx < k:
                hyps = optimised[idx]
        gp = GaussianProcess(species, config.learner.cutoffs, hyps)
        for lab, sel in zip(labels[:k], atoms_of[:k]):
            gp.add_structure(lab.atoms(), forces=lab.forces, atom_indices=sel)
        gp.train()
        pred = np.array([gp.predict(a).forces for a in frames])
        out[k] = float(np.sqrt(np.mean((pred - forces) ** 2)))
    return out


def calls_to_reach(curve: dict[int, float], target: float) -> int | None:
    for k in sorted(curve):
        if curve[k] <= target:
            return k
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", default="max_sigma,random,fps,info_gain,hybrid")
    ap.add_argument("--systems", default="al_melt,cu3au")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--labels", type=int, default=30, help="oracle-call budget per run")
    ap.add_argument("--keep", help="keep the run directories here")
    ap.add_argument("--json", help="write every curve to this file")
    args = ap.parse_args()
    functions = args.functions.split(",")
    ks = sorted({1, 2, 3, 5, 8, *range(10, args.labels + 1, 5), args.labels})
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"budget {args.labels} oracle calls, {args.seeds} seeds")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for system in args.systems.split(","):
            frames, forces = held_out(system)
            print(f"\n## {system}: held-out {len(frames)} frames, force scale "
                  f"{np.sqrt(np.mean(forces ** 2)):.3f} eV/Å (RMS)")
            results[system] = {}
            for fn in functions:
                curves = []
                for seed in range(args.seeds):
                    t0 = time.perf_counter()
                    run_dir = run_one(system, fn, seed, args.labels, work)
                    curves.append(learning_curve(run_dir, ks, frames, forces))
                    print(f"  {fn:10s} seed {seed}: {len(curves[-1])} points, final RMSE "
                          f"{curves[-1][max(curves[-1])]:.4f} eV/Å ({time.perf_counter() - t0:.0f} s)", flush=True)
                results[system][fn] = curves
            print("\n| calls | " + " | ".join(functions) + " |")
            print("|---|" + "---|" * len(functions))
            medians = {fn: {} for fn in functions}
            for k in ks:
                row = []
                for fn in functions:
                    vals = [c[k] for c in results[system][fn] if k in c]
                    med = statistics.median(vals) if len(vals) == args.seeds else None
                    medians[fn][k] = med
                    row.append(f"{med:.4f}" if med is not None else "—")
                print(f"| {k} | " + " | ".join(row) + " |")
            final_k = max(k for k in ks if medians["max_sigma"].get(k) is not None) if "max_sigma" in medians else None
            if final_k:
                target = medians["max_sigma"][final_k]
                print(f"\ncalls to reach max_sigma's median RMSE at {final_k} calls ({target:.4f} eV/Å), median "
                      f"curve:")
                for fn in functions:
                    need = calls_to_reach({k: v for k, v in medians[fn].items() if v is not None}, target)
                    saving = f"{1 - need / final_k:.0%} fewer calls than max_sigma" if need else "not reached"
                    print(f"  {fn:10s} {need if need else '—':>4}  ({saving})")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
