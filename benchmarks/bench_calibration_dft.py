"""Calibration on a held-out real-DFT set (issue 13): GPAW-labelled Al, s fitted on validation frames.

Data: 8-atom FCC Al cells (conventional cube x (2, 1, 1), a = 4.04 Å), snapshots of short EMT Langevin
MD at two temperatures (``--temperatures``, default 300 and 900 K; 5 fs, 200 steps to equilibrate, then
one frame every 40 steps), labelled by the GPAW oracle backend (``oracle_service.backends.gpaw``:
plane waves, PBE, 250 eV, 2x4x4 Monkhorst-Pack k-points, Fermi-Dirac 0.1 eV, symmetry off, the free
energy and its forces).  The frames are cached in ``--cache`` (extended XYZ, one frame appended per
DFT calculation, so an interrupted run resumes); absent frames are computed.

Protocol, per split (``--splits`` random permutations of the frames, mixing both temperatures):
the first ``max(--train)`` frames are the training pool (sizes ``--train``, default 2, 4, 8: prefixes
of the pool), the next ``--val-frames`` (default 8) fit s of σ_cal = sqrt(s²σ_ep² + σn²), the rest
(at least 20) are the test frames.  The model is fitted as ``epicycle fit`` does it (mode ``fit``),
with the start values (``fixed``) or with ML-II (``ml2``) -- ``benchmarks/bench_fig2b.py``'s helpers.
Printed per size and mode (medians over splits): test RMSE, s, mean z², within 1σ / 2σ with the
model's total σ (raw) and with σ_cal (scaled).  Goal: mean z² in [0.8, 1.25], 2σ coverage 93–97 %
after scaling.

    PYTHONPATH=. python benchmarks/bench_calibration_dft.py [--cache /tmp/epicycle_gpaw_al8.xyz]
        [--frames-per-temperature 18] [--splits 3] [--train 2,4,8] [--val-frames 8] [--modes fit,fixed,ml2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fig2b import MODES, fit_like_epicycle, measure, warm_up  # noqa: E402

CUTOFFS = (6.0, 4.0)
GPAW_SETTINGS = {"ecut": 250.0, "xc": "PBE", "kpts": (2, 4, 4), "smearing": "fermi-dirac", "width": 0.1,
                 "symmetry": "off"}
GOAL_Z2 = (0.8, 1.25)
GOAL_COV2 = (0.93, 0.97)


def md_structures(temperature: float, n: int, seed: int, a: float = 4.04):
    """``n`` snapshots of EMT Langevin MD of 8-atom FCC Al at ``temperature`` (K)."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Al", "fcc", a=a, cubic=True) * (2, 1, 1)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=2 * temperature, rng=rng)
    md = Langevin(atoms, 5 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    md.run(200)
    out = []
    for _ in range(n):
        md.run(40)
        snap = atoms.copy()
        snap.calc = None
        snap.info["md_temperature_K"] = float(temperature)
        out.append(snap)
    return out


def dft_frames(cache: Path, temperatures, per_temperature: int, seed: int = 0, log=print):
    """The labelled frames, from ``cache`` where present; the missing ones computed with GPAW and
    appended to ``cache``.  Frames alternate between the temperatures."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    wanted = []
    by_t = [md_structures(t, per_temperature, seed + k) for k, t in enumerate(temperatures)]
    for i in range(per_temperature):
        for frames in by_t:
            wanted.append(frames[i])
    have = read(cache, index=":", format="extxyz") if cache.exists() else []
    for k, (h, w) in enumerate(zip(have, wanted)):
        if not np.allclose(h.positions, w.positions, atol=1e-6):
            raise SystemExit(f"{cache}: frame {k} is not this benchmark's structure (other settings?); "
                             f"delete the file or give another --cache")
    if len(have) >= len(wanted):
        return have[:len(wanted)]
    from oracle_service.base import create_oracle

    oracle = create_oracle("gpaw", **GPAW_SETTINGS)
    try:
        t0 = time.perf_counter()
        for k in range(len(have), len(wanted)):
            at = wanted[k].copy()
            lab = oracle.calculate(at, ("energy", "forces"))
            at.calc = SinglePointCalculator(at, energy=lab.energy, forces=lab.forces)
            write(cache, at, format="extxyz", append=True)
            have.append(at)
            log(f"  GPAW frame {k + 1}/{len(wanted)} (T = {at.info['md_temperature_K']:.0f} K): "
                f"max |F| {np.abs(lab.forces).max():.3f} eV/Å, {time.perf_counter() - t0:.0f} s so far", flush=True)
    finally:
        oracle.close()
    return have


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="/tmp/epicycle_gpaw_al8.xyz",
                   help="extended XYZ of the GPAW-labelled frames (computed where absent)")
    p.add_argument("--temperatures", default="300,900", help="MD temperatures of the snapshots, K")
    p.add_argument("--frames-per-temperature", type=int, default=18, help="snapshots per temperature")
    p.add_argument("--splits", type=int, default=3, help="random train/validation/test splits (medians over them)")
    p.add_argument("--train", default="2,4,8", help="training set sizes, frames")
    p.add_argument("--val-frames", type=int, default=8, help="frames that fit s")
    p.add_argument("--modes", default="fit,fixed,ml2",
                   help="fit (epicycle fit's MAP), fixed (start values), ml2 (--prior none), ml2-nocheck (also --holdout 0)")
    p.add_argument("--json", help="append every run as a JSON line to this file")
    args = p.parse_args(argv)
    temps = [float(x) for x in args.temperatures.split(",")]
    if any(t <= 0 for t in temps):
        p.error("--temperatures must be > 0 K")
    sizes = [int(x) for x in args.train.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    frames = dft_frames(Path(args.cache), temps, args.frames_per_temperature)
    n_test = len(frames) - max(sizes) - args.val_frames
    if n_test < 1:
        p.error(f"{len(frames)} frames leave no test frames after {max(sizes)} training and {args.val_frames} "
                f"validation frames")
    print(f"# {len(frames)} GPAW frames ({args.cache}); per split: training pool {max(sizes)}, validation "
          f"{args.val_frames}, test {n_test} frames ({3 * 8 * n_test} force components)")
    warm_up()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for split in range(args.splits):
            order = np.random.default_rng([split, 13]).permutation(len(frames))
            pool = [frames[i] for i in order[:max(sizes)]]
            val = [frames[i] for i in order[max(sizes):max(sizes) + args.val_frames]]
            test = [frames[i] for i in order[max(sizes) + args.val_frames:]]
            for n in sizes:
                for mode in modes:
                    gp = fit_like_epicycle(pool[:n], CUTOFFS, mode, split, work)
                    m = measure(gp, pool[:n], val, test)
                    results.setdefault((n, mode), []).append(m)
                    v = m["val"]
                    print(f"  split {split} {n} frames {mode}: RMSE {v['rmse']:.4f} eV/Å, s {v['scale']:.2f}, "
                          f"mean z² {v['raw']['mean_squared_z']:.2f} -> {v['scaled']['mean_squared_z']:.2f}, "
                          f"2σ {100 * v['raw']['within_2_sigma']:.1f} -> {100 * v['scaled']['within_2_sigma']:.1f} %",
                          flush=True)
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps({"split": split, "frames": n, "mode": mode, **m}) + "\n")

    def med(xs):
        return statistics.median(xs)

    print(f"\n== GPAW Al (8 atoms), s from {args.val_frames} validation frames, judged on {n_test} test frames; "
          f"medians over {args.splits} splits ==")
    print("| frames | mode | test RMSE eV/Å | s | mean z² raw → scaled | within 1σ raw → scaled | "
          "within 2σ raw → scaled | goal (z², 2σ) | s_test | kurt. z_cal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for n in sizes:
            rs = results[(n, mode)]
            v = [r["val"] for r in rs]
            z2r, z2s = med([x["raw"]["mean_squared_z"] for x in v]), med([x["scaled"]["mean_squared_z"] for x in v])
            c1r, c1s = med([x["raw"]["within_1_sigma"] for x in v]), med([x["scaled"]["within_1_sigma"] for x in v])
            c2r, c2s = med([x["raw"]["within_2_sigma"] for x in v]), med([x["scaled"]["within_2_sigma"] for x in v])
            ok_z = GOAL_Z2[0] <= z2s <= GOAL_Z2[1]
            ok_c = GOAL_COV2[0] <= c2s <= GOAL_COV2[1]
            print(f"| {n} | {mode} | {med([x['rmse'] for x in v]):.4f} | {med([x['scale'] for x in v]):.2f} | "
                  f"{z2r:.2f} → {z2s:.2f} | {100 * c1r:.1f} → {100 * c1s:.1f} % | {100 * c2r:.1f} → {100 * c2s:.1f} % | "
                  f"{'met' if ok_z else 'missed'}, {'met' if ok_c else 'missed'} | "
                  f"{med([r['s_test'] for r in rs]):.2f} | {med([r['kurtosis_cal'] for r in rs]):.1f} |")
    print("per split, scaled mean z² / 2σ: " + "; ".join(
        f"{n} {mode}: " + ", ".join(f"{r['val']['scaled']['mean_squared_z']:.2f}/"
                                    f"{100 * r['val']['scaled']['within_2_sigma']:.0f}%" for r in results[(n, mode)])
        for mode in modes for n in sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
