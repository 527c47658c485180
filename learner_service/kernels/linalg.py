"""Linear algebra for prediction: the triangular solve of Eq. 5's variance term.

``sigma^2 = k_FF(x, x) - k^T (K + sigma_n^2 I)^-1 k = k_FF(x, x) - |L^-1 k|^2`` with ``L``
the Cholesky factor of the training covariance (eV^2, eV^2/Å^2 ... by label kind):
:func:`forward_substitution` returns ``L^-1 B`` and the column sums of its squares.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
