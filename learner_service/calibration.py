"""Calibration of predicted uncertainties against held-out residuals (issue 13, item 3, offline).

Pure maths, no model: ``residuals`` r = prediction − reference and the predicted *total* σ of
each (with noise: sqrt(σ_epistemic² + σn²)), same shape, eV/Å for forces.  A calibrated model
has z = r/σ ~ N(0, 1).

* :func:`calibration_summary`: mean z² (ideal 1), coverage of the ±1σ and ±2σ intervals
  (ideal 68.27 % and 95.45 %), a reliability curve and a variance scale s.
* :func:`reliability_curve`: for central probabilities p, the fraction of |z| ≤ Φ⁻¹((1+p)/2)
  (a calibrated model lies on observed = expected); the miscalibration area is the mean
  |observed − expected| over the curve's points.
* :func:`variance_scale`: σ_cal = s·σ with s² the maximum a posteriori of the model
  r_i ~ N(0, s² σ_i²) under an inverse-gamma prior on s², IG(α, β = α + 1), whose mode is 1 (the
  model's own σ) -- so a few points cannot swing it.  The posterior is IG(α + n/2, β + S/2) with
  S = Σ z_i², and its mode is

      s² = (S + n₀) / (n + n₀),   n₀ = 2(α + 1),

  i.e. the prior acts as n₀ extra residuals with z² = 1 (default α = 5: n₀ = 12).
* :func:`heldout_calibration`: s of σ_cal = sqrt(s²σ_ep² + σn²) (only the epistemic part scaled, as
  in a run) fitted on one set of held-out residuals and judged on another (the test set).

The residuals are treated as independent; the three force components of one atom and the
atoms of one frame are correlated, so with few frames read n as an upper bound of the
information (the prior protects against over-reacting to them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protos.errors import InvalidInput

__all__ = ["CalibrationSummary", "calibration_summary", "reliability_curve", "variance_scale", "epistemic_scale",
           "HeldoutCalibration", "heldout_calibration", "DEFAULT_PRIOR_ALPHA", "DEFAULT_LEVELS"]

#: shape α of the inverse-gamma prior on s² (scale β = α + 1, mode 1): worth n₀ = 2(α+1) = 12 residuals
DEFAULT_PRIOR_ALPHA = 5.0

#: central probabilities of the reliability curve
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6827, 0.7, 0.8, 0.9, 0.9545, 0.99)

#: the search range of s (a wider miscalibration is reported at the edge)
SCALE_RANGE = (0.01, 100.0)


def epistemic_scale(residuals, epistemic_std, noise, prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> float:
    """MAP of s in r ~ N(0, s²·σ_ep² + σn²) under s² ~ IG(α, α + 1); arrays of one shape (σn may be a
    scalar), eV/Å."""
    from scipy.optimize import minimize_scalar

    r2 = np.square(np.asarray(residuals, dtype=np.float64)).reshape(-1)
    e = np.square(np.asarray(epistemic_std, dtype=np.float64)).reshape(-1)
    nu = np.broadcast_to(np.square(np.asarray(noise, dtype=np.float64)), np.shape(e)).reshape(-1)
    if r2.shape != e.shape:
        raise InvalidInput(f"calibration: {r2.size} residuals but {e.size} σ values (they must pair up)")
    if not (math.isfinite(prior_alpha) and prior_alpha >= 0):
        raise InvalidInput(f"calibration prior α must be finite and >= 0, got {prior_alpha!r}")
    if not (np.all(np.isfinite(r2)) and np.all(np.isfinite(e)) and np.all(np.isfinite(nu))):
        raise InvalidInput("calibration: residuals, σ and σn must be finite")
    keep = (e + nu) > 0
    r2, e, nu = r2[keep], e[keep], nu[keep]
    alpha, beta = prior_alpha, prior_alpha + 1.0

    def neg_log_post(log_t: float) -> float:
        t = math.exp(log_t)
        v = t * e + nu
        return float(0.5 * np.sum(np.log(v) + r2 / v) + (alpha + 1.0) * log_t + beta / t)

    lo, hi = (2 * math.log(x) for x in SCALE_RANGE)
    res = minimize_scalar(neg_log_post, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    return math.sqrt(math.exp(float(res.x)))


@dataclass(frozen=True)
class CalibrationSummary:
    """``n`` residuals; ``mean_squared_z``; ``within_1_sigma``/``within_2_sigma`` observed
    coverage (fractions); ``levels``/``observed`` the reliability curve; ``miscalibration_area``;
    ``variance_scale`` s (σ_cal = s·σ) and the prior's pseudo-count ``prior_count`` n₀."""

    n: int
    mean_squared_z: float
    within_1_sigma: float
    within_2_sigma: float
    levels: tuple[float, ...]
    observed: tuple[float, ...]
    miscalibration_area: float
    variance_scale: float
    prior_count: float

    def as_dict(self) -> dict:
        return {"n": self.n, "mean_squared_z": self.mean_squared_z, "within_1_sigma": self.within_1_sigma,
                "within_2_sigma": self.within_2_sigma,
                "reliability": {"expected": list(self.levels), "observed": list(self.observed)},
                "miscalibration_area": self.miscalibration_area, "variance_scale": self.variance_scale,
                "variance_scale_prior_count": self.prior_count}


def _z(residuals, sigma) -> np.ndarray:
    r = np.asarray(residuals, dtype=np.float64).reshape(-1)
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if r.shape != s.shape:
        raise InvalidInput(f"calibration: {r.size} residuals but {s.size} σ values (they must pair up)")
    if r.size == 0:
        raise InvalidInput("calibration: no residuals")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(s))):
        raise InvalidInput("calibration: residuals and σ must be finite")
    if np.any(s <= 0):
        raise InvalidInput(f"calibration: σ must be > 0 (the total σ, noise included); smallest is {s.min()!r}")
    return r / s


def _phi_inv_central(p: float) -> float:
    """z with P(|Z| ≤ z) = p for Z ~ N(0, 1)."""
    from scipy.special import ndtri

    return float(ndtri(0.5 * (1.0 + p)))


def reliability_curve(residuals, sigma, levels=DEFAULT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed): expected central probabilities ``levels`` in (0, 1) and the
    observed fraction of residuals inside the matching Gaussian interval ±Φ⁻¹((1+p)/2)·σ."""
    z = np.abs(_z(residuals, sigma))
    levels = np.asarray(levels, dtype=np.float64)
    if np.any((levels <= 0) | (levels >= 1)):
        raise InvalidInput(f"calibration levels must lie in (0, 1), got {levels.tolist()}")
    observed = np.array([np.mean(z <= _phi_inv_central(p)) for p in levels])
    return levels, observed


def variance_scale(residuals, sigma, prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> float:
    """s, the MAP of σ_cal = s·σ (see the module docstring): s² = (Σz² + n₀)/(n + n₀), n₀ = 2(α+1).
    ``prior_alpha`` = 0 still leaves n₀ = 2 (the mode of IG(0, 1)); larger α trusts the model's σ more."""
    if not (math.isfinite(prior_alpha) and prior_alpha >= 0):
        raise InvalidInput(f"calibration prior α must be finite and >= 0, got {prior_alpha!r}")
    z = _z(residuals, sigma)
    n0 = 2.0 * (prior_alpha + 1.0)
    return math.sqrt((float(np.sum(z * z)) + n0) / (z.size + n0))


def calibration_summary(residuals, sigma, levels=DEFAULT_LEVELS,
                        prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> CalibrationSummary:
    """Everything above for one set of residuals and total σ."""
    z = _z(residuals, sigma)
    expected, observed = reliability_curve(residuals, sigma, levels)
    return CalibrationSummary(
        n=int(z.size),
        mean_squared_z=float(np.mean(z * z)),
        within_1_sigma=float(np.mean(np.abs(z) <= 1.0)),
        within_2_sigma=float(np.mean(np.abs(z) <= 2.0)),
        levels=tuple(float(x) for x in expected),
        observed=tuple(float(x) for x in observed),
        miscalibration_area=float(np.mean(np.abs(observed - expected))),
        variance_scale=variance_scale(residuals, sigma, prior_alpha),
        prior_count=2.0 * (prior_alpha + 1.0),
    )


# ---------------------------------------------------------------------------
# held-out calibration: s fitted on one set of residuals, judged on another
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutCalibration:
    """σ_cal = sqrt(s²σ_ep² + σn²) with s fitted on the ``fit`` residuals and judged on the ``test``
    residuals (two disjoint sets; eV/Å).  ``raw``/``scaled``: :func:`calibration_summary` of the test
    residuals against the model's total σ and against σ_cal; ``rmse`` and the RMS of σ_ep, of the
    total σ and of σ_cal over the test components; ``fit_n``/``test_n`` the numbers of residuals."""

    scale: float
    fit_n: int
    test_n: int
    rmse: float
    rms_sigma_epistemic: float
    rms_sigma_total: float
    rms_sigma_calibrated: float
    raw: CalibrationSummary
    scaled: CalibrationSummary

    @property
    def ratio(self) -> float:
        """RMS σ_cal / RMSE (1: σ_cal on the scale of the test errors)."""
        return self.rms_sigma_calibrated / self.rmse if self.rmse > 0 else math.inf

    def as_dict(self) -> dict:
        return {"scale": self.scale, "fit_n": self.fit_n, "test_n": self.test_n, "rmse": self.rmse,
                "rms_sigma_epistemic": self.rms_sigma_epistemic, "rms_sigma_total": self.rms_sigma_total,
                "rms_sigma_calibrated": self.rms_sigma_calibrated, "ratio": self.ratio,
                "raw": self.raw.as_dict(), "scaled": self.scaled.as_dict()}


def _triple(name: str, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        r, e, nu = data
    except (TypeError, ValueError):
        raise InvalidInput(f"calibration: {name} must be (residuals, epistemic σ, σn)") from None
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    e = np.asarray(e, dtype=np.float64).reshape(-1)
    if r.shape != e.shape:
        raise InvalidInput(f"calibration: {name} has {r.size} residuals but {e.size} σ values (they must pair up)")
    if r.size == 0:
        raise InvalidInput(f"calibration: {name} has no residuals")
    nu = np.broadcast_to(np.asarray(nu, dtype=np.float64), r.shape).reshape(-1)
    if not (np.all(np.isfinite(nu)) and np.all(nu >= 0)):
        raise InvalidInput(f"calibration: {name} σn must be finite and >= 0")
    return r, e, nu


def heldout_calibration(fit, test, prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> HeldoutCalibration:
    """Fit s of σ_cal = sqrt(s²σ_ep² + σn²) on ``fit`` and judge it on ``test``.

    ``fit`` and ``test`` are each ``(residuals, epistemic σ, σn)``: residual r = prediction − reference
    per force component, the model's epistemic σ of that component, and the model's noise σn (scalar
    or per component), eV/Å.  s is the MAP of r ~ N(0, s²σ_ep² + σn²) under the inverse-gamma prior
    IG(α, α + 1) on s² (:func:`epistemic_scale`, the estimate a run uses).
    The two sets must not overlap (the caller's duty: residuals of data the model did not train on,
    and a test set that did not choose s); with ``fit`` = ``test`` this is the in-sample calibration.
    """

    rf, ef, nf = _triple("fit", fit)
    rt, et, nt = _triple("test", test)
    s = epistemic_scale(rf, ef, nf, prior_alpha)
    total = np.sqrt(et * et + nt * nt)
    cal = np.sqrt((s * et) ** 2 + nt * nt)
    return HeldoutCalibration(
        scale=float(s), fit_n=int(rf.size), test_n=int(rt.size),
        rmse=float(np.sqrt(np.mean(rt * rt))),
        rms_sigma_epistemic=float(np.sqrt(np.mean(et * et))),
        rms_sigma_total=float(np.sqrt(np.mean(total * total))),
        rms_sigma_calibrated=float(np.sqrt(np.mean(cal * cal))),
        raw=calibration_summary(rt, total, prior_alpha=prior_alpha),
        scaled=calibration_summary(rt, cal, prior_alpha=prior_alpha),
    )
