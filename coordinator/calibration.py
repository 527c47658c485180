"""Calibration of the model's σ at the oracle calls of a run (issue 13, item 3, online).

Every oracle call is a calibration point for free: the run directory keeps the *old* model's
predicted forces and per-component epistemic σ at the labelled frame (no atom of that frame was
trained on when they were predicted), and the oracle's forces arrive with the label.  Per force
component i: residual r_i = F_model − F_oracle, epistemic variance e_i = σ_ep,i², noise ν = σn² of
the predicting model.

**What is scaled.**  σn is fitted to the labels (a noise level); the epistemic part is what the issue
measured as too small (2–5× below the error on held-out EMT sets).  So the calibrated model is

    r_i ~ N(0, s²·e_i + ν),     σ_cal,i = s·σ_ep,i,

and the threshold compares s·σ_ep with its value (equivalently σ_ep with threshold/s).  A uniform
scale of the *total* σ would cancel against a threshold relative to σn.

**Estimate.**  s² is the maximum a posteriori of that likelihood under an inverse-gamma prior
IG(α, β = α + 1) on s² (mode 1: the model's own σ), maximised in log s² (a 1-D bounded search).
Without noise (ν = 0) it is (Σ r²/e + n₀)/(n + n₀), n₀ = 2(α + 1): the prior counts as n₀ residuals
with z² = 1 (default α = 5: n₀ = 12), so a few calls cannot swing it.

**Bias, stated.**  The points are the frames the model stopped on — where it was most uncertain —
not a random sample of the trajectory; calibration there is what decides oracle calls, which is why
these points are the ones used.  Components of one atom and atoms of one frame are correlated, so
n overstates the information (the prior damps it).
"""

from __future__ import annotations

import math

import numpy as np

# the one estimator of s, shared with the offline calibration on held-out frames (heldout_calibration)
from learner_service.calibration import DEFAULT_PRIOR_ALPHA, calibration_summary, epistemic_scale  # noqa: F401
from protos.errors import InvalidInput


class OnlineCalibration:
    """The calibration points of a run, added label by label; O(3 n_atoms) numbers per label.

    Bookkeeping is O(new points) per label: the residuals r, epistemic variances e = σ_ep² and noise
    variances ν = σn² live in three preallocated buffers that double when full (amortised O(1) per
    point; :meth:`arrays` returns views of the filled part, no concatenation).  The scale s is still
    the exact MAP over *all* points (:func:`epistemic_scale`, one O(N) 1-D search per new label) and is
    computed once per label however often :meth:`scale` / :meth:`summary` are asked."""

    #: points the buffers hold before their first growth (a 32-atom frame is 96)
    INITIAL_CAPACITY = 1024

    def __init__(self, prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> None:
        self.prior_alpha = prior_alpha
        self._buf = np.empty((3, self.INITIAL_CAPACITY))   # rows: r, e, ν
        self._n = 0
        self.labels = 0
        self._scale_memo: tuple[int, float] | None = None  # (labels, s)
        self._memo: tuple[int, float | None, dict] | None = None  # (labels, scale asked, summary)

    def add(self, predicted_forces, oracle_forces, epistemic_std, noise: float) -> None:
        """One labelled frame: the old model's forces and per-component σ_ep (n, 3) and its σn, eV/Å."""
        r = (np.asarray(predicted_forces, dtype=np.float64) - np.asarray(oracle_forces, dtype=np.float64)).ravel()
        e = np.square(np.asarray(epistemic_std, dtype=np.float64)).ravel()
        if r.shape != e.shape:
            raise InvalidInput(f"calibration: forces and σ of a label differ in shape ({r.size} vs {e.size})")
        if not math.isfinite(noise) or noise < 0:
            raise InvalidInput(f"calibration: σn must be finite and >= 0, got {noise!r}")
        n, m = self._n, r.size
        if n + m > self._buf.shape[1]:
            grown = np.empty((3, max(2 * self._buf.shape[1], n + m)))
            grown[:, :n] = self._buf[:, :n]
            self._buf = grown
        self._buf[0, n:n + m] = r
        self._buf[1, n:n + m] = e
        self._buf[2, n:n + m] = float(noise) ** 2
        self._n = n + m
        self.labels += 1

    def __len__(self) -> int:
        return self.labels

    @property
    def points(self) -> int:
        """Force components added so far."""
        return self._n

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(r, σ_ep², σn²)`` of every point, read-only views (valid until the next :meth:`add`)."""
        out = []
        for row in self._buf[:, :self._n]:
            view = row.view()
            view.flags.writeable = False
            out.append(view)
        return out[0], out[1], out[2]

    def scale(self) -> float:
        """s (1 with no points: the prior's mode); fitted once per label."""
        if not self._n:
            return 1.0
        if self._scale_memo is None or self._scale_memo[0] != self.labels:
            r, e, nu = self.arrays()
            self._scale_memo = (self.labels, epistemic_scale(r, np.sqrt(e), np.sqrt(nu), self.prior_alpha))
        return self._scale_memo[1]

    def summary(self, scale: float | None = None) -> dict:
        """Mean z², 1σ/2σ coverage and the reliability curve with the model's σ (``raw``) and with s·σ_ep
        (``scaled``), and s itself."""
        if not self._n:
            return {"labels": 0}
        if self._memo is not None and self._memo[:2] == (self.labels, scale):
            return self._memo[2]  # asked again before the next label (acquisition, re-ranking)
        r, e, nu = self.arrays()
        s = self.scale() if scale is None else scale
        raw = calibration_summary(r, np.sqrt(e + nu), prior_alpha=self.prior_alpha)
        cal = calibration_summary(r, np.sqrt(s * s * e + nu), prior_alpha=self.prior_alpha)
        keys = ("n", "mean_squared_z", "within_1_sigma", "within_2_sigma", "miscalibration_area")
        out = {"labels": self.labels, "scale": s,
               "raw": {k: getattr(raw, k) for k in keys} | {"observed": list(raw.observed)},
               "scaled": {k: getattr(cal, k) for k in keys} | {"observed": list(cal.observed)},
               "levels": list(raw.levels)}
        self._memo = (self.labels, scale, out)
        return out
