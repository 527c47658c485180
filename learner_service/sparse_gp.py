"""Sparse Gaussian-process force field (issue 16): every label of every frame, m inducing environments.

Same 2+3-body kernels as the exact GP (:mod:`learner_service.kernels`, seed 004 Eqs. 2–4), the
same hyperparameters ``sig2, ls2, sig3, ls3, noise, energy_noise, stress_noise`` with the same
units and the same label functionals (force components of single environments, total energies
and stresses of whole structures, ASE sign and Voigt order).

Model (Quiñonero-Candela & Rasmussen 2005; FLARE 1.x ``flare/bffs/sgp``)
------------------------------------------------------------------------
The inducing variables ``u`` are linear functionals of a set U of local environments: the local
energy of each (``inducing_functionals="energy"``, FLARE 1.x's choice, one row per environment)
or its local energy and the three force components of its central atom (``"energy_force"``,
four rows per environment).  With ``K_UU`` their prior covariance, ``K_fU`` that of the
training labels ``y`` with them and ``Λ`` the diagonal label noise (``noise²`` for force
components, ``energy_noise²`` for a total energy -- not scaled by the number of atoms, as in
the exact GP -- and ``stress_noise²`` for stress components)::

    Q_ff = K_fU K̃_UU⁻¹ K_Uf,     y ~ N(0, Q_ff + Λ)            (DTC / SoR training model)
    K̃_UU = K_UU + ε diag(K_UU)   (relative jitter ε = ``jitter``, default 1e-8; it is part of
                                   the model: likelihood, gradient and predictions all use K̃)

Numerically stable QR form (FLARE 1.x): ``K̃_UU = L Lᵀ``, ``A = [Λ^-1/2 K_fU ; Lᵀ] = Q R``,
so ``AᵀA = RᵀR = Σ⁻¹ = K̃_UU + K_Uf Λ⁻¹ K_fU`` and

    α = R⁻¹ Qᵀ [Λ^-1/2 y ; 0],           mean  μ* = k_*U α

Variance: **DTC** (deterministic training conditional), per force component, local and total
energy::

    σ*² = k_** − |L⁻¹ k_U*|² + |R⁻ᵀ k_U*|²          (epistemic; noise excluded)

i.e. the SoR variance ``k_*U Σ k_U*`` plus the prior variance the inducing set does not explain
(``k_** − Q_**``).  SoR alone is known to be over-confident away from U (its variance goes to 0
where ``k_*U`` vanishes, so an on-the-fly run would never call the oracle there); the DTC term
restores the prior far from U, which is what the acquisition needs.  Known bias of DTC: the
predictive is not that of one consistent GP (the test point sees the exact prior, the training
points the Nyström one), so σ near U can still be too small when U is sparse -- calibrate it.
With ``"energy_force"`` inducing functionals and U = every training environment holding only
force labels, ``Q_ff = K_ff`` and mean and variance equal the exact GP's (up to the jitter).

Log marginal likelihood (matrix determinant lemma and Woodbury, b = Λ^-1/2 y)::

    log p(y) = −½ (|b|² − |Qᵀ[b;0]|²) − ½ log|Λ| − Σ log|R_ii| + Σ log L_ii − n/2 log 2π

and its analytic gradient without any n×n matrix: with ``C = Q_ff + Λ``, ``W = C⁻¹yyᵀC⁻¹ − C⁻¹``,
``B = K̃_UU⁻¹ K_Uf`` and ``C⁻¹ = Λ⁻¹ − G Gᵀ`` (``G = Λ⁻¹ K_fU R⁻¹``),
``∂ log p/∂θ = tr(W ∂K_fU B) − ½ tr(B W Bᵀ ∂K̃_UU)`` for a kernel hyperparameter and
``½ Σ_{i of kind k} W_ii ∂λ_i/∂σ_k`` for a noise.  Cost O(n m²) time, O(n m) memory.

Inducing environments are chosen by the acquisition rule of FLARE 1.x: from the environments of
each added structure, greedily (pivoted Cholesky on the candidates' residual covariance) the one
whose local energy has the largest DTC residual variance ``k(x,x) − k_xU K̃_UU⁻¹ k_Ux``, up to
``inducing_per_structure`` of them and only while that residual is above
``inducing_tolerance`` × its prior variance; :meth:`SparseGaussianProcess.add_inducing` adds
chosen environments explicitly.  The inducing set is kept when hyperparameters change.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy.linalg import LinAlgError, cho_solve, cholesky, qr, qr_multiply, solve_triangular
from scipy.optimize import minimize

from protos.errors import InvalidInput, ModelError

from .defaults import HYPERPARAMETER_UNITS
from .environment import Cutoffs, EnvironmentBatch, build_environments
from .gp import (BOUND_RTOL, DEFAULT_BOUNDS, DEFAULT_ENERGY_NOISE, DEFAULT_HYPERPARAMETERS,
                 DEFAULT_STRESS_NOISE, Hyperparameters, OptimizationResult, Prediction,
                 _ENERGY, _FORCE, _STRESS, _bound_note, _Group, atom_std_of, checked_labels, default_predict_threads,
                 distance_request, serial_blas, within_distances)
from .kernels import N_FUNCTIONALS, LabelGroups, inducing_gradient_blocks, kernel_blocks, prediction_blocks

__all__ = ["SparseGaussianProcess", "SparsePrediction", "FORMAT_NAME", "FORMAT_VERSION", "INDUCING_FUNCTIONALS",
           "INDUCING_RULES"]

FORMAT_NAME = "epicycle-sgp"
FORMAT_VERSION = 1
INDUCING_FUNCTIONALS = ("energy", "energy_force")
#: how :meth:`SparseGaussianProcess.add_frame` picks a frame's inducing environments: the atoms the
#: acquisition chose (``atom_indices``), or the model's own local-energy residual-variance rule
INDUCING_RULES = ("acquisition", "variance")
DEFAULT_JITTER = 1e-8  # relative to diag(K_UU)
DEFAULT_INDUCING_PER_STRUCTURE = 4
DEFAULT_INDUCING_TOLERANCE = 1e-6  # residual / prior variance of a candidate's local energy (EMT Al: 1e-3 stopped at 2)

_NOISE_KIND = {"noise": _FORCE, "energy_noise": _ENERGY, "stress_noise": _STRESS}
_CHOL_HINT = ("K_UU (the inducing environments' covariance) is not positive definite: increase `jitter`, or "
              "remove duplicate inducing environments")


#: n × mu float64 arrays that one likelihood gradient allocates beyond the model's own K_fU cache
#: (the four gradient kernels, K, the QR's A and the solves' work; 6.2 measured by
#: ``benchmarks/bench_sparse_scale.py --memory-probe``), for the memory check before optimising
GRADIENT_ARRAYS = 6.5


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class SparsePrediction:
    """:class:`~learner_service.gp.Prediction` plus the energy uncertainties it has no fields for:
    ``energy_std`` (eV) σ of the total energy, ``local_energy_std`` (n,) eV (DTC, epistemic)."""

    prediction: Prediction
    energy_std: float
    local_energy_std: np.ndarray


@dataclass
class _Factor:
    key: tuple
    L: np.ndarray  # Cholesky factor of K̃_UU (lower)
    R: np.ndarray  # upper triangular, A = QR
    alpha: np.ndarray  # (m_rows,)
    lml: float


def _shift(groups: Sequence[_Group], r0: int, e0: int = 0) -> list[_Group]:
    """Groups with output rows counted from ``r0`` and environments from ``e0``."""
    return [_Group(g.kind, g.envs - e0, np.where(g.rows >= 0, g.rows - r0, -1), g.scale) for g in groups]


def _label_groups(groups: Sequence[_Group]) -> LabelGroups:
    if not groups:
        return LabelGroups.concatenate([])
    ptr = np.concatenate([[0], np.cumsum([len(g.envs) for g in groups])])
    return LabelGroups(ptr, np.concatenate([g.envs for g in groups]), np.stack([g.rows for g in groups]),
                       np.stack([g.scale for g in groups]))


class SparseGaussianProcess(Hyperparameters):
    """Sparse (DTC, QR form) 2+3-body GP force field; the public API mirrors
    :class:`~learner_service.gp.GaussianProcess`.

    ``species``, ``cutoffs`` (Å), ``hyperparameters``, ``energy_noise`` (eV), ``stress_noise``
    (eV/Å^3), ``pair_cutoffs`` as for the exact GP; ``inducing_functionals`` one of
    :data:`INDUCING_FUNCTIONALS`; ``jitter`` relative jitter of K_UU; ``inducing_per_structure``
    and ``inducing_tolerance`` the automatic selection per :meth:`add_structure`.
    """

    def __init__(
        self,
        species: Sequence[int],
        cutoffs: Sequence[float],
        hyperparameters: Mapping[str, float] | None = None,
        energy_noise: float | None = None,
        stress_noise: float | None = None,
        pair_cutoffs: Mapping | None = None,
        inducing_functionals: str = "energy",
        jitter: float = DEFAULT_JITTER,
        inducing_per_structure: int = DEFAULT_INDUCING_PER_STRUCTURE,
        inducing_tolerance: float = DEFAULT_INDUCING_TOLERANCE,
        max_inducing: int | None = None,
        inducing_rule: str = "acquisition",
    ) -> None:
        if inducing_rule not in INDUCING_RULES:
            raise InvalidInput(f"inducing_rule must be one of {INDUCING_RULES}, got {inducing_rule!r}")
        if max_inducing is not None and int(max_inducing) < 1:
            raise InvalidInput(f"max_inducing must be >= 1 (or None: no cap), got {max_inducing}")
        if inducing_functionals not in INDUCING_FUNCTIONALS:
            raise InvalidInput(f"inducing_functionals must be one of {INDUCING_FUNCTIONALS}, "
                               f"got {inducing_functionals!r}")
        if not (math.isfinite(jitter) and jitter >= 0):
            raise InvalidInput(f"jitter must be a finite number >= 0, got {jitter}")
        if int(inducing_per_structure) < 0 or not inducing_tolerance >= 0:
            raise InvalidInput("inducing_per_structure and inducing_tolerance must be >= 0")
        self.cutoffs = Cutoffs.create(species, cutoffs, pair_cutoffs)
        self.species = self.cutoffs.species
        self.inducing_functionals = inducing_functionals
        self.jitter = float(jitter)
        self.inducing_per_structure = int(inducing_per_structure)
        self.inducing_tolerance = float(inducing_tolerance)
        self.max_inducing = None if max_inducing is None else int(max_inducing)
        self.inducing_rule = inducing_rule
        self._hyps = dict(DEFAULT_HYPERPARAMETERS)
        self._hyps["energy_noise"] = DEFAULT_ENERGY_NOISE if energy_noise is None else float(energy_noise)
        self._hyps["stress_noise"] = DEFAULT_STRESS_NOISE if stress_noise is None else float(stress_noise)
        if hyperparameters:
            self._set_hyps(hyperparameters)
        self._train_parts: list[EnvironmentBatch] = []
        self._train = EnvironmentBatch.empty()
        self._n_train_envs = 0
        self._groups: list[_Group] = []
        self._labels: list[float] = []
        self._kinds: list[int] = []
        self._n_force_envs = 0
        self._inducing_parts: list[EnvironmentBatch] = []
        self._inducing = EnvironmentBatch.empty()
        self._n_inducing = 0
        self._version = 0
        # unit-variance kernels at length scales _k_ls: K_fU (rows x inducing rows), K_UU
        self._k_ls: tuple | None = None
        self._Kfu = (np.zeros((0, 0)), np.zeros((0, 0)))
        self._Kuu = (np.zeros((0, 0)), np.zeros((0, 0)))
        self._factor: _Factor | None = None
        #: (rows, inducing) at which the K_fU cache was built or extended since its last reset: the
        #: factor history a checkpoint records, so a rebuild forms K_fU in the same blocks (bit for bit)
        self._kfu_log: list[tuple[int, int]] = []
        #: the exact GP's kernel-cache setting; the sparse model's caches are O(n m), always kept
        self.kernel_cache_max_rows = 0
        #: threads for the covariances with the inducing set (bitwise identical results for any number)
        self.predict_threads = default_predict_threads()

    # hyperparameters: gp.Hyperparameters (shared with the exact GP)

    # ------------------------------------------------------------------ sizes

    @property
    def n_labels(self) -> int:
        return len(self._labels)

    @property
    def n_environments(self) -> int:
        """Number of training environments with force labels."""
        return self._n_force_envs

    @property
    def n_inducing(self) -> int:
        """Number of inducing environments (m)."""
        return self._n_inducing

    @property
    def version(self) -> int:
        """Increases whenever data, inducing set or hyperparameters change."""
        return self._version

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._labels, dtype=np.float64)

    @property
    def _u_width(self) -> int:
        return 1 if self.inducing_functionals == "energy" else 4

    def _u_groups(self, lo: int = 0, hi: int | None = None) -> LabelGroups:
        hi = self._n_inducing if hi is None else hi
        return LabelGroups.per_environment(np.arange(lo, hi), energy=True,
                                           force=self.inducing_functionals == "energy_force")

    def _training_batch(self) -> EnvironmentBatch:
        if len(self._train) != self._n_train_envs:
            self._train = EnvironmentBatch.concatenate([self._train] + self._train_parts)
            self._train_parts = []
        return self._train

    def _inducing_batch(self) -> EnvironmentBatch:
        if len(self._inducing) != self._n_inducing:
            self._inducing = EnvironmentBatch.concatenate([self._inducing] + self._inducing_parts)
            self._inducing_parts = []
        return self._inducing

    # ------------------------------------------------------------------ data

    def add_structure(self, atoms, forces=None, atom_indices: Iterable[int] | None = None, energy: float | None = None,
                      stress=None, inducing: str | Iterable[int] | None = "auto") -> int:
        """Add the labels of one structure (an ``ase.Atoms``); returns the number of labels added.

        ``forces`` (n, 3) eV/Å -- the force labels of ``atom_indices`` (default: every atom, the
        sparse model's normal use); ``energy`` total energy (eV); ``stress`` (6,) ASE Voigt or
        (3, 3), eV/Å^3, ASE sign.  ``inducing``: ``"auto"`` selects inducing environments among
        this structure's atoms by the acquisition rule (module docstring), a sequence of atom
        indices adds those, ``None`` or ``()`` adds none.
        """
        n = len(atoms)
        forces, idx, energy, stress = checked_labels(atoms, forces, atom_indices, energy, stress)
        pbc = atoms.get_pbc()
        cell = atoms.get_cell().array
        if isinstance(inducing, str):
            if inducing != "auto":
                raise InvalidInput(f"inducing must be 'auto', atom indices or None, got {inducing!r}")
            pick = None
        else:
            pick = np.asarray(list(inducing or ()), dtype=np.int64)
            if len(pick) and (pick.min() < 0 or pick.max() >= n):
                raise InvalidInput(f"inducing atom indices {pick.tolist()} out of range for {n} atoms")

        all_envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), cell, pbc, self.cutoffs)
        need_all = energy is not None or stress is not None
        stored = all_envs if need_all else all_envs.subset(idx)
        local = np.arange(n) if need_all else np.full(n, -1, np.int64)
        if not need_all:
            local[idx] = np.arange(len(idx))
        base = self._n_train_envs
        row = len(self._labels)
        groups, labels, kinds = [], [], []
        for i in idx:
            rows = np.full(N_FUNCTIONALS, -1, np.int64)
            rows[1:4] = row + np.arange(3)
            row += 3
            groups.append(_Group("force", np.array([base + local[i]]), rows, np.ones(N_FUNCTIONALS)))
            labels.extend(forces[i].tolist())
            kinds.extend([_FORCE] * 3)
        if need_all:
            rows = np.full(N_FUNCTIONALS, -1, np.int64)
            scale = np.ones(N_FUNCTIONALS)
            if energy is not None:
                rows[0] = row
                row += 1
                labels.append(energy)
                kinds.append(_ENERGY)
            if stress is not None:
                rows[4:10] = row + np.arange(6)
                row += 6
                scale[4:10] = -1.0 / abs(np.linalg.det(cell))  # > 0: checked_labels
                labels.extend(stress.tolist())
                kinds.extend([_STRESS] * 6)
            groups.append(_Group("structure", base + np.arange(n), rows, scale))
        # inducing first (the selection sees the inducing set as it was), then commit the labels
        if pick is None:
            pick = self.select_inducing(all_envs)
        if len(pick):
            self._append_inducing(all_envs.subset(pick))
        self._train_parts.append(stored)
        self._n_train_envs += len(stored)
        self._groups.extend(groups)
        self._labels.extend(labels)
        self._kinds.extend(kinds)
        self._n_force_envs += len(idx)
        self._version += 1
        return len(labels)

    def add_inducing(self, atoms, atom_indices: Iterable[int] | None = None) -> int:
        """Add the environments of ``atom_indices`` (default: all atoms) of ``atoms`` to the inducing
        set U; returns how many were added."""
        n = len(atoms)
        idx = np.arange(n) if atom_indices is None else np.asarray(list(atom_indices), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise InvalidInput(f"atom indices {idx.tolist()} out of range for {n} atoms")
        if len(idx) == 0:
            return 0
        envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                                  atoms.get_pbc(), self.cutoffs, idx)
        self._append_inducing(envs)
        self._version += 1
        return len(envs)

    def _append_inducing(self, envs: EnvironmentBatch) -> None:
        self._inducing_parts.append(envs)
        self._n_inducing += len(envs)

    @serial_blas
    def select_inducing(self, envs: EnvironmentBatch, max_new: int | None = None,
                        tolerance: float | None = None) -> np.ndarray:
        """Indices into ``envs`` of the environments the acquisition rule would add to U, in order:
        greedily the largest DTC residual variance of the local energy, ``k(x,x) − k_xU K̃⁻¹ k_Ux``
        (given U and the environments already picked), while it exceeds ``tolerance`` × k(x,x)."""
        max_new = self.inducing_per_structure if max_new is None else int(max_new)
        tol = self.inducing_tolerance if tolerance is None else float(tolerance)
        c = len(envs)
        if max_new <= 0 or c == 0:
            return np.zeros(0, np.int64)
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        g = LabelGroups.per_environment(np.arange(c), energy=True, force=False)
        c2, c3 = self._cov(envs, g, envs, 1)
        S = s2 * c2 + s3 * c3
        S = 0.5 * (S + S.T)
        S[np.diag_indices(c)] *= 1.0 + self.jitter
        prior = np.diag(S).copy()
        if self._n_inducing:
            L = self._kuu_factor()
            u2, u3 = self._cov(self._inducing_batch(), self._u_groups(), envs, 1)
            V = solve_triangular(L, s2 * u2 + s3 * u3, lower=True, check_finite=False)
            S = S - V.T @ V
        picked = []
        for _ in range(min(max_new, c)):
            d = np.diag(S).copy()
            d[picked] = -np.inf
            i = int(np.argmax(d))
            if not d[i] > tol * prior[i]:
                break
            picked.append(i)
            v = S[:, i] / math.sqrt(S[i, i])
            S = S - np.outer(v, v)
        return np.asarray(picked, dtype=np.int64)

    # ------------------------------------------------------------------ kernels and factor

    def _unit_kernels(self):
        """Unit-variance ``(K2_fU, K3_fU), (K2_UU, K3_UU)`` at the current length scales, extending
        the cache by new training rows and new inducing columns."""
        self._kuu_unit()  # also drops the caches of other length scales
        self._grow_kfu(len(self._labels), self._n_inducing)
        return self._Kfu, self._Kuu

    def _grow_kfu(self, n: int, m_ind: int) -> None:
        """Extend the K_fU cache to the first ``n`` label rows and ``m_ind`` inducing environments
        (a prefix of the data: what the cache was at an earlier time; see :attr:`factor_history`)."""
        mu = m_ind * self._u_width
        r0, c0 = self._Kfu[0].shape
        if (r0, c0) == (n, mu):
            return
        if r0 > n or c0 > mu:
            raise ModelError(f"K_fU cache holds {r0} x {c0}; cannot shrink it to {n} x {mu}")
        U = self._inducing_batch()
        if m_ind != self._n_inducing:
            U = U.subset(np.arange(m_ind))
        out = []
        for old in self._Kfu:
            K = np.zeros((n, mu))
            K[:r0, :c0] = old
            out.append(K)
        if c0 < mu and r0:  # new inducing columns for the old rows
            m0 = c0 // self._u_width
            k2, k3 = self._row_blocks(self._groups_below(r0), 0, r0, U.subset(np.arange(m0, m_ind)), self._pred2, 2)
            out[0][:r0, c0:], out[1][:r0, c0:] = k2, k3
            del k2, k3
        if r0 < n:  # new rows against every inducing column
            new = [g for g in self._groups if r0 <= g.rows.max() < n]
            k2, k3 = self._row_blocks(new, r0, n - r0, U, self._pred2, 2)
            out[0][r0:, :], out[1][r0:, :] = k2, k3
            del k2, k3
        self._Kfu = tuple(out)
        self._kfu_log.append((int(n), int(m_ind)))

    def _pred2(self, batch: EnvironmentBatch, groups: LabelGroups, U: EnvironmentBatch):
        """(K2, K3) (rows, len(U), 4) through the fast prediction kernels, current length scales."""
        return prediction_blocks(batch, groups, U, len(self.species), self._hyps["ls2"], self._hyps["ls3"],
                                 threads=self.predict_threads)[:2]

    def _row_blocks(self, groups: Sequence[_Group], r0: int, n_rows: int, U: EnvironmentBatch, driver,
                    n_out: int) -> list[np.ndarray]:
        """``n_out`` arrays (n_rows, width * len(U)): ``driver(batch, label_groups, U)`` (a kernel
        front end returning (rows, len(U), 4) blocks) for the label ``groups`` (rows ``r0`` ..
        ``r0 + n_rows``), evaluated over consecutive runs of groups of at most ~2^22 output
        entries each, so that the (rows, m, 4) blocks never exist for all rows at once (at 50,000
        labels and m = 2,000 that would be 3.2 GB per array).  Each row depends only on its own
        group, so the result does not depend on the runs."""
        w = self._u_width
        m = len(U)
        outs = [np.zeros((n_rows, w * m)) for _ in range(n_out)]
        if not groups or not m:
            return outs
        limit = max(10, (1 << 22) // (4 * m))
        train = self._training_batch()
        run: list[_Group] = []
        rows_in_run = 0
        for k, g in enumerate(groups):
            run.append(g)
            rows_in_run += int((g.rows >= 0).sum())
            if rows_in_run < limit and k < len(groups) - 1:
                continue
            lo = int(min(x.rows[x.rows >= 0].min() for x in run))
            hi = int(max(x.rows.max() for x in run)) + 1
            e0 = int(min(x.envs.min() for x in run))
            e1 = int(max(x.envs.max() for x in run)) + 1
            sub = train if (e0, e1) == (0, len(train)) else train.subset(np.arange(e0, e1))
            blocks = driver(sub, _label_groups(_shift(run, lo, e0)), U)
            for out, K in zip(outs, blocks):
                out[lo - r0:hi - r0] = K[:, :, 0] if w == 1 else K.reshape(len(K), -1)
            del blocks
            run, rows_in_run = [], 0
        return outs

    def _kuu_unit(self):
        """Unit-variance ``(K2_UU, K3_UU)`` at the current length scales (cached)."""
        ls = (self._hyps["ls2"], self._hyps["ls3"])
        if self._k_ls != ls:
            self._k_ls = ls
            self._kfu_log = []
            self._Kfu = (np.zeros((0, 0)), np.zeros((0, 0)))
            self._Kuu = (np.zeros((0, 0)), np.zeros((0, 0)))
        if self._Kuu[0].shape[0] != self._n_inducing * self._u_width:
            U = self._inducing_batch()
            self._Kuu = tuple(0.5 * (K + K.T) for K in self._cov(U, self._u_groups(), U))
        return self._Kuu

    def _cov(self, batch: EnvironmentBatch, groups: LabelGroups, envs: EnvironmentBatch, width: int | None = None):
        """Unit-variance ``(K2, K3)``, (groups.n_rows, width * len(envs)): the covariance of the label
        ``groups`` of ``batch`` with the inducing functionals (``width`` 1: local energy; 4: energy and
        force) of each environment of ``envs``, environment-major -- through the fast prediction
        kernels (:func:`learner_service.kernels.prediction_blocks`)."""
        width = self._u_width if width is None else width
        ls2, ls3 = self._hyps["ls2"], self._hyps["ls3"]
        K2, K3, _, _ = prediction_blocks(batch, groups, envs, len(self.species), ls2, ls3,
                                         threads=self.predict_threads)
        if width == 1:
            return np.ascontiguousarray(K2[:, :, 0]), np.ascontiguousarray(K3[:, :, 0])
        return K2.reshape(len(K2), -1), K3.reshape(len(K3), -1)

    def _groups_below(self, rows: int) -> list[_Group]:
        return [g for g in self._groups if g.rows.max() < rows]

    def _jittered(self, K: np.ndarray) -> np.ndarray:
        K = K.copy()
        K[np.diag_indices(K.shape[0])] *= 1.0 + self.jitter
        return K

    def _kuu_factor(self) -> np.ndarray:
        """Cholesky factor of K̃_UU at the current hyperparameters."""
        U2, U3 = self._kuu_unit()
        h = self._hyps
        return self._cholesky(self._jittered(h["sig2"] ** 2 * U2 + h["sig3"] ** 2 * U3))

    @staticmethod
    def _cholesky(K: np.ndarray) -> np.ndarray:
        try:
            L = cholesky(K, lower=True, check_finite=False)
        except (LinAlgError, ValueError) as exc:
            raise ModelError(_CHOL_HINT) from exc
        if not np.isfinite(L).all():
            raise ModelError(_CHOL_HINT)
        return L

    def _noise_var(self, h: Mapping[str, float]) -> np.ndarray:
        var = np.array([h["noise"] ** 2, h["energy_noise"] ** 2, h["stress_noise"] ** 2])
        return var[np.asarray(self._kinds, dtype=np.int64)]

    def _check_ready(self) -> None:
        if not self._labels:
            raise ModelError("the sparse GP has no training data: add_structure before train/predict")
        if not self._n_inducing:
            raise ModelError("the sparse GP's inducing set is empty: add_inducing (or add_structure with "
                             "inducing='auto' and inducing_per_structure > 0) before train/predict")

    def train(self, optimize: bool = False, max_iterations: int = 200) -> "SparseGaussianProcess":
        """Factorise (QR) for the current data, inducing set and hyperparameters; with ``optimize``
        the hyperparameters are optimised first."""
        self._check_ready()
        if optimize:
            self.optimize(max_iterations=max_iterations)
        self._factorize()
        return self

    def _key(self) -> tuple:
        return (tuple(self._hyps[k] for k in sorted(self._hyps)), len(self._labels), self._n_inducing, self.jitter)

    @serial_blas
    def _factorize(self) -> _Factor:
        self._check_ready()
        key = self._key()
        if self._factor is not None and self._factor.key == key:
            return self._factor
        (F2, F3), (U2, U3) = self._unit_kernels()
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        L = self._cholesky(self._jittered(s2 * U2 + s3 * U3))
        lam = self._noise_var(h)
        isq = 1.0 / np.sqrt(lam)
        n, mu = F2.shape
        A = np.empty((n + mu, mu), order="F")  # LAPACK's order: the QR then works in place
        for lo in range(0, n, 4096):  # A = [Λ^-½ K_fU; Lᵀ] without n x m temporaries
            hi = min(n, lo + 4096)
            np.multiply(s2 * F2[lo:hi] + s3 * F3[lo:hi], isq[lo:hi, None], out=A[lo:hi])
        A[n:] = L.T
        b = self._targets() * isq  # energies less the energy reference (gp.Hyperparameters)
        # Householder QR of A applied to [b; 0] without forming Q (O((n+mu) mu) memory)
        bQ, R = qr_multiply(A, np.concatenate([b, np.zeros(mu)])[None, :], mode="right", overwrite_a=True)
        qtb = bQ[0, :mu]
        R = np.triu(R[:mu, :mu])
        alpha = solve_triangular(R, qtb, lower=False, check_finite=False)
        diagR = np.abs(np.diag(R))
        if not (np.isfinite(alpha).all() and diagR.min() > 0):
            raise ModelError("the sparse GP's QR factor is singular: " + _CHOL_HINT)
        # |b|² − |Qᵀ[b;0]|² = |[b;0] − Aα|² (Aα = QQᵀ[b;0]): the residual form has no cancellation
        resid = b - (s2 * (F2 @ alpha) + s3 * (F3 @ alpha)) * isq
        quad = resid @ resid + np.sum((L.T @ alpha) ** 2)
        lml = (-0.5 * quad - 0.5 * np.log(lam).sum() - np.log(diagR).sum()
               + np.log(np.diag(L)).sum() - 0.5 * n * math.log(2 * math.pi))
        self._factor = _Factor(key, L, R, alpha, float(lml))
        return self._factor

    # ------------------------------------------------------------------ likelihood

    def log_likelihood(self, gradient: bool = False, hyperparameters: Mapping[str, float] | None = None):
        """Log marginal likelihood of the DTC model, log N(y | 0, Q_ff + Λ), and with ``gradient``
        its analytic gradient ordered like :attr:`hyperparameter_names`."""
        if hyperparameters is not None:
            self.set_hyperparameters(hyperparameters)
        self._check_ready()
        if not gradient:
            return self._factorize().lml
        self._check_gradient_memory()
        return self._lml_and_grad(self._hyps)

    def _check_gradient_memory(self) -> None:
        """Refuse, with the numbers and the ways out, a likelihood gradient that cannot fit in the
        memory available now (it would be killed by the kernel half-way); the model is unchanged."""
        n, mu = len(self._labels), self._n_inducing * self._u_width
        need = GRADIENT_ARRAYS * 8 * n * mu
        avail = available_memory()
        if avail is not None and need > avail:
            raise ModelError(
                f"the sparse likelihood gradient at {n} labels x {mu} inducing variables ({self._n_inducing} "
                f"environments x {self._u_width} functionals) needs about {need / 2 ** 30:.1f} GiB "
                f"({GRADIENT_ARRAYS} arrays of n x mu float64) and {avail / 2 ** 30:.1f} GiB are available: "
                f"use learner.sparse.functionals: energy (1 inducing variable per environment instead of 4), "
                f"a smaller learner.sparse.max_inducing, or keep the hyperparameters (learner.optimize.every: 0); "
                f"the model and its hyperparameters are unchanged")

    def _gradient_kernels(self, ls2: float, ls3: float, cache: dict | None = None):
        """Unit-variance ``F2, F3, dF2, dF3`` (K_fU and its d/dls2, d/dls3, n x mu) and ``U2, U3,
        dU2, dU3`` (K_UU likewise) at length scales ``ls2``, ``ls3`` (Å), through the optimised driver;
        kept in ``cache`` (one entry: the last length scales and data sizes) so that evaluations
        that change only signal or noise hyperparameters reuse them."""
        key = (float(ls2), float(ls3), len(self._labels), self._n_inducing, self.inducing_functionals)
        if cache is not None and cache.get("key") == key:
            return cache["kernels"]
        if cache is not None:
            cache.clear()  # free the previous length scales' arrays before forming the new ones
        U = self._inducing_batch()
        w = self._u_width

        def driver(batch, groups, test):
            return inducing_gradient_blocks(batch, groups, test, len(self.species), key[0], key[1],
                                            threads=self.predict_threads)

        out = self._row_blocks(self._groups, 0, len(self._labels), U, driver, 4)
        for K in driver(U, self._u_groups(), U):
            out.append(np.ascontiguousarray(K[:, :, 0]) if w == 1 else K.reshape(len(K), -1))
        for k in range(4, 8):  # K_UU and its derivatives are symmetric up to round-off
            out[k] = 0.5 * (out[k] + out[k].T)
        if cache is not None:
            cache.update(key=key, kernels=tuple(out))
        return tuple(out)

    @serial_blas
    def _lml_and_grad(self, h: Mapping[str, float], cache: dict | None = None):
        """Value and gradient of the log marginal likelihood at hyperparameters ``h``.

        With K = K_fU, K̃ = K̃_UU, Σ = (K̃ + KᵀΛ⁻¹K)⁻¹ = R⁻¹R⁻ᵀ, α = Σ KᵀΛ⁻¹y and a = C⁻¹y =
        Λ⁻¹(y − Kα): Kᵀa = K̃α, so B a = α (B = K̃⁻¹Kᵀ), and C⁻¹Bᵀ = Λ⁻¹KΣ, B C⁻¹ Bᵀ = K̃⁻¹ − Σ.
        Hence W Bᵀ = a αᵀ − Λ⁻¹KΣ and B W Bᵀ = ααᵀ − K̃⁻¹ + Σ (module docstring for W), and each
        kernel hyperparameter costs two O(n mu) contractions; memory: the eight cached kernel
        arrays (four n x mu), K, and the QR's A (or Λ⁻¹KΣ), nothing n x n."""
        F2, F3, dF2, dF3, U2, U3, dU2, dU3 = self._gradient_kernels(h["ls2"], h["ls3"], cache)
        s2, s3 = h["sig2"], h["sig3"]
        L = self._cholesky(self._jittered(s2 ** 2 * U2 + s3 ** 2 * U3))
        lam = self._noise_var(h)
        n, mu = F2.shape
        y = self._targets()
        K = s2 ** 2 * F2
        for lo in range(0, n, 4096):  # no n x m temporary
            K[lo:lo + 4096] += s3 ** 2 * F3[lo:lo + 4096]
        isq = 1.0 / np.sqrt(lam)
        A = np.empty((n + mu, mu), order="F")  # LAPACK's order: the QR then works in place
        np.multiply(K, isq[:, None], out=A[:n])
        A[n:] = L.T
        bQ, R = qr_multiply(A, np.concatenate([y * isq, np.zeros(mu)])[None, :], mode="right", overwrite_a=True)
        del A
        R = np.triu(R[:mu, :mu])
        diagR = np.abs(np.diag(R))
        if not diagR.min() > 0:
            raise ModelError("the sparse GP's QR factor is singular: " + _CHOL_HINT)
        alpha = solve_triangular(R, bQ[0, :mu], lower=False, check_finite=False)
        r = y - K @ alpha  # C⁻¹ y = Λ⁻¹ (y − K_fU α), and yᵀC⁻¹y = |Λ^-½ r|² + |Lᵀα|² (no cancellation)
        value = (-0.5 * (r @ (r / lam) + np.sum((L.T @ alpha) ** 2)) - 0.5 * np.log(lam).sum()
                 - np.log(diagR).sum() + np.log(np.diag(L)).sum() - 0.5 * n * math.log(2 * math.pi))
        a = r / lam
        # Gᵀ = R⁻ᵀ Kᵀ Λ⁻¹ (mu x n, in place of K), then Pᵀ = R⁻¹ Gᵀ = (Λ⁻¹ K Σ)ᵀ in place of Gᵀ
        K *= (1.0 / lam)[:, None]
        Gt = solve_triangular(R, K.T, trans="T", lower=False, check_finite=False, overwrite_b=True)
        del K
        diag_ci = 1.0 / lam - np.einsum("ij,ij->j", Gt, Gt)  # diag C⁻¹
        P = solve_triangular(R, Gt, lower=False, check_finite=False, overwrite_b=True).T  # Λ⁻¹KΣ (n, mu)
        del Gt
        Rinv = solve_triangular(R, np.eye(mu), lower=False, check_finite=False)
        M = np.outer(alpha, alpha) - cho_solve((L, True), np.eye(mu), check_finite=False) + Rinv @ Rinv.T  # B W Bᵀ

        def tr_wb(X):  # tr(W ∂K B) for ∂K = X: aᵀ X α − <Λ⁻¹KΣ, X>
            return a @ (X @ alpha) - np.einsum("ij,ij->", P, X)

        diag_w = a * a - diag_ci
        kinds = np.asarray(self._kinds)
        grad = []
        for name in self.hyperparameter_names:
            if name in ("sig2", "sig3"):
                s = h[name]
                dF, dU = (F2, U2) if name == "sig2" else (F3, U3)
                g = 2 * s * tr_wb(dF) - 0.5 * np.vdot(M, self._jittered(2 * s * dU))
            elif name in ("ls2", "ls3"):
                s = s2 if name == "ls2" else s3
                dF, dU = (dF2, dU2) if name == "ls2" else (dF3, dU3)
                g = s * s * tr_wb(dF) - 0.5 * np.vdot(M, self._jittered(s * s * dU))
            else:
                g = 0.5 * diag_w[kinds == _NOISE_KIND[name]].sum() * 2 * h[name]
            grad.append(float(g))
        return float(value), np.asarray(grad)

    def optimize(self, max_iterations: int = 200, fix: Iterable[str] = (),
                 bounds: Mapping[str, tuple[float, float]] | None = None, gtol: float = 1e-4, ftol: float = 1e-10,
                 progress: Callable[[int, float, dict], None] | None = None,
                 space: str = "log") -> OptimizationResult:
        """Maximise the DTC log marginal likelihood with L-BFGS-B over log-hyperparameters
        (``space="linear"``: over θ, as the exact GP's option of that name; no upper edges then) (boxes
        :data:`learner_service.gp.DEFAULT_BOUNDS` unless ``bounds``); the inducing set is held.
        Reaching ``max_iterations`` is reported as *not* converged; hyperparameters that end on an
        edge of their box are named in ``at_bounds``."""
        self._check_ready()
        if max_iterations < 1:
            raise InvalidInput("max_iterations must be >= 1")
        unknown = set(fix) - set(self._hyps)
        if unknown:
            raise InvalidInput(f"cannot fix unknown hyperparameters {sorted(unknown)}")
        names = [k for k in self.hyperparameter_names if k not in set(fix)]
        if not names:
            raise InvalidInput("every hyperparameter is fixed; nothing to optimise")
        if space not in ("log", "linear"):
            raise InvalidInput(f"space must be 'log' or 'linear', got {space!r}")
        self._check_gradient_memory()
        log_space = space == "log"
        to_x = np.log if log_space else np.asarray
        from_x = math.exp if log_space else float
        box = dict(DEFAULT_BOUNDS)
        if not log_space:
            box = {k: (lo, math.inf) for k, (lo, _) in box.items()}
        box.update(bounds or {})
        all_names = list(self.hyperparameter_names)
        idx = [all_names.index(k) for k in names]
        x0 = to_x(np.array([min(max(self._hyps[k], box[k][0]), box[k][1]) for k in names], dtype=float))
        xb = [tuple(float(v) for v in to_x(np.array(box[k], dtype=float))) for k in names]
        best = {"f": math.inf, "x": x0.copy()}
        evals = [0]
        cache: dict = {}  # the kernels at the last length scales (reused when only sig/noise moved)
        t0 = time.perf_counter()

        def fun(x):
            evals[0] += 1
            penalty = (abs(best["f"]) + 1e6 if math.isfinite(best["f"]) else 1e30), np.zeros(len(x))
            if not np.isfinite(x).all():
                return penalty
            hyps = dict(self._hyps)
            hyps.update({k: from_x(v) for k, v in zip(names, x)})
            try:
                value, grad = self._lml_and_grad(hyps, cache)
            except ModelError:
                return penalty
            if not (math.isfinite(value) and np.isfinite(grad).all()):  # K_UU near-singular at these values
                return penalty
            f = -value
            if f < best["f"]:
                best.update(f=f, x=np.array(x))
            return f, -grad[idx] * (np.exp(x) if log_space else 1.0)

        it = [0]

        def callback(xk):
            it[0] += 1
            if progress is not None:
                progress(it[0], -best["f"], {k: from_x(v) for k, v in zip(names, xk)})

        res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=xb, callback=callback,
                       options={"maxiter": int(max_iterations), "gtol": gtol, "ftol": ftol,
                                "maxfun": 20 * int(max_iterations) + 20, "maxls": 30})
        if not math.isfinite(best["f"]):
            raise ModelError("no hyperparameters tried gave a positive-definite K_UU; " + _CHOL_HINT)
        self._hyps.update({k: from_x(v) for k, v in zip(names, best["x"])})
        self._version += 1
        value, grad = self._lml_and_grad(self._hyps, cache)
        cache.clear()
        hit_cap = int(res.nit) >= max_iterations or res.status == 1
        converged = bool(res.success) and not hit_cap
        message = str(res.message)
        if hit_cap:
            message = f"iteration limit {max_iterations} reached before convergence ({message})"
        at_bounds = {}
        for k in names:
            lo, hi = box[k]
            if self._hyps[k] <= lo * (1 + BOUND_RTOL):
                at_bounds[k] = "lower"
            elif self._hyps[k] >= hi * (1 - BOUND_RTOL):
                at_bounds[k] = "upper"
        result_bounds = {k: tuple(box[k]) for k in names}
        if at_bounds:
            message += f"; on the edge of the box: {_bound_note(at_bounds, result_bounds)}"
        return OptimizationResult(converged=converged, iterations=int(res.nit), evaluations=evals[0], message=message,
                                  log_likelihood=float(value), gradient=dict(zip(all_names, map(float, grad))),
                                  hyperparameters={k: self._hyps[k] for k in all_names},
                                  max_iterations=int(max_iterations), seconds=time.perf_counter() - t0,
                                  at_bounds=at_bounds, bounds=result_bounds)

    # ------------------------------------------------------------------ prediction

    def predict(self, atoms, stress: bool = False, condition_on: Sequence[tuple] = ()) -> Prediction:
        """Forces (n, 3) eV/Å, per-component epistemic σ (DTC), local and total energy (eV) and
        with ``stress`` the stress (6,) eV/Å^3 of ``atoms``.  ``condition_on``: ``[(atoms,
        atom_indices), ...]`` force labels (noise σn) to condition σ on as if already added (no new
        inducing environments; a GP variance does not depend on label values); the mean stays this
        model's.  Does not change the model."""
        return self._predict(atoms, stress, energy_std=False, condition_on=condition_on).prediction

    def predict_detailed(self, atoms, stress: bool = False) -> SparsePrediction:
        """:meth:`predict` plus the DTC σ of the total and local energies (eV); costs an extra
        O(n²) environment pairs for the prior of the total energy."""
        return self._predict(atoms, stress, energy_std=True)

    @property
    def ready(self) -> bool:
        """Whether the model has labels and inducing environments (else it predicts its prior)."""
        return bool(self._labels) and self._n_inducing > 0

    @serial_blas
    def _predict(self, atoms, stress: bool, energy_std: bool, condition_on: Sequence[tuple] = ()) -> SparsePrediction:
        n = len(atoms)
        cell = atoms.get_cell().array
        pbc = atoms.get_pbc()
        volume = abs(np.linalg.det(cell)) if np.all(pbc) else 0.0
        if stress and volume < 1e-12:
            raise InvalidInput("stress needs a fully periodic cell with non-zero volume")
        envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), cell, pbc, self.cutoffs)
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        ready = self.ready
        if ready:
            st = self._factorize()
            R = self._conditioned_R(st.R, condition_on) if condition_on else st.R
            U, ug = self._inducing_batch(), self._u_groups()
        else:  # no data or no inducing set yet: the prior (mean 0, σ the prior σ), as the exact GP's empty model
            U, ug = EnvironmentBatch.empty(), self._u_groups(0, 0)
        # covariances of the inducing functionals with (E, Fx, Fy, Fz) of every test environment
        k2, k3, p2, p3 = prediction_blocks(U, ug, envs, len(self.species), h["ls2"], h["ls3"],
                                           threads=self.predict_threads)
        Ks = s2 * k2 + s3 * k3  # (mu, n, 4)
        mu = Ks.shape[0]
        mean = (Ks.reshape(mu, 4 * n).T @ st.alpha).reshape(n, 4) if ready else np.zeros((n, 4))
        cols = [Ks[:, :, 1:4].reshape(mu, 3 * n)]
        if energy_std:  # columns: 3n force components, n local energies, 1 total energy
            cols += [Ks[:, :, 0], Ks[:, :, 0].sum(axis=1)[:, None]]
        cols = np.concatenate(cols, axis=1)
        if ready:
            V1 = solve_triangular(st.L, cols, lower=True, check_finite=False)
            V2 = solve_triangular(R, cols, trans="T", lower=False, check_finite=False)
        else:
            V1 = V2 = np.zeros((0, cols.shape[1]))
        explained = np.einsum("ij,ij->j", V1, V1) - np.einsum("ij,ij->j", V2, V2)
        # each atom's 3×3 force covariance: its prior block (prediction_blocks) minus the explained block
        pf = s2 * p2 + s3 * p3  # (n, 3, 3)
        W1, W2 = V1[:, :3 * n].reshape(-1, n, 3), V2[:, :3 * n].reshape(-1, n, 3)
        force_cov = pf - np.einsum("kia,kib->iab", W1, W1) + np.einsum("kia,kib->iab", W2, W2)
        force_cov = 0.5 * (force_cov + np.swapaxes(force_cov, 1, 2))
        prior = [np.diagonal(pf, axis1=1, axis2=2).ravel()]
        if energy_std:
            g = LabelGroups.per_environment(np.arange(n), energy=True, force=False)
            e2, e3, _, _ = prediction_blocks(envs, g, envs, len(self.species), h["ls2"], h["ls3"],
                                             threads=self.predict_threads)
            Kee = s2 * e2[:, :, 0] + s3 * e3[:, :, 0]
            prior += [np.diag(Kee), [0.5 * (Kee + Kee.T).sum()]]
        var = np.concatenate(prior) - explained
        force_var = var[:3 * n].reshape(n, 3)
        local = mean[:, 0] + self._reference_of(envs.center_species)
        stress_out = None
        if stress:
            if ready:
                sg = LabelGroups.per_environment(np.arange(n), energy=False, force=False, stress=True)
                c2, c3 = kernel_blocks(U, ug, sg, h["ls2"], h["ls3"], batch_b=envs)
                partial = ((s2 * c2 + s3 * c3).T @ st.alpha).reshape(n, 6)
                stress_out = -partial.sum(axis=0) / volume
            else:
                stress_out = np.zeros(6)
        pred = Prediction(forces=mean[:, 1:4].copy(), force_std=np.sqrt(np.abs(force_var)), force_var=force_var,
                          energy=float(local.sum()), local_energies=local, stress=stress_out, noise=self.noise,
                          model_version=self._version, force_cov=force_cov, atom_std=atom_std_of(force_cov))
        if not energy_std:
            return SparsePrediction(pred, float("nan"), np.full(n, np.nan))
        return SparsePrediction(pred, float(math.sqrt(abs(var[-1]))), np.sqrt(np.abs(var[3 * n:4 * n])))

    def _conditioned_R(self, R: np.ndarray, condition_on: Sequence[tuple]) -> np.ndarray:
        """R of A with the rows σn⁻¹ K_qU of the force labels ``condition_on`` appended:
        R' = triu(qr([R; B])) with B = σn⁻¹ K_qU, since [A; B]ᵀ[A; B] = AᵀA + BᵀB = RᵀR + BᵀB."""
        h = self._hyps
        rows = [R]
        for k, item in enumerate(condition_on):
            try:
                c_atoms, c_idx = item
            except (TypeError, ValueError):
                raise InvalidInput(f"condition_on[{k}] must be (atoms, atom_indices)") from None
            c_idx = np.asarray(list(c_idx), dtype=np.int64)
            if not len(c_idx):
                continue
            envs = build_environments(c_atoms.get_positions(), c_atoms.get_atomic_numbers(),
                                      c_atoms.get_cell().array, c_atoms.get_pbc(), self.cutoffs, c_idx)
            g = LabelGroups.per_environment(np.arange(len(envs)), energy=False, force=True)
            k2, k3 = self._cov(envs, g, self._inducing_batch())
            rows.append((h["sig2"] ** 2 * k2 + h["sig3"] ** 2 * k3) / h["noise"])
        if len(rows) == 1:
            return R
        mu = R.shape[0]
        return np.triu(qr(np.vstack(rows), mode="r", overwrite_a=True, check_finite=False)[0][:mu, :mu])

    # ------------------------------------------------------------------ the LearnerModel interface

    kind = "sparse"
    format_name = FORMAT_NAME

    def settings(self) -> dict:
        """The constructor settings beyond species, cutoffs and hyperparameters (JSON-ready)."""
        return {"inducing_functionals": self.inducing_functionals, "jitter": self.jitter,
                "inducing_per_structure": self.inducing_per_structure,
                "inducing_tolerance": self.inducing_tolerance, "max_inducing": self.max_inducing,
                "inducing_rule": self.inducing_rule}

    @property
    def n_energy_labels(self) -> int:
        return int(sum(1 for k in self._kinds if k == _ENERGY))

    def training_environments(self) -> EnvironmentBatch:
        """Every stored training environment (force environments and those of energy/stress labels)."""
        return self._training_batch()

    def add_frame(self, atoms, forces=None, selected: Iterable[int] = (), energy: float | None = None,
                  stress=None) -> int:
        """One oracle call's frame: *every* force (all atoms), the energy and the stress given
        become labels; the inducing environments added are the atoms ``selected`` by the
        acquisition (``inducing_rule="acquisition"``) or the model's own residual-variance pick
        among all atoms (``"variance"``), never more than ``max_inducing`` in total.  Returns
        the number of labels added."""
        selected = np.asarray(list(selected), dtype=np.int64)
        if self.inducing_rule == "acquisition":
            pick = selected
        else:
            envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                                      atoms.get_pbc(), self.cutoffs)
            pick = self.select_inducing(envs)
        if self.max_inducing is not None:
            pick = pick[:max(0, self.max_inducing - self._n_inducing)]
        return self.add_structure(atoms, forces=forces, atom_indices=None, energy=energy, stress=stress,
                                  inducing=[int(i) for i in pick])

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def clone(self) -> "SparseGaussianProcess":
        """A copy for a writer: shares every array (never modified in place, only replaced) and
        copies the containers that adding data or setting hyperparameters mutate."""
        new = copy.copy(self)
        new._hyps = dict(self._hyps)
        new._train_parts = list(self._train_parts)
        new._inducing_parts = list(self._inducing_parts)
        new._groups = list(self._groups)
        new._labels = list(self._labels)
        new._kinds = list(self._kinds)
        new._kfu_log = list(self._kfu_log)
        return new

    def data_counts(self) -> dict:
        """Sizes of the data (labels, label groups, stored environments, force environments,
        inducing environments): a prefix of the data is named by these."""
        return {"labels": len(self._labels), "groups": len(self._groups), "environments": self._n_train_envs,
                "force_environments": self._n_force_envs, "inducing": self._n_inducing}

    def truncated(self, counts, hyperparameters, history) -> "SparseGaussianProcess":
        """Not available for the sparse model (its factor is not a leading block of a later one):
        :class:`ModelError`, so the store rebuilds the checkpoint from its data."""
        raise ModelError("the sparse GP restores a checkpoint by rebuilding it from its data")

    @property
    def factor_history(self) -> dict:
        """How the K_fU cache was built since its last reset (JSON-ready): the ``(rows, inducing)``
        at each extension, at the current length scales.  The factor itself is one QR of the
        cache, so replaying these blocks (:meth:`rebuild_factor`) makes a rebuilt model predict bit
        for bit like this one."""
        current = self._k_ls == (self._hyps["ls2"], self._hyps["ls3"])
        return {"kind": self.kind, "kfu": [[r, m] for r, m in self._kfu_log] if current else []}

    def rebuild_factor(self, hyperparameters: Mapping[str, float], history: Mapping,
                       progress: Callable[[str], None] | None = None) -> None:
        """Set ``hyperparameters`` (no version change) and rebuild the K_fU cache in the blocks
        ``history`` (:attr:`factor_history` of the model that wrote it) lists, on the same data."""
        self._set_hyps(hyperparameters)
        if history.get("kind", self.kind) != self.kind:
            raise ModelError(f"the checkpoint's factor history is of a {history.get('kind')} model, not a sparse one")
        log = [(int(r), int(m)) for r, m in history.get("kfu") or []]
        if log and (log[-1][0] > len(self._labels) or log[-1][1] > self._n_inducing):
            raise ModelError(f"factor history reaches {log[-1]} (rows, inducing) but the data have "
                             f"({len(self._labels)}, {self._n_inducing})")
        self._k_ls = None  # (a factor loaded with a base file stays: its key says whether it is current)
        self._kuu_unit()
        t0 = time.perf_counter()
        for k, (r, m) in enumerate(log):
            self._grow_kfu(r, m)
            if progress and (k % 20 == 19 or k == len(log) - 1):
                progress(f"K_fU block {k + 1}/{len(log)} ({r} rows, {m} inducing, {time.perf_counter() - t0:.1f} s)")

    def kernel_distances(self, atoms, atom_indices: Iterable[int] | None = None, rows: Iterable[int] | None = None,
                         train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Distances in the local-energy kernel, eV, as :meth:`GaussianProcess.kernel_distances`,
        with ``d_train[i]`` the distance to the nearest *inducing* environment (the sparse
        model's representers; ``inf`` without any)."""
        idx, pos = distance_request(len(atoms), atom_indices, rows)
        m = len(idx)
        if m == 0:
            return np.zeros(0), np.zeros((len(pos), 0))
        h = self._hyps
        s2, s3 = h["sig2"] ** 2, h["sig3"] ** 2
        envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                                  atoms.get_pbc(), self.cutoffs, idx)
        kxx, d_within = within_distances(envs, pos, s2, s3, h["ls2"], h["ls3"], len(self.species),
                                         self.predict_threads)
        if not train:
            return np.zeros(0), d_within
        if not self._n_inducing:
            return np.full(m, np.inf), d_within
        U = self._inducing_batch()
        t2, t3 = self._cov(U, LabelGroups.per_environment(np.arange(self._n_inducing), energy=True, force=False),
                           envs, 1)
        kt = s2 * t2 + s3 * t3  # (M, m) eV²
        U2, U3 = self._kuu_unit()  # the local energy is the first functional of each inducing environment
        w = self._u_width
        kyy = s2 * np.diag(U2)[::w] + s3 * np.diag(U3)[::w]
        d2 = kyy[:, None] + kxx[None, :] - 2.0 * kt
        return np.sqrt(np.maximum(d2.min(axis=0), 0.0)), d_within

    # ------------------------------------------------------------------ persistence

    def save(self, path) -> Path:
        """Write the model (training data, inducing environments, hyperparameters; .npz with a JSON
        header, format ``epicycle-sgp`` version 1) and, if current, the factor (L, R, α), so that the
        reloaded model predicts bit for bit alike; kernel caches are recomputed when needed."""
        path = Path(path)
        meta = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "species": list(self.species),
            "cutoffs": [self.cutoffs.r2, self.cutoffs.r3], "pair_cutoffs": self.cutoffs.pair_dict(),
            "hyperparameters": self.hyperparameters, "inducing_functionals": self.inducing_functionals,
            "jitter": self.jitter, "inducing_per_structure": self.inducing_per_structure,
            "inducing_tolerance": self.inducing_tolerance, "max_inducing": self.max_inducing,
            "inducing_rule": self.inducing_rule, "n_environments": self._n_force_envs,
            "n_labels": self.n_labels, "n_inducing": self._n_inducing, "units": HYPERPARAMETER_UNITS,
        }
        arrays = {f"env_{k}": v for k, v in self._training_batch().arrays().items()}
        arrays.update({f"ind_{k}": v for k, v in self._inducing_batch().arrays().items()})
        g = self._groups
        arrays["labels"] = self.labels
        arrays["label_kinds"] = np.asarray(self._kinds, dtype=np.int64)
        arrays["group_kind"] = np.array([0 if x.kind == "force" else 1 for x in g], dtype=np.int64)
        arrays["group_ptr"] = np.concatenate([[0], np.cumsum([len(x.envs) for x in g])]).astype(np.int64)
        arrays["group_env"] = np.concatenate([x.envs for x in g]) if g else np.zeros(0, np.int64)
        arrays["group_rows"] = np.stack([x.rows for x in g]) if g else np.zeros((0, N_FUNCTIONALS), np.int64)
        arrays["group_scale"] = np.stack([x.scale for x in g]) if g else np.zeros((0, N_FUNCTIONALS))
        st = self._factor
        if st is not None and st.key == self._key():
            # the factor as built (its K_fU possibly in chunks as data arrived, which the fast kernels
            # may round differently from one call): a reloaded model then predicts bit for bit alike
            arrays.update(factor_L=st.L, factor_R=st.R, factor_alpha=st.alpha, factor_lml=np.array([st.lml]))
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, progress: Callable[[str], None] | None = None) -> "SparseGaussianProcess":
        from .mapped import load_tagged_npz

        path = Path(path)
        data, meta = load_tagged_npz(path, FORMAT_NAME, "sparse GP model")
        if meta.get("format_version") != FORMAT_VERSION:
            raise InvalidInput(f"{path} has sparse model format_version {meta.get('format_version')!r}; "
                               f"this Epicycle reads version {FORMAT_VERSION}")
        sgp = cls(meta["species"], meta["cutoffs"], hyperparameters=meta["hyperparameters"],
                  pair_cutoffs=Cutoffs.parse_pair_dict(meta.get("pair_cutoffs")),
                  inducing_functionals=meta["inducing_functionals"], jitter=meta["jitter"],
                  inducing_per_structure=meta["inducing_per_structure"],
                  inducing_tolerance=meta["inducing_tolerance"], max_inducing=meta.get("max_inducing"),
                  inducing_rule=meta.get("inducing_rule", "acquisition"))
        sgp._train = EnvironmentBatch.from_arrays({k[4:]: data[k] for k in data.files if k.startswith("env_")})
        sgp._n_train_envs = len(sgp._train)
        sgp._inducing = EnvironmentBatch.from_arrays({k[4:]: data[k] for k in data.files if k.startswith("ind_")})
        sgp._n_inducing = len(sgp._inducing)
        ptr, kinds = data["group_ptr"], data["group_kind"]
        for i in range(len(kinds)):
            sgp._groups.append(_Group("force" if kinds[i] == 0 else "structure", data["group_env"][ptr[i]:ptr[i + 1]],
                                      data["group_rows"][i], data["group_scale"][i]))
        sgp._labels = data["labels"].tolist()
        sgp._kinds = data["label_kinds"].tolist()
        sgp._n_force_envs = int(meta["n_environments"])
        if "factor_L" in data.files:
            sgp._factor = _Factor(sgp._key(), data["factor_L"], data["factor_R"], data["factor_alpha"],
                                  float(data["factor_lml"][0]))
        sgp._version = 1
        return sgp

    def __repr__(self) -> str:
        hyps = ", ".join(f"{k}={self._hyps[k]:.4g}" for k in self.hyperparameter_names)
        return (f"SparseGaussianProcess(species={list(self.species)}, {self.n_labels} labels, "
                f"{self._n_inducing} inducing environments ({self.inducing_functionals}), {hyps})")
