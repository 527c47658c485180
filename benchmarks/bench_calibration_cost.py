"""Per-label cost of the online calibration (coordinator/calibration.py OnlineCalibration), issue 13.

Each oracle call of a run does ``add`` (the frame's 3·n_atoms residuals), ``scale`` (the MAP of s over
*all* points so far) and ``summary`` (mean z², coverage, reliability curve, raw and scaled).  This
script times that triple at the last label of a calibration already holding ``labels - 1`` labels of
``atoms`` atoms, for today's size (60 labels × 32 atoms, the demo) and 10× / 100× the labels, with the
current class and with the previous implementation (lists of per-label arrays concatenated on every
call, s refitted on every ``scale`` call) reproduced below for the ratio.  CPU time
(time.process_time), median over ``--repeats``; the points are synthetic (σ_ep log-uniform
0.01–0.3 eV/Å, residuals drawn with a true scale of 2, σn 0.02 eV/Å): the cost depends on the
counts, not the values.  Also printed: |s_incremental − s_from_scratch| (must be 0 to rounding).

Usage: PYTHONPATH=. python benchmarks/bench_calibration_cost.py [--atoms 32] [--labels 60,600,6000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from coordinator.calibration import OnlineCalibration, epistemic_scale
from learner_service.calibration import calibration_summary


class ListCalibration:
    """The implementation before this change: per-label arrays in lists, concatenated by every call."""

    def __init__(self, prior_alpha: float = 5.0) -> None:
        self.prior_alpha = prior_alpha
        self._r, self._e, self._nu = [], [], []
        self.labels = 0

    def add(self, predicted_forces, oracle_forces, epistemic_std, noise: float) -> None:
        r = (np.asarray(predicted_forces, dtype=np.float64) - np.asarray(oracle_forces, dtype=np.float64)).ravel()
        e = np.square(np.asarray(epistemic_std, dtype=np.float64)).ravel()
        self._r.append(r)
        self._e.append(e)
        self._nu.append(np.full(r.shape, float(noise) ** 2))
        self.labels += 1

    def arrays(self):
        return np.concatenate(self._r), np.concatenate(self._e), np.concatenate(self._nu)

    def scale(self) -> float:
        r, e, nu = self.arrays()
        return epistemic_scale(r, np.sqrt(e), np.sqrt(nu), self.prior_alpha)

    def summary(self) -> dict:
        r, e, nu = self.arrays()
        s = self.scale()
        raw = calibration_summary(r, np.sqrt(e + nu), prior_alpha=self.prior_alpha)
        cal = calibration_summary(r, np.sqrt(s * s * e + nu), prior_alpha=self.prior_alpha)
        return {"labels": self.labels, "scale": s, "raw": raw, "scaled": cal}


def frames(n_labels: int, n_atoms: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n_labels):
        std = np.exp(rng.uniform(np.log(0.01), np.log(0.3), (n_atoms, 3)))
        truth = rng.normal(0.0, 1.0, (n_atoms, 3))
        pred = truth + rng.normal(0.0, np.sqrt((2.0 * std) ** 2 + 0.02 ** 2))
        yield pred, truth, std, 0.02


def per_label_cost(cls, n_labels: int, n_atoms: int, repeats: int) -> tuple[float, float, float]:
    """(median CPU s of the last label's add+scale+summary, of add alone, s at the end)."""
    data = list(frames(n_labels, n_atoms))
    total, adds = [], []
    s = float("nan")
    for _ in range(repeats):
        cal = cls()
        for f in data[:-1]:
            cal.add(*f)
        t0 = time.process_time()
        cal.add(*data[-1])
        t1 = time.process_time()
        s = cal.scale()
        cal.summary()
        t2 = time.process_time()
        total.append(t2 - t0)
        adds.append(t1 - t0)
    return statistics.median(total), statistics.median(adds), s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atoms", type=int, default=32, help="atoms per labelled frame (3 points each)")
    ap.add_argument("--labels", default="60,600,6000", help="comma-separated label counts to time")
    ap.add_argument("--repeats", type=int, default=7, help="repeats per size (median reported)")
    args = ap.parse_args()
    per_label_cost(OnlineCalibration, 5, args.atoms, 2)  # warm up scipy / numpy paths
    print(f"{'labels':>7} {'points':>8} | {'new: add+scale+summary':>23} {'add':>9} | {'old: same':>10} "
          f"{'add':>9} | {'old/new':>7} | {'|s_new - s_scratch|':>19}")
    for n in (int(x) for x in args.labels.split(",")):
        t_new, a_new, s_new = per_label_cost(OnlineCalibration, n, args.atoms, args.repeats)
        t_old, a_old, _ = per_label_cost(ListCalibration, n, args.atoms, args.repeats)
        pts = list(frames(n, args.atoms))
        r = np.concatenate([(p - t).ravel() for p, t, _, _ in pts])
        e = np.concatenate([s.ravel() for _, _, s, _ in pts])
        scratch = epistemic_scale(r, e, 0.02)
        print(f"{n:7d} {3 * args.atoms * n:8d} | {1e3 * t_new:20.2f} ms {1e6 * a_new:6.1f} µs | {1e3 * t_old:7.2f} ms "
              f"{1e6 * a_old:6.1f} µs | {t_old / t_new:7.2f} | {abs(s_new - scratch):19.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
