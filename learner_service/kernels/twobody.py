"""2-body kernel blocks (seed 004, Eq. 4 with n = 2): one pair of environments at a time.

For a bond of length r1 (Å) around the centre of environment a and a bond r2 around the
centre of b, with cutoff weights f1, f2 (Å^2) and ``lam = 1/ls2^2`` (Å^-2), the pair
kernel at unit signal variance is ``k = f1 f2 exp(-lam (r1 - r2)^2 / 2)`` (masked to 0
unless the species pairs match, Eq. 2).  Every functional covariance follows from four
scalars per bond pair: ``k``, ``dk/dr1``, ``dk/dr2`` and ``d2k/dr1 dr2``; the centre moves
bond r along its unit vector u, so a force-force block is ``sum d2k/dr1dr2 u1 (x) u2`` and
a stress row uses the weights ``psi = -r/2 u (x) u`` instead of u (Eq. 3).  The local energy
weight of a pair is :data:`~.common.W2` = 1/2.

Two implementations of the same numbers:

* reference -- :func:`twobody_block`: the full 10x10 block (E, F, S) x (E, F, S) with its
  ``lam`` derivative, from the four scalars stored per bond of b in a scratch buffer
  (:func:`_twobody_scalars`).  Used by :func:`~.assemble.assemble` for any label kind;
  checked against a NumPy transcription of FLARE's kernels and finite differences in
  ``tests/learner``.
* optimised -- :func:`pair2_opt`, on the padded fast pack: the four scalars are never
  stored; per bond m of a the sums over the bonds of b are contracted on the fly into a few
  accumulators (``B0``, ``Bd``, ``A1_j``, ``A2_j`` with ``V = df u``, ``W = f u`` of b), one
  pass, vectorised.  It forms only what its two callers need: the (E, F, S) x (E, F) block
  of prediction (:func:`~.covariance.prediction_covariance`) and the force-force block
  with its ``lam`` derivative of training (:func:`~.covariance.force_covariance`).  It
  agrees with :func:`twobody_block` to round-off (1e-12 relative, tests/learner).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import _FM, W2, _dot, _rsum, exp_neg
from .packing import _F_BCODE, _F_BDF, _F_BF, _F_BN, _F_BOFF, _F_BPSI, _F_BR, _F_BU, _F_BV, _F_BW

# ===========================================================================
# reference implementation
# ===========================================================================

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


# ===========================================================================
# optimised implementation (fast pack, accumulators instead of scratch rows)
# ===========================================================================


@njit(cache=True, inline="always", fastmath=_FM)
def pair2_opt(a, b, PA, PB, lam, mono, ea, fa, sa, eb, grad, blk, dblk):
    """2-body block of environment ``a`` of the fast pack ``PA`` (rows: E, F(3), S(6)) with
    environment ``b`` of ``PB`` (columns: E if ``eb``, F(3)) added into ``blk`` (10, 4), at
    unit signal variance; with ``grad`` also d/dlam of the entries into ``dblk`` (10, 4) (the
    force-force entries ``blk[1:4, 1:4]`` for force training; every row and column asked for
    when ``ea``, ``sa`` or ``eb``, for the sparse GP).  ``ea, fa, sa`` say which rows of a are needed.

    ``mono``: all bonds of both environments have the same species pair (no mask needed).
    Prediction calls it with ``eb=True, grad=False``, force training with
    ``ea=sa=eb=False, fa=True``: passed as literals, numba inlines the function into each
    driver and LLVM drops the branches that cannot be taken.

    Per bond m of a (length r1, weight f1), the sums over the bonds of b (r2, f2,
    ``V = df2 u2``, ``W = f2 u2``) with ``ex = exp(-lam (r1 - r2)^2 / 2)``, ``dl = r1 - r2``:
    ``B0 = sum f2 ex``, ``Bd = sum f2 ex dl`` (energy column of b only),
    ``A1_j = sum ex V_j + lam ex dl W_j``, ``A2_j = sum ex dl V_j + (lam ex dl^2 - ex) W_j``;
    then ``dk/dr1`` contracted with b's side is ``df1 A1 - lam f1 A2``.  d/dlam: every term
    is linear in ex and ``dex/dlam = -dl^2/2 ex``, so the derivative of an accumulator is
    the same accumulator over ``ex' = -dl^2/2 ex`` plus its explicit lam terms.
    """
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
        dA10 = 0.0
        dA11 = 0.0
        dA12 = 0.0
        dA20 = 0.0
        dA21 = 0.0
        dA22 = 0.0
        dB0 = 0.0
        dBd = 0.0
        if grad:  # two loops, as in the 3-body kernel (padded entries contribute exactly zero)
            for i in range(n):
                dl = r1 - RB[i]
                ex = exp_neg(hl * dl * dl)
                if not mono:
                    ex *= 1.0 if CB[i] == c1 else 0.0
                ed = ex * dl
                if eb:
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
                exd = -0.5 * dl * dl * ex
                edd = exd * dl
                if eb:
                    dB0 += f2 * exd
                    dBd += f2 * edd
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
                if eb:
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
        lf = lam * f1
        if ea:
            if eb:
                blk[0, 0] += W2 * W2 * f1 * B0
            blk[0, 1] += W2 * f1 * A10
            blk[0, 2] += W2 * f1 * A11
            blk[0, 3] += W2 * f1 * A12
        if fa or sa:
            g1 = df1 * B0 - lf * Bd
            gf0 = df1 * A10 - lf * A20
            gf1 = df1 * A11 - lf * A21
            gf2 = df1 * A12 - lf * A22
            if fa:
                for d in range(3):
                    u = au[d, m]
                    if eb:
                        blk[1 + d, 0] += W2 * g1 * u
                    blk[1 + d, 1] += u * gf0
                    blk[1 + d, 2] += u * gf1
                    blk[1 + d, 3] += u * gf2
            if sa:
                for d in range(6):
                    p = apsi[d, m]
                    if eb:
                        blk[4 + d, 0] += W2 * g1 * p
                    blk[4 + d, 1] += p * gf0
                    blk[4 + d, 2] += p * gf1
                    blk[4 + d, 3] += p * gf2
        if grad and fa:
            dg0 = df1 * dA10 - f1 * A20 - lf * dA20
            dg1 = df1 * dA11 - f1 * A21 - lf * dA21
            dg2 = df1 * dA12 - f1 * A22 - lf * dA22
            for d in range(3):
                u = au[d, m]
                dblk[1 + d, 1] += u * dg0
                dblk[1 + d, 2] += u * dg1
                dblk[1 + d, 3] += u * dg2
        if grad and (ea or sa or eb):  # the rest of the block (sparse GP likelihood gradient)
            if ea:
                if eb:
                    dblk[0, 0] += W2 * W2 * f1 * dB0
                dblk[0, 1] += W2 * f1 * dA10
                dblk[0, 2] += W2 * f1 * dA11
                dblk[0, 3] += W2 * f1 * dA12
            dgE = df1 * dB0 - f1 * Bd - lf * dBd
            if fa and eb:
                for d in range(3):
                    dblk[1 + d, 0] += W2 * dgE * au[d, m]
            if sa:
                sg0 = df1 * dA10 - f1 * A20 - lf * dA20
                sg1 = df1 * dA11 - f1 * A21 - lf * dA21
                sg2 = df1 * dA12 - f1 * A22 - lf * dA22
                for d in range(6):
                    p = apsi[d, m]
                    if eb:
                        dblk[4 + d, 0] += W2 * dgE * p
                    dblk[4 + d, 1] += p * sg0
                    dblk[4 + d, 2] += p * sg1
                    dblk[4 + d, 3] += p * sg2
