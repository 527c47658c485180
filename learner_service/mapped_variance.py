"""Mapped force uncertainty: a cheap per-step approximation of the GP's per-atom force σ.

Mathematics (2-body part, exact up to a rank truncation).  Write ``E1(c)`` for the GP's local
energy of a one-cluster environment (one bond c); the GP's local energy of atom i is
``E_i = sum_{c in env i} E1(c)`` and its force functional is ``F_i = -d/dx_i sum_j E_j``.  On a
dense grid of bond lengths the cluster kernel ``kappa(c, c') = cov(E1(c), E1(c'))`` has the
eigen-decomposition ``U Lambda U^T``; its first R eigenvectors give features
``h_q = sqrt(lambda_q) u_q`` (q < R, ``kappa ~ sum_q h_q(c) h_q(c')``), mapped as cubic splines
like the mean.  Then for a training label row ``cov(row, E1(c)) = sum_q A[row, q] h_q(c)`` with
``A = G U Lambda^-1/2`` (``G`` the row-grid covariances), and for atom i with
``D_i[q] = -d/dx_i sum_j sum_{c in env j} h_q(c)`` (R, 3) -- the "forces" of the spline model
``phi = h_q`` --

    cov(F_i, F_i | data) = D_i^T M D_i,   M = (I + A^T N^-1 A)^-1,   N = sig3^2 K3 + diag(σn^2)

(2-body features only, ``threebody=False``: the posterior covariance of the feature weights
w ~ N(0, I) of the labels y = A w + f3 + noise;
equal to ``I - A^T K_y^-1 A`` by Woodbury, but without its catastrophic cancellation), an
R x R matrix computed once.  Per step this costs R 1-D spline derivatives
per bond (the basis is shared) and a (3 x R)(R x R)(R x 3) product per atom.

2+3-body GPs (``threebody=True``, the default when the GP has a 3-body term): the GP is a
Bayesian linear regression on the 2-body features ``h_q`` and on 3-body features

    z_O(t) = sqrt(6 c3 / |O|) sum_{(s,p,q,r) in O} e^{s_ij}_p(r_ij) e^{s_ik}_q(r_ik) e^{s_jk}_r(r_jk):

the triplet kernel ``c3 sum_P prod_k f(x_k) f(y_Pk) exp(-lam (x_k - y_Pk)^2 / 2)``
(``c3 = sig3^2 W3^2``) is a sum over the 6 relabellings P of products of one 1-D kernel per
species pair, whose Mercer features ``e_p`` (1-D splines) turn each product into a tensor
product; the permutation sum is 6 x the projector onto the orbits O of the feature indices
(species block, p, q, r), so one feature per orbit.  Products of 1-D eigenvalues below
``rtol3`` of the largest are dropped (rank R3).  ``A = [A2, A3]`` (A3 by least squares from
the GP's covariances of its training rows with single triplets), ``N = diag(σn^2)``, one joint
M (so the 2-/3-body cross terms are in), and

* the force σ (``quantity="force"``, default): ``D_i`` gets the 3-body columns
  ``-d/dx_i sum_j sum_{t in env j} z_O(t)`` (:func:`_feature_forces3`);
* the local-energy σ (``quantity="local_energy"``): ``sqrt(v_i^T M v_i)`` with
  ``v_i = [sum_bonds h, sum_triplets z]`` (:func:`_energy_features`) -- cheaper, but with force
  labels only it hardly follows the force σ (docs/mapping.md).

``A A^T`` reproduces the GP's training kernel (``metadata["kernel_rel_err"]``).  Per step: R
1-D splines per bond, the kept tensor products per triplet, a (3 x R)(R x R)(R x 3) product per
atom.  docs/mapping.md: derivation, rank vs error against the exact σ vs cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit
from scipy.linalg import solve_triangular

from protos.errors import InvalidInput

from .environment import neighbour_pairs, species_indices
from .mapped import _basis, _span, load_tagged_npz, save_tagged_npz, uniform_knots

__all__ = ["MappedVariance", "map_variance", "sigma_errors", "exact_local_energy_std", "energy_sigma_errors"]

_FORMAT = "epicycle-mapped-variance"


@njit(cache=True)
def _splines_at(knots, k_off, coef, c_off, p, n, r, N, dN, v, dv):
    """The ``n`` feature splines of set ``p`` (knots ``knots[k_off[p]:k_off[p + 1]]``, coefficient
    rows from ``c_off[p]``) and their r-derivatives at ``r``, into ``v[:n]``, ``dv[:n]``."""
    t = knots[k_off[p]:k_off[p + 1]]
    l = _span(t, r)
    _basis(t, l, r, N, dN)
    base = c_off[p] + l - 3
    for q in range(n):
        a0 = 0.0
        a1 = 0.0
        for a in range(4):
            a0 += coef[base + a, q] * N[a]
            a1 += coef[base + a, q] * dN[a]
        v[q] = a0
        dv[q] = a1


@njit(cache=True)
def _scratch_sizes(n_atoms, c_off, n1_3):
    """(most neighbours of an atom, most 1-D 3-body features of a species pair), each at least 1."""
    max_nb = 1
    n1max = 1
    for i in range(n_atoms):
        max_nb = max(max_nb, c_off[i + 1] - c_off[i])
    for p in range(n1_3.shape[0]):
        n1max = max(n1max, n1_3[p])
    return max_nb, n1max


def _stack_splines(n_species: int, splines: dict, missing: int):
    """One packed array set of per-species-pair spline bases ``{(a, b): (knots, coef (n, q))}``:
    ``(pair id (S, S) symmetric, ``missing`` where absent), knots, knot offsets, coefficient rows
    padded to the widest q, row offsets, q per pair)``, pairs in sorted order."""
    pair_id = np.full((n_species, n_species), missing, np.int64)
    items = sorted(splines.items())
    width = max([c.shape[1] for _, (_k, c) in items] + [1])
    coefs = []
    for p, ((a, b), (_k, c)) in enumerate(items):
        pair_id[a, b] = pair_id[b, a] = p
        pad = np.zeros((c.shape[0], width))
        pad[:, :c.shape[1]] = c
        coefs.append(pad)
    k_off = np.concatenate([[0], np.cumsum([len(k) for _, (k, _c) in items])]).astype(np.int64)
    c_off = np.concatenate([[0], np.cumsum([c.shape[0] for _, (_k, c) in items])]).astype(np.int64)
    return (pair_id, np.concatenate([k for _, (k, _c) in items]), k_off, np.vstack(coefs), c_off,
            np.asarray([c.shape[1] for _, (_k, c) in items], np.int64))


@njit(cache=True)
def _feature_forces(n_atoms, c_off, nb_atom, nb_vec, spec, pair_id, knots, k_off, coef, c_off2, col_off, n_cols,
                    cut, D):
    """D (n, R, 3): -d/dx_i of sum over ordered bonds of the feature splines h_q."""
    N = np.zeros(4)
    dN = np.zeros(4)
    v = np.zeros(coef.shape[1])
    dv = np.zeros(coef.shape[1])
    for i in range(n_atoms):
        for m in range(c_off[i], c_off[i + 1]):
            j = nb_atom[m]
            p = pair_id[spec[i], spec[j]]
            vx, vy, vz = nb_vec[m, 0], nb_vec[m, 1], nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= cut[p]:
                continue
            _splines_at(knots, k_off, coef, c_off2, p, n_cols[p], r, N, dN, v, dv)
            for q in range(n_cols[p]):
                col = col_off[p] + q
                g = dv[q] / r
                D[i, col, 0] += g * vx
                D[i, col, 1] += g * vy
                D[i, col, 2] += g * vz
                D[j, col, 0] -= g * vx
                D[j, col, 1] -= g * vy
                D[j, col, 2] -= g * vz


@njit(cache=True)
def _energy_features(n_atoms, c_off, nb_atom, nb_vec, spec, pair_id, knots, k_off, coef, c_off2, col_off, n_cols,
                     cut, use3, pid3, knots3, k_off3, coef3, c_off3, n1_3, r3mat, blk_off, ent_p, ent_q, ent_r,
                     ent_col, ent_w, bc_off, bc_col, col3, V):
    """V (n, R): per atom i, the 2-body features summed over its bonds (columns ``col_off``)
    and the 3-body orbit features summed over its triplets (columns ``col3 + ent_col``)."""
    S = r3mat.shape[0]
    N = np.zeros(4)
    dN = np.zeros(4)
    max_nb, n1max = _scratch_sizes(n_atoms, c_off, n1_3)
    short = np.zeros(max_nb, np.int64)
    Enb = np.zeros((max_nb, n1max))
    dEnb = np.zeros((max_nb, n1max))
    e3 = np.zeros(n1max)
    de3 = np.zeros(n1max)
    v2 = np.zeros(coef.shape[1])
    dv2 = np.zeros(coef.shape[1])
    rmax3 = np.zeros(S)
    for a in range(S):
        for b in range(S):
            rmax3[a] = max(rmax3[a], r3mat[a, b])
    for i in range(n_atoms):
        si = spec[i]
        for m in range(c_off[i], c_off[i + 1]):
            j = nb_atom[m]
            p = pair_id[si, spec[j]]
            vx, vy, vz = nb_vec[m, 0], nb_vec[m, 1], nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= cut[p]:
                continue
            _splines_at(knots, k_off, coef, c_off2, p, n_cols[p], r, N, dN, v2, dv2)
            for q in range(n_cols[p]):
                V[i, col_off[p] + q] += v2[q]
        if not use3:
            continue
        ns = 0
        for m in range(c_off[i], c_off[i + 1]):
            sj = spec[nb_atom[m]]
            rc = r3mat[si, sj]
            vx, vy, vz = nb_vec[m, 0], nb_vec[m, 1], nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= rc:
                continue
            p = pid3[si, sj]
            _splines_at(knots3, k_off3, coef3, c_off3, p, n1_3[p], r, N, dN, Enb[ns], dEnb[ns])
            short[ns] = m
            ns += 1
        for mi in range(ns):
            m = short[mi]
            sj = spec[nb_atom[m]]
            for ni in range(mi + 1, ns):
                n = short[ni]
                sk = spec[nb_atom[n]]
                x3 = nb_vec[n, 0] - nb_vec[m, 0]
                y3 = nb_vec[n, 1] - nb_vec[m, 1]
                z3 = nb_vec[n, 2] - nb_vec[m, 2]
                r = np.sqrt(x3 * x3 + y3 * y3 + z3 * z3)
                if r >= r3mat[sj, sk] or r3mat[si, sk] <= 0.0:
                    continue
                _splines_at(knots3, k_off3, coef3, c_off3, pid3[sj, sk], n1_3[pid3[sj, sk]], r, N, dN, e3, de3)
                b = (si * S + sj) * S + sk
                for e in range(blk_off[b], blk_off[b + 1]):
                    V[i, col3 + ent_col[e]] += ent_w[e] * Enb[mi, ent_p[e]] * Enb[ni, ent_q[e]] * e3[ent_r[e]]


@njit(cache=True)
def _feature_forces3(n_atoms, c_off, nb_atom, nb_vec, spec, pid3, knots3, k_off3, coef3, c_off3, n1_3, r3mat,
                     blk_off, ent_p, ent_q, ent_r, ent_col, ent_w, bc_off, bc_col, col3, rank3, D):
    """D (n, R, 3), 3-body columns ``col3 + ent_col``: -d/dx of the sum over every centre's
    triplets of the orbit features (the "forces" of the models phi = z_O)."""
    S = r3mat.shape[0]
    N = np.zeros(4)
    dN = np.zeros(4)
    max_nb, n1max = _scratch_sizes(n_atoms, c_off, n1_3)
    short = np.zeros(max_nb, np.int64)
    rs = np.zeros(max_nb)
    Enb = np.zeros((max_nb, n1max))
    dEnb = np.zeros((max_nb, n1max))
    e3 = np.zeros(n1max)
    de3 = np.zeros(n1max)
    G1 = np.zeros(rank3)
    G2 = np.zeros(rank3)
    G3 = np.zeros(rank3)
    for i in range(n_atoms):
        si = spec[i]
        ns = 0
        for m in range(c_off[i], c_off[i + 1]):
            sj = spec[nb_atom[m]]
            vx, vy, vz = nb_vec[m, 0], nb_vec[m, 1], nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= r3mat[si, sj]:
                continue
            p = pid3[si, sj]
            _splines_at(knots3, k_off3, coef3, c_off3, p, n1_3[p], r, N, dN, Enb[ns], dEnb[ns])
            short[ns] = m
            rs[ns] = r
            ns += 1
        for mi in range(ns):
            m = short[mi]
            j = nb_atom[m]
            sj = spec[j]
            r1 = rs[mi]
            for ni in range(mi + 1, ns):
                n = short[ni]
                k = nb_atom[n]
                sk = spec[k]
                x3 = nb_vec[n, 0] - nb_vec[m, 0]
                y3 = nb_vec[n, 1] - nb_vec[m, 1]
                z3 = nb_vec[n, 2] - nb_vec[m, 2]
                r12 = np.sqrt(x3 * x3 + y3 * y3 + z3 * z3)
                if r12 >= r3mat[sj, sk]:
                    continue
                r2 = rs[ni]
                p = pid3[sj, sk]
                _splines_at(knots3, k_off3, coef3, c_off3, p, n1_3[p], r12, N, dN, e3, de3)
                b = (si * S + sj) * S + sk
                lo, hi = blk_off[b], blk_off[b + 1]
                for cc in range(bc_off[b], bc_off[b + 1]):  # the block's orbit columns
                    G1[bc_col[cc]] = 0.0
                    G2[bc_col[cc]] = 0.0
                    G3[bc_col[cc]] = 0.0
                pp = -1
                qq = -1
                a12 = 0.0
                d1 = 0.0
                d2 = 0.0
                for e in range(lo, hi):  # entries sorted by (p, q, r): the (p, q) factors change rarely
                    if ent_p[e] != pp or ent_q[e] != qq:
                        pp = ent_p[e]
                        qq = ent_q[e]
                        a12 = Enb[mi, pp] * Enb[ni, qq]
                        d1 = dEnb[mi, pp] * Enb[ni, qq]
                        d2 = Enb[mi, pp] * dEnb[ni, qq]
                    c = ent_col[e]
                    w = ent_w[e]
                    rr = ent_r[e]
                    a3 = w * e3[rr]
                    G1[c] += d1 * a3
                    G2[c] += d2 * a3
                    G3[c] += w * a12 * de3[rr]
                u1x, u1y, u1z = nb_vec[m, 0] / r1, nb_vec[m, 1] / r1, nb_vec[m, 2] / r1
                u2x, u2y, u2z = nb_vec[n, 0] / r2, nb_vec[n, 1] / r2, nb_vec[n, 2] / r2
                inv3 = 1.0 / r12 if r12 > 0.0 else 0.0
                u3x, u3y, u3z = x3 * inv3, y3 * inv3, z3 * inv3
                for cc in range(bc_off[b], bc_off[b + 1]):
                    c = bc_col[cc]
                    g1 = G1[c]
                    g2 = G2[c]
                    g3 = G3[c]
                    col = col3 + c
                    D[i, col, 0] += g1 * u1x + g2 * u2x
                    D[i, col, 1] += g1 * u1y + g2 * u2y
                    D[i, col, 2] += g1 * u1z + g2 * u2z
                    D[j, col, 0] += -g1 * u1x + g3 * u3x
                    D[j, col, 1] += -g1 * u1y + g3 * u3y
                    D[j, col, 2] += -g1 * u1z + g3 * u3z
                    D[k, col, 0] += -g2 * u2x - g3 * u3x
                    D[k, col, 1] += -g2 * u2y - g3 * u3y
                    D[k, col, 2] += -g2 * u2z - g3 * u3z


class MappedVariance:
    """Feature splines per species pair, optional 3-body features, and the R x R matrix M.

    ``quantity``: ``"force"`` (2-body features only: :meth:`force_cov`, :meth:`atom_std` = the
    force σ in eV/Å) or ``"local_energy"`` (2- and 3-body features: :meth:`local_energy_std`,
    :meth:`atom_std` = the local-energy σ in eV).  ``threebody``: ``{"bases": {(a, b): (knots,
    coef (n_coef, n1))}, "entries": {"block", "p", "q", "r", "col", "w"}: arrays}`` (the kept
    tensor products, see the module docstring), ``"r3"``: (S, S) cutoffs, ``"rank"``: R3}."""

    def __init__(self, species, pairs: dict, M: np.ndarray, metadata: dict | None = None,
                 threebody: dict | None = None, quantity: str = "force"):
        self.species = tuple(int(z) for z in species)
        if quantity not in ("force", "local_energy"):
            raise InvalidInput(f"mapped variance quantity must be 'force' or 'local_energy', got {quantity!r}")
        self.quantity = quantity
        self.pairs = {}
        total = 0
        for key in sorted(pairs):
            knots, coef = pairs[key]
            knots = np.ascontiguousarray(knots, dtype=np.float64)
            coef = np.ascontiguousarray(coef, dtype=np.float64).reshape(len(knots) - 4, -1)
            self.pairs[tuple(int(k) for k in key)] = (knots, coef)
            total += coef.shape[1]
        self.rank2 = total
        self.threebody = None
        if threebody:
            tb = {"bases": {tuple(int(k) for k in key): (np.ascontiguousarray(k, dtype=np.float64),
                                                         np.ascontiguousarray(c, dtype=np.float64))
                            for key, (k, c) in threebody["bases"].items()},
                  "entries": {k: np.ascontiguousarray(v) for k, v in threebody["entries"].items()},
                  "r3": np.ascontiguousarray(threebody["r3"], dtype=np.float64),
                  "rank": int(threebody["rank"])}
            total += tb["rank"]
            self.threebody = tb
        self.M = np.ascontiguousarray(M, dtype=np.float64)
        if self.M.shape != (total, total):
            raise InvalidInput(f"variance matrix has shape {self.M.shape}, expected ({total}, {total})")
        self.metadata = dict(metadata or {})
        self._packed = None
        self._packed3 = None

    @property
    def rank(self) -> int:
        return self.M.shape[0]

    @property
    def unit(self) -> str:
        """Unit of :meth:`atom_std`: ``eV/Å`` (force σ) or ``eV`` (local-energy σ)."""
        return "eV/Å" if self.quantity == "force" else "eV"

    def _pack(self):
        if self._packed is None:
            pair_id, knots, k_off, coefs, c_off, n_cols = _stack_splines(len(self.species), self.pairs, -1)
            col_off = np.concatenate([[0], np.cumsum(n_cols)[:-1]]).astype(np.int64)
            cut = np.asarray([k[-1] for _, (k, _c) in sorted(self.pairs.items())])
            self._packed = (pair_id, knots, k_off, coefs, c_off, col_off, n_cols, cut)
        return self._packed

    def _pack3(self):
        """Arrays of :func:`_energy_features`' 3-body arguments (dummies without 3-body features)."""
        if self._packed3 is None:
            s = len(self.species)
            tb = self.threebody
            if tb is None:
                z = np.zeros(1, np.int64)
                self._packed3 = (False, np.zeros((s, s), np.int64), np.zeros(8), np.array([0, 8], np.int64),
                                 np.zeros((4, 1)), z, np.ones(1, np.int64), np.zeros((s, s)),
                                 np.zeros(s ** 3 + 1, np.int64), z, z, z, z, np.zeros(1), np.zeros(s ** 3 + 1, np.int64),
                                 z, self.rank2)
                return self._packed3
            pid, knots, k_off, coefs, c_off, n1 = _stack_splines(s, tb["bases"], 0)
            ent = tb["entries"]
            order = np.lexsort((ent["r"], ent["q"], ent["p"], ent["block"]))  # by block, then p, q, r
            blk_off = np.searchsorted(ent["block"][order], np.arange(s ** 3 + 1)).astype(np.int64)
            cols = [np.unique(ent["col"][order][blk_off[b]:blk_off[b + 1]]) for b in range(s ** 3)]
            bc_off = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
            bc_col = np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64)
            self._packed3 = (True, pid, knots, k_off, coefs, c_off, n1, tb["r3"], blk_off,
                             *(np.ascontiguousarray(ent[k][order], dtype=np.int64) for k in ("p", "q", "r", "col")),
                             np.ascontiguousarray(ent["w"][order], dtype=np.float64), bc_off, bc_col, self.rank2)
        return self._packed3

    def _neighbours(self, atoms, r_max):
        n = len(atoms)
        ci, nj, vec = neighbour_pairs(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(),
                                      np.arange(n), float(r_max))
        c_off = np.zeros(n + 1, np.int64)
        np.add.at(c_off, ci + 1, 1)
        return np.cumsum(c_off), nj.astype(np.int64), np.ascontiguousarray(vec)

    def energy_features(self, atoms) -> np.ndarray:
        """(n, R): each atom's feature sums v_i (2-body over its bonds, 3-body over its triplets)."""
        n = len(atoms)
        V = np.zeros((n, self.rank))
        if n:
            spec = species_indices(atoms.get_atomic_numbers(), self.species).astype(np.int64)
            P = self._pack()
            P3 = self._pack3()
            r_max = max(float(P[-1].max()), float(P3[7].max()))
            c_off, nj, vec = self._neighbours(atoms, r_max)
            _energy_features(n, c_off, nj, vec, spec, *P, *P3, V)
        return V

    def local_energy_std(self, atoms) -> np.ndarray:
        """(n,) eV: the mapped σ of each atom's local energy, sqrt(v_i^T M v_i)."""
        V = self.energy_features(atoms)
        return np.sqrt(np.clip(np.einsum("ir,rs,is->i", V, self.M, V, optimize=True), 0.0, None))

    def force_cov(self, atoms) -> np.ndarray:
        """(n, 3, 3) eV²/Å²: the mapped posterior covariance of each atom's force, D_i^T M D_i."""
        n = len(atoms)
        spec = species_indices(atoms.get_atomic_numbers(), self.species).astype(np.int64) if n \
            else np.zeros(0, np.int64)
        D = np.zeros((n, self.rank, 3))
        if n:
            P = self._pack()
            P3 = self._pack3()
            c_off, nj, vec = self._neighbours(atoms, max(float(P[-1].max()), float(P3[7].max())))
            _feature_forces(n, c_off, nj, vec, spec, *P, D)
            if P3[0]:
                _feature_forces3(n, c_off, nj, vec, spec, *P3[1:], self.threebody["rank"], D)
        return np.einsum("iqa,qr,irb->iab", D, self.M, D, optimize=True)

    def atom_std(self, atoms) -> np.ndarray:
        """(n,) per-atom σ in :attr:`unit`: the force σ (sqrt of the largest eigenvalue of the
        mapped 3×3 force covariance, eV/Å) or the local-energy σ (eV)."""
        if self.quantity == "local_energy":
            return self.local_energy_std(atoms)
        from .gp import atom_std_of

        return atom_std_of(self.force_cov(atoms))

    def save(self, path) -> Path:
        path = Path(path)
        arrays = {"M": self.M}
        for (a, b), (k, c) in self.pairs.items():
            arrays[f"pair_{a}_{b}_knots"] = k
            arrays[f"pair_{a}_{b}_coef"] = c
        meta = {"format": _FORMAT, "format_version": 1, "species": list(self.species),
                "pairs": [list(k) for k in self.pairs], "metadata": self.metadata, "quantity": self.quantity}
        if self.threebody is not None:
            tb = self.threebody
            for (a, b), (k, c) in tb["bases"].items():
                arrays[f"tb_{a}_{b}_knots"] = k
                arrays[f"tb_{a}_{b}_coef"] = c
            for k, v in tb["entries"].items():
                arrays[f"tb_ent_{k}"] = v
            arrays["tb_r3"] = tb["r3"]
            meta["threebody"] = {"bases": [list(k) for k in tb["bases"]], "rank": tb["rank"]}
        return save_tagged_npz(path, arrays, meta)

    @classmethod
    def load(cls, path) -> "MappedVariance":
        data, meta = load_tagged_npz(path, _FORMAT, "mapped variance")
        try:
            pairs = {(a, b): (data[f"pair_{a}_{b}_knots"], data[f"pair_{a}_{b}_coef"]) for a, b in meta["pairs"]}
            tb = None
            if meta.get("threebody"):
                tb = {"bases": {(a, b): (data[f"tb_{a}_{b}_knots"], data[f"tb_{a}_{b}_coef"])
                                for a, b in meta["threebody"]["bases"]},
                      "entries": {k: data[f"tb_ent_{k}"] for k in ("block", "p", "q", "r", "col", "w")},
                      "r3": data["tb_r3"], "rank": meta["threebody"]["rank"]}
            return cls(meta["species"], pairs, data["M"], meta.get("metadata"), threebody=tb,
                       quantity=meta.get("quantity", "force"))
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"{path} is not an Epicycle mapped variance file: {exc}") from exc


def _twobody_features(gp, spacing: float, samples: int, rtol: float):
    """2-body feature splines ``{(a, b): (knots, coef)}`` and their training-row matrix A2."""
    from .kernels import LabelGroups, prediction_blocks
    from .mapping import _bond_batch, _free_columns, _intervals, _lsq_operator, _samples

    h = gp._hyps
    s2 = h["sig2"] ** 2
    S = len(gp.species)
    train, groups = gp._training_batch(), gp._training_groups()
    pairs, blocks, spectra = {}, [], {}
    for a in range(S):
        for b in range(a, S):
            rc = float(gp.cutoffs.twobody[a, b])
            knots = uniform_knots(rc, _intervals(rc, spacing))
            x = _samples(knots, samples)
            grid = _bond_batch(a, b, x, rc)
            egroups = LabelGroups.per_environment(np.arange(len(x)), energy=True, force=False)
            kap = s2 * prediction_blocks(grid, egroups, grid, S, h["ls2"], h["ls3"], use3=False)[0][:, :, 0]
            kap = 0.5 * (kap + kap.T)
            lam, U = np.linalg.eigh(kap)
            spectra[f"{a}-{b}"] = (lam[::-1][:40] / max(lam.max(), 1e-300)).tolist()
            keep = lam > rtol * lam.max() if lam.max() > 0 else np.zeros(len(lam), bool)
            lam, U = lam[keep], U[:, keep]
            H = U * np.sqrt(lam)  # features on the grid (m, R)
            G = s2 * prediction_blocks(train, groups, grid, S, h["ls2"], h["ls3"], use3=False,
                                       threads=gp.predict_threads)[0][:, :, 0]  # (rows, m)
            blocks.append(G @ (U / np.sqrt(lam)))
            coef = _lsq_operator(knots, x, _free_columns(knots, None)) @ H
            pairs[(a, b)] = (knots, coef)
    return pairs, np.hstack(blocks), spectra


def _onebody_basis(rc: float, ls: float, spacing: float, rtol: float):
    """Mercer features of the 1-D kernel ``f(x) f(y) exp(-(x - y)^2 / (2 ls^2))``,
    ``f(r) = (rc - r)^2``, on [0, rc]: ``(knots, coef (n_coef, n1), eigenvalues (n1,))``,
    features with eigenvalue >= ``rtol`` x the largest, as cubic splines (Nyström extension
    of the eigenvectors on a grid of ls/10 spacing)."""
    from .mapping import _free_columns, _intervals, _lsq_operator, _samples

    f = lambda r: (rc - r) ** 2  # noqa: E731
    xg = np.linspace(0.0, rc, max(41, int(np.ceil(rc / (ls / 10.0))) + 1))
    k1 = lambda x, y: f(x)[:, None] * f(y)[None, :] * np.exp(-0.5 * (x[:, None] - y[None, :]) ** 2 / ls ** 2)  # noqa: E731
    lam, U = np.linalg.eigh(k1(xg, xg))
    lam, U = lam[::-1], U[:, ::-1]
    keep = lam >= rtol * lam[0]
    lam, U = lam[keep], U[:, keep]
    knots = uniform_knots(rc, _intervals(rc, spacing))
    x = _samples(knots, 4)
    E = k1(x, xg) @ (U / np.sqrt(lam))  # Nyström: sum_p E_p(x) E_p(y) ~ k1(x, y)
    coef = _lsq_operator(knots, x, _free_columns(knots, None)) @ E
    return knots, coef, lam


_PAIR_SLOT = {(0, 1): 0, (0, 2): 1, (1, 2): 2}


def _orbit_entries(S: int, lam: dict, rtol: float, c3: float) -> tuple[dict, int, list]:
    """Kept tensor products of every ordered species block (c, a, b) and their orbit columns.

    ``lam[(a, b)]`` (a <= b): 1-D eigenvalues of the pair's 3-body basis.  An entry
    (block, p, q, r) stands for ``e^{ca}_p(r_ij) e^{cb}_q(r_ik) e^{ab}_r(r_jk)``; the six
    relabellings of the triplet's atoms permute (species, p, q, r); the orbit feature is
    ``sqrt(6 c3 / |O|)`` times the sum of its entries.  Returns (entries, rank, orbit sizes)."""
    import itertools

    def pl(a, b):
        return lam.get((min(a, b), max(a, b)), np.zeros(0))

    top = max((v[0] for v in lam.values() if len(v)), default=0.0)
    if top <= 0:
        return {k: np.zeros(0, np.int64) for k in ("block", "p", "q", "r", "col")} | {"w": np.zeros(0)}, 0, []
    thr = rtol * top ** 3
    perms = list(itertools.permutations(range(3)))
    kept = []
    for c, a, b in itertools.product(range(S), repeat=3):
        l1, l2, l3 = pl(c, a), pl(c, b), pl(a, b)
        for p in range(len(l1)):
            for q in range(len(l2)):
                if l1[p] * l2[q] * (l3[0] if len(l3) else 0.0) < thr:
                    continue
                for r in range(len(l3)):
                    if l1[p] * l2[q] * l3[r] >= thr:
                        kept.append((c, a, b, p, q, r))
    keyset = set(kept)

    def image(e, pi):
        spec = (e[0], e[1], e[2])
        idx = {(0, 1): e[3], (0, 2): e[4], (1, 2): e[5]}
        new_spec = tuple(spec[pi[u]] for u in range(3))
        new_idx = [0, 0, 0]
        for (u, v), slot in _PAIR_SLOT.items():
            x, y = sorted((pi[u], pi[v]))
            new_idx[slot] = idx[(x, y)]
        return new_spec + tuple(new_idx)

    orbit_of, sizes, cols = {}, [], []
    for e in kept:
        rep = min(image(e, pi) for pi in perms)
        if rep not in orbit_of:
            members = {image(e, pi) for pi in perms}
            if not members <= keyset:
                raise AssertionError("an orbit of the kept 3-body products is incomplete")  # eigenvalue symmetry
            orbit_of[rep] = len(sizes)
            sizes.append(len(members))
        cols.append(orbit_of[rep])
    kept_arr = np.asarray(kept, np.int64).reshape(-1, 6)
    cols = np.asarray(cols, np.int64)
    sz = np.asarray(sizes, np.float64)
    entries = {"block": (kept_arr[:, 0] * S + kept_arr[:, 1]) * S + kept_arr[:, 2],
               "p": kept_arr[:, 3].copy(), "q": kept_arr[:, 4].copy(), "r": kept_arr[:, 5].copy(), "col": cols,
               "w": np.sqrt(6.0 * c3 / sz[cols])}
    return entries, len(sizes), sizes


def _triplet_feature_matrix(mv: "MappedVariance", c: int, a: int, b: int, r: np.ndarray) -> np.ndarray:
    """(m, R3): the 3-body orbit features of single triplets (centre c, neighbours a at r[:, 0],
    b at r[:, 1], r[:, 2] apart), evaluated with the feature splines."""
    from .mapped import design_matrix

    tb = mv.threebody
    S = len(mv.species)

    def feat(x, y, d):
        k, coef = tb["bases"][(min(x, y), max(x, y))]
        return design_matrix(k, np.minimum(d, k[-1])) @ coef

    E1, E2, E3 = feat(c, a, r[:, 0]), feat(c, b, r[:, 1]), feat(a, b, r[:, 2])
    ent = tb["entries"]
    sel = np.nonzero(ent["block"] == (c * S + a) * S + b)[0]
    Z = np.zeros((len(r), tb["rank"]))
    for e in sel:
        Z[:, ent["col"][e]] += ent["w"][e] * E1[:, ent["p"][e]] * E2[:, ent["q"][e]] * E3[:, ent["r"][e]]
    return Z


def _threebody_features(gp, spacing: float, rtol3: float, n_points: int, seed: int):
    """3-body bases, orbit entries and A3 (training rows x R3) by least squares on single triplets."""
    from .kernels import prediction_blocks
    from .mapping import _triplet_batch

    h = gp._hyps
    S = len(gp.species)
    r3 = gp.cutoffs.threebody
    bases, lam = {}, {}
    for a in range(S):
        for b in range(a, S):
            if r3[a, b] > 0:
                k, coef, l1 = _onebody_basis(float(r3[a, b]), float(h["ls3"]), spacing, rtol3)
                bases[(a, b)], lam[(a, b)] = (k, coef), l1
    c3 = h["sig3"] ** 2 / 9.0  # sig3^2 W3^2, W3 = 1/3 (kernels.common)
    entries, rank3, _ = _orbit_entries(S, lam, rtol3, c3)
    tb = {"bases": bases, "entries": entries, "r3": r3.copy(), "rank": rank3}
    probe = MappedVariance(gp.species, {}, np.zeros((rank3, rank3)), threebody=tb, quantity="local_energy")
    train, groups = gp._training_batch(), gp._training_groups()
    rng = np.random.default_rng(seed)
    ZtZ = np.zeros((rank3, rank3))
    GtZ = np.zeros((gp.n_labels, rank3))
    for c in range(S):
        for a in range(S):
            for b in range(a, S):
                rc = (float(r3[c, a]), float(r3[c, b]), float(r3[a, b]))
                if min(rc) <= 0:
                    continue
                # the training set's own triplets of this block (where accuracy matters) and uniform points
                sel = np.nonzero((train.trip_species[:, 0] == c) & (train.trip_species[:, 1] == a)
                                 & (train.trip_species[:, 2] == b))[0]
                pts = [train.trip_r[rng.permutation(sel)[:n_points]]] if len(sel) else []
                pts.append(rng.uniform(0.0, 1.0, (n_points, 3)) * np.asarray(rc))
                pts = np.vstack(pts)
                pts = pts[(pts[:, 0] < rc[0]) & (pts[:, 1] < rc[1]) & (pts[:, 2] < rc[2])]
                for lo in range(0, len(pts), 512):  # bounds the (rows, 512, 4) covariance blocks
                    chunk = pts[lo:lo + 512]
                    G = h["sig3"] ** 2 * prediction_blocks(
                        train, groups, _triplet_batch(c, a, b, chunk, rc, S), S, h["ls2"], h["ls3"], use2=False,
                        threads=gp.predict_threads)[1][:, :, 0]
                    Z = _triplet_feature_matrix(probe, c, a, b, chunk)
                    ZtZ += Z.T @ Z
                    GtZ += G @ Z
    A3 = np.linalg.lstsq(ZtZ, GtZ.T, rcond=1e-12)[0].T if rank3 else np.zeros((gp.n_labels, 0))
    return tb, A3


def map_variance(gp, spacing: float = 0.05, samples: int = 2, rtol: float = 1e-12, quantity: str = "force",
                 rtol3: float = 1e-12, spacing3: float = 0.05, n_points: int = 3000, seed: int = 0,
                 threebody: bool | None = None) -> MappedVariance:
    """The :class:`MappedVariance` of an exact GP.

    ``quantity``: what :meth:`MappedVariance.atom_std` returns -- ``"force"`` (the per-atom
    force σ, eV/Å, what the cycle thresholds on) or ``"local_energy"`` (eV; cheaper).
    ``threebody``: map the 3-body part too (default: if the GP has one); without it a GP's
    3-body term enters as correlated noise and σ is the 2-body part's.
    ``spacing`` (Å): knot spacing of the 2-body feature splines; ``rtol``: eigenvalues of the
    2-body cluster kernel below ``rtol`` x the largest are dropped (rank R2); ``rtol3``: 3-body
    tensor products whose 1-D eigenvalue product is below ``rtol3`` x the largest are dropped
    (rank R3); ``spacing3`` (Å): knots of the 1-D 3-body feature splines; ``n_points``: single
    triplets per species block (uniform and from the training set) for the least-squares fit
    of the 3-body training-row matrix A3; ``seed``: their random draw."""
    from .mapping import _gp_state

    _gp_state(gp)
    h = gp._hyps
    has3 = gp.cutoffs.r3 > 0 and h["sig3"] != 0
    if threebody is None:
        threebody = has3
    if quantity not in ("force", "local_energy"):
        raise InvalidInput(f"mapped variance quantity must be 'force' or 'local_energy', got {quantity!r}")
    if not (0 < rtol3 < 1):
        raise InvalidInput(f"rtol3 must be in (0, 1), got {rtol3}")
    pairs, A2, spectra = _twobody_features(gp, spacing, samples, rtol)
    tb, A = None, A2
    meta = {"source_version": int(gp.version), "spacing_A": spacing, "rtol": rtol, "quantity": quantity,
            "rank2": int(A2.shape[1]), "spectrum2": spectra}
    _, K3, _ = gp._kernel_matrices()
    if threebody and has3:
        tb, A3 = _threebody_features(gp, spacing3, rtol3, n_points, seed)
        A = np.hstack([A2, A3])
        N = np.diag(gp._noise_vector())
        meta.update({"terms": "2+3-body", "rank3": int(tb["rank"]), "rtol3": rtol3, "spacing3_A": spacing3,
                     "n1": {f"{a}-{b}": int(c.shape[1]) for (a, b), (_, c) in tb["bases"].items()}})
    else:
        # 2-body features only: the 3-body part (if any) enters as correlated noise
        N = h["sig3"] ** 2 * K3 if gp.cutoffs.r3 > 0 else np.zeros((A.shape[0], A.shape[0]))
        N = N + np.diag(gp._noise_vector())
        meta["terms"] = "2-body"
    K2 = gp._kernel_matrices()[0]
    Kf = h["sig2"] ** 2 * K2 + (h["sig3"] ** 2 * K3 if tb is not None else 0.0)
    meta["kernel_rel_err"] = float(np.linalg.norm(A @ A.T - Kf) / max(np.linalg.norm(Kf), 1e-300))
    # the posterior of the feature weights w ~ N(0, I) given the labels y = A w + noise (+ f3), in
    # the Woodbury form M = (I + A^T N^-1 A)^-1: stable (the form I - A^T K_y^-1 A with the exact
    # K_y cancels catastrophically -- prior variances are ~1e6 times the posterior ones -- and
    # mixes kernel and feature approximations)
    LN = np.linalg.cholesky(N)
    B = solve_triangular(LN, A, lower=True, check_finite=False)
    M = np.linalg.inv(np.eye(A.shape[1]) + B.T @ B)
    meta["rank"] = int(A.shape[1])
    return MappedVariance(gp.species, pairs, 0.5 * (M + M.T), meta, threebody=tb, quantity=quantity)


def exact_local_energy_std(gp, atoms) -> np.ndarray:
    """(n,) eV: the exact GP's posterior σ of each atom's local energy (epistemic),
    ``sqrt(k(x, x) - k_x^T K_y^-1 k_x)`` (the reference for the mapped local-energy σ)."""
    from .environment import build_environments
    from .kernels import LabelGroups, prediction_blocks
    from .mapping import _gp_state

    st = _gp_state(gp)
    h = gp._hyps
    S = len(gp.species)
    n = len(atoms)
    envs = build_environments(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array,
                              atoms.get_pbc(), gp.cutoffs, np.arange(n))
    K2, K3, _, _ = prediction_blocks(gp._training_batch(), gp._training_groups(), envs, S, h["ls2"], h["ls3"],
                                     threads=gp.predict_threads)
    kx = h["sig2"] ** 2 * K2[:, :, 0] + h["sig3"] ** 2 * K3[:, :, 0]
    V = solve_triangular(st.L, kx, lower=True, check_finite=False)
    prior = np.zeros(n)
    eg = LabelGroups.per_environment(np.arange(n), energy=True, force=False)
    P2, P3, _, _ = prediction_blocks(envs, eg, envs, S, h["ls2"], h["ls3"])
    prior = h["sig2"] ** 2 * np.diagonal(P2[:, :, 0]) + h["sig3"] ** 2 * np.diagonal(P3[:, :, 0])
    return np.sqrt(np.clip(prior - np.einsum("ij,ij->j", V, V), 0.0, None))


def energy_sigma_errors(gp, mv: MappedVariance, frames) -> dict:
    """Mapped vs exact local-energy σ on ``frames``: median / 95th-percentile / max relative
    error, and the Spearman rank correlation of the mapped local-energy σ with the exact force
    σ (``atom_std``), the quantity the cycle thresholds on."""
    from scipy.stats import spearmanr

    exact = np.concatenate([exact_local_energy_std(gp, a) for a in frames])
    mapped = np.concatenate([mv.local_energy_std(a) for a in frames])
    fstd = np.concatenate([gp.predict(a).atom_std for a in frames])
    rel = np.abs(mapped / np.maximum(exact, 1e-300) - 1.0)
    corr = float(np.corrcoef(exact, mapped)[0, 1]) if len(exact) > 2 and exact.std() > 0 else float("nan")
    return {"atoms": int(len(exact)), "median_rel_err": float(np.median(rel)),
            "p95_rel_err": float(np.percentile(rel, 95)), "max_rel_err": float(rel.max()), "corr": corr,
            "spearman_vs_force_std": float(spearmanr(mapped, fstd)[0]) if len(exact) > 2 else float("nan"),
            "spearman_exact_energy_vs_force_std": float(spearmanr(exact, fstd)[0]) if len(exact) > 2 else float("nan"),
            "exact_mean_eV": float(exact.mean()), "mapped_mean_eV": float(mapped.mean())}


def sigma_errors(gp, mv: MappedVariance, frames) -> dict:
    """Mapped vs exact per-atom σ on ``frames`` (the force σ ``atom_std``, or for a local-energy
    variance :func:`energy_sigma_errors`): relative errors (median, 95th percentile, max) and
    correlations."""
    if mv.quantity == "local_energy":
        return energy_sigma_errors(gp, mv, frames)
    from scipy.stats import spearmanr

    exact = np.concatenate([gp.predict(a).atom_std for a in frames])
    mapped = np.concatenate([mv.atom_std(a) for a in frames])
    rel = np.abs(mapped / np.maximum(exact, 1e-300) - 1.0)
    many = len(exact) > 2 and exact.std() > 0
    corr = float(np.corrcoef(exact, mapped)[0, 1]) if many else float("nan")
    return {"atoms": int(len(exact)), "median_rel_err": float(np.median(rel)),
            "p95_rel_err": float(np.percentile(rel, 95)), "max_rel_err": float(rel.max()), "corr": corr,
            "spearman": float(spearmanr(exact, mapped)[0]) if many else float("nan"),
            "exact_mean_eV_A": float(exact.mean()), "mapped_mean_eV_A": float(mapped.mean())}
