"""Gaussian-process force field (seed 004, Eqs. 5–7) over the 2+3-body kernels.

Conventions follow the classic GP of FLARE 0.2.4 (``flare/gp.py``,
``flare/gp_algebra.py``): hyperparameters ``(sig2, ls2, sig3, ls3, noise)``; the
covariance ``K_y = K + sigma_n^2 I``; forces ``f = k^T alpha`` with
``alpha = K_y^-1 y`` and epistemic variance ``k(x, x) - k^T K_y^-1 k`` (noise
*excluded*; the total predictive variance adds ``sigma_n^2``); ``std = sqrt(|var|)``;
log marginal likelihood ``-1/2 y^T alpha - sum log diag L - n/2 log 2 pi``.

Labels are force components of single environments, and optionally total energies
(eV) and stresses (eV/Å^3, ASE Voigt order and sign) of whole structures.  Each label
type has its own noise: ``noise`` (eV/Å, optimised as in FLARE), ``energy_noise``
(eV, default 0.01 as FLARE's) and ``stress_noise`` (eV/Å^3, default 0.001); the last
two are hyperparameters only when such labels are present.  Energies are modelled relative
to a per-species reference, the prior mean of the local energy (:attr:`Hyperparameters.energy_reference`,
fitted to the energy labels by least squares; FLARE 0.2.4's GP has a zero mean, which is
the same when no energy is a label).

Work is kept: adding data computes only the new columns of the covariance and extends
the Cholesky factor by blocks; changing only signal variances or noises rescales the
stored unit-variance kernel matrices; changing length scales recomputes them.  The
unit-variance 2- and 3-body matrices are kept only up to ``kernel_cache_max_rows`` rows
(default 8192 = 2730 force environments); a larger model keeps just its factor, and a
hyperparameter change or a likelihood gradient then recomputes the kernel (expensive, by
design: at that size hyperparameters are frozen).
:meth:`GaussianProcess.predict` does not change the model (it may fill caches keyed
by the model version).  :meth:`GaussianProcess.clone` is the cheap copy a writer works on:
numpy arrays are shared and never modified in place.  The history of the factor
(:attr:`GaussianProcess.factor_history`) lets a checkpoint rebuild it bit for bit
(:mod:`learner_service.checkpoints`).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import math
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy.linalg import LinAlgError, cho_solve, cholesky, solve_triangular
from scipy.optimize import minimize

from protos.errors import InvalidInput, ModelError, NotFound

from .defaults import DEFAULT_HYPERPARAMETERS, HYPERPARAMETER_UNITS
from .environment import Cutoffs, EnvironmentBatch, build_environments
from .kernels import (N_FUNCTIONALS, LabelGroups, force_kernel_blocks, forward_substitution, kernel_blocks,
                      prediction_blocks)

__all__ = ["GaussianProcess", "Prediction", "OptimizationResult", "LabelledFrame", "FORMAT_VERSION",
           "BASE_HYPERPARAMETERS"]

FORMAT_VERSION = 1
BASE_HYPERPARAMETERS = ("sig2", "ls2", "sig3", "ls3", "noise")
# the one default start, shared with `epicycle run` (learner_service/defaults.py)
DEFAULT_ENERGY_NOISE = 0.01  # eV, FLARE 0.2.4 default
DEFAULT_STRESS_NOISE = 0.001  # eV/Å^3 (0.16 GPa)
# optimisation boxes (units as HYPERPARAMETER_UNITS).  The force noise stops at 1e-3 eV/Å as
# in FLARE 0.2.4 (gp.train(): bounds[-1, 0] = 1e-3): reference forces are not more precise
# than ~1 meV/Å (DFT convergence), and on noise-free labels (EMT, LJ) the likelihood would
# otherwise drive σn towards 0 and K_y towards singular.
DEFAULT_BOUNDS = {
    "sig2": (1e-6, 1e4),
    "ls2": (1e-2, 1e2),
    "sig3": (1e-6, 1e4),
    "ls3": (1e-2, 1e2),
    "noise": (1e-3, 1e2),
    "energy_noise": (1e-5, 1e3),
    "stress_noise": (1e-7, 1e1),
}
# rows of the covariance up to which the unit-variance 2- and 3-body kernel matrices are kept
# (2 x 8 bytes x rows²: 1.07 GB at 8192 rows = 2730 force environments).  Above it a model
# keeps only its Cholesky factor: adding data needs just the new columns, but a change of
# hyperparameters recomputes the kernel (minutes at 5,000 environments).
DEFAULT_KERNEL_CACHE_MAX_ROWS = 8192
# a hyperparameter within this relative distance of an edge of its box is reported "at a bound"
BOUND_RTOL = 1e-6

_FORCE, _ENERGY, _STRESS = 0, 1, 2
# k^T K^-1 k by a single-threaded forward substitution below this many multiply-adds (x2):
# scipy's solve wakes the OpenBLAS thread pool, which then spins on the core the sampler needs
_SMALL_SOLVE = 4e7
_CHOLESKY_HINT = (
    "the covariance matrix is not positive definite; increase the noise σn (or the energy/stress "
    "noise), or remove duplicate environments from the training set"
)


@dataclass(frozen=True)
class Prediction:
    """Posterior mean and epistemic uncertainty for one structure.

    ``forces`` (n, 3) eV/Å; ``force_std`` (n, 3) eV/Å epistemic σ of each component
    (noise excluded; total σ = sqrt(force_std² + noise²)); ``force_var`` (n, 3) the raw
    epistemic variance (eV²/Å², may be ~-1e-16 from round-off); ``energy`` eV;
    ``local_energies`` (n,) eV; ``stress`` (6,) eV/Å^3 ASE Voigt or None; ``noise``
    σn in eV/Å.

    ``force_cov`` (n, 3, 3) eV²/Å² is each atom's epistemic posterior covariance of its
    force vector (seed 004 Eq. 5 for the three components of one atom together; its diagonal
    is ``force_var``); ``atom_std`` (n,) eV/Å = sqrt(largest eigenvalue of ``force_cov``,
    clipped at 0): the σ of the atom's force along its most uncertain direction.  It does not
    change when the structure is rotated (``force_cov`` -> R C R^T), unlike a component σ,
    and max component σ <= ``atom_std`` <= sqrt(trace).  Rows of atoms not predicted are 0.
    """

    forces: np.ndarray
    force_std: np.ndarray
    force_var: np.ndarray
    energy: float
    local_energies: np.ndarray
    stress: np.ndarray | None
    noise: float
    model_version: int = 0
    force_cov: np.ndarray | None = None
    atom_std: np.ndarray | None = None


@dataclass(frozen=True)
class OptimizationResult:
    """Outcome of :meth:`GaussianProcess.optimize` (hyperparameters are those of the model afterwards).

    ``at_bounds`` names the optimised hyperparameters that ended on (within a relative
    ``BOUND_RTOL`` of) an edge of their box, as ``{name: "lower" | "upper"}``.  Converged at a
    bound is still converged (the projected gradient vanishes), but the box, not the data
    alone, set that value (``gradient`` shows whether the likelihood still rises outward).
    ``bounds`` holds the box of every optimised hyperparameter.
    """

    converged: bool
    iterations: int
    evaluations: int
    message: str
    log_likelihood: float
    gradient: dict
    hyperparameters: dict
    max_iterations: int
    seconds: float
    at_bounds: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    # issue 13 (added; the fields above keep their meaning).  ``warnings``: one line per
    # problem a user must see -- an iteration cap or an abnormal line-search stop, with the
    # reason and the gradient norm.  ``gradient_norm``: |d objective / d log θ| over the
    # optimised hyperparameters not on a bound.  ``objective``: "ml" (log marginal likelihood)
    # or "map" (plus ``log_prior``, the log density of the prior over log θ).  The MAP search
    # (:func:`learner_service.model_selection.map_optimize`) also fills ``restarts`` (the
    # screened starting points), ``validation`` (held-out metrics), ``selected`` (which candidate
    # the selection rule kept), ``cpu_seconds`` (process time), ``kernel_builds`` (and their
    # ``kernel_cpu_seconds``) and ``inner_evaluations``.
    warnings: tuple = ()
    gradient_norm: float = math.nan
    objective: str = "ml"
    log_prior: float = 0.0
    restarts: tuple = ()
    validation: dict = field(default_factory=dict)
    selected: str = ""
    cpu_seconds: float = math.nan
    kernel_builds: int = 0
    inner_evaluations: int = 0
    kernel_cpu_seconds: float = math.nan
    inner_by_phase: dict = field(default_factory=dict)  # {phase: (evaluations, CPU s)} of the inner search

    def bound_note(self) -> str:
        """``"sig3 at its lower bound 1e-06 eV, ..."`` for :attr:`at_bounds`, or ``""``."""
        return _bound_note(self.at_bounds, self.bounds)

    def __str__(self) -> str:
        hyps = ", ".join(f"{k}={v:.6g} {HYPERPARAMETER_UNITS.get(k, '')}" for k, v in self.hyperparameters.items())
        state = "converged" if self.converged else "NOT converged"
        if self.at_bounds:
            state += f" AT A BOUND ({', '.join(self.at_bounds)})"
        return (f"{state} after {self.iterations} iterations ({self.evaluations} evaluations, "
                f"{self.seconds:.1f} s): {self.message}; log likelihood {self.log_likelihood:.6f}; {hyps}")


def _bound_note(at_bounds: Mapping[str, str], bounds: Mapping[str, tuple[float, float]]) -> str:
    parts = []
    for name, side in at_bounds.items():
        value = bounds[name][0 if side == "lower" else 1]
        parts.append(f"{name} at its {side} bound {value:.6g} {HYPERPARAMETER_UNITS.get(name, '')}".rstrip())
    return ", ".join(parts)


@dataclass
class _Group:
    kind: str  # "force" or "structure"
    envs: np.ndarray  # environment indices into the training batch
    rows: np.ndarray  # (10,) output row per functional, -1 unused
    scale: np.ndarray  # (10,)


@dataclass(frozen=True)
class LabelledFrame:
    """One structure's data as :meth:`GaussianProcess.add_structure` received it (Å, eV, eV/Å,
    eV/Å³): the structure (``numbers``, ``positions``, ``cell``, ``pbc``), its ``forces`` (n, 3) or
    None, ``atom_indices`` the atoms whose force labels were trained on, ``energy``, ``stress`` (6,)
    or None; ``groups``: the model's label-group count after it was added.  O(n_atoms) numbers."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    forces: np.ndarray | None
    atom_indices: np.ndarray
    energy: float | None
    stress: np.ndarray | None
    groups_before: int
    groups: int

    def atoms(self):
        """The structure as an ``ase.Atoms``."""
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


@dataclass
class _State:
    """Cached linear algebra for one set of hyperparameters and training rows."""

    key: tuple
    n: int
    L: np.ndarray  # C order; never modified in place (shared by clones)
    alpha: np.ndarray
    log: tuple = ()  # how L was built: see GaussianProcess.factor_history


_BLAS_SETTERS: list | None = None
_BLAS_LOCK = threading.Lock()


def _openblas_local_setters() -> list:
    """``openblas_set_num_threads_local`` of every OpenBLAS loaded in this process (numpy's
    and scipy's wheels each bundle one); empty where there is none or it is older than 0.3.27
    (then :func:`serial_blas` does nothing)."""
    global _BLAS_SETTERS
    with _BLAS_LOCK:
        if _BLAS_SETTERS is None:
            setters = []
            try:
                with open("/proc/self/maps") as fh:
                    paths = sorted({f for f in (line.split()[-1] for line in fh)
                                    if "openblas" in os.path.basename(f).lower() and ".so" in f})
            except OSError:
                paths = []
            for path in paths:
                try:
                    fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
                except OSError:
                    fn = None
                if fn is not None:
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_int]
                    setters.append(fn)
            _BLAS_SETTERS = setters
        return _BLAS_SETTERS


def serial_blas(method):
    """Run ``method`` with OpenBLAS single-threaded in the calling thread (restored after).

    The GP's matrices are small (3 rows per environment: 300 at 100 environments), and
    OpenBLAS's threaded Cholesky/triangular solves synchronise their threads many times per
    call; on a machine whose cores are busy with other jobs every synchronisation can wait
    for a time slice.  Measured on the shared 2-core machine (load ~2): Cholesky of the
    300x300 K_y took 484 ms median threaded vs 0.4 ms single-threaded, which made the
    100-environment covariance build slower than the kernel itself.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        setters = _openblas_local_setters()
        previous = [fn(1) for fn in setters]
        try:
            return method(*args, **kwargs)
        finally:
            for fn, n in zip(setters, previous):
                fn(n)

    return wrapper


def _alpha_of(L: np.ndarray, y: np.ndarray) -> np.ndarray:
    """alpha = K_y^-1 y from the C-ordered Cholesky factor by two triangular solves, which
    scipy hands to LAPACK as the transposed (Fortran-ordered) view; ``cho_solve`` (potrs)
    would first copy L into Fortran order: 1.8 GB more at 15,000 rows."""
    z = solve_triangular(L, y, lower=True, check_finite=False)
    return solve_triangular(L, z, lower=True, trans="T", check_finite=False)


def block_gram(V: np.ndarray, m: int, diagonal: np.ndarray | None = None) -> np.ndarray:
    """(m, 3, 3) Gram blocks V_i^T V_i of the three columns of each environment i of ``V``
    (n_rows, 3 m) -- the variance that the data explain, atom by atom.  ``diagonal`` (m, 3),
    when given, is the column sums of squares already computed (taken as the diagonal, so
    the per-component variances stay bit-for-bit those of the diagonal-only code)."""
    V3 = V.reshape(V.shape[0], m, 3)
    G = np.empty((m, 3, 3))
    for a in range(3):  # six column-pair products (a 3×3 einsum in one call is ~6x slower)
        for b in range(a, 3):
            if a == b and diagonal is not None:
                G[:, a, a] = diagonal[:, a]
            else:
                G[:, a, b] = G[:, b, a] = np.einsum("ki,ki->i", V3[:, :, a], V3[:, :, b])
    return G


def atom_std_of(cov: np.ndarray) -> np.ndarray:
    """(n,) eV/Å: sqrt of the largest eigenvalue of each symmetric 3×3 block of ``cov``
    (n, 3, 3) eV²/Å², clipped at 0 (round-off can make a vanishing variance ~ -1e-16)."""
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape[0] == 0:
        return np.zeros(0)
    sym = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    return np.sqrt(np.clip(np.linalg.eigvalsh(sym)[:, -1], 0.0, None))


def default_predict_threads() -> int:
    """Two threads on a machine with two or more CPUs (measured: no extra CPU time), else one."""
    return min(2, os.cpu_count() or 1)


def checked_labels(atoms, forces, atom_indices, energy, stress):
    """Validate the labels of one structure for ``add_structure`` (exact and sparse GP): returns
    ``(forces (n, 3) or None, idx, energy or None, stress (6,) or None)`` with ``idx`` the atoms
    whose force labels are used (default all; none without forces) and a (3, 3) stress turned into
    ASE Voigt order.  Raises :class:`InvalidInput` naming what is wrong."""
    n = len(atoms)
    if forces is None and energy is None and stress is None:
        raise InvalidInput("add_structure needs forces, an energy or a stress")
    if n == 0:
        raise InvalidInput("the structure has no atoms")
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise InvalidInput(f"forces must have shape ({n}, 3) for {n} atoms, got {forces.shape}")
        idx = np.arange(n) if atom_indices is None else np.asarray(list(atom_indices), dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise InvalidInput(f"atom indices {idx.tolist()} out of range for {n} atoms")
        if len(set(idx.tolist())) != len(idx):
            raise InvalidInput("atom indices contain duplicates")
        if not np.isfinite(forces[idx]).all():
            raise InvalidInput("forces contain NaN or infinite values")
    else:
        idx = np.zeros(0, np.int64)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (3, 3):
            stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        if stress.shape != (6,) or not np.isfinite(stress).all():
            raise InvalidInput("stress must be 6 finite numbers (xx yy zz yz xz xy, eV/Å^3) or a 3x3 matrix")
        if not np.all(atoms.get_pbc()):
            raise InvalidInput("a stress label needs a fully periodic cell")
        if abs(np.linalg.det(atoms.get_cell().array)) < 1e-12:
            raise InvalidInput("a stress label needs a cell with non-zero volume")
    if energy is not None:
        energy = float(energy)
        if not math.isfinite(energy):
            raise InvalidInput("energy is not finite")
    return forces, idx, energy, stress


class Hyperparameters:
    """The hyperparameter bookkeeping both learner models share (the exact GP here and the sparse GP in
    learner_service/sparse_gp.py): ``_hyps`` the values, ``_kinds`` the label kind of every training row
    (which decides whether energy/stress noises exist), ``_version`` bumped on every change; and the
    prior mean both put on the local energy (:attr:`energy_reference`)."""

    _hyps: dict
    _kinds: list
    _version: int

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        """Names of the hyperparameters the likelihood depends on, in gradient order."""
        names = list(BASE_HYPERPARAMETERS)
        kinds = set(self._kinds)
        if _ENERGY in kinds:
            names.append("energy_noise")
        if _STRESS in kinds:
            names.append("stress_noise")
        return tuple(names)

    @property
    def hyperparameters(self) -> dict:
        return {k: float(v) for k, v in self._hyps.items()}

    @hyperparameters.setter
    def hyperparameters(self, values: Mapping[str, float]) -> None:
        self.set_hyperparameters(values)

    def set_hyperparameters(self, values: Mapping[str, float]) -> None:
        """Set some or all hyperparameters (no refactorisation until needed)."""
        self._set_hyps(values)
        self._version += 1

    def _set_hyps(self, values: Mapping[str, float]) -> None:
        for k, v in dict(values).items():
            if k not in self._hyps:
                raise InvalidInput(f"unknown hyperparameter {k!r}; known: {sorted(self._hyps)}")
            v = float(v)
            if not math.isfinite(v) or v <= 0:
                raise InvalidInput(f"hyperparameter {k} must be positive and finite, got {v}")
            self._hyps[k] = v

    @property
    def noise(self) -> float:
        return float(self._hyps["noise"])

    # -- the energy reference: the prior mean of the local energies ---------------------
    #
    # A total energy from DFT carries each species' reference (QE with PBE pseudopotentials: about
    # -57 eV per Al atom), which a zero-mean kernel of prior scale sig2 ~ 1 eV cannot fit without
    # wrecking the forces.  Both models therefore use a prior mean for the local energy of an atom of
    # species s, mu_s (eV/atom): the least-squares fit of the energy labels by their compositions,
    # E_k ~ sum_s n_ks mu_s (minimum-norm when the compositions do not determine every mu_s, e.g. one
    # composition throughout: then only the per-frame sum is fixed, which is all that frame's
    # composition needs).  The GP models E - sum n mu; forces and stresses are unaffected (a constant
    # per atom has no position or strain derivative); predicted local energies are mu_s + GP.
    # Deterministic in the data, so a rebuilt model has the same mu.  No energy labels: mu = 0.

    def _energy_design(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, counts, mu)``: the training row of every energy label, its structure's atom count
        per species, (k,) and (k, n_species), and the reference mu (n_species,); computed once per
        data size (data only grow), so a prediction only reads it."""
        key = (len(self._labels), len(self._groups))
        cached = getattr(self, "_energy_design_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        n_species = len(self.species)
        rows, counts = [], []
        species = None
        for g in self._groups:
            if g.kind == "structure" and g.rows[0] >= 0:
                if species is None:
                    species = self._training_batch().center_species
                rows.append(int(g.rows[0]))
                counts.append(np.bincount(species[g.envs], minlength=n_species))
        rows = np.asarray(rows, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.float64).reshape(-1, n_species)
        mu = np.zeros(n_species)
        if len(rows):
            energies = np.array([self._labels[r] for r in rows], dtype=np.float64)
            mu = np.linalg.lstsq(counts, energies, rcond=None)[0]
        self._energy_design_cache = (key, (rows, counts, mu))
        return rows, counts, mu

    @property
    def energy_reference(self) -> np.ndarray:
        """The prior mean of the local energy per species, mu_s (n_species,) eV/atom, in the
        order of :attr:`species` (zeros without energy labels); see the comment above."""
        return self._energy_design()[2].copy()

    def _targets(self) -> np.ndarray:
        """The labels the GP models: the energy labels less sum_s n_s mu_s, the rest as given."""
        y = np.array(self.labels, dtype=np.float64)
        rows, counts, mu = self._energy_design()
        if len(rows):
            y[rows] -= counts @ mu
        return y

    def _reference_of(self, center_species: np.ndarray) -> np.ndarray:
        """mu of each environment's species (eV), added to its predicted local energy."""
        return self._energy_design()[2][np.asarray(center_species, dtype=np.int64)]


class GaussianProcess(Hyperparameters):
    """2+3-body GP force field.

    ``species``: atomic numbers the model knows; ``cutoffs = (r2, r3)`` in Å;
    ``pair_cutoffs`` optionally overrides single species pairs, e.g.
    ``{"threebody": {(13, 29): 3.5}}``; ``hyperparameters``: dict with any of
    ``sig2, ls2, sig3, ls3, noise`` (and ``energy_noise``, ``stress_noise``).
    """

    def __init__(
        self,
        species: Sequence[int],
        cutoffs: Sequence[float],
        hyperparameters: Mapping[str, float] | None = None,
        energy_noise: float | None = None,
        stress_noise: float | None = None,
        pair_cutoffs: Mapping | None = None,
        kernel_cache_max_rows: int | None = None,
    ) -> None:
        self.cutoffs = Cutoffs.create(species, cutoffs, pair_cutoffs)
        self.species = self.cutoffs.species
        self._hyps = dict(DEFAULT_HYPERPARAMETERS)
        self._hyps["energy_noise"] = DEFAULT_ENERGY_NOISE if energy_noise is None else float(energy_noise)
        self._hyps["stress_noise"] = DEFAULT_STRESS_NOISE if stress_noise is None else float(stress_noise)
        if hyperparameters:
            self._set_hyps(hyperparameters)
        self._batch = EnvironmentBatch.empty()
        self._batch_parts: list[EnvironmentBatch] = []
        self._n_env_total = 0
        self._groups: list[_Group] = []
        #: the frames add_structure received, in order (not saved in model files: see labelled_frames)
        self._frames: list[LabelledFrame] = []
        self._labels: list[float] = []
        self._kinds: list[int] = []
        self._n_force_envs = 0
        self._version = 0
        # unit-variance kernel matrices for the first _k_rows rows at length scales _k_ls, built
        # as the segments _k_segments ((row_end, kind), ...; empty: no cache)
        self._K2 = np.zeros((0, 0))
        self._K3 = np.zeros((0, 0))
        self._k_rows = 0
        self._k_ls: tuple | None = None
        self._k_segments: tuple = ()
        #: keep K2/K3 only up to this many rows (see DEFAULT_KERNEL_CACHE_MAX_ROWS)
        self.kernel_cache_max_rows = (DEFAULT_KERNEL_CACHE_MAX_ROWS if kernel_cache_max_rows is None
                                      else int(kernel_cache_max_rows))
        self._state: _State | None = None
        self._grad_cache: tuple | None = None  # (ls2, ls3, n, dK2, dK3)
        # threads for the kernel part of predict() (test atoms handed out in small chunks;
        # results are bitwise identical for any number).  Default 2 if there are 2 CPUs: the
        # MD step waits for the prediction, and on a busy machine a second thread costs no
        # extra CPU time.  The owner sets it (LearnerServiceConfig.predict_threads); it is
        # never read from the environment.
        self.predict_threads = default_predict_threads()

    # hyperparameters: the Hyperparameters mixin above

    # ------------------------------------------------------------------
    # training data
    # ------------------------------------------------------------------

    @property
    def n_environments(self) -> int:
        """Number of training environments with force labels."""
        return self._n_force_envs

    @property
    def n_labels(self) -> int:
        return len(self._labels)

    @property
    def n_energy_labels(self) -> int:
        """Number of total-energy labels in the training set (0: a forces-only model, whose
        energies are defined only up to a constant)."""
        return sum(1 for k in self._kinds if k == _ENERGY)

    @property
    def version(self) -> int:
        """Increases whenever data or hyperparameters change."""
        return self._version

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._labels, dtype=np.float64)

    def _training_batch(self) -> EnvironmentBatch:
        if len(self._batch) != self._n_env_total:
            self._batch = EnvironmentBatch.concatenate([self._batch] + self._batch_parts)
            self._batch_parts = []
        return self._batch

    def _label_groups(self, groups: Sequence[_Group]) -> LabelGroups:
        if not groups:
            return LabelGroups(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, N_FUNCTIONALS), np.int64),
                               np.zeros((0, N_FUNCTIONALS)))
        ptr = np.concatenate([[0], np.cumsum([len(g.envs) for g in groups])])
        return LabelGroups(ptr, np.concatenate([g.envs for g in groups]), np.stack([g.rows for g in groups]),
                           np.stack([g.scale for g in groups]))

    def add_structure(
        self,
        atoms,
        forces=None,
        atom_indices: Iterable[int] | None = None,
        energy: float | None = None,
        stress=None,
    ) -> int:
        """Add labelled data from one structure (an ``ase.Atoms``).

        ``forces`` (n, 3) eV/Å with ``atom_indices`` the atoms whose environments
        (and force labels) are added (default: all); ``energy`` total energy in eV;
        ``stress`` (6,) ASE Voigt or (3, 3), eV/Å^3, ASE sign.  Returns the number of
        labels added.
        """
        numbers = atoms.get_atomic_numbers()
        positions = atoms.get_positions()
        cell = atoms.get_cell().array
        pbc = atoms.get_pbc()
        forces, idx, energy, stress = checked_labels(atoms, forces, atom_indices, energy, stress)
        new_groups: list[_Group] = []
        new_labels: list[float] = []
        new_kinds: list[int] = []
        row = len(self._labels)
        env_base = self._n_env_total
        parts: list[EnvironmentBatch] = []
        need_all = energy is not None or stress is not None

        if need_all:
            all_envs = build_environments(positions, numbers, cell, pbc, self.cutoffs)
            force_envs = all_envs.subset(idx) if len(idx) else EnvironmentBatch.empty()
        else:
            all_envs = None
            force_envs = build_environments(positions, numbers, cell, pbc, self.cutoffs, idx)

        for k, i in enumerate(idx):
            rows = np.full(N_FUNCTIONALS, -1, np.int64)
            rows[1:4] = row + np.arange(3)
            row += 3
            new_groups.append(_Group("force", np.array([env_base + k]), rows, np.ones(N_FUNCTIONALS)))
            new_labels.extend(forces[i].tolist())
            new_kinds.extend([_FORCE] * 3)
        parts.append(force_envs)
        n_new_envs = len(force_envs)

        if need_all:
            rows = np.full(N_FUNCTIONALS, -1, np.int64)
            scale = np.ones(N_FUNCTIONALS)
            if energy is not None:
                rows[0] = row
                row += 1
                new_labels.append(energy)
                new_kinds.append(_ENERGY)
            if stress is not None:
                volume = abs(np.linalg.det(cell))  # > 0: checked_labels
                rows[4:10] = row + np.arange(6)
                row += 6
                scale[4:10] = -1.0 / volume
                new_labels.extend(stress.tolist())
                new_kinds.extend([_STRESS] * 6)
            envs = env_base + n_new_envs + np.arange(len(all_envs))
            new_groups.append(_Group("structure", envs, rows, scale))
            parts.append(all_envs)
            n_new_envs += len(all_envs)

        # commit
        self._batch_parts.extend(p for p in parts if len(p))
        self._n_env_total += n_new_envs
        self._groups.extend(new_groups)
        self._labels.extend(new_labels)
        self._kinds.extend(new_kinds)
        self._n_force_envs += len(idx)
        self._frames.append(LabelledFrame(
            np.array(numbers), np.array(positions), np.array(cell), np.array(pbc),
            None if forces is None else np.array(forces), np.array(idx), energy,
            None if stress is None else np.array(stress), len(self._groups) - len(new_groups), len(self._groups)))
        self._grad_cache = None  # its matrices no longer match the data
        self._version += 1
        return len(new_labels)

    def labelled_frames(self) -> tuple[LabelledFrame, ...] | None:
        """Every frame of the training data as it was added (in order), or None if some data did not
        come through :meth:`add_structure` in this process's lineage of the model -- a model loaded from a
        file (:meth:`save` keeps environments, not structures).  A model rebuilt from a learner's model
        directory re-adds its frames, so it has them."""
        frames = self._frames
        if not self._groups:
            return ()
        if not frames or frames[0].groups_before != 0 or frames[-1].groups != len(self._groups):
            return None
        return tuple(frames)

    def empty_copy(self) -> "GaussianProcess":
        """A model with this one's species, cutoffs, hyperparameters and settings, and no data."""
        new = GaussianProcess(self.species, (self.cutoffs.r2, self.cutoffs.r3), hyperparameters=self._hyps,
                              pair_cutoffs=Cutoffs.parse_pair_dict(self.cutoffs.pair_dict()),
                              kernel_cache_max_rows=self.kernel_cache_max_rows)
        new.predict_threads = self.predict_threads
        return new

    # ------------------------------------------------------------------
    # covariance and factorisation
    # ------------------------------------------------------------------
    #
    # Bit-for-bit reproducibility.  The kernels are not bitwise symmetric (k(a, b) and k(b, a)
    # differ in the last bits), the 3-body value of the gradient kernel differs from the plain
    # one in the last bits, and the fast pack depends on the batch's species mix.  So the
    # factor depends on how K was blocked.  Every block of K is therefore computed one way, as
    # a *segment*: the rows r0..r1 against every row < r1, older environments on the row side,
    # with the training batch as it was at r1 rows (:meth:`_segment_blocks`).  The model
    # records the segments of its kernel cache (``_k_segments``) and how its Cholesky factor
    # was built (``_State.log``: a full factorisation of K from given segments, then block
    # extensions); checkpoints persist both and :meth:`_replay_state` follows them.

    def _groups_below(self, rows: int) -> int:
        """Number of label groups whose rows all lie below ``rows`` (groups are in row order)."""
        lo, hi = 0, len(self._groups)
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self._groups[mid].rows.max()) < rows:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _prefix_batch(self, n_env: int) -> EnvironmentBatch:
        """The first ``n_env`` training environments (views; the whole batch if that is all)."""
        batch = self._training_batch()
        if n_env == len(batch):
            return batch
        bo, to = int(batch.bond_offsets[n_env]), int(batch.trip_offsets[n_env])
        arrays = {}
        for name, value in batch.arrays().items():
            if name in ("bond_offsets", "trip_offsets"):
                arrays[name] = value[:n_env + 1]
            elif name.startswith("bond_"):
                arrays[name] = value[:bo]
            elif name.startswith("trip_"):
                arrays[name] = value[:to]
            else:
                arrays[name] = value[:n_env]
        return EnvironmentBatch(**arrays)

    @staticmethod
    def _force_envs_of(groups: Sequence[_Group]) -> np.ndarray | None:
        """The environment of every label group if each is one environment's three force
        components at rows 3k, 3k+1, 3k+2 (forces-only training data), else None."""
        if not groups or any(g.kind != "force" for g in groups):
            return None
        rows = np.stack([g.rows for g in groups])
        if (rows[:, 1:4].ravel() != np.arange(3 * len(groups))).any() or (rows[:, [0, *range(4, 10)]] >= 0).any():
            return None
        return np.array([g.envs[0] for g in groups], dtype=np.int64)

    def _force_label_envs(self) -> np.ndarray | None:
        """:meth:`_force_envs_of` all training label groups."""
        return self._force_envs_of(self._groups)

    def _segment_blocks(self, r0: int, r1: int, ls: tuple, grad: bool = False):
        """Unit-variance kernel blocks of the training rows ``r0..r1`` (one *segment*).

        Returns ``(c2, c3, d2, d3)``: the cross block rows ``[0, r0)`` x ``[r0, r1)`` and the
        diagonal block ``[r0, r1)^2``, computed with the training data as they were at ``r1``
        rows (older environments always on the row side).  With ``grad`` (``r0 = 0`` only)
        through the gradient kernels, as the optimiser builds K: ``(K2, K3, dK2, dK3)``.
        Forces-only data go through :func:`force_kernel_blocks`, others through
        :func:`kernel_blocks` (the same numbers to round-off), as the data at ``r1`` rows allow.
        """
        g0, g1 = self._groups_below(r0), self._groups_below(r1)
        groups = self._groups[:g1]
        batch = self._prefix_batch(int(groups[-1].envs.max()) + 1)
        envs = self._force_envs_of(groups)
        ls2, ls3 = ls
        if grad:
            if r0:
                raise ValueError("a gradient-kernel segment must start at row 0")
            if envs is not None:
                return force_kernel_blocks(batch, len(self.species), envs, None, ls2, ls3, grad=True)
            return kernel_blocks(batch, self._label_groups(groups), None, ls2, ls3, grad=True)
        if envs is not None:
            S = len(self.species)
            d2, d3 = force_kernel_blocks(batch, S, envs[g0:], None, ls2, ls3)
            if r0:
                c2, c3 = force_kernel_blocks(batch, S, envs[:g0], envs[g0:], ls2, ls3)
            else:
                c2 = c3 = np.zeros((0, r1))
            return c2, c3, d2, d3
        new = []
        for g in groups[g0:]:  # the new groups with rows counted from r0 (where they are placed only)
            new.append(_Group(g.kind, g.envs, np.where(g.rows >= 0, g.rows - r0, -1), g.scale))
        gnew = self._label_groups(new)
        d2, d3 = kernel_blocks(batch, gnew, None, ls2, ls3)
        if r0:
            c2, c3 = kernel_blocks(batch, self._label_groups(groups[:g0]), gnew, ls2, ls3)
        else:
            c2 = c3 = np.zeros((0, r1))
        return c2, c3, d2, d3

    def _fill_segment(self, K2: np.ndarray, K3: np.ndarray, r0: int, r1: int, ls: tuple, kind: str) -> None:
        """Write segment ``r0..r1`` of kind ``"blocks"`` or ``"grad"`` into ``K2``/``K3`` (mirrored)."""
        if kind == "grad":
            K2[:r1, :r1], K3[:r1, :r1] = self._segment_blocks(0, r1, ls, grad=True)[:2]
            return
        if kind != "blocks":
            raise InvalidInput(f"unknown kernel segment kind {kind!r}")
        c2, c3, d2, d3 = self._segment_blocks(r0, r1, ls)
        K2[r0:r1, r0:r1] = d2
        K3[r0:r1, r0:r1] = d3
        if r0:
            K2[:r0, r0:r1], K3[:r0, r0:r1] = c2, c3
            K2[r0:r1, :r0], K3[r0:r1, :r0] = c2.T, c3.T

    def _drop_kernel_cache(self) -> None:
        self._K2 = np.zeros((0, 0))
        self._K3 = np.zeros((0, 0))
        self._k_rows = 0
        self._k_segments = ()

    def _kernel_matrices(self) -> tuple[np.ndarray, np.ndarray, tuple]:
        """``(K2, K3, segments)``: unit-variance kernels of all training rows at the current
        length scales, from the cache, by adding one segment to it, or from scratch (one
        segment).  Kept as the cache up to :attr:`kernel_cache_max_rows` rows."""
        ls = (self._hyps["ls2"], self._hyps["ls3"])
        n = len(self._labels)
        if self._k_ls != ls:
            self._drop_kernel_cache()
            self._k_ls = ls
        if self._k_rows == n and self._k_segments:
            return self._K2, self._K3, self._k_segments
        old = self._k_rows if self._k_segments else 0
        K2 = np.zeros((n, n))
        K3 = np.zeros((n, n))
        if old:
            K2[:old, :old] = self._K2
            K3[:old, :old] = self._K3
        self._fill_segment(K2, K3, old, n, ls, "blocks")
        segments = (self._k_segments if old else ()) + ((n, "blocks"),)
        if n <= self.kernel_cache_max_rows:
            self._K2, self._K3, self._k_rows, self._k_segments = K2, K3, n, segments
        else:
            self._drop_kernel_cache()
        return K2, K3, segments

    def _build_kernel(self, segments: Sequence, ls: tuple) -> tuple[np.ndarray, np.ndarray]:
        """K2, K3 assembled segment by segment as recorded (``(row_end, kind)``; kind
        ``"blocks"``, ``"grad"``, or ``"file"``: taken from a loaded model file's matrices)."""
        n = int(segments[-1][0])
        K2 = np.zeros((n, n))
        K3 = np.zeros((n, n))
        prev = 0
        for row_end, kind in segments:
            row_end = int(row_end)
            if kind == "file":
                if prev or self._k_rows < row_end or self._k_ls != ls:
                    raise ModelError(f"cannot rebuild the kernel: its first {row_end} rows came from a model file "
                                     f"whose matrices are not loaded")
                K2[:row_end, :row_end] = self._K2[:row_end, :row_end]
                K3[:row_end, :row_end] = self._K3[:row_end, :row_end]
            else:
                self._fill_segment(K2, K3, prev, row_end, ls, kind)
            prev = row_end
        return K2, K3

    def _noise_vector(self, hyps: Mapping[str, float] | None = None) -> np.ndarray:
        h = self._hyps if hyps is None else hyps
        var = np.array([h["noise"] ** 2, h["energy_noise"] ** 2, h["stress_noise"] ** 2])
        return var[np.asarray(self._kinds, dtype=np.int64)] if self._kinds else np.zeros(0)

    def _ky(self, hyps: Mapping[str, float] | None = None, K2=None, K3=None) -> np.ndarray:
        """K_y = sig2² K2 + sig3² K3 + noise (default: the cached K2/K3)."""
        h = self._hyps if hyps is None else hyps
        K2 = self._K2 if K2 is None else K2
        K3 = self._K3 if K3 is None else K3
        n = len(self._labels)
        K = h["sig2"] ** 2 * K2[:n, :n] + h["sig3"] ** 2 * K3[:n, :n]
        K[np.diag_indices(n)] += self._noise_vector(h)[:n]
        return K

    def _state_key(self) -> tuple:
        return tuple(self._hyps[k] for k in sorted(self._hyps))

    def train(self, optimize: bool = False, max_iterations: int = 200) -> "GaussianProcess":
        """(Re)factorise the covariance; cheap when nothing changed, incremental when
        only data were added.  With ``optimize`` the hyperparameters are optimised first
        (:meth:`optimize`)."""
        if optimize and self.n_labels:
            self.optimize(max_iterations=max_iterations)
        self._factorize()
        return self

    @serial_blas
    def _factorize(self) -> _State | None:
        """The Cholesky factor of K_y and alpha = K_y^-1 y for the current data and
        hyperparameters: kept if current, extended by blocks if only data were added (only the
        new columns of K_y are formed), else a full factorisation; the history is recorded in
        ``_State.log`` (see the section comment)."""
        n = len(self._labels)
        if n == 0:
            return None
        key = self._state_key()
        st = self._state
        if st is not None and st.key == key and st.n == n:
            return st
        if st is not None and st.key == key and st.n < n:
            L = self._extend_factor(st.L, st.n, n)
            log = st.log + ({"op": "extend", "rows": n},)
        else:
            K2, K3, segments = self._kernel_matrices()
            Ky = self._ky_fortran(K2, K3, self._hyps)
            del K2, K3  # freed here unless cached: the factorisation then needs 2 n² floats, not 4
            L = np.ascontiguousarray(self._cholesky(Ky, overwrite=True))
            del Ky
            log = ({"op": "full", "rows": n, "hyps": dict(self._hyps), "kernel": [[int(r), k] for r, k in segments]},)
        alpha = _alpha_of(L, self._targets())
        self._state = _State(key, n, L, alpha, log)
        return self._state

    def _ky_fortran(self, K2: np.ndarray, K3: np.ndarray, hyps: Mapping[str, float]) -> np.ndarray:
        """K_y in Fortran order, formed from the (bitwise symmetric) K^T views, so that LAPACK
        factorises it in place without a copy."""
        n = len(self._labels)
        Ky = hyps["sig2"] ** 2 * K2[:n, :n].T + hyps["sig3"] ** 2 * K3[:n, :n].T
        Ky[np.diag_indices(n)] += self._noise_vector(hyps)[:n]
        return Ky

    def _full_factor(self, K2: np.ndarray, K3: np.ndarray, hyps: Mapping[str, float]) -> np.ndarray:
        """Cholesky factor (C order) of K_y built from K2/K3, factorised in place."""
        return np.ascontiguousarray(self._cholesky(self._ky_fortran(K2, K3, hyps), overwrite=True))

    @serial_blas
    def _extend_factor(self, L_old: np.ndarray, m: int, n: int) -> np.ndarray:
        """[[L11, 0], [L21, L22]] from the factor ``L_old`` of the first ``m`` rows and only the
        new columns of K_y (the cross block m x (n-m) and the new diagonal block): L21 =
        (L11^-1 K12)^T, L22 = chol(K22 - L21 L21^T).  Extends the kernel cache by the same
        segment when it holds exactly the first ``m`` rows and stays under its size limit."""
        ls = (self._hyps["ls2"], self._hyps["ls3"])
        c2, c3, d2, d3 = self._segment_blocks(m, n, ls)
        h = self._hyps
        Kc = h["sig2"] ** 2 * c2 + h["sig3"] ** 2 * c3
        Kd = h["sig2"] ** 2 * d2 + h["sig3"] ** 2 * d3
        Kd[np.diag_indices(n - m)] += self._noise_vector()[m:n]
        L21 = solve_triangular(L_old, Kc, lower=True, check_finite=False).T
        S = Kd - L21 @ L21.T
        try:
            L22 = cholesky(S, lower=True, check_finite=False)
        except LinAlgError as exc:
            raise ModelError(_CHOLESKY_HINT) from exc
        L = np.zeros((n, n))
        L[:m, :m] = L_old
        L[m:, :m] = L21
        L[m:, m:] = L22
        cached = bool(self._k_segments) and self._k_ls == ls
        if cached and self._k_rows >= n:
            pass  # already covers the new rows
        elif cached and self._k_rows == m and n <= self.kernel_cache_max_rows:
            K2 = np.zeros((n, n))
            K3 = np.zeros((n, n))
            K2[:m, :m], K3[:m, :m] = self._K2, self._K3
            K2[m:, m:], K3[m:, m:] = d2, d3
            K2[:m, m:], K3[:m, m:] = c2, c3
            K2[m:, :m], K3[m:, :m] = c2.T, c3.T
            self._K2, self._K3, self._k_rows = K2, K3, n
            self._k_segments = self._k_segments + ((n, "blocks"),)
        elif self._k_segments:
            self._drop_kernel_cache()
        return L

    @staticmethod
    def _cholesky(Ky: np.ndarray, overwrite: bool = False) -> np.ndarray:
        try:
            L = cholesky(Ky, lower=True, check_finite=False, overwrite_a=overwrite)
        except (LinAlgError, ValueError) as exc:
            raise ModelError(_CHOLESKY_HINT) from exc
        if not np.isfinite(L).all():
            raise ModelError(_CHOLESKY_HINT)
        return L

    def _trim_caches(self) -> None:
        """Drop the kernel and gradient caches above :attr:`kernel_cache_max_rows` rows."""
        if self.n_labels > self.kernel_cache_max_rows:
            self._drop_kernel_cache()
            self._grad_cache = None

    def covariance_matrix(self) -> np.ndarray:
        """K_y = K + noise (n_labels, n_labels) at the current hyperparameters."""
        K2, K3, _ = self._kernel_matrices()
        return self._ky(K2=K2, K3=K3)

    @property
    def alpha(self) -> np.ndarray:
        st = self._factorize()
        return np.zeros(0) if st is None else st.alpha.copy()

    # ------------------------------------------------------------------
    # rebuilding a factor (checkpoints) and cheap copies
    # ------------------------------------------------------------------

    @property
    def factor_history(self) -> dict:
        """How the current factor and kernel cache were built (JSON-ready): ``log`` (a full
        factorisation -- its row count, hyperparameters and kernel segments -- or a model file
        load, then block extensions with their row counts) and ``kernel_cache`` (segments of the
        cached unit-variance kernels, ``[]`` if none).  Factorises first if needed."""
        st = self._factorize()
        cache = [[int(r), k] for r, k in self._k_segments] if self._k_ls == (self._hyps["ls2"], self._hyps["ls3"]) \
            else []
        return {"log": [] if st is None else [dict(e) for e in st.log], "kernel_cache": cache}

    @serial_blas
    def _replay_state(self, history: Mapping, progress: Callable[[str], None] | None = None) -> None:
        """Rebuild the factor (and kernel cache) as ``history`` (:attr:`factor_history` of the
        model that wrote it) says, bit for bit, on the same training data in the same order."""
        log = list(history.get("log") or [])
        n = len(self._labels)
        if not log:
            if n:
                raise ModelError("the checkpoint has training data but no factor history")
            return
        if int(log[-1]["rows"]) != n:
            raise ModelError(f"factor history ends at {log[-1]['rows']} rows but the data have {n}")
        ls = (self._hyps["ls2"], self._hyps["ls3"])
        first = log[0]
        t0 = time.perf_counter()
        if first["op"] == "loaded":
            st = self._state
            if st is None or st.n != int(first["rows"]):
                raise ModelError(f"factor history starts from a model file with {first['rows']} rows, "
                                 f"but the loaded base has no such factor")
            L = st.L
        elif first["op"] == "full":
            hyps = {k: float(v) for k, v in first["hyps"].items()}
            if self._state_key() != tuple(hyps[k] for k in sorted(hyps)):
                raise ModelError("factor history: the hyperparameters of the full factorisation are not the model's")
            rows = int(first["rows"])
            if progress:
                progress(f"kernel matrices for {rows} rows")
            K2, K3 = self._build_kernel(first["kernel"], ls)
            cache = [[int(r), k] for r, k in (history.get("kernel_cache") or [])]
            keep = cache[:len(first["kernel"])] == [[int(r), k] for r, k in first["kernel"]] \
                and rows <= self.kernel_cache_max_rows
            # factorise the first `rows` rows (the data beyond them are the extensions')
            L = self._full_factor_rows(K2, K3, rows)
            if keep:
                self._K2, self._K3, self._k_rows, self._k_ls = K2, K3, rows, ls
                self._k_segments = tuple((int(r), k) for r, k in first["kernel"])
            else:
                self._drop_kernel_cache()
                self._k_ls = ls
            del K2, K3
        else:
            raise ModelError(f"unknown factor history entry {first.get('op')!r}")
        m = int(first["rows"])
        for k, event in enumerate(log[1:], 1):
            if event.get("op") != "extend" or int(event["rows"]) <= m:
                raise ModelError(f"factor history entry {k} is not an extension beyond {m} rows: {event}")
            L = self._extend_factor(L, m, int(event["rows"]))
            m = int(event["rows"])
            if progress and (k % 10 == 0 or k == len(log) - 1):
                progress(f"extension {k}/{len(log) - 1} ({m} rows, {time.perf_counter() - t0:.1f} s)")
        alpha = _alpha_of(L, self._targets())
        self._state = _State(self._state_key(), n, L, alpha, tuple(dict(e) for e in log))
        want = [[int(r), k] for r, k in (history.get("kernel_cache") or [])]
        have = [[int(r), k] for r, k in self._k_segments]
        if want != have:
            if want and int(want[-1][0]) <= self.kernel_cache_max_rows:
                K2, K3 = self._build_kernel(want, ls)
                self._K2, self._K3, self._k_rows = K2, K3, int(want[-1][0])
                self._k_segments = tuple((int(r), k) for r, k in want)
                self._k_ls = ls
            else:
                self._drop_kernel_cache()

    def _full_factor_rows(self, K2: np.ndarray, K3: np.ndarray, rows: int) -> np.ndarray:
        """:meth:`_full_factor` of the first ``rows`` training rows."""
        saved_labels, saved_kinds = self._labels, self._kinds
        try:
            self._labels, self._kinds = saved_labels[:rows], saved_kinds[:rows]
            return self._full_factor(K2, K3, self._hyps)
        finally:
            self._labels, self._kinds = saved_labels, saved_kinds

    # -- the LearnerModel interface (learner_service/model.py) ---------------------------

    kind = "exact"
    format_name = "epicycle-gp"

    def settings(self) -> dict:
        """Constructor settings beyond species, cutoffs and hyperparameters (none)."""
        return {}

    @property
    def ready(self) -> bool:
        return bool(self._labels)

    def training_environments(self) -> EnvironmentBatch:
        """Every stored training environment (force environments and those of energy/stress labels)."""
        return self._training_batch()

    def add_frame(self, atoms, forces=None, selected: Iterable[int] = (), energy: float | None = None,
                  stress=None) -> int:
        """One oracle call's frame: the force labels of the atoms ``selected`` by the acquisition
        (the rest of the frame's forces are not used -- each added environment costs O(N²)),
        and the energy and stress if given."""
        return self.add_structure(atoms, forces=forces, atom_indices=[int(i) for i in selected],
                                  energy=energy, stress=stress)

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def rebuild_factor(self, hyperparameters: Mapping[str, float], history: Mapping,
                       progress: Callable[[str], None] | None = None) -> None:
        """Set ``hyperparameters`` (no version change) and rebuild the factor as ``history``
        (:attr:`factor_history` of the model that wrote it) says, bit for bit."""
        self._set_hyps(hyperparameters)
        self._replay_state(history, progress)

    def clone(self) -> "GaussianProcess":
        """A copy for a writer: shares every numpy array with this model (training
        environments, kernel cache, Cholesky factor -- none of them is ever modified in place,
        only replaced) and copies the containers that adding data or setting hyperparameters
        mutate.  O(n_labels) time and memory where ``copy.deepcopy`` copied 3 n_labels² floats."""
        new = copy.copy(self)
        new._hyps = dict(self._hyps)
        new._batch_parts = list(self._batch_parts)
        new._groups = list(self._groups)
        new._frames = list(self._frames)
        new._labels = list(self._labels)
        new._kinds = list(self._kinds)
        new.__dict__.pop("_groups_cache", None)
        return new

    def data_counts(self) -> dict:
        """Sizes of the training data (labels, label groups, environments incl. those of
        energy/stress labels, force environments): a prefix of the data is named by these."""
        return {"labels": len(self._labels), "groups": len(self._groups), "environments": self._n_env_total,
                "force_environments": self._n_force_envs}

    def truncated(self, counts: Mapping[str, int], hyperparameters: Mapping[str, float],
                  history: Mapping) -> "GaussianProcess":
        """This model as it was when it held only the first ``counts`` (:meth:`data_counts`)
        of its data, with ``hyperparameters`` and the factor ``history`` then
        (:attr:`factor_history`), which must be a prefix of this model's own: its factor is the
        leading block of this one's (block extensions never touch the old block), so nothing is
        recomputed but alpha -- bit for bit the model that had that history.  Raises
        :class:`ModelError` if the history is not a prefix."""
        st = self._factorize()
        log = [dict(e) for e in history.get("log") or []]
        mine = [dict(e) for e in st.log] if st is not None else []
        n = int(counts["labels"])
        if log != mine[:len(log)] or (log and int(log[-1]["rows"]) != n) or n > self.n_labels:
            raise ModelError("the requested factor history is not a prefix of this model's")
        new = self.clone()
        new._hyps = dict(self._hyps)
        new._set_hyps(hyperparameters)
        n_env = int(counts["environments"])
        new._batch = self._prefix_batch(n_env)
        new._batch_parts = []
        new._n_env_total = n_env
        new._groups = self._groups[:int(counts["groups"])]
        new._frames = [f for f in self._frames if f.groups <= int(counts["groups"])]
        new._labels = self._labels[:n]
        new._kinds = self._kinds[:n]
        new._n_force_envs = int(counts["force_environments"])
        new._grad_cache = None
        if n:
            if new._state_key() != st.key:
                raise ModelError("the requested hyperparameters are not those of this model's factor")
            L = np.ascontiguousarray(st.L[:n, :n])
            new._state = _State(st.key, n, L, _alpha_of(L, new._targets()), tuple(log))
        else:
            new._state = None
        want = [[int(r), k] for r, k in history.get("kernel_cache") or []]
        have = [[int(r), k] for r, k in self._k_segments]
        new._drop_kernel_cache()
        ls = (new._hyps["ls2"], new._hyps["ls3"])
        new._k_ls = ls
        if want and want == have[:len(want)] and self._k_ls == ls:
            r = int(want[-1][0])
            new._K2 = np.ascontiguousarray(self._K2[:r, :r])
            new._K3 = np.ascontiguousarray(self._K3[:r, :r])
            new._k_rows, new._k_segments = r, tuple((int(a), k) for a, k in want)
        elif want:
            new._K2, new._K3 = new._build_kernel(want, ls)
            new._k_rows, new._k_segments = int(want[-1][0]), tuple((int(a), k) for a, k in want)
        return new

    # ------------------------------------------------------------------
    # likelihood
    # ------------------------------------------------------------------

    def log_likelihood(self, gradient: bool = False, hyperparameters: Mapping[str, float] | None = None):
        """Log marginal likelihood (Eq. 6) and, with ``gradient``, its analytic gradient
        (Eq. 7) as an array ordered like :attr:`hyperparameter_names`.

        ``hyperparameters`` optionally sets (some) hyperparameters first.  The gradient needs
        the full kernel matrices and their length-scale derivatives (4 n_labels² numbers):
        above :attr:`kernel_cache_max_rows` rows they are recomputed on every call and freed
        afterwards (expensive, by design: a large model's hyperparameters are frozen).
        """
        if hyperparameters is not None:
            self.set_hyperparameters(hyperparameters)
        if not self._labels:
            raise ModelError("the model has no training data")
        if not gradient:
            st = self._factorize()
            return self._lml(st.L, st.alpha)
        value, grad = self._lml_and_grad(self._hyps)
        self._trim_caches()
        return value, grad

    def _lml(self, L, alpha) -> float:
        y = self._targets()
        return float(-0.5 * y @ alpha - np.log(np.diag(L)).sum() - 0.5 * len(y) * math.log(2 * math.pi))

    def _grad_kernels(self):
        """dK2/dls2, dK3/dls3 at the current length scales; K2/K3 of the same call become the
        kernel cache (one ``"grad"`` segment), which the gradient's sig terms read."""
        ls2, ls3 = self._hyps["ls2"], self._hyps["ls3"]
        n = len(self._labels)
        gc = self._grad_cache
        if gc is not None and gc[0] == ls2 and gc[1] == ls3 and gc[2] == n and self._k_ls == (ls2, ls3) \
                and self._k_rows == n and self._k_segments:
            return gc[3], gc[4]
        self._grad_cache = None
        self._drop_kernel_cache()
        K2, K3, dK2, dK3 = self._segment_blocks(0, n, (ls2, ls3), grad=True)
        self._K2, self._K3, self._k_rows, self._k_ls = K2, K3, n, (ls2, ls3)
        self._k_segments = ((n, "grad"),)
        self._grad_cache = (ls2, ls3, n, dK2, dK3)
        return dK2, dK3

    @serial_blas
    def _lml_and_grad(self, hyps: Mapping[str, float]):
        dK2, dK3 = self._grad_kernels()
        Ky = self._ky(hyps)
        L = self._cholesky(Ky)
        y = self._targets()
        alpha = cho_solve((L, True), y, check_finite=False)
        value = self._lml(L, alpha)
        Kinv = cho_solve((L, True), np.eye(len(y)), check_finite=False)
        W = np.outer(alpha, alpha) - Kinv  # Eq. 7: 1/2 tr(W dK/dθ)
        kinds = np.asarray(self._kinds)
        s2, s3 = hyps["sig2"], hyps["sig3"]
        grad = []
        for name in self.hyperparameter_names:
            if name == "sig2":
                g = 0.5 * np.vdot(W, self._K2) * 2 * s2
            elif name == "sig3":
                g = 0.5 * np.vdot(W, self._K3) * 2 * s3
            elif name == "ls2":
                g = 0.5 * np.vdot(W, dK2) * s2 ** 2
            elif name == "ls3":
                g = 0.5 * np.vdot(W, dK3) * s3 ** 2
            else:
                kind = {"noise": _FORCE, "energy_noise": _ENERGY, "stress_noise": _STRESS}[name]
                g = 0.5 * np.diag(W)[kinds == kind].sum() * 2 * hyps[name]
            grad.append(float(g))
        return value, np.asarray(grad)

    # ------------------------------------------------------------------
    # hyperparameter optimisation
    # ------------------------------------------------------------------

    def optimize(
        self,
        max_iterations: int = 200,
        fix: Iterable[str] = (),
        bounds: Mapping[str, tuple[float, float]] | None = None,
        gtol: float = 1e-4,
        ftol: float = 1e-10,
        progress: Callable[[int, float, dict], None] | None = None,
        space: str = "log",
        prior=None,
    ) -> OptimizationResult:
        """Maximise the log marginal likelihood with L-BFGS-B over log-hyperparameters.

        With ``prior`` (a :class:`learner_service.model_selection.HyperPrior`, log space only)
        the objective is the MAP objective log p(y|θ) + log p(log θ), its gradient Eq. 7 plus
        the prior's (exact); :func:`learner_service.model_selection.map_optimize` is the faster
        nested search with restarts and a held-out check.  An iteration cap or an abnormal
        line-search stop is reported in ``warnings`` with the gradient norm.

        Converged when the projected gradient with respect to log θ is below ``gtol``
        (the paper's ε = 1e-4) or the relative likelihood change per step is below
        ``ftol``; reaching ``max_iterations`` is reported as *not* converged.
        ``space="linear"`` searches over θ itself, as FLARE 0.2.4's ``gp.train()`` does.
        Both maximise the same likelihood; run to convergence they agree, but a few
        warm-started iterations per oracle call (FLARE's on-the-fly schedule) walk
        different paths: in linear space a signal variance can reach its floor in one
        step and σn leaves its floor sooner, which is what FLARE's on-the-fly runs rely on.
        ``fix`` names hyperparameters to hold; ``bounds`` overrides the default boxes
        (``DEFAULT_BOUNDS``: signal variances ≥ 1e-6 eV, length scales 0.01–100 Å, force
        noise σn ≥ 1e-3 eV/Å as in FLARE 0.2.4 — reference forces are not more precise than
        ~1 meV/Å, and noise-free labels such as EMT would otherwise collapse σn);
        ``progress(iteration, log_likelihood, hyperparameters)`` is called per iteration.
        Hyperparameters that end on an edge of their box are named in the result's
        ``at_bounds`` and in its message (still converged if the projected gradient is).
        """
        if not self._labels:
            raise ModelError("the model has no training data to optimise on")
        if max_iterations < 1:
            raise InvalidInput("max_iterations must be >= 1")
        names = [n for n in self.hyperparameter_names if n not in set(fix)]
        unknown = set(fix) - set(self._hyps)
        if unknown:
            raise InvalidInput(f"cannot fix unknown hyperparameters {sorted(unknown)}")
        if not names:
            raise InvalidInput("every hyperparameter is fixed; nothing to optimise")
        if space not in ("log", "linear"):
            raise InvalidInput(f"space must be 'log' or 'linear', got {space!r}")
        if prior is not None and space != "log":
            raise InvalidInput("a prior on log θ needs space='log'")
        if prior is not None:
            from .model_selection import log_prior
        else:
            log_prior = None
        log_space = space == "log"
        to_x = np.log if log_space else np.asarray
        from_x = math.exp if log_space else float
        box = dict(DEFAULT_BOUNDS)
        if not log_space:
            # FLARE's boxes have no upper edge. This matters beyond the edge itself: when every
            # variable is boxed, L-BFGS-B's first step is the full gradient step (landing on the
            # box), otherwise it is scaled to 1/|g|, so keep the default upper edges open here.
            box = {n: (lo, math.inf) for n, (lo, _) in box.items()}
        box.update(bounds or {})
        all_names = list(self.hyperparameter_names)
        idx = [all_names.index(n) for n in names]
        x0 = to_x(np.array([min(max(self._hyps[n], box[n][0]), box[n][1]) for n in names], dtype=float))
        x_bounds = [tuple(float(v) for v in to_x(np.array(box[n], dtype=float))) for n in names]
        t0 = time.perf_counter()
        best = {"f": math.inf, "x": x0.copy()}
        evals = [0]

        def fun(x):
            evals[0] += 1
            hyps = dict(self._hyps)
            hyps.update({n: from_x(v) for n, v in zip(names, x)})
            self._hyps.update({"ls2": hyps["ls2"], "ls3": hyps["ls3"]})
            try:
                value, grad = self._lml_and_grad(hyps)
            except ModelError:
                # outside the region where K_y is numerically positive definite
                return (abs(best["f"]) + 1e6 if math.isfinite(best["f"]) else 1e30), np.zeros(len(x))
            g = -np.asarray(grad)[idx] * (np.exp(x) if log_space else 1.0)
            f = -value
            if log_prior is not None:
                lp, glp = log_prior(prior, hyps, names)
                f -= lp
                g = g - glp
            if f < best["f"]:
                best.update(f=f, x=np.array(x))
            return f, g

        it = [0]

        def callback(xk):
            it[0] += 1
            if progress is not None:
                hyps = {n: from_x(v) for n, v in zip(names, xk)}
                progress(it[0], -best["f"], hyps)

        saved = dict(self._hyps)
        try:
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=x_bounds, callback=callback,
                           options={"maxiter": int(max_iterations), "gtol": gtol, "ftol": ftol,
                                    "maxfun": 20 * int(max_iterations) + 20, "maxls": 30})
        except Exception:
            self._hyps = saved
            raise
        if not math.isfinite(best["f"]):
            self._hyps = saved
            raise ModelError("no hyperparameters tried gave a positive-definite covariance; " + _CHOLESKY_HINT)
        x = best["x"]
        self._hyps.update({n: from_x(v) for n, v in zip(names, x)})
        self._version += 1
        self._factorize()
        value, grad = self._lml_and_grad(self._hyps)
        self._trim_caches()
        iterations = int(res.nit)
        hit_cap = iterations >= max_iterations or res.status == 1
        converged = bool(res.success) and not hit_cap
        message = str(res.message)
        if hit_cap:
            message = f"iteration limit {max_iterations} reached before convergence ({message})"
        at_bounds = {}
        for n in names:
            lo, hi = box[n]
            v = self._hyps[n]
            if v <= lo * (1 + BOUND_RTOL):
                at_bounds[n] = "lower"
            elif v >= hi * (1 - BOUND_RTOL):
                at_bounds[n] = "upper"
        result_bounds = {n: (float(box[n][0]), float(box[n][1])) for n in names}
        if at_bounds:
            message = f"{message}; ended on the edge of the box: {_bound_note(at_bounds, result_bounds)}"
        grad = np.asarray(grad, dtype=float)
        lp = 0.0
        if log_prior is not None:
            all_names = list(self.hyperparameter_names)
            lp, glp = log_prior(prior, self._hyps, all_names)
            grad = grad + glp / np.array([self._hyps[n] for n in all_names])  # d log p / dθ
        # |d objective / d log θ| over the optimised hyperparameters that are not on a bound
        g_log = np.array([grad[all_names.index(n)] * self._hyps[n] for n in names if n not in at_bounds])
        gnorm = float(np.linalg.norm(g_log)) if g_log.size else 0.0
        warnings = []
        if hit_cap:
            warnings.append(f"optimisation stopped at its iteration cap {max_iterations} before converging "
                            f"({res.message}); |gradient| (log θ) = {gnorm:.3g}")
        elif "ABNORMAL" in str(res.message).upper():
            warnings.append(f"optimisation line search ended abnormally ({res.message}): the result is the best "
                            f"point seen, not a verified optimum; |gradient| (log θ) = {gnorm:.3g}")
        if warnings:  # the message crosses the wire (OptimizeResponse.message): the norm goes with it
            message = f"{message}; |gradient| (log θ) = {gnorm:.3g}"
        return OptimizationResult(
            converged=converged,
            iterations=iterations,
            evaluations=evals[0],
            message=message,
            log_likelihood=float(value),
            gradient=dict(zip(self.hyperparameter_names, map(float, grad))),
            hyperparameters={n: self._hyps[n] for n in self.hyperparameter_names},
            max_iterations=int(max_iterations),
            seconds=time.perf_counter() - t0,
            at_bounds=at_bounds,
            bounds=result_bounds,
            warnings=tuple(warnings),
            gradient_norm=gnorm,
            objective="map" if log_prior is not None else "ml",
            log_prior=float(lp),
        )

    # ------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------

    def predict(self, atoms, stress: bool = False, atom_indices: Iterable[int] | None = None,
                condition_on: Sequence[tuple] = ()) -> Prediction:
        """Forces, per-component epistemic σ, local and total energy (and stress) of ``atoms``.

        With ``atom_indices`` only those atoms are predicted (rows of the other atoms are
        zero; energy and stress then need all atoms and are not available -> NaN/None).
        ``condition_on``: ``[(atoms, atom_indices), ...]`` force environments to condition σ
        on -- σ is reported as if their force labels were already in the training set (a GP
        variance does not depend on the labels): the uncertainty left once queued or in-flight
        labels arrive.  The mean (forces, energy, stress) stays this model's.
        Does not change the model.
        """
        n = len(atoms)
        positions = atoms.get_positions()
        cell = atoms.get_cell().array
        pbc = atoms.get_pbc()
        subset = atom_indices is not None
        idx = np.arange(n) if not subset else np.asarray(list(atom_indices), dtype=np.int64)
        if stress and subset:
            raise InvalidInput("stress needs all atoms; do not pass atom_indices with stress=True")
        volume = abs(np.linalg.det(cell)) if np.all(pbc) else 0.0
        if stress and volume < 1e-12:
            raise InvalidInput("stress needs a fully periodic cell with non-zero volume")
        envs = build_environments(positions, atoms.get_atomic_numbers(), cell, pbc, self.cutoffs, idx)
        st = self._factorize()
        if condition_on:
            mean, cov, V1 = self._predict_fast(envs, st, want_v=True)
            cov = self._conditioned_variance(envs, st, condition_on, cov, V1)
            if stress:
                mean = self._predict_general(envs, st, stress)[0]
        elif not stress:
            mean, cov = self._predict_fast(envs, st)
        else:
            mean, cov = self._predict_general(envs, st, stress)

        forces = np.zeros((n, 3))
        force_cov = np.zeros((n, 3, 3))
        atom_std = np.zeros(n)
        local = np.zeros(n)
        forces[idx] = mean[:, 1:4]
        force_cov[idx] = cov
        atom_std[idx] = atom_std_of(cov)
        force_var = np.ascontiguousarray(np.diagonal(force_cov, axis1=1, axis2=2))
        local[idx] = mean[:, 0] + self._reference_of(envs.center_species)
        if subset:
            energy = float("nan")
        else:
            energy = float(local.sum())
        stress_out = None
        if stress:
            partial = mean[:, 4:10]
            stress_out = -partial.sum(axis=0) / volume
        return Prediction(
            forces=forces,
            force_std=np.sqrt(np.abs(force_var)),
            force_var=force_var,
            energy=energy,
            local_energies=local,
            stress=stress_out,
            noise=self.noise,
            model_version=self._version,
            force_cov=force_cov,
            atom_std=atom_std,
        )

    def _training_groups(self) -> LabelGroups:
        """Label groups of the training rows (cached until data are added)."""
        cached = getattr(self, "_groups_cache", None)
        if cached is None or cached[0] != len(self._groups):
            cached = (len(self._groups), self._label_groups(self._groups))
            self._groups_cache = cached
        return cached[1]

    @serial_blas
    def _predict_fast(self, envs: EnvironmentBatch, st: _State | None, want_v: bool = False):
        """Mean (E, F) (m, 4) and the epistemic 3×3 force covariance (m, 3, 3) of each of
        ``envs`` from :func:`prediction_blocks`: only the functionals prediction needs, the
        prior from each environment's own 3×3 force block; the same numbers as
        :meth:`_predict_general` to round-off.  Covariance of atom i: prior_i - V_i^T V_i
        with V_i its three columns of V = L^-1 k(train, test forces) (n_labels, 3 m), which
        ``want_v`` also returns."""
        m = len(envs)
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        if st is not None:
            K2, K3, P2, P3 = prediction_blocks(self._training_batch(), self._training_groups(), envs,
                                               len(self.species), h["ls2"], h["ls3"], threads=self.predict_threads)
            n_rows = K2.shape[0]
            Kp = s2 * K2 + s3 * K3  # (n_train, m, 4)
            mean = (Kp.reshape(n_rows, m * 4).T @ st.alpha).reshape(m, 4)
            Kf = np.ascontiguousarray(Kp[:, :, 1:4]).reshape(n_rows, m * 3)
            if n_rows * n_rows * m * 3 <= _SMALL_SOLVE:
                V, sq = forward_substitution(st.L, Kf)
                explained = block_gram(V, m, sq.reshape(m, 3))
            else:
                V = solve_triangular(st.L, Kf, lower=True, check_finite=False)
                explained = block_gram(V, m, np.einsum("ij,ij->j", V, V).reshape(m, 3))
        else:
            _, _, P2, P3 = prediction_blocks(EnvironmentBatch.empty(), LabelGroups.concatenate([]), envs,
                                             len(self.species), h["ls2"], h["ls3"], threads=self.predict_threads)
            mean = np.zeros((m, 4))
            explained = np.zeros((m, 3, 3))
            V = np.zeros((0, 3 * m))
        prior = s2 * P2 + s3 * P3
        return (mean, prior - explained, V) if want_v else (mean, prior - explained)

    @serial_blas
    def _conditioned_variance(self, envs: EnvironmentBatch, st: _State | None, condition_on: Sequence[tuple],
                              var: np.ndarray, V1: np.ndarray) -> np.ndarray:
        """Force covariances (m, 3, 3) of ``envs`` given the training set plus the force
        environments Q of ``condition_on`` (noise σn on each), from this model's covariances
        ``var`` (m, 3, 3) and V1 =
        L^-1 k_T (:meth:`_predict_fast`): with the block extension [[L, 0], [L21, L22]] of the
        factor by Q's rows (:meth:`_extend_factor`'s algebra, on a clone; this model's factor
        is neither copied nor changed), var_Q = var - V2_i^T V2_i with V2 = L22^-1 (k_Q - L21 V1)."""
        work = self.clone()
        for k, item in enumerate(condition_on):
            try:
                c_atoms, c_idx = item
            except (TypeError, ValueError):
                raise InvalidInput(f"condition_on[{k}] must be (atoms, atom_indices)") from None
            c_idx = list(c_idx)
            if c_idx:
                work.add_structure(c_atoms, forces=np.zeros((len(c_atoms), 3)), atom_indices=c_idx)
        n, N = self.n_labels, work.n_labels
        if N == n:
            return var
        h = self._hyps
        ls = (h["ls2"], h["ls3"])
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        m = len(envs)
        c2, c3, d2, d3 = work._segment_blocks(n, N, ls)
        Kd = s2 * d2 + s3 * d3
        Kd[np.diag_indices(N - n)] += work._noise_vector()[n:N]
        new = [_Group(g.kind, g.envs, np.where(g.rows >= 0, g.rows - n, -1), g.scale)
               for g in work._groups[len(self._groups):]]
        K2, K3, _, _ = prediction_blocks(work._training_batch(), work._label_groups(new), envs, len(self.species),
                                         ls[0], ls[1], threads=self.predict_threads)
        B = np.ascontiguousarray((s2 * K2 + s3 * K3)[:, :, 1:4]).reshape(N - n, m * 3)
        S = Kd
        if n:
            L21 = solve_triangular(st.L, s2 * c2 + s3 * c3, lower=True, check_finite=False).T
            B = B - L21 @ V1
            S = Kd - L21 @ L21.T
        try:
            L22 = cholesky(S, lower=True, check_finite=False)
        except LinAlgError as exc:
            raise ModelError("conditioning: " + _CHOLESKY_HINT) from exc
        V2 = solve_triangular(L22, B, lower=True, check_finite=False)
        return var - block_gram(V2, m, np.einsum("ij,ij->j", V2, V2).reshape(m, 3))

    # ------------------------------------------------------------------
    # kernel distances (acquisition: farthest-point sampling, exploration bonus)
    # ------------------------------------------------------------------

    def kernel_distances(self, atoms, atom_indices: Iterable[int] | None = None, rows: Iterable[int] | None = None,
                         train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Distances in this model's own local-energy kernel, eV: ``(d_train (m,), d_within (r, m))``.

        For two atomic environments x, y with local energies E_x, E_y the kernel is
        k(x, y) = cov(E_x, E_y) = sig2² k2(x, y) + sig3² k3(x, y) (eV²; the 2- and 3-body
        terms of seed 004 Eq. 2 with the local-energy weights 1/2 and 1/3), and the distance is
        d(x, y) = sqrt(k(x, x) + k(y, y) - 2 k(x, y)): the distance of x and y in the kernel's
        feature space, a pseudo-metric (d ≥ 0, symmetric, triangle inequality; d = 0 for
        symmetry-equivalent environments).  ``d_train[i]`` is min over the *force* training
        environments y of d(x_i, y) (``inf`` without training environments; empty with
        ``train=False``) for the ``m`` atoms ``atom_indices`` of ``atoms`` (default: all), in that
        order.  ``d_within[a, j]`` = d(x_rows[a], x_j): ``rows`` are atoms among ``atom_indices``
        (None: all of them, an (m, m) matrix; ``[]``: none) -- farthest-point sampling asks for
        the row of each atom it picks, never for the m² matrix.  Does not change the model.
        """
        idx, pos = distance_request(len(atoms), atom_indices, rows)
        m = len(idx)
        if m == 0:
            return np.zeros(0), np.zeros((len(pos), 0))
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        ls2, ls3 = h["ls2"], h["ls3"]
        n_species = len(self.species)
        envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                                  atoms.get_pbc(), self.cutoffs, idx)
        kxx, d_within = within_distances(envs, pos, s2, s3, ls2, ls3, n_species, self.predict_threads)
        if not train:
            return np.zeros(0), d_within
        train_envs = np.array([g.envs[0] for g in self._groups if g.kind == "force"], dtype=np.int64)
        if not len(train_envs):
            return np.full(m, np.inf), d_within
        batch = self._training_batch()
        T2, T3, _, _ = prediction_blocks(batch, LabelGroups.per_environment(train_envs, energy=True, force=False),
                                         envs, n_species, ls2, ls3, threads=self.predict_threads)
        kt = s2 * T2[:, :, 0] + s3 * T3[:, :, 0]          # (N, m) eV²
        u2, u3 = self._training_self_energy_kernels(train_envs)
        kyy = s2 * u2 + s3 * u3                           # (N,) eV²
        d2 = kyy[:, None] + kxx[None, :] - 2.0 * kt
        return np.sqrt(np.maximum(d2.min(axis=0), 0.0)), d_within

    def _training_self_energy_kernels(self, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit-variance k2(y, y), k3(y, y) of the local energies of the training environments
        ``train`` (indices into the training batch, in training order), each (N,).  Cached per
        length scales; environments added later are computed on their own (training data only
        grow, and a clone shares the cache tuple, which is replaced, never modified)."""
        ls = (self._hyps["ls2"], self._hyps["ls3"])
        cached = getattr(self, "_self_energy_cache", None)
        done = 0
        parts2: list[np.ndarray] = []
        parts3: list[np.ndarray] = []
        if cached is not None and cached[0] == ls and len(cached[1]) <= len(train) \
                and np.array_equal(cached[1], train[:len(cached[1])]):
            done = len(cached[1])
            parts2.append(cached[2])
            parts3.append(cached[3])
        if done < len(train):
            u2, u3 = self_energy_unit(self._training_batch(), train[done:], ls[0], ls[1])
            parts2.append(u2)
            parts3.append(u3)
        u2 = np.concatenate(parts2) if parts2 else np.zeros(0)
        u3 = np.concatenate(parts3) if parts3 else np.zeros(0)
        self._self_energy_cache = (ls, train.copy(), u2, u3)
        return u2, u3

    @serial_blas
    def _predict_general(self, envs: EnvironmentBatch, st: _State | None, stress: bool):
        """Mean (E, F[, S]) (m, 4 or 10) and epistemic force covariances (m, 3, 3) of ``envs``
        through :func:`kernel_blocks` (the prior 3×3 self-blocks from :func:`prediction_blocks`)."""
        m = len(envs)
        h = self._hyps
        gp_rows = LabelGroups.per_environment(np.arange(m), energy=True, force=True, stress=stress)
        width = 10 if stress else 4
        if st is not None:
            groups = self._label_groups(self._groups)
            K2, K3 = kernel_blocks(self._training_batch(), groups, gp_rows, h["ls2"], h["ls3"], batch_b=envs)
            Kp = h["sig2"] ** 2 * K2 + h["sig3"] ** 2 * K3  # (n_train, m*width)
            mean = (Kp.T @ st.alpha).reshape(m, width)
            Kf = Kp.reshape(-1, m, width)[:, :, 1:4].reshape(Kp.shape[0], m * 3)
            V = solve_triangular(st.L, Kf, lower=True, check_finite=False)
            explained = block_gram(V, m, np.einsum("ij,ij->j", V, V).reshape(m, 3))
        else:
            mean = np.zeros((m, width))
            explained = np.zeros((m, 3, 3))
        _, _, P2, P3 = prediction_blocks(EnvironmentBatch.empty(), LabelGroups.concatenate([]), envs,
                                         len(self.species), h["ls2"], h["ls3"], threads=self.predict_threads)
        prior = h["sig2"] ** 2 * P2 + h["sig3"] ** 2 * P3
        return mean, prior - explained

    # ------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the model to ``path`` (.npz with a JSON header, ``format_version`` 1)."""
        path = Path(path)
        batch = self._training_batch()
        meta = {
            "format": "epicycle-gp",
            "format_version": FORMAT_VERSION,
            "species": list(self.species),
            "cutoffs": [self.cutoffs.r2, self.cutoffs.r3],
            "pair_cutoffs": self.cutoffs.pair_dict(),
            "hyperparameters": self.hyperparameters,
            "n_environments": self.n_environments,
            "n_labels": self.n_labels,
            "kernel": "two_plus_three_body_mc (FLARE 0.2.4 conventions)",
            "units": HYPERPARAMETER_UNITS,
        }
        arrays = {f"env_{k}": v for k, v in batch.arrays().items()}
        arrays["labels"] = self.labels
        arrays["label_kinds"] = np.asarray(self._kinds, dtype=np.int64)
        arrays["group_kind"] = np.array([0 if g.kind == "force" else 1 for g in self._groups], dtype=np.int64)
        arrays["group_ptr"] = np.concatenate([[0], np.cumsum([len(g.envs) for g in self._groups])]).astype(np.int64)
        arrays["group_env"] = (np.concatenate([g.envs for g in self._groups]) if self._groups
                               else np.zeros(0, np.int64))
        arrays["group_rows"] = (np.stack([g.rows for g in self._groups]) if self._groups
                                else np.zeros((0, N_FUNCTIONALS), np.int64))
        arrays["group_scale"] = (np.stack([g.scale for g in self._groups]) if self._groups
                                 else np.zeros((0, N_FUNCTIONALS)))
        if self._k_segments and self._k_rows == self.n_labels and \
                self._k_ls == (self._hyps["ls2"], self._hyps["ls3"]):
            arrays["K2"] = self._K2
            arrays["K3"] = self._K3
        st = self._state
        if st is not None and st.key == self._state_key() and st.n == self.n_labels:
            # the factor as it was built (possibly by block updates): a reloaded model predicts
            # bit for bit like this one, so a resumed on-the-fly run continues the same trajectory
            arrays["chol_L"] = st.L
            arrays["alpha"] = st.alpha
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, progress: Callable[[str], None] | None = None) -> "GaussianProcess":
        """A model saved by :meth:`save` (.npz), or the latest checkpoint of a learner's model
        directory (rebuilt from its data: :mod:`learner_service.checkpoints`)."""
        path = Path(path)
        if not path.exists():
            raise NotFound(f"model file {path} does not exist")
        if path.is_dir():
            from .checkpoints import ModelDirectory

            return ModelDirectory(path).load(progress=progress)
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(data["meta"]).decode())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path} is not an Epicycle GP model file: {exc}") from exc
        if meta.get("format") != "epicycle-gp":
            raise InvalidInput(f"{path} is not an Epicycle GP model file")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidInput(
                f"{path} has model format_version {version!r}; this Epicycle reads version {FORMAT_VERSION}")
        gp = cls(meta["species"], meta["cutoffs"], hyperparameters=meta["hyperparameters"],
                 pair_cutoffs=Cutoffs.parse_pair_dict(meta.get("pair_cutoffs")))
        batch = EnvironmentBatch.from_arrays({k[4:]: data[k] for k in data.files if k.startswith("env_")})
        gp._batch = batch
        gp._n_env_total = len(batch)
        ptr = data["group_ptr"]
        kinds = data["group_kind"]
        for g in range(len(kinds)):
            gp._groups.append(_Group("force" if kinds[g] == 0 else "structure", data["group_env"][ptr[g]:ptr[g + 1]],
                                     data["group_rows"][g], data["group_scale"][g]))
        gp._labels = data["labels"].tolist()
        gp._kinds = data["label_kinds"].tolist()
        gp._n_force_envs = int(meta["n_environments"])
        if "K2" in data.files:
            gp._K2 = data["K2"]
            gp._K3 = data["K3"]
            gp._k_rows = gp._K2.shape[0]
            gp._k_ls = (gp._hyps["ls2"], gp._hyps["ls3"])
            gp._k_segments = ((gp._k_rows, "file"),)
        if "chol_L" in data.files and data["chol_L"].shape == (gp.n_labels, gp.n_labels):
            gp._state = _State(gp._state_key(), gp.n_labels, np.ascontiguousarray(data["chol_L"]), data["alpha"],
                               ({"op": "loaded", "rows": gp.n_labels},))
        gp._version = 1
        return gp

    def __repr__(self) -> str:
        hyps = ", ".join(f"{k}={self._hyps[k]:.4g}" for k in self.hyperparameter_names)
        return (f"GaussianProcess(species={list(self.species)}, cutoffs=({self.cutoffs.r2}, {self.cutoffs.r3}), "
                f"{self.n_environments} environments, {self.n_labels} labels, {hyps})")


# ---------------------------------------------------------------------------
# local-energy kernel distances (acquisition), shared by the exact and the sparse GP
# ---------------------------------------------------------------------------

def distance_request(n_atoms: int, atom_indices: Iterable[int] | None,
                     rows: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(idx, pos)`` of a kernel-distance question: ``idx`` the atoms measured (None:
    all ``n_atoms``), ``pos`` the positions within ``idx`` of the atoms ``rows`` whose d_within
    rows are wanted (None: every one of ``idx``)."""
    idx = np.arange(n_atoms) if atom_indices is None else np.asarray(list(atom_indices), dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n_atoms)):
        raise InvalidInput(f"atom indices {idx.tolist()} out of range for {n_atoms} atoms")
    if rows is None:
        return idx, np.arange(len(idx))
    wanted = np.asarray(list(rows), dtype=np.int64)
    where = {int(a): k for k, a in enumerate(idx)}
    missing = [int(a) for a in wanted if int(a) not in where]
    if missing:
        raise InvalidInput(f"rows {missing or wanted.tolist()} are not among the atoms measured "
                           f"({'all' if atom_indices is None else idx.tolist()})")
    return idx, np.array([where[int(a)] for a in wanted], dtype=np.int64)


def self_energy_unit(batch: EnvironmentBatch, envs: np.ndarray, ls2: float, ls3: float,
                     chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Unit-variance k2(x, x), k3(x, x) of the local energies of the environments ``envs`` of
    ``batch``, each (len(envs),); in chunks, since the diagonal mode fills a (chunk, chunk) matrix."""
    parts2, parts3 = [np.zeros(0)], [np.zeros(0)]
    for lo in range(0, len(envs), chunk):
        groups = LabelGroups.per_environment(np.asarray(envs[lo:lo + chunk]), energy=True, force=False)
        D2, D3 = kernel_blocks(batch, groups, None, ls2, ls3, diagonal=True)
        parts2.append(np.diag(D2).copy())
        parts3.append(np.diag(D3).copy())
    return np.concatenate(parts2), np.concatenate(parts3)


def within_distances(envs: EnvironmentBatch, pos: np.ndarray, s2: float, s3: float, ls2: float, ls3: float,
                     n_species: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(kxx (m,) eV², d (len(pos), m) eV)`` for the m environments ``envs``: their local-energy
    self-covariances k(x, x) = s2 k2 + s3 k3 and the kernel distances of the environments ``pos``
    to all m (``d[a, pos[a]] = 0``).  Costs m + len(pos)·m kernel evaluations, never m² unless
    every row is asked for (then the matrix is symmetrised: the kernels are symmetric to
    round-off only)."""
    m = len(envs)
    u2, u3 = self_energy_unit(envs, np.arange(m), ls2, ls3)
    kxx = s2 * u2 + s3 * u3
    if not len(pos):
        return kxx, np.zeros((0, m))
    W2, W3, _, _ = prediction_blocks(envs, LabelGroups.per_environment(pos, energy=True, force=False), envs,
                                     n_species, ls2, ls3, threads=threads)
    kw = s2 * W2[:, :, 0] + s3 * W3[:, :, 0]              # (r, m) eV²
    if len(pos) == m and np.array_equal(pos, np.arange(m)):
        kw = 0.5 * (kw + kw.T)
    d = np.sqrt(np.maximum(kxx[pos][:, None] + kxx[None, :] - 2.0 * kw, 0.0))
    d[np.arange(len(pos)), pos] = 0.0
    return kxx, d
