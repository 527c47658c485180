"""Total energies as labels, with and without the per-species energy reference (issue 16).

A DFT total energy carries each species' reference (GPAW's PBE energies are relative to isolated
atoms, about -3.7 eV per Al atom here; QE's with PBE pseudopotentials about -57 eV per Al atom).
Both learner models now use a prior mean mu_s per species for the local energy, the least-squares
fit of the energy labels by composition (learner_service/gp.py, "the energy reference"); before,
the zero-mean kernel had to fit the whole reference.  This script measures what that means for a
model trained on every force *and* the energy of each frame (``learner.sparse.labels:
forces+energy``, or the exact GP's ``use_energy``) against the same model on the forces alone.

Data: the GPAW-labelled 8-atom Al frames of ``bench_calibration_dft.py`` (its ``--cache``; absent
frames are computed with GPAW), and the same frames with every energy lowered by a further
53.3 eV per atom (``qe-like``: GPAW's -3.7 plus this gives QE's about -57 eV per Al atom; the
forces do not change).  Per split (``--splits`` random permutations), the first N frames
(``--train``) train, the last ``--test`` frames test.  Models (2+3-body, r2 = 6 Å, r3 = 4 Å):

* ``sparse``: the sparse GP, every atom of the training frames an inducing environment
  (energy_force functionals), every force (+ the energy), hyperparameters by ML-II
  (L-BFGS-B, ``--iterations``) from epicycle's default start;
* ``exact``: the exact GP on every force (+ the energy), same optimisation.

Variants: ``forces`` (no energy labels), ``energy+ref`` (energies, the reference: the code now),
``energy, no ref`` (energies, mu = 0: the code before).  Printed per variant, training size and
data set: medians over splits of the test force RMSE (eV/Å) and the test energy RMSE (meV/atom; for
``forces`` the energy has no zero, so its mean error over the test frames is removed first).

    PYTHONPATH=. python benchmarks/bench_energy_reference.py [--cache /tmp/epicycle_gpaw_al8.xyz]
        [--splits 3] [--train 2,4,8] [--test 12] [--kinds sparse,exact] [--iterations 50]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_calibration_dft import dft_frames  # noqa: E402
from learner_service.defaults import DEFAULT_HYPERPARAMETERS  # noqa: E402
from learner_service.gp import GaussianProcess  # noqa: E402
from learner_service.sparse_gp import SparseGaussianProcess  # noqa: E402

CUTOFFS = (6.0, 4.0)
QE_LIKE_SHIFT = -53.3  # eV per Al atom on top of GPAW's reference (QE + PBE pseudopotential: about -57)
VARIANTS = ("forces", "energy+ref", "energy, no ref")


class _NoReference:
    """The models as they were before the energy reference: mu = 0 (a zero-mean local energy)."""

    @property
    def energy_reference(self) -> np.ndarray:
        return np.zeros(len(self.species))


class SparseNoRef(_NoReference, SparseGaussianProcess):
    pass


class ExactNoRef(_NoReference, GaussianProcess):
    pass


def build(kind: str, variant: str, frames, energies, iterations: int):
    cls = {("sparse", False): SparseGaussianProcess, ("sparse", True): SparseNoRef,
           ("exact", False): GaussianProcess, ("exact", True): ExactNoRef}[(kind, variant == "energy, no ref")]
    hyps = dict(DEFAULT_HYPERPARAMETERS)
    kw = {"inducing_functionals": "energy_force"} if kind == "sparse" else {}
    model = cls([13], CUTOFFS, hyps, **kw)
    for f, e in zip(frames, energies):
        energy = None if variant == "forces" else e
        if kind == "sparse":
            model.add_structure(f, forces=f.get_forces(), energy=energy, inducing=range(len(f)))
        else:
            model.add_structure(f, forces=f.get_forces(), energy=energy)
    model.train()
    result = model.optimize(max_iterations=iterations)
    return model, result


def errors(model, frames, energies, remove_mean: bool) -> tuple[float, float]:
    df, de = [], []
    for f, e in zip(frames, energies):
        p = model.predict(f)
        df.append((p.forces - f.get_forces()).ravel())
        de.append((p.energy - e) / len(f))
    de = np.array(de)
    if remove_mean:
        de = de - de.mean()
    return float(np.sqrt(np.mean(np.concatenate(df) ** 2))), float(1000 * np.sqrt(np.mean(de ** 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/epicycle_gpaw_al8.xyz", help="GPAW frames (bench_calibration_dft.py)")
    p.add_argument("--frames-per-temperature", type=int, default=18)
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--train", default="2,4,8", help="training frames, comma-separated")
    p.add_argument("--test", type=int, default=12, help="test frames (the last of each permutation)")
    p.add_argument("--kinds", default="sparse,exact")
    p.add_argument("--iterations", type=int, default=50, help="L-BFGS-B iteration cap of the ML-II fit")
    args = p.parse_args(argv)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, "
          f"nproc {os.cpu_count()}, load average {tuple(round(x, 1) for x in os.getloadavg())}")
    frames = dft_frames(Path(args.cache), (300.0, 900.0), args.frames_per_temperature)
    gpaw = [f.get_potential_energy() for f in frames]
    sets = {"GPAW": gpaw, "qe-like": [e + QE_LIKE_SHIFT * len(f) for e, f in zip(gpaw, frames)]}
    print(f"# {len(frames)} GPAW frames of {len(frames[0])} Al atoms; energy per atom {np.mean(gpaw) / 8:.3f} eV "
          f"(GPAW), {np.mean(sets['qe-like']) / 8:.3f} eV (qe-like)")
    sizes = [int(s) for s in args.train.split(",")]
    rows = {}
    t0 = time.process_time()
    for kind in args.kinds.split(","):
        for name, energies in sets.items():
            for variant in VARIANTS:
                if variant == "forces" and name != "GPAW":
                    continue  # no energy labels: the two sets are the same data
                for n in sizes:
                    res = []
                    for split in range(args.splits):
                        order = np.random.default_rng(split).permutation(len(frames))
                        tr, te = order[:n], order[-args.test:]
                        model, opt = build(kind, variant, [frames[i] for i in tr], [energies[i] for i in tr],
                                           args.iterations)
                        f_rmse, e_rmse = errors(model, [frames[i] for i in te], [energies[i] for i in te],
                                                remove_mean=variant == "forces")
                        res.append((f_rmse, e_rmse, model.hyperparameters.get("energy_noise", float("nan")),
                                    model.hyperparameters["ls2"]))
                    med = [statistics.median(r[k] for r in res) for k in range(4)]
                    rows[(kind, name, variant, n)] = med
                    print(f"{kind:6s} {name:8s} {variant:15s} N={n}: force RMSE {med[0]:.4f} eV/Å, energy RMSE "
                          f"{med[1]:9.2f} meV/atom, energy_noise {med[2]:.3g} eV, ls2 {med[3]:.3g} Å "
                          f"(per split: {', '.join(f'{r[0]:.4f}' for r in res)})  [{time.process_time() - t0:.0f} s CPU]",
                          flush=True)
    print("\n| model | data | labels | " + " | ".join(f"{n} frames: force RMSE eV/Å · energy meV/atom" for n in sizes)
          + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for (kind, name, variant), _ in {(k[0], k[1], k[2]): 0 for k in rows}.items():
        cells = [rows[(kind, name, variant, n)] for n in sizes]
        print(f"| {kind} | {name} | {variant} | " + " | ".join(f"{c[0]:.4f} · {c[1]:.1f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
