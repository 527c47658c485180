"""Reference driver: the covariance matrix between any two sets of labels (seed 004, Eqs. 2–4).

A label is a linear functional of the local energies: a total energy (eV) sums E over the
environments of a structure, a force component (eV/Å) is F of one environment, a stress
component (eV/Å^3) sums S over a structure with weight -1/V.  :func:`assemble` sums the
10x10 environment blocks of :func:`~.twobody.twobody_block` and
:func:`~.threebody.threebody_block` over the environments of each *label group*
(:class:`~.packing.LabelGroups`) and scatters them into the rows and columns of the
2- and 3-body matrices, at unit signal variance, with the derivatives by ``ls2``/``ls3`` (Å).

This is the path the GP uses whenever energies or stresses are labels, and the yardstick of
the optimised drivers in :mod:`.covariance`, which compute the force (and prediction) rows
of the same matrices in another order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import _FM, row_kinds
from .packing import pack
from .threebody import threebody_block
from .twobody import twobody_block


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
        ea, fa, sa = row_kinds(ga_rows, ga)
        start = ga if (symmetric or diagonal) else 0
        stop = ga + 1 if diagonal else n_gb
        for gb in range(start, stop):
            eb, fb, sb = row_kinds(gb_rows, gb)
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
