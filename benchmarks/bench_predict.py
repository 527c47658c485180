"""Prediction benchmark: forces + per-component σ of every atom (prints a table; not a test).

Model: FCC aluminium, r2 = 6 Å, r3 = 4 Å, EMT force labels; training environments from
the 32-atom cells of learner_service.datasets.perturbed_fcc_al (seed 0), frames in order
(datasets.training_selection), fixed hyperparameters.  Test structures: an unseen 32-atom
cell of the same set, and a 1000-atom cell (10x10x10 primitive FCC cells, a = 4.05 Å,
coordinates displaced uniformly by up to ±5 % of a, seed 1).

For 16/50/200 training environments it reports the median wall and CPU time of
``GaussianProcess.predict(atoms)`` (fast path) with 1 and 2 kernel threads, and, with
``--general``, of the general kernel_blocks path that predict() used before (same
environments, same linear algebra; 32 atoms only unless ``--general-1000``).  numba
compilation (or loading the compiled kernels from the cache) is timed separately,
before anything else.  Note the machine load printed at the start: CPU time is the
fairer number on a shared machine, wall time is what an MD step waits for.

    python benchmarks/bench_predict.py [--sizes 16,50,200] [--repeats 21] [--general]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

T_START = time.perf_counter()

from ase.build import bulk  # noqa: E402

from learner_service.datasets import perturbed_fcc_al, training_selection  # noqa: E402
from learner_service.environment import build_environments  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402

R2, R3 = 6.0, 4.0
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def big_cell(n_rep=10, a=4.05, delta=0.05, seed=1):
    at = bulk("Al", "fcc", a=a) * (n_rep, n_rep, n_rep)
    rng = np.random.default_rng(seed)
    at.positions = at.positions + rng.uniform(-delta * a, delta * a, at.positions.shape)
    return at


def build(frames, n_envs):
    gp = GaussianProcess([13], (R2, R3), dict(HYPS))
    for frame, idx in training_selection(n_envs):
        gp.add_structure(frames[frame], forces=frames[frame].get_forces(), atom_indices=idx)
    gp.train()
    return gp


def timed(fn, repeats):
    """(median wall, median CPU of this process) in seconds."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def general(gp, atoms):
    """What predict() did before the fast path: kernel_blocks + scipy's triangular solve."""
    envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                              atoms.get_pbc(), gp.cutoffs)
    return gp._predict_general(envs, gp._factorize(), False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,50,200")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--repeats-1000", type=int, default=5)
    ap.add_argument("--general", action="store_true", help="also time the general (previous) path")
    ap.add_argument("--general-1000", action="store_true", help="... also for 1000 atoms (slow)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} CPUs; "
          f"imports {time.perf_counter() - T_START:.2f} s")

    frames = perturbed_fcc_al(max(sizes) // 32 + 2, seed=0)
    test32 = frames[-1]
    test1000 = big_cell()
    assert len(test1000) == 1000

    t0 = time.perf_counter()
    warm = build(frames, 4)
    warm.predict(test32)
    jit = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.general:
        general(warm, test32)
    jit_general = time.perf_counter() - t0
    print(f"JIT warm-up (compile, or load the cached kernels): fast path {jit:.2f} s"
          + (f", general path {jit_general:.2f} s" if args.general else ""))

    print(f"\n{'train envs':>10} {'atoms':>6} {'path':>18} {'wall ms':>9} {'cpu ms':>9} {'wall ms/atom':>13}")
    for n in sizes:
        gp = build(frames, n)
        for atoms, reps in ((test32, args.repeats), (test1000, args.repeats_1000)):
            gp.predict(atoms)
            for threads in (1, 2):
                gp.predict_threads = threads
                w, c = timed(lambda: gp.predict(atoms), reps)
                label = f"fast, {threads} thread" + ("s" if threads > 1 else "")
                print(f"{n:>10} {len(atoms):>6} {label:>18} {1e3 * w:9.2f} {1e3 * c:9.2f} {1e3 * w / len(atoms):13.4f}")
            gp.predict_threads = 1
            if args.general and (len(atoms) <= 32 or args.general_1000):
                w, c = timed(lambda: general(gp, atoms), max(3, reps // 4))
                print(f"{n:>10} {len(atoms):>6} {'general (before)':>18} {1e3 * w:9.2f} {1e3 * c:9.2f} "
                      f"{1e3 * w / len(atoms):13.4f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
