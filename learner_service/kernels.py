"""Multi-element 2- and 3-body squared-exponential kernels (seed 004, Eqs. 2–4).

Conventions are those of FLARE 0.2.4 ``flare/kernels/mc_simple.py`` (the
``two_plus_three_body_mc`` family):

* hyperparameters ``(sig2, ls2, sig3, ls3)``; the kernel of two clusters is
  ``sig^2 exp(-|d1 - P d2|^2 / (2 ls^2)) fcut(d1) fcut(d2)`` with ``fcut`` the
  product of ``(r_c - r)^2`` over the cluster's bonds, summed over every permutation
  ``P`` of the second cluster that matches chemical species (Eq. 2).  For pairs one
  term counts when ``(c1, e1)`` matches ``(c2, e2)`` in either order.
* force components are derivatives with respect to the *central* atom (Eq. 3), so
  the force–force kernel is the mixed second derivative of the cluster kernel; the
  3-body cross bond ``r_jk`` does not move with the centre.
* the local energy is ``E_i = 1/2 sum_pairs eps2 + 1/3 sum_triplets eps3`` (FLARE's
  ``/2, /4`` and ``/3, /9`` factors), so ``F_i = -dE_total/dr_i`` exactly.
* the partial stress of atom i is ``S_i = -1/2 sum_clusters sum_{central bonds b}
  f_b (x) r_b`` with ``f_b`` the force on the centre from bond ``b``; the stress of a
  structure is ``-sum_i S_i / V`` (ASE sign, eV/Å^3).  Here ``S`` is kept in ASE
  Voigt order (xx, yy, zz, yz, xz, xy).

For one pair of environments every covariance between the ten linear functionals
``[E, Fx, Fy, Fz, Sxx, Syy, Szz, Syz, Sxz, Sxy]`` of the two (a 10x10 block) follows from
four scalars per cluster pair and permutation: the value ``k``, its derivatives with
respect to the central bond lengths of either cluster, and their mixed second
derivatives ``H_kl``; the Cartesian blocks are contractions of those with the unit
vectors of the central bonds (``K_FF = sum_kl H_kl u_k (x) v_l``).  This computes all 3x3
force components in one pass instead of FLARE's nine.

The ``ls`` derivatives are computed analytically alongside (``grad=True``); the
``sig`` derivatives are ``2 K / sig``.  Kernels are evaluated at ``sig = 1`` and the
caller scales by ``sig^2``.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic

# functional layout of a 10x10 block
E_ROW = 0
F_ROWS = slice(1, 4)
S_ROWS = slice(4, 10)
N_FUNCTIONALS = 10

# energy weights of one cluster in the local energy
W2 = 0.5
W3 = 1.0 / 3.0


# ---------------------------------------------------------------------------
# a vectorisable exp (no SVML in numba here): Cody–Waite reduction, degree-12
# Taylor polynomial, 2^k by building the IEEE exponent; relative error ~2e-15.
# Arguments below -700 return exactly 0.
# ---------------------------------------------------------------------------


@intrinsic
def _bits_to_float(typingctx, x):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())

    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693147180369123816490
_LN2_LO = 1.90821492927058770002e-10
# fastmath: lets LLVM vectorise the reductions below.  It also lets LLVM round differently
# depending on what it sees around the code, so every fastmath function here is either an
# entry point called from Python or inline="always" (inlined by numba into one entry point);
# never a separate function called from another njit function.  Such a callee has two
# compiled copies -- its own, and a weak copy linked into (and re-optimised with) the
# caller -- and which copy runs depended on whether the caller was compiled in this process
# (the callee's own copy, already loaded, wins) or loaded from numba's cache (the caller's
# copy): with fastmath they differ in the last bits, so the same run gave different σ, and a
# different number of oracle calls, with a cold and a warm NUMBA_CACHE_DIR (issue 12).
# tests/learner/test_determinism.py checks the rule and the cold/warm results.
_FM = True


@njit(cache=True, inline="always", fastmath=_FM)
def exp_neg(x):
    """exp(x) for x <= 0 (vectorisable)."""
    keep = 1.0 if x > -700.0 else 0.0
    x = max(x, -700.0)
    kf = np.floor(x * _LOG2E + 0.5)
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
            1.0 / 3628800 + r * (1.0 / 39916800 + r / 479001600)))))))))))
    return keep * p * _bits_to_float((np.int64(kf) + 1023) << 52)


@njit(cache=True, inline="always", fastmath=_FM)
def _dot(buf, row, arr, arow, off, n):
    x = buf[row, :n]
    y = arr[arow, off:off + n]
    s = 0.0
    for i in range(n):
        s += x[i] * y[i]
    return s


@njit(cache=True, inline="always", fastmath=_FM)
def _rsum(buf, row, n):
    s = 0.0
    for i in range(n):
        s += buf[row, i]
    return s


# ---------------------------------------------------------------------------
# 2-body: per bond m of environment a, scalars against every bond of b
# buf rows: 0 k, 1 dk/dr1 (g1), 2 dk/dr2 (g2), 3 d2k/dr1dr2 (h); grad: +4 (d/dlam)
# ---------------------------------------------------------------------------


@njit(cache=True, inline="always", fastmath=_FM)
def _twobody_scalars(ca, cb, e1, r1, f1, df1, b0, b1, b_r, b_f, b_df, b_spec, lam, buf):
    RB = b_r[b0:b1]
    FB = b_f[b0:b1]
    DFB = b_df[b0:b1]
    SB = b_spec[b0:b1]
    for i in range(b1 - b0):
        e2 = SB[i]
        ok = ((ca == cb) & (e1 == e2)) | ((ca == e2) & (cb == e1))
        mask = 1.0 if ok else 0.0
        f2 = FB[i]
        dl = r1 - RB[i]
        ex = mask * exp_neg(-0.5 * dl * dl * lam)
        p = df1 - dl * f1 * lam
        q = DFB[i] + dl * f2 * lam
        ff = f1 * f2
        buf[0, i] = ex * ff
        buf[1, i] = ex * p * f2
        buf[2, i] = ex * f1 * q
        buf[3, i] = ex * (p * q + ff * lam)


@njit(cache=True, inline="always", fastmath=_FM)
def _twobody_scalars_grad(ca, cb, e1, r1, f1, df1, b0, b1, b_r, b_f, b_df, b_spec, lam, buf):
    RB = b_r[b0:b1]
    FB = b_f[b0:b1]
    DFB = b_df[b0:b1]
    SB = b_spec[b0:b1]
    for i in range(b1 - b0):
        e2 = SB[i]
        ok = ((ca == cb) & (e1 == e2)) | ((ca == e2) & (cb == e1))
        mask = 1.0 if ok else 0.0
        f2 = FB[i]
        dl = r1 - RB[i]
        D = dl * dl
        ex = mask * exp_neg(-0.5 * D * lam)
        p = df1 - dl * f1 * lam
        q = DFB[i] + dl * f2 * lam
        ff = f1 * f2
        hd = -0.5 * D
        h = ex * (p * q + ff * lam)
        buf[0, i] = ex * ff
        buf[1, i] = ex * p * f2
        buf[2, i] = ex * f1 * q
        buf[3, i] = h
        buf[4, i] = hd * ex * ff
        buf[5, i] = f2 * (hd * ex * p - ex * dl * f1)
        buf[6, i] = f1 * (hd * ex * q + ex * dl * f2)
        buf[7, i] = hd * h + ex * (-dl * f1 * q + p * dl * f2 + ff)


@njit(cache=True, inline="always", fastmath=_FM)
def twobody_block(a, b, Pa, Pb, lam, ea, fa, sa, eb, fb, sb, grad, blk, dblk, buf, sg2):
    """2-body 10x10 block between environments ``a`` and ``b``, added into ``blk``
    (and its derivative with respect to ``lam = 1/ls^2`` into ``dblk``).

    ``P`` is the packed batch (:func:`pack`); unit signal variance.  ``ea, fa, sa``
    and ``eb, fb, sb`` say which functionals (energy, force, stress) each side needs.
    ``buf`` (8, >= bonds of b) and ``sg2`` (2, >= bonds of b) are scratch.
    """
    a_r, a_f, a_df, a_u, a_psi, a_spec = Pa[2], Pa[3], Pa[4], Pa[5], Pa[6], Pa[7]
    b_r, b_f, b_df, b_u, b_psi, b_spec = Pb[2], Pb[3], Pb[4], Pb[5], Pb[6], Pb[7]
    ca = Pa[0][a]
    cb = Pb[0][b]
    a0 = Pa[1][a]
    a1 = Pa[1][a + 1]
    b0 = Pb[1][b]
    b1 = Pb[1][b + 1]
    n = b1 - b0
    if n == 0 or a1 == a0:
        return
    need_g2 = ea and (fb or sb)
    for i in range(n):
        sg2[0, i] = 0.0
        sg2[1, i] = 0.0
    gf = np.zeros(3)
    gs = np.zeros(6)
    dgf = np.zeros(3)
    dgs = np.zeros(6)
    for m in range(a0, a1):
        if grad:
            _twobody_scalars_grad(ca, cb, a_spec[m], a_r[m], a_f[m], a_df[m], b0, b1, b_r, b_f, b_df, b_spec,
                                  lam, buf)
        else:
            _twobody_scalars(ca, cb, a_spec[m], a_r[m], a_f[m], a_df[m], b0, b1, b_r, b_f, b_df, b_spec, lam, buf)
        if ea and eb:
            blk[0, 0] += W2 * W2 * _rsum(buf, 0, n)
            if grad:
                dblk[0, 0] += W2 * W2 * _rsum(buf, 4, n)
        if eb and (fa or sa):
            sg1 = _rsum(buf, 1, n)
            dsg1 = _rsum(buf, 5, n) if grad else 0.0
            if fa:
                for d in range(3):
                    blk[1 + d, 0] += W2 * sg1 * a_u[d, m]
                    dblk[1 + d, 0] += W2 * dsg1 * a_u[d, m]
            if sa:
                for d in range(6):
                    blk[4 + d, 0] += W2 * sg1 * a_psi[d, m]
                    dblk[4 + d, 0] += W2 * dsg1 * a_psi[d, m]
        if need_g2:
            for i in range(n):
                sg2[0, i] += buf[2, i]
            if grad:
                for i in range(n):
                    sg2[1, i] += buf[6, i]
        if (fa or sa) and (fb or sb):
            if fb:
                for d in range(3):
                    gf[d] = _dot(buf, 3, b_u, d, b0, n)
                    if grad:
                        dgf[d] = _dot(buf, 7, b_u, d, b0, n)
            if sb:
                for d in range(6):
                    gs[d] = _dot(buf, 3, b_psi, d, b0, n)
                    if grad:
                        dgs[d] = _dot(buf, 7, b_psi, d, b0, n)
            if fa:
                for i in range(3):
                    ui = a_u[i, m]
                    if fb:
                        for j in range(3):
                            blk[1 + i, 1 + j] += ui * gf[j]
                            dblk[1 + i, 1 + j] += ui * dgf[j]
                    if sb:
                        for j in range(6):
                            blk[1 + i, 4 + j] += ui * gs[j]
                            dblk[1 + i, 4 + j] += ui * dgs[j]
            if sa:
                for i in range(6):
                    pi = a_psi[i, m]
                    if fb:
                        for j in range(3):
                            blk[4 + i, 1 + j] += pi * gf[j]
                            dblk[4 + i, 1 + j] += pi * dgf[j]
                    if sb:
                        for j in range(6):
                            blk[4 + i, 4 + j] += pi * gs[j]
                            dblk[4 + i, 4 + j] += pi * dgs[j]
    if need_g2:
        if fb:
            for d in range(3):
                blk[0, 1 + d] += W2 * _dot(sg2, 0, b_u, d, b0, n)
                dblk[0, 1 + d] += W2 * _dot(sg2, 1, b_u, d, b0, n)
        if sb:
            for d in range(6):
                blk[0, 4 + d] += W2 * _dot(sg2, 0, b_psi, d, b0, n)
                dblk[0, 4 + d] += W2 * _dot(sg2, 1, b_psi, d, b0, n)


# ---------------------------------------------------------------------------
# 3-body: per triplet t1 of environment a, scalars against every triplet of b,
# summed over the species-matching permutations.
# buf rows: 0 k, 1-2 dk/da_k (g1), 3-4 dk/db_l (g2), 5-8 H00 H01 H10 H11;
# grad: rows 9-17 the same differentiated with respect to lam.
# ---------------------------------------------------------------------------


@njit(cache=True, inline="always", fastmath=_FM)
def _perm(mask, d0, d1, d2, dp0, dp1, i00, i01, i10, i11, F1, F2, dF10, dF11, dF20, dF21, lam):
    D = d0 * d0 + d1 * d1 + d2 * d2
    ex = mask * exp_neg(-0.5 * D * lam)
    p0 = dF10 - d0 * F1 * lam
    p1 = dF11 - d1 * F1 * lam
    q0 = dF20 + dp0 * F2 * lam
    q1 = dF21 + dp1 * F2 * lam
    FFl = F1 * F2 * lam
    return (ex * F1 * F2, ex * p0 * F2, ex * p1 * F2, ex * F1 * q0, ex * F1 * q1,
            ex * (p0 * q0 + i00 * FFl), ex * (p0 * q1 + i01 * FFl),
            ex * (p1 * q0 + i10 * FFl), ex * (p1 * q1 + i11 * FFl))


@njit(cache=True, inline="always", fastmath=_FM)
def _perm_grad(mask, d0, d1, d2, dp0, dp1, i00, i01, i10, i11, F1, F2, dF10, dF11, dF20, dF21, lam, out):
    D = d0 * d0 + d1 * d1 + d2 * d2
    ex = mask * exp_neg(-0.5 * D * lam)
    FF = F1 * F2
    p0 = dF10 - d0 * F1 * lam
    p1 = dF11 - d1 * F1 * lam
    q0 = dF20 + dp0 * F2 * lam
    q1 = dF21 + dp1 * F2 * lam
    FFl = FF * lam
    hd = -0.5 * D
    ed = hd * ex
    h00 = ex * (p0 * q0 + i00 * FFl)
    h01 = ex * (p0 * q1 + i01 * FFl)
    h10 = ex * (p1 * q0 + i10 * FFl)
    h11 = ex * (p1 * q1 + i11 * FFl)
    out[0] += ex * FF
    out[1] += ex * p0 * F2
    out[2] += ex * p1 * F2
    out[3] += ex * F1 * q0
    out[4] += ex * F1 * q1
    out[5] += h00
    out[6] += h01
    out[7] += h10
    out[8] += h11
    out[9] += ed * FF
    out[10] += F2 * (ed * p0 - ex * d0 * F1)
    out[11] += F2 * (ed * p1 - ex * d1 * F1)
    out[12] += F1 * (ed * q0 + ex * dp0 * F2)
    out[13] += F1 * (ed * q1 + ex * dp1 * F2)
    out[14] += hd * h00 + ex * (-d0 * F1 * q0 + p0 * dp0 * F2 + i00 * FF)
    out[15] += hd * h01 + ex * (-d0 * F1 * q1 + p0 * dp1 * F2 + i01 * FF)
    out[16] += hd * h10 + ex * (-d1 * F1 * q0 + p1 * dp0 * F2 + i10 * FF)
    out[17] += hd * h11 + ex * (-d1 * F1 * q1 + p1 * dp1 * F2 + i11 * FF)


@njit(cache=True, inline="always", fastmath=_FM)
def _threebody_scalars(at_r, at_F, at_dF, at_spec, t1, b0, b1, t_r, t_F, t_dF, t_spec, lam, buf):
    x0 = at_r[0, t1]
    x1 = at_r[1, t1]
    x2 = at_r[2, t1]
    F1 = at_F[t1]
    dF10 = at_dF[0, t1]
    dF11 = at_dF[1, t1]
    c1 = at_spec[0, t1]
    s11 = at_spec[1, t1]
    s12 = at_spec[2, t1]
    R = t_r[:, b0:b1]
    FB = t_F[b0:b1]
    DFB = t_dF[:, b0:b1]
    SB = t_spec[:, b0:b1]
    for i in range(b1 - b0):
        y0 = R[0, i]
        y1 = R[1, i]
        y2 = R[2, i]
        F2 = FB[i]
        dF20 = DFB[0, i]
        dF21 = DFB[1, i]
        c2 = SB[0, i]
        s21 = SB[1, i]
        s22 = SB[2, i]
        m0 = 1.0 if (c1 == c2) & (s11 == s21) & (s12 == s22) else 0.0
        m1 = 1.0 if (c1 == c2) & (s11 == s22) & (s12 == s21) else 0.0
        m2 = 1.0 if (c1 == s21) & (s11 == s22) & (s12 == c2) else 0.0
        m3 = 1.0 if (c1 == s21) & (s11 == c2) & (s12 == s22) else 0.0
        m4 = 1.0 if (c1 == s22) & (s11 == s21) & (s12 == c2) else 0.0
        m5 = 1.0 if (c1 == s22) & (s11 == c2) & (s12 == s21) else 0.0
        a = _perm(m0, x0 - y0, x1 - y1, x2 - y2, x0 - y0, x1 - y1, 1.0, 0.0, 0.0, 1.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        b = _perm(m1, x0 - y1, x1 - y0, x2 - y2, x1 - y0, x0 - y1, 0.0, 1.0, 1.0, 0.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        c = _perm(m2, x0 - y2, x1 - y0, x2 - y1, x1 - y0, x2 - y1, 0.0, 0.0, 1.0, 0.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        d = _perm(m3, x0 - y0, x1 - y2, x2 - y1, x0 - y0, x2 - y1, 1.0, 0.0, 0.0, 0.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        e = _perm(m4, x0 - y2, x1 - y1, x2 - y0, x2 - y0, x1 - y1, 0.0, 0.0, 0.0, 1.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        f = _perm(m5, x0 - y1, x1 - y2, x2 - y0, x2 - y0, x0 - y1, 0.0, 1.0, 0.0, 0.0,
                  F1, F2, dF10, dF11, dF20, dF21, lam)
        buf[0, i] = a[0] + b[0] + c[0] + d[0] + e[0] + f[0]
        buf[1, i] = a[1] + b[1] + c[1] + d[1] + e[1] + f[1]
        buf[2, i] = a[2] + b[2] + c[2] + d[2] + e[2] + f[2]
        buf[3, i] = a[3] + b[3] + c[3] + d[3] + e[3] + f[3]
        buf[4, i] = a[4] + b[4] + c[4] + d[4] + e[4] + f[4]
        buf[5, i] = a[5] + b[5] + c[5] + d[5] + e[5] + f[5]
        buf[6, i] = a[6] + b[6] + c[6] + d[6] + e[6] + f[6]
        buf[7, i] = a[7] + b[7] + c[7] + d[7] + e[7] + f[7]
        buf[8, i] = a[8] + b[8] + c[8] + d[8] + e[8] + f[8]


@njit(cache=True, inline="always", fastmath=_FM)
def _threebody_scalars_grad(at_r, at_F, at_dF, at_spec, t1, b0, b1, t_r, t_F, t_dF, t_spec, lam, buf):
    x0 = at_r[0, t1]
    x1 = at_r[1, t1]
    x2 = at_r[2, t1]
    F1 = at_F[t1]
    dF10 = at_dF[0, t1]
    dF11 = at_dF[1, t1]
    c1 = at_spec[0, t1]
    s11 = at_spec[1, t1]
    s12 = at_spec[2, t1]
    out = np.zeros(18)
    R = t_r[:, b0:b1]
    FB = t_F[b0:b1]
    DFB = t_dF[:, b0:b1]
    SB = t_spec[:, b0:b1]
    for i in range(b1 - b0):
        y0 = R[0, i]
        y1 = R[1, i]
        y2 = R[2, i]
        F2 = FB[i]
        dF20 = DFB[0, i]
        dF21 = DFB[1, i]
        c2 = SB[0, i]
        s21 = SB[1, i]
        s22 = SB[2, i]
        m0 = 1.0 if (c1 == c2) & (s11 == s21) & (s12 == s22) else 0.0
        m1 = 1.0 if (c1 == c2) & (s11 == s22) & (s12 == s21) else 0.0
        m2 = 1.0 if (c1 == s21) & (s11 == s22) & (s12 == c2) else 0.0
        m3 = 1.0 if (c1 == s21) & (s11 == c2) & (s12 == s22) else 0.0
        m4 = 1.0 if (c1 == s22) & (s11 == s21) & (s12 == c2) else 0.0
        m5 = 1.0 if (c1 == s22) & (s11 == c2) & (s12 == s21) else 0.0
        for k in range(18):
            out[k] = 0.0
        _perm_grad(m0, x0 - y0, x1 - y1, x2 - y2, x0 - y0, x1 - y1, 1.0, 0.0, 0.0, 1.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        _perm_grad(m1, x0 - y1, x1 - y0, x2 - y2, x1 - y0, x0 - y1, 0.0, 1.0, 1.0, 0.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        _perm_grad(m2, x0 - y2, x1 - y0, x2 - y1, x1 - y0, x2 - y1, 0.0, 0.0, 1.0, 0.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        _perm_grad(m3, x0 - y0, x1 - y2, x2 - y1, x0 - y0, x2 - y1, 1.0, 0.0, 0.0, 0.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        _perm_grad(m4, x0 - y2, x1 - y1, x2 - y0, x2 - y0, x1 - y1, 0.0, 0.0, 0.0, 1.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        _perm_grad(m5, x0 - y1, x1 - y2, x2 - y0, x2 - y0, x0 - y1, 0.0, 1.0, 0.0, 0.0,
                   F1, F2, dF10, dF11, dF20, dF21, lam, out)
        for k in range(18):
            buf[k, i] = out[k]


@njit(cache=True, inline="always", fastmath=_FM)
def threebody_block(a, b, Pa, Pb, lam, ea, fa, sa, eb, fb, sb, grad, blk, dblk, buf, sg2):
    """3-body 10x10 block between environments ``a`` and ``b``; see :func:`twobody_block`.

    ``buf`` (18, >= triplets of b) and ``sg2`` (4, >= triplets of b) are scratch.
    """
    at_r, at_F, at_dF, at_u, at_psi, at_spec = Pa[9], Pa[10], Pa[11], Pa[12], Pa[13], Pa[14]
    t_r, t_F, t_dF, t_u, t_psi, t_spec = Pb[9], Pb[10], Pb[11], Pb[12], Pb[13], Pb[14]
    a0 = Pa[8][a]
    a1 = Pa[8][a + 1]
    b0 = Pb[8][b]
    b1 = Pb[8][b + 1]
    n = b1 - b0
    if n == 0 or a1 == a0:
        return
    need_g2 = ea and (fb or sb)
    for i in range(n):
        for k in range(4):
            sg2[k, i] = 0.0
    gf = np.zeros((2, 3))
    gs = np.zeros((2, 6))
    dgf = np.zeros((2, 3))
    dgs = np.zeros((2, 6))
    for t1 in range(a0, a1):
        if grad:
            _threebody_scalars_grad(at_r, at_F, at_dF, at_spec, t1, b0, b1, t_r, t_F, t_dF, t_spec, lam, buf)
        else:
            _threebody_scalars(at_r, at_F, at_dF, at_spec, t1, b0, b1, t_r, t_F, t_dF, t_spec, lam, buf)
        if ea and eb:
            blk[0, 0] += W3 * W3 * _rsum(buf, 0, n)
            if grad:
                dblk[0, 0] += W3 * W3 * _rsum(buf, 9, n)
        if eb and (fa or sa):
            for k in range(2):
                sg1 = _rsum(buf, 1 + k, n)
                dsg1 = _rsum(buf, 10 + k, n) if grad else 0.0
                if fa:
                    for d in range(3):
                        blk[1 + d, 0] += W3 * sg1 * at_u[3 * k + d, t1]
                        dblk[1 + d, 0] += W3 * dsg1 * at_u[3 * k + d, t1]
                if sa:
                    for d in range(6):
                        blk[4 + d, 0] += W3 * sg1 * at_psi[6 * k + d, t1]
                        dblk[4 + d, 0] += W3 * dsg1 * at_psi[6 * k + d, t1]
        if need_g2:
            for i in range(n):
                sg2[0, i] += buf[3, i]
                sg2[1, i] += buf[4, i]
            if grad:
                for i in range(n):
                    sg2[2, i] += buf[12, i]
                    sg2[3, i] += buf[13, i]
        if (fa or sa) and (fb or sb):
            for k in range(2):
                if fb:
                    for d in range(3):
                        gf[k, d] = _dot(buf, 5 + 2 * k, t_u, d, b0, n) + _dot(buf, 6 + 2 * k, t_u, 3 + d, b0, n)
                        if grad:
                            dgf[k, d] = (_dot(buf, 14 + 2 * k, t_u, d, b0, n)
                                         + _dot(buf, 15 + 2 * k, t_u, 3 + d, b0, n))
                if sb:
                    for d in range(6):
                        gs[k, d] = _dot(buf, 5 + 2 * k, t_psi, d, b0, n) + _dot(buf, 6 + 2 * k, t_psi, 6 + d, b0, n)
                        if grad:
                            dgs[k, d] = (_dot(buf, 14 + 2 * k, t_psi, d, b0, n)
                                         + _dot(buf, 15 + 2 * k, t_psi, 6 + d, b0, n))
                if fa:
                    for i in range(3):
                        ui = at_u[3 * k + i, t1]
                        if fb:
                            for j in range(3):
                                blk[1 + i, 1 + j] += ui * gf[k, j]
                                dblk[1 + i, 1 + j] += ui * dgf[k, j]
                        if sb:
                            for j in range(6):
                                blk[1 + i, 4 + j] += ui * gs[k, j]
                                dblk[1 + i, 4 + j] += ui * dgs[k, j]
                if sa:
                    for i in range(6):
                        pi = at_psi[6 * k + i, t1]
                        if fb:
                            for j in range(3):
                                blk[4 + i, 1 + j] += pi * gf[k, j]
                                dblk[4 + i, 1 + j] += pi * dgf[k, j]
                        if sb:
                            for j in range(6):
                                blk[4 + i, 4 + j] += pi * gs[k, j]
                                dblk[4 + i, 4 + j] += pi * dgs[k, j]
    if need_g2:
        for l in range(2):
            if fb:
                for d in range(3):
                    blk[0, 1 + d] += W3 * _dot(sg2, l, t_u, 3 * l + d, b0, n)
                    dblk[0, 1 + d] += W3 * _dot(sg2, 2 + l, t_u, 3 * l + d, b0, n)
            if sb:
                for d in range(6):
                    blk[0, 4 + d] += W3 * _dot(sg2, l, t_psi, 6 * l + d, b0, n)
                    dblk[0, 4 + d] += W3 * _dot(sg2, 2 + l, t_psi, 6 * l + d, b0, n)


@njit(cache=True, fastmath=_FM)
def assemble(Pa, Pb, ga_ptr, ga_env, ga_rows, ga_scale, gb_ptr, gb_env, gb_rows, gb_scale,
             symmetric, diagonal, ls2, ls3, grad, use2, use3, K2, K3, dK2, dK3):
    """Covariance between two sets of *label groups*, at unit signal variances.

    A group ``g`` is a set of environments ``g_env[g_ptr[g]:g_ptr[g+1]]`` whose
    functionals are summed: its output row for functional ``t`` (0..9, layout
    E, F(3), S(6)) is ``g_rows[g, t]`` (-1: not used), weighted by
    ``g_scale[g, t]``.  A force label is a group with one environment and rows for
    F; a total energy is a group with all environments of a structure and a row
    for E; a stress is the same with rows for S, scale ``-1/V``.

    Adds into ``K2``/``K3`` (rows of a x rows of b) and, with ``grad``, the
    derivatives with respect to ``ls2``/``ls3`` into ``dK2``/``dK3``.  With
    ``symmetric`` (a and b are the same set) only group pairs ``gb >= ga`` are
    computed and mirrored.  With ``diagonal`` only the pairs ``gb == ga`` are computed
    (self-covariances for predictive variances).  Environments of a come from the
    packed batch ``Pa``, those of b from ``Pb``.
    """
    b_off = Pb[1]
    t_off = Pb[8]
    lam2 = 1.0 / (ls2 * ls2)
    lam3 = 1.0 / (ls3 * ls3)
    dlam2 = -2.0 / (ls2 * ls2 * ls2)
    dlam3 = -2.0 / (ls3 * ls3 * ls3)
    n_ga = ga_ptr.shape[0] - 1
    n_gb = gb_ptr.shape[0] - 1
    max_b = 1
    max_t = 1
    for g in range(n_gb):
        for idx in range(gb_ptr[g], gb_ptr[g + 1]):
            e = gb_env[idx]
            max_b = max(max_b, b_off[e + 1] - b_off[e])
            max_t = max(max_t, t_off[e + 1] - t_off[e])
    buf2 = np.zeros((8, max_b))
    sg2b = np.zeros((2, max_b))
    buf3 = np.zeros((18, max_t))
    sg2t = np.zeros((4, max_t))
    blk2 = np.zeros((10, 10))
    blk3 = np.zeros((10, 10))
    dblk2 = np.zeros((10, 10))
    dblk3 = np.zeros((10, 10))
    for ga in range(n_ga):
        ea = ga_rows[ga, 0] >= 0
        fa = (ga_rows[ga, 1] >= 0) or (ga_rows[ga, 2] >= 0) or (ga_rows[ga, 3] >= 0)
        sa = False
        for t in range(4, 10):
            if ga_rows[ga, t] >= 0:
                sa = True
        start = ga if (symmetric or diagonal) else 0
        stop = ga + 1 if diagonal else n_gb
        for gb in range(start, stop):
            eb = gb_rows[gb, 0] >= 0
            fb = (gb_rows[gb, 1] >= 0) or (gb_rows[gb, 2] >= 0) or (gb_rows[gb, 3] >= 0)
            sb = False
            for t in range(4, 10):
                if gb_rows[gb, t] >= 0:
                    sb = True
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            dblk2[:, :] = 0.0
            dblk3[:, :] = 0.0
            for ia in range(ga_ptr[ga], ga_ptr[ga + 1]):
                ea_env = ga_env[ia]
                for ib in range(gb_ptr[gb], gb_ptr[gb + 1]):
                    eb_env = gb_env[ib]
                    if use2:
                        twobody_block(ea_env, eb_env, Pa, Pb, lam2, ea, fa, sa, eb, fb, sb, grad, blk2, dblk2,
                                      buf2, sg2b)
                    if use3:
                        threebody_block(ea_env, eb_env, Pa, Pb, lam3, ea, fa, sa, eb, fb, sb, grad, blk3, dblk3,
                                        buf3, sg2t)
            for i in range(10):
                ra = ga_rows[ga, i]
                if ra < 0:
                    continue
                wa = ga_scale[ga, i]
                for j in range(10):
                    rb = gb_rows[gb, j]
                    if rb < 0:
                        continue
                    w = wa * gb_scale[gb, j]
                    v2 = w * blk2[i, j]
                    v3 = w * blk3[i, j]
                    K2[ra, rb] += v2
                    K3[ra, rb] += v3
                    d2 = w * dblk2[i, j] * dlam2
                    d3 = w * dblk3[i, j] * dlam3
                    if grad:
                        dK2[ra, rb] += d2
                        dK3[ra, rb] += d3
                    if symmetric and gb != ga:
                        K2[rb, ra] += v2
                        K3[rb, ra] += v3
                        if grad:
                            dK2[rb, ra] += d2
                            dK3[rb, ra] += d3


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


def kernel_blocks(batch, groups_a, groups_b=None, ls2=1.0, ls3=1.0, grad=False, use2=True, use3=True,
                  batch_b=None, diagonal=False):
    """Python front end of :func:`assemble`.

    ``groups_a`` index environments of ``batch``; ``groups_b`` those of ``batch_b``
    (default: the same batch).  Without ``groups_b`` the symmetric matrix of
    ``groups_a`` with itself is computed; with ``diagonal=True`` only each group's
    covariance with itself (``groups_b`` must then be None and the result holds the
    group's own rows).  Returns ``(K2, K3)`` or ``(K2, K3, dK2_dls2, dK3_dls3)`` at unit
    signal variance, shape (groups_a.n_rows, groups_b.n_rows).
    """
    symmetric = groups_b is None and not diagonal
    gb = groups_a if groups_b is None else groups_b
    batch_b = batch if batch_b is None else batch_b
    na, nb = groups_a.n_rows, gb.n_rows
    K2 = np.zeros((na, nb))
    K3 = np.zeros((na, nb))
    if grad:
        dK2 = np.zeros((na, nb))
        dK3 = np.zeros((na, nb))
    else:
        dK2 = np.zeros((1, 1))
        dK3 = np.zeros((1, 1))
    if na and nb and len(batch) and len(batch_b):
        assemble(
            pack(batch), pack(batch_b),
            groups_a.ptr, groups_a.env, groups_a.rows, groups_a.scale,
            gb.ptr, gb.env, gb.rows, gb.scale,
            symmetric, diagonal, float(ls2), float(ls3), grad, use2, use3,
            K2, K3, dK2, dK3,
        )
    if grad:
        return K2, K3, dK2, dK3
    return K2, K3


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


# ===========================================================================
# Fast prediction path: the covariance of every test environment's local energy and
# force (E, Fx, Fy, Fz) with the training labels, and the prior force self-variances
# diag k_FF(x, x), in one parallel numba call per structure.
#
# Same kernels as above (the results agree to round-off), restructured for speed:
#
# * only the functionals prediction needs are formed (test side E and F; the training
#   side's E/F/S as its labels require; for k(x, x) only the force block);
# * every sum over the second cluster's bonds is contracted on the fly into a few
#   per-cluster accumulators (no scratch rows, one pass over the inner cluster list);
# * 3-body: exp(-|d1 - P d2|^2 / 2l^2) = prod_k exp(-(a_k - b_pk)^2 / 2l^2) over the
#   three bonds, so the six permutation exponentials are products of the nine factors
#   e_ab = exp(-(x_a - y_b)^2 / 2l^2).  Eight of them pair a central bond with some bond
#   and are taken from per-environment-pair tables (central bond lengths are shared by
#   many triplets); only the cross-bond/cross-bond factor e_22 is computed per triplet
#   pair: one exp per triplet pair instead of six.
# * the permutation sums are reorganised into the 13 sums S0, Sx_k, Sy_l, Sxy_kl, Sd_kl
#   (see _tb_terms) from which value, gradients and Hessian of the six-permutation
#   kernel follow.
# ===========================================================================

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


@njit(cache=True, inline="always", fastmath=_FM)
def _pair2_fast(a, b, PA, PB, lam, mono, ea, fa, sa, blk):
    """2-body (E, F, S of a) x (E, F of b) block added into ``blk`` (10, 4).  ``mono``: all
    bonds of both environments have the same species pair (no mask needed)."""
    a0 = PA[_F_BOFF][a]
    a1 = a0 + PA[_F_BN][a]
    b0 = PB[_F_BOFF][b]
    b1 = PB[_F_BOFF][b + 1]
    n = b1 - b0
    if PB[_F_BN][b] == 0 or a1 == a0:
        return
    ar = PA[_F_BR]
    af = PA[_F_BF]
    adf = PA[_F_BDF]
    acode = PA[_F_BCODE]
    au = PA[_F_BU]
    apsi = PA[_F_BPSI]
    RB = PB[_F_BR][b0:b1]
    FB = PB[_F_BF][b0:b1]
    CB = PB[_F_BCODE][b0:b1]
    V0 = PB[_F_BV][0, b0:b1]
    V1 = PB[_F_BV][1, b0:b1]
    V2 = PB[_F_BV][2, b0:b1]
    W0 = PB[_F_BW][0, b0:b1]
    W1 = PB[_F_BW][1, b0:b1]
    W2_ = PB[_F_BW][2, b0:b1]
    hl = -0.5 * lam
    for m in range(a0, a1):
        r1 = ar[m]
        c1 = acode[m]
        B0 = 0.0
        Bd = 0.0
        A10 = 0.0
        A11 = 0.0
        A12 = 0.0
        A20 = 0.0
        A21 = 0.0
        A22 = 0.0
        if mono:
            # padded entries have f = V = W = 0 and contribute exactly zero
            for i in range(n):
                dl = r1 - RB[i]
                ex = exp_neg(hl * dl * dl)
                ed = ex * dl
                f2 = FB[i]
                B0 += f2 * ex
                Bd += f2 * ed
                led = lam * ed
                c2 = led * dl - ex
                A10 += ex * V0[i] + led * W0[i]
                A11 += ex * V1[i] + led * W1[i]
                A12 += ex * V2[i] + led * W2_[i]
                A20 += ed * V0[i] + c2 * W0[i]
                A21 += ed * V1[i] + c2 * W1[i]
                A22 += ed * V2[i] + c2 * W2_[i]
        else:
            for i in range(n):
                dl = r1 - RB[i]
                ex = (1.0 if CB[i] == c1 else 0.0) * exp_neg(hl * dl * dl)
                ed = ex * dl
                f2 = FB[i]
                B0 += f2 * ex
                Bd += f2 * ed
                led = lam * ed
                c2 = led * dl - ex
                A10 += ex * V0[i] + led * W0[i]
                A11 += ex * V1[i] + led * W1[i]
                A12 += ex * V2[i] + led * W2_[i]
                A20 += ed * V0[i] + c2 * W0[i]
                A21 += ed * V1[i] + c2 * W1[i]
                A22 += ed * V2[i] + c2 * W2_[i]
        f1 = af[m]
        df1 = adf[m]
        if ea:
            blk[0, 0] += W2 * W2 * f1 * B0
            blk[0, 1] += W2 * f1 * A10
            blk[0, 2] += W2 * f1 * A11
            blk[0, 3] += W2 * f1 * A12
        if fa or sa:
            g1 = df1 * B0 - lam * f1 * Bd
            lf = lam * f1
            gf0 = df1 * A10 - lf * A20
            gf1 = df1 * A11 - lf * A21
            gf2 = df1 * A12 - lf * A22
            if fa:
                for d in range(3):
                    u = au[d, m]
                    blk[1 + d, 0] += W2 * g1 * u
                    blk[1 + d, 1] += u * gf0
                    blk[1 + d, 2] += u * gf1
                    blk[1 + d, 3] += u * gf2
            if sa:
                for d in range(6):
                    p = apsi[d, m]
                    blk[4 + d, 0] += W2 * g1 * p
                    blk[4 + d, 1] += p * gf0
                    blk[4 + d, 2] += p * gf1
                    blk[4 + d, 3] += p * gf2


@njit(cache=True, inline="always", fastmath=_FM)
def _tb_terms(lam, X0, X1, X2, y0, y1, y2, E0, E1, E2, E3, E4, E5, F2, V0, V1, V2, W00, W01, W02, W10, W11, W12):
    """Contributions of one triplet pair (outer x, inner y) to the 12 accumulators.

    Permutations (bond k of x paired with bond pi(k) of y): pi0 = (0,1,2), pi1 = (1,0,2),
    pi2 = (2,0,1), pi3 = (0,2,1), pi4 = (2,1,0), pi5 = (1,2,0); E_p their (masked)
    exponentials (E0 = e00 e11 e22, E1 = e01 e10 e22, E2 = e02 e10 e21, E3 = e00 e12 e21,
    E4 = e02 e11 e20, E5 = e01 e12 e20 with e_ab = exp(-lam (x_a - y_b)^2 / 2)), d_ab = x_a - y_b.  With S0 = sum E, Sx_k = sum E d_{k,pi k},
    Sy_l = sum E d_{pi^-1 l, l}, Sxy_kl = sum E d_{k,pi k} d_{pi^-1 l,l}, Sd_kl = sum E [pi k = l]:
    k = F1 F2 S0, dk/dx_k = F2 (dF1_k S0 - lam F1 Sx_k), dk/dy_l = F1 (dF2_l S0 + lam F2 Sy_l),
    H_kl = dF1_k dF2_l S0 + lam dF1_k F2 Sy_l - lam F1 dF2_l Sx_k - lam^2 F1 F2 Sxy_kl + lam F1 F2 Sd_kl.
    Accumulated (V_j = sum_l dF2_l u_lj, W_lj = F2 u_lj of y):
    B0 = F2 S0, Bx_k = F2 Sx_k, A1_j = S0 V_j + lam sum_l Sy_l W_lj,
    A2_kj = Sx_k V_j + sum_l (lam Sxy_kl - Sd_kl) W_lj.
    """
    d00 = X0 - y0
    d01 = X0 - y1
    d02 = X0 - y2
    d10 = X1 - y0
    d11 = X1 - y1
    d12 = X1 - y2
    d20 = X2 - y0
    d21 = X2 - y1
    P03 = E0 + E3
    P15 = E1 + E5
    P24 = E2 + E4
    P04 = E0 + E4
    P12 = E1 + E2
    P35 = E3 + E5
    P45 = E4 + E5
    P23 = E2 + E3
    S0 = P03 + P15 + P24
    Sx0 = d00 * P03 + d01 * P15 + d02 * P24
    Sx1 = d11 * P04 + d10 * P12 + d12 * P35
    Sy0 = d00 * P03 + d10 * P12 + d20 * P45
    Sy1 = d11 * P04 + d01 * P15 + d21 * P23
    R00 = lam * (d00 * d00 * P03 + d10 * (d01 * E1 + d02 * E2) + d20 * (d02 * E4 + d01 * E5)) - P03
    R01 = lam * (d00 * (d11 * E0 + d21 * E3) + d01 * d01 * P15 + d02 * (d21 * E2 + d11 * E4)) - P15
    R10 = lam * (d11 * (d00 * E0 + d20 * E4) + d10 * d10 * P12 + d12 * (d00 * E3 + d20 * E5)) - P12
    R11 = lam * (d11 * d11 * P04 + d10 * (d01 * E1 + d21 * E2) + d12 * (d21 * E3 + d01 * E5)) - P04
    lS0 = lam * Sy0
    lS1 = lam * Sy1
    return (F2 * S0, F2 * Sx0, F2 * Sx1,
            S0 * V0 + lS0 * W00 + lS1 * W10,
            S0 * V1 + lS0 * W01 + lS1 * W11,
            S0 * V2 + lS0 * W02 + lS1 * W12,
            Sx0 * V0 + R00 * W00 + R01 * W10,
            Sx0 * V1 + R00 * W01 + R01 * W11,
            Sx0 * V2 + R00 * W02 + R01 * W12,
            Sx1 * V0 + R10 * W00 + R11 * W10,
            Sx1 * V1 + R10 * W01 + R11 * W11,
            Sx1 * V2 + R10 * W02 + R11 * W12)


@njit(cache=True, inline="always", fastmath=_FM)
def _pair3_fast(a, b, PA, PB, lam, mono, ea, fa, sa, blk, TB, AE0, AE1):
    """3-body (E, F, S of a) x (E, F of b) block added into ``blk`` (10, 4).

    ``TB`` (flat), ``AE0, AE1`` (2D) are scratch for the tables (see the section comment).  ``mono``: all
    triplets of both environments have the same species code (every permutation counts).
    """
    a0 = PA[_F_TOFF][a]
    a1 = a0 + PA[_F_TN][a]
    b0 = PB[_F_TOFF][b]
    b1 = PB[_F_TOFF][b + 1]
    n = b1 - b0
    if PB[_F_TN][b] == 0 or a1 == a0:
        return
    hl = -0.5 * lam
    ua0 = PA[_F_UOFF][a]
    na = PA[_F_UOFF][a + 1] - ua0
    ub0 = PB[_F_UOFF][b]
    nb = PB[_F_UOFF][b + 1] - ub0
    ra = PA[_F_UVAL][ua0:ua0 + na]
    rb = PB[_F_UVAL][ub0:ub0 + nb]
    Y0 = PB[_F_X0][b0:b1]
    Y1 = PB[_F_X1][b0:b1]
    Y2 = PB[_F_X2][b0:b1]
    J0 = PB[_F_I0][b0:b1]
    J1 = PB[_F_I1][b0:b1]
    FB = PB[_F_TF][b0:b1]
    PCODE = PB[_F_PCODE]
    # tables: central-central, central(a)-cross(b), cross(a)-central(b); the squared
    # differences are laid out flat first so that the exponentials run in one long
    # (vectorised) loop
    ax2 = PA[_F_X2]
    na_ = a1 - a0
    oB = na * nb
    oC = oB + na * n
    nT = oC + na_ * nb
    for p in range(na):
        rp = ra[p]
        for q in range(nb):
            dd = rp - rb[q]
            TB[p * nb + q] = dd * dd
        for i in range(n):
            dd = rp - Y2[i]
            TB[oB + p * n + i] = dd * dd
    for t in range(na_):
        X2 = ax2[a0 + t]
        for q in range(nb):
            dd = X2 - rb[q]
            TB[oC + t * nb + q] = dd * dd
    for k in range(nT):
        TB[k] = exp_neg(hl * TB[k])
    A = TB[:oB].reshape((na, nb))
    BT = TB[oB:oC].reshape((na, n))
    C = TB[oC:nT].reshape((na_, nb))
    for p in range(na):
        Ar = A[p]
        E0r = AE0[p]
        E1r = AE1[p]
        for i in range(n):
            E0r[i] = Ar[J0[i]]
            E1r[i] = Ar[J1[i]]
    ax0 = PA[_F_X0]
    ax1 = PA[_F_X1]
    aF = PA[_F_TF]
    adF0 = PA[_F_TDF0]
    adF1 = PA[_F_TDF1]
    ai0 = PA[_F_I0]
    ai1 = PA[_F_I1]
    acode = PA[_F_CODE]
    au = PA[_F_TU]
    apsi = PA[_F_TPSI]
    TV = PB[_F_TV]
    TW = PB[_F_TW]
    V0 = TV[0, b0:b1]
    V1 = TV[1, b0:b1]
    V2 = TV[2, b0:b1]
    W00 = TW[0, b0:b1]
    W01 = TW[1, b0:b1]
    W02 = TW[2, b0:b1]
    W10 = TW[3, b0:b1]
    W11 = TW[4, b0:b1]
    W12 = TW[5, b0:b1]
    PC0 = PCODE[0, b0:b1]
    PC1 = PCODE[1, b0:b1]
    PC2 = PCODE[2, b0:b1]
    PC3 = PCODE[3, b0:b1]
    PC4 = PCODE[4, b0:b1]
    PC5 = PCODE[5, b0:b1]
    for t1 in range(a0, a1):
        X0 = ax0[t1]
        X1 = ax1[t1]
        X2 = ax2[t1]
        i0 = ai0[t1]
        i1 = ai1[t1]
        R00 = AE0[i0]
        R01 = AE1[i0]
        R10 = AE0[i1]
        R11 = AE1[i1]
        B0r = BT[i0]
        B1r = BT[i1]
        Cr = C[t1 - a0]
        acc0 = 0.0
        acc1 = 0.0
        acc2 = 0.0
        acc3 = 0.0
        acc4 = 0.0
        acc5 = 0.0
        acc6 = 0.0
        acc7 = 0.0
        acc8 = 0.0
        acc9 = 0.0
        acc10 = 0.0
        acc11 = 0.0
        if mono:
            for i in range(n):
                y2 = Y2[i]
                dd = X2 - y2
                e22 = exp_neg(hl * dd * dd)
                e00 = R00[i]
                e01 = R01[i]
                e10 = R10[i]
                e11 = R11[i]
                e02 = B0r[i]
                e12 = B1r[i]
                e20 = Cr[J0[i]]
                e21 = Cr[J1[i]]
                r = _tb_terms(lam, X0, X1, X2, Y0[i], Y1[i], y2, e00 * e11 * e22, e01 * e10 * e22,
                              e02 * e10 * e21, e00 * e12 * e21, e02 * e11 * e20, e01 * e12 * e20, FB[i], V0[i], V1[i], V2[i], W00[i], W01[i], W02[i], W10[i], W11[i], W12[i])
                acc0 += r[0]
                acc1 += r[1]
                acc2 += r[2]
                acc3 += r[3]
                acc4 += r[4]
                acc5 += r[5]
                acc6 += r[6]
                acc7 += r[7]
                acc8 += r[8]
                acc9 += r[9]
                acc10 += r[10]
                acc11 += r[11]
        else:
            c1 = acode[t1]
            for i in range(n):
                y2 = Y2[i]
                dd = X2 - y2
                m0 = 1.0 if PC0[i] == c1 else 0.0
                m1 = 1.0 if PC1[i] == c1 else 0.0
                m2 = 1.0 if PC2[i] == c1 else 0.0
                m3 = 1.0 if PC3[i] == c1 else 0.0
                m4 = 1.0 if PC4[i] == c1 else 0.0
                m5 = 1.0 if PC5[i] == c1 else 0.0
                e22 = exp_neg(hl * dd * dd)
                e00 = R00[i]
                e01 = R01[i]
                e10 = R10[i]
                e11 = R11[i]
                e02 = B0r[i]
                e12 = B1r[i]
                e20 = Cr[J0[i]]
                e21 = Cr[J1[i]]
                r = _tb_terms(lam, X0, X1, X2, Y0[i], Y1[i], y2, m0 * e00 * e11 * e22, m1 * e01 * e10 * e22,
                              m2 * e02 * e10 * e21, m3 * e00 * e12 * e21, m4 * e02 * e11 * e20,
                              m5 * e01 * e12 * e20, FB[i], V0[i], V1[i], V2[i], W00[i], W01[i], W02[i], W10[i], W11[i], W12[i])
                acc0 += r[0]
                acc1 += r[1]
                acc2 += r[2]
                acc3 += r[3]
                acc4 += r[4]
                acc5 += r[5]
                acc6 += r[6]
                acc7 += r[7]
                acc8 += r[8]
                acc9 += r[9]
                acc10 += r[10]
                acc11 += r[11]
        F1 = aF[t1]
        dF10 = adF0[t1]
        dF11 = adF1[t1]
        if ea:
            blk[0, 0] += W3 * W3 * F1 * acc0
            blk[0, 1] += W3 * F1 * acc3
            blk[0, 2] += W3 * F1 * acc4
            blk[0, 3] += W3 * F1 * acc5
        if fa or sa:
            lf = lam * F1
            g10 = dF10 * acc0 - lf * acc1
            g11 = dF11 * acc0 - lf * acc2
            gf00 = dF10 * acc3 - lf * acc6
            gf01 = dF10 * acc4 - lf * acc7
            gf02 = dF10 * acc5 - lf * acc8
            gf10 = dF11 * acc3 - lf * acc9
            gf11 = dF11 * acc4 - lf * acc10
            gf12 = dF11 * acc5 - lf * acc11
            if fa:
                for d in range(3):
                    u0 = au[d, t1]
                    u1 = au[3 + d, t1]
                    blk[1 + d, 0] += W3 * (g10 * u0 + g11 * u1)
                    blk[1 + d, 1] += u0 * gf00 + u1 * gf10
                    blk[1 + d, 2] += u0 * gf01 + u1 * gf11
                    blk[1 + d, 3] += u0 * gf02 + u1 * gf12
            if sa:
                for d in range(6):
                    p0 = apsi[d, t1]
                    p1 = apsi[6 + d, t1]
                    blk[4 + d, 0] += W3 * (g10 * p0 + g11 * p1)
                    blk[4 + d, 1] += p0 * gf00 + p1 * gf10
                    blk[4 + d, 2] += p0 * gf01 + p1 * gf11
                    blk[4 + d, 3] += p0 * gf02 + p1 * gf12


@njit(cache=True, nogil=True, fastmath=_FM)
def prediction_covariance(PA, PB, g_ptr, g_env, g_rows, g_scale, ls2, ls3, use2, use3, b_lo, b_hi, K2, K3, P2, P3):
    """Covariance of (E, Fx, Fy, Fz) of the environments ``b_lo <= b < b_hi`` of ``PB``
    with the label groups of ``PA`` (see :func:`assemble`), and their prior force
    self-variances.

    Adds into ``K2``/``K3`` (n_rows, m, 4) and writes ``P2``/``P3`` (m, 3, 3) =
    k_FF(b, b), the full prior 3×3 force block of each environment (symmetric), all at
    unit signal variance.  Releases the GIL, so disjoint ranges
    of ``b`` can run in threads.
    """
    lam2 = 1.0 / (ls2 * ls2)
    lam3 = 1.0 / (ls3 * ls3)
    n_g = g_ptr.shape[0] - 1
    # scratch sizes
    mu = 1
    mt = 1
    for a in range(PA[_F_CSPEC].shape[0]):
        mu = max(mu, PA[_F_UOFF][a + 1] - PA[_F_UOFF][a])
        mt = max(mt, PA[_F_TOFF][a + 1] - PA[_F_TOFF][a])
    for b in range(b_lo, b_hi):
        mu = max(mu, PB[_F_UOFF][b + 1] - PB[_F_UOFF][b])
        mt = max(mt, PB[_F_TOFF][b + 1] - PB[_F_TOFF][b])
    ca = PA[_F_MONO][0]
    cb = PB[_F_MONO][0]
    mono_ab = ca != -2 and cb != -2 and (ca == cb or ca == -1 or cb == -1)
    ba = PA[_F_BMONO][0]
    bb = PB[_F_BMONO][0]
    mono2_ab = ba != -2 and bb != -2 and (ba == bb or ba == -1 or bb == -1)
    TB = np.empty(mu * mu + 2 * mu * mt)
    AE0 = np.empty((mu, mt))
    AE1 = np.empty((mu, mt))
    blk2 = np.zeros((10, 4))
    blk3 = np.zeros((10, 4))
    for b in range(b_lo, b_hi):
        # groups of the training set, then (g == n_g) b with itself for the prior variance
        for g in range(n_g + 1):
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            if g < n_g:
                PX = PA
                ea = g_rows[g, 0] >= 0
                fa = (g_rows[g, 1] >= 0) or (g_rows[g, 2] >= 0) or (g_rows[g, 3] >= 0)
                sa = False
                for t in range(4, 10):
                    if g_rows[g, t] >= 0:
                        sa = True
                mono = mono_ab
                mono2 = mono2_ab
                i_lo = g_ptr[g]
                i_hi = g_ptr[g + 1]
            else:
                PX = PB
                ea = False
                fa = True
                sa = False
                mono = cb != -2
                mono2 = bb != -2
                i_lo = 0
                i_hi = 1
            for ia in range(i_lo, i_hi):
                a = g_env[ia] if g < n_g else b
                if use2:
                    _pair2_fast(a, b, PX, PB, lam2, mono2, ea, fa, sa, blk2)
                if use3:
                    _pair3_fast(a, b, PX, PB, lam3, mono, ea, fa, sa, blk3, TB, AE0, AE1)
            if g < n_g:
                for i in range(10):
                    r = g_rows[g, i]
                    if r < 0:
                        continue
                    w = g_scale[g, i]
                    for j in range(4):
                        K2[r, b, j] += w * blk2[i, j]
                        K3[r, b, j] += w * blk3[i, j]
            else:
                for d in range(3):
                    for e in range(3):
                        P2[b, d, e] = blk2[1 + d, 1 + e]
                        P3[b, d, e] = blk3[1 + d, 1 + e]


def prediction_blocks(batch, groups, test_batch, n_species, ls2=1.0, ls3=1.0, use2=True, use3=True, threads=1):
    """Python front end of :func:`prediction_covariance` (``threads`` > 1 splits the test
    environments over that many threads).

    Returns ``(K2, K3, P2, P3)``: ``K*`` (groups.n_rows, m, 4) covariances of the training
    label rows with (E, Fx, Fy, Fz) of the ``m`` environments of ``test_batch``; ``P*``
    (m, 3, 3) the prior 3×3 covariance of each test environment's force (its diagonal the
    per-component prior variances), all at unit signal variance.
    Equal (to round-off) to the corresponding entries of :func:`kernel_blocks`.
    """
    m = len(test_batch)
    K2 = np.zeros((groups.n_rows, m, 4))
    K3 = np.zeros((groups.n_rows, m, 4))
    P2 = np.zeros((m, 3, 3))
    P3 = np.zeros((m, 3, 3))
    if m == 0:
        return K2, K3, P2, P3
    PB = pack_fast(test_batch, n_species)
    PA = pack_fast(batch, n_species) if len(batch) else PB
    g = groups if len(batch) else LabelGroups.concatenate([])
    args = (PA, PB, g.ptr, g.env, g.rows, g.scale, float(ls2), float(ls3), bool(use2), bool(use3))
    threads = max(1, min(int(threads or 1), m))
    if threads == 1:
        prediction_covariance(*args, 0, m, K2, K3, P2, P3)
    else:
        # ranges of test environments handed out on demand (the kernel releases the GIL);
        # the calling thread works too, so a descheduled worker delays only its own chunk
        size = max(2, -(-m // (4 * threads)))
        chunks = iter([(lo, min(lo + size, m)) for lo in range(0, m, size)])
        lock = threading.Lock()

        def work():
            while True:
                with lock:
                    c = next(chunks, None)
                if c is None:
                    return
                prediction_covariance(*args, c[0], c[1], K2, K3, P2, P3)

        futures = [_executor(threads - 1).submit(work) for _ in range(threads - 1)]
        work()
        for f in futures:
            f.result()
    return K2, K3, P2, P3



# ===========================================================================
# Training covariance of force labels (the common case: every label a force component of
# one environment), with the fast path's tables and permutation sums, and the length-scale
# derivative from the same sums: every term is linear in the permutation exponentials E_p,
# and dE_p/dlam = -D_p/2 E_p (D_p the squared distance of permutation p), so d/dlam of an
# accumulator is the same accumulator over E'_p = -D_p/2 E_p plus its explicit lam terms.
# ===========================================================================


@njit(cache=True, inline="always", fastmath=_FM)
def _pair2_ff(a, b, P, lam, mono, grad, blk, dblk):
    """2-body force-force 3x3 block of environments ``a`` (rows) and ``b`` (columns) of the
    fast pack ``P`` added into ``blk`` (and d/dlam into ``dblk`` with ``grad``)."""
    a0 = P[_F_BOFF][a]
    a1 = a0 + P[_F_BN][a]
    b0 = P[_F_BOFF][b]
    b1 = P[_F_BOFF][b + 1]
    n = b1 - b0
    if P[_F_BN][b] == 0 or a1 == a0:
        return
    ar = P[_F_BR]
    af = P[_F_BF]
    adf = P[_F_BDF]
    acode = P[_F_BCODE]
    au = P[_F_BU]
    RB = P[_F_BR][b0:b1]
    CB = P[_F_BCODE][b0:b1]
    V0 = P[_F_BV][0, b0:b1]
    V1 = P[_F_BV][1, b0:b1]
    V2 = P[_F_BV][2, b0:b1]
    W0 = P[_F_BW][0, b0:b1]
    W1 = P[_F_BW][1, b0:b1]
    W2_ = P[_F_BW][2, b0:b1]
    hl = -0.5 * lam
    for m in range(a0, a1):
        r1 = ar[m]
        c1 = acode[m]
        A10 = 0.0
        A11 = 0.0
        A12 = 0.0
        A20 = 0.0
        A21 = 0.0
        A22 = 0.0
        dA10 = 0.0
        dA11 = 0.0
        dA12 = 0.0
        dA20 = 0.0
        dA21 = 0.0
        dA22 = 0.0
        if grad:
            for i in range(n):
                dl = r1 - RB[i]
                ex = exp_neg(hl * dl * dl)
                if not mono:
                    ex *= 1.0 if CB[i] == c1 else 0.0
                ed = ex * dl
                led = lam * ed
                c2 = led * dl - ex
                A10 += ex * V0[i] + led * W0[i]
                A11 += ex * V1[i] + led * W1[i]
                A12 += ex * V2[i] + led * W2_[i]
                A20 += ed * V0[i] + c2 * W0[i]
                A21 += ed * V1[i] + c2 * W1[i]
                A22 += ed * V2[i] + c2 * W2_[i]
                exd = -0.5 * dl * dl * ex
                edd = exd * dl
                dled = ed + lam * edd
                dc2 = dled * dl - exd
                dA10 += exd * V0[i] + dled * W0[i]
                dA11 += exd * V1[i] + dled * W1[i]
                dA12 += exd * V2[i] + dled * W2_[i]
                dA20 += edd * V0[i] + dc2 * W0[i]
                dA21 += edd * V1[i] + dc2 * W1[i]
                dA22 += edd * V2[i] + dc2 * W2_[i]
        else:
            for i in range(n):
                dl = r1 - RB[i]
                ex = exp_neg(hl * dl * dl)
                if not mono:
                    ex *= 1.0 if CB[i] == c1 else 0.0
                ed = ex * dl
                led = lam * ed
                c2 = led * dl - ex
                A10 += ex * V0[i] + led * W0[i]
                A11 += ex * V1[i] + led * W1[i]
                A12 += ex * V2[i] + led * W2_[i]
                A20 += ed * V0[i] + c2 * W0[i]
                A21 += ed * V1[i] + c2 * W1[i]
                A22 += ed * V2[i] + c2 * W2_[i]
        f1 = af[m]
        df1 = adf[m]
        lf = lam * f1
        gf0 = df1 * A10 - lf * A20
        gf1 = df1 * A11 - lf * A21
        gf2 = df1 * A12 - lf * A22
        for d in range(3):
            u = au[d, m]
            blk[d, 0] += u * gf0
            blk[d, 1] += u * gf1
            blk[d, 2] += u * gf2
        if grad:
            dg0 = df1 * dA10 - f1 * A20 - lf * dA20
            dg1 = df1 * dA11 - f1 * A21 - lf * dA21
            dg2 = df1 * dA12 - f1 * A22 - lf * dA22
            for d in range(3):
                u = au[d, m]
                dblk[d, 0] += u * dg0
                dblk[d, 1] += u * dg1
                dblk[d, 2] += u * dg2


@njit(cache=True, inline="always", fastmath=_FM)
def _tb_sums(X0, X1, X2, y0, y1, y2, E0, E1, E2, E3, E4, E5):
    """The permutation sums of :func:`_tb_terms` for one triplet pair: S0, Sx_k, Sy_l,
    Sxy_kl and Sd_kl (same permutation numbering)."""
    d00 = X0 - y0
    d01 = X0 - y1
    d02 = X0 - y2
    d10 = X1 - y0
    d11 = X1 - y1
    d12 = X1 - y2
    d20 = X2 - y0
    d21 = X2 - y1
    P03 = E0 + E3
    P15 = E1 + E5
    P24 = E2 + E4
    P04 = E0 + E4
    P12 = E1 + E2
    P35 = E3 + E5
    P45 = E4 + E5
    P23 = E2 + E3
    S0 = P03 + P15 + P24
    Sx0 = d00 * P03 + d01 * P15 + d02 * P24
    Sx1 = d11 * P04 + d10 * P12 + d12 * P35
    Sy0 = d00 * P03 + d10 * P12 + d20 * P45
    Sy1 = d11 * P04 + d01 * P15 + d21 * P23
    X00 = d00 * d00 * P03 + d10 * (d01 * E1 + d02 * E2) + d20 * (d02 * E4 + d01 * E5)
    X01 = d00 * (d11 * E0 + d21 * E3) + d01 * d01 * P15 + d02 * (d21 * E2 + d11 * E4)
    X10 = d11 * (d00 * E0 + d20 * E4) + d10 * d10 * P12 + d12 * (d00 * E3 + d20 * E5)
    X11 = d11 * d11 * P04 + d10 * (d01 * E1 + d21 * E2) + d12 * (d21 * E3 + d01 * E5)
    return S0, Sx0, Sx1, Sy0, Sy1, X00, X01, X10, X11, P03, P15, P12, P04


@njit(cache=True, inline="always", fastmath=_FM)
def _pair3_ff(a, b, P, lam, mono, grad, blk, dblk, TB, AE0, AE1):
    """3-body force-force 3x3 block of environments ``a`` (rows) and ``b`` (columns) of the
    fast pack ``P`` added into ``blk`` (and d/dlam into ``dblk`` with ``grad``); the tables
    as in :func:`_pair3_fast` (``TB``, ``AE0``, ``AE1`` scratch)."""
    a0 = P[_F_TOFF][a]
    a1 = a0 + P[_F_TN][a]
    b0 = P[_F_TOFF][b]
    b1 = P[_F_TOFF][b + 1]
    n = b1 - b0
    if P[_F_TN][b] == 0 or a1 == a0:
        return
    hl = -0.5 * lam
    ua0 = P[_F_UOFF][a]
    na = P[_F_UOFF][a + 1] - ua0
    ub0 = P[_F_UOFF][b]
    nb = P[_F_UOFF][b + 1] - ub0
    ra = P[_F_UVAL][ua0:ua0 + na]
    rb = P[_F_UVAL][ub0:ub0 + nb]
    Y0 = P[_F_X0][b0:b1]
    Y1 = P[_F_X1][b0:b1]
    Y2 = P[_F_X2][b0:b1]
    J0 = P[_F_I0][b0:b1]
    J1 = P[_F_I1][b0:b1]
    ax2 = P[_F_X2]
    na_ = a1 - a0
    oB = na * nb
    oC = oB + na * n
    nT = oC + na_ * nb
    for p in range(na):
        rp = ra[p]
        for q in range(nb):
            dd = rp - rb[q]
            TB[p * nb + q] = dd * dd
        for i in range(n):
            dd = rp - Y2[i]
            TB[oB + p * n + i] = dd * dd
    for t in range(na_):
        X2 = ax2[a0 + t]
        for q in range(nb):
            dd = X2 - rb[q]
            TB[oC + t * nb + q] = dd * dd
    for k in range(nT):
        TB[k] = exp_neg(hl * TB[k])
    A = TB[:oB].reshape((na, nb))
    BT = TB[oB:oC].reshape((na, n))
    C = TB[oC:nT].reshape((na_, nb))
    for p in range(na):
        Ar = A[p]
        E0r = AE0[p]
        E1r = AE1[p]
        for i in range(n):
            E0r[i] = Ar[J0[i]]
            E1r[i] = Ar[J1[i]]
    ax0 = P[_F_X0]
    ax1 = P[_F_X1]
    aF = P[_F_TF]
    adF0 = P[_F_TDF0]
    adF1 = P[_F_TDF1]
    ai0 = P[_F_I0]
    ai1 = P[_F_I1]
    acode = P[_F_CODE]
    au = P[_F_TU]
    PCODE = P[_F_PCODE]
    TV = P[_F_TV]
    TW = P[_F_TW]
    V0 = TV[0, b0:b1]
    V1 = TV[1, b0:b1]
    V2 = TV[2, b0:b1]
    W00 = TW[0, b0:b1]
    W01 = TW[1, b0:b1]
    W02 = TW[2, b0:b1]
    W10 = TW[3, b0:b1]
    W11 = TW[4, b0:b1]
    W12 = TW[5, b0:b1]
    PC0 = PCODE[0, b0:b1]
    PC1 = PCODE[1, b0:b1]
    PC2 = PCODE[2, b0:b1]
    PC3 = PCODE[3, b0:b1]
    PC4 = PCODE[4, b0:b1]
    PC5 = PCODE[5, b0:b1]
    acc = np.zeros(9)
    dacc = np.zeros(9)
    for t1 in range(a0, a1):
        X0 = ax0[t1]
        X1 = ax1[t1]
        X2 = ax2[t1]
        i0 = ai0[t1]
        i1 = ai1[t1]
        R00 = AE0[i0]
        R01 = AE1[i0]
        R10 = AE0[i1]
        R11 = AE1[i1]
        B0r = BT[i0]
        B1r = BT[i1]
        Cr = C[t1 - a0]
        c1 = acode[t1]
        # acc[j] = S0 V_j + lam sum_l Sy_l W_lj; acc[3 + 3k + j] = Sx_k V_j + sum_l R_kl W_lj
        a0_ = 0.0
        a1_ = 0.0
        a2_ = 0.0
        a3_ = 0.0
        a4_ = 0.0
        a5_ = 0.0
        a6_ = 0.0
        a7_ = 0.0
        a8_ = 0.0
        g0 = 0.0
        g1 = 0.0
        g2 = 0.0
        g3 = 0.0
        g4 = 0.0
        g5 = 0.0
        g6 = 0.0
        g7 = 0.0
        g8 = 0.0
        if grad:  # two loops: a grad branch inside the loop kept the plain one from vectorising (1.5x)
            for i in range(n):
                y0 = Y0[i]
                y1 = Y1[i]
                y2 = Y2[i]
                dd = X2 - y2
                e22 = exp_neg(hl * dd * dd)
                e00 = R00[i]
                e01 = R01[i]
                e10 = R10[i]
                e11 = R11[i]
                e02 = B0r[i]
                e12 = B1r[i]
                e20 = Cr[J0[i]]
                e21 = Cr[J1[i]]
                E0 = e00 * e11 * e22
                E1 = e01 * e10 * e22
                E2 = e02 * e10 * e21
                E3 = e00 * e12 * e21
                E4 = e02 * e11 * e20
                E5 = e01 * e12 * e20
                if not mono:
                    E0 *= 1.0 if PC0[i] == c1 else 0.0
                    E1 *= 1.0 if PC1[i] == c1 else 0.0
                    E2 *= 1.0 if PC2[i] == c1 else 0.0
                    E3 *= 1.0 if PC3[i] == c1 else 0.0
                    E4 *= 1.0 if PC4[i] == c1 else 0.0
                    E5 *= 1.0 if PC5[i] == c1 else 0.0
                S0, Sx0, Sx1, Sy0, Sy1, X00, X01, X10, X11, D00, D01, D10, D11 = _tb_sums(
                    X0, X1, X2, y0, y1, y2, E0, E1, E2, E3, E4, E5)
                v0 = V0[i]
                v1 = V1[i]
                v2 = V2[i]
                w00 = W00[i]
                w01 = W01[i]
                w02 = W02[i]
                w10 = W10[i]
                w11 = W11[i]
                w12 = W12[i]
                lS0 = lam * Sy0
                lS1 = lam * Sy1
                Q00 = lam * X00 - D00
                Q01 = lam * X01 - D01
                Q10 = lam * X10 - D10
                Q11 = lam * X11 - D11
                a0_ += S0 * v0 + lS0 * w00 + lS1 * w10
                a1_ += S0 * v1 + lS0 * w01 + lS1 * w11
                a2_ += S0 * v2 + lS0 * w02 + lS1 * w12
                a3_ += Sx0 * v0 + Q00 * w00 + Q01 * w10
                a4_ += Sx0 * v1 + Q00 * w01 + Q01 * w11
                a5_ += Sx0 * v2 + Q00 * w02 + Q01 * w12
                a6_ += Sx1 * v0 + Q10 * w00 + Q11 * w10
                a7_ += Sx1 * v1 + Q10 * w01 + Q11 * w11
                a8_ += Sx1 * v2 + Q10 * w02 + Q11 * w12
                q00 = (X0 - y0) * (X0 - y0)
                q01 = (X0 - y1) * (X0 - y1)
                q02 = (X0 - y2) * (X0 - y2)
                q10 = (X1 - y0) * (X1 - y0)
                q11 = (X1 - y1) * (X1 - y1)
                q12 = (X1 - y2) * (X1 - y2)
                q20 = (X2 - y0) * (X2 - y0)
                q21 = (X2 - y1) * (X2 - y1)
                q22 = dd * dd
                # d/dlam: the same sums over E'_p = -D_p/2 E_p, plus the explicit lam terms
                (T0, Tx0, Tx1, Ty0, Ty1, Z00, Z01, Z10, Z11, F00, F01, F10, F11) = _tb_sums(
                    X0, X1, X2, y0, y1, y2,
                    -0.5 * (q00 + q11 + q22) * E0, -0.5 * (q01 + q10 + q22) * E1,
                    -0.5 * (q02 + q10 + q21) * E2, -0.5 * (q00 + q12 + q21) * E3,
                    -0.5 * (q02 + q11 + q20) * E4, -0.5 * (q01 + q12 + q20) * E5)
                m0 = lam * Ty0 + Sy0
                m1 = lam * Ty1 + Sy1
                U00 = lam * Z00 - F00 + X00
                U01 = lam * Z01 - F01 + X01
                U10 = lam * Z10 - F10 + X10
                U11 = lam * Z11 - F11 + X11
                g0 += T0 * v0 + m0 * w00 + m1 * w10
                g1 += T0 * v1 + m0 * w01 + m1 * w11
                g2 += T0 * v2 + m0 * w02 + m1 * w12
                g3 += Tx0 * v0 + U00 * w00 + U01 * w10
                g4 += Tx0 * v1 + U00 * w01 + U01 * w11
                g5 += Tx0 * v2 + U00 * w02 + U01 * w12
                g6 += Tx1 * v0 + U10 * w00 + U11 * w10
                g7 += Tx1 * v1 + U10 * w01 + U11 * w11
                g8 += Tx1 * v2 + U10 * w02 + U11 * w12
        else:
            for i in range(n):
                y0 = Y0[i]
                y1 = Y1[i]
                y2 = Y2[i]
                dd = X2 - y2
                e22 = exp_neg(hl * dd * dd)
                e00 = R00[i]
                e01 = R01[i]
                e10 = R10[i]
                e11 = R11[i]
                e02 = B0r[i]
                e12 = B1r[i]
                e20 = Cr[J0[i]]
                e21 = Cr[J1[i]]
                E0 = e00 * e11 * e22
                E1 = e01 * e10 * e22
                E2 = e02 * e10 * e21
                E3 = e00 * e12 * e21
                E4 = e02 * e11 * e20
                E5 = e01 * e12 * e20
                if not mono:
                    E0 *= 1.0 if PC0[i] == c1 else 0.0
                    E1 *= 1.0 if PC1[i] == c1 else 0.0
                    E2 *= 1.0 if PC2[i] == c1 else 0.0
                    E3 *= 1.0 if PC3[i] == c1 else 0.0
                    E4 *= 1.0 if PC4[i] == c1 else 0.0
                    E5 *= 1.0 if PC5[i] == c1 else 0.0
                S0, Sx0, Sx1, Sy0, Sy1, X00, X01, X10, X11, D00, D01, D10, D11 = _tb_sums(
                    X0, X1, X2, y0, y1, y2, E0, E1, E2, E3, E4, E5)
                v0 = V0[i]
                v1 = V1[i]
                v2 = V2[i]
                w00 = W00[i]
                w01 = W01[i]
                w02 = W02[i]
                w10 = W10[i]
                w11 = W11[i]
                w12 = W12[i]
                lS0 = lam * Sy0
                lS1 = lam * Sy1
                Q00 = lam * X00 - D00
                Q01 = lam * X01 - D01
                Q10 = lam * X10 - D10
                Q11 = lam * X11 - D11
                a0_ += S0 * v0 + lS0 * w00 + lS1 * w10
                a1_ += S0 * v1 + lS0 * w01 + lS1 * w11
                a2_ += S0 * v2 + lS0 * w02 + lS1 * w12
                a3_ += Sx0 * v0 + Q00 * w00 + Q01 * w10
                a4_ += Sx0 * v1 + Q00 * w01 + Q01 * w11
                a5_ += Sx0 * v2 + Q00 * w02 + Q01 * w12
                a6_ += Sx1 * v0 + Q10 * w00 + Q11 * w10
                a7_ += Sx1 * v1 + Q10 * w01 + Q11 * w11
                a8_ += Sx1 * v2 + Q10 * w02 + Q11 * w12
        acc[0] = a0_
        acc[1] = a1_
        acc[2] = a2_
        acc[3] = a3_
        acc[4] = a4_
        acc[5] = a5_
        acc[6] = a6_
        acc[7] = a7_
        acc[8] = a8_
        F1 = aF[t1]
        dF10 = adF0[t1]
        dF11 = adF1[t1]
        lf = lam * F1
        for j in range(3):
            gf0 = dF10 * acc[j] - lf * acc[3 + j]
            gf1 = dF11 * acc[j] - lf * acc[6 + j]
            for d in range(3):
                blk[d, j] += au[d, t1] * gf0 + au[3 + d, t1] * gf1
        if grad:
            dacc[0] = g0
            dacc[1] = g1
            dacc[2] = g2
            dacc[3] = g3
            dacc[4] = g4
            dacc[5] = g5
            dacc[6] = g6
            dacc[7] = g7
            dacc[8] = g8
            for j in range(3):
                dg0 = dF10 * dacc[j] - F1 * acc[3 + j] - lf * dacc[3 + j]
                dg1 = dF11 * dacc[j] - F1 * acc[6 + j] - lf * dacc[6 + j]
                for d in range(3):
                    dblk[d, j] += au[d, t1] * dg0 + au[3 + d, t1] * dg1


@njit(cache=True, fastmath=_FM)
def force_covariance(P, env_a, env_b, symmetric, ls2, ls3, use2, use3, grad, K2, K3, dK2, dK3):
    """Force-force covariance of the environments ``env_a`` (rows ``3 k + d``) and
    ``env_b`` (columns ``3 l + e``) of the fast pack ``P``, at unit signal variance; with
    ``grad`` also d/dls2 and d/dls3 into ``dK2``/``dK3``.  With ``symmetric`` (``env_a`` is
    ``env_b``) only blocks ``l >= k`` are computed and mirrored.  Writes (does not add)."""
    lam2 = 1.0 / (ls2 * ls2)
    lam3 = 1.0 / (ls3 * ls3)
    dlam2 = -2.0 / (ls2 * ls2 * ls2)
    dlam3 = -2.0 / (ls3 * ls3 * ls3)
    mu = 1
    mt = 1
    for e in range(P[_F_CSPEC].shape[0]):
        mu = max(mu, P[_F_UOFF][e + 1] - P[_F_UOFF][e])
        mt = max(mt, P[_F_TOFF][e + 1] - P[_F_TOFF][e])
    mono3 = P[_F_MONO][0] != -2
    mono2 = P[_F_BMONO][0] != -2
    TB = np.empty(mu * mu + 2 * mu * mt)
    AE0 = np.empty((mu, mt))
    AE1 = np.empty((mu, mt))
    blk2 = np.zeros((3, 3))
    blk3 = np.zeros((3, 3))
    dblk2 = np.zeros((3, 3))
    dblk3 = np.zeros((3, 3))
    for k in range(env_a.shape[0]):
        a = env_a[k]
        for l in range(k if symmetric else 0, env_b.shape[0]):
            b = env_b[l]
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            dblk2[:, :] = 0.0
            dblk3[:, :] = 0.0
            if use2:
                _pair2_ff(a, b, P, lam2, mono2, grad, blk2, dblk2)
            if use3:
                _pair3_ff(a, b, P, lam3, mono3, grad, blk3, dblk3, TB, AE0, AE1)
            for d in range(3):
                for e in range(3):
                    K2[3 * k + d, 3 * l + e] = blk2[d, e]
                    K3[3 * k + d, 3 * l + e] = blk3[d, e]
                    if grad:
                        dK2[3 * k + d, 3 * l + e] = dblk2[d, e] * dlam2
                        dK3[3 * k + d, 3 * l + e] = dblk3[d, e] * dlam3
                    if symmetric and l != k:
                        K2[3 * l + e, 3 * k + d] = blk2[d, e]
                        K3[3 * l + e, 3 * k + d] = blk3[d, e]
                        if grad:
                            dK2[3 * l + e, 3 * k + d] = dblk2[d, e] * dlam2
                            dK3[3 * l + e, 3 * k + d] = dblk3[d, e] * dlam3


def force_kernel_blocks(batch, n_species, env_a, env_b=None, ls2=1.0, ls3=1.0, grad=False, use2=True, use3=True):
    """Python front end of :func:`force_covariance`: the covariance of the force components
    of environments ``env_a`` of ``batch`` with those of ``env_b`` (default: ``env_a``, a
    symmetric matrix).  Returns ``(K2, K3)`` or ``(K2, K3, dK2_dls2, dK3_dls3)``, shape
    (3 len(env_a), 3 len(env_b)), unit signal variance; equal to the force rows of
    :func:`kernel_blocks` to round-off."""
    env_a = np.ascontiguousarray(env_a, dtype=np.int64)
    symmetric = env_b is None
    env_b = env_a if symmetric else np.ascontiguousarray(env_b, dtype=np.int64)
    na, nb = 3 * len(env_a), 3 * len(env_b)
    K2 = np.zeros((na, nb))
    K3 = np.zeros((na, nb))
    dK2 = np.zeros((na, nb) if grad else (1, 1))
    dK3 = np.zeros((na, nb) if grad else (1, 1))
    if na and nb:
        force_covariance(pack_fast(batch, n_species), env_a, env_b, symmetric, float(ls2), float(ls3),
                         bool(use2), bool(use3), bool(grad), K2, K3, dK2, dK3)
    return (K2, K3, dK2, dK3) if grad else (K2, K3)

_EXECUTORS: dict = {}
# a forked child inherits the pools but not their threads: start new ones there
os.register_at_fork(after_in_child=_EXECUTORS.clear)


def _executor(threads):
    ex = _EXECUTORS.get(threads)
    if ex is None:
        from concurrent.futures import ThreadPoolExecutor

        ex = _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="epicycle-predict")
    return ex


@njit(cache=True)
def forward_substitution(L, B):
    """``L^-1 B`` for lower-triangular ``L`` (n, n) and ``B`` (n, r), row by row (the
    same operations as LAPACK's ``dtrsm``, in another order), and the column sums of
    its squares.  Single-threaded: for the small systems of one prediction this avoids
    the BLAS thread pool's wake-up cost, which is far larger than the arithmetic."""
    n, r = B.shape
    X = np.empty((n, r))
    sq = np.zeros(r)
    for i in range(n):
        xi = X[i]
        for j in range(r):
            xi[j] = B[i, j]
        for k in range(i):
            lik = L[i, k]
            if lik != 0.0:
                xk = X[k]
                for j in range(r):
                    xi[j] -= lik * xk[j]
        d = L[i, i]
        for j in range(r):
            xi[j] /= d
            sq[j] += xi[j] * xi[j]
    return X, sq
