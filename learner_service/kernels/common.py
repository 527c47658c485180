"""Conventions and numba building blocks shared by every kernel module (seed 004, Eqs. 2–4).

The conventions are those of FLARE 0.2.4 ``flare/kernels/mc_simple.py`` (the
``two_plus_three_body_mc`` family):

* hyperparameters ``(sig2, ls2, sig3, ls3)``: signal standard deviations in eV and length
  scales in Å of the 2- and 3-body terms.  The kernel of two clusters is
  ``sig^2 exp(-|d1 - P d2|^2 / (2 ls^2)) fcut(d1) fcut(d2)`` (Eq. 4) with ``fcut`` the
  product of ``(r_c - r)^2`` over the cluster's bonds (Å^2 per bond), summed over every
  permutation ``P`` of the second cluster that matches chemical species (Eq. 2).  For
  pairs one term counts when ``(c1, e1)`` matches ``(c2, e2)`` in either order.
* force components are derivatives with respect to the *central* atom (Eq. 3), so the
  force–force kernel is the mixed second derivative of the cluster kernel; the 3-body cross
  bond ``r_jk`` does not move with the centre.
* the local energy is ``E_i = 1/2 sum_pairs eps2 + 1/3 sum_triplets eps3`` (FLARE's
  ``/2, /4`` and ``/3, /9`` factors: the weights :data:`W2`, :data:`W3`), so
  ``F_i = -dE_total/dr_i`` exactly.
* the partial stress of atom i is ``S_i = -1/2 sum_clusters sum_{central bonds b} f_b (x) r_b``
  with ``f_b`` the force on the centre from bond ``b``; the stress of a structure is
  ``-sum_i S_i / V`` (ASE sign, eV/Å^3), kept in ASE Voigt order (xx, yy, zz, yz, xz, xy).

Every kernel is evaluated at unit signal variance (``sig = 1``): callers scale by ``sig^2``
(eV^2), and the ``sig`` derivative is ``2 K / sig``.  Inside the kernels the length scale
enters as ``lam = 1/ls^2`` (Å^-2); d/dls = d/dlam * (-2 / ls^3).

Module map (each body order has a readable reference path and an optimised path):

* :mod:`.common` (this module) -- the functional layout, the energy weights, a vectorisable
  ``exp`` and the fastmath rule below.
* :mod:`.packing` -- an :class:`~learner_service.environment.EnvironmentBatch` as the
  arrays the kernels read (:func:`~.packing.pack` for the reference path,
  :func:`~.packing.pack_fast` for the optimised one) and :class:`~.packing.LabelGroups`.
* :mod:`.twobody`, :mod:`.threebody` -- the per-environment-pair blocks.
* :mod:`.assemble` -- the reference driver: any label (energy, force, stress) against any
  label, with length-scale derivatives (:func:`~.assemble.kernel_blocks`).
* :mod:`.covariance` -- the optimised drivers: prediction (:func:`~.covariance.prediction_blocks`)
  and force-label training covariances (:func:`~.covariance.force_kernel_blocks`).
* :mod:`.linalg` -- the triangular solve used by prediction.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic

# functional layout of a 10x10 block: E, F (3), S (6, Voigt)
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
# depending on what it sees around the code, so every fastmath function of this package is
# either an entry point called from Python or inline="always" (inlined by numba into one entry point);
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



@njit(cache=True, inline="always")
def row_kinds(rows, g):
    """Which functionals label group ``g`` has (``rows[g]``: 10 output rows, -1 unused):
    ``(energy, any force component, any stress component)``."""
    e = rows[g, 0] >= 0
    f = (rows[g, 1] >= 0) or (rows[g, 2] >= 0) or (rows[g, 3] >= 0)
    s = False
    for t in range(4, 10):
        if rows[g, t] >= 0:
            s = True
    return e, f, s
