"""The learner-model interface (issue 16): what the model store, the servicer and the checkpoints
use of a model, and the two implementations behind it.

* ``exact``: :class:`learner_service.gp.GaussianProcess` -- the full GP of seed 004; an oracle
  call adds the force labels of the atoms the acquisition selected (each environment costs
  O(N²) memory), plus the energy/stress when asked.
* ``sparse``: :class:`learner_service.sparse_gp.SparseGaussianProcess` -- DTC with m inducing
  environments; an oracle call adds *every* force of the frame, its energy and stress as labels,
  and the selected atoms become inducing environments.

A saved model names its kind in its format tag (``epicycle-gp`` / ``epicycle-sgp`` in the .npz
header); :func:`load_model` dispatches on it.  The contract tests every implementation passes
are ``tests/learner/contract_model.py``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from protos.errors import InvalidInput, NotFound

__all__ = ["LearnerModel", "MODEL_KINDS", "SparseSettings", "create_model", "load_model", "model_file_kind",
           "FORMAT_KINDS", "model_format_version"]

#: model kinds, as ``learner.model`` and ``--model-kind`` name them
MODEL_KINDS = ("exact", "sparse")
#: saved-model format tag -> kind
FORMAT_KINDS = {"epicycle-gp": "exact", "epicycle-sgp": "sparse"}


@runtime_checkable
class LearnerModel(Protocol):
    """A Bayesian force field the learner serves.  Units: Å, eV, eV/Å, eV/Å³.

    Identity and size: ``kind`` (:data:`MODEL_KINDS`), ``format_name`` (its save-file tag),
    ``species``, ``cutoffs`` (:class:`learner_service.environment.Cutoffs`), ``n_labels``
    (training rows), ``n_environments`` (force-labelled environments), ``n_energy_labels``,
    ``version`` (bumped on every change), ``ready`` (False: the model predicts its prior).

    Service settings the store copies between models: ``predict_threads``,
    ``kernel_cache_max_rows`` (the exact GP's; the sparse model ignores it).
    """

    kind: str
    format_name: str
    species: Sequence[int]
    predict_threads: int
    kernel_cache_max_rows: int

    # -- sizes and hyperparameters ---------------------------------------------------
    @property
    def n_labels(self) -> int: ...

    @property
    def n_environments(self) -> int: ...

    @property
    def n_energy_labels(self) -> int: ...

    @property
    def version(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def hyperparameters(self) -> dict: ...

    @property
    def hyperparameter_names(self) -> tuple[str, ...]: ...

    @property
    def noise(self) -> float: ...

    def set_hyperparameters(self, values: Mapping[str, float]) -> None: ...

    def settings(self) -> dict:
        """Constructor settings beyond species, cutoffs and hyperparameters (JSON-ready)."""

    # -- data ------------------------------------------------------------------------
    def add_frame(self, atoms, forces=None, selected: Iterable[int] = (), energy: float | None = None,
                  stress=None) -> int:
        """One labelled frame (an oracle call): ``forces`` (n, 3) of every atom, ``selected`` the
        atoms the acquisition chose, ``energy``/``stress`` if they are to be used.  What enters
        the model is the implementation's choice (module docstring).  Returns labels added."""

    def add_structure(self, atoms, forces=None, atom_indices=None, energy=None, stress=None) -> int: ...

    def training_environments(self):
        """Every stored training environment (an EnvironmentBatch), for diagnostics."""

    # -- prediction ------------------------------------------------------------------
    def predict(self, atoms, stress: bool = False, condition_on: Sequence[tuple] = ()):
        """A :class:`learner_service.gp.Prediction`: forces, per-component σ, per-atom 3×3
        force covariance and ``atom_std``, local and total energy, stress; σ conditioned on
        ``condition_on`` force labels as if added."""

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Local-energy kernel distances, eV: ``d_train`` (m,) to the model's representers (empty
        with ``train=False``), and ``d_within`` (r, m) from the atoms ``rows`` (None: all m) to the m."""

    # -- likelihood and hyperparameters ----------------------------------------------
    def log_likelihood(self, gradient: bool = False, hyperparameters: Mapping[str, float] | None = None): ...

    def optimize(self, max_iterations: int = 200, fix: Iterable[str] = (),
                 bounds: Mapping[str, tuple[float, float]] | None = None, gtol: float = 1e-4, ftol: float = 1e-10,
                 progress=None, space: str = "log"):
        """Maximise the log marginal likelihood; an :class:`learner_service.gp.OptimizationResult`."""

    def train(self, optimize: bool = False, max_iterations: int = 200): ...

    # -- copies, checkpoints, files --------------------------------------------------
    def clone(self) -> "LearnerModel":
        """A copy for a writer (arrays shared, never modified in place)."""

    def data_counts(self) -> dict:
        """Sizes naming a prefix of the data (checked by a checkpoint rebuild)."""

    @property
    def factor_history(self) -> dict:
        """JSON-ready record of how the factor was built (replayed by :meth:`rebuild_factor`)."""

    def rebuild_factor(self, hyperparameters: Mapping[str, float], history: Mapping,
                       progress: Callable[[str], None] | None = None) -> None:
        """After re-adding the same data: set hyperparameters and rebuild the factor bit for bit."""

    def truncated(self, counts: Mapping[str, int], hyperparameters: Mapping[str, float], history: Mapping):
        """This model cut back to a prefix of its data, cheaply, or ModelError."""

    def set_version(self, version: int) -> None: ...

    def save(self, path) -> Path: ...


@dataclass(frozen=True)
class SparseSettings:
    """Settings of a new sparse model (``learner.sparse:`` in a run config).

    ``max_inducing``: at most this many inducing environments in total (None: no cap);
    ``inducing_rule``: ``acquisition`` (the atoms the acquisition selected at each oracle call
    become inducing environments) or ``variance`` (the model's own pick among all atoms of the
    frame: largest residual variance of the local energy, ``per_call`` at most, while above
    ``tolerance`` × its prior variance); ``functionals``: ``energy_force`` (the local energy and the
    three force components of each inducing environment: the DTC force σ then gates MD like the
    exact GP's) or ``energy`` (one inducing variable per environment, FLARE 1.x; its force σ keeps
    a large prior part); ``jitter``: relative jitter of K_UU."""

    max_inducing: int | None = None
    inducing_rule: str = "acquisition"
    per_call: int = 4
    tolerance: float = 1e-6
    functionals: str = "energy_force"
    jitter: float = 1e-8

    def kwargs(self) -> dict:
        return {"max_inducing": self.max_inducing, "inducing_rule": self.inducing_rule,
                "inducing_per_structure": self.per_call, "inducing_tolerance": self.tolerance,
                "inducing_functionals": self.functionals, "jitter": self.jitter}


def create_model(kind: str, species: Sequence[int], cutoffs: Sequence[float],
                 hyperparameters: Mapping[str, float] | None = None, energy_noise: float | None = None,
                 stress_noise: float | None = None, pair_cutoffs: Mapping | None = None,
                 sparse: SparseSettings | None = None, settings: Mapping | None = None) -> LearnerModel:
    """A new empty model of ``kind`` (:data:`MODEL_KINDS`).  ``sparse``: settings of a sparse
    model; ``settings``: a model's own :meth:`LearnerModel.settings` (as a checkpoint records
    them), which take precedence."""
    if kind == "exact":
        from learner_service.gp import GaussianProcess

        return GaussianProcess(species, cutoffs, hyperparameters=hyperparameters, energy_noise=energy_noise,
                               stress_noise=stress_noise, pair_cutoffs=pair_cutoffs)
    if kind == "sparse":
        from learner_service.sparse_gp import SparseGaussianProcess

        kwargs = (sparse or SparseSettings()).kwargs()
        kwargs.update(settings or {})
        return SparseGaussianProcess(species, cutoffs, hyperparameters=hyperparameters, energy_noise=energy_noise,
                                     stress_noise=stress_noise, pair_cutoffs=pair_cutoffs, **kwargs)
    raise InvalidInput(f"unknown learner model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")


def model_format_version(model) -> int:
    """The file format version ``model.save`` writes."""
    if model.kind == "sparse":
        from learner_service.sparse_gp import FORMAT_VERSION
    else:
        from learner_service.gp import FORMAT_VERSION
    return FORMAT_VERSION


def model_file_kind(path) -> str:
    """The kind of the model saved at ``path`` (read from its format tag), or :class:`InvalidInput`
    naming what the file is; a model directory (checkpoints) holds an exact or sparse model, read
    from its latest manifest."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"model file {path} does not exist")
    if path.is_dir():
        from learner_service.checkpoints import ModelDirectory

        md = ModelDirectory(path)
        latest = md.latest_id()
        if latest is None:
            raise InvalidInput(f"{path} is a directory without learner checkpoints")
        return str(md.read_manifest(latest).get("model", {}).get("kind", "exact"))
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path} is not an Epicycle model file (an .npz with a JSON header): {exc}") from None
    tag = meta.get("format")
    if tag not in FORMAT_KINDS:
        raise InvalidInput(f"{path} has model format {tag!r}; this Epicycle reads {', '.join(FORMAT_KINDS)}")
    return FORMAT_KINDS[tag]


def load_model(path, progress: Callable[[str], None] | None = None) -> LearnerModel:
    """The model saved at ``path``, of the kind its format tag names (a model directory: its
    latest checkpoint, rebuilt)."""
    if Path(path).is_dir():
        from learner_service.checkpoints import ModelDirectory

        return ModelDirectory(path).load(progress=progress)
    kind = model_file_kind(path)
    if kind == "sparse":
        from learner_service.sparse_gp import SparseGaussianProcess

        return SparseGaussianProcess.load(path, progress=progress)
    from learner_service.gp import GaussianProcess

    return GaussianProcess.load(path, progress=progress)
