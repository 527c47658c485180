"""An :class:`~learner_service.environment.EnvironmentBatch` as the arrays the kernels read,
and the label groups that say which functionals form the rows of a covariance matrix.

* :func:`pack` -- the reference path's structure-of-arrays tuple: per bond its length r (Å),
  cutoff weight f = (r_c - r)^2 (Å^2) and df/dr (Å), unit vector u and the stress weights
  ``psi = -r/2 u (x) u`` (Voigt); per triplet the three distances (r_ij, r_ik, r_jk), the
  product F of their cutoff weights and its derivatives by the two central bonds, the two
  central unit vectors and stress weights, and the species.
* :func:`pack_fast` -- the optimised path's tuple (fields ``_F_*``): the same numbers with
  every per-environment list padded to a multiple of ``_PAD`` by zero-weight entries (so the
  inner loops vectorise without remainders), species folded into integer codes that match
  iff a pair / a permutation of a triplet matches (Eq. 2's delta), the per-bond vectors
  ``V = df u`` and ``W = f u`` that the force contractions need, and per environment the
  distinct central bond lengths with each triplet's index into them (the 3-body tables of
  :mod:`.threebody` exponentiate each distinct length pair once).

Both are cached on the batch (``batch.meta``), keyed on its length.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import N_FUNCTIONALS


def pack(batch):
    """Kernel-ready (structure-of-arrays) tuple of an :class:`EnvironmentBatch`."""
    cached = batch.meta.get("_packed")
    if cached is not None and cached[0] == len(batch):
        return cached[1]
    u = batch.bond_u
    r = batch.bond_r
    b_psi = -0.5 * r[None, :] * np.stack(
        [u[:, 0] ** 2, u[:, 1] ** 2, u[:, 2] ** 2, u[:, 1] * u[:, 2], u[:, 0] * u[:, 2], u[:, 0] * u[:, 1]])
    tu = batch.trip_u
    t_psi = []
    for k in range(2):
        uk = tu[:, k, :]
        rk = batch.trip_r[:, k]
        t_psi.append(-0.5 * rk[None, :] * np.stack(
            [uk[:, 0] ** 2, uk[:, 1] ** 2, uk[:, 2] ** 2, uk[:, 1] * uk[:, 2], uk[:, 0] * uk[:, 2],
             uk[:, 0] * uk[:, 1]]))
    c = np.ascontiguousarray
    P = (
        c(batch.center_species, dtype=np.int64),
        c(batch.bond_offsets, dtype=np.int64),
        c(batch.bond_r, dtype=np.float64),
        c(batch.bond_f, dtype=np.float64),
        c(batch.bond_df, dtype=np.float64),
        c(batch.bond_u.T, dtype=np.float64),
        c(b_psi, dtype=np.float64),
        c(batch.bond_species, dtype=np.int64),
        c(batch.trip_offsets, dtype=np.int64),
        c(batch.trip_r.T, dtype=np.float64),
        c(batch.trip_F, dtype=np.float64),
        c(batch.trip_dF.T, dtype=np.float64),
        c(tu.transpose(1, 2, 0).reshape(6, -1), dtype=np.float64),
        c(np.concatenate(t_psi, axis=0).reshape(12, -1), dtype=np.float64),
        c(batch.trip_species.T, dtype=np.int64),
    )
    batch.meta["_packed"] = (len(batch), P)
    return P


class LabelGroups:
    """Rows of a covariance matrix as groups of environment functionals (see :func:`assemble`)."""

    def __init__(self, ptr, env, rows, scale):
        self.ptr = np.ascontiguousarray(ptr, dtype=np.int64)
        self.env = np.ascontiguousarray(env, dtype=np.int64)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1, N_FUNCTIONALS)
        self.scale = np.ascontiguousarray(scale, dtype=np.float64).reshape(-1, N_FUNCTIONALS)
        self.n_rows = int(self.rows.max(initial=-1)) + 1

    def __len__(self):
        return self.rows.shape[0]

    @classmethod
    def per_environment(cls, env_indices, energy=False, force=True, stress=False, row_offset=0):
        """One group per environment with the requested functionals (E, F, S order)."""
        env_indices = np.asarray(env_indices, dtype=np.int64)
        n = len(env_indices)
        mask = np.zeros(N_FUNCTIONALS, dtype=bool)
        mask[0] = energy
        mask[1:4] = force
        mask[4:10] = stress
        width = int(mask.sum())
        rows = np.full((n, N_FUNCTIONALS), -1, np.int64)
        rows[:, mask] = row_offset + np.arange(n)[:, None] * width + np.arange(width)[None, :]
        return cls(np.arange(n + 1), env_indices, rows, np.ones((n, N_FUNCTIONALS)))

    @staticmethod
    def concatenate(groups):
        groups = [g for g in groups if len(g)]
        if not groups:
            return LabelGroups(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 10), np.int64),
                               np.zeros((0, 10)))
        ptr = [np.zeros(1, np.int64)]
        base = 0
        for g in groups:
            ptr.append(g.ptr[1:] + base)
            base += g.ptr[-1]
        return LabelGroups(np.concatenate(ptr), np.concatenate([g.env for g in groups]),
                           np.concatenate([g.rows for g in groups]), np.concatenate([g.scale for g in groups]))


# fields of the fast pack (pack_fast)
_F_CSPEC, _F_BOFF, _F_BR, _F_BF, _F_BDF, _F_BU, _F_BPSI, _F_BSPEC, _F_BV, _F_BW = range(10)
(_F_TOFF, _F_X0, _F_X1, _F_X2, _F_TF, _F_TDF0, _F_TDF1, _F_TU, _F_TPSI, _F_CODE, _F_PCODE, _F_TV, _F_TW,
 _F_UOFF, _F_UVAL, _F_I0, _F_I1, _F_MONO, _F_BN, _F_TN, _F_BCODE, _F_BMONO) = range(10, 32)


@njit(cache=True)
def _central_distance_index(t_off, x0, x1):
    """Per environment, the distinct central bond lengths of its triplets (sorted) and,
    per triplet, the local index of its two central bonds in that list."""
    nt = x0.shape[0]
    n_env = t_off.shape[0] - 1
    idx0 = np.zeros(nt, np.int64)
    idx1 = np.zeros(nt, np.int64)
    u_off = np.zeros(n_env + 1, np.int64)
    vals = np.zeros(2 * nt)
    pos = 0
    for e in range(n_env):
        t0 = t_off[e]
        n = t_off[e + 1] - t0
        tmp = np.empty(2 * n)
        for i in range(n):
            tmp[i] = x0[t0 + i]
            tmp[n + i] = x1[t0 + i]
        order = np.argsort(tmp)
        cnt = -1
        last = 0.0
        for k in order:
            v = tmp[k]
            if cnt < 0 or v != last:
                cnt += 1
                vals[pos + cnt] = v
                last = v
            if k < n:
                idx0[t0 + k] = cnt
            else:
                idx1[t0 + k - n] = cnt
        pos += cnt + 1
        u_off[e + 1] = pos
    return u_off, vals[:pos].copy(), idx0, idx1


_PAD = 8  # inner lists are padded to a multiple of the SIMD width with zero-weight entries


@njit(cache=True)
def _padded_offsets(off, mult):
    n = off.shape[0] - 1
    new = np.zeros(n + 1, np.int64)
    for e in range(n):
        c = off[e + 1] - off[e]
        new[e + 1] = new[e] + (c + mult - 1) // mult * mult
    return new


@njit(cache=True)
def _build_fast_pack(center_species, bond_offsets, bond_r, bond_f, bond_df, bond_u, bond_species,
                     trip_offsets, trip_r, trip_F, trip_dF, trip_u, trip_species, n_species, mult):
    n_env = center_species.shape[0]
    # ---- 2-body
    b_off = _padded_offsets(bond_offsets, mult)
    nbp = b_off[n_env]
    br = np.zeros(nbp)
    bf = np.zeros(nbp)
    bdf = np.zeros(nbp)
    bu = np.zeros((3, nbp))
    bpsi = np.zeros((6, nbp))
    bspec = np.full(nbp, -1, np.int64)
    bV = np.zeros((3, nbp))
    bW = np.zeros((3, nbp))
    bn = np.zeros(n_env, np.int64)
    # unordered species pair (centre, neighbour) of each bond: bonds match iff equal
    bcode = np.full(nbp, -1, np.int64)
    bmono = -1
    for e in range(n_env):
        o = bond_offsets[e]
        c = bond_offsets[e + 1] - o
        bn[e] = c
        for i in range(c):
            s = o + i
            d = b_off[e] + i
            s1 = min(center_species[e], bond_species[s])
            s2 = max(center_species[e], bond_species[s])
            bcode[d] = s1 * n_species + s2
            if bmono == -1 or bmono == bcode[d]:
                bmono = bcode[d]
            else:
                bmono = -2
            r = bond_r[s]
            br[d] = r
            bf[d] = bond_f[s]
            bdf[d] = bond_df[s]
            bspec[d] = bond_species[s]
            ux = bond_u[s, 0]
            uy = bond_u[s, 1]
            uz = bond_u[s, 2]
            bu[0, d] = ux
            bu[1, d] = uy
            bu[2, d] = uz
            h = -0.5 * r
            bpsi[0, d] = h * ux * ux
            bpsi[1, d] = h * uy * uy
            bpsi[2, d] = h * uz * uz
            bpsi[3, d] = h * uy * uz
            bpsi[4, d] = h * ux * uz
            bpsi[5, d] = h * ux * uy
            for k in range(3):
                bV[k, d] = bond_df[s] * bu[k, d]
                bW[k, d] = bond_f[s] * bu[k, d]
    # ---- 3-body
    t_off = _padded_offsets(trip_offsets, mult)
    ntp = t_off[n_env]
    x0 = np.zeros(ntp)
    x1 = np.zeros(ntp)
    x2 = np.zeros(ntp)
    tF = np.zeros(ntp)
    tdF0 = np.zeros(ntp)
    tdF1 = np.zeros(ntp)
    tu = np.zeros((6, ntp))
    tpsi = np.zeros((12, ntp))
    tcode = np.full(ntp, -1, np.int64)
    pcode = np.full((6, ntp), -1, np.int64)
    tV = np.zeros((3, ntp))
    tW = np.zeros((6, ntp))
    i0 = np.zeros(ntp, np.int64)
    i1 = np.zeros(ntp, np.int64)
    tn = np.zeros(n_env, np.int64)
    S = n_species
    mono = -1
    for e in range(n_env):
        o = trip_offsets[e]
        c = trip_offsets[e + 1] - o
        tn[e] = c
        for i in range(c):
            s = o + i
            d = t_off[e] + i
            x0[d] = trip_r[s, 0]
            x1[d] = trip_r[s, 1]
            x2[d] = trip_r[s, 2]
            F = trip_F[s]
            tF[d] = F
            tdF0[d] = trip_dF[s, 0]
            tdF1[d] = trip_dF[s, 1]
            for k in range(2):
                h = -0.5 * trip_r[s, k]
                ux = trip_u[s, k, 0]
                uy = trip_u[s, k, 1]
                uz = trip_u[s, k, 2]
                tu[3 * k, d] = ux
                tu[3 * k + 1, d] = uy
                tu[3 * k + 2, d] = uz
                tpsi[6 * k, d] = h * ux * ux
                tpsi[6 * k + 1, d] = h * uy * uy
                tpsi[6 * k + 2, d] = h * uz * uz
                tpsi[6 * k + 3, d] = h * uy * uz
                tpsi[6 * k + 4, d] = h * ux * uz
                tpsi[6 * k + 5, d] = h * ux * uy
            for k in range(3):
                tV[k, d] = trip_dF[s, 0] * tu[k, d] + trip_dF[s, 1] * tu[3 + k, d]
            for k in range(6):
                tW[k, d] = F * tu[k, d]
            c0 = trip_species[s, 0]
            c1 = trip_species[s, 1]
            c2 = trip_species[s, 2]
            # species code of (centre, j, k) and, for the inner side, the codes the outer
            # triplet must have for each of the six permutations to match (FLARE's masks)
            tcode[d] = (c0 * S + c1) * S + c2
            pcode[0, d] = (c0 * S + c1) * S + c2
            pcode[1, d] = (c0 * S + c2) * S + c1
            pcode[2, d] = (c1 * S + c2) * S + c0
            pcode[3, d] = (c1 * S + c0) * S + c2
            pcode[4, d] = (c2 * S + c1) * S + c0
            pcode[5, d] = (c2 * S + c0) * S + c1
            if c0 == c1 and c1 == c2 and (mono == -1 or mono == c0):
                mono = c0
            else:
                mono = -2
    # distinct central bond lengths per environment (padded) and each triplet's index
    u_off_r, u_val_r, j0, j1 = _central_distance_index(trip_offsets, trip_r[:, 0].copy(), trip_r[:, 1].copy())
    u_off = _padded_offsets(u_off_r, mult)
    u_val = np.zeros(u_off[n_env])
    for e in range(n_env):
        for i in range(u_off_r[e + 1] - u_off_r[e]):
            u_val[u_off[e] + i] = u_val_r[u_off_r[e] + i]
        o = trip_offsets[e]
        for i in range(trip_offsets[e + 1] - o):
            i0[t_off[e] + i] = j0[o + i]
            i1[t_off[e] + i] = j1[o + i]
    monoa = np.full(1, mono, np.int64)
    return (center_species.copy(), b_off, br, bf, bdf, bu, bpsi, bspec, bV, bW,
            t_off, x0, x1, x2, tF, tdF0, tdF1, tu, tpsi, tcode, pcode, tV, tW, u_off, u_val, i0, i1, monoa, bn, tn,
            bcode, np.full(1, bmono, np.int64))


def pack_fast(batch, n_species):
    """Kernel-ready tuple of an :class:`EnvironmentBatch` for :func:`prediction_covariance`
    (cached on the batch).  Per environment, bonds, triplets and distinct central bond
    lengths are padded to a multiple of ``_PAD`` with entries that contribute exactly
    zero (cutoff weights 0, no species match); ``_F_BN``/``_F_TN`` hold the real counts;
    ``_F_MONO`` is the species index if every triplet has one species in all three
    places (all six permutations count), -1 without triplets, else -2."""
    cached = batch.meta.get("_packed_fast")
    if cached is not None and cached[0] == (len(batch), n_species):
        return cached[1]
    c = np.ascontiguousarray
    F = _build_fast_pack(
        c(batch.center_species, dtype=np.int64), c(batch.bond_offsets, dtype=np.int64),
        c(batch.bond_r, dtype=np.float64), c(batch.bond_f, dtype=np.float64), c(batch.bond_df, dtype=np.float64),
        c(batch.bond_u, dtype=np.float64).reshape(-1, 3), c(batch.bond_species, dtype=np.int64),
        c(batch.trip_offsets, dtype=np.int64), c(batch.trip_r, dtype=np.float64).reshape(-1, 3),
        c(batch.trip_F, dtype=np.float64), c(batch.trip_dF, dtype=np.float64).reshape(-1, 2),
        c(batch.trip_u, dtype=np.float64).reshape(-1, 2, 3), c(batch.trip_species, dtype=np.int64).reshape(-1, 3),
        int(n_species), _PAD)
    batch.meta["_packed_fast"] = ((len(batch), n_species), F)
    return F

