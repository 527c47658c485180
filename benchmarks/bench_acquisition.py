"""Acquisition functions (issue 14): what they cost, and learning curves from replayed trajectories.

``cost``: time of the learner's KernelDistances (in-process and over gRPC) and of one selection
by each rule (in-process model view) against a prediction of the same frame, for growing
training sets.

``curves``: a *replay* of the on-the-fly loop, in-process, for each rule.  A reference EMT MD
trajectory is streamed frame by frame (every ``--stride`` steps); the GP predicts each frame; when
some per-atom σ exceeds the threshold (1·σn) the frame is labelled with EMT ("an oracle call")
and the rule picks ``--atoms`` atoms whose environments enter the training set.  After every call
the force RMSE on a held-out EMT trajectory (another seed, every 40th step) is recorded.  Hyperparameters are held
at the example's initial values (no optimisation), so every rule sees the same threshold and the
curves differ only by the atoms chosen.  Unlike ``epicycle run``, the frames do not depend on the
model (the MD is EMT's, not the GP's): it compares which atoms each rule labels, not how the
model steers MD.

Systems: ``al`` — 32-atom FCC Al (examples/al_melt.yaml: NVE 5 fs, 300 K, velocities rescaled
to 3000 K at 1500 fs, r2/r3 = 6/4 Å); ``cu3au`` — 32-atom L1₂ Cu₃Au (examples/cu3au.yaml:
Langevin 600 K, 2 fs, r2/r3 = 5.5/4 Å).

Usage:
  python benchmarks/bench_acquisition.py cost
  python benchmarks/bench_acquisition.py curves --system al --seeds 5 [--json out.json]
  python benchmarks/bench_acquisition.py summary out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402

from coordinator.acquisition import (ACQUISITION, AcquisitionContext, AcquisitionSettings, Candidate,  # noqa: E402
                                     GPModelView, KernelDistances, per_atom_sigma)
from learner_service.gp import GaussianProcess  # noqa: E402

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
RULES = ("max_sigma", "random", "fps", "info_gain", "hybrid")


# --------------------------------------------------------------------------- systems


def _start(system: str, seed: int):
    if system == "al":
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    else:
        from ase.lattice.compounds import L1_2

        atoms = L1_2(symbol=("Au", "Cu"), latticeconstant=3.75, size=(1, 1, 1)).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).normal(scale=0.02, size=atoms.positions.shape)
    atoms.calc = EMT()
    return atoms


def trajectory(system: str, seed: int, steps: int, stride: int) -> list:
    """EMT MD frames (every ``stride`` steps, the start included) with their EMT forces."""
    atoms = _start(system, seed)
    rng = np.random.default_rng(seed + 7)
    if system == "al":
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
        dyn = VelocityVerlet(atoms, 5.0 * units.fs)
        melt_step = 300
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=600, friction=0.01 / units.fs, rng=rng)
        melt_step = None
    frames = []
    for step in range(steps + 1):
        if step % stride == 0:
            f = atoms.copy()
            f.info["forces"] = atoms.get_forces().copy()
            frames.append(f)
        if melt_step is not None and step == melt_step:
            t = atoms.get_temperature()
            atoms.set_velocities(atoms.get_velocities() * np.sqrt(3000.0 / max(t, 1.0)))
        dyn.run(1)
    return frames


def model(system: str) -> GaussianProcess:
    if system == "al":
        return GaussianProcess([13], (6.0, 4.0), HYPS)
    return GaussianProcess([29, 79], (5.5, 4.0), HYPS)


def rmse(gp: GaussianProcess, test: list) -> float:
    err = [gp.predict(f).forces - f.info["forces"] for f in test]
    return float(np.sqrt(np.mean(np.concatenate(err) ** 2)))


# --------------------------------------------------------------------------- replay


def replay(system: str, rule: str, seed: int, pool: list, test: list, atoms_per_call: int, fps_calls: int) -> dict:
    gp = model(system)
    first = pool[0]
    initial = [0, 1, 2, 3] if system == "cu3au" else sorted(np.random.default_rng(seed).choice(32, 4, replace=False))
    gp.add_structure(first, forces=first.info["forces"], atom_indices=initial)
    gp.train()
    view = GPModelView(gp)
    acq = ACQUISITION[rule]()
    settings = AcquisitionSettings(atoms_per_call=atoms_per_call, hybrid_fps_calls=fps_calls)
    calls = [0]
    errors = [rmse(gp, test)]
    seconds = 0.0
    for k, frame in enumerate(pool[1:], start=1):
        sigma = per_atom_sigma(gp.predict(frame).force_std)
        threshold = gp.noise
        if sigma.max() <= threshold:
            continue
        ctx = AcquisitionContext(model=view, noise=gp.noise, threshold=threshold, call_index=len(calls),
                                 rng=np.random.default_rng([seed, 1, k]), settings=settings)
        started = time.perf_counter()
        sel = acq.select(Candidate(frame, sigma), ctx)
        seconds += time.perf_counter() - started
        gp.add_structure(frame, forces=frame.info["forces"], atom_indices=sel.atoms.tolist())
        gp.train()
        calls.append(k)
        errors.append(rmse(gp, test))
    return {"rule": rule, "seed": seed, "calls": len(calls), "rmse": errors, "select_seconds": seconds,
            "environments": gp.n_environments}


def calls_to_reach(errors: list, target: float) -> int | None:
    """Oracle calls (the first frame is call 0) after which the RMSE is first <= target."""
    for i, e in enumerate(errors):
        if e <= target:
            return i
    return None


def curves(args) -> None:
    steps, stride = (args.steps or (600 if args.system == "al" else 500)), 5
    test = trajectory(args.system, 1000, steps, 40)[1:]
    out = []
    for seed in range(args.seeds):
        pool = trajectory(args.system, seed, steps, stride)
        for rule in args.rules:
            t = time.perf_counter()
            r = replay(args.system, rule, seed, pool, test, args.atoms, args.fps_calls)
            r["wall_seconds"] = time.perf_counter() - t
            out.append(r)
            print(f"{args.system} seed {seed} {rule:10s} calls {r['calls'] - 1:3d} final RMSE {r['rmse'][-1]:.4f} "
                  f"eV/Å  select {r['select_seconds']:.2f} s  wall {r['wall_seconds']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"system": args.system, "atoms_per_call": args.atoms,
                                               "fps_calls": args.fps_calls, "runs": out}))
    summarise(out, args.rules)


def summarise(out: list, rules) -> None:
    by = {(r["rule"], r["seed"]): r for r in out}
    seeds = sorted({r["seed"] for r in out})
    print("\nrule        calls (median [min, max])  final RMSE eV/Å (median)  calls to reach max_sigma's final "
          "RMSE, as a fraction of max_sigma's calls (per seed; - = never)")
    for rule in rules:
        calls = [by[rule, s]["calls"] - 1 for s in seeds]
        final = [by[rule, s]["rmse"][-1] for s in seeds]
        frac = []
        for s in seeds:
            ref = by["max_sigma", s]
            c = calls_to_reach(by[rule, s]["rmse"], ref["rmse"][-1])
            frac.append("-" if c is None else f"{c / max(ref['calls'] - 1, 1):.2f}")
        print(f"{rule:10s}  {statistics.median(calls):5.0f} [{min(calls)}, {max(calls)}]"
              f"          {statistics.median(final):.4f}                   {' '.join(frac)}")
    marks = (1, 5, 10, 15, 20)
    print("\nforce RMSE, eV/Å, median over seeds after k oracle calls (the first frame not counted)")
    print("rule        " + "  ".join(f"k={k:<4d}" for k in marks))
    for rule in rules:
        row = []
        for k in marks:
            vals = [by[rule, s]["rmse"][k] for s in seeds if len(by[rule, s]["rmse"]) > k]
            row.append(f"{statistics.median(vals):.4f}" if len(vals) == len(seeds) else "  -   ")
        print(f"{rule:10s}  " + "  ".join(row))


# --------------------------------------------------------------------------- cost


class _FullMatrixView(GPModelView):
    """The former way of farthest-point sampling, for comparison: the first question computes
    d_train and the whole (m, m) matrix, later rows are read from it."""

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
        if train:
            self._full = super().kernel_distances(atoms, atom_indices)
            return KernelDistances(self._full.d_train, self._full.d_within[list(rows)] if rows is not None
                                   else self._full.d_within)
        return KernelDistances(np.zeros(0), self._full.d_within[list(rows)])


def cost(args) -> None:
    from learner_service.client import LearnerClient
    from learner_service.server import LearnerServiceConfig, start_learner_server

    frames = trajectory("al", 3, 400, 10)
    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(6.0, 4.0), hyperparameters=HYPS,
                                                        predict_threads=1))
    client = LearnerClient(running.address)
    client.wait_ready(600)
    gp = model("al")
    gp.predict_threads = 1
    probe = frames[-1]
    big = {128: probe.repeat((2, 2, 1)), 256: probe.repeat((2, 2, 2))}
    print("training envs | frame atoms | predict ms | KernelDistances in-process ms: full (m, m) matrix, "
          "d_train only, one row | over gRPC: d_train only, one row | select ms (atoms_per_call 1 / 4): "
          "max_sigma, fps from the full matrix (before), fps row by row (now), info_gain")
    k = 0
    for target in (50, 200, 800):
        while gp.n_environments < target:
            f = frames[k % len(frames)]
            idx = list(range((k * 8) % 32, (k * 8) % 32 + 8))
            gp.add_structure(f, forces=f.info["forces"], atom_indices=idx)
            client.add_data(f, forces=f.info["forces"], atom_indices=idx)
            k += 1
        gp.train()
        view = GPModelView(gp)
        for frame in ((probe, big[128], big[256]) if target < 800 else (probe,)):
            def median_ms(fn, repeats=args.repeats):
                fn()  # warm (caches, JIT)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return 1000 * statistics.median(times)

            pred = median_ms(lambda: gp.predict(frame))
            full = median_ms(lambda: gp.kernel_distances(frame))
            local = median_ms(lambda: gp.kernel_distances(frame, rows=[]))
            row = median_ms(lambda: gp.kernel_distances(frame, rows=[0], train=False))
            remote = median_ms(lambda: client.kernel_distances(frame, rows=[]))
            remote_row = median_ms(lambda: client.kernel_distances(frame, rows=[0], train=False))
            sigma = per_atom_sigma(gp.predict(frame).force_std)
            sel = []
            for rule, v in (("max_sigma", view), ("fps", _FullMatrixView(gp)), ("fps", view), ("info_gain", view)):
                for n in (1, 4):
                    ctx = AcquisitionContext(model=v, noise=gp.noise, threshold=gp.noise,
                                             settings=AcquisitionSettings(atoms_per_call=n))
                    sel.append(median_ms(lambda: ACQUISITION[rule]().select(Candidate(frame, sigma), ctx),
                                         max(1, args.repeats // 2)))
            print(f"{gp.n_environments:5d} | {len(frame):4d} | {pred:8.1f} | {full:8.1f}, {local:8.1f}, {row:6.1f} | "
                  f"{remote:8.1f}, {remote_row:6.1f} | "
                  + ", ".join(f"{sel[i]:.1f}/{sel[i + 1]:.1f}" for i in range(0, 8, 2)), flush=True)
    client.close()
    running.stop(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--repeats", type=int, default=5)
    c.set_defaults(fn=cost)
    lc = sub.add_parser("curves")
    lc.add_argument("--system", choices=("al", "cu3au"), default="al")
    lc.add_argument("--seeds", type=int, default=5)
    lc.add_argument("--atoms", type=int, default=2, help="atoms_per_call")
    lc.add_argument("--fps-calls", type=int, default=5, help="hybrid_fps_calls")
    lc.add_argument("--rules", nargs="+", default=list(RULES))
    lc.add_argument("--steps", type=int, default=0, help="MD steps of each trajectory (0: al 600, cu3au 500)")
    lc.add_argument("--json", default="")
    lc.set_defaults(fn=curves)
    sm = sub.add_parser("summary", help="summarise the --json of an earlier curves run")
    sm.add_argument("json")
    sm.set_defaults(fn=lambda a: summarise(json.loads(Path(a.json).read_text())["runs"],
                                           [r for r in RULES if r in {x["rule"] for x in
                                                                      json.loads(Path(a.json).read_text())["runs"]}]))
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
