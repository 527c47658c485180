"""Map an exact GP onto the cubic B-splines of :class:`~learner_service.mapped.MappedModel`.

The GP's local energy of atom i is a sum over its environment's clusters
(:mod:`learner_service.kernels`: ``E_i = 1/2 sum_pairs eps2 + 1/3 sum_triplets eps3`` and the
mean ``eps = sum_rows alpha_row k(row, cluster)``), each term depending only on that cluster's
distances and species.  So

* ``phi2_{ab}(r)`` = the 2-body part of the local-energy mean of a centre of species a with one
  neighbour of species b at distance r (``r < r2[a, b]``; 0 beyond), and
* ``phi3_{c;ab}(r1, r2, r12)`` = the 3-body part of the local-energy mean of a centre c with
  one triplet: neighbours a at r1, b at r2, r12 apart (0 unless ``r1 < r3[c,a]``,
  ``r2 < r3[c,b]``, ``r12 < r3[a,b]`` -- :mod:`learner_service.environment`'s rule),

evaluated with the GP's own kernel code (:func:`learner_service.kernels.prediction_blocks` on
synthetic one-cluster environments with the cutoff weights of :mod:`environment`), and the
mapped energy ``sum_i [sum_j phi2 + sum_{j<k} phi3]`` is the GP's total energy up to the spline
error.  The 3-body function is evaluated as a function of three independent numbers (also
where no triangle exists), which keeps the tensor-product fit well posed.

Fit: least squares on a tensor grid of ``samples`` points per knot interval and axis; on a
tensor grid the least-squares problem separates, ``C = A1^+ (x) A2^+ (x) A3^+ F``.  Constraints
(by dropping basis functions): at each axis's clamped end (the cutoff) the last two
coefficients are 0, so value and slope vanish there (the GP's ``(r_c - r)^2`` cutoff has both
zero); on the ``r_jk`` axis (``[0, 2 r3]``, UF3's layout) every B-spline starting at or beyond
``r3[a, b]`` is 0, so the spline is exactly zero past the cross cutoff.  Same-species blocks
(``a == b``) are symmetrised in their first two axes.

Default grid: ``DEFAULT_SPACING_2`` (2-body), ``DEFAULT_SPACING_3`` (3-body r_ij, r_ik) and
``DEFAULT_SPACING_JK`` (3-body r_jk) Å knot spacing (docs/mapping.md: the errors they give).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from protos.errors import InvalidInput, ModelError

from .environment import EnvironmentBatch
from .kernels import prediction_blocks
from .mapped import MappedModel, design_matrix, uniform_knots

__all__ = ["map_gp", "twobody_energy", "threebody_energy", "DEFAULT_SPACING_2", "DEFAULT_SPACING_3",
           "DEFAULT_SPACING_JK", "DEFAULT_SAMPLES"]

#: Å, knot spacing of the 2-body splines (coarsened to at most ``MAX_INTERVALS_2`` intervals)
DEFAULT_SPACING_2 = 0.05
#: LAMMPS reads a uf3 coefficient vector through a 1024-character buffer
#: (:data:`learner_service.lammps_export.UF3_MAX_LINE`): 78 coefficients fit at 1e-9 eV
MAX_INTERVALS_2 = 75
#: Å, knot spacing of the 3-body splines' r_ij and r_ik axes
DEFAULT_SPACING_3 = 0.2
#: Å, knot spacing of the r_jk axis: finer, as the GP term has its cutoff kink (r3 - r_jk)^2
#: inside this axis (UF3 runs it to 2 r3) where a cubic spline is C2
DEFAULT_SPACING_JK = 0.1
#: meV/Å, largest mapped-vs-GP force error ``epicycle map`` accepts before refining the default grid
DEFAULT_TOLERANCE_MEV = 1.0
#: factor applied to the default knot spacings at each refinement, and the most refinements
REFINE_FACTOR = 0.75
MAX_REFINEMENTS = 3
#: least-squares sample points per knot interval and axis
DEFAULT_SAMPLES = 2
#: test environments per kernel call (bounds the (rows, m, 4) blocks' memory)
_CHUNK = 4096


def _gp_state(gp):
    st = gp._factorize()
    if st is None:
        raise ModelError("the GP has no training data: nothing to map")
    return st


def _energies(gp, envs: EnvironmentBatch, use2: bool, use3: bool) -> np.ndarray:
    """Local-energy mean (eV) of each environment of ``envs`` from the 2- or 3-body part."""
    st = _gp_state(gp)
    h = gp._hyps
    train = gp._training_batch()
    groups = gp._training_groups()
    K2, K3, _, _ = prediction_blocks(train, groups, envs, len(gp.species), h["ls2"], h["ls3"],
                                     use2=use2, use3=use3, threads=gp.predict_threads)
    K = (h["sig2"] ** 2) * K2[:, :, 0] if use2 else (h["sig3"] ** 2) * K3[:, :, 0]
    return K.T @ st.alpha


def _bond_batch(center: int, neighbour: int, r: np.ndarray, rc: float) -> EnvironmentBatch:
    m = len(r)
    b = EnvironmentBatch.empty()
    b.center_species = np.full(m, center, np.int64)
    b.center_atom = np.zeros(m, np.int64)
    b.bond_offsets = np.arange(m + 1, dtype=np.int64)
    b.bond_r = np.ascontiguousarray(r, dtype=np.float64)
    b.bond_rc = np.full(m, rc)
    b.bond_f = (rc - b.bond_r) ** 2
    b.bond_df = -2.0 * (rc - b.bond_r)
    b.bond_u = np.tile([1.0, 0.0, 0.0], (m, 1))
    b.bond_species = np.full(m, neighbour, np.int64)
    b.bond_atom = np.ones(m, np.int64)
    b.trip_offsets = np.zeros(m + 1, np.int64)
    return b


def _triplet_batch(c: int, a: int, b: int, r: np.ndarray, rc: tuple[float, float, float],
                   n_species: int) -> EnvironmentBatch:
    """One environment per row of ``r`` (m, 3) = (r_ca, r_cb, r_ab) with one triplet each."""
    m = len(r)
    out = EnvironmentBatch.empty()
    out.center_species = np.full(m, c, np.int64)
    out.center_atom = np.zeros(m, np.int64)
    out.bond_offsets = np.zeros(m + 1, np.int64)
    out.trip_offsets = np.arange(m + 1, dtype=np.int64)
    out.trip_r = np.ascontiguousarray(r, dtype=np.float64)
    f = [(rc[q] - r[:, q]) ** 2 for q in range(3)]
    out.trip_F = f[0] * f[1] * f[2]
    out.trip_dF = np.zeros((m, 2))
    out.trip_u = np.zeros((m, 2, 3))
    out.trip_u[:, 0, 0] = 1.0
    out.trip_u[:, 1, 1] = 1.0
    out.trip_species = np.tile([c, a, b], (m, 1)).astype(np.int64)
    s = sorted((c, a, b))
    out.trip_key = np.full(m, (s[0] * n_species + s[1]) * n_species + s[2], np.int64)
    return out


def twobody_energy(gp, a: int, b: int, r) -> np.ndarray:
    """phi2 of species indices (a, b) at distances r (Å): the GP's 2-body local-energy mean of
    a centre a with one neighbour b (eV); 0 at and beyond the pair's 2-body cutoff."""
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    rc = float(gp.cutoffs.twobody[a, b])
    out = np.zeros(len(r))
    inside = np.nonzero((r < rc) & (r >= 0))[0]
    for lo in range(0, len(inside), _CHUNK):
        idx = inside[lo:lo + _CHUNK]
        out[idx] = _energies(gp, _bond_batch(a, b, r[idx], rc), use2=True, use3=False)
    return out


def threebody_energy(gp, c: int, a: int, b: int, r, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """phi3 of centre c and neighbours (a, b) at rows (r_ca, r_cb, r_ab) of ``r`` (m, 3), eV:
    the GP's 3-body local-energy mean of that one triplet; 0 outside the 3-body cutoffs."""
    r = np.asarray(r, dtype=np.float64).reshape(-1, 3)
    r3 = gp.cutoffs.threebody
    rc = (float(r3[c, a]), float(r3[c, b]), float(r3[a, b]))
    out = np.zeros(len(r))
    inside = np.nonzero((r[:, 0] < rc[0]) & (r[:, 1] < rc[1]) & (r[:, 2] < rc[2]) & (r >= 0).all(axis=1))[0]
    n_species = len(gp.species)
    for lo in range(0, len(inside), _CHUNK):
        idx = inside[lo:lo + _CHUNK]
        out[idx] = _energies(gp, _triplet_batch(c, a, b, r[idx], rc, n_species), use2=False, use3=True)
        if progress is not None:
            progress(min(lo + _CHUNK, len(inside)), len(inside))
    return out


def _samples(knots: np.ndarray, per_interval: int, upto: float | None = None) -> np.ndarray:
    """``per_interval`` points in each knot interval (at (q + 1/2) / per_interval of it)."""
    inner = np.unique(knots)
    frac = (np.arange(per_interval) + 0.5) / per_interval
    x = (inner[:-1, None] + np.diff(inner)[:, None] * frac[None, :]).ravel()
    return x if upto is None else x[x < upto]


def _free_columns(knots: np.ndarray, zero_from: float | None) -> np.ndarray:
    """Indices of the coefficients left free: all but the last two (value and slope 0 at the
    clamped end) and, with ``zero_from``, all but those whose B-spline starts at or beyond it."""
    n = len(knots) - 4
    free = np.arange(n - 2)
    if zero_from is not None:
        free = free[knots[free] < zero_from - 1e-12]
    return free


def _lsq_operator(knots: np.ndarray, x: np.ndarray, free: np.ndarray) -> np.ndarray:
    """(n_coef, len(x)) map from sample values to coefficients (pseudo-inverse on the free set)."""
    A = design_matrix(knots, x)[:, free]
    P = np.zeros((len(knots) - 4, len(x)))
    P[free] = np.linalg.pinv(A, rcond=1e-12)
    return P


def _intervals(r_max: float, spacing: float) -> int:
    if not (spacing > 0 and math.isfinite(spacing)):
        raise InvalidInput(f"knot spacing must be a positive number of Å, got {spacing}")
    return max(4, int(math.ceil(r_max / spacing - 1e-9)))


def threebody_knots(cut: float, spacing3: float, spacing_jk: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Knots of a 3-body spline with cutoff ``cut`` (Å): (r_ij and r_ik axes, r_jk axis over [0, 2·cut])."""
    n = _intervals(cut, spacing3)
    return uniform_knots(cut, n), uniform_knots(2 * cut, 2 * (_intervals(cut, spacing_jk) if spacing_jk else n))


def map_gp(gp, spacing2: float = DEFAULT_SPACING_2, spacing3: float = DEFAULT_SPACING_3,
           samples: int = DEFAULT_SAMPLES, body_order: int | None = None,
           log: Callable[[str], None] | None = None, spacing_jk: float | None = DEFAULT_SPACING_JK,
           uf3: bool = True) -> MappedModel:
    """The :class:`MappedModel` of an exact :class:`~learner_service.gp.GaussianProcess`.

    ``spacing2``/``spacing3``: knot spacing (Å) of the 2-/3-body splines (rounded down so that
    the cutoff is a knot); ``samples``: least-squares points per knot interval and axis (>= 1);
    ``spacing_jk``: knot spacing (Å) of the r_jk axis alone (None: ``spacing3``; UF3 allows a
    different uniform spacing per axis);
    ``uf3``: keep the result writable as a LAMMPS ``pair_style uf3`` file -- at most
    ``MAX_INTERVALS_2`` 2-body intervals and coefficients rounded as the file holds them
    (:func:`learner_service.lammps_export.uf3_compatible`), so that LAMMPS and our evaluator use
    the same numbers;
    ``body_order``: 2 drops the 3-body term (default: 3 if the GP has a 3-body kernel with a
    non-zero 3-body cutoff and signal, else 2).
    """
    from .gp import GaussianProcess

    if not isinstance(gp, GaussianProcess):
        raise InvalidInput(f"can map an exact GaussianProcess only, got {type(gp).__name__}")
    samples = int(samples)
    if samples < 1:
        raise InvalidInput(f"samples per knot interval must be >= 1, got {samples}")
    log = log or (lambda msg: None)
    _gp_state(gp)
    S = len(gp.species)
    r2 = gp.cutoffs.twobody
    r3 = gp.cutoffs.threebody
    h = gp.hyperparameters
    if body_order is None:
        body_order = 3 if (gp.cutoffs.r3 > 0 and h["sig3"] != 0) else 2
    if body_order not in (2, 3):
        raise InvalidInput(f"body order must be 2 or 3, got {body_order}")
    t0 = time.perf_counter()

    # ---- 2-body: one spline per unordered species pair on [0, max(r2, r3)] (LAMMPS finds the
    # 3-body neighbours among the 2-body ones, so the 2-body cutoff must cover the 3-body one)
    twobody = {}
    for a in range(S):
        for b in range(a, S):
            cut = float(r2[a, b])
            if body_order == 3:
                cut = max(cut, float(r3[a, b]), float(r3[a].max()), float(r3[b].max()))
            knots = uniform_knots(cut, min(_intervals(cut, spacing2), max(MAX_INTERVALS_2, 4)) if uf3
                                  else _intervals(cut, spacing2))
            x = _samples(knots, samples)
            y = twobody_energy(gp, a, b, x)
            y_ba = twobody_energy(gp, b, a, x) if a != b else y
            coef = _lsq_operator(knots, x, _free_columns(knots, float(r2[a, b]) if r2[a, b] < cut else None)) @ \
                (0.5 * (y + y_ba))
            twobody[(a, b)] = (knots, coef)
    log(f"2-body: {len(twobody)} pair spline(s), {len(knots) - 4} coefficients each "
        f"({float(knots[4] - knots[3]):.4g} Å knots), {time.perf_counter() - t0:.1f} s")

    # ---- 3-body: one tensor spline per centre c and neighbour pair a <= b
    threebody = {}
    if body_order == 3:
        for c in range(S):
            for a in range(S):
                for b in range(a, S):
                    t1 = time.perf_counter()
                    cut = float(max(r3[c, a], r3[c, b]))
                    if cut <= 0:
                        k12, k3 = threebody_knots(1.0, 0.25, None)  # no 3-body term: zero spline, nominal range
                    else:
                        k12, k3 = threebody_knots(cut, spacing3, spacing_jk)
                    shape = (len(k12) - 4, len(k12) - 4, len(k3) - 4)
                    if min(r3[c, a], r3[c, b], r3[a, b]) <= 0:
                        threebody[(c, a, b)] = (k12, k12.copy(), k3, np.zeros(shape))
                        continue
                    # samples over whole axes: the GP term is 0 outside its cutoffs
                    x1 = x2 = _samples(k12, samples)
                    x3 = _samples(k3, samples)
                    n1, n3 = len(x1), len(x3)
                    if a == b:  # phi3(r1, r2, r12) = phi3(r2, r1, r12): evaluate r1 <= r2 only
                        i1, i2 = np.triu_indices(n1)
                    else:
                        i1, i2 = (g.ravel() for g in np.meshgrid(np.arange(n1), np.arange(n1), indexing="ij"))
                    grid = np.empty((len(i1), n3, 3))
                    grid[:, :, 0] = x1[i1, None]
                    grid[:, :, 1] = x2[i2, None]
                    grid[:, :, 2] = x3[None, :]
                    name = f"{gp.species[c]}-{gp.species[a]}-{gp.species[b]}"
                    last = [0.0]

                    def progress(done, total, name=name, last=last):
                        now = time.perf_counter()
                        if now - last[0] > 10 or done == total:
                            last[0] = now
                            log(f"3-body {name}: {done}/{total} grid points")

                    vals = threebody_energy(gp, c, a, b, grid.reshape(-1, 3), progress=progress).reshape(-1, n3)
                    F = np.zeros((n1, n1, n3))
                    F[i1, i2] = vals
                    if a == b:
                        F[i2, i1] = vals
                    P1 = _lsq_operator(k12, x1, _free_columns(k12, float(r3[c, a]) if r3[c, a] < cut else None))
                    P2 = _lsq_operator(k12, x2, _free_columns(k12, float(r3[c, b]) if r3[c, b] < cut else None))
                    P3 = _lsq_operator(k3, x3, _free_columns(k3, float(r3[a, b])))
                    coef = np.einsum("ia,jb,kc,abc->ijk", P1, P2, P3, F, optimize=True)
                    if a == b:
                        coef = 0.5 * (coef + coef.transpose(1, 0, 2))
                    threebody[(c, a, b)] = (k12, k12.copy(), k3, coef)
                    log(f"3-body {name}: {shape[0]}x{shape[1]}x{shape[2]} coefficients from a {n1}x{n1}x{n3} "
                        f"grid ({spacing3:g} Å knots, {spacing_jk or spacing3:g} Å along r_jk), "
                        f"{time.perf_counter() - t1:.1f} s")

    meta = {
        "source": "epicycle exact GP",
        "source_version": int(gp.version),
        "species": list(gp.species),
        "cutoffs": {"twobody": gp.cutoffs.r2, "threebody": gp.cutoffs.r3, "pairs": gp.cutoffs.pair_dict()},
        "hyperparameters": {k: float(v) for k, v in h.items()},
        "energy_reference_eV": {str(z): float(mu) for z, mu in zip(gp.species, gp.energy_reference)},
        "n_environments": int(gp.n_environments),
        "n_labels": int(gp.n_labels),
        "grid": {"spacing2_A": float(spacing2),
                 "spacing2_used_A": sorted({float(k[4] - k[3]) for k, _ in twobody.values()}),
                 "spacing3_A": float(spacing3),
                 "spacing_jk_A": float(spacing_jk or spacing3), "samples_per_interval": samples,
                 "body_order": body_order},
        "mapping_seconds": round(time.perf_counter() - t0, 3),
    }
    model = MappedModel(gp.species, twobody, threebody, meta)
    if uf3:
        from .lammps_export import uf3_compatible

        model = uf3_compatible(model)
    return model


def force_errors(gp, mapped: MappedModel, frames: Sequence) -> dict:
    """Mapped-vs-GP force differences on ``frames`` (ase.Atoms): max and RMS in meV/Å, and the
    largest GP force for scale (eV/Å)."""
    diffs = []
    fmax = 0.0
    for atoms in frames:
        f_gp = gp.predict(atoms).forces
        f_map = mapped.predict(atoms).forces
        diffs.append((f_map - f_gp).ravel())
        fmax = max(fmax, float(np.abs(f_gp).max(initial=0.0)))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size == 0:
        return {"frames": len(frames), "components": 0, "max_meV_A": float("nan"), "rms_meV_A": float("nan")}
    return {"frames": len(frames), "components": int(d.size), "max_meV_A": float(1e3 * np.abs(d).max()),
            "rms_meV_A": float(1e3 * np.sqrt(np.mean(d ** 2))), "max_gp_force_eV_A": fmax}


def training_environment_errors(gp, mapped: MappedModel, max_environments: int | None = None) -> dict:
    """Mapped-vs-GP force on the central atom of each training environment (meV/Å).

    Each environment is rebuilt as a free cluster (centre + its neighbours); the centre's force
    depends only on clusters that contain it, all of which lie within the cutoffs of the centre,
    so the cluster gives the centre the same force as its structure did (periodic images of the
    centre itself become ordinary atoms, which changes GP and mapped force alike).  Needs every
    3-body cutoff <= the 2-body cutoff of the same pair (the stored bonds are the 2-body ones);
    otherwise returns ``{"environments": 0, ...}`` with a ``note``."""
    from ase import Atoms

    batch = gp._training_batch()
    if np.any(gp.cutoffs.threebody > gp.cutoffs.twobody):
        return {"environments": 0, "components": 0, "max_meV_A": float("nan"), "rms_meV_A": float("nan"),
                "note": "a 3-body cutoff exceeds a 2-body cutoff: training environments miss neighbours"}
    n = len(batch) if max_environments is None else min(len(batch), int(max_environments))
    species = np.asarray(gp.species)
    diffs = []
    for e in range(n):
        b0, b1 = batch.bond_offsets[e], batch.bond_offsets[e + 1]
        pos = np.vstack([np.zeros((1, 3)), batch.bond_r[b0:b1, None] * batch.bond_u[b0:b1]])
        numbers = np.concatenate([[species[batch.center_species[e]]], species[batch.bond_species[b0:b1]]])
        atoms = Atoms(numbers=numbers, positions=pos, pbc=False)
        f_gp = gp.predict(atoms, atom_indices=[0]).forces[0]
        f_map = mapped.predict(atoms).forces[0]
        diffs.append(f_map - f_gp)
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size == 0:
        return {"environments": 0, "components": 0, "max_meV_A": float("nan"), "rms_meV_A": float("nan")}
    return {"environments": n, "components": int(d.size), "max_meV_A": float(1e3 * np.abs(d).max()),
            "rms_meV_A": float(1e3 * np.sqrt(np.mean(d ** 2)))}
