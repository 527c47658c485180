#!/usr/bin/env python
"""Run FLARE 0.2.4's own on-the-fly loop (flare.otf.OTF) on a problem file, with EMT as DFT.

Usage (under the FLARE venv's python, see setup_flare_env.sh):

    $EPICYCLE_FLARE_PYTHON benchmarks/flare_reference/run_flare_otf.py PROBLEM.npz RESULT.npz

Standalone on purpose (numpy, ase and flare only), like run_flare.py. It is the reference for
issue 5's benchmark: the paper's aluminium run, driven by the paper's code, from exactly the
start our run uses, so oracle calls, wall time and final force error compare like for like.

Problem file (npz):
    positions (n,3) Å, velocities (n,3) Å/fs, cell (3,3) Å, numbers (n,), masses (n,) amu
    hyps (5,) sig2 ls2 sig3 ls3 noise; cutoffs (2,) Å; steps; dt_fs; init_atoms (k,)
    std_tolerance_factor; max_atoms_added; freeze_hyps; maxiter
    test_positions (m,n,3) Å — frames on which the final model's forces are predicted
Result file (npz):
    wall_s, predict_s (time in GP force prediction), train_s (hyperparameter optimisation),
    dft_steps (calls,), n_calls, final_hyps (5,), hyps_history (calls,5), n_train_envs,
    traj_positions (steps+1,n,3) Å, traj_temperature (steps+1,) K,
    test_forces (m,n,3) eV/Å, test_std (m,n,3) eV/Å

FLARE's conventions used: time in ps, masses in eV ps²/Å² (amu × 1.0364e-4), position Verlet
with previous positions x(−dt) = x(0) − v dt, and the threshold std_tolerance_factor × noise on
the epistemic σ of every force component (flare.utils.learner.is_std_in_bound).
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

logging.disable(logging.INFO)

from ase import Atoms  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402

import flare.predict as flare_predict  # noqa: E402
from flare.gp import GaussianProcess  # noqa: E402
from flare.otf import OTF  # noqa: E402
from flare.struc import Structure  # noqa: E402

AMU_TO_FLARE = 0.000103642695727  # amu -> eV ps^2 / Å^2


class EMTSource:
    """A FLARE "force_source" module: parse_dft_input + run_dft_par, backed by ASE's EMT."""

    def __init__(self, problem):
        self.problem = problem
        self.calls = 0
        self.seconds = 0.0

    def parse_dft_input(self, dft_input):
        p = self.problem
        species = [int(z) for z in p["numbers"]]
        masses = {z: float(m) * AMU_TO_FLARE for z, m in zip(species, p["masses"])}
        return np.array(p["positions"], dtype=float), species, np.array(p["cell"], dtype=float), masses

    def run_dft_par(self, dft_input, structure, dft_loc, **kwargs):
        t0 = time.perf_counter()
        atoms = Atoms(numbers=[int(z) for z in structure.coded_species], positions=structure.positions,
                      cell=structure.cell, pbc=True)
        atoms.calc = EMT()
        forces = atoms.get_forces()
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return forces


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("problem")
    ap.add_argument("result")
    args = ap.parse_args(argv)
    p = np.load(args.problem, allow_pickle=False)
    steps = int(p["steps"])
    dt = float(p["dt_fs"]) / 1000.0  # ps
    source = EMTSource(p)
    hyps = np.array(p["hyps"], dtype=float)
    gp = GaussianProcess(kernels=["twobody", "threebody"], component="mc", hyps=hyps,
                         cutoffs={"twobody": float(p["cutoffs"][0]), "threebody": float(p["cutoffs"][1])},
                         hyp_labels=["sig2", "ls2", "sig3", "ls3", "noise"], opt_algorithm="L-BFGS-B",
                         maxiter=int(p["maxiter"]), parallel=False, n_cpus=1)

    # time the GP parts the loop calls, without changing what it does
    timers = {"predict": 0.0, "train": 0.0}
    hyps_history = []
    pred_func = flare_predict.predict_on_structure

    def timed_predict(structure, gp_model, n_cpus=None, *a, **k):
        t0 = time.perf_counter()
        try:
            return pred_func(structure, gp_model, n_cpus, *a, **k)
        finally:
            timers["predict"] += time.perf_counter() - t0

    positions = np.array(p["positions"], dtype=float)
    prev = positions - np.array(p["velocities"], dtype=float) * 1000.0 * dt  # Å/fs -> Å/ps
    workdir = tempfile.mkdtemp(prefix="flare-otf-")
    cwd = os.getcwd()
    os.chdir(workdir)  # FLARE writes otf_run.out, logs and xyz files into the working directory
    try:
        otf = OTF(dt=dt, number_of_steps=steps, prev_pos_init=prev, gp=gp, force_source=source,
                  dft_input="unused", std_tolerance_factor=float(p["std_tolerance_factor"]),
                  init_atoms=[int(i) for i in p["init_atoms"]], max_atoms_added=int(p["max_atoms_added"]),
                  freeze_hyps=int(p["freeze_hyps"]), output_name="otf_run", write_model=0)
        otf.pred_func = timed_predict
        train_gp = otf.train_gp

        def timed_train():
            t0 = time.perf_counter()
            try:
                return train_gp()
            finally:
                timers["train"] += time.perf_counter() - t0
                hyps_history.append(np.array(otf.gp.hyps, dtype=float))

        otf.train_gp = timed_train
        traj_pos, traj_t = [], []
        step_fn = otf.md_step

        def recording_step():
            otf.update_temperature()
            traj_pos.append(np.array(otf.structure.positions))
            traj_t.append(float(otf.temperature))
            return step_fn()

        otf.md_step = recording_step
        dft_steps = []
        run_dft = otf.run_dft

        def recording_dft():
            dft_steps.append(int(otf.curr_step))
            return run_dft()

        otf.run_dft = recording_dft
        t0 = time.perf_counter()
        otf.run()
        wall = time.perf_counter() - t0
        otf.update_temperature()
        traj_pos.append(np.array(otf.structure.positions))
        traj_t.append(float(otf.temperature))
    finally:
        os.chdir(cwd)

    test_forces, test_std = [], []
    for pos in np.asarray(p["test_positions"], dtype=float):
        s = Structure(cell=np.array(p["cell"], dtype=float), species=[int(z) for z in p["numbers"]],
                      positions=pos)
        f, std = flare_predict.predict_on_structure(s, otf.gp)
        test_forces.append(np.array(f))
        test_std.append(np.array(std))
    np.savez(args.result, wall_s=wall, predict_s=timers["predict"], train_s=timers["train"],
             dft_s=source.seconds, dft_steps=np.array(dft_steps, dtype=int), n_calls=source.calls,
             final_hyps=np.array(otf.gp.hyps, dtype=float),
             hyps_history=np.array(hyps_history).reshape(-1, 5), n_train_envs=len(otf.gp.training_data),
             traj_positions=np.array(traj_pos), traj_temperature=np.array(traj_t),
             test_forces=np.array(test_forces).reshape(-1, len(p["numbers"]), 3),
             test_std=np.array(test_std).reshape(-1, len(p["numbers"]), 3))
    print("[run_flare_otf] %d steps, %d DFT calls, %.1f s wall (predict %.1f s, train %.1f s), "
          "noise %.4g eV/Å" % (steps, source.calls, wall, timers["predict"], timers["train"], otf.gp.hyps[-1]),
          file=sys.stderr)


if __name__ == "__main__":
    main()
