"""Acquisition: which atoms of an uncertain frame enter the training set, and which queued
frame the oracle labels first (seed 000, "Acquisition functions"; issue 14).  No gRPC here.

An acquisition *rule* sees

* a :class:`Candidate`: the frame's atoms and its per-atom predicted σ (eV/Å) under the current
  model, computed by the caller (:func:`per_atom_sigma`);
* an :class:`AcquisitionContext`: a read-only :class:`ModelView` of the model, its noise σn
  (eV/Å), the oracle threshold (eV/Å), which oracle call this frame would be, a seeded
  random generator, and the run's :class:`AcquisitionSettings` (the knobs of ``policy:``);

and returns a :class:`Selection`: the atoms picked (greedily, in order, each with the score it
was picked with) and one *frame score* that ranks queued frames against each other.

The model view answers two questions in the GP's own terms (:class:`ModelView`):

* kernel distances of the frame's atoms to the training set and from chosen atoms to all of
  them (the rows of the atoms a rule picks, one question per pick: never the n × n matrix), with
  k(x, y) = sig2² k2(x, y) + sig3² k3(x, y) the covariance of the local energies of two
  environments (eV²) and d(x, y) = sqrt(k(x, x) + k(y, y) − 2 k(x, y)) in eV;
* the per-atom σ of the frame conditioned on extra environments (as if their force labels
  were in the training set; a GP variance does not depend on the labels).

Two implementations: :class:`GPModelView` over an in-process
:class:`learner_service.gp.GaussianProcess` (tests, offline replays) and
:class:`LearnerModelView` over a :class:`learner_service.client.LearnerClient` (the run).

Rules (formulas in docs/configuration.md, ``policy.acquisition``): ``max_sigma``, ``random``,
``fps``, ``info_gain``, ``hybrid``.  Every rule works through the same greedy loop, which also
applies the knobs ``add_above_sigma`` / ``max_atoms_per_call`` / ``max_atoms_per_species`` and the
exploration bonus β·d_min (``exploration_bonus``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from protos.errors import InvalidInput

__all__ = [
    "AcquisitionContext", "AcquisitionSettings", "Candidate", "GPModelView", "KernelDistances", "LearnerModelView",
    "ModelView", "Selection", "ACQUISITION", "per_atom_sigma",
]


def per_atom_sigma(force_std: np.ndarray, atom_std: np.ndarray | None = None) -> np.ndarray:
    """Per-atom σ (n,) eV/Å: the learner's rotation-invariant ``atom_std`` when it reports one
    (docs/uncertainty.md), else the largest of the per-component force σ (n, 3) eV/Å.

    The one place that turns a prediction's σ into the per-atom σ that acquisition ranks by."""
    if atom_std is not None:
        return np.asarray(atom_std, dtype=np.float64).reshape(-1)
    std = np.asarray(force_std, dtype=np.float64)
    if std.ndim != 2 or std.shape[1] != 3:
        raise InvalidInput(f"force_std must have shape (n, 3) eV/Å, got {std.shape}")
    return std.max(axis=1) if len(std) else np.zeros(0)


# --------------------------------------------------------------------------- the model view


@dataclass(frozen=True)
class KernelDistances:
    """Distances in the model's local-energy kernel, eV (see the module docstring).

    ``d_train`` (m,): min over training environments of d(x_i, y) (inf with no training data;
    empty when not asked for); ``d_within`` (r, m): d(x_a, x_j) from the r atoms ``rows`` asked
    for to the m atoms measured (zero where a = j)."""

    d_train: np.ndarray
    d_within: np.ndarray


class ModelView(Protocol):
    """A read-only view of the learner's model for acquisition rules."""

    def kernel_distances(self, atoms, atom_indices: Sequence[int] | None = None,
                         rows: Sequence[int] | None = None, train: bool = True) -> KernelDistances:
        """Kernel distances of the atoms ``atom_indices`` (None: all) of ``atoms``: to the
        training set (``train``) and from the atoms ``rows`` (None: all of them; ``[]``: none)."""
        ...

    def conditional_sigma(self, atoms, condition_on: Sequence[tuple]) -> np.ndarray:
        """Per-atom σ (n,) eV/Å of ``atoms`` given the training set plus the force environments
        ``condition_on = [(atoms, atom_indices), ...]``."""
        ...


class GPModelView:
    """:class:`ModelView` of an in-process :class:`~learner_service.gp.GaussianProcess`."""

    def __init__(self, gp) -> None:
        self.gp = gp

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True) -> KernelDistances:
        d_train, d_within = self.gp.kernel_distances(atoms, atom_indices, rows=rows, train=train)
        return KernelDistances(np.asarray(d_train), np.asarray(d_within))

    def conditional_sigma(self, atoms, condition_on) -> np.ndarray:
        p = self.gp.predict(atoms, condition_on=list(condition_on))
        return per_atom_sigma(p.force_std, getattr(p, "atom_std", None))


class LearnerModelView:
    """:class:`ModelView` of the learner service behind a :class:`~learner_service.client.LearnerClient`
    (one ``KernelDistances`` or ``Predict`` RPC per question)."""

    def __init__(self, client) -> None:
        self.client = client

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True) -> KernelDistances:
        d_train, d_within = self.client.kernel_distances(atoms, atom_indices, rows=rows, train=train)
        return KernelDistances(np.asarray(d_train), np.asarray(d_within))

    def conditional_sigma(self, atoms, condition_on) -> np.ndarray:
        p = self.client.predict(atoms, condition_on=list(condition_on))
        return per_atom_sigma(p.force_std, getattr(p, "atom_std", None))


# --------------------------------------------------------------------------- inputs and outputs


@dataclass(frozen=True)
class AcquisitionSettings:
    """The ``policy:`` knobs that shape a selection (units: eV/Å for σ, eV for d).

    ``atoms_per_call``: atoms picked per frame.  ``add_above_sigma`` X: additionally pick every
    atom whose σ exceeds X (the rule's preferred ones first), up to ``max_atoms_per_call`` in all.
    ``max_atoms_per_species`` {Z: cap}: at most that many atoms of species Z per frame.
    ``exploration_bonus`` β: β·d_min is added to every atom's score (d_min in eV).
    ``hybrid_fps_calls`` K: ``hybrid`` uses ``fps`` for oracle calls 1..K, ``max_sigma`` after;
    ``hybrid_max_z2``: ... and also later while the mean z² of σ at the oracle calls exceeds it
    (σ too small to rank by; None: calls only)."""

    atoms_per_call: int = 1
    add_above_sigma: float | None = None
    max_atoms_per_call: int | None = None
    max_atoms_per_species: Mapping[int, int] = field(default_factory=dict)
    exploration_bonus: float = 0.0
    hybrid_fps_calls: int = 5
    hybrid_max_z2: float | None = None

    def __post_init__(self) -> None:
        if self.atoms_per_call < 1:
            raise InvalidInput(f"atoms_per_call must be >= 1, got {self.atoms_per_call}")
        if self.add_above_sigma is not None and not self.add_above_sigma > 0:
            raise InvalidInput(f"add_above_sigma must be > 0 eV/Å, got {self.add_above_sigma}")
        if self.max_atoms_per_call is not None and self.max_atoms_per_call < self.atoms_per_call:
            raise InvalidInput(f"max_atoms_per_call ({self.max_atoms_per_call}) must be >= atoms_per_call "
                               f"({self.atoms_per_call})")
        for z, cap in self.max_atoms_per_species.items():
            if int(cap) < 1:
                raise InvalidInput(f"max_atoms_per_species[{z}] must be >= 1, got {cap}")
        if not (math.isfinite(self.exploration_bonus) and self.exploration_bonus >= 0):
            raise InvalidInput(f"exploration_bonus must be >= 0, got {self.exploration_bonus}")
        if self.hybrid_fps_calls < 0:
            raise InvalidInput(f"hybrid_fps_calls must be >= 0, got {self.hybrid_fps_calls}")
        if self.hybrid_max_z2 is not None and not self.hybrid_max_z2 > 0:
            raise InvalidInput(f"hybrid_max_z2 must be > 0, got {self.hybrid_max_z2}")

    @classmethod
    def from_policy(cls, policy) -> "AcquisitionSettings":
        """The settings of a validated ``PolicyConfig`` (species caps by chemical symbol -> Z)."""
        from ase.data import atomic_numbers

        caps = {int(atomic_numbers[s]): int(c) for s, c in dict(policy.max_atoms_per_species).items()}
        return cls(atoms_per_call=policy.atoms_per_call, add_above_sigma=policy.add_above_sigma,
                   max_atoms_per_call=policy.max_atoms_per_call, max_atoms_per_species=caps,
                   exploration_bonus=policy.exploration_bonus, hybrid_fps_calls=policy.hybrid_fps_calls,
                   hybrid_max_z2=getattr(policy, "hybrid_max_z2", None))


@dataclass(frozen=True)
class Candidate:
    """A frame to select atoms from: ``atoms`` (ASE Atoms, n atoms) and ``sigma`` (n,) eV/Å,
    the per-atom predicted σ under the current model."""

    atoms: object
    sigma: np.ndarray

    def __post_init__(self) -> None:
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if sigma.shape != (len(self.atoms),):
            raise InvalidInput(f"candidate sigma must have shape ({len(self.atoms)},) (one σ per atom, eV/Å), "
                               f"got {sigma.shape}")
        if not np.isfinite(sigma).all() or (sigma < 0).any():
            raise InvalidInput("candidate sigma must be finite and >= 0 eV/Å")
        object.__setattr__(self, "sigma", sigma)


@dataclass(frozen=True)
class AcquisitionContext:
    """What a rule may consult besides the candidate.

    ``model``: a :class:`ModelView`; ``noise`` σn and ``threshold`` in eV/Å; ``call_index``: the
    oracle call this frame would be (the first frame of the run is call 0); ``rng``: the seeded
    generator (``random``); ``settings``: :class:`AcquisitionSettings`."""

    model: ModelView | None
    noise: float
    threshold: float
    call_index: int = 1
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    settings: AcquisitionSettings = AcquisitionSettings()
    #: mean z² of the σ in use at the run's oracle calls so far (coordinator/calibration.py; None: no calls yet)
    calibration_z2: float | None = None


class ScaledModelView:
    """A :class:`ModelView` whose σ is the calibrated s·σ (``calibration.scale``): conditional σ
    scaled, kernel distances unchanged."""

    def __init__(self, view, scale: float) -> None:
        self.view, self.scale = view, float(scale)

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
        return self.view.kernel_distances(atoms, atom_indices, rows=rows, train=train)

    def conditional_sigma(self, atoms, condition_on) -> np.ndarray:
        return self.scale * np.asarray(self.view.conditional_sigma(atoms, condition_on))


@dataclass(frozen=True)
class Selection:
    """Atoms picked from one frame.

    ``atoms``: sorted indices; ``order``: the same in the order picked, with ``scores`` the score
    each had when picked (the rule's units, bonus included); ``frame_score``: ranks queued
    frames (larger: label first); ``rule``: the rule that decided (``hybrid`` reports which)."""

    atoms: np.ndarray
    order: np.ndarray
    scores: np.ndarray
    frame_score: float
    rule: str


# --------------------------------------------------------------------------- the greedy loop


class _Scorer:
    """Per-atom scores of one rule for one candidate, updated after every pick."""

    def scores(self) -> np.ndarray:
        raise NotImplementedError

    def sigma(self) -> np.ndarray:
        """The per-atom σ (eV/Å) that ``add_above_sigma`` compares with (after the picks so far)."""
        raise NotImplementedError

    def picked(self, i: int) -> None:
        """Atom ``i`` was picked."""


def _greedy(cand: Candidate, ctx: AcquisitionContext, scorer: _Scorer) -> tuple[np.ndarray, np.ndarray]:
    """Pick atoms one at a time: the highest score among the allowed atoms (ties: larger σ, then
    lower index).  Allowed: not picked, species cap not reached; while some allowed atom's σ
    exceeds ``add_above_sigma``, only those.  Stops at ``atoms_per_call`` atoms, or with
    ``add_above_sigma`` when no allowed atom is above it (at least ``atoms_per_call``, at most
    ``max_atoms_per_call``).  Returns (order, scores at pick time)."""
    s = ctx.settings
    n = len(cand.atoms)
    numbers = np.asarray(cand.atoms.get_atomic_numbers())
    limit = n if s.add_above_sigma is not None else s.atoms_per_call
    if s.max_atoms_per_call is not None:
        limit = min(limit, s.max_atoms_per_call)
    limit = min(limit, n)
    taken = np.zeros(n, dtype=bool)
    per_species: dict[int, int] = {}
    order: list[int] = []
    scores: list[float] = []
    while len(order) < limit:
        allowed = ~taken
        for z, cap in s.max_atoms_per_species.items():
            if per_species.get(int(z), 0) >= cap:
                allowed &= numbers != z
        if not allowed.any():
            break
        if s.add_above_sigma is not None:
            above = allowed & (scorer.sigma() > s.add_above_sigma)
            if above.any():
                allowed = above
            elif len(order) >= s.atoms_per_call:
                break
        score = scorer.scores()
        sigma = scorer.sigma()
        cand_idx = np.flatnonzero(allowed)
        # lexsort: last key first; ascending, so negate the keys wanted large
        best = cand_idx[np.lexsort((cand_idx, -sigma[cand_idx], -score[cand_idx]))[0]]
        order.append(int(best))
        scores.append(float(score[best]))
        taken[best] = True
        per_species[int(numbers[best])] = per_species.get(int(numbers[best]), 0) + 1
        scorer.picked(int(best))
    return np.array(order, dtype=np.int64), np.array(scores)


def _bonus(cand: Candidate, ctx: AcquisitionContext, dist: _FrameDistances | None) -> np.ndarray:
    """β·d_min per atom (score units per eV times eV); zeros when β = 0.  Without training data
    d_min is infinite and the bonus is left out (it would rank nothing)."""
    beta = ctx.settings.exploration_bonus
    if beta == 0 or dist is None:
        return np.zeros(len(cand.atoms))
    d = np.asarray(dist.d_train, dtype=np.float64)
    return np.where(np.isfinite(d), beta * d, 0.0)


#: kernel distances are asked for at most this many atoms of a frame, which bounds a selection's
#: distance work at (N training + picks) × 2048 kernel evaluations: in larger frames the atoms of
#: largest σ; the others count as known (d = 0)
MAX_DISTANCE_ATOMS = 2048


class _FrameDistances:
    """Kernel distances of a candidate's n atoms, of which only ``idx`` (None: all) are measured:
    ``d_train`` (n,) eV (0 -- known -- for atoms not measured) and ``row(i)`` (n,) = d(x_i, ·)
    (inf where not measured: no information), asked of the model view atom by atom (one row per
    picked atom: n kernel evaluations, where the n × n matrix would cost n²)."""

    def __init__(self, cand: Candidate, view: ModelView, d_train: np.ndarray, idx: np.ndarray | None) -> None:
        n = len(cand.atoms)
        self.atoms, self.view, self.n, self.idx = cand.atoms, view, n, idx
        if idx is None:
            self.d_train = np.asarray(d_train, dtype=np.float64)
            self._pos = None
        else:
            self.d_train = np.zeros(n)
            self.d_train[idx] = d_train
            self._pos = np.full(n, -1, dtype=np.int64)
            self._pos[idx] = np.arange(len(idx))

    def row(self, i: int) -> np.ndarray:
        if self._pos is not None and self._pos[i] < 0:
            return np.full(self.n, np.inf)
        m = self.n if self.idx is None else len(self.idx)
        d = np.asarray(self.view.kernel_distances(self.atoms, None if self.idx is None else self.idx.tolist(),
                                                  rows=[int(i)], train=False).d_within)
        if d.shape != (1, m):
            raise InvalidInput(f"model view returned a kernel-distance row of shape {d.shape} for {m} atoms")
        if self.idx is None:
            return d[0].astype(np.float64)
        out = np.full(self.n, np.inf)
        out[self.idx] = d[0]
        return out


def _distances(cand: Candidate, ctx: AcquisitionContext, needed: bool) -> _FrameDistances | None:
    if not needed:
        return None
    if ctx.model is None:
        raise InvalidInput("this acquisition needs a model view (kernel distances) but the context has none")
    n = len(cand.atoms)
    idx = None
    if n > MAX_DISTANCE_ATOMS:
        idx = np.sort(np.argsort(-cand.sigma, kind="stable")[:MAX_DISTANCE_ATOMS])
    dist = ctx.model.kernel_distances(cand.atoms, None if idx is None else idx.tolist(), rows=[])
    m = n if idx is None else len(idx)
    if np.shape(dist.d_train) != (m,):
        raise InvalidInput(f"model view returned d_train of shape {np.shape(dist.d_train)} for {m} atoms")
    return _FrameDistances(cand, ctx.model, dist.d_train, idx)


class _Static(_Scorer):
    def __init__(self, score: np.ndarray, sigma: np.ndarray) -> None:
        self._score, self._sigma = score, sigma

    def scores(self):
        return self._score

    def sigma(self):
        return self._sigma


class _RandomOrder(_Static):
    """A random permutation as scores: the greedy loop then draws uniformly (caps still apply)."""


class _FPS(_Scorer):
    """D_i = min(d_train_i, min over picked j of d_ij) (+ bonus).  A picked atom's row of
    distances is asked for when the next pick needs it (none after the last pick)."""

    def __init__(self, dist: _FrameDistances, bonus: np.ndarray, sigma: np.ndarray) -> None:
        self.dist = dist
        self.D = np.array(dist.d_train, dtype=np.float64)
        self.bonus = bonus
        self._sigma = sigma
        self._pending: list[int] = []

    def scores(self):
        for i in self._pending:
            self.D = np.minimum(self.D, self.dist.row(i))
        self._pending = []
        return self.D + self.bonus

    def sigma(self):
        return self._sigma

    def picked(self, i):
        self._pending.append(i)


class _InfoGain(_Scorer):
    """g_i = ½ log(1 + σ_i|S² / σn²) with σ_i|S conditioned on the atoms S picked so far (+ bonus).
    The conditioned σ is asked for when the next pick needs it (none after the last pick)."""

    def __init__(self, cand: Candidate, ctx: AcquisitionContext, bonus: np.ndarray) -> None:
        if not ctx.noise > 0:
            raise InvalidInput(f"info_gain needs the model noise σn > 0 eV/Å, got {ctx.noise}")
        if ctx.model is None:
            raise InvalidInput("info_gain needs a model view (conditional σ) but the context has none")
        self.cand, self.ctx, self.bonus = cand, ctx, bonus
        self._sigma = cand.sigma
        self.chosen: list[int] = []
        self._stale = False

    def scores(self):
        return 0.5 * np.log1p((self.sigma() / self.ctx.noise) ** 2) + self.bonus

    def sigma(self):
        if self._stale:
            self._stale = False
            sigma = np.asarray(self.ctx.model.conditional_sigma(self.cand.atoms,
                                                                [(self.cand.atoms, list(self.chosen))]))
            if sigma.shape != self._sigma.shape:
                raise InvalidInput(f"model view returned σ of shape {sigma.shape} for {len(self.cand.atoms)} atoms")
            # conditioning never raises a variance; round-off aside, keep σ monotone
            self._sigma = np.minimum(self._sigma, sigma)
        return self._sigma

    def picked(self, i):
        self.chosen.append(i)
        self._stale = True


def _result(order: np.ndarray, scores: np.ndarray, frame_score: float, rule: str) -> Selection:
    return Selection(atoms=np.sort(order), order=order, scores=scores, frame_score=float(frame_score), rule=rule)


class MaxSigma:
    """The atoms of largest σ (FLARE): s_i = σ_i/τ + β·d_min,i; frame score max_i s_i."""

    name = "max_sigma"

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection:
        dist = _distances(cand, ctx, ctx.settings.exploration_bonus > 0)
        tau = ctx.threshold if ctx.threshold > 0 else 1.0
        score = cand.sigma / tau + _bonus(cand, ctx, dist)
        order, picked = _greedy(cand, ctx, _Static(score, cand.sigma))
        return _result(order, picked, score.max(initial=0.0), self.name)


class RandomAtoms:
    """Atoms drawn uniformly with the context's generator (a baseline); frame score as ``max_sigma``."""

    name = "random"

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection:
        dist = _distances(cand, ctx, ctx.settings.exploration_bonus > 0)
        tau = ctx.threshold if ctx.threshold > 0 else 1.0
        frame = (cand.sigma / tau + _bonus(cand, ctx, dist)).max(initial=0.0)
        draw = ctx.rng.permutation(len(cand.atoms)).astype(np.float64)
        order, _ = _greedy(cand, ctx, _RandomOrder(draw, cand.sigma))
        return _result(order, np.full(len(order), np.nan), frame, self.name)


class FarthestPoint:
    """Farthest-point sampling in the kernel metric against the training set and the atoms
    already picked: pick argmax_i min(d_train_i, min_j∈S d_ij) (+ β·d_min,i); frame score
    max_i (d_train_i + β·d_train_i) — the frame farthest from what the model knows first."""

    name = "fps"

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection:
        dist = _distances(cand, ctx, True)
        bonus = _bonus(cand, ctx, dist)
        scorer = _FPS(dist, bonus, cand.sigma)
        d0 = scorer.scores().copy()
        order, picked = _greedy(cand, ctx, scorer)
        # inf (every frame alike) while the model has no training environment
        return _result(order, picked, float(d0.max()) if len(d0) else 0.0, self.name)


class InfoGain:
    """Greedy batch information gain: pick argmax_i ½ log(1 + σ_i|S²/σn²) (+ β·d_min,i), then
    condition the GP on the picked environment before the next pick; frame score Σ over the
    picks of the gain each was picked with."""

    name = "info_gain"

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection:
        dist = _distances(cand, ctx, ctx.settings.exploration_bonus > 0)
        order, picked = _greedy(cand, ctx, _InfoGain(cand, ctx, _bonus(cand, ctx, dist)))
        return _result(order, picked, float(picked.sum()), self.name)


class Hybrid:
    """``fps`` while ``call_index <= hybrid_fps_calls`` (oracle calls 1..K after the first frame) or,
    with ``hybrid_max_z2`` set, while the mean z² of σ at the oracle calls so far exceeds it (σ is
    too far off to rank by); ``max_sigma`` after; ``Selection.rule`` says which decided."""

    name = "hybrid"

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection:
        s = ctx.settings
        poorly_calibrated = (s.hybrid_max_z2 is not None and ctx.calibration_z2 is not None
                             and ctx.calibration_z2 > s.hybrid_max_z2)
        rule = FarthestPoint() if ctx.call_index <= s.hybrid_fps_calls or poorly_calibrated else MaxSigma()
        sel = rule.select(cand, ctx)
        return Selection(sel.atoms, sel.order, sel.scores, sel.frame_score, f"hybrid:{rule.name}")


class Acquisition(Protocol):
    name: str

    def select(self, cand: Candidate, ctx: AcquisitionContext) -> Selection: ...


#: ``policy.acquisition`` names -> factories
ACQUISITION: dict[str, Callable[[], Acquisition]] = {
    "max_sigma": MaxSigma, "random": RandomAtoms, "fps": FarthestPoint, "info_gain": InfoGain, "hybrid": Hybrid,
}
