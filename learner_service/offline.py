"""Offline commands: ``epicycle fit / predict / evaluate`` on extended-XYZ data sets.

``register_cli(subparsers)`` adds the sub-commands (``fit``, ``predict``, ``evaluate``, ``map``) to an argparse
sub-parsers object; each sets ``func(args) -> int`` (exit status).  The work itself
is in plain functions (:func:`fit_model`, :func:`predict_file`, :func:`evaluate_model`)
so it can be used without argparse.  Units: eV, Å, eV/Å, eV/Å^3.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from protos.errors import EpicycleError, InvalidInput

from .calibration import calibration_summary
from .diagnostics import model_warnings
from .defaults import HYPERPARAMETER_UNITS
from .gp import GaussianProcess
from .labelled_data import frame_forces, read_frames, read_labelled
from .model import MODEL_KINDS, load_model

__all__ = ["register_cli", "read_frames", "fit_model", "predict_file", "evaluate_model", "map_model"]


# ---------------------------------------------------------------------------
# reading data
# ---------------------------------------------------------------------------


def _labels(atoms, path, k, want_energy=False, want_stress=False, need_forces=True):
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    forces = frame_forces(atoms)
    if need_forces and forces is None:
        raise InvalidInput(f"{path}: frame {k} has no forces (expected a per-atom 'forces' array in eV/Å)")
    energy = results.get("energy") if want_energy else None
    if want_energy and energy is None:
        raise InvalidInput(f"{path}: frame {k} has no energy but --energy was given")
    stress = results.get("stress") if want_stress else None
    if want_stress and stress is None:
        raise InvalidInput(f"{path}: frame {k} has no stress but --stress was given")
    return forces, energy, stress


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidInput(f"expected comma-separated integers, got {text!r}") from exc


def _parse_cutoffs(text: str) -> tuple[float, float]:
    try:
        r2, r3 = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise InvalidInput(f"--cutoffs expects 'r2,r3' in Å, e.g. 6.0,4.0; got {text!r}") from exc
    return r2, r3


# ---------------------------------------------------------------------------
# the work
# ---------------------------------------------------------------------------


def _selected_atoms(n: int, atoms, atoms_per_frame, rng, where: str) -> list[int]:
    """The atoms of one frame that ``fit`` trains on (exact GP) or makes inducing (sparse GP):
    ``--atoms`` (checked against the frame's ``n`` atoms), ``--atoms-per-frame`` drawn with
    ``rng``, or every atom."""
    if atoms is not None:
        bad = [i for i in atoms if not 0 <= i < n]
        if bad:
            raise InvalidInput(f"--atoms {bad} out of range for {where} with {n} atoms")
        return list(atoms)
    if atoms_per_frame is not None:
        return sorted(rng.choice(n, size=min(atoms_per_frame, n), replace=False).tolist())
    return list(range(n))


def fit_model(
    train_path,
    cutoffs: Sequence[float],
    atoms: Sequence[int] | None = None,
    atoms_per_frame: int | None = None,
    energy: bool = False,
    stress: bool = False,
    max_iterations: int = 200,
    optimize: bool = True,
    seed: int = 0,
    hyperparameters: dict | None = None,
    out=None,
    log=print,
    prior: str = "data",
    restarts: int = 3,
    holdout: float = 0.0,
    model: str = "exact",
    selection: str = "cv",
):
    """Build a GP from labelled data, optimise its hyperparameters, save it to ``out``.

    ``train_path``: one input or a sequence of inputs, each an extended XYZ file or a run directory
    (:func:`learner_service.labelled_data.read_labelled`: merged in order, a structure already in an
    earlier input dropped, a summary per input logged).  ``atoms``/``atoms_per_frame`` select atoms in every frame of
    every input (default: all atoms).

    Start values: ``hyperparameters`` or the one default set (learner_service/defaults.py, the
    same as ``epicycle run``'s).  ``prior="data"``: MAP with the data-derived prior and
    ``restarts`` prior draws (:func:`learner_service.model_selection.map_optimize`); ``"none"``:
    plain ML-II (the same nested search without the prior).  ``selection="cv"``: the choice among
    the optima and the start values cross-validates on the training frames (each held out in
    turn, inside ``map_optimize``); ``"objective"``: the highest objective.
    ``holdout`` (default 0): share of the frames (two or more frames; else of the one frame's
    selected atoms) also held out of the training set during the search as extra validation frames
    (:func:`learner_service.model_selection.holdout_split`, seeded by ``seed``); after the
    selection they are added to the model, so the saved model is trained on every selected atom
    (the held-out numbers printed are those of the model without them).  Returns ``(gp, result)``.

    ``model="sparse"``: a sparse GP (learner_service/sparse_gp.py) takes every force of every
    frame (and the energies/stresses asked for) as labels; the selected atoms (``atoms`` /
    ``atoms_per_frame``, default all) become its inducing environments; its hyperparameters are
    the maximum of its own (DTC) likelihood (no prior, no held-out selection -- those are the
    exact GP's model selection).
    """
    from .model_selection import holdout_split, map_optimize

    if model == "sparse":
        return _fit_sparse(train_path, cutoffs, atoms, atoms_per_frame, energy, stress, max_iterations, optimize,
                           seed, hyperparameters, out, log)
    if model != "exact":
        raise InvalidInput(f"--model must be exact or sparse, got {model!r}")

    if not 0.0 <= holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1), got {holdout}")
    if prior not in ("data", "none"):
        raise InvalidInput(f"--prior must be 'data' or 'none', got {prior!r}")
    data = read_labelled(train_path)
    for line in data.summary_lines():
        log(f"data: {line}")
    frames, species = data.frames, data.species
    gp = GaussianProcess(species, cutoffs, hyperparameters=hyperparameters)
    rng = np.random.default_rng(seed)
    selections, labels = [], []
    for k, frame in enumerate(frames):
        source, index = data.origins[k]
        forces, e, s = _labels(frame, source, index, energy, stress)
        idx = _selected_atoms(len(frame), atoms, atoms_per_frame, rng, f"frame {index} of {source}")
        selections.append(idx)
        labels.append((forces, e, s))
    train, held_idx = selections, [[] for _ in frames]
    if optimize and holdout > 0:
        train, held_idx = holdout_split(selections, holdout, seed)
    held = []  # (frame, atom indices, forces) of the held-out check
    for k, frame in enumerate(frames):
        forces, e, s = labels[k]
        if held_idx[k]:
            held.append((frame, held_idx[k], forces))
        if held_idx[k] and not train[k]:
            continue  # a whole held-out frame (its energy/stress labels join with it afterwards)
        gp.add_structure(frame, forces=forces, atom_indices=train[k], energy=e, stress=s)
    log(f"training set: {len(frames)} frames, {gp.n_environments} environments, {gp.n_labels} labels, "
        f"species {species}, cutoffs r2={gp.cutoffs.r2} Å r3={gp.cutoffs.r3} Å")
    if held:
        kind = f"{len(held)} whole frame(s)" if len(held) > 1 or len(frames) > 1 else "atoms of the one frame"
        log(f"held out for the validation check: {sum(len(h[1]) for h in held)} atoms, {kind} "
            f"(share {holdout:g}, seed {seed})")
    result = None
    if optimize:
        start = ", ".join(f"{k}={v:.4g}" for k, v in gp.hyperparameters.items() if k in gp.hyperparameter_names)
        log(f"start values: {start}")
        if prior == "data":
            from .model_selection import data_prior

            log("prior (log-normal; centres from the training data):")
            for line in data_prior(gp).describe():
                if line.split()[0] in gp.hyperparameter_names:
                    log("  prior " + line)
        result = map_optimize(gp, prior=prior, restarts=restarts, seed=seed, max_iterations=max_iterations,
                              validation=held or None, progress=log, selection=selection)
        log(("optimisation converged" if result.converged else "optimisation did NOT converge")
            + f" after {result.iterations} iterations ({result.kernel_builds} kernel builds, "
              f"{result.cpu_seconds:.1f} s CPU): {result.message}")
        for w in result.warnings:
            log(f"WARNING: {w}")
        if result.validation:
            for name, m in result.validation.items():
                if not isinstance(m, dict) or "folds" not in m:
                    continue
                log(f"held-out check, {name}: {len(m['folds'])} frames held out in turn, worst force RMSE "
                    f"{m['worst_rmse']:.5f} eV/Å, pooled {m['rmse']:.5f} eV/Å, mean -log density "
                    f"{m['nlpd']:.4f} per component")
            log(f"selected: {result.selected} (rule: the candidate with the smallest worst held-out frame RMSE "
                f"if it beats the start values' by 2 %, else the start values)")
        if held:
            for k, frame in enumerate(frames):
                if held_idx[k]:
                    forces, e, s = labels[k]
                    whole = not train[k]  # a held-out frame brings its energy/stress labels too
                    gp.add_structure(frame, forces=forces, atom_indices=held_idx[k],
                                     energy=e if whole else None, stress=s if whole else None)
            log(f"held-out atoms added to the model: {gp.n_environments} environments")
    gp.train()
    return _report_and_save(gp, result, f"log marginal likelihood: {gp.log_likelihood():.6f}", out, log)


def _report_and_save(gp, result, likelihood_line: str, out, log):
    """The end of ``fit``: the hyperparameters (flagging those at a bound), the likelihood, the
    model's warnings; the model written to ``out``.  Returns ``(gp, result)``."""
    at_bounds = result.at_bounds if result is not None else {}
    log("hyperparameters:")
    for name in gp.hyperparameter_names:
        flag = f"   <- at its {at_bounds[name]} bound" if name in at_bounds else ""
        log(f"  {name:13s} = {gp.hyperparameters[name]:.6g} {HYPERPARAMETER_UNITS.get(name, '')}{flag}")
    log(likelihood_line)
    if gp.n_energy_labels:
        from ase.data import chemical_symbols

        log("energy reference (prior mean of the local energy, least squares over the energy labels): "
            + ", ".join(f"{chemical_symbols[z]} {mu:.6f}" for z, mu in zip(gp.species, gp.energy_reference))
            + " eV/atom")
    for warning in model_warnings(gp, result):
        log(f"WARNING: {warning}")
    if out is not None:
        gp.save(out)
        log(f"model written to {out}")
    return gp, result


def _fit_sparse(train_path, cutoffs, atoms, atoms_per_frame, energy, stress, max_iterations, optimize, seed,
                hyperparameters, out, log):
    """:func:`fit_model` with ``model="sparse"``."""
    from .model import create_model

    data = read_labelled(train_path)
    for line in data.summary_lines():
        log(f"data: {line}")
    frames, species = data.frames, data.species
    gp = create_model("sparse", species, cutoffs, hyperparameters=hyperparameters)
    rng = np.random.default_rng(seed)
    for k, frame in enumerate(frames):
        source, index = data.origins[k]
        forces, e, s = _labels(frame, source, index, energy, stress)
        idx = _selected_atoms(len(frame), atoms, atoms_per_frame, rng, f"frame {index} of {source}")
        gp.add_frame(frame, forces=forces, selected=idx, energy=e, stress=s)
    log(f"training set (sparse GP): {len(frames)} frames, {gp.n_labels} labels (every force"
        f"{', energies' if energy else ''}{', stresses' if stress else ''}), {gp.n_inducing} inducing environments, "
        f"species {species}, cutoffs r2={gp.cutoffs.r2} Å r3={gp.cutoffs.r3} Å")
    result = None
    if optimize:
        result = gp.optimize(max_iterations=max_iterations)
        log(("optimisation converged" if result.converged else "optimisation did NOT converge")
            + f" after {result.iterations} iterations ({result.seconds:.1f} s): {result.message}")
    gp.train()
    return _report_and_save(gp, result, f"log marginal likelihood (DTC): {gp.log_likelihood():.6f}", out, log)


def predict_file(model_path, in_path, out_path, log=print) -> int:
    """Predict every frame of ``in_path``; write forces, energy, per-atom ``force_std`` (n, 3)
    and the rotation-invariant ``atom_std`` (n,), eV/Å (docs/uncertainty.md)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    gp = load_model(model_path)
    frames = read_frames(in_path)
    for warning in model_warnings(gp):
        log(f"WARNING: {warning}")
    out = []
    for frame in frames:
        p = gp.predict(frame, stress=bool(all(frame.get_pbc())))
        new = frame.copy()
        new.arrays.pop("forces", None)
        new.arrays["force_std"] = p.force_std
        new.arrays["atom_std"] = p.atom_std
        new.arrays["local_energy"] = p.local_energies
        results = {"energy": p.energy, "forces": p.forces}
        if p.stress is not None:
            results["stress"] = p.stress
        new.calc = SinglePointCalculator(new, **results)
        new.info["noise"] = p.noise
        if gp.n_energy_labels == 0:
            new.info["energy_defined_up_to_a_constant"] = True
        out.append(new)
    write(str(out_path), out, format="extxyz")
    log(f"predicted {len(out)} frames -> {out_path}")
    return len(out)


def evaluate_model(model_path, test_path) -> dict:
    """Force errors and calibration of a model on a labelled test set.

    RMSE/MAE in eV/Å overall and per species, P95 of |force components| and the
    RMSE/P95 ratio (seed 004 Table 1), mean epistemic σ, and calibration against the
    total predictive σ = sqrt(σ² + σn²) of each component (:mod:`learner_service.calibration`):
    fractions of errors within 1σ and 2σ, the mean squared z-score (1 for a calibrated
    model), a reliability curve, and the variance scale s (σ_cal = s·σ, MAP with a prior
    centred at 1).
    """
    gp = load_model(model_path)
    frames = read_frames(test_path)
    errs, refs, stds, numbers = [], [], [], []
    for k, frame in enumerate(frames):
        forces, _, _ = _labels(frame, test_path, k)
        p = gp.predict(frame)
        errs.append(p.forces - forces)
        refs.append(forces)
        stds.append(p.force_std)
        numbers.append(np.repeat(frame.get_atomic_numbers(), 3))
    err = np.concatenate(errs).reshape(-1)
    ref = np.concatenate(refs).reshape(-1)
    std = np.concatenate(stds).reshape(-1)
    z_num = np.concatenate(numbers)
    total = np.sqrt(std ** 2 + gp.noise ** 2)
    cal = calibration_summary(err, total)
    rmse = float(np.sqrt(np.mean(err ** 2)))
    p95 = float(np.percentile(np.abs(ref), 95))
    report = {
        "frames": len(frames),
        "force_components": int(err.size),
        "rmse": rmse,
        "mae": float(np.mean(np.abs(err))),
        "p95_abs_force": p95,
        "rmse_over_p95": rmse / p95 if p95 > 0 else math.nan,
        "mean_sigma": float(np.mean(std)),
        "noise": gp.noise,
        "mean_total_sigma": float(np.mean(total)),
        "within_1_sigma": cal.within_1_sigma,
        "within_2_sigma": cal.within_2_sigma,
        "mean_squared_z": cal.mean_squared_z,
        "variance_scale": cal.variance_scale,
        "variance_scale_prior_count": cal.prior_count,
        "miscalibration_area": cal.miscalibration_area,
        "reliability": {"expected": list(cal.levels), "observed": list(cal.observed)},
        "per_species": {},
        "units": {"forces": "eV/Å"},
        "warnings": model_warnings(gp),
    }
    from ase.data import chemical_symbols

    for zz in sorted(set(z_num.tolist())):
        m = z_num == zz
        report["per_species"][chemical_symbols[zz]] = {
            "rmse": float(np.sqrt(np.mean(err[m] ** 2))),
            "mae": float(np.mean(np.abs(err[m]))),
            "force_components": int(m.sum()),
        }
    return report


def format_report(r: dict) -> str:
    lines = [
        f"{r['frames']} frames, {r['force_components']} force components",
        f"force RMSE {r['rmse']:.4f} eV/Å   MAE {r['mae']:.4f} eV/Å",
        f"P95 |F| {r['p95_abs_force']:.4f} eV/Å   RMSE/P95 {r['rmse_over_p95']:.4f}",
        f"mean epistemic σ {r['mean_sigma']:.4f} eV/Å   noise σn {r['noise']:.4f} eV/Å",
        f"calibration (total σ): within 1σ {100 * r['within_1_sigma']:.1f} % (ideal 68.3), "
        f"within 2σ {100 * r['within_2_sigma']:.1f} % (ideal 95.4), mean z² {r['mean_squared_z']:.3f} (ideal 1)",
        f"variance scale s = {r['variance_scale']:.3f} (σ_cal = s·σ; MAP, prior centred at 1 worth "
        f"{r['variance_scale_prior_count']:g} residuals)   miscalibration area {r['miscalibration_area']:.3f} (ideal 0)",
        "reliability (expected -> observed coverage): " + ", ".join(
            f"{100 * e:.0f}->{100 * o:.0f} %" for e, o in zip(r["reliability"]["expected"], r["reliability"]["observed"])),
    ]
    for sym, s in r["per_species"].items():
        lines.append(f"  {sym:2s}: RMSE {s['rmse']:.4f} eV/Å  MAE {s['mae']:.4f} eV/Å  ({s['force_components']} components)")
    lines.extend(f"WARNING: {w}" for w in r.get("warnings", ()))
    return "\n".join(lines)


def map_model(model_path, out_dir, spacing2=None, spacing3=None, spacing_jk=None, samples=None, body_order=None,
              train_path=None, test_path=None, table_points=2000, variance=False, tolerance=None, log=print) -> dict:
    """``epicycle map``: map a saved GP to splines, write ``DIR/mapped.npz`` (our format),
    ``DIR/mapped.uf3`` (+ ``mapped.table`` for 2-body models) and ``DIR/mapped.lammps``, and
    report mapped-vs-GP force errors (meV/Å) on the training environments and on the frames
    of ``train_path`` / ``test_path``.  Returns the report (also saved as ``DIR/mapping.json``)."""
    train_frames = read_frames(train_path) if train_path is not None else None
    test_frames = read_frames(test_path) if test_path is not None else None
    gp = GaussianProcess.load(model_path)
    log(f"model: {gp}")
    return map_to_directory(gp, out_dir, str(model_path), spacing2=spacing2, spacing3=spacing3, spacing_jk=spacing_jk,
                            samples=samples, body_order=body_order, train_frames=train_frames,
                            test_frames=test_frames, table_points=table_points, variance=variance,
                            tolerance=tolerance, log=log)


def map_to_directory(gp, out_dir, source: str, spacing2=None, spacing3=None, spacing_jk=None, samples=None,
                     body_order=None, train_frames=None, test_frames=None, table_points=2000, variance=False,
                     tolerance=None, log=print) -> dict:
    """Map the exact GP ``gp`` and write the files of :func:`map_model` into ``out_dir`` (also the
    learner's ``Map`` RPC, into a temporary directory).  ``source`` names the model in the report.

    ``tolerance`` (meV/Å; None: :data:`learner_service.mapping.DEFAULT_TOLERANCE_MEV`): while the
    largest mapped-vs-GP force error measured (training environments, ``train_frames``,
    ``test_frames``) exceeds it, the knot spacings that were *not* given are refined by
    :data:`~learner_service.mapping.REFINE_FACTOR` and the model is mapped again, at most
    :data:`~learner_service.mapping.MAX_REFINEMENTS` times (the error of a cubic spline falls as
    spacing⁴; a 3-D grid costs spacing⁻³); the report says whether the tolerance was met."""
    from .lammps_export import export_lammps, fits_uf3_line
    from .mapping import (DEFAULT_SAMPLES, DEFAULT_SPACING_2, DEFAULT_SPACING_3, DEFAULT_SPACING_JK,
                          DEFAULT_TOLERANCE_MEV, MAX_REFINEMENTS, REFINE_FACTOR, force_errors, map_gp,
                          threebody_knots, training_environment_errors)

    tolerance = DEFAULT_TOLERANCE_MEV if tolerance is None else float(tolerance)
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise InvalidInput(f"mapping tolerance must be a positive number of meV/Å, got {tolerance}")
    out_dir = Path(out_dir)
    given = {"spacing2": spacing2, "spacing3": spacing3, "spacing_jk": spacing_jk}
    grid = {"spacing2": DEFAULT_SPACING_2 if spacing2 is None else spacing2,
            "spacing3": DEFAULT_SPACING_3 if spacing3 is None else spacing3,
            "spacing_jk": DEFAULT_SPACING_JK if spacing_jk is None else spacing_jk}
    free = [k for k, v in given.items() if v is None]
    attempts = []
    while True:
        mapped = map_gp(gp, **grid, samples=DEFAULT_SAMPLES if samples is None else samples, body_order=body_order,
                        log=log)
        report = {"model": source, "grid": mapped.metadata["grid"]}
        log("mapped-vs-GP forces on the training environments ...")
        report["training_environments"] = training_environment_errors(gp, mapped)
        for name, frames in (("train_frames", train_frames), ("test_frames", test_frames)):
            if frames is not None:
                log(f"mapped-vs-GP forces on {len(frames)} {name.replace('_', ' ')} ...")
                report[name] = force_errors(gp, mapped, frames)
        measured = [report[k]["max_meV_A"] for k in ("training_environments", "train_frames", "test_frames")
                    if k in report and report[k].get("components")]
        worst = max(measured) if measured else float("nan")
        attempts.append({**{k: float(v) for k, v in grid.items()}, "max_meV_A": worst})
        # axes that cannot be refined further for LAMMPS's uf3 line buffer stay as they are
        if "spacing2" in free and min(mapped.metadata["grid"]["spacing2_used_A"]) > grid["spacing2"] * (1 + 1e-9):
            free.remove("spacing2")  # at its interval cap: a finer request changes nothing
        if mapped.threebody:
            cut3 = max(float(k12[-1]) for k12, _, _, _ in mapped.threebody.values())
            finer = {k: grid[k] * REFINE_FACTOR for k in ("spacing3", "spacing_jk")}
            k12, k3 = threebody_knots(cut3, finer["spacing3"], finer["spacing_jk"])
            for name, knots in (("spacing3", k12), ("spacing_jk", k3)):
                if name in free and not fits_uf3_line(knots):
                    free.remove(name)
        if not (worst > tolerance) or not free or len(attempts) > MAX_REFINEMENTS:
            break
        log(f"largest mapped-vs-GP force error {worst:.3f} meV/Å > tolerance {tolerance:g} meV/Å: refining the "
            f"default knot spacing ({', '.join(free)}) by {REFINE_FACTOR:g} and mapping again "
            f"({len(attempts)}/{MAX_REFINEMENTS})")
        for k in free:
            grid[k] *= REFINE_FACTOR
    met = bool(worst <= tolerance) if measured else None
    report["tolerance"] = {"meV_A": tolerance, "met": met, "attempts": attempts,
                           "refined": free if len(attempts) > 1 else []}
    if met is False:
        log(f"WARNING: the mapped-vs-GP force error {worst:.3f} meV/Å is above the tolerance {tolerance:g} meV/Å"
            + (f" after {len(attempts) - 1} refinement(s)" if free and len(attempts) > 1 else
               " (the knot spacings were given, so they were not refined)" if not free else "")
            + "; finer knots (--spacing2/--spacing3/--spacing-jk) may not fit LAMMPS's uf3 line buffer")
    mv = None
    if variance:
        from .mapped_variance import map_variance, sigma_errors

        log("mapping the force uncertainty ...")
        mv = map_variance(gp)
        report["variance"] = {"rank": mv.rank, "terms": mv.metadata["terms"], "unit": mv.unit}
        for name, frames in (("train_frames", train_frames), ("test_frames", test_frames)):
            if frames is not None:
                report["variance"][name] = sigma_errors(gp, mv, frames)
    mapped.metadata["errors"] = {k: v for k, v in report.items() if k not in ("model", "grid")}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": mapped.save(out_dir / "mapped.npz")}
    files.update(export_lammps(mapped, out_dir, table_points=table_points))
    if mv is not None:
        files["variance"] = mv.save(out_dir / "mapped_variance.npz")
    report["files"] = {k: str(v) for k, v in files.items()}
    (out_dir / "mapping.json").write_text(json.dumps(report, indent=2))
    return report


def map_remote(address: str, out_dir, spacing2=None, spacing3=None, spacing_jk=None, samples=None,
               body_order=None, log=print) -> dict:
    """``epicycle map HOST:PORT``: the learner service maps the model it serves (its ``Map`` RPC);
    the reply's files are written into ``out_dir`` as :func:`map_model` writes them."""
    from .client import LearnerClient

    client = LearnerClient(address)
    try:
        log(f"asking the learner at {address} to map its model ...")
        reply = client.map(spacing2=spacing2, spacing3=spacing3, spacing_jk=spacing_jk, samples=samples,
                           body_order=body_order)
    finally:
        client.close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = json.loads(reply.report_json)
    report["model"] = f"learner {address}, model version {reply.model_version}"
    files = {"model": out_dir / "mapped.npz", "uf3": out_dir / "mapped.uf3", "snippet": out_dir / "mapped.lammps"}
    files["model"].write_bytes(reply.mapped)
    files["uf3"].write_text(reply.uf3)
    files["snippet"].write_text(reply.snippet)
    if reply.table:
        files["table"] = out_dir / "mapped.table"
        files["table"].write_text(reply.table)
    report["files"] = {k: str(v) for k, v in files.items()}
    (out_dir / "mapping.json").write_text(json.dumps(report, indent=2))
    return report


def format_map_report(r: dict) -> str:
    g = r["grid"]
    used2 = ", ".join(f"{h:.4g}" for h in g.get("spacing2_used_A", [g["spacing2_A"]]))
    lines = [f"mapped {r['model']}: {g['body_order']}-body, knots {used2} Å (2-body), "
             f"{g['spacing3_A']:g} Å (3-body r_ij, r_ik), {g['spacing_jk_A']:g} Å (r_jk), "
             f"{g['samples_per_interval']} samples per interval",
             "mapped - GP force error (meV/Å):"]
    for key, label in (("training_environments", "training environments"), ("train_frames", "training frames"),
                       ("test_frames", "test frames")):
        e = r.get(key)
        if e is None:
            continue
        if not e.get("components"):
            lines.append(f"  {label:22s} n/a {e.get('note', '')}")
            continue
        lines.append(f"  {label:22s} max {e['max_meV_A']:.3f}  RMS {e['rms_meV_A']:.3f}  "
                     f"({e['components']} components)")
    t = r.get("tolerance")
    if t and t.get("met") is not None:
        tries = len(t["attempts"])
        lines.append(f"tolerance {t['meV_A']:g} meV/Å: {'met' if t['met'] else 'NOT met'}"
                     + (f" after refining {', '.join(t['refined'])} {tries - 1} time(s)" if tries > 1 else ""))
    v = r.get("variance")
    if v:
        lines.append(f"mapped {v.get('terms', '2-body')} force σ (rank {v['rank']}) vs the exact GP atom σ:")
        for key in ("train_frames", "test_frames"):
            if key in v:
                e = v[key]
                lines.append(f"  {key.replace('_', ' '):22s} median |rel err| {e['median_rel_err']:.3f}  "
                             f"max {e['max_rel_err']:.3f}  corr {e['corr']:.3f}  ({e['atoms']} atoms)")
    lines.append("files: " + ", ".join(r["files"].values()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# argparse wiring
# ---------------------------------------------------------------------------


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except EpicycleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _cmd_fit(args) -> int:
    if args.atoms is not None and args.atoms_per_frame is not None:
        raise InvalidInput("give either --atoms or --atoms-per-frame, not both")
    fit_model(
        args.train,
        _parse_cutoffs(args.cutoffs),
        atoms=_parse_ints(args.atoms) if args.atoms is not None else None,
        atoms_per_frame=args.atoms_per_frame,
        energy=args.energy,
        stress=args.stress,
        max_iterations=args.max_iterations,
        optimize=not args.no_optimize,
        seed=args.seed,
        out=args.out,
        prior=args.prior,
        restarts=args.restarts,
        holdout=args.holdout,
        model=args.model,
        selection=args.selection,
    )
    return 0


def _cmd_predict(args) -> int:
    predict_file(args.model, args.input, args.out)
    return 0


def _cmd_evaluate(args) -> int:
    report = evaluate_model(args.model, args.test)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _is_address(text: str) -> bool:
    host, sep, port = str(text).rpartition(":")
    return bool(sep and host and port.isdigit()) and not Path(text).exists()


def _cmd_map(args) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if _is_address(args.model):
        extra = [flag for flag, given in (("--train", args.train), ("--test", args.test),
                                          ("--variance", args.variance),
                                          ("--tolerance", args.tolerance is not None)) if given]
        if extra:
            raise InvalidInput(f"{', '.join(extra)} need a model file: with a learner address (HOST:PORT) the "
                               f"learner maps its model and reports the errors on its training environments; "
                               f"export the model (or use its checkpoint directory) to check other frames")
        report = map_remote(args.model, args.out, spacing2=args.spacing2, spacing3=args.spacing3,
                            spacing_jk=args.spacing_jk, samples=args.samples, body_order=args.body_order, log=log)
    else:
        report = map_model(args.model, args.out, spacing2=args.spacing2, spacing3=args.spacing3,
                           spacing_jk=args.spacing_jk, samples=args.samples,
                           body_order=args.body_order, train_path=args.train, test_path=args.test,
                           variance=args.variance, tolerance=args.tolerance, log=log)
    print(json.dumps(report, indent=2) if args.json else format_map_report(report))
    return 0


def register_cli(subparsers) -> None:
    """Add ``fit``, ``predict`` and ``evaluate`` to an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "fit", help="train a GP force field on labelled extended XYZ",
        description="Train a GP force field (2- and 3-body kernels, FLARE) on labelled structures: forces "
        "(eV/Å), optionally total energies (eV, --energy) and stresses (eV/Å³, ASE sign, --stress). The "
        "hyperparameters (sig2, sig3 eV; ls2, ls3 Å; noise σn eV/Å) start from the one default set "
        "(docs/configuration.md) and are fitted by MAP with data-derived priors, checked on held-out "
        "frames; the model is written as .npz. Several inputs (XYZ files, run directories) are merged, "
        "with a summary per input (frames, atoms per element, energies, stresses).\n\n"
        "example (the labels of a run plus an extra labelled file):\n"
        "  epicycle fit runs/melt extra_labels.xyz --cutoffs 6.0,4.0 --atoms-per-frame 8 --out al_gp.npz")
    p.add_argument("train", nargs="+", metavar="DATA",
                   help="labelled data: extended XYZ files with forces (eV/Å; energies eV and stresses eV/Å³ "
                        "optional) and/or run directories (their oracle labels); several are merged, a "
                        "structure already in an earlier input dropped, e.g. runs/melt extra.xyz")
    p.add_argument("--cutoffs", required=True, help="2- and 3-body cutoffs in Å, e.g. 6.0,4.0")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--atoms", help="comma-separated atom indices to train on in every frame")
    sel.add_argument("--atoms-per-frame", type=int, help="train on N randomly chosen atoms per frame")
    p.add_argument("--energy", action="store_true", help="also train on total energies")
    p.add_argument("--stress", action="store_true", help="also train on stresses")
    p.add_argument("--max-iterations", type=int, default=200,
                   help="cap on the length-scale iterations of the hyperparameter search (default 200)")
    p.add_argument("--no-optimize", action="store_true", help="keep the default hyperparameters")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --atoms-per-frame, the held-out atoms and the prior draws of the restarts")
    p.add_argument("--prior", choices=("data", "none"), default="data",
                   help="hyperparameter prior: 'data' (MAP, log-normal priors centred on data-derived scales; "
                        "default) or 'none' (type-II maximum likelihood, as FLARE)")
    p.add_argument("--restarts", type=int, default=3, help="prior draws tried besides the prior centre and the "
                   "start values (default 3)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="share of the frames (of the atoms, with one frame) also held out of the search as extra "
                        "validation frames (default 0: the selection already holds out every training frame in "
                        "turn); they join the model after the selection")
    p.add_argument("--selection", choices=("cv", "objective"), default="cv",
                   help="how the hyperparameters are chosen among the likelihood's maxima and the start values: "
                        "'cv' (default) by leave-one-frame-out cross-validation (worst held-out frame force RMSE; "
                        "one frame: the start values stay); 'objective': the highest MAP/ML-II objective")
    p.add_argument("--model", choices=MODEL_KINDS, default="exact",
                   help="exact: the full GP on the selected atoms' forces (default); sparse: a sparse GP on every "
                        "force of every frame, the selected atoms (--atoms / --atoms-per-frame, default all) as its "
                        "inducing environments")
    p.add_argument("--out", required=True, help="model file to write (.npz)")
    p.set_defaults(func=_guard(_cmd_fit))

    p = subparsers.add_parser(
        "predict", help="predict forces and uncertainties with a trained GP",
        description="Predict every structure of INPUT with a model from `fit` and write extended XYZ: energy "
        "(eV; up to a constant unless the model was trained on energies), forces (eV/Å), per atom the σ of "
        "each force component 'force_std' and the rotation-invariant 'atom_std' (eV/Å, epistemic), the "
        "per-atom 'local_energy' (eV), stress (eV/Å³) for periodic cells, and σn (eV/Å) in the info.\n\n"
        "example:\n"
        "  epicycle predict al_gp.npz structures.xyz --out predicted.xyz")
    p.add_argument("model", help="model file written by 'fit'")
    p.add_argument("input", help="structures (extended XYZ)")
    p.add_argument("--out", required=True, help="output extended XYZ with forces, force_std and atom_std per atom")
    p.set_defaults(func=_guard(_cmd_predict))

    p = subparsers.add_parser(
        "evaluate", help="force errors and calibration on a labelled test set",
        description="Compare a model's forces with the labels of TEST: force RMSE and MAE (eV/Å) overall and "
        "per species, the 95th percentile of |F| (eV/Å) and RMSE/P95 (the paper's Table 1 ratio), the mean "
        "epistemic σ and σn (eV/Å), and calibration of the total σ: coverage within 1σ and 2σ, mean z² "
        "(1 when calibrated), miscalibration area and a variance scale.\n\n"
        "example:\n"
        "  epicycle evaluate al_gp.npz test_labels.xyz --json")
    p.add_argument("model", help="model file written by 'fit'")
    p.add_argument("test", help="labelled test set (extended XYZ with forces)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_guard(_cmd_evaluate))

    p = subparsers.add_parser(
        "map", help="map a GP to cubic splines and export LAMMPS pair_style uf3/table files",
        description="Fit cubic B-splines to the exact GP's 2- and 3-body local-energy mean (forces and stress are "
        "exact derivatives of one energy), write mapped.npz (our evaluator: `epicycle md --engine builtin`), "
        "mapped.uf3 for LAMMPS's stock pair_style uf3 (+ mapped.table for 2-body models) and the input snippet "
        "mapped.lammps, and print the mapped-vs-GP force error (meV/Å) on the training environments and on "
        "--train/--test frames. Knot spacings in Å; docs/mapping.md has the maths and the measured errors.\n\n"
        "example (the model of a run, then 10 ps of 1,372 atoms in LAMMPS):\n"
        "  epicycle map runs/melt/learner --out runs/al-map\n"
        "  epicycle md --potential runs/al-map --repeat 7 --ps 10 --out runs/al-md")
    p.add_argument("model", help="model file written by 'fit', a learner model directory, or the address HOST:PORT "
                   "of a learner service (it maps the model it serves: the Map RPC)")
    p.add_argument("--out", required=True, help="output directory (mapped.npz, mapped.uf3, mapped.lammps, ...)")
    p.add_argument("--spacing2", type=float, default=None, help="2-body knot spacing in Å (default 0.05, but at most 75 intervals)")
    p.add_argument("--spacing3", type=float, default=None,
                   help="3-body knot spacing along r_ij and r_ik in Å (default 0.2)")
    p.add_argument("--spacing-jk", type=float, default=None,
                   help="3-body knot spacing along r_jk in Å (default 0.1)")
    p.add_argument("--samples", type=int, default=None, help="least-squares samples per knot interval (default 2)")
    p.add_argument("--body-order", type=int, choices=(2, 3), default=None,
                   help="2: map only the 2-body term (default: 3 if the model has a 3-body term)")
    p.add_argument("--train", help="training frames (extended XYZ or run directory) to report errors on")
    p.add_argument("--test", help="test frames (extended XYZ) to report mapped-vs-GP force errors on")
    p.add_argument("--tolerance", type=float, default=None, metavar="MEV",
                   help="largest mapped-vs-GP force error in meV/Å (default 1); above it, the knot spacings not "
                   "given are refined by 0.75 and the model mapped again (at most 3 times)")
    p.add_argument("--variance", action="store_true",
                   help="also map the force uncertainty (2- and 3-body) to mapped_variance.npz and report its error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_guard(_cmd_map))
