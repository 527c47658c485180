"""Multi-element 2- and 3-body squared-exponential kernels (seed 004, Eqs. 2–4).

Conventions, units and the module map are in :mod:`.common`.  By body order,
:mod:`.twobody` and :mod:`.threebody` each hold a readable reference implementation (any
label against any label, driven by :mod:`.assemble`) and an optimised one (prediction and
force-label training, driven by :mod:`.covariance`); :mod:`.packing` lays environments out
for both; :mod:`.linalg` has the triangular solve of prediction.

Every name that lived in the former single-file ``kernels.py`` is re-exported here, so
``from learner_service.kernels import ...`` keeps working.
"""

from . import _numba_cache

_numba_cache.install()  # before any @njit(cache=True) below is decorated

from .assemble import assemble, kernel_blocks  # noqa: E402, F401
from .common import (_FM, _LN2_HI, _LN2_LO, _LOG2E, E_ROW, F_ROWS, N_FUNCTIONALS, S_ROWS, W2, W3,  # noqa: E402, F401
                     _bits_to_float, _dot, _rsum, exp_neg)
from .covariance import (_EXECUTORS, _executor, force_covariance, force_kernel_blocks,  # noqa: E402, F401
                         inducing_gradient_blocks, prediction_blocks,
                         prediction_covariance)
from .linalg import forward_substitution  # noqa: E402, F401
from .packing import (_F_BCODE, _F_BDF, _F_BF, _F_BMONO, _F_BN, _F_BOFF, _F_BPSI, _F_BR, _F_BSPEC,  # noqa: E402, F401
                      _F_BU, _F_BV, _F_BW, _F_CODE, _F_CSPEC, _F_I0, _F_I1, _F_MONO, _F_PCODE, _F_TDF0, _F_TDF1,
                      _F_TF, _F_TN, _F_TOFF, _F_TPSI, _F_TU, _F_TV, _F_TW, _F_UOFF, _F_UVAL, _F_X0, _F_X1, _F_X2,
                      _PAD, LabelGroups, _build_fast_pack, _central_distance_index, _padded_offsets, pack,
                      pack_fast)
from .threebody import (pair3_opt, _perm, _perm_grad, _tb_sums,  # noqa: E402, F401
                        _threebody_scalars, _threebody_scalars_grad, threebody_block)
from .twobody import (pair2_opt, _twobody_scalars, _twobody_scalars_grad,  # noqa: E402, F401
                      twobody_block)

__all__ = ["E_ROW", "F_ROWS", "S_ROWS", "N_FUNCTIONALS", "W2", "W3", "exp_neg", "LabelGroups", "pack", "pack_fast",
           "twobody_block", "threebody_block", "assemble", "kernel_blocks", "prediction_covariance",
           "prediction_blocks", "inducing_gradient_blocks", "force_covariance", "force_kernel_blocks", "forward_substitution"]
