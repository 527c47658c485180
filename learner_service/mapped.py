"""Mapped (tabulated) 2+3-body model: cubic B-splines in the convention of LAMMPS ``pair_style uf3``.

A :class:`MappedModel` is the GP's local-energy mean written as

    E = sum_i sum_{j != i}  phi2_{s_i s_j}(r_ij)
      + sum_i sum_{j < k}   phi3_{s_i s_j s_k}(r_ij, r_ik, r_jk)

(every ordered pair (i, j) within the pair's cutoff, i.e. each bond twice; every unordered
pair {j, k} of neighbours of a centre i, each triplet once per centre) -- exactly the sum that
LAMMPS's ``pair_style uf3`` evaluates (``src/ML-UF3/pair_uf3.cpp``, ``compute()``: a full
neighbour list, the 2-body force applied to both atoms at each of the two visits, the 3-body
loop ``kk > jj``).  ``phi2`` and ``phi3`` are cubic B-spline expansions on *clamped uniform*
knot vectors (the ``uk`` knots of UF3): for an axis ``[0, r_c]`` with ``n`` intervals of width
``h = r_c / n`` the knots are ``0, 0, 0, 0, h, 2h, ..., r_c, r_c, r_c, r_c`` (``n + 7`` knots,
``n + 3`` coefficients).  The 3-body block of centre species ``c`` and neighbour species
``(a, b)`` has axes ``(r_ij, r_ik, r_jk)`` in that order (UF3's coefficient matrix
``[I][J][K]`` with I along r_ij, J along r_ik, K along r_jk); ``r_ij, r_ik`` run over ``[0,
r3]`` and ``r_jk`` over ``[0, 2 r3]`` (UF3 requires ``Rjk_CUTOFF = 2 Rij_CUTOFF = 2
Rik_CUTOFF``).  Only blocks with ``a <= b`` are stored; ``(c, b, a)`` is the same block with
``r_ij`` and ``r_ik`` swapped (UF3 fills ``[i][k][j]`` as the transpose).  Blocks with ``a ==
b`` are symmetric in their first two axes.

Units: Å, eV; forces eV/Å; stress eV/Å^3 in ASE Voigt order (xx, yy, zz, yz, xz, xy) and
ASE's sign (``stress = (1/V) dE/d(strain)``: negative under compression of a repulsive
solid).  The model file is one ``.npz`` with a JSON header (``format: epicycle-mapped``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from protos.errors import InvalidInput, NotFound

from .environment import neighbour_pairs, species_indices

__all__ = ["MappedModel", "MappedPrediction", "uniform_knots", "bspline_basis", "FORMAT", "FORMAT_VERSION"]

FORMAT = "epicycle-mapped"
FORMAT_VERSION = 1


def uniform_knots(r_max: float, n_intervals: int, r_min: float = 0.0) -> np.ndarray:
    """Clamped uniform cubic knot vector on ``[r_min, r_max]`` (UF3 ``uk``): (n_intervals + 7,)."""
    n_intervals = int(n_intervals)
    if n_intervals < 1:
        raise InvalidInput(f"a spline needs at least one knot interval, got {n_intervals}")
    if not (np.isfinite(r_max) and r_max > r_min):
        raise InvalidInput(f"spline range [{r_min}, {r_max}] Å is empty")
    # 12 significant digits: the knots print short and LAMMPS reads back the same doubles
    inner = np.array([float(f"{v:.12g}") for v in np.linspace(r_min, r_max, n_intervals + 1)])
    return np.concatenate([[r_min] * 3, inner, [r_max] * 3]).astype(np.float64)


# ---------------------------------------------------------------------------
# B-spline basis (Cox-de Boor; The NURBS Book, Alg. A2.2) with the derivative
# ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _span(t, x):
    """Index ``l`` with ``t[l] <= x < t[l+1]`` by UF3's uniform formula ``3 + int((x - t0)/h)``,
    ``h = t[4] - t[3]``, clipped to the valid intervals ``[3, len(t) - 5]``."""
    h = t[4] - t[3]
    l = 3 + int((x - t[0]) / h)
    if l < 3:
        l = 3
    last = t.shape[0] - 5
    if l > last:
        l = last
    return l


@njit(cache=True, inline="always")
def _basis(t, l, x, N, dN):
    """Values ``N[0..3]`` and derivatives ``dN[0..3]`` of the cubic B-splines ``l-3 .. l`` at x."""
    left = np.empty(4)
    right = np.empty(4)
    N2 = np.zeros(3)
    N[0] = 1.0
    for j in range(1, 4):
        left[j] = x - t[l + 1 - j]
        right[j] = t[l + j] - x
        saved = 0.0
        for r in range(j):
            den = right[r + 1] + left[j - r]
            temp = N[r] / den if den != 0.0 else 0.0
            N[r] = saved + right[r + 1] * temp
            saved = left[j - r] * temp
        N[j] = saved
        if j == 2:
            N2[0] = N[0]
            N2[1] = N[1]
            N2[2] = N[2]
    # dB_{m,3}/dx = 3 (B_{m,2}/(t[m+3]-t[m]) - B_{m+1,2}/(t[m+4]-t[m+1])); active quadratics l-2..l
    for a in range(4):
        m = l - 3 + a
        d = 0.0
        if a >= 1:
            den = t[m + 3] - t[m]
            if den > 0.0:
                d += N2[a - 1] / den
        if a <= 2:
            den = t[m + 4] - t[m + 1]
            if den > 0.0:
                d -= N2[a] / den
        dN[a] = 3.0 * d


@njit(cache=True)
def _basis_eval(t, x):
    l = _span(t, x)
    N = np.zeros(4)
    dN = np.zeros(4)
    _basis(t, l, x, N, dN)
    return l, N, dN


def bspline_basis(knots, x) -> tuple[int, np.ndarray, np.ndarray]:
    """``(l, N, dN)``: the interval index and the values/derivatives of the 4 non-zero cubic
    B-splines ``l-3 .. l`` of ``knots`` at ``x`` (for tests and the fitter)."""
    return _basis_eval(np.ascontiguousarray(knots, dtype=np.float64), float(x))


def design_matrix(knots, x, derivative: bool = False) -> np.ndarray:
    """(len(x), len(knots) - 4) matrix of the cubic B-splines (or their derivatives) at ``x``."""
    knots = np.ascontiguousarray(knots, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    A = np.zeros((len(x), len(knots) - 4))
    for p, xv in enumerate(x):
        l, N, dN = _basis_eval(knots, float(xv))
        A[p, l - 3:l + 1] = dN if derivative else N
    return A


# ---------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------


@njit(cache=True)
def _evaluate(n_atoms, c_off, nb_atom, nb_vec, spec,
              pair_id, knots, k_off, coef2, c2_off, cut2,
              trip_id, trip_swap, k3_id, coef3, c3_off, c3_shape, cut3, use3,
              energies, forces, virial):
    """Energies (n,), forces (n, 3) and virial sum_edges (dE/dr) vec (x) vec / r (3, 3).

    Neighbours of atom i: ``c_off[i]:c_off[i+1]`` into ``nb_atom`` (atom index) and ``nb_vec``
    (vector centre -> neighbour image, Å)."""
    max_nb = 0
    for i in range(n_atoms):
        max_nb = max(max_nb, c_off[i + 1] - c_off[i])
    short = np.zeros(max_nb, np.int64)
    cut3_centre = np.zeros(trip_id.shape[0])
    for c in range(trip_id.shape[0]):
        for a in range(trip_id.shape[1]):
            for b in range(trip_id.shape[2]):
                if trip_id[c, a, b] >= 0:
                    cut3_centre[c] = max(cut3_centre[c], cut3[trip_id[c, a, b]])
    N1 = np.zeros(4)
    dN1 = np.zeros(4)
    N2 = np.zeros(4)
    dN2 = np.zeros(4)
    N3 = np.zeros(4)
    dN3 = np.zeros(4)
    for i in range(n_atoms):
        si = spec[i]
        for m in range(c_off[i], c_off[i + 1]):
            j = nb_atom[m]
            sj = spec[j]
            p = pair_id[si, sj]
            vx = nb_vec[m, 0]
            vy = nb_vec[m, 1]
            vz = nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= cut2[p]:
                continue
            t = knots[k_off[2 * p]:k_off[2 * p + 1]]
            l = _span(t, r)
            _basis(t, l, r, N1, dN1)
            e = 0.0
            de = 0.0
            base = c2_off[p] + l - 3
            for a in range(4):
                e += coef2[base + a] * N1[a]
                de += coef2[base + a] * dN1[a]
            energies[i] += e
            g = de / r
            forces[i, 0] += g * vx
            forces[i, 1] += g * vy
            forces[i, 2] += g * vz
            forces[j, 0] -= g * vx
            forces[j, 1] -= g * vy
            forces[j, 2] -= g * vz
            virial[0, 0] += g * vx * vx
            virial[1, 1] += g * vy * vy
            virial[2, 2] += g * vz * vz
            virial[1, 2] += g * vy * vz
            virial[0, 2] += g * vx * vz
            virial[0, 1] += g * vx * vy
        if not use3:
            continue
        # short list: neighbours within the largest 3-body cutoff of this centre (pair_uf3's neighshort)
        ns = 0
        for m in range(c_off[i], c_off[i + 1]):
            vx = nb_vec[m, 0]
            vy = nb_vec[m, 1]
            vz = nb_vec[m, 2]
            if vx * vx + vy * vy + vz * vz <= cut3_centre[si] * cut3_centre[si]:
                short[ns] = m
                ns += 1
        for mi in range(ns):
            m = short[mi]
            j = nb_atom[m]
            sj = spec[j]
            for ni in range(mi + 1, ns):
                n = short[ni]
                k = nb_atom[n]
                sk = spec[k]
                b = trip_id[si, sj, sk]
                if b < 0:
                    continue
                rc = cut3[b]
                # the block's first axis is the neighbour of the lower species index
                if trip_swap[si, sj, sk]:
                    mm, nn, aj, ak = n, m, k, j
                else:
                    mm, nn, aj, ak = m, n, j, k
                x1, y1, z1 = nb_vec[mm, 0], nb_vec[mm, 1], nb_vec[mm, 2]
                x2, y2, z2 = nb_vec[nn, 0], nb_vec[nn, 1], nb_vec[nn, 2]
                r1 = np.sqrt(x1 * x1 + y1 * y1 + z1 * z1)
                if r1 > rc:
                    continue
                r2 = np.sqrt(x2 * x2 + y2 * y2 + z2 * z2)
                if r2 > rc:
                    continue
                x3, y3, z3 = x2 - x1, y2 - y1, z2 - z1
                r3 = np.sqrt(x3 * x3 + y3 * y3 + z3 * z3)
                t1 = knots[k_off[k3_id[b, 0]]:k_off[k3_id[b, 0] + 1]]
                t2 = knots[k_off[k3_id[b, 1]]:k_off[k3_id[b, 1] + 1]]
                t3 = knots[k_off[k3_id[b, 2]]:k_off[k3_id[b, 2] + 1]]
                l1 = _span(t1, r1)
                l2 = _span(t2, r2)
                l3 = _span(t3, r3)
                _basis(t1, l1, r1, N1, dN1)
                _basis(t2, l2, r2, N2, dN2)
                _basis(t3, l3, r3, N3, dN3)
                n2s = c3_shape[b, 1]
                n3s = c3_shape[b, 2]
                e = 0.0
                g1 = 0.0
                g2 = 0.0
                g3 = 0.0
                for a in range(4):
                    for c in range(4):
                        row = c3_off[b] + ((l1 - 3 + a) * n2s + (l2 - 3 + c)) * n3s + (l3 - 3)
                        s = 0.0
                        ds = 0.0
                        for d in range(4):
                            s += coef3[row + d] * N3[d]
                            ds += coef3[row + d] * dN3[d]
                        e += N1[a] * N2[c] * s
                        g1 += dN1[a] * N2[c] * s
                        g2 += N1[a] * dN2[c] * s
                        g3 += N1[a] * N2[c] * ds
                energies[i] += e
                # dE/dx_i = -g1 u1 - g2 u2; dE/dx_j = g1 u1 - g3 u3; dE/dx_k = g2 u2 + g3 u3
                a1 = g1 / r1
                a2 = g2 / r2
                a3 = g3 / r3 if r3 > 0.0 else 0.0
                forces[i, 0] += a1 * x1 + a2 * x2
                forces[i, 1] += a1 * y1 + a2 * y2
                forces[i, 2] += a1 * z1 + a2 * z2
                forces[aj, 0] += -a1 * x1 + a3 * x3
                forces[aj, 1] += -a1 * y1 + a3 * y3
                forces[aj, 2] += -a1 * z1 + a3 * z3
                forces[ak, 0] += -a2 * x2 - a3 * x3
                forces[ak, 1] += -a2 * y2 - a3 * y3
                forces[ak, 2] += -a2 * z2 - a3 * z3
                virial[0, 0] += a1 * x1 * x1 + a2 * x2 * x2 + a3 * x3 * x3
                virial[1, 1] += a1 * y1 * y1 + a2 * y2 * y2 + a3 * y3 * y3
                virial[2, 2] += a1 * z1 * z1 + a2 * z2 * z2 + a3 * z3 * z3
                virial[1, 2] += a1 * y1 * z1 + a2 * y2 * z2 + a3 * y3 * z3
                virial[0, 2] += a1 * x1 * z1 + a2 * x2 * z2 + a3 * x3 * z3
                virial[0, 1] += a1 * x1 * y1 + a2 * x2 * y2 + a3 * x3 * y3


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------


def save_tagged_npz(path, arrays: dict, meta: dict) -> Path:
    """Write ``arrays`` and the JSON header ``meta`` (with its ``format`` tag) as one compressed
    ``.npz``, atomically (a temporary file renamed into place)."""
    path = Path(path)
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(path)
    return path


def load_tagged_npz(path, fmt: str, what: str):
    """``(arrays, meta)`` of a file written by :func:`save_tagged_npz` whose format tag is ``fmt``;
    :class:`NotFound` / :class:`InvalidInput` naming ``what`` otherwise."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{what} file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path} is not an Epicycle {what} file: {exc}") from exc
    if meta.get("format") != fmt:
        raise InvalidInput(f"{path} is not an Epicycle {what} file (format {meta.get('format')!r})")
    return data, meta


@dataclass
class MappedPrediction:
    """Energy (eV), local energies (n,) eV, forces (n, 3) eV/Å, stress (6,) eV/Å^3 (ASE Voigt) or None."""

    energy: float
    local_energies: np.ndarray
    forces: np.ndarray
    stress: np.ndarray | None


@dataclass
class MappedModel:
    """Species (atomic numbers), splines and metadata; see the module docstring for conventions.

    * ``twobody[(a, b)]`` for species *indices* ``a <= b``: ``(knots, coefficients)``, knots
      clamped uniform on ``[0, cut]`` with ``cut = knots[-1]`` (Å), coefficients in eV.
    * ``threebody[(c, a, b)]`` for ``a <= b``: ``(knots_ij, knots_ik, knots_jk, coefficients)``,
      coefficients of shape ``(len(knots_ij) - 4, len(knots_ik) - 4, len(knots_jk) - 4)``; the
      3-body cutoff of the block is ``knots_ij[-1]`` (= ``knots_ik[-1]`` = ``knots_jk[-1] / 2``).
      Empty when the model is 2-body only.
    * ``metadata``: JSON-serialisable (source model version, hyperparameters, grid, errors);
      ``metadata["energy_reference_eV"]`` {atomic number: mu}: the source GP's prior mean of the
      local energy per species (eV/atom, learner_service/gp.py), added to every local energy.  A
      constant per atom, so forces and stress do not see it; LAMMPS's ``pair_style uf3`` has no
      1-body term, so LAMMPS energies lack sum_s n_s mu_s (the export's snippet states it).
    """

    species: tuple[int, ...]
    twobody: dict
    threebody: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.species = tuple(int(z) for z in self.species)
        s = len(self.species)
        if s == 0 or len(set(self.species)) != s:
            raise InvalidInput(f"a mapped model needs distinct species, got {self.species}")
        tb = {}
        for a in range(s):
            for b in range(a, s):
                if (a, b) not in self.twobody:
                    raise InvalidInput(f"mapped model has no 2-body spline for species pair "
                                       f"{self.species[a]}-{self.species[b]}")
                knots, coef = self.twobody[(a, b)]
                knots = np.ascontiguousarray(knots, dtype=np.float64)
                coef = np.ascontiguousarray(coef, dtype=np.float64)
                _check_knots(knots, f"2-body {self.species[a]}-{self.species[b]}")
                if coef.shape != (len(knots) - 4,) or not np.isfinite(coef).all():
                    raise InvalidInput(f"2-body {self.species[a]}-{self.species[b]}: expected "
                                       f"{len(knots) - 4} finite coefficients, got shape {coef.shape}")
                tb[(a, b)] = (knots, coef)
        self.twobody = tb
        th = {}
        if self.threebody:
            for c in range(s):
                for a in range(s):
                    for b in range(a, s):
                        name = f"{self.species[c]}-{self.species[a]}-{self.species[b]}"
                        if (c, a, b) not in self.threebody:
                            raise InvalidInput(f"mapped model has no 3-body spline for {name}")
                        k1, k2, k3, coef = self.threebody[(c, a, b)]
                        k1, k2, k3 = (np.ascontiguousarray(k, dtype=np.float64) for k in (k1, k2, k3))
                        for k, ax in ((k1, "r_ij"), (k2, "r_ik"), (k3, "r_jk")):
                            _check_knots(k, f"3-body {name} ({ax})")
                        if not (k1[-1] == k2[-1] and abs(k3[-1] - 2 * k1[-1]) <= 1e-12 * k1[-1]):
                            raise InvalidInput(f"3-body {name}: the r_ij and r_ik axes must end at the cutoff "
                                               f"and r_jk at twice it (pair_style uf3), got {k1[-1]}, {k2[-1]}, {k3[-1]}")
                        coef = np.ascontiguousarray(coef, dtype=np.float64)
                        shape = (len(k1) - 4, len(k2) - 4, len(k3) - 4)
                        if coef.shape != shape or not np.isfinite(coef).all():
                            raise InvalidInput(f"3-body {name}: expected finite coefficients of shape {shape}, "
                                               f"got {coef.shape}")
                        th[(c, a, b)] = (k1, k2, k3, coef)
        self.threebody = th
        self._packed = None

    # -- properties ---------------------------------------------------------

    @property
    def body_order(self) -> int:
        return 3 if self.threebody else 2

    def cutoff2(self, a: int, b: int) -> float:
        """2-body spline cutoff (Å) of species indices a, b."""
        return float(self.twobody[(min(a, b), max(a, b))][0][-1])

    def cutoff3(self, c: int, a: int, b: int) -> float:
        return float(self.threebody[(c, min(a, b), max(a, b))][0][-1]) if self.threebody else 0.0

    @property
    def max_cutoff(self) -> float:
        cuts = [k[-1] for k, _ in self.twobody.values()] + [v[0][-1] for v in self.threebody.values()]
        return float(max(cuts))

    # -- evaluation ---------------------------------------------------------

    def _pack(self):
        if self._packed is not None:
            return self._packed
        s = len(self.species)
        knots_list = []
        pair_id = np.full((s, s), -1, np.int64)
        coef2, c2_off, cut2 = [], [0], []
        pairs = sorted(self.twobody)
        for p, (a, b) in enumerate(pairs):
            pair_id[a, b] = pair_id[b, a] = p
            knots, coef = self.twobody[(a, b)]
            knots_list.append(knots)  # knot vector 2p ... (k_off[2p]:k_off[2p+1])
            knots_list.append(np.zeros(0))  # spacer so that k_off[2p+1] ends vector 2p
            coef2.append(coef)
            c2_off.append(c2_off[-1] + len(coef))
            cut2.append(knots[-1])
        trip_id = np.full((s, s, s), -1, np.int64)
        trip_swap = np.zeros((s, s, s), np.bool_)
        k3_id = np.zeros((max(1, len(self.threebody)), 3), np.int64)
        coef3, c3_off, c3_shape, cut3 = [], [0], np.zeros((max(1, len(self.threebody)), 3), np.int64), []
        for bidx, (c, a, b) in enumerate(sorted(self.threebody)):
            trip_id[c, a, b] = trip_id[c, b, a] = bidx
            if a != b:
                trip_swap[c, b, a] = True
            k1, k2, k3, coef = self.threebody[(c, a, b)]
            for ax, k in enumerate((k1, k2, k3)):
                k3_id[bidx, ax] = len(knots_list)
                knots_list.append(k)
            coef3.append(coef.ravel())
            c3_off.append(c3_off[-1] + coef.size)
            c3_shape[bidx] = coef.shape
            cut3.append(k1[-1])
        k_off = np.concatenate([[0], np.cumsum([len(k) for k in knots_list])]).astype(np.int64)
        # k_off is indexed per vector: vector v spans k_off[v]:k_off[v+1]
        self._packed = dict(
            pair_id=pair_id, knots=np.concatenate(knots_list), k_off=k_off,
            coef2=np.concatenate(coef2), c2_off=np.asarray(c2_off, np.int64), cut2=np.asarray(cut2),
            trip_id=trip_id, trip_swap=trip_swap, k3_id=k3_id,
            coef3=np.concatenate(coef3) if coef3 else np.zeros(0), c3_off=np.asarray(c3_off, np.int64),
            c3_shape=c3_shape, cut3=np.asarray(cut3) if cut3 else np.zeros(1),
            energy_ref=self.energy_reference,
        )
        return self._packed

    def evaluate(self, positions, numbers, cell, pbc, stress: bool = False) -> MappedPrediction:
        """Energy, local energies, forces (and stress: needs a periodic cell with volume).

        ``positions`` (n, 3) Å, ``numbers`` (n,), ``cell`` (3, 3) Å rows, ``pbc`` (3,)."""
        positions = np.asarray(positions, dtype=np.float64)
        n = len(positions)
        spec = species_indices(numbers, self.species) if n else np.zeros(0, np.int64)
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        volume = abs(np.linalg.det(cell)) if np.all(pbc) else 0.0
        if stress and volume < 1e-12:
            raise InvalidInput("stress needs a fully periodic cell with non-zero volume")
        energies = np.zeros(n)
        forces = np.zeros((n, 3))
        virial = np.zeros((3, 3))
        if n:
            ci, nj, vec = neighbour_pairs(positions, cell, pbc, np.arange(n), self.max_cutoff)
            c_off = np.zeros(n + 1, np.int64)
            np.add.at(c_off, ci + 1, 1)
            c_off = np.cumsum(c_off)
            P = self._pack()
            _evaluate(n, c_off, nj.astype(np.int64), np.ascontiguousarray(vec), spec.astype(np.int64),
                      P["pair_id"], P["knots"], P["k_off"], P["coef2"], P["c2_off"], P["cut2"],
                      P["trip_id"], P["trip_swap"], P["k3_id"], P["coef3"], P["c3_off"], P["c3_shape"],
                      P["cut3"], bool(self.threebody), energies, forces, virial)
            energies += P["energy_ref"][spec]
        s = None
        if stress:
            v = virial
            s = np.array([v[0, 0], v[1, 1], v[2, 2], v[1, 2], v[0, 2], v[0, 1]]) / volume
        return MappedPrediction(float(energies.sum()), energies, forces, s)

    @property
    def energy_reference(self) -> np.ndarray:
        """mu per species index (eV/atom; zeros unless the metadata gives it)."""
        ref = {int(z): float(v) for z, v in (self.metadata.get("energy_reference_eV") or {}).items()}
        return np.array([ref.get(z, 0.0) for z in self.species])

    def predict(self, atoms, stress: bool = False) -> MappedPrediction:
        """:meth:`evaluate` for an ``ase.Atoms``."""
        return self.evaluate(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                             atoms.get_pbc(), stress=stress)

    # -- file ---------------------------------------------------------------

    def save(self, path) -> Path:
        """Write one ``.npz`` (``format: epicycle-mapped``, JSON header in ``meta``)."""
        path = Path(path)
        arrays = {}
        two, three = [], []
        for (a, b), (knots, coef) in sorted(self.twobody.items()):
            key = f"2b_{a}_{b}"
            arrays[key + "_knots"] = knots
            arrays[key + "_coef"] = coef
            two.append([a, b])
        for (c, a, b), (k1, k2, k3, coef) in sorted(self.threebody.items()):
            key = f"3b_{c}_{a}_{b}"
            arrays[key + "_knots_ij"] = k1
            arrays[key + "_knots_ik"] = k2
            arrays[key + "_knots_jk"] = k3
            arrays[key + "_coef"] = coef
            three.append([c, a, b])
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "species": list(self.species),
                "twobody": two, "threebody": three, "metadata": self.metadata,
                "units": {"energy": "eV", "length": "Å"}}
        return save_tagged_npz(path, arrays, meta)

    @classmethod
    def load(cls, path) -> "MappedModel":
        data, meta = load_tagged_npz(path, FORMAT, "mapped model")
        if meta.get("format_version") != FORMAT_VERSION:
            raise InvalidInput(f"{path} has mapped format_version {meta.get('format_version')!r}; "
                               f"this Epicycle reads version {FORMAT_VERSION}")
        try:
            two = {(a, b): (data[f"2b_{a}_{b}_knots"], data[f"2b_{a}_{b}_coef"]) for a, b in meta["twobody"]}
            three = {(c, a, b): (data[f"3b_{c}_{a}_{b}_knots_ij"], data[f"3b_{c}_{a}_{b}_knots_ik"],
                                 data[f"3b_{c}_{a}_{b}_knots_jk"], data[f"3b_{c}_{a}_{b}_coef"])
                     for c, a, b in meta["threebody"]}
        except KeyError as exc:
            raise InvalidInput(f"{path}: mapped model file is missing array {exc}") from exc
        return cls(meta["species"], two, three, meta.get("metadata", {}))

    def __repr__(self) -> str:
        return (f"MappedModel(species={list(self.species)}, {self.body_order}-body, "
                f"{len(self.twobody)} pair splines, {len(self.threebody)} triplet splines)")


def _check_knots(knots: np.ndarray, name: str) -> None:
    """Clamped uniform cubic knots starting at 0 (what the evaluator and pair_style uf3 assume)."""
    if knots.ndim != 1 or len(knots) < 8 or not np.isfinite(knots).all():
        raise InvalidInput(f"{name}: knot vector must be 1-D, finite, with at least 8 knots")
    if knots[0] != 0.0 or np.any(knots[:4] != knots[0]) or np.any(knots[-4:] != knots[-1]):
        raise InvalidInput(f"{name}: knots must be clamped (4 equal knots at each end) and start at 0 Å")
    inner = np.diff(knots[3:-3])
    if np.any(inner <= 0) or np.ptp(inner) > 1e-9 * knots[-1]:
        raise InvalidInput(f"{name}: knots must be uniformly spaced (UF3 'uk')")
