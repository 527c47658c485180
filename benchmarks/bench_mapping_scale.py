"""Cost of `epicycle map` against the training-set size (issue 15): prints a line per size.

Exact GPs on EMT forces of the 32-atom Al cells of ``learner_service.datasets.perturbed_fcc_al``
(the models of ``bench_mapped.py``: r2 = 6 Å, r3 = 4 Å, fixed hyperparameters), ``map_gp`` at the
default grid, then the files ``epicycle map`` writes.  Reported: CPU seconds of training and of the
mapping, and the sizes of ``mapped.npz`` and ``mapped.uf3`` (what the learner's ``Map`` reply
carries).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_mapping_scale.py [--sizes 100,1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mapped import build_gp, perturbed_fcc_al  # noqa: E402

from learner_service.lammps_export import export_lammps  # noqa: E402
from learner_service.mapping import map_gp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000", help="training environments, comma-separated")
    args = ap.parse_args()
    frames = perturbed_fcc_al(40, seed=0)
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.process_time()
        gp = build_gp(frames, n)
        t1 = time.process_time()
        mapped = map_gp(gp)
        t2 = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            npz = mapped.save(Path(tmp) / "mapped.npz")
            uf3 = export_lammps(mapped, tmp)["uf3"]
            sizes = npz.stat().st_size / 1e3, uf3.stat().st_size / 1e3
        print(f"environments {n}: train {t1 - t0:.1f} s CPU, map_gp {t2 - t1:.1f} s CPU, "
              f"mapped.npz {sizes[0]:.0f} kB, mapped.uf3 {sizes[1]:.0f} kB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
