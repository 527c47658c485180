"""Calibration of σ at the oracle calls of a run, before and after the variance scale (issue 13).

Runs ``examples/al_melt.yaml`` (the demo; or reads a finished run directory with ``--run-dir``) and
computes, from its label files, the calibration of the old model's σ at every oracle call:

* ``raw``: z = r / sqrt(σ_ep² + σn²), the model's own σ;
* ``in-sample``: with s fitted on all calls (what the run's last `calibration` event reports);
* ``prequential``: call k judged with s fitted on calls 1..k-1 only — the honest number, since that
  is what the threshold would have used at call k (``calibration.scale: true``).

Printed: mean z² (ideal 1), coverage within 1σ and 2σ (ideal 68.3 %, 95.4 %), and s.  Goal (issue 13):
mean z² in [0.8, 1.25] and 2σ coverage 93–97 % after scaling.

Usage: python benchmarks/bench_calibration.py [--run-dir DIR] [--config examples/al_melt.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stats(z: np.ndarray) -> str:
    return (f"mean z² {np.mean(z * z):6.3f}   within 1σ {np.mean(np.abs(z) <= 1):6.1%}   "
            f"within 2σ {np.mean(np.abs(z) <= 2):6.1%}   (n = {z.size})")


def main() -> int:
    from coordinator.calibration import epistemic_scale
    from coordinator.rundir import RunDirectory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="a finished run directory (default: run the config)")
    ap.add_argument("--config", default="examples/al_melt.yaml")
    ap.add_argument("--warmup", type=int, default=3, help="calls before the prequential scale is used")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(ROOT / args.config),
                                   "--run-dir", str(run_dir), "--no-report", "--quiet"], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return 1
        rd = RunDirectory.open(run_dir)
        st = rd.load_state()
        labels = [rd.read_label(i) for i in range(1, st.oracle_calls)]
    labels = [lab for lab in labels if lab.predicted_forces is not None and lab.force_std is not None]
    r = [(lab.predicted_forces - lab.forces).ravel() for lab in labels]
    e = [lab.force_std.ravel() for lab in labels]
    nu = [np.full(x.size, lab.noise if lab.noise is not None else np.nan) for x, lab in zip(r, labels)]
    if any(np.isnan(x).any() for x in nu):
        print("note: labels without the predicting model's σn (an older run directory): skipped")
        keep = [i for i, x in enumerate(nu) if not np.isnan(x).any()]
        r, e, nu = [r[i] for i in keep], [e[i] for i in keep], [nu[i] for i in keep]
    R, E, N = (np.concatenate(x) for x in (r, e, nu))
    s_all = epistemic_scale(R, E, N)
    print(f"# {run_dir}: {len(r)} oracle calls with the old model's prediction")
    print(f"raw (model σ):          {stats(R / np.sqrt(E ** 2 + N ** 2))}")
    print(f"in-sample, s = {s_all:5.2f}:  {stats(R / np.sqrt((s_all * E) ** 2 + N ** 2))}")
    z_pre, scales = [], []
    for k in range(args.warmup, len(r)):
        s = epistemic_scale(np.concatenate(r[:k]), np.concatenate(e[:k]), np.concatenate(nu[:k]))
        scales.append(s)
        z_pre.append(r[k] / np.sqrt((s * e[k]) ** 2 + nu[k] ** 2))
    if z_pre:
        z_pre = np.concatenate(z_pre)
        z_raw = np.concatenate([r[k] / np.sqrt(e[k] ** 2 + nu[k] ** 2) for k in range(args.warmup, len(r))])
        print(f"prequential, calls {args.warmup + 1}..{len(r)}:")
        print(f"  raw                   {stats(z_raw)}")
        print(f"  s from earlier calls  {stats(z_pre)}   (s from {scales[0]:.2f} to {scales[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
