"""Optimised drivers: prediction covariances and force-label training covariances.

Both read the padded fast pack (:func:`~.packing.pack_fast`) and call the optimised
per-environment-pair kernels of :mod:`.twobody` and :mod:`.threebody`; both agree with the
reference driver :func:`~.assemble.kernel_blocks` to round-off (1e-12 relative,
tests/learner/test_predict_fast.py and test_force_kernels.py).

* :func:`prediction_blocks` -- per test environment, the covariance of its local energy (eV)
  and force (eV/Å) with every training label row, and its prior 3x3 force covariance
  ``k_FF(x, x)`` (eV^2/Å^2 at unit signal variance): everything one prediction (Eq. 5) needs,
  in one numba call that releases the GIL, optionally split over threads.
* :func:`force_kernel_blocks` -- the training covariance when every label is a force
  component (the common case), with the derivatives by ``ls2``/``ls3`` (Å) for the
  likelihood gradient (Eqs. 6–7).
"""

from __future__ import annotations

import os
import threading

import numpy as np
from numba import njit

from .common import _FM, row_kinds
from .packing import _F_BMONO, _F_CSPEC, _F_MONO, _F_TOFF, _F_UOFF, LabelGroups, pack_fast
from .threebody import pair3_opt
from .twobody import pair2_opt


@njit(cache=True, nogil=True)
def _pair_scratch(PA, PB, b_lo, b_hi):
    """For the optimised pair kernels between every environment of ``PA`` and environments
    ``b_lo <= b < b_hi`` of ``PB``: whether the pair is single-species for the 3-body and the
    2-body terms, and the 3-body scratch arrays sized for the largest environments."""
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
    mono = ca != -2 and cb != -2 and (ca == cb or ca == -1 or cb == -1)
    ba = PA[_F_BMONO][0]
    bb = PB[_F_BMONO][0]
    mono2 = ba != -2 and bb != -2 and (ba == bb or ba == -1 or bb == -1)
    return mono, mono2, np.empty(mu * mu + 2 * mu * mt), np.empty((mu, mt)), np.empty((mu, mt))


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
    mono_ab, mono2_ab, TB, AE0, AE1 = _pair_scratch(PA, PB, b_lo, b_hi)
    blk2 = np.zeros((10, 4))
    blk3 = np.zeros((10, 4))
    for b in range(b_lo, b_hi):
        # groups of the training set, then (g == n_g) b with itself for the prior variance
        for g in range(n_g + 1):
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            if g < n_g:
                PX = PA
                ea, fa, sa = row_kinds(g_rows, g)
                mono = mono_ab
                mono2 = mono2_ab
                i_lo = g_ptr[g]
                i_hi = g_ptr[g + 1]
            else:
                PX = PB
                ea = False
                fa = True
                sa = False
                mono = PB[_F_MONO][0] != -2
                mono2 = PB[_F_BMONO][0] != -2
                i_lo = 0
                i_hi = 1
            for ia in range(i_lo, i_hi):
                a = g_env[ia] if g < n_g else b
                if use2:
                    pair2_opt(a, b, PX, PB, lam2, mono2, ea, fa, sa, True, False, blk2, blk2)
                if use3:
                    pair3_opt(a, b, PX, PB, lam3, mono, ea, fa, sa, True, False, blk3, blk3, TB, AE0, AE1)
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
    _over_ranges(prediction_covariance, args, (K2, K3, P2, P3), m, threads)
    return K2, K3, P2, P3


def _over_ranges(kernel, args, out, m: int, threads) -> None:
    """``kernel(*args, lo, hi, *out)`` over the environments ``0 <= b < m``: at once, or with
    ``threads`` > 1 in ranges handed out on demand (the kernels release the GIL, and each range
    writes its own columns of ``out``); the calling thread works too, so a descheduled worker
    delays only its own range."""
    threads = max(1, min(int(threads or 1), m))
    if threads == 1:
        kernel(*args, 0, m, *out)
        return
    size = max(2, -(-m // (4 * threads)))
    chunks = iter([(lo, min(lo + size, m)) for lo in range(0, m, size)])
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                c = next(chunks, None)
            if c is None:
                return
            kernel(*args, c[0], c[1], *out)

    futures = [_executor(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for f in futures:
        f.result()


@njit(cache=True, nogil=True, fastmath=_FM)
def inducing_covariance_grad(PA, PB, g_ptr, g_env, g_rows, g_scale, ls2, ls3, use2, use3, b_lo, b_hi,
                             K2, K3, dK2, dK3):
    """Covariance of the label groups of ``PA`` (any mix of E, F, S rows, as
    :func:`prediction_covariance`) with (E, Fx, Fy, Fz) of the environments ``b_lo <= b < b_hi``
    of ``PB``, and its derivatives by ``ls2``/``ls3`` (Å): adds into ``K2``/``K3`` and
    ``dK2``/``dK3`` (n_rows, m, 4), unit signal variance.  The sparse GP's likelihood gradient
    (K_fU and K_UU with their length-scale derivatives).  Releases the GIL."""
    lam2 = 1.0 / (ls2 * ls2)
    lam3 = 1.0 / (ls3 * ls3)
    dlam2 = -2.0 / (ls2 * ls2 * ls2)
    dlam3 = -2.0 / (ls3 * ls3 * ls3)
    n_g = g_ptr.shape[0] - 1
    mono, mono2, TB, AE0, AE1 = _pair_scratch(PA, PB, b_lo, b_hi)
    blk2 = np.zeros((10, 4))
    blk3 = np.zeros((10, 4))
    dblk2 = np.zeros((10, 4))
    dblk3 = np.zeros((10, 4))
    for b in range(b_lo, b_hi):
        for g in range(n_g):
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            dblk2[:, :] = 0.0
            dblk3[:, :] = 0.0
            ea, fa, sa = row_kinds(g_rows, g)
            for ia in range(g_ptr[g], g_ptr[g + 1]):
                a = g_env[ia]
                if use2:
                    pair2_opt(a, b, PA, PB, lam2, mono2, ea, fa, sa, True, True, blk2, dblk2)
                if use3:
                    pair3_opt(a, b, PA, PB, lam3, mono, ea, fa, sa, True, True, blk3, dblk3, TB, AE0, AE1)
            for i in range(10):
                r = g_rows[g, i]
                if r < 0:
                    continue
                w = g_scale[g, i]
                for j in range(4):
                    K2[r, b, j] += w * blk2[i, j]
                    K3[r, b, j] += w * blk3[i, j]
                    dK2[r, b, j] += w * dblk2[i, j] * dlam2
                    dK3[r, b, j] += w * dblk3[i, j] * dlam3


def inducing_gradient_blocks(batch, groups, test_batch, n_species, ls2=1.0, ls3=1.0, use2=True, use3=True,
                             threads=1):
    """Python front end of :func:`inducing_covariance_grad` (``threads`` > 1 splits the
    environments of ``test_batch`` over that many threads).  Returns ``(K2, K3, dK2_dls2,
    dK3_dls3)``, each (groups.n_rows, len(test_batch), 4); ``K*`` equal to those of
    :func:`prediction_blocks`, all equal to the corresponding entries of
    :func:`~.assemble.kernel_blocks` (``grad=True``) to round-off."""
    m = len(test_batch)
    out = [np.zeros((groups.n_rows, m, 4)) for _ in range(4)]
    if m == 0 or not len(batch) or not groups.n_rows:
        return tuple(out)
    PB = pack_fast(test_batch, n_species)
    PA = pack_fast(batch, n_species)
    args = (PA, PB, groups.ptr, groups.env, groups.rows, groups.scale, float(ls2), float(ls3), bool(use2),
            bool(use3))
    _over_ranges(inducing_covariance_grad, args, out, m, threads)
    return tuple(out)


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
    mono3, mono2, TB, AE0, AE1 = _pair_scratch(P, P, 0, 0)  # sized over every environment of P
    # (10, 4) blocks of the optimised kernels; only the force-force part [1:4, 1:4] is formed
    blk2 = np.zeros((10, 4))
    blk3 = np.zeros((10, 4))
    dblk2 = np.zeros((10, 4))
    dblk3 = np.zeros((10, 4))
    for k in range(env_a.shape[0]):
        a = env_a[k]
        for l in range(k if symmetric else 0, env_b.shape[0]):
            b = env_b[l]
            blk2[:, :] = 0.0
            blk3[:, :] = 0.0
            dblk2[:, :] = 0.0
            dblk3[:, :] = 0.0
            if use2:
                pair2_opt(a, b, P, P, lam2, mono2, False, True, False, False, grad, blk2, dblk2)
            if use3:
                pair3_opt(a, b, P, P, lam3, mono3, False, True, False, False, grad, blk3, dblk3, TB, AE0, AE1)
            for d in range(3):
                for e in range(3):
                    K2[3 * k + d, 3 * l + e] = blk2[1 + d, 1 + e]
                    K3[3 * k + d, 3 * l + e] = blk3[1 + d, 1 + e]
                    if grad:
                        dK2[3 * k + d, 3 * l + e] = dblk2[1 + d, 1 + e] * dlam2
                        dK3[3 * k + d, 3 * l + e] = dblk3[1 + d, 1 + e] * dlam3
                    if symmetric and l != k:
                        K2[3 * l + e, 3 * k + d] = blk2[1 + d, 1 + e]
                        K3[3 * l + e, 3 * k + d] = blk3[1 + d, 1 + e]
                        if grad:
                            dK2[3 * l + e, 3 * k + d] = dblk2[1 + d, 1 + e] * dlam2
                            dK3[3 * l + e, 3 * k + d] = dblk3[1 + d, 1 + e] * dlam3


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

