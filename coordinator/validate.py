"""``epicycle validate MODEL_OR_RUN``: validate a force field the FLARE paper's way (seed 004, Table 1).

An independent MD trajectory is run with the model (in-process, the built-in engine of
:mod:`sampler_service.builtin_engine`), ``frames`` equally spaced frames of it are labelled by the oracle,
and the model's predictions at those frames are compared with the labels:

* force RMSE and MAE over every force component (eV/Å), the 95th percentile of the reference's
  absolute force components P95 (eV/Å) and the ratio RMSE/P95 (%) — Table 1's last three columns;
* energy (meV/atom) and stress (GPa) errors when the oracle gives them (a model trained on forces
  only knows the energy up to a constant: its mean offset is removed and reported);
* calibration of the predicted σ: z = (F_model − F_ref)/σ_total per component with
  σ_total² = σ_epistemic² + σn², mean z² (ideal 1), coverage of ±1σ and ±2σ (ideal 68.3 % and
  95.4 %) and the reliability curve (observed against expected coverage of central Gaussian
  intervals, :mod:`learner_service.calibration`).

The output directory holds ``validation.json``, ``validation.md``, ``parity.png`` (predicted
against reference force components), ``reliability.png`` and ``labelled.xyz`` (the labelled frames
with the model's forces, σ, energy and stress beside the oracle's labels).  Every label is written
as it arrives (``labels/frame_NNN.xyz``, atomically), so an interrupted validation resumes without
computing a label twice; ``--frames XYZ`` scores a model on frames labelled before, with no oracle.

The metric, plotting and writing functions here are pure NumPy/matplotlib on labelled ASE frames;
the GP is imported only by the functions that load or run a model, so the run report
(:mod:`coordinator.report`) uses the same block without importing it.

Frame conventions (extended XYZ): the oracle's labels on the frame's calculator (``energy`` eV,
``forces`` eV/Å, ``stress`` eV/Å³ Voigt); ``model_forces``/``model_force_std`` (n, 3) eV/Å per atom;
``info``: ``model_energy`` eV, ``model_stress`` (6,) eV/Å³, ``noise`` σn eV/Å, ``step``,
``time_fs``, ``temperature_K``; optional per-atom bool ``validate`` (only those atoms' forces count)
and info flags ``energy_in_training``/``stress_in_training`` (those labels are then not errors on
unseen data and are left out) and ``energy_up_to_constant`` (forces-only model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from protos.errors import EpicycleError, InvalidInput

#: GPa per eV/Å³
EV_PER_A3_IN_GPA = 160.21766208
#: extended XYZ files this module writes in an output directory
LABELLED_XYZ = "labelled.xyz"
TRAJECTORY_XYZ = "trajectory.xyz"
SETTINGS_JSON = "settings.json"


# =============================================================================================
# metrics (pure NumPy on labelled frames; also the run report's held-out block)
# =============================================================================================


def _reference(atoms, name: str):
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    value = results.get(name)
    if value is None and name == "forces" and "forces" in atoms.arrays:
        value = atoms.arrays["forces"]
    return value


def _voigt(stress) -> np.ndarray:
    """(6,) Voigt stress from (6,) or (3, 3) (extended XYZ files store the full tensor)."""
    s = np.asarray(stress, float)
    if s.size == 9:
        s = s.reshape(3, 3)[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return s.reshape(6)


def collect(frames: Sequence) -> dict[str, Any]:
    """The arrays the metrics need, from labelled frames (module docstring): force components of the
    atoms that count (``validate`` mask, default all), their total σ, per-frame energies and stresses
    of the frames whose energy/stress was not trained on."""
    ref_f, pred_f, sig_f, frame_of = [], [], [], []
    ref_e, pred_e, n_atoms_e, ref_s, pred_s = [], [], [], [], []
    offset_removed = False
    for k, atoms in enumerate(frames):
        forces = _reference(atoms, "forces")
        if forces is None:
            raise InvalidInput(f"frame {k} has no reference forces (oracle labels)")
        for name in ("model_forces", "model_force_std"):
            if name not in atoms.arrays:
                raise InvalidInput(f"frame {k} has no per-atom {name!r} (the model's prediction)")
        noise = atoms.info.get("noise")
        if noise is None:
            raise InvalidInput(f"frame {k} has no 'noise' (σn of the model, eV/Å) in its info")
        mask = np.asarray(atoms.arrays.get("validate", np.ones(len(atoms), bool)), dtype=bool)
        if not mask.any():
            continue
        ref_f.append(np.asarray(forces, float)[mask])
        pred_f.append(np.asarray(atoms.arrays["model_forces"], float)[mask])
        std = np.asarray(atoms.arrays["model_force_std"], float)[mask]
        sig_f.append(np.sqrt(std ** 2 + float(noise) ** 2))
        frame_of.append(np.full(int(mask.sum()) * 3, k))
        energy = _reference(atoms, "energy")
        if energy is not None and atoms.info.get("model_energy") is not None \
                and not atoms.info.get("energy_in_training", False):
            ref_e.append(float(energy))
            pred_e.append(float(atoms.info["model_energy"]))
            n_atoms_e.append(len(atoms))
            offset_removed = offset_removed or bool(atoms.info.get("energy_up_to_constant", False))
        stress = _reference(atoms, "stress")
        if stress is not None and atoms.info.get("model_stress") is not None \
                and not atoms.info.get("stress_in_training", False):
            ref_s.append(_voigt(stress))
            pred_s.append(_voigt(atoms.info["model_stress"]))
    if not ref_f:
        raise InvalidInput("no force components to validate on (every atom masked out)")
    cat = lambda xs: np.concatenate(xs).reshape(-1)  # noqa: E731
    return {"ref_forces": cat(ref_f), "pred_forces": cat(pred_f), "sigma_total": cat(sig_f),
            "frame_of_component": np.concatenate(frame_of),
            "ref_energy": np.array(ref_e), "pred_energy": np.array(pred_e), "energy_atoms": np.array(n_atoms_e),
            "energy_offset_removed": offset_removed,
            "ref_stress": np.array(ref_s).reshape(-1, 6), "pred_stress": np.array(pred_s).reshape(-1, 6)}


def force_metrics(pred, ref, sigma_total) -> dict:
    """Force errors (eV/Å) and calibration of force components ``pred`` vs ``ref`` with total σ."""
    from learner_service.calibration import calibration_summary

    pred = np.asarray(pred, float).reshape(-1)
    ref = np.asarray(ref, float).reshape(-1)
    err = pred - ref
    rmse = float(np.sqrt(np.mean(err ** 2)))
    p95 = float(np.percentile(np.abs(ref), 95))
    cal = calibration_summary(err, sigma_total)
    return {
        "components": int(err.size),
        "rmse": rmse,
        "mae": float(np.mean(np.abs(err))),
        "max_abs_error": float(np.max(np.abs(err))),
        "p95_abs_reference": p95,
        "ratio_percent": 100.0 * rmse / p95 if p95 > 0 else math.nan,
        "calibration": {
            "mean_squared_z": cal.mean_squared_z,
            "within_1_sigma": cal.within_1_sigma,
            "within_2_sigma": cal.within_2_sigma,
            "miscalibration_area": cal.miscalibration_area,
            "reliability": {"expected": list(cal.levels), "observed": list(cal.observed)},
            "rms_total_sigma": float(np.sqrt(np.mean(np.asarray(sigma_total, float) ** 2))),
        },
    }


def energy_metrics(pred, ref, n_atoms, offset_removed: bool) -> dict | None:
    """Energy errors per atom (meV/atom); with ``offset_removed`` the mean per-atom difference (the
    undetermined constant of a forces-only model) is subtracted first and reported."""
    pred, ref, n = (np.asarray(x, float).reshape(-1) for x in (pred, ref, n_atoms))
    if pred.size == 0:
        return None
    d = (pred - ref) / n * 1000.0
    offset = float(np.mean(d)) if offset_removed else 0.0
    d = d - offset
    return {"frames": int(d.size), "rmse_meV_per_atom": float(np.sqrt(np.mean(d ** 2))),
            "mae_meV_per_atom": float(np.mean(np.abs(d))), "offset_removed": bool(offset_removed),
            "offset_meV_per_atom": offset if offset_removed else None}


def stress_metrics(pred, ref) -> dict | None:
    """Stress errors over the 6 Voigt components of every frame, GPa."""
    pred, ref = np.asarray(pred, float).reshape(-1, 6), np.asarray(ref, float).reshape(-1, 6)
    if pred.size == 0:
        return None
    d = (pred - ref).reshape(-1) * EV_PER_A3_IN_GPA
    return {"frames": int(pred.shape[0]), "rmse_GPa": float(np.sqrt(np.mean(d ** 2))),
            "mae_GPa": float(np.mean(np.abs(d)))}


def frames_metrics(frames: Sequence) -> tuple[dict, dict]:
    """``(metrics, arrays)``: the numbers of the validation block for labelled frames and the arrays
    behind them (for the plots)."""
    a = collect(frames)
    metrics = {
        "frames": len(frames),
        "forces": force_metrics(a["pred_forces"], a["ref_forces"], a["sigma_total"]),
        "energy": energy_metrics(a["pred_energy"], a["ref_energy"], a["energy_atoms"], a["energy_offset_removed"]),
        "stress": stress_metrics(a["pred_stress"], a["ref_stress"]),
        "units": {"forces": "eV/Å", "energy": "meV/atom", "stress": "GPa", "ratio": "%"},
    }
    return metrics, a


# =============================================================================================
# a run's own held-out labels (the run report's validation block)
# =============================================================================================

#: in the run directory: the held-out labels with the final model's predictions (written at the end of a run)
HELDOUT_XYZ = "heldout.xyz"
#: at most this many labels (equally spaced over the run) are predicted for the held-out block
HELDOUT_MAX_FRAMES = 100


def heldout_selection(frames: Sequence) -> tuple[str, list]:
    """``(kind, frames)``: the labels of a run (:func:`coordinator.export.run_frames`) to validate on —
    labels the learner has not trained on (``"labels not trained on"``, every atom counts) if there are
    any, else the atoms of the labelled frames that did not enter training (``"atoms not trained on"``,
    per-atom ``validate`` mask)."""
    unseen = [a for a in frames if not a.info.get("applied", False)]
    if unseen:
        out = []
        for a in unseen:
            a.arrays["validate"] = np.ones(len(a), bool)
            out.append(a)
        return "labels not trained on", out
    out = []
    for a in frames:
        mask = ~np.asarray(a.arrays.get("training", np.zeros(len(a), bool)), dtype=bool)
        if mask.any():
            a.arrays["validate"] = mask
            out.append(a)
    return "atoms not trained on", out


def record_heldout(run_dir: Path, predict: Callable, use_energy: bool = False, use_stress: bool = False,
                   max_frames: int = HELDOUT_MAX_FRAMES) -> tuple[str, int]:
    """Predict the run's held-out labels (:func:`heldout_selection`, at most ``max_frames`` equally
    spaced) with ``predict(atoms, stress=bool)`` (the learner port: forces, force_std, energy, stress,
    noise, model_version) and write them to ``RUN/heldout.xyz``; returns ``(kind, frames written)``.
    ``use_energy``/``use_stress``: whether the run trained on those labels (then a frame's energy or
    stress is not held out unless the whole label is).  In this file ``model_forces``/``model_force_std``
    are the final model's (in ``epicycle export`` they are the model's at the oracle call)."""
    from coordinator.export import run_frames

    from protos.files import atomic_write

    kind, frames = heldout_selection(run_frames(run_dir))
    path = Path(run_dir) / HELDOUT_XYZ
    if not frames:
        path.unlink(missing_ok=True)
        return kind, 0
    if len(frames) > max_frames:
        pick = np.unique(np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(int))
        frames = [frames[i] for i in pick]
    for a in frames:
        # the model's stress only where there is a reference stress (it costs the slower prediction path)
        p = predict(a, stress=bool(np.all(a.pbc)) and _reference(a, "stress") is not None)
        a.arrays["model_forces"] = np.asarray(p.forces, float)
        a.arrays["model_force_std"] = np.asarray(p.force_std, float)
        if p.energy is not None:
            a.info["model_energy"] = float(p.energy)
        if p.stress is not None:
            a.info["model_stress"] = np.asarray(p.stress, float)
        a.info.update(noise=float(p.noise), heldout=kind, final_model_version=int(p.model_version),
                      energy_up_to_constant=not use_energy)
        whole = kind == "labels not trained on"
        a.info["energy_in_training"] = bool(use_energy and not whole)
        a.info["stress_in_training"] = bool(use_stress and not whole)
    import io

    from ase.io import write

    buf = io.StringIO()
    write(buf, frames, format="extxyz")
    atomic_write(path, buf.getvalue().encode())
    return kind, len(frames)


# =============================================================================================
# plots and text
# =============================================================================================


def write_plots(out_dir: Path, metrics: dict, arrays: dict, parity: str = "parity.png",
                reliability: str = "reliability.png", title: str = "") -> None:
    """The parity plot (model vs reference force components) and the reliability plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = metrics["forces"]
    ref, pred = arrays["ref_forces"], arrays["pred_forces"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    lim = 1.05 * float(max(np.max(np.abs(ref)), np.max(np.abs(pred)), 1e-6))
    ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=0.8)
    ax.plot(ref, pred, ".", ms=2.5, alpha=0.5, color="tab:blue")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("reference force component (eV/Å)")
    ax.set_ylabel("model force component (eV/Å)")
    ax.set_title((title + "\n" if title else "") + f"RMSE {f['rmse']:.3f} eV/Å, P95 {f['p95_abs_reference']:.2f} eV/Å, "
                 f"{f['ratio_percent']:.1f} %", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / parity, dpi=120)
    plt.close(fig)

    c = f["calibration"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="calibrated")
    ax.plot(c["reliability"]["expected"], c["reliability"]["observed"], "o-", ms=4, color="tab:purple",
            label=f"model σ (mean z² {c['mean_squared_z']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("expected coverage of the central Gaussian interval")
    ax.set_ylabel("observed coverage of force errors")
    ax.set_title((title + "\n" if title else "") + f"Reliability: within 1σ {100 * c['within_1_sigma']:.0f} %, "
                 f"2σ {100 * c['within_2_sigma']:.0f} %", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / reliability, dpi=120)
    plt.close(fig)


def table_lines(metrics: dict, temperature_K: float | None = None) -> list[str]:
    """Markdown lines: Table-1 style row, energy/stress and calibration."""
    f, c = metrics["forces"], metrics["forces"]["calibration"]
    t = f"{temperature_K:.0f}" if temperature_K is not None else "–"
    lines = [
        "| frames | force components | mean T (K) | force RMSE (eV/Å) | P95 \\|F\\| (eV/Å) | RMSE/P95 |",
        "|---|---|---|---|---|---|",
        f"| {metrics['frames']} | {f['components']} | {t} | {f['rmse']:.4f} | {f['p95_abs_reference']:.3f} | "
        f"{f['ratio_percent']:.1f} % |",
        "",
        "| calibration (σ_total² = σ_epistemic² + σn²) | value | ideal |",
        "|---|---|---|",
        f"| mean z² | {c['mean_squared_z']:.2f} | 1 |",
        f"| within 1σ | {100 * c['within_1_sigma']:.1f} % | 68.3 % |",
        f"| within 2σ | {100 * c['within_2_sigma']:.1f} % | 95.4 % |",
        f"| miscalibration area | {c['miscalibration_area']:.3f} | 0 |",
        f"| RMS total σ | {c['rms_total_sigma']:.4f} eV/Å | ≈ force RMSE |",
        "",
        f"Force MAE {f['mae']:.4f} eV/Å, largest error {f['max_abs_error']:.3f} eV/Å.",
    ]
    e, s = metrics.get("energy"), metrics.get("stress")
    if e:
        lines.append(f"Energy: RMSE {e['rmse_meV_per_atom']:.2f} meV/atom, MAE {e['mae_meV_per_atom']:.2f} meV/atom "
                     f"over {e['frames']} frame(s)" + (
                         f" (forces-only model: energy known up to a constant; mean offset "
                         f"{e['offset_meV_per_atom']:.1f} meV/atom removed)" if e["offset_removed"] else "") + ".")
    else:
        lines.append("Energy: not available (no energy labels outside the training set).")
    if s:
        lines.append(f"Stress: RMSE {s['rmse_GPa']:.3f} GPa, MAE {s['mae_GPa']:.3f} GPa over {s['frames']} frame(s).")
    else:
        lines.append("Stress: not available (no stress labels outside the training set).")
    return lines


def summary_line(metrics: dict) -> str:
    f, c = metrics["forces"], metrics["forces"]["calibration"]
    return (f"force RMSE {f['rmse']:.4f} eV/Å, P95 |F| {f['p95_abs_reference']:.3f} eV/Å, ratio "
            f"{f['ratio_percent']:.1f} %; mean z² {c['mean_squared_z']:.2f}, within 1σ {100 * c['within_1_sigma']:.0f} %, "
            f"2σ {100 * c['within_2_sigma']:.0f} %")


# =============================================================================================
# the model, the structure and the oracle
# =============================================================================================


def load_model(path: Path, progress: Callable[[str], None] = print):
    """``(model, description)`` of a saved model file (exact or sparse GP), a learner model directory,
    or a run directory (its learner checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such model file or run directory")
    if path.is_dir():
        if (path / "state.json").is_file():
            from coordinator.rundir import RunDirectory

            st = RunDirectory.open(path).load_state()
            mdir = path / "learner"
            if not st.learner_checkpoint:
                raise InvalidInput(f"{path}: the run has no learner checkpoint yet (no model to validate)")
            if not (mdir / "checkpoints").is_dir():
                raise InvalidInput(f"{path}: the run's learner kept its model elsewhere (remote learner: no "
                                   f"{mdir}); validate the model file it exports instead")
            from learner_service.checkpoints import ModelDirectory

            progress(f"model: learner checkpoint {st.learner_checkpoint} of run {path} (rebuilding)")
            return (ModelDirectory(mdir).load(st.learner_checkpoint, progress=None),
                    f"run {path}, learner checkpoint {st.learner_checkpoint}")
        if (path / "checkpoints").is_dir():
            from learner_service.checkpoints import ModelDirectory

            md = ModelDirectory(path)
            return md.load(progress=None), f"model directory {path}, checkpoint {md.latest_id()}"
        raise InvalidInput(f"{path}: a directory that is neither a run directory (state.json) nor a learner "
                           f"model directory (checkpoints/)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
    except Exception as exc:  # noqa: BLE001 - npz/zip/json errors of a file that is not a model
        raise InvalidInput(f"{path}: not an Epicycle model file (.npz written by `epicycle fit`): {exc}") from None
    fmt = meta.get("format")
    if fmt == "epicycle-gp":
        from learner_service.gp import GaussianProcess

        return GaussianProcess.load(path), f"model file {path}"
    if fmt == "epicycle-sgp":
        from learner_service.sparse_gp import SparseGaussianProcess

        return SparseGaussianProcess.load(path), f"sparse model file {path}"
    raise InvalidInput(f"{path}: unknown model format {fmt!r} (expected an exact or sparse GP model file)")


def _run_config(path: Path):
    import yaml

    from coordinator.config import parse_config

    return parse_config(yaml.safe_load((Path(path) / "config.yaml").read_text()))


def run_start_structure(run_dir: Path):
    """The first walker's starting structure of a run (as the run built it)."""
    from coordinator.cycle import walker_structure

    config = _run_config(run_dir)
    return walker_structure(config, config.walker_list()[0])


def read_structure(path: Path, index: int = 0):
    import ase.io

    if not Path(path).is_file():
        raise InvalidInput(f"--structure {path}: no such file")
    try:
        atoms = ase.io.read(str(path), index=index)
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds
        raise InvalidInput(f"--structure {path}: cannot read frame {index} ({type(exc).__name__}: {exc})") from None
    from ase import Atoms

    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


class Labeler:
    """The oracle of a validation: an embedded backend (``emt``, ``lj``, ``qe``, ...) through the oracle
    service's own :class:`~oracle_service.core.LabelService` (input checks as a served oracle), or a
    remote Oracle service ``host:port``.  ``label(atoms) -> (energy, forces, stress)``."""

    def __init__(self, spec: str, settings: dict | None = None, timeout: float = 600.0) -> None:
        self.spec = spec
        self._client = self._service = None
        if ":" in spec:
            if settings:
                raise InvalidInput("--oracle-set applies to an embedded backend, not to a remote oracle "
                                   f"{spec} (its settings are the server's)")
            from oracle_service.client import OracleClient

            self._client = OracleClient(spec, timeout=timeout)
            self._client.wait_ready(30.0)
            self.description = f"oracle service {spec} ({self._client.describe().backend})"
        else:
            from oracle_service.core import LabelService

            self._service = LabelService.from_backend(spec, settings or {})
            self.description = f"embedded {spec}" + (f" {settings}" if settings else "")

    @classmethod
    def from_run(cls, run_dir: Path) -> "Labeler":
        """The oracle of a run's configuration (its embedded backend, or its first remote address)."""
        oc = _run_config(run_dir).oracle
        if oc.addresses:
            return cls(oc.addresses[0], timeout=oc.timeout_s)
        return cls(oc.backend, dict(oc.settings), timeout=oc.timeout_s)

    def label(self, atoms):
        if self._client is not None:
            lab = self._client.label(atoms).labels
        else:
            lab = self._service.label(atoms).labels
        return lab.energy, lab.forces, lab.stress

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._service is not None:
            self._service.close()


def parse_settings(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--oracle-set expects KEY=VALUE (e.g. latency_s=0.1), got {item!r}")
        out[key.strip()] = yaml.safe_load(text)
    return out


# =============================================================================================
# the trajectory
# =============================================================================================


@dataclass(frozen=True)
class TrajectorySettings:
    """The independent MD trajectory: ensemble (``nve`` or an ``nvt_*`` of the built-in engine), initial
    Maxwell–Boltzmann temperature and thermostat target (K), Δt (fs), length (steps), frames labelled,
    velocity seed."""

    ensemble: str = "nve"
    temperature_K: float = 300.0
    timestep_fs: float = 1.0
    steps: int = 1000
    frames: int = 10
    seed: int = 1

    def check(self) -> None:
        from sampler_service.settings import ENSEMBLES

        if self.ensemble not in ENSEMBLES or self.ensemble.startswith("npt"):
            allowed = [e for e in ENSEMBLES if not e.startswith("npt")]
            raise InvalidInput(f"--ensemble {self.ensemble!r}: allowed {', '.join(allowed)}")
        if not (math.isfinite(self.temperature_K) and self.temperature_K >= 0):
            raise InvalidInput(f"--temperature must be ≥ 0 K, got {self.temperature_K}")
        if not (math.isfinite(self.timestep_fs) and 0 < self.timestep_fs <= 20):
            raise InvalidInput(f"--timestep must be in (0, 20] fs, got {self.timestep_fs}")
        if self.frames < 1:
            raise InvalidInput(f"--frames must be ≥ 1, got {self.frames}")
        if self.steps < self.frames:
            raise InvalidInput(f"--steps ({self.steps}) must be at least --frames ({self.frames}): the frames are "
                               f"equally spaced MD steps")

    def frame_steps(self) -> list[int]:
        """The MD steps labelled: equally spaced, the last at the end of the trajectory."""
        return [int(round((k + 1) * self.steps / self.frames)) for k in range(self.frames)]


class ModelProvider:
    """The model as the built-in engine's force provider (forces, per-component and per-atom σ)."""

    def __init__(self, model) -> None:
        self.model = model

    def compute(self, positions, cell, numbers, pbc):
        from ase import Atoms

        from sampler_service.force_providers import ForceResult

        p = self.model.predict(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc))
        return ForceResult(energy=p.energy, forces=p.forces, force_std=p.force_std, noise=p.noise,
                           model_version=int(p.model_version), atom_std=p.atom_std)


def run_trajectory(model, atoms, ts: TrajectorySettings, progress: Callable[[str], None] = print):
    """Run ``ts.steps`` MD steps from ``atoms`` on ``model``; returns ``(frames, temperatures_K)``: the
    structures at :meth:`TrajectorySettings.frame_steps` (Atoms with info step, time_fs, temperature_K)
    and the temperature of every step."""
    from ase import Atoms

    from sampler_service.builtin_engine import BuiltinEngine
    from sampler_service.settings import SamplerSettings

    settings = SamplerSettings(ensemble=ts.ensemble, timestep_fs=ts.timestep_fs, temperature_K=ts.temperature_K,
                               seed=ts.seed, initial_temperature_K=ts.temperature_K)
    engine = BuiltinEngine(settings, ModelProvider(model), atoms)
    wanted = set(ts.frame_steps())
    frames, temps = [], []
    t0 = time.perf_counter()
    report_every = max(1, ts.steps // 10)

    def on_frame(frame) -> None:
        temps.append(frame.observables.temperature_K)
        if frame.step in wanted:
            a = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
            a.info.update(step=int(frame.step), time_fs=float(frame.time_fs),
                          temperature_K=float(frame.observables.temperature_K))
            frames.append(a)
        if frame.step and frame.step % report_every == 0:
            rate = frame.step / (time.perf_counter() - t0)
            sigma = float(np.max(frame.atom_std)) if frame.atom_std is not None else float("nan")
            progress(f"MD {frame.step}/{ts.steps} steps ({100 * frame.step / ts.steps:.0f} %), {rate:.1f} steps/s, "
                     f"ETA {(ts.steps - frame.step) / rate:.0f} s, T {frame.observables.temperature_K:.0f} K, "
                     f"max σ {sigma:.3f} eV/Å")

    engine.run(ts.steps + 1, threshold=None, frame_interval=1, on_frame=on_frame)
    return frames, temps


# =============================================================================================
# the validation
# =============================================================================================


def predict_frame(model, atoms, reference) -> Any:
    """``reference`` (an Atoms with the oracle's labels on its calculator) with the model's prediction
    added as ``model_forces``, ``model_force_std``, ``model_energy``, ``model_stress``, ``noise``."""
    stress = bool(np.all(atoms.pbc)) and _reference(reference, "stress") is not None
    p = model.predict(atoms, stress=stress)
    reference.arrays["model_forces"] = np.asarray(p.forces)
    reference.arrays["model_force_std"] = np.asarray(p.force_std)
    reference.info["model_energy"] = float(p.energy)
    if p.stress is not None:
        reference.info["model_stress"] = np.asarray(p.stress, float)
    reference.info["noise"] = float(p.noise)
    reference.info["energy_up_to_constant"] = getattr(model, "n_energy_labels", 0) == 0
    return reference


def _labelled(atoms, energy, forces, stress):
    from ase.calculators.singlepoint import SinglePointCalculator

    out = atoms.copy()
    results = {"forces": np.asarray(forces, float)}
    if energy is not None:
        results["energy"] = float(energy)
    if stress is not None:
        results["stress"] = np.asarray(stress, float)
    out.calc = SinglePointCalculator(out, **results)
    return out


def _write_xyz(path: Path, frames) -> None:
    from ase.io import write

    from protos.files import atomic_write
    import io

    buf = io.StringIO()
    write(buf, list(frames), format="extxyz")
    atomic_write(path, buf.getvalue().encode())


def _read_xyz(path: Path) -> list:
    from ase.io import read

    try:
        return read(str(path), index=":")
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"{path}: cannot read as extended XYZ ({type(exc).__name__}: {exc})") from None


def _check_species(model, frames, what: str) -> None:
    unknown = sorted({int(z) for a in frames for z in a.numbers} - {int(z) for z in model.species})
    if unknown:
        raise InvalidInput(f"{what} has elements {unknown} (atomic numbers) that the model does not know "
                           f"(species {list(model.species)})")


def _check_resume(out: Path, settings: dict) -> None:
    path = out / SETTINGS_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise InvalidInput(f"{out} holds a validation with other settings ({', '.join(diff)} differ: "
                               + "; ".join(f"{k} {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                               + "); choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise InvalidInput(f"{out} exists and is not a validation directory; choose another --out")


def validate(source: Path, out: Path, ts: TrajectorySettings, oracle: str | None = None,
             oracle_settings: dict | None = None, structure: Path | None = None, structure_index: int = 0,
             frames_file: Path | None = None, progress: Callable[[str], None] = print) -> dict:
    """Validate the model of ``source`` (module docstring); returns the ``validation.json`` content."""
    from protos.files import atomic_write

    source, out = Path(source), Path(out)
    if not source.exists():
        raise InvalidInput(f"{source}: no such model file or run directory")
    is_run = source.is_dir() and (source / "state.json").is_file()
    if frames_file is None:
        ts.check()
        if oracle is None and not is_run:
            raise InvalidInput("give --oracle (an embedded backend such as emt, or HOST:PORT of an Oracle service); "
                               "only a run directory has a default (the run's own oracle)")
        if structure is None and not is_run:
            raise InvalidInput("give --structure FILE (the starting structure); only a run directory has a "
                               "default (the run's initial structure)")
    elif oracle is not None or structure is not None:
        raise InvalidInput("--labelled scores the model on frames labelled before: it takes no --oracle or --structure")
    model, model_text = load_model(source, progress)
    settings = {"model": model_text, **asdict(ts), "oracle": oracle, "oracle_settings": oracle_settings or {},
                "structure": str(structure) if structure else ("run's initial structure" if is_run else None),
                "structure_index": structure_index, "frames_file": str(frames_file) if frames_file else None}
    if frames_file is not None:
        for k in asdict(ts):
            settings.pop(k)
    _check_resume(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SETTINGS_JSON, (json.dumps(settings, indent=1) + "\n").encode())
    progress(f"validating {model_text}: {model!r}")

    temps: list[float] = []
    if frames_file is not None:
        labelled_in = _read_xyz(frames_file)
        if not labelled_in:
            raise InvalidInput(f"--labelled {frames_file}: no frames")
        _check_species(model, labelled_in, f"--labelled {frames_file}")
        for a in labelled_in:  # masks and flags of another model's training set do not apply to this one
            a.arrays.pop("validate", None)
            for key in ("energy_in_training", "stress_in_training", "model_stress", "model_energy"):
                a.info.pop(key, None)
        labelled = [predict_frame(model, a, a) for a in labelled_in]
        oracle_text = f"labels of {frames_file}"
    else:
        atoms = read_structure(structure, structure_index) if structure is not None else run_start_structure(source)
        _check_species(model, [atoms], "the starting structure")
        traj_path = out / TRAJECTORY_XYZ
        if traj_path.is_file() and len(prior := _read_xyz(traj_path)) == ts.frames:
            chosen = prior
            temps = [float(t) for t in json.loads((out / "temperatures.json").read_text())]
            progress(f"trajectory: the {ts.frames} frames of {traj_path} (resumed)")
        else:
            progress(f"trajectory: {ts.steps} steps of {ts.ensemble} at {ts.temperature_K:g} K, Δt {ts.timestep_fs:g} fs, "
                     f"{len(atoms)} atoms, seed {ts.seed}; labelling {ts.frames} frames at steps "
                     f"{ts.frame_steps()}")
            chosen, temps = run_trajectory(model, atoms, ts, progress)
            atomic_write(out / "temperatures.json", json.dumps(temps).encode())
            _write_xyz(traj_path, chosen)
            chosen = _read_xyz(traj_path)  # positions as written: a resumed validation labels the same numbers
        labels_dir = out / "labels"
        labels_dir.mkdir(exist_ok=True)
        labeler = Labeler(oracle, oracle_settings) if oracle is not None else Labeler.from_run(source)
        oracle_text = labeler.description
        labelled = []
        try:
            oracle_seconds, computed = 0.0, 0
            for k, frame in enumerate(chosen):
                path = labels_dir / f"frame_{k:03d}.xyz"
                if path.is_file():
                    lab = _read_xyz(path)[0]
                    how = "on disk"
                else:
                    t0 = time.perf_counter()
                    try:
                        energy, forces, stress = labeler.label(frame)
                    except EpicycleError as exc:
                        raise type(exc)(f"oracle ({oracle_text}) on frame {k} (MD step {frame.info['step']}): {exc}") \
                            from None
                    lab = _labelled(frame, energy, forces, stress)
                    _write_xyz(path, [lab])
                    lab = _read_xyz(path)[0]  # the label as stored: a resume computes the same numbers
                    computed += 1
                    oracle_seconds += time.perf_counter() - t0
                    eta = oracle_seconds / computed * sum(1 for j in range(k + 1, len(chosen))
                                                          if not (labels_dir / f"frame_{j:03d}.xyz").is_file())
                    how = f"oracle {oracle_seconds / computed:.2f} s/label, ETA {eta:.0f} s"
                lab.info.update(frame.info)
                labelled.append(predict_frame(model, frame, lab))
                err = lab.arrays["model_forces"] - lab.calc.results["forces"]
                progress(f"label {k + 1}/{len(chosen)} (step {frame.info['step']}): force RMSE "
                         f"{np.sqrt(np.mean(err ** 2)):.4f} eV/Å ({how})")
        finally:
            labeler.close()
    _write_xyz(out / LABELLED_XYZ, labelled)
    metrics, arrays = frames_metrics(labelled)
    result = {
        "kind": "independent trajectory" if frames_file is None else "labelled frames",
        "model": model_text,
        "model_noise_eV_per_A": float(model.noise),
        "oracle": oracle_text,
        "trajectory": None if frames_file is not None else {
            **asdict(ts), "frame_steps": ts.frame_steps(), "n_atoms": len(labelled[0]),
            "mean_temperature_K": float(np.mean(temps)) if temps else None,
            "structure": settings["structure"]},
        **metrics,
        "files": {"labelled_frames": LABELLED_XYZ, "parity_plot": "parity.png", "reliability_plot": "reliability.png"},
    }
    atomic_write(out / "validation.json", (json.dumps(result, indent=1) + "\n").encode())
    write_plots(out, metrics, arrays)
    atomic_write(out / "validation.md", ("\n".join(_markdown(result)) + "\n").encode())
    progress(f"{summary_line(metrics)}\nvalidation report: {out / 'validation.md'}")
    return result


def _markdown(r: dict) -> list[str]:
    tr = r["trajectory"]
    lines = [f"# Validation — {r['model']}", ""]
    if tr:
        lines += [f"Independent {tr['ensemble'].upper()} trajectory with the model: {tr['steps']} steps of "
                  f"{tr['timestep_fs']:g} fs ({tr['steps'] * tr['timestep_fs'] / 1000:g} ps), {tr['n_atoms']} atoms "
                  f"from {tr['structure']}, initial temperature {tr['temperature_K']:g} K (seed {tr['seed']}); "
                  f"{r['frames']} equally spaced frames (steps {', '.join(map(str, tr['frame_steps']))}) labelled by "
                  f"{r['oracle']}. σn of the model {r['model_noise_eV_per_A']:.4f} eV/Å.", ""]
    else:
        lines += [f"{r['frames']} frames: {r['oracle']}.", ""]
    lines += table_lines(r, tr["mean_temperature_K"] if tr else None)
    lines += ["", "![parity](parity.png)", "", "![reliability](reliability.png)", "",
              f"Labelled frames (oracle labels and the model's forces, σ, energy, stress): `{LABELLED_XYZ}`."]
    return lines


# =============================================================================================
# command line
# =============================================================================================


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="validate a model on an independent MD trajectory labelled by an oracle (FLARE Table 1)",
        description="Run an independent MD trajectory with the model, label equally spaced frames with the oracle "
        "and report force RMSE (eV/Å), the 95th percentile of |F| of the reference, their ratio (%), energy "
        "(meV/atom) and stress (GPa) errors, and calibration of σ (mean z², 1σ/2σ coverage, reliability), with a "
        "parity and a reliability plot. Interrupted validations resume (labels are kept).\n\n"
        "example (a run, on a hotter trajectory than it was trained on):\n"
        "  epicycle validate runs/al-melt-20260101-120000 --steps 600 --temperature 600")
    p.add_argument("model", type=Path, metavar="MODEL_OR_RUN",
                   help="a model file (epicycle fit --out), a learner model directory, or a run directory (its "
                        "learner checkpoint)")
    p.add_argument("--oracle", metavar="BACKEND|HOST:PORT",
                   help="embedded backend (emt, lj, qe, gpaw, cp2k, xtb, ...) or an Oracle service address; "
                        "default for a run: the run's own oracle")
    p.add_argument("--oracle-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the embedded backend (repeat), e.g. latency_s=0.5")
    p.add_argument("--structure", type=Path, metavar="FILE", help="starting structure (any format ASE reads); default for a run: "
                   "its initial structure")
    p.add_argument("--index", type=int, default=0, metavar="N", help="frame of --structure (default 0)")
    p.add_argument("--ensemble", default="nve", metavar="NAME", help="nve (default, as the paper), nvt_langevin, nvt_berendsen, "
                   "nvt_csvr")
    p.add_argument("--temperature", type=float, metavar="K", help="initial Maxwell–Boltzmann temperature and thermostat target, K "
                   "(default: the run's sampler temperature, else 300)")
    p.add_argument("--timestep", type=float, metavar="FS", help="MD time step, fs (default: the run's, else 1)")
    p.add_argument("--steps", type=int, metavar="N", help="MD steps (default: the run's, else 1000)")
    p.add_argument("--frames", type=int, default=10, metavar="N", help="equally spaced frames labelled (default 10, as the paper)")
    p.add_argument("--seed", type=int, metavar="N", help="velocity seed (default: the run's seed + 1000, else 1)")
    p.add_argument("--labelled", type=Path, dest="frames_file", metavar="XYZ",
                   help="no MD and no oracle: score the model on frames labelled before (e.g. another "
                        "validation's labelled.xyz)")
    p.add_argument("--out", type=Path, metavar="DIR", help="report directory (default: RUN/validation, or MODEL.validation/)")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    source = args.model
    is_run = source.is_dir() and (source / "state.json").is_file()
    defaults = {"temperature_K": 300.0, "timestep_fs": 1.0, "steps": 1000, "seed": 1}
    if is_run:
        config = _run_config(source)
        sm = config.walker_list()[0].sampler
        defaults = {"temperature_K": sm.temperature_K, "timestep_fs": sm.timestep_fs, "steps": sm.steps,
                    "seed": config.seed + 1000}
    ts = TrajectorySettings(
        ensemble=args.ensemble,
        temperature_K=args.temperature if args.temperature is not None else defaults["temperature_K"],
        timestep_fs=args.timestep if args.timestep is not None else defaults["timestep_fs"],
        steps=args.steps if args.steps is not None else defaults["steps"],
        frames=args.frames,
        seed=args.seed if args.seed is not None else defaults["seed"])
    out = args.out or (source / "validation" if source.is_dir() else source.with_name(source.name + ".validation"))

    def progress(line: str) -> None:
        print(line, flush=True)

    validate(source, out, ts, oracle=args.oracle, oracle_settings=parse_settings(args.oracle_set),
             structure=args.structure, structure_index=args.index, frames_file=args.frames_file, progress=progress)
    return 0

