"""3-body kernel blocks (seed 004, Eq. 4 with n = 3): one pair of environments at a time.

A triplet of environment a is the distance vector ``x = (r_ij, r_ik, r_jk)`` (Å) of its
centre i and two neighbours, with the cutoff weight ``F = fcut(r_ij) fcut(r_ik) fcut(r_jk)``;
likewise ``y`` for b.  The triplet kernel at unit signal variance is
``k = F1 F2 sum_P delta_P exp(-lam |x - P y|^2 / 2)`` over the six permutations ``P`` of
the second triplet whose species match (Eq. 2), ``lam = 1/ls3^2`` (Å^-2).  Only the two
central bonds move with the centre, so every functional covariance follows from the value,
the derivatives by the two central bonds of either triplet and the 2x2 mixed Hessian
``H_kl``, contracted with the central unit vectors (forces) or stress weights (Eq. 3).  The
local energy weight of a triplet is :data:`~.common.W3` = 1/3.

Two implementations of the same numbers:

* reference -- :func:`threebody_block`: the full 10x10 block (E, F, S) x (E, F, S) and its
  ``lam`` derivative; per triplet of a, the nine scalars (18 with ``grad``) against every
  triplet of b are summed over the permutations one by one (:func:`_perm`) into a scratch
  buffer, then contracted.  Used by :func:`~.assemble.assemble` for any label kind.
* optimised -- on the padded fast pack, restructured for speed:

  - ``exp(-lam |x - P y|^2 / 2) = prod_k exp(-lam (x_k - y_Pk)^2 / 2)``, so the six
    permutation exponentials are products of the nine factors ``e_ab``.  Eight of them pair
    a central bond with some bond and come from per-environment-pair tables over the
    *distinct* central bond lengths (shared by many triplets); only the cross/cross factor
    ``e_22`` is computed per triplet pair: one exp per triplet pair instead of six.
  - the permutation sums are reorganised into 13 sums ``S0, Sx_k, Sy_l, Sxy_kl, Sd_kl``
    (:func:`_tb_sums`) from which value, gradients and Hessian follow, contracted on the
    fly with ``V = sum_l dF2_l u_l`` and ``W_l = F2 u_l`` of b.
  - :func:`pair3_opt` forms only what its two callers need: the (E, F, S) x (E, F) block of
    prediction (:func:`~.covariance.prediction_covariance`) and the force-force block with
    its ``lam`` derivative of training (:func:`~.covariance.force_covariance`): every term
    is linear in the ``E_p`` and ``dE_p/dlam = -D_p/2 E_p`` (``D_p`` the squared distance of
    permutation p), so d/dlam of an accumulator is the same accumulator over
    ``E'_p = -D_p/2 E_p`` plus its explicit lam terms.

  It agrees with :func:`threebody_block` to round-off (1e-12 relative, tests/learner).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import _FM, W3, _dot, _rsum, exp_neg
from .packing import (_F_CODE, _F_I0, _F_I1, _F_PCODE, _F_TDF0, _F_TDF1, _F_TF, _F_TN, _F_TOFF, _F_TPSI, _F_TU,
                      _F_TV, _F_TW, _F_UOFF, _F_UVAL, _F_X0, _F_X1, _F_X2)

# ===========================================================================
# reference implementation
# ===========================================================================

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


# ===========================================================================
# optimised implementation (fast pack, exponential tables, permutation sums)
# ===========================================================================


@njit(cache=True, inline="always", fastmath=_FM)
def _tb_sums(X0, X1, X2, y0, y1, y2, E0, E1, E2, E3, E4, E5):
    """The permutation sums of one triplet pair (outer x, inner y).

    Permutations (bond k of x paired with bond pi(k) of y): pi0 = (0,1,2), pi1 = (1,0,2),
    pi2 = (2,0,1), pi3 = (0,2,1), pi4 = (2,1,0), pi5 = (1,2,0); E_p their (masked)
    exponentials (E0 = e00 e11 e22, E1 = e01 e10 e22, E2 = e02 e10 e21, E3 = e00 e12 e21,
    E4 = e02 e11 e20, E5 = e01 e12 e20 with e_ab = exp(-lam (x_a - y_b)^2 / 2)),
    d_ab = x_a - y_b.  Returns S0 = sum E, Sx_k = sum E d_{k,pi k}, Sy_l = sum E d_{pi^-1 l, l},
    Sxy_kl = sum E d_{k,pi k} d_{pi^-1 l,l} and Sd_kl = sum E [pi k = l], from which
    k = F1 F2 S0, dk/dx_k = F2 (dF1_k S0 - lam F1 Sx_k), dk/dy_l = F1 (dF2_l S0 + lam F2 Sy_l),
    H_kl = dF1_k dF2_l S0 + lam dF1_k F2 Sy_l - lam F1 dF2_l Sx_k - lam^2 F1 F2 Sxy_kl + lam F1 F2 Sd_kl.
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
    X00 = d00 * d00 * P03 + d10 * (d01 * E1 + d02 * E2) + d20 * (d02 * E4 + d01 * E5)
    X01 = d00 * (d11 * E0 + d21 * E3) + d01 * d01 * P15 + d02 * (d21 * E2 + d11 * E4)
    X10 = d11 * (d00 * E0 + d20 * E4) + d10 * d10 * P12 + d12 * (d00 * E3 + d20 * E5)
    X11 = d11 * d11 * P04 + d10 * (d01 * E1 + d21 * E2) + d12 * (d21 * E3 + d01 * E5)
    return S0, Sx0, Sx1, Sy0, Sy1, X00, X01, X10, X11, P03, P15, P12, P04


@njit(cache=True, inline="always", fastmath=_FM)
def pair3_opt(a, b, PA, PB, lam, mono, ea, fa, sa, eb, grad, blk, dblk, TB, AE0, AE1):
    """3-body block of environment ``a`` of the fast pack ``PA`` (rows: E, F(3), S(6)) with
    environment ``b`` of ``PB`` (columns: E if ``eb``, F(3)) added into ``blk`` (10, 4), at
    unit signal variance; with ``grad`` also d/dlam of the entries into ``dblk`` (10, 4) (the
    force-force entries ``blk[1:4, 1:4]`` for force training; every row and column asked for
    when ``ea``, ``sa`` or ``eb``, for the sparse GP).  ``ea, fa, sa`` say which rows of a are needed.

    ``mono``: every triplet of both environments has one species code (every permutation
    counts, no masks).  ``TB`` (flat), ``AE0``, ``AE1`` (2D) are scratch for the exponential
    tables (module docstring).  Prediction calls it with ``eb=True, grad=False``, force
    training with ``ea=sa=eb=False, fa=True``: passed as literals, numba inlines the
    function into each driver and LLVM drops the branches that cannot be taken.

    Per outer triplet t1 of a, the inner sums over the triplets of b are contracted into
    ``B0 = sum F2 S0``, ``Bx_k = sum F2 Sx_k`` (only for the energy column of b),
    ``A1_j = sum S0 V_j + lam sum_l Sy_l W_lj`` and
    ``A2_kj = sum Sx_k V_j + sum_l (lam Sxy_kl - Sd_kl) W_lj`` (``V_j = sum_l dF2_l u_lj``,
    ``W_lj = F2 u_lj`` of b), then contracted with the derivatives of F1 and the central
    unit vectors (or stress weights) of t1.  d/dlam: every term is linear in the E_p and
    ``dE_p/dlam = -D_p/2 E_p`` (``D_p`` the squared distance of permutation p), so the
    derivative of an accumulator is the same accumulator over ``E'_p = -D_p/2 E_p`` plus
    its explicit lam terms.
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
    PCODE = PB[_F_PCODE]
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
        c1 = acode[t1]
        # eB0 = B0, eB1 = Bx_0, eB2 = Bx_1; a0_..a2_ = A1_j; a(3 + 3k + j)_ = A2_kj; g*: d/dlam
        eB0 = 0.0
        eB1 = 0.0
        eB2 = 0.0
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
        deB0 = 0.0
        deB1 = 0.0
        deB2 = 0.0
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
                if eb:
                    F2 = FB[i]
                    eB0 += F2 * S0
                    eB1 += F2 * Sx0
                    eB2 += F2 * Sx1
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
                if eb:
                    deB0 += F2 * T0
                    deB1 += F2 * Tx0
                    deB2 += F2 * Tx1
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
                if eb:
                    F2 = FB[i]
                    eB0 += F2 * S0
                    eB1 += F2 * Sx0
                    eB2 += F2 * Sx1
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
        F1 = aF[t1]
        dF10 = adF0[t1]
        dF11 = adF1[t1]
        lf = lam * F1
        if ea:
            if eb:
                blk[0, 0] += W3 * W3 * F1 * eB0
            blk[0, 1] += W3 * F1 * a0_
            blk[0, 2] += W3 * F1 * a1_
            blk[0, 3] += W3 * F1 * a2_
        if fa or sa:
            g10 = dF10 * eB0 - lf * eB1
            g11 = dF11 * eB0 - lf * eB2
            gf00 = dF10 * a0_ - lf * a3_
            gf01 = dF10 * a1_ - lf * a4_
            gf02 = dF10 * a2_ - lf * a5_
            gf10 = dF11 * a0_ - lf * a6_
            gf11 = dF11 * a1_ - lf * a7_
            gf12 = dF11 * a2_ - lf * a8_
            if fa:
                for d in range(3):
                    u0 = au[d, t1]
                    u1 = au[3 + d, t1]
                    if eb:
                        blk[1 + d, 0] += W3 * (g10 * u0 + g11 * u1)
                    blk[1 + d, 1] += u0 * gf00 + u1 * gf10
                    blk[1 + d, 2] += u0 * gf01 + u1 * gf11
                    blk[1 + d, 3] += u0 * gf02 + u1 * gf12
            if sa:
                for d in range(6):
                    p0 = apsi[d, t1]
                    p1 = apsi[6 + d, t1]
                    if eb:
                        blk[4 + d, 0] += W3 * (g10 * p0 + g11 * p1)
                    blk[4 + d, 1] += p0 * gf00 + p1 * gf10
                    blk[4 + d, 2] += p0 * gf01 + p1 * gf11
                    blk[4 + d, 3] += p0 * gf02 + p1 * gf12
        if grad and fa:
            dg00 = dF10 * g0 - F1 * a3_ - lf * g3
            dg01 = dF10 * g1 - F1 * a4_ - lf * g4
            dg02 = dF10 * g2 - F1 * a5_ - lf * g5
            dg10 = dF11 * g0 - F1 * a6_ - lf * g6
            dg11 = dF11 * g1 - F1 * a7_ - lf * g7
            dg12 = dF11 * g2 - F1 * a8_ - lf * g8
            for d in range(3):
                u0 = au[d, t1]
                u1 = au[3 + d, t1]
                dblk[1 + d, 1] += u0 * dg00 + u1 * dg10
                dblk[1 + d, 2] += u0 * dg01 + u1 * dg11
                dblk[1 + d, 3] += u0 * dg02 + u1 * dg12
        if grad and (ea or sa or eb):  # the rest of the block (sparse GP likelihood gradient)
            if ea:
                if eb:
                    dblk[0, 0] += W3 * W3 * F1 * deB0
                dblk[0, 1] += W3 * F1 * g0
                dblk[0, 2] += W3 * F1 * g1
                dblk[0, 3] += W3 * F1 * g2
            dgE0 = dF10 * deB0 - F1 * eB1 - lf * deB1
            dgE1 = dF11 * deB0 - F1 * eB2 - lf * deB2
            if fa and eb:
                for d in range(3):
                    dblk[1 + d, 0] += W3 * (dgE0 * au[d, t1] + dgE1 * au[3 + d, t1])
            if sa:
                sg00 = dF10 * g0 - F1 * a3_ - lf * g3
                sg01 = dF10 * g1 - F1 * a4_ - lf * g4
                sg02 = dF10 * g2 - F1 * a5_ - lf * g5
                sg10 = dF11 * g0 - F1 * a6_ - lf * g6
                sg11 = dF11 * g1 - F1 * a7_ - lf * g7
                sg12 = dF11 * g2 - F1 * a8_ - lf * g8
                for d in range(6):
                    p0 = apsi[d, t1]
                    p1 = apsi[6 + d, t1]
                    if eb:
                        dblk[4 + d, 0] += W3 * (dgE0 * p0 + dgE1 * p1)
                    dblk[4 + d, 1] += p0 * sg00 + p1 * sg10
                    dblk[4 + d, 2] += p0 * sg01 + p1 * sg11
                    dblk[4 + d, 3] += p0 * sg02 + p1 * sg12
