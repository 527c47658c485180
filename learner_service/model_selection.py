"""Hyperparameters that generalise (issue 13): data-derived priors, MAP with restarts, a held-out check.

Type-II maximum likelihood (ML-II, seed 004 Eq. 6) on a few noise-free frames can prefer
hyperparameters that interpolate the training labels but generalise badly.  This module adds

* :class:`HyperPrior` -- independent normal priors on log θ (log-normal on θ) whose centres are
  derived from the training data by :func:`data_prior` (see that function for each centre,
  width and why; docs/configuration.md repeats them);
* :func:`log_prior` -- the prior's log density over u = log θ and its exact gradient;
* :func:`map_optimize` -- maximises ``log p(y | θ) + log p(log θ)`` (the MAP objective; with
  ``prior=None`` plain ML-II) by a *nested* search: the length scales (ls2, ls3) in an outer
  L-BFGS-B, and for every pair of length scales the signal variances and noises in an inner
  L-BFGS-B on the unit-variance kernels K2, K3 computed once for that pair (K_y = sig2² K2 +
  sig3² K3 + noise, so the inner evaluations cost a Cholesky factorisation, not a kernel
  build).  The outer gradient is the envelope gradient ∂J/∂log ls at the inner optimum
  (Eq. 7 with dK/dls, plus the prior's term).  Restarts: the data-derived centre, the model's
  current values and ``restarts`` draws from the prior (seeded), screened in the cheap inner
  space, the best started in the outer search;
* the selection rule (:func:`map_optimize`): every candidate (the start values, each screened
  restart, the outer optima) is scored by leave-one-frame-out cross-validation in closed form
  (:func:`block_cv_metrics`; frames recovered from the data by :func:`training_frames`), the
  criterion the worst held-out frame's force RMSE; the best is kept if it beats the start values
  by ``validation_tolerance``, else the start values stay.  Optional held-out frames
  (``validation``, :func:`validation_metrics`) are extra folds.

Units: sig2, sig3 eV; ls2, ls3 Å; noise eV/Å; energy_noise eV; stress_noise eV/Å^3.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.linalg import lapack
from scipy.optimize import minimize

from protos.errors import InvalidInput, ModelError

from .defaults import HYPERPARAMETER_UNITS
from .gp import (_CHOLESKY_HINT, _ENERGY, _FORCE, _STRESS, BOUND_RTOL, DEFAULT_BOUNDS, GaussianProcess,
                 OptimizationResult, _bound_note, serial_blas)
from .kernels import force_kernel_blocks

__all__ = ["HyperPrior", "data_prior", "log_prior", "map_optimize", "validation_metrics", "holdout_split", "DataScales",
           "data_scales", "training_frames", "row_frames", "reciprocal_bonds", "cv_blocks", "block_cv_metrics",
           "lofo_metrics"]

_SIGNALS = ("sig2", "sig3")
_LENGTHS = ("ls2", "ls3")
_NOISES = ("noise", "energy_noise", "stress_noise")
_NOISE_KIND = {"noise": _FORCE, "energy_noise": _ENERGY, "stress_noise": _STRESS}

# -- the prior's rules (docs/configuration.md "Hyperparameter priors" repeats them) -----------
#: ls2 centre = LS2_SPREAD_FRACTION x the standard deviation of all pair distances within r2
LS2_SPREAD_FRACTION = 0.5
#: ls3 centre = LS3_SPREAD_FRACTION x the standard deviation of the triplets' three sides within r3
LS3_SPREAD_FRACTION = 1.0
#: neither length-scale centre below this fraction of the nearest-neighbour distance
LS_MIN_NN_FRACTION = 0.1
#: share of the labels' mean square force assigned to the 2-body (rest: 3-body) prior variance
TWO_BODY_SHARE = 0.8
#: noise centre = NOISE_FRACTION x rms force, at least NOISE_FLOOR eV/Å
NOISE_FRACTION = 0.02
NOISE_FLOOR = 0.005
#: widths (standard deviations of log θ)
WIDTH_LENGTH = 1.0
WIDTH_SIGNAL = 1.5
WIDTH_NOISE = 1.0
WIDTH_ENERGY_STRESS_NOISE = 1.5


@dataclass(frozen=True)
class DataScales:
    """Length and force scales of a training set (Å, eV/Å)."""

    nearest_neighbour: float   # median over environments of the nearest pair distance, Å
    pair_spread: float         # std of all pair distances within r2, Å
    triplet_spread: float      # std of the three sides of all triplets within r3, Å
    force_rms: float           # root mean square force component of the labels, eV/Å
    n_force_labels: int


def data_scales(gp: GaussianProcess) -> DataScales:
    """:class:`DataScales` of the model's training environments and force labels."""
    batch = gp._training_batch()
    if not len(batch):
        raise ModelError("the model has no training data: the data-derived prior needs some")
    off = batch.bond_offsets
    nn = [float(batch.bond_r[off[i]:off[i + 1]].min()) for i in range(len(batch)) if off[i + 1] > off[i]]
    if not nn:
        raise ModelError("no training environment has a neighbour within r2: cannot derive length scales")
    kinds = np.asarray(gp._kinds)
    forces = gp.labels[kinds == _FORCE]
    if forces.size == 0:
        raise ModelError("the data-derived prior needs force labels")
    trip = batch.trip_r.ravel()
    return DataScales(nearest_neighbour=float(np.median(nn)), pair_spread=float(np.std(batch.bond_r)),
                      triplet_spread=float(np.std(trip)) if trip.size else 0.0,
                      force_rms=float(np.sqrt(np.mean(forces ** 2))), n_force_labels=int(forces.size))


@dataclass(frozen=True)
class HyperPrior:
    """Independent normal priors on u = log θ: ``centre[name]`` (θ units, see
    HYPERPARAMETER_UNITS) and ``width[name]`` (standard deviation of log θ, dimensionless).
    ``why`` documents each centre for reports."""

    centre: Mapping[str, float]
    width: Mapping[str, float]
    why: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> tuple[str, ...]:
        return tuple(self.centre)

    def describe(self) -> list[str]:
        out = []
        for n in self.centre:
            out.append(f"{n:13s} centre {self.centre[n]:.4g} {HYPERPARAMETER_UNITS.get(n, '')}, width x{math.exp(self.width[n]):.2f} "
                       f"(σ of log = {self.width[n]:.2f}): {self.why.get(n, '')}")
        return out


def log_prior(prior: HyperPrior | None, hyps: Mapping[str, float], names: Sequence[str]):
    """``(log p(u), d log p / d u)`` for u = log θ of ``names`` (a name the prior lacks, or
    ``prior=None``, contributes nothing).  log p(u) = Σ -(u - μ)²/(2 s²) - log(s √(2π))."""
    value = 0.0
    grad = np.zeros(len(names))
    if prior is None:
        return value, grad
    for i, n in enumerate(names):
        if n not in prior.centre:
            continue
        u, mu, s = math.log(hyps[n]), math.log(prior.centre[n]), prior.width[n]
        value += -0.5 * ((u - mu) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
        grad[i] = -(u - mu) / s ** 2
    return value, grad


def _mean_force_diag(gp: GaussianProcess, ls2: float, ls3: float, max_envs: int = 24) -> tuple[float, float]:
    """Mean unit-variance prior variance of a force component, 2- and 3-body, over (at most
    ``max_envs`` evenly spaced) force training environments."""
    envs = gp._force_label_envs()
    if envs is None:  # mixed data: the force groups' environments
        envs = np.array([g.envs[0] for g in gp._groups if g.kind == "force"], dtype=np.int64)
    if len(envs) == 0:
        raise ModelError("the data-derived prior needs force labels")
    pick = envs[np.linspace(0, len(envs) - 1, min(max_envs, len(envs))).astype(int)]
    K2, K3 = force_kernel_blocks(gp._training_batch(), len(gp.species), pick, None, ls2, ls3)
    return float(np.mean(np.diag(K2))), float(np.mean(np.diag(K3)))


def data_prior(gp: GaussianProcess) -> HyperPrior:
    """The data-derived prior of a model with training data.

    * ls2 (Å): centre ``LS2_SPREAD_FRACTION`` (0.5) x std of all pair distances within r2,
      at least 0.1 x the nearest-neighbour distance; width 1.0 in log (x2.7 per σ).  The
      2-body kernel compares pair distances: a length scale near the spread of the pair
      distances resolves neighbour shells but treats the small displacements of one shell
      smoothly.  (32-atom Al, ±5 % perturbations, r2 = 6 Å: 0.51 Å.)
    * ls3 (Å): centre ``LS3_SPREAD_FRACTION`` (1.0) x std of the triplets' sides within r3
      (same floor); width 1.0.  (Same Al set, r3 = 4 Å: 0.37 Å.)
    * sig2, sig3 (eV): centres such that the prior variance of a force component at the
      centre length scales is ``TWO_BODY_SHARE`` (0.8) resp. 0.2 of the labels' mean square
      force (the kernel's mean force diagonal is computed at the centre length scales); width
      1.5 (x4.5 per σ): the split between 2- and 3-body is not known in advance.
    * noise (eV/Å): centre ``NOISE_FRACTION`` (2 %) of the rms force, at least ``NOISE_FLOOR``
      (5 meV/Å, about the force convergence of a converged DFT calculation); width 1.0.  Keeps
      σn off its 1 meV/Å box floor on noise-free labels unless the data insist.
    * energy_noise (eV), stress_noise (eV/Å^3): centres the model's defaults (0.01 eV,
      0.001 eV/Å^3); width 1.5.
    """
    sc = data_scales(gp)
    floor = LS_MIN_NN_FRACTION * sc.nearest_neighbour
    ls2 = max(LS2_SPREAD_FRACTION * sc.pair_spread, floor)
    ls3 = max(LS3_SPREAD_FRACTION * sc.triplet_spread, floor)
    d2, d3 = _mean_force_diag(gp, ls2, ls3)
    f2 = sc.force_rms ** 2
    sig2 = math.sqrt(TWO_BODY_SHARE * f2 / d2) if d2 > 0 else 1.0
    sig3 = math.sqrt((1 - TWO_BODY_SHARE) * f2 / d3) if d3 > 0 else 0.1 * sig2
    noise = max(NOISE_FRACTION * sc.force_rms, NOISE_FLOOR)
    centre = {"sig2": sig2, "ls2": ls2, "sig3": sig3, "ls3": ls3, "noise": noise,
              "energy_noise": 0.01, "stress_noise": 0.001}
    width = {"sig2": WIDTH_SIGNAL, "ls2": WIDTH_LENGTH, "sig3": WIDTH_SIGNAL, "ls3": WIDTH_LENGTH,
             "noise": WIDTH_NOISE, "energy_noise": WIDTH_ENERGY_STRESS_NOISE,
             "stress_noise": WIDTH_ENERGY_STRESS_NOISE}
    why = {
        "ls2": f"{LS2_SPREAD_FRACTION} x std of pair distances within r2 ({sc.pair_spread:.3f} Å)",
        "ls3": f"{LS3_SPREAD_FRACTION} x std of triplet sides within r3 ({sc.triplet_spread:.3f} Å)",
        "sig2": f"2-body prior force variance = {TWO_BODY_SHARE} x mean square force ({sc.force_rms:.3f} eV/Å rms)",
        "sig3": f"3-body prior force variance = {1 - TWO_BODY_SHARE:.1f} x mean square force",
        "noise": f"{NOISE_FRACTION} x rms force, floor {NOISE_FLOOR} eV/Å",
        "energy_noise": "model default", "stress_noise": "model default",
    }
    return HyperPrior(centre, width, why)


# ---------------------------------------------------------------------------
# the inner problem: signal variances and noises at fixed kernels
# ---------------------------------------------------------------------------


@dataclass
class _Kernels:
    """Unit-variance kernels (and their length-scale derivatives) of some training rows."""

    ls: tuple
    K2: np.ndarray
    K3: np.ndarray
    dK2: np.ndarray
    dK3: np.ndarray
    y: np.ndarray
    kinds: np.ndarray
    frames: np.ndarray | None = None   # frame id of every row (:func:`row_frames`)
    blocks: list | None = None         # the cross-validation's held-out blocks of rows (:func:`cv_blocks`)


def _factor_eval(kern: _Kernels, hyps: Mapping[str, float], need_inverse: bool = True):
    """lml and the pieces of its gradient at ``hyps`` on ``kern``: returns ``(lml, alpha,
    Kinv)``, Kinv = K_y^-1 as its lower triangle (upper zero; see :func:`_trace_w`), None
    without ``need_inverse``.  Raises ModelError if K_y is not positive definite.  K_y is formed
    in Fortran order from the (symmetric) kernels' transposes, so LAPACK works in place."""
    n = len(kern.y)
    noise = np.array([hyps["noise"] ** 2, hyps.get("energy_noise", 0.01) ** 2, hyps.get("stress_noise", 1e-3) ** 2])
    Ky = hyps["sig2"] ** 2 * kern.K2.T
    Ky += hyps["sig3"] ** 2 * kern.K3.T
    Ky[np.diag_indices(n)] += noise[kern.kinds]
    L, info = lapack.dpotrf(Ky, lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.isfinite(np.diag(L)).all():
        raise ModelError(_CHOLESKY_HINT)
    alpha, info = lapack.dpotrs(L, kern.y, lower=1)
    lml = float(-0.5 * kern.y @ alpha - np.log(np.diag(L)).sum() - 0.5 * n * math.log(2 * math.pi))
    if not need_inverse:
        return lml, alpha, None
    Kinv, info = lapack.dpotri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise ModelError(_CHOLESKY_HINT)
    return lml, alpha, Kinv


def _trace_w(alpha, Kinv, M) -> float:
    """tr(W M) with W = alpha alpha^T - K_y^-1 (Eq. 7) for symmetric M, from the lower triangle
    ``Kinv`` of K_y^-1 (upper triangle zero): tr(K_y^-1 M) = 2 <tril, M> - <diag, diag M>."""
    tr = 2.0 * np.vdot(Kinv, M) - float(np.diag(Kinv) @ np.diag(M))
    return float(alpha @ M @ alpha - tr)


def _grad_log(kern: _Kernels, hyps: Mapping[str, float], names: Sequence[str], alpha, Kinv) -> np.ndarray:
    """d lml / d log θ for ``names`` (Eq. 7 times θ)."""
    out = np.zeros(len(names))
    for i, n in enumerate(names):
        if n == "sig2":
            g = 0.5 * _trace_w(alpha, Kinv, kern.K2) * 2 * hyps["sig2"] ** 2
        elif n == "sig3":
            g = 0.5 * _trace_w(alpha, Kinv, kern.K3) * 2 * hyps["sig3"] ** 2
        elif n == "ls2":
            g = 0.5 * _trace_w(alpha, Kinv, kern.dK2) * hyps["sig2"] ** 2 * hyps["ls2"]
        elif n == "ls3":
            g = 0.5 * _trace_w(alpha, Kinv, kern.dK3) * hyps["sig3"] ** 2 * hyps["ls3"]
        else:
            m = kern.kinds == _NOISE_KIND[n]
            g = 0.5 * float((alpha[m] ** 2).sum() - np.diag(Kinv)[m].sum()) * 2 * hyps[n] ** 2
        out[i] = g
    return out


def _scaled_lbfgsb(fun, x0, bounds, options, first_step: float = 1.0, callback=None):
    """L-BFGS-B on ``fun`` divided by the norm of its gradient at ``x0`` (>= 1): with every variable
    boxed, L-BFGS-B's first trial step is the whole gradient step, which for a likelihood of
    hundreds of labels lands on the box; scaled, the first step is at most 1 in log θ (a factor
    e).  The value at ``x0`` is evaluated once and reused.  Returns (result, scale)."""
    f0, g0 = fun(x0)
    scale = first_step / max(float(np.linalg.norm(g0)), first_step)
    first = {"x": np.array(x0, dtype=float), "fg": (f0, np.asarray(g0))}

    def scaled(x):
        if first is not None and first.get("x") is not None and np.array_equal(x, first["x"]):
            f, g = first.pop("fg")
            first["x"] = None
        else:
            f, g = fun(x)
        return f * scale, np.asarray(g) * scale

    opts = dict(options)
    if "gtol" in opts:
        opts["gtol"] = opts["gtol"] * scale
    return minimize(scaled, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=opts, callback=callback), scale


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.5 h``."""
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200 else
                                                     f"{seconds / 3600:.1f} h")


def pace(started: float, done: int, total: int, now: float | None = None) -> str:
    """``12 s, 2.1 s each, ETA 40 s`` for ``done`` of ``total`` equal-cost items started at ``started``
    (``time.perf_counter()`` seconds)."""
    elapsed = (time.perf_counter() if now is None else now) - started
    each = elapsed / max(done, 1)
    return f"{_duration(elapsed)}, {each:.2g} s each, ETA {_duration(max(total - done, 0) * each)}"


@dataclass
class _Counter:
    inner_evaluations: int = 0
    kernel_builds: int = 0
    outer_evaluations: int = 0
    kernel_cpu: float = 0.0   # process_time in kernel builds, s
    phase: str = "screening"
    inner_by_phase: dict = field(default_factory=dict)   # phase -> [evaluations, process_time s]


def _inner_optimize(kern, hyps0, names, prior, bounds, counter, gtol=1e-2, maxiter=200, first_step=1.0):
    """Maximise lml + log prior over log θ of ``names`` (signal variances and noises) with the
    kernels fixed.  Returns ``(J, hyps, converged, message)``."""
    x0 = np.log([hyps0[n] for n in names])
    xb = [(math.log(bounds[n][0]), math.log(bounds[n][1])) for n in names]
    x0 = np.clip(x0, [b[0] for b in xb], [b[1] for b in xb])
    best = {"f": math.inf, "x": x0}

    def fun(x):
        counter.inner_evaluations += 1
        t0 = time.process_time()
        try:
            return _fun(x)
        finally:
            rec = counter.inner_by_phase.setdefault(counter.phase, [0, 0.0])
            rec[0] += 1
            rec[1] += time.process_time() - t0

    def _fun(x):
        h = dict(hyps0)
        h.update({n: math.exp(v) for n, v in zip(names, x)})
        try:
            lml, alpha, Kinv = _factor_eval(kern, h)
        except ModelError:
            return 1e30 if not math.isfinite(best["f"]) else abs(best["f"]) + 1e6, np.zeros(len(x))
        lp, glp = log_prior(prior, h, names)
        f = -(lml + lp)
        g = -(_grad_log(kern, h, names, alpha, Kinv) + glp)
        if f < best["f"]:
            best.update(f=f, x=np.array(x))
        return f, g

    if not names:
        h = dict(hyps0)
        lml = _factor_eval(kern, h, need_inverse=False)[0]
        return lml + log_prior(prior, h, _LENGTHS)[0], h, True, "nothing to optimise"
    res, _ = _scaled_lbfgsb(fun, x0, xb, {"maxiter": maxiter, "gtol": gtol, "ftol": 1e-10, "maxls": 40},
                            first_step=first_step)
    if not math.isfinite(best["f"]):
        raise ModelError("no signal variances/noises gave a positive-definite covariance; " + _CHOLESKY_HINT)
    h = dict(hyps0)
    h.update({n: math.exp(v) for n, v in zip(names, best["x"])})
    return -best["f"], h, bool(res.success), str(res.message)


# ---------------------------------------------------------------------------
# kernels of the training rows (all of them, or a subset of force environments)
# ---------------------------------------------------------------------------


class _KernelSource:
    """Builds :class:`_Kernels` at given length scales for all training rows, or -- forces-only
    data above ``subset_envs`` environments -- for a seeded random subset of them."""

    def __init__(self, gp: GaussianProcess, subset_envs: int | None, seed: int, extrapolation: bool = True):
        self.gp = gp
        self.kinds_all = np.asarray(gp._kinds, dtype=np.int64)
        self.y_all = gp._targets()  # energies less the energy reference
        envs = gp._force_label_envs()
        self.subset = None
        self.frames_all, envs_all = _row_frames_envs(gp)
        bonds = reciprocal_bonds(gp)
        self.blocks_all = cv_blocks(self.frames_all, envs_all, bonds, extrapolation)
        if subset_envs is not None and envs is not None and len(envs) > subset_envs:
            rng = np.random.default_rng([seed, 13])
            self.subset = np.sort(rng.choice(len(envs), size=subset_envs, replace=False))
            self.sub_envs = envs[self.subset]
            rows = (3 * self.subset[:, None] + np.arange(3)[None, :]).ravel()
            self.y_sub = self.y_all[rows]
            self.kinds_sub = self.kinds_all[rows]
            self.frames_sub = self.frames_all[rows]
            self.blocks_sub = cv_blocks(self.frames_sub, envs_all[rows], bonds, extrapolation)

    @property
    def n_subset(self) -> int | None:
        return None if self.subset is None else len(self.subset)

    def build(self, ls, counter: _Counter, full: bool = False) -> _Kernels:
        t0 = time.process_time()
        try:
            return self._build(ls, full)
        finally:
            counter.kernel_builds += 1
            counter.kernel_cpu += time.process_time() - t0

    def _build(self, ls, full: bool) -> _Kernels:
        gp = self.gp
        if self.subset is None or full:
            K2, K3, dK2, dK3 = gp._segment_blocks(0, gp.n_labels, tuple(ls), grad=True)
            return _Kernels(tuple(ls), K2, K3, dK2, dK3, self.y_all, self.kinds_all, self.frames_all,
                            self.blocks_all)
        K2, K3, dK2, dK3 = force_kernel_blocks(gp._training_batch(), len(gp.species), self.sub_envs, None,
                                               ls[0], ls[1], grad=True)
        return _Kernels(tuple(ls), K2, K3, dK2, dK3, self.y_sub, self.kinds_sub, self.frames_sub,
                        self.blocks_sub)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def validation_metrics(gp: GaussianProcess, validation: Sequence[tuple]) -> dict:
    """Force RMSE (eV/Å) and mean log predictive density (per force component, nats) of the
    held-out atoms ``validation = [(atoms, atom_indices, forces (n, 3) eV/Å), ...]`` under
    the total predictive σ = sqrt(σ_epistemic² + σn²)."""
    errs, var = [], []
    for atoms, idx, forces in validation:
        idx = list(idx)
        if not idx:
            continue
        p = gp.predict(atoms, atom_indices=idx)
        errs.append((p.forces[idx] - np.asarray(forces)[idx]).ravel())
        var.append((p.force_std[idx] ** 2 + p.noise ** 2).ravel())
    if not errs:
        raise InvalidInput("the validation set has no atoms")
    e, v = np.concatenate(errs), np.concatenate(var)
    return {"rmse": float(np.sqrt(np.mean(e ** 2))), "max_error": float(np.abs(e).max()),
            "log_likelihood": float(np.mean(-0.5 * e ** 2 / v - 0.5 * np.log(2 * math.pi * v))),
            "rms_sigma": float(np.sqrt(np.mean(v))), "components": int(e.size)}


# ---------------------------------------------------------------------------
# leave-one-frame-out cross-validation (the selection rule)
# ---------------------------------------------------------------------------


def reciprocal_bonds(gp: GaussianProcess) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of training environments ``(a, b, r)`` whose central atoms are each other's neighbours
    at distance r (Å): atom i's environment has the bond i->j and atom j's the bond j->i with the
    opposite displacement vector (each component to 1e-6 Å) -- the two atoms are from one
    structure.  a < b; a bond to a
    periodic image of the atom itself gives no pair."""
    batch = gp._training_batch()
    n = len(batch)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0)
    env = np.repeat(np.arange(n), np.diff(batch.bond_offsets))
    i = batch.center_atom[env]
    j = batch.bond_atom
    # the bond vector centre -> neighbour, oriented from the lower to the higher atom index: i->j
    # and j->i give the same vector, so two frames collide only if an atom pair has the same
    # displacement to 1e-6 Å in all three components (the distance alone collided: 160 frames of
    # ±5 % Al merged into 112)
    v = np.rint(batch.bond_r[:, None] * batch.bond_u * np.where(i < j, 1.0, -1.0)[:, None] * 1e6).astype(np.int64)
    keys = np.vstack([np.minimum(i, j), np.maximum(i, j), v.T])
    order = np.lexsort(keys[::-1])
    ks = keys[:, order]
    same = np.all(ks[:, 1:] == ks[:, :-1], axis=0)
    a, b = env[order][:-1][same], env[order][1:][same]
    r = batch.bond_r[order][:-1][same]
    keep = a != b
    a, b, r = a[keep], b[keep], r[keep]
    return np.minimum(a, b), np.maximum(a, b), r


def training_frames(gp: GaussianProcess) -> np.ndarray:
    """Frame id (0, 1, ...) of every training environment.  The structures the model was given
    (:meth:`GaussianProcess.labelled_frames`) when it has them; else (a model loaded from a file)
    recovered from the data alone: environments tied by a reciprocal bond
    (:func:`reciprocal_bonds`) are from one structure; connected environments form a frame,
    numbered in order of their first environment.  (Recovered, a frame whose labelled atoms share
    no bond -- one labelled atom, or atoms farther apart than r2 -- splits into several; two
    identical structures merge.)"""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(gp._training_batch())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    recorded = gp.labelled_frames()
    if recorded:
        out = np.full(n, -1, dtype=np.int64)
        for k, frame in enumerate(recorded):
            for g in gp._groups[frame.groups_before:frame.groups]:
                out[g.envs] = k
        if np.all(out >= 0):
            return out
    a, b, _ = reciprocal_bonds(gp)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first)).astype(np.int64)[inverse]


def row_frames(gp: GaussianProcess) -> np.ndarray:
    """Frame id (:func:`training_frames`) of every training label row."""
    return _row_frames_envs(gp)[0]


def _row_frames_envs(gp: GaussianProcess):
    """(frame id of every label row, environment of every force row (-1 for energy/stress rows))."""
    frames = training_frames(gp)
    out = np.full(gp.n_labels, -1, dtype=np.int64)
    envs = np.full(gp.n_labels, -1, dtype=np.int64)
    for g in gp._groups:
        r = g.rows[g.rows >= 0]
        out[r] = frames[g.envs[0]]
        if g.kind == "force":
            envs[r] = g.envs[0]
    return out, envs


def cv_blocks(frames: np.ndarray, envs: np.ndarray, bonds, extrapolation: bool = True) -> list[tuple[str, np.ndarray]]:
    """The held-out blocks of the cross-validation for training rows with frame ids ``frames``
    and force environments ``envs`` (-1: not a force row): every frame (if there are two or
    more), and with ``extrapolation`` per frame its closest pair of labelled atoms
    (:func:`reciprocal_bonds` ``bonds``), both atoms' force rows held out together.  Removing
    both environments removes that pair distance from the 2-body training data, so the block
    asks the model to extrapolate to a distance shorter than those it keeps, as a new frame
    does when its closest approach is closer than the training set's; the more data, the
    smaller the gap to the next-closest pair and the milder the extrapolation."""
    blocks = []
    ids = [f for f in np.unique(frames) if np.any((frames == f) & (envs >= 0))]
    if len(ids) >= 2:
        blocks += [(f"frame {f}", np.flatnonzero(frames == f)) for f in ids]
    if extrapolation:
        a, b, r = bonds
        present = np.zeros(int(max(envs.max(initial=-1), a.max(initial=-1), b.max(initial=-1))) + 1, dtype=bool)
        present[envs[envs >= 0]] = True
        ok = present[a] & present[b] if len(a) else np.zeros(0, dtype=bool)
        env_frame = {int(e): int(f) for e, f in zip(envs, frames) if e >= 0}
        best = {}
        for x, y, d in zip(a[ok], b[ok], r[ok]):
            f = env_frame[int(x)]
            if f not in best or d < best[f][2]:
                best[f] = (int(x), int(y), float(d))
        for f in sorted(best):
            x, y, d = best[f]
            rows = np.flatnonzero((envs == x) | (envs == y))
            if len(rows) < len(envs):
                blocks.append((f"closest pair of frame {f} ({d:.3f} Å)", rows))
    return blocks


def block_cv_metrics(kern: "_Kernels", hyps: Mapping[str, float], blocks) -> list[dict] | None:
    """Predictions of each block's force rows by the model trained on all other rows, in closed
    form from K_y^-1 (block version of Rasmussen & Williams Eq. 5.12): with A = (K_y^-1)_II for
    the rows I of a block, the residual y_I - μ_I(trained without I) = A^-1 α_I and its
    covariance (noise included) is A^-1.  Returns per block ``{"frame" (its label), "rmse",
    "max_error" (eV/Å), "nlpd" (mean negative log predictive density per force component,
    nats), "components"}``; None without blocks or if K_y is not positive definite."""
    if not blocks:
        return None
    try:
        _, alpha, Kinv = _factor_eval(kern, hyps)
    except ModelError:
        return None
    out = []
    for label, rows in blocks:
        B = Kinv[np.ix_(rows, rows)]
        A = np.tril(B) + np.tril(B, -1).T
        try:
            c = np.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            return None
        r = np.linalg.solve(c.T, np.linalg.solve(c, alpha[rows]))
        cinv = np.linalg.solve(c, np.eye(len(rows)))
        var = np.einsum("ij,ij->j", cinv, cinv)   # diag(A^-1)
        m = kern.kinds[rows] == _FORCE
        if not m.any():
            continue
        e, v = r[m], var[m]
        out.append({"frame": label, "rmse": float(np.sqrt(np.mean(e ** 2))), "max_error": float(np.abs(e).max()),
                    "nlpd": float(np.mean(0.5 * e ** 2 / v + 0.5 * np.log(2 * math.pi * v))),
                    "components": int(m.sum())})
    return out or None


def lofo_metrics(kern: "_Kernels", hyps: Mapping[str, float], frames: np.ndarray) -> list[dict] | None:
    """Leave-one-frame-out metrics (:func:`block_cv_metrics` with every frame a block); None if
    fewer than two frames have force rows."""
    blocks = cv_blocks(frames, np.where(kern.kinds == _FORCE, 0, -1), None, extrapolation=False)
    return block_cv_metrics(kern, hyps, blocks)


def holdout_split(selections: Sequence[Sequence[int]], share: float, seed: int):
    """Which labelled atoms the held-out check uses: ``selections[k]`` are the atoms of frame k
    to be trained on; returns ``(train, held)`` with ``train[k]`` the atoms trained on during the
    search and ``held[k]`` those held out (lists of atom indices).

    With two or more frames whole frames are held out (``round(share x frames)``, at least one,
    at least one left; ``numpy.random.default_rng(seed)``): atoms of the same frame share their
    neighbours with the trained atoms, so a within-frame check is optimistic (measured, 1-frame
    Al seed 0: held-out RMSE 0.0032 eV/Å for hyperparameters whose error on new frames is 0.018).
    With one frame, ``round(share x atoms)`` of its atoms (at least one, at least one left)."""
    if not 0.0 < share < 1.0:
        raise InvalidInput(f"the held-out share must be in (0, 1), got {share}")
    rng = np.random.default_rng([seed, 7])
    usable = [k for k, sel in enumerate(selections) if len(sel)]
    train = [list(sel) for sel in selections]
    held = [[] for _ in selections]
    if len(usable) >= 2:
        n_out = min(len(usable) - 1, max(1, round(share * len(usable))))
        for k in sorted(rng.choice(usable, size=n_out, replace=False).tolist()):
            held[k], train[k] = list(selections[k]), []
    elif usable and len(selections[usable[0]]) >= 2:
        k = usable[0]
        sel = list(selections[k])
        n_out = min(len(sel) - 1, max(1, round(share * len(sel))))
        out = set(rng.choice(sel, size=n_out, replace=False).tolist())
        held[k] = [i for i in sel if i in out]
        train[k] = [i for i in sel if i not in out]
    return train, held


# ---------------------------------------------------------------------------
# MAP with restarts
# ---------------------------------------------------------------------------


@serial_blas
def map_optimize(
    gp: GaussianProcess,
    prior: HyperPrior | str | None = "data",
    restarts: int = 3,
    seed: int = 0,
    max_iterations: int = 20,
    validation: Sequence[tuple] | None = None,
    validation_tolerance: float = 0.02,
    subset_envs: int | None = 120,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    fix: Sequence[str] = (),
    gtol: float = 0.05,
    max_validated: int = 2,
    progress: Callable[[str], None] | None = None,
    selection: str = "cv",
    criterion: str = "worst",
    extrapolation: bool = False,
) -> OptimizationResult:
    """Maximise log p(y|θ) + log p(log θ) (``prior="data"``: :func:`data_prior`; ``None`` or
    ``"none"``: ML-II) and set the model's hyperparameters to the selected optimum.

    Search: outer L-BFGS-B over log(ls2, ls3) (at most ``max_iterations`` iterations, projected
    gradient tolerance ``gtol`` in log space), inner L-BFGS-B over log of the signal variances
    and noises at fixed kernels.  Forces-only data above ``subset_envs`` environments: the
    outer search runs on a seeded random subset of ``subset_envs`` environments; the signal
    variances and noises are then re-optimised on all data at the selected length scales, and
    the full-data gradient is reported (``gradient``, ``gradient_norm``).
    Restarts: the prior centre, the current values and ``restarts`` draws from the prior
    (``numpy.random.default_rng(seed)``), each screened by its profiled objective (one kernel
    build, inner search from that start); the outer search starts from the best.
    With ``selection="cv"`` (default) the outer search also runs from the start values' length
    scales (the maximum a local optimiser such as FLARE's reaches).

    Selection rule (``selection="cv"``): the candidates are the start values, every screened
    restart (inner optimum at its length scales) and the outer optima.  Each is scored on
    held-out blocks of the rows the search used: every training frame in turn (two or more
    frames; :func:`cv_blocks`, closed form :func:`block_cv_metrics`), with ``extrapolation``
    also each frame's closest labelled pair, plus each ``validation`` tuple (a frame not trained
    on, :func:`validation_metrics` at the candidate on the search data).  ``criterion``:
    ``"worst"`` (default) the largest held-out frame force RMSE, ``"max_error"`` the largest
    component error, ``"rmse"`` pooled, ``"nlpd"`` mean negative log predictive density (see
    :func:`_fold_score`).  The best-scoring candidate (ties: higher objective) is kept if its
    score is below the start values' by ``validation_tolerance`` (relative); else the start
    values are kept.  Without any held-out block (one frame, no ``validation``) the start values
    are kept with a warning.  ``selection="objective"``: the highest objective (plain MAP/ML-II).
    ``max_validated`` is accepted for compatibility and unused.
    """
    if not gp.n_labels:
        raise ModelError("the model has no training data to optimise on")
    if max_iterations < 1:
        raise InvalidInput("max_iterations must be >= 1")
    if restarts < 0:
        raise InvalidInput("restarts must be >= 0")
    if selection not in ("cv", "objective"):
        raise InvalidInput(f"selection must be 'cv' or 'objective', got {selection!r}")
    if criterion not in CRITERIA:
        raise InvalidInput(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if gp.n_labels > gp.kernel_cache_max_rows:
        # the all-data step holds K2, K3, dK2, dK3, K_y and its inverse: 6 n² floats (10.8 GB at 15,000 rows)
        raise ModelError(f"{gp.n_labels} training rows exceed the kernel cache limit {gp.kernel_cache_max_rows}: the "
                         f"MAP search would hold 6 x {gp.n_labels}² floats "
                         f"({6 * 8 * gp.n_labels ** 2 / 1e9:.1f} GB); keep the hyperparameters of a smaller model")
    if isinstance(prior, str):
        if prior == "data":
            prior = data_prior(gp)
        elif prior == "none":
            prior = None
        else:
            raise InvalidInput(f"prior must be 'data' or 'none', got {prior!r}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    unknown = set(fix) - set(gp._hyps)
    if unknown:
        raise InvalidInput(f"cannot fix unknown hyperparameters {sorted(unknown)}")
    names = [n for n in gp.hyperparameter_names if n not in set(fix)]
    outer_names = [n for n in _LENGTHS if n in names]
    inner_names = [n for n in names if n not in _LENGTHS]
    box = dict(DEFAULT_BOUNDS)
    box.update(bounds or {})
    log = progress or (lambda s: None)
    counter = _Counter()
    rng = np.random.default_rng(seed)
    start = {n: gp._hyps[n] for n in gp.hyperparameter_names}
    centre = dict(start) if prior is None else {**start, **{n: prior.centre[n] for n in start if n in prior.centre}}
    draw_prior = prior if prior is not None else data_prior(gp)

    def clip(h):
        return {n: min(max(v, box[n][0]), box[n][1]) if n in names else v for n, v in h.items()}

    # the data-derived centre is a start even for ML-II (prior None): restarts need a scale
    starts = [("prior centre", clip({**start, **{n: draw_prior.centre[n] for n in names}})),
              ("current", clip(start))]
    for k in range(restarts):
        h = dict(start)
        for n in names:
            h[n] = math.exp(rng.normal(math.log(draw_prior.centre[n]), draw_prior.width[n]))
        starts.append((f"draw {k + 1}", clip(h)))
    source = _KernelSource(gp, subset_envs, seed, extrapolation)
    if source.n_subset:
        log(f"length scales searched on {source.n_subset} of {gp.n_environments} environments (seeded subset)")

    # every candidate is scored where its kernel is at hand (nothing kept beyond the search's kernels)
    use_cv = selection == "cv"
    candidates = []

    def add_candidate(label, J, h, kern, origin=None):
        folds = block_cv_metrics(kern, h, kern.blocks) if use_cv else None
        candidates.append({"label": label, "objective": float(J), "hyperparameters": dict(h), "folds": folds,
                           "origin": origin})

    # screening: one kernel build per start, inner search from that start and from the centre's
    # signal/noise values (restarts in the inner space cost no kernel)
    screened = []
    screen0 = time.perf_counter()
    for k_start, (label, h) in enumerate(starts):
        kern = source.build([h["ls2"], h["ls3"]], counter)
        best = None
        inner_starts = [h]
        if label != "prior centre":  # the centre's signal variances and noises at this start's length scales
            inner_starts.append({**h, **{n: centre[n] for n in inner_names}})
        for hs in inner_starts:
            J, hopt, ok, msg = _inner_optimize(kern, hs, inner_names, prior, box, counter)
            if best is None or J > best[0]:
                best = (J, hopt)
            if ok:
                break  # a converged inner search; the second start only when the first failed
        screened.append({"start": label, "objective": best[0], "hyperparameters": best[1]})
        add_candidate(f"restart {label}", best[0], best[1], kern)
        if label == "current":
            try:  # the start values themselves, unoptimised: always a candidate
                lml0 = _factor_eval(kern, start, need_inverse=False)[0]
                add_candidate("start values", lml0 + log_prior(prior, start, names)[0], start, kern)
            except ModelError:
                log("  start values: covariance not positive definite, not a candidate")
        log(f"  restart {label:12s}: ls2={h['ls2']:.4g} Å ls3={h['ls3']:.4g} Å -> objective {best[0]:.4f}   "
            f"[start {k_start + 1}/{len(starts)}: {pace(screen0, k_start + 1, len(starts))}]")
    order = sorted(range(len(screened)), key=lambda i: -screened[i]["objective"])

    # outer search over log(ls2, ls3) with the envelope gradient, from the best screened start and
    # (cross-validated selection) also from the start values' length scales: the likelihood can
    # have several maxima (a narrow ls2 that interpolates, a broad one that extrapolates), and
    # the one nearest the start is the one a local optimiser (FLARE's) would return
    counter.phase = "outer"
    outer_starts = [order[0]]
    current = next(i for i, s in enumerate(screened) if s["start"] == "current")
    if use_cv and current != order[0]:
        outer_starts.append(current)

    def run_outer(first):
        state = {"hyps": dict(first), "best": (-math.inf, dict(first)), "kern": None}
        outer0 = time.perf_counter()
        iterations = [0]   # L-BFGS-B iterations completed (for the progress lines)
        n_eval = [0]

        def outer(x):
            counter.outer_evaluations += 1
            n_eval[0] += 1
            h = dict(state["hyps"])
            h.update({n: math.exp(v) for n, v in zip(outer_names, x)})
            kern = source.build([h["ls2"], h["ls3"]], counter)
            try:
                J, hopt, ok, msg = _inner_optimize(kern, h, inner_names, prior, box, counter, first_step=0.3)
                if not ok:  # warm start failed: also from the centre's signal variances and noises
                    J2, h2, ok2, _ = _inner_optimize(kern, {**h, **{n: centre[n] for n in inner_names}},
                                                     inner_names, prior, box, counter)
                    if J2 > J:
                        J, hopt = J2, h2
                _, alpha, Kinv = _factor_eval(kern, hopt)
            except ModelError:
                return 1e30, np.zeros(len(x))
            lp, glp = log_prior(prior, hopt, outer_names)
            g = _grad_log(kern, hopt, outer_names, alpha, Kinv) + glp
            state["hyps"] = hopt
            if J > state["best"][0]:
                state["best"], state["kern"] = (J, dict(hopt)), kern
            log(f"  outer {counter.outer_evaluations:3d}: ls2={hopt['ls2']:.4g} Å ls3={hopt['ls3']:.4g} Å "
                f"sig2={hopt['sig2']:.4g} sig3={hopt['sig3']:.4g} noise={hopt['noise']:.4g} -> objective {J:.4f}   "
                f"[{_duration(time.perf_counter() - outer0)}, "
                f"{(time.perf_counter() - outer0) / n_eval[0]:.2g} s per evaluation; "
                f"{iterations[0]} of at most {max_iterations} iterations done]")
            return -J, -g

        x0 = np.log([first[n] for n in outer_names])
        xb = [(math.log(box[n][0]), math.log(box[n][1])) for n in outer_names]
        res, _ = _scaled_lbfgsb(outer, x0, xb, {"maxiter": int(max_iterations), "gtol": gtol, "ftol": 1e-8,
                                                 "maxls": 20, "maxfun": 3 * int(max_iterations) + 5},
                                callback=lambda _x: iterations.__setitem__(0, iterations[0] + 1))
        return state, (str(res.message), int(res.status), int(res.nit))

    runs_info = {}
    if outer_names:
        for i in outer_starts:
            label = f"optimum from {screened[i]['start']}"
            log(f"  length-scale search from restart {screened[i]['start']}")
            state, info = run_outer(screened[i]["hyperparameters"])
            runs_info[label] = info
            if state["kern"] is not None:
                add_candidate(label, state["best"][0], state["best"][1], state["kern"], origin=label)
    main_label = f"optimum from {screened[order[0]]['start']}"
    message, status, nit = runs_info.get(main_label, ("no length scale optimised", 0, 0))

    # on all data at a candidate's length scales (the signal variances and noises re-optimised there
    # when the search used a subset), installed in the model with its kernel cache
    def finish(h, optimise=True):
        kern = source.build([h["ls2"], h["ls3"]], counter, full=True)
        hopt = h
        if optimise:
            _, hopt, _, _ = _inner_optimize(kern, h, inner_names, prior, box, counter, first_step=0.1)
        lml, alpha, Kinv = _factor_eval(kern, hopt)
        lp, glp = log_prior(prior, hopt, names)
        g = _grad_log(kern, hopt, names, alpha, Kinv) + glp
        gp.set_hyperparameters({nm: hopt[nm] for nm in names})
        n = gp.n_labels
        ls = (gp._hyps["ls2"], gp._hyps["ls3"])
        if n <= gp.kernel_cache_max_rows:
            gp._K2, gp._K3, gp._k_rows, gp._k_ls, gp._k_segments = kern.K2, kern.K3, n, ls, ((n, "grad"),)
            gp._grad_cache = (ls[0], ls[1], n, kern.dK2, kern.dK3)
        gp._factorize()
        return hopt, lml, lp, g

    # the selection rule
    counter.phase = "selection"
    warnings = []
    chosen = _select(candidates, criterion, validation_tolerance, validation, gp, use_cv, log)
    validation_report = {c["label"]: _candidate_report(c) for c in candidates}
    chosen_label = chosen["label"]
    if use_cv:
        validation_report["criterion"] = criterion
        validation_report["selected"] = chosen_label
        if chosen.get("score") is None:
            warnings.append("fewer than two training frames with force labels and no held-out frames: no "
                            "out-of-frame check was possible, so the start values were kept (add a frame for a "
                            "cross-validated choice)")
    if chosen["origin"] in runs_info:
        message, status, nit = runs_info[chosen["origin"]]
    counter.phase = "all data"
    if chosen_label == "start values":
        h_final, lml, lp, g = finish(dict(start), optimise=False)
    else:
        h_final, lml, lp, g = finish(chosen["hyperparameters"])
    J_final = lml + lp

    # convergence, honestly
    at_bounds = {}
    for nm in names:
        lo, hi = box[nm]
        v = h_final[nm]
        if v <= lo * (1 + BOUND_RTOL):
            at_bounds[nm] = "lower"
        elif v >= hi * (1 - BOUND_RTOL):
            at_bounds[nm] = "upper"
    free = np.array([nm not in at_bounds for nm in names])
    gnorm = float(np.linalg.norm(g[free])) if free.any() else 0.0
    capped = outer_names and (nit >= max_iterations or status == 1)
    abnormal = "ABNORMAL" in message.upper()
    if capped:
        warnings.append(f"length-scale search stopped at its iteration cap {max_iterations} before converging "
                        f"({message}); |gradient| (log θ) = {gnorm:.3g}")
    elif abnormal:
        warnings.append(f"length-scale line search ended abnormally ({message}); |gradient| (log θ) = {gnorm:.3g}")
    if source.n_subset and chosen_label != "start values":
        note = (f"length scales optimised on {source.n_subset} of {gp.n_environments} environments; "
                f"all-data |gradient| (log θ) = {gnorm:.3g}")
        if gnorm > max(gtol, 1e-3 * max(1.0, abs(J_final))):
            warnings.append(note)
        message = f"{message}; {note}"
    converged = not capped and not abnormal
    if at_bounds:
        bnote = _bound_note(at_bounds, {nm: box[nm] for nm in names})
        message = f"{message}; ended on the edge of the box: {bnote}"
    objective = "map" if prior is not None else "ml"
    message = f"{objective.upper()} ({chosen_label}): {message}"
    grad_theta = {nm: float(gv / h_final[nm]) for nm, gv in zip(names, g)}  # d(objective)/dθ
    return OptimizationResult(
        converged=bool(converged), iterations=nit, evaluations=counter.outer_evaluations + len(starts),
        message=message, log_likelihood=float(lml), gradient=grad_theta,
        hyperparameters={nm: float(gp._hyps[nm]) for nm in gp.hyperparameter_names},
        max_iterations=int(max_iterations), seconds=time.perf_counter() - wall0,
        at_bounds=at_bounds, bounds={nm: (float(box[nm][0]), float(box[nm][1])) for nm in names},
        warnings=tuple(warnings), gradient_norm=gnorm, objective=objective, log_prior=float(lp),
        restarts=tuple(screened), validation=validation_report, cpu_seconds=time.process_time() - cpu0,
        kernel_builds=counter.kernel_builds, inner_evaluations=counter.inner_evaluations,
        selected=chosen_label, kernel_cpu_seconds=counter.kernel_cpu,
        inner_by_phase={k: (int(v[0]), float(v[1])) for k, v in counter.inner_by_phase.items()})


def _metrics_at(gp: GaussianProcess, hyps: Mapping[str, float], validation) -> dict:
    work = gp.clone()
    work.set_hyperparameters({n: hyps[n] for n in gp.hyperparameter_names})
    m = validation_metrics(work, validation)
    m["hyperparameters"] = {n: float(hyps[n]) for n in gp.hyperparameter_names}
    return m


CRITERIA = ("worst", "max_error", "rmse", "nlpd")


def _fold_score(folds, criterion: str):
    """The selection criterion over out-of-sample folds (None without folds): ``"worst"`` the
    largest per-frame force RMSE, ``"rmse"`` the pooled RMSE, ``"nlpd"`` the mean negative log
    predictive density per force component."""
    if not folds:
        return None
    n = np.array([f["components"] for f in folds], dtype=float)
    if criterion == "worst":
        return max(f["rmse"] for f in folds)
    if criterion == "max_error":
        return max(f["max_error"] for f in folds)
    if criterion == "rmse":
        return float(np.sqrt(np.sum(n * np.array([f["rmse"] for f in folds]) ** 2) / n.sum()))
    return float(np.sum(n * np.array([f["nlpd"] for f in folds])) / n.sum())


def _select(candidates, criterion, tolerance, validation, gp, use_cv, log) -> dict:
    """The selection rule of :func:`map_optimize` (see there)."""
    if not use_cv:
        return max(candidates, key=lambda c: c["objective"])
    for c in candidates:
        folds = list(c["folds"] or [])
        for v in validation or ():
            m = _metrics_at(gp, c["hyperparameters"], [v])
            folds.append({"frame": "held out", "rmse": m["rmse"], "nlpd": -m["log_likelihood"],
                          "max_error": m["max_error"], "components": m["components"]})
        c["all_folds"] = folds
        c["score"] = _fold_score(folds, criterion)
        if c["score"] is not None:
            log(f"  candidate {c['label']:26s}: ls2={c['hyperparameters']['ls2']:.4g} Å "
                f"noise={c['hyperparameters']['noise']:.3g} eV/Å objective {c['objective']:.3f}, "
                f"{len(folds)} held-out frames: worst RMSE {max(f['rmse'] for f in folds):.5f} eV/Å, "
                f"criterion ({criterion}) {c['score']:.5g}")
    scored = [c for c in candidates if c["score"] is not None]
    if not scored:  # one frame: nothing to validate on, no evidence to leave the start values
        return next((c for c in candidates if c["label"] == "start values"),
                    max(candidates, key=lambda c: c["objective"]))
    best = min(scored, key=lambda c: (c["score"], -c["objective"]))
    start = next((c for c in scored if c["label"] == "start values"), None)
    if start is not None and best["score"] > start["score"] - tolerance * abs(start["score"]):
        return start   # not better than the start values by the margin: no evidence to leave them
    return best


def _candidate_report(c) -> dict:
    out = {"objective": c["objective"], "hyperparameters": {k: float(v) for k, v in c["hyperparameters"].items()},
           "score": c.get("score")}
    folds = c.get("all_folds") or c["folds"] or []
    if folds:
        out["folds"] = [{k: f[k] for k in ("frame", "rmse", "max_error", "nlpd", "components")} for f in folds]
        out["worst_rmse"] = max(f["rmse"] for f in folds)
        out["max_error"] = max(f["max_error"] for f in folds)
        out["rmse"] = _fold_score(folds, "rmse")
        out["nlpd"] = _fold_score(folds, "nlpd")
    return out
