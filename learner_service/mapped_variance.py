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

(the posterior covariance of the feature weights w ~ N(0, I) of the labels y = A w + f3 + noise;
equal to ``I - A^T K_y^-1 A`` by Woodbury, but without its catastrophic cancellation), an
R x R matrix computed once.  Per step this costs R 1-D spline derivatives
per bond (the basis is shared) and a (3 x R)(R x R)(R x 3) product per atom.

The 3-body part of the variance is **not** included (its features would be 3-D splines of rank
several hundred); ``std`` is therefore the 2-body part of the GP's σ.  docs/mapping.md reports its
error against the exact σ (``atom_std``, the sqrt of the largest eigenvalue of the 3×3 force
covariance, :func:`learner_service.gp.atom_std_of`).  Units: eV/Å.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit
from scipy.linalg import solve_triangular

from protos.errors import InvalidInput

from .environment import neighbour_pairs, species_indices
from .mapped import _basis, _span, load_tagged_npz, save_tagged_npz, uniform_knots

__all__ = ["MappedVariance", "map_variance", "sigma_errors"]

_FORMAT = "epicycle-mapped-variance"


@njit(cache=True)
def _feature_forces(n_atoms, c_off, nb_atom, nb_vec, spec, pair_id, knots, k_off, coef, c_off2, col_off, n_cols,
                    cut, D):
    """D (n, R, 3): -d/dx_i of sum over ordered bonds of the feature splines h_q."""
    N = np.zeros(4)
    dN = np.zeros(4)
    for i in range(n_atoms):
        for m in range(c_off[i], c_off[i + 1]):
            j = nb_atom[m]
            p = pair_id[spec[i], spec[j]]
            vx, vy, vz = nb_vec[m, 0], nb_vec[m, 1], nb_vec[m, 2]
            r = np.sqrt(vx * vx + vy * vy + vz * vz)
            if r >= cut[p]:
                continue
            t = knots[k_off[p]:k_off[p + 1]]
            l = _span(t, r)
            _basis(t, l, r, N, dN)
            base = c_off2[p] + l - 3
            for q in range(n_cols[p]):
                col = col_off[p] + q
                de = 0.0
                for a in range(4):
                    de += coef[base + a, q] * dN[a]
                g = de / r
                D[i, col, 0] += g * vx
                D[i, col, 1] += g * vy
                D[i, col, 2] += g * vz
                D[j, col, 0] -= g * vx
                D[j, col, 1] -= g * vy
                D[j, col, 2] -= g * vz


class MappedVariance:
    """Feature splines per species pair and the R x R matrix M; :meth:`force_cov` / :meth:`atom_std`."""

    def __init__(self, species, pairs: dict, M: np.ndarray, metadata: dict | None = None):
        self.species = tuple(int(z) for z in species)
        self.pairs = {}
        total = 0
        for key in sorted(pairs):
            knots, coef = pairs[key]
            knots = np.ascontiguousarray(knots, dtype=np.float64)
            coef = np.ascontiguousarray(coef, dtype=np.float64).reshape(len(knots) - 4, -1)
            self.pairs[tuple(int(k) for k in key)] = (knots, coef)
            total += coef.shape[1]
        self.M = np.ascontiguousarray(M, dtype=np.float64)
        if self.M.shape != (total, total):
            raise InvalidInput(f"variance matrix has shape {self.M.shape}, expected ({total}, {total})")
        self.metadata = dict(metadata or {})
        self._packed = None

    @property
    def rank(self) -> int:
        return self.M.shape[0]

    def _pack(self):
        if self._packed is None:
            s = len(self.species)
            pair_id = np.full((s, s), -1, np.int64)
            knots, k_off, coefs, c_off, col_off, n_cols, cut = [], [0], [], [0], [0], [], []
            width = max([c.shape[1] for _, c in self.pairs.values()] + [1])
            for p, ((a, b), (k, c)) in enumerate(sorted(self.pairs.items())):
                pair_id[a, b] = pair_id[b, a] = p
                knots.append(k)
                k_off.append(k_off[-1] + len(k))
                pad = np.zeros((c.shape[0], width))
                pad[:, :c.shape[1]] = c
                coefs.append(pad)
                c_off.append(c_off[-1] + c.shape[0])
                n_cols.append(c.shape[1])
                col_off.append(col_off[-1] + c.shape[1])
                cut.append(k[-1])
            self._packed = (pair_id, np.concatenate(knots), np.asarray(k_off, np.int64), np.vstack(coefs),
                            np.asarray(c_off, np.int64), np.asarray(col_off[:-1], np.int64),
                            np.asarray(n_cols, np.int64), np.asarray(cut))
        return self._packed

    def force_cov(self, atoms) -> np.ndarray:
        """(n, 3, 3) eV²/Å²: the mapped 2-body posterior covariance of each atom's force."""
        n = len(atoms)
        spec = species_indices(atoms.get_atomic_numbers(), self.species) if n else np.zeros(0, np.int64)
        D = np.zeros((n, self.rank, 3))
        if n:
            P = self._pack()
            ci, nj, vec = neighbour_pairs(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(),
                                          np.arange(n), float(P[-1].max()))
            c_off = np.zeros(n + 1, np.int64)
            np.add.at(c_off, ci + 1, 1)
            c_off = np.cumsum(c_off)
            _feature_forces(n, c_off, nj.astype(np.int64), np.ascontiguousarray(vec), spec.astype(np.int64), *P, D)
        return np.einsum("iqa,qr,irb->iab", D, self.M, D, optimize=True)

    def atom_std(self, atoms) -> np.ndarray:
        """(n,) eV/Å: sqrt of the largest eigenvalue of each atom's mapped force covariance."""
        from .gp import atom_std_of

        return atom_std_of(self.force_cov(atoms))

    def save(self, path) -> Path:
        path = Path(path)
        arrays = {"M": self.M}
        for (a, b), (k, c) in self.pairs.items():
            arrays[f"pair_{a}_{b}_knots"] = k
            arrays[f"pair_{a}_{b}_coef"] = c
        meta = {"format": _FORMAT, "format_version": 1, "species": list(self.species),
                "pairs": [list(k) for k in self.pairs], "metadata": self.metadata}
        return save_tagged_npz(path, arrays, meta)

    @classmethod
    def load(cls, path) -> "MappedVariance":
        data, meta = load_tagged_npz(path, _FORMAT, "mapped variance")
        try:
            pairs = {(a, b): (data[f"pair_{a}_{b}_knots"], data[f"pair_{a}_{b}_coef"]) for a, b in meta["pairs"]}
            return cls(meta["species"], pairs, data["M"], meta.get("metadata"))
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"{path} is not an Epicycle mapped variance file: {exc}") from exc


def map_variance(gp, spacing: float = 0.05, samples: int = 2, rtol: float = 1e-9) -> MappedVariance:
    """The 2-body :class:`MappedVariance` of an exact GP.  ``spacing`` (Å): knot spacing of the
    feature splines; ``rtol``: eigenvalues of the cluster kernel below ``rtol * largest`` are
    dropped (the rank R)."""
    from .kernels import LabelGroups, prediction_blocks
    from .mapping import _bond_batch, _free_columns, _gp_state, _intervals, _lsq_operator, _samples

    _gp_state(gp)
    h = gp._hyps
    s2 = h["sig2"] ** 2
    S = len(gp.species)
    train, groups = gp._training_batch(), gp._training_groups()
    pairs, blocks = {}, []
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
            keep = lam > rtol * lam.max() if lam.max() > 0 else np.zeros(len(lam), bool)
            lam, U = lam[keep], U[:, keep]
            H = U * np.sqrt(lam)  # features on the grid (m, R)
            G = s2 * prediction_blocks(train, groups, grid, S, h["ls2"], h["ls3"], use3=False,
                                       threads=gp.predict_threads)[0][:, :, 0]  # (rows, m)
            blocks.append(G @ (U / np.sqrt(lam)))
            coef = _lsq_operator(knots, x, _free_columns(knots, None)) @ H
            pairs[(a, b)] = (knots, coef)
    A = np.hstack(blocks)
    # the posterior of the feature weights w ~ N(0, I) given the labels y = A w + f3 + noise,
    # in the Woodbury form M = (I + A^T N^-1 A)^-1, N = sig3^2 K3 + diag(noise^2): stable (the
    # form I - A^T K_y^-1 A with the exact K_y cancels catastrophically -- prior variances are
    # ~1e6 times the posterior ones -- and mixes kernel and feature approximations)
    _, K3, _ = gp._kernel_matrices()
    N = h["sig3"] ** 2 * K3 if gp.cutoffs.r3 > 0 else np.zeros((A.shape[0], A.shape[0]))
    N = N + np.diag(gp._noise_vector())
    LN = np.linalg.cholesky(N)
    B = solve_triangular(LN, A, lower=True, check_finite=False)
    M = np.linalg.inv(np.eye(A.shape[1]) + B.T @ B)
    return MappedVariance(gp.species, pairs, 0.5 * (M + M.T),
                          {"source_version": int(gp.version), "spacing_A": spacing, "rank": int(A.shape[1]),
                           "rtol": rtol, "terms": "2-body"})


def sigma_errors(gp, mv: MappedVariance, frames) -> dict:
    """Mapped vs exact per-atom force σ (``atom_std``) on ``frames``: relative errors and correlation."""
    exact = np.concatenate([gp.predict(a).atom_std for a in frames])
    mapped = np.concatenate([mv.atom_std(a) for a in frames])
    rel = np.abs(mapped / np.maximum(exact, 1e-300) - 1.0)
    corr = float(np.corrcoef(exact, mapped)[0, 1]) if len(exact) > 1 and exact.std() > 0 else float("nan")
    return {"atoms": int(len(exact)), "median_rel_err": float(np.median(rel)), "max_rel_err": float(rel.max()),
            "corr": corr, "exact_mean_eV_A": float(exact.mean()), "mapped_mean_eV_A": float(mapped.mean())}
