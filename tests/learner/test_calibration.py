"""learner_service.calibration against analytic cases (Gaussian residuals with known scale)."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from learner_service.calibration import (DEFAULT_LEVELS, calibration_summary, reliability_curve,
                                         variance_scale)
from protos.errors import InvalidInput

N = 200_000  # SE of s ≈ s/sqrt(2N) = 0.0016 s; of a coverage ≈ sqrt(p(1-p)/N) ≤ 0.0012


def _residuals(scale, seed=0, n=N):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.02, 0.5, n)  # eV/Å, varying from residual to residual
    return rng.normal(0.0, scale * sigma), sigma


def test_calibrated_residuals_lie_on_the_diagonal():
    r, s = _residuals(1.0)
    c = calibration_summary(r, s)
    assert c.n == N
    assert c.mean_squared_z == pytest.approx(1.0, abs=0.02)
    assert c.within_1_sigma == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.005)  # 0.6827
    assert c.within_2_sigma == pytest.approx(math.erf(2 / math.sqrt(2)), abs=0.005)  # 0.9545
    np.testing.assert_allclose(c.observed, c.levels, atol=0.005)
    assert c.miscalibration_area < 0.005
    assert c.variance_scale == pytest.approx(1.0, abs=0.01)


def test_overconfident_sigma_twice_too_small_gives_s_2_and_the_analytic_curve():
    r, s = _residuals(2.0, seed=1)
    c = calibration_summary(r, s)
    assert c.variance_scale == pytest.approx(2.0, abs=0.02)
    assert c.mean_squared_z == pytest.approx(4.0, abs=0.08)
    # z = 2 z' with z' ~ N(0,1): P(|z| <= q) = 2Φ(q/2) - 1 with q = Φ⁻¹((1+p)/2)
    q = stats.norm.ppf(0.5 * (1 + np.asarray(DEFAULT_LEVELS)))
    np.testing.assert_allclose(c.observed, 2 * stats.norm.cdf(q / 2) - 1, atol=0.005)
    assert c.within_1_sigma == pytest.approx(2 * stats.norm.cdf(0.5) - 1, abs=0.005)  # 0.383
    # recalibrated σ_cal = s σ is calibrated again
    c2 = calibration_summary(r, c.variance_scale * s)
    np.testing.assert_allclose(c2.observed, c2.levels, atol=0.006)


def test_prior_dominates_two_points_and_is_the_posterior_mode():
    r, s = np.array([0.3, -0.3]), np.array([0.1, 0.1])  # z = ±3: the likelihood alone says s = 3
    got = variance_scale(r, s)
    alpha = 5.0

    def neg_log_posterior(v):  # v = s², prior IG(α, β = α + 1) (mode 1), Gaussian likelihood
        return -(stats.invgamma.logpdf(v, alpha, scale=alpha + 1) + stats.norm.logpdf(r, 0, np.sqrt(v) * s).sum())

    v_map = optimize.minimize_scalar(neg_log_posterior, bounds=(1e-3, 50), method="bounded",
                                     options={"xatol": 1e-10}).x
    assert got == pytest.approx(math.sqrt(v_map), rel=1e-6)
    assert 1.0 < got < 1.6  # (18 + 12)/(2 + 12) = 2.14 -> s = 1.46, far from the likelihood's 3
    # with many such points the data win
    many = variance_scale(np.tile(r, 5000), np.tile(s, 5000))
    assert many == pytest.approx(3.0, abs=0.01)
    # a weaker prior moves further towards the data
    assert variance_scale(r, s, prior_alpha=0.0) > got


def test_bad_input_is_named():
    with pytest.raises(InvalidInput, match="3 residuals but 2 σ"):
        calibration_summary([0.1, 0.2, 0.3], [0.1, 0.1])
    with pytest.raises(InvalidInput, match="σ must be > 0"):
        variance_scale([0.1], [0.0])
    with pytest.raises(InvalidInput, match="no residuals"):
        variance_scale([], [])
    with pytest.raises(InvalidInput, match="levels"):
        reliability_curve([0.1], [0.1], levels=[0.5, 1.0])
