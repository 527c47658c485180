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
_FM = True  # fastmath: lets LLVM vectorise the reductions below


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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True, fastmath=_FM)
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


@njit(cache=True)
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
