"""Paper Fig. 2b analogue (issue 13): test RMSE and RMS σ (raw and calibrated) vs training frames.

EMT Al (32-atom FCC, ±5 % uniform displacements, r2 = 6, r3 = 4 Å) and EMT Cu3Au (L1_2 2x2x2, ±5 %,
r2 = 5.5, r3 = 4 Å), the data helpers of ``benchmarks/bench_hyperopt.py`` (imported).  Per system,
training size n (``--frames``, default 1, 2, 4, 8 frames, all atoms) and seed:

* train = n frames (seed), test = ``--test-frames`` (default 20) frames (seed 10,000 + seed),
  validation = ``--val-frames`` (default 2) frames (seed 20,000 + seed), drawn like the training frames;
* the model is fitted by the procedure of ``epicycle fit`` (``learner_service.offline.fit_model`` on an
  extended XYZ of the training frames, its defaults: MAP with the data prior, 3 restarts, 20 % held out
  for the check, then added back) -- mode ``fit``; also ``fixed`` (the start values, no optimisation)
  and ``ml2`` (the same search with ``--prior none``); on request ``ml2-nocheck`` (``--prior none --holdout 0``:
  plain ML-II without the held-out check);
* s of σ_cal = sqrt(s²σ_ep² + σn²) (``coordinator.calibration.epistemic_scale``: MAP, inverse-gamma
  prior) is fitted on residuals the model did not train on and that are NOT the test set:
  ``val``: the validation frames predicted by the final model;
  ``lofo``: leave-one-frame-out on the training frames (n ≥ 2; each frame predicted by the same
  hyperparameters trained on the other n − 1 frames; σ and errors of a model with one frame less);
* then judged on the test frames (``learner_service.calibration.heldout_calibration``).

Printed per system, size and mode (medians over ``--repeats`` seeds): test RMSE; RMS σ_ep and RMS
total σ sqrt(σ_ep² + σn²) of the model; s (val); RMS σ_cal; ratio RMS σ_cal / RMSE (goal [0.7, 1.4]);
mean z² and 2σ coverage with σ_cal (raw in brackets); the same ratio with s from lofo; and, to read
misses, s_test (s fitted on the test set itself: the best a single scale can do), the excess kurtosis
of z_cal (0 for a Gaussian) and r, the correlation over test frames of log RMS σ_tot with log RMSE.
A plot like the paper's Fig. 2b (RMSE and σ vs training frames, log-log) goes to ``--plot``.

    PYTHONPATH=. python benchmarks/bench_fig2b.py [--systems Al,Cu3Au] [--frames 1,2,4,8] [--repeats 3]
        [--modes fit,fixed,ml2] [--plot /tmp/fig2b.png] [--json /tmp/fig2b.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_hyperopt import AL_CUTOFFS, CU3AU_CUTOFFS, frames_of  # noqa: E402
from learner_service.calibration import heldout_calibration, variance_scale  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402

MODES = ("fit", "fixed", "ml2", "ml2-nocheck")
GOAL_RATIO = (0.7, 1.4)


def cutoffs_of(system: str) -> tuple[float, float]:
    return AL_CUTOFFS if system == "Al" else CU3AU_CUTOFFS


def fit_like_epicycle(frames, cutoffs, mode: str, seed: int, workdir) -> GaussianProcess:
    """The model ``epicycle fit`` would build from ``frames`` (all atoms): ``mode`` "fit" (its defaults:
    MAP, data prior), "ml2" (``--prior none``), "ml2-nocheck" (``--prior none --holdout 0``: plain ML-II,
    no held-out check) or "fixed" (``--no-optimize``)."""
    from ase.io import write

    from learner_service.offline import fit_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = Path(workdir) / f"train_{mode}_{seed}.xyz"
    write(path, frames, format="extxyz")
    gp, _ = fit_model(str(path), cutoffs, seed=seed, log=lambda s: None, optimize=mode != "fixed",
                      prior="none" if mode.startswith("ml2") else "data",
                      holdout=0.0 if mode == "ml2-nocheck" else 0.2)
    return gp


def residuals(gp: GaussianProcess, frames) -> tuple[np.ndarray, np.ndarray, float]:
    """(r, σ_ep, σn) of every force component of ``frames``: r = GP − reference (eV/Å)."""
    r, e = [], []
    for f in frames:
        p = gp.predict(f)
        r.append((p.forces - f.get_forces()).ravel())
        e.append(p.force_std.ravel())
    return np.concatenate(r), np.concatenate(e), float(gp.noise)


def per_frame(gp: GaussianProcess, frames) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: RMSE and RMS total σ (eV/Å)."""
    err, sig = [], []
    for f in frames:
        p = gp.predict(f)
        err.append(math.sqrt(np.mean((p.forces - f.get_forces()) ** 2)))
        sig.append(math.sqrt(np.mean(p.force_std ** 2 + p.noise ** 2)))
    return np.array(err), np.array(sig)


def leave_one_frame_out(gp: GaussianProcess, frames):
    """(r, σ_ep, σn) of each training frame predicted by a GP at ``gp``'s hyperparameters trained on
    the other frames; None with fewer than two frames."""
    if len(frames) < 2:
        return None
    r, e = [], []
    for k in range(len(frames)):
        other = GaussianProcess(list(gp.species), (gp.cutoffs.r2, gp.cutoffs.r3), dict(gp.hyperparameters))
        for j, f in enumerate(frames):
            if j != k:
                other.add_structure(f, forces=f.get_forces())
        other.train()
        rk, ek, _ = residuals(other, [frames[k]])
        r.append(rk)
        e.append(ek)
    return np.concatenate(r), np.concatenate(e), float(gp.noise)


def excess_kurtosis(z: np.ndarray) -> float:
    m2 = float(np.mean(z * z))
    return float(np.mean(z ** 4) / (m2 * m2) - 3.0)


def measure(gp: GaussianProcess, train, val, test) -> dict:
    """Everything of one row for one fitted model: test RMSE, raw σ, s from ``val`` (and from
    leave-one-frame-out of ``train``), σ_cal judged on ``test``; plus the diagnostics of a miss."""
    t = residuals(gp, test)
    v = residuals(gp, val)
    out = {"hyperparameters": {k: float(gp.hyperparameters[k]) for k in gp.hyperparameter_names}}
    hv = heldout_calibration(v, t)
    out["val"] = hv.as_dict()
    lo = leave_one_frame_out(gp, train)
    out["lofo"] = heldout_calibration(lo, t).as_dict() if lo is not None else None
    ideal = heldout_calibration(t, t)
    out["s_test"] = ideal.scale
    out["ratio_at_s_test"] = ideal.ratio
    r, e, nu = t
    cal = np.sqrt((hv.scale * e) ** 2 + nu ** 2)
    out["kurtosis_cal"] = excess_kurtosis(r / cal)
    # is the scale the same for small and large σ?  RMSE / RMS σ_cal in the top decile of σ_cal and below it
    top = cal >= np.quantile(cal, 0.9)
    out["ratio_err_sigma_top10"] = float(np.sqrt(np.mean(r[top] ** 2) / np.mean(cal[top] ** 2)))
    out["ratio_err_sigma_rest"] = float(np.sqrt(np.mean(r[~top] ** 2) / np.mean(cal[~top] ** 2)))
    # the alternative the design rejects (a uniform scale of the total σ, σn included), fitted on val too:
    # tells whether a miss comes from σn, which scaling σ_ep alone cannot shrink
    st = variance_scale(v[0], np.sqrt(v[1] ** 2 + v[2] ** 2))
    tot = st * np.sqrt(e ** 2 + nu ** 2)
    out["total_scale"] = st
    out["total_scaled_ratio"] = float(np.sqrt(np.mean(tot ** 2) / np.mean(r ** 2)))
    out["total_scaled_z2"] = float(np.mean((r / tot) ** 2))
    err, sig = per_frame(gp, test)
    out["frame_corr"] = float(np.corrcoef(np.log(sig), np.log(err))[0, 1]) if np.ptp(sig) > 0 else math.nan
    out["worst_frame_share"] = float(np.max(err ** 2) / np.sum(err ** 2))  # of the summed squared error
    return out


def one_run(system: str, n: int, seed: int, modes, n_val: int, n_test: int, workdir) -> dict:
    train = frames_of(system, n, seed)
    test = frames_of(system, n_test, 10_000 + seed)
    val = frames_of(system, n_val, 20_000 + seed)
    out = {"system": system, "frames": n, "seed": seed}
    for mode in modes:
        t0 = time.process_time()
        gp = fit_like_epicycle(train, cutoffs_of(system), mode, seed, workdir)
        fit_cpu = time.process_time() - t0
        out[mode] = measure(gp, train, val, test)
        out[mode]["fit_cpu_s"] = fit_cpu
    return out


def _med(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


def summarise(runs, mode: str) -> dict:
    """Medians over seeds of one (system, size, mode)."""
    m = [r[mode] for r in runs]
    val = [x["val"] for x in m]
    lofo = [x["lofo"] for x in m]
    return {
        "rmse": _med([x["rmse"] for x in val]),
        "rms_ep": _med([x["rms_sigma_epistemic"] for x in val]),
        "rms_tot": _med([x["rms_sigma_total"] for x in val]),
        "raw_ratio": _med([x["rms_sigma_total"] / x["rmse"] for x in val]),
        "s": _med([x["scale"] for x in val]),
        "rms_cal": _med([x["rms_sigma_calibrated"] for x in val]),
        "ratio": _med([x["ratio"] for x in val]),
        "ratios": [x["ratio"] for x in val],
        "z2": _med([x["scaled"]["mean_squared_z"] for x in val]),
        "z2_raw": _med([x["raw"]["mean_squared_z"] for x in val]),
        "cov1": _med([x["scaled"]["within_1_sigma"] for x in val]),
        "cov2": _med([x["scaled"]["within_2_sigma"] for x in val]),
        "cov2_raw": _med([x["raw"]["within_2_sigma"] for x in val]),
        "s_lofo": _med([x["scale"] if x else None for x in lofo]),
        "ratio_lofo": _med([x["ratio"] if x else None for x in lofo]),
        "z2_lofo": _med([x["scaled"]["mean_squared_z"] if x else None for x in lofo]),
        "s_test": _med([x["s_test"] for x in m]),
        "ratio_at_s_test": _med([x["ratio_at_s_test"] for x in m]),
        "top10": _med([x["ratio_err_sigma_top10"] for x in m]),
        "rest": _med([x["ratio_err_sigma_rest"] for x in m]),
        "worst_share": _med([x["worst_frame_share"] for x in m]),
        "total_ratio": _med([x["total_scaled_ratio"] for x in m]),
        "total_z2": _med([x["total_scaled_z2"] for x in m]),
        "sigma_n": _med([x["hyperparameters"]["noise"] for x in m]),
        "kurtosis": _med([x["kurtosis_cal"] for x in m]),
        "frame_corr": _med([x["frame_corr"] for x in m]),
        "fit_cpu_s": _med([x["fit_cpu_s"] for x in m]),
    }


HEADER = ("| system | frames | mode | test RMSE | RMS σ_ep | RMS σ_tot | s (val) | RMS σ_cal | σ_cal/RMSE "
          "| mean z² cal (raw) | 1σ / 2σ cal (2σ raw) | s (lofo) | σ_cal/RMSE lofo |")
WHY = ("| system | frames | mode | s val / lofo / test | σ_cal/RMSE at s_test | RMSE/RMS σ_cal top 10 % σ / rest "
       "| kurtosis z_cal | r(log σ, log err) frames | worst frame's share of Σerr² | σn | total σ scaled: σ/RMSE, z² |")


def row(system: str, n: int, mode: str, s: dict) -> str:
    def f(x, fmt):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    goal = "met" if all(GOAL_RATIO[0] <= x <= GOAL_RATIO[1] for x in s["ratios"]) else (
        "median met" if GOAL_RATIO[0] <= s["ratio"] <= GOAL_RATIO[1] else "missed")
    return (f"| {system} | {n} | {mode} | {s['rmse']:.4f} | {s['rms_ep']:.4f} | {s['rms_tot']:.4f} | {s['s']:.2f} | "
            f"{s['rms_cal']:.4f} | {s['ratio']:.2f} ({goal}) | {s['z2']:.2f} ({s['z2_raw']:.2f}) | "
            f"{100 * s['cov1']:.0f} / {100 * s['cov2']:.1f} % ({100 * s['cov2_raw']:.1f}) | {f(s['s_lofo'], '.2f')} | "
            f"{f(s['ratio_lofo'], '.2f')} |")


def why_row(system: str, n: int, mode: str, s: dict) -> str:
    lofo = "—" if math.isnan(s["s_lofo"]) else f"{s['s_lofo']:.2f}"
    corr = "—" if math.isnan(s["frame_corr"]) else f"{s['frame_corr']:.2f}"
    return (f"| {system} | {n} | {mode} | {s['s']:.2f} / {lofo} / {s['s_test']:.2f} | {s['ratio_at_s_test']:.2f} | "
            f"{s['top10']:.2f} / {s['rest']:.2f} | {s['kurtosis']:.1f} | {corr} | {100 * s['worst_share']:.0f} % | "
            f"{s['sigma_n']:.4f} | {s['total_ratio']:.2f}, {s['total_z2']:.2f} |")


def plot(table: dict, modes, path: str) -> None:
    """Fig. 2b: per system (rows) and mode (columns), RMSE and RMS σ vs training frames, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.NullFormatter below)

    systems = sorted({k[0] for k in table}, key=lambda s: (s != "Al", s))
    fig, axes = plt.subplots(len(systems), len(modes), figsize=(4.2 * len(modes), 3.4 * len(systems)),
                             squeeze=False)
    for i, system in enumerate(systems):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            ns = sorted(n for (s, n, m) in table if s == system and m == mode)
            if not ns:
                continue
            get = lambda key: [table[(system, n, mode)][key] for n in ns]  # noqa: E731
            ax.loglog(ns, get("rmse"), "ko-", label="test RMSE")
            ax.loglog(ns, get("rms_tot"), "s--", color="tab:blue", label="RMS σ (with σn)")
            ax.loglog(ns, get("rms_ep"), "v:", color="tab:blue", label="RMS σ_ep")
            ax.loglog(ns, get("rms_cal"), "D-", color="tab:red", label="RMS σ_cal (s from val)")
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("training frames")
            ax.set_ylabel("eV/Å")
            ax.set_title(f"{system}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def warm_up() -> None:
    gp = GaussianProcess([13], AL_CUTOFFS)
    f = frames_of("Al", 1, 5)[0]
    gp.add_structure(f, forces=f.get_forces(), atom_indices=range(4))
    gp.log_likelihood(gradient=True)
    gp.predict(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="Al,Cu3Au", help="comma-separated: Al, Cu3Au")
    p.add_argument("--frames", default="1,2,4,8", help="training set sizes (frames)")
    p.add_argument("--repeats", type=int, default=3, help="seeds per size (medians over them)")
    p.add_argument("--modes", default="fit,fixed,ml2",
                   help="fit (epicycle fit's MAP), fixed (start values), ml2 (--prior none), ml2-nocheck (also --holdout 0)")
    p.add_argument("--val-frames", type=int, default=2, help="validation frames that fit s")
    p.add_argument("--test-frames", type=int, default=20, help="test frames (>= 20 for the issue's goal)")
    p.add_argument("--plot", default="/tmp/fig2b.png", help="PNG to write (Fig. 2b analogue)")
    p.add_argument("--json", help="append every run as a JSON line to this file")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    systems = args.systems.split(",")
    for s in systems:
        if s not in ("Al", "Cu3Au"):
            p.error(f"--systems: unknown system {s!r} (Al or Cu3Au)")
    sizes = [int(x) for x in args.frames.split(",")]
    warm_up()
    table = {}
    t_start = time.process_time()
    with tempfile.TemporaryDirectory() as work:
        for system in systems:
            for n in sizes:
                runs = []
                for seed in range(args.repeats):
                    r = one_run(system, n, seed, modes, args.val_frames, args.test_frames, work)
                    runs.append(r)
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(r) + "\n")
                    print(f"  {system} {n} frames seed {seed}: " + "  ".join(
                        f"{m}: RMSE {r[m]['val']['rmse']:.4f} s {r[m]['val']['scale']:.2f} "
                        f"σ_cal/RMSE {r[m]['val']['ratio']:.2f}" for m in modes), flush=True)
                for m in modes:
                    table[(system, n, m)] = summarise(runs, m)
    print(f"\n== Fig. 2b analogue: medians over {args.repeats} seeds; {args.test_frames} test frames, s fitted on "
          f"{args.val_frames} validation frames (val) or leave-one-frame-out (lofo); eV/Å ==")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for m in modes:
        for system in systems:
            for n in sizes:
                print(row(system, n, m, table[(system, n, m)]))
    print("\n== reading a miss (medians): s fitted three ways; the ratio a single s fitted on the test set itself "
          "reaches; error/σ_cal in the 10 % largest σ_cal and in the rest; tails; does σ rank the frames ==")
    print(WHY)
    print("|" + "---|" * (WHY.count("|") - 1))
    for m in modes:
        for system in systems:
            for n in sizes:
                print(why_row(system, n, m, table[(system, n, m)]))
    print("\nσ_cal/RMSE per seed (val): " + "; ".join(
        f"{s} {n} {m}: " + ", ".join(f"{x:.2f}" for x in table[(s, n, m)]["ratios"])
        for m in modes for s in systems for n in sizes))
    print(f"CPU total {time.process_time() - t_start:.0f} s (this process)")
    if args.plot:
        plot(table, modes, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
