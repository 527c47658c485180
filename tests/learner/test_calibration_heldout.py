"""learner_service.calibration.heldout_calibration: s of σ_cal = sqrt(s²σ_ep² + σn²) fitted on one set of
residuals and judged on another, against analytic cases (Gaussian residuals of known scale)."""

import math

import numpy as np
import pytest

from learner_service.calibration import heldout_calibration, variance_scale
from protos.errors import InvalidInput

COV1, COV2 = math.erf(1 / math.sqrt(2)), math.erf(2 / math.sqrt(2))  # 0.6827, 0.9545


def _draw(s, noise, n, seed):
    """Residuals exactly N(0, s²σ_ep² + σn²) with σ_ep varying from component to component (eV/Å)."""
    rng = np.random.default_rng(seed)
    ep = rng.uniform(0.005, 0.1, n)
    r = rng.normal(0.0, np.sqrt((s * ep) ** 2 + noise ** 2))
    return r, ep, noise


def _se_of_s(s, ep, noise):
    """Standard error of the maximum-likelihood s from the Fisher information of t = s²:
    I(t) = ½ Σ (e/(t e + ν))², e = σ_ep², ν = σn²; SE(s) = SE(t) / (2s)."""
    e, nu = ep ** 2, noise ** 2
    info = 0.5 * np.sum((e / (s * s * e + nu)) ** 2)
    return 1.0 / math.sqrt(info) / (2 * s)


@pytest.mark.parametrize("s_true", [0.5, 1.0, 2.5])
def test_known_scale_is_recovered_and_calibrates_the_test_set(s_true):
    noise = 0.02
    fit = _draw(s_true, noise, 40_000, seed=1)
    test = _draw(s_true, noise, 40_000, seed=2)
    h = heldout_calibration(fit, test)
    se = _se_of_s(s_true, fit[1], noise)
    assert abs(h.scale - s_true) < 4 * se + 1e-3 * s_true  # the prior (12 pseudo-residuals) biases by < 1e-3
    assert h.fit_n == h.test_n == 40_000
    # the test residuals with σ_cal: z ~ N(0, 1)
    assert h.scaled.mean_squared_z == pytest.approx(1.0, abs=0.03)
    assert h.scaled.within_1_sigma == pytest.approx(COV1, abs=0.01)
    assert h.scaled.within_2_sigma == pytest.approx(COV2, abs=0.006)
    # E r² = E σ_cal², so RMS σ_cal / RMSE -> 1
    assert h.ratio == pytest.approx(1.0, abs=0.02)
    if s_true == 1.0:  # the model's own σ was right: raw and scaled agree
        assert h.raw.mean_squared_z == pytest.approx(h.scaled.mean_squared_z, abs=0.02)
    else:
        assert abs(h.raw.mean_squared_z - 1.0) > 0.1


def test_s_is_one_when_residuals_match_sigma_without_noise_and_equals_the_closed_form():
    fit = _draw(1.0, 0.0, 20_000, seed=3)
    test = _draw(1.0, 0.0, 20_000, seed=4)
    h = heldout_calibration(fit, test)
    assert h.scale == pytest.approx(1.0, abs=4 * _se_of_s(1.0, fit[1], 0.0))
    # σn = 0: the MAP is the closed form s² = (Σz² + n₀)/(n + n₀) of variance_scale
    assert h.scale == pytest.approx(variance_scale(fit[0], fit[1]), rel=1e-6)
    assert h.rms_sigma_calibrated == pytest.approx(h.scale * h.rms_sigma_epistemic, rel=1e-12)
    assert h.rms_sigma_total == pytest.approx(h.rms_sigma_epistemic, rel=1e-12)


def test_s_comes_from_the_fit_set_not_the_test_set():
    fit = _draw(1.0, 0.0, 20_000, seed=5)
    test = _draw(3.0, 0.0, 20_000, seed=6)  # the test errors are 3x larger than σ says
    h = heldout_calibration(fit, test)
    assert h.scale == pytest.approx(1.0, abs=0.03)
    assert h.raw.mean_squared_z == pytest.approx(9.0, rel=0.03)
    assert h.scaled.mean_squared_z == pytest.approx(h.raw.mean_squared_z / h.scale ** 2, rel=1e-9)
    assert h.ratio == pytest.approx(1.0 / 3.0, rel=0.03)
    # fitted on the test set itself (in-sample), the scale is 3
    assert heldout_calibration(test, test).scale == pytest.approx(3.0, rel=0.03)


def test_noise_dominated_residuals_leave_s_at_the_prior_mode():
    # σ_ep negligible against σn: the likelihood is flat in s, so s is the prior's mode, 1
    rng = np.random.default_rng(7)
    n, noise = 5_000, 0.05
    ep = np.full(n, 1e-7)
    fit = (rng.normal(0, noise, n), ep, noise)
    h = heldout_calibration(fit, fit)
    assert h.scale == pytest.approx(1.0, abs=1e-3)
    assert h.scaled.mean_squared_z == pytest.approx(h.raw.mean_squared_z, rel=1e-9)


def test_hand_sized_example():
    # σn = 0: s² = (Σz² + 12)/(n + 12) with z = (1, -2) -> s² = 17/14
    h = heldout_calibration(([0.1, -0.4], [0.1, 0.2], 0.0), ([0.3, 0.0, -0.3], [0.1, 0.1, 0.3], 0.0))
    s = math.sqrt(17 / 14)
    assert h.scale == pytest.approx(s, rel=1e-7)
    assert h.rmse == pytest.approx(math.sqrt(0.18 / 3))
    assert h.rms_sigma_calibrated == pytest.approx(s * math.sqrt(0.11 / 3), rel=1e-7)
    assert h.raw.mean_squared_z == pytest.approx((9 + 0 + 1) / 3)
    assert h.scaled.within_2_sigma == pytest.approx(2 / 3)  # |z| = 3/s > 2 for the first


@pytest.mark.parametrize("fit, test, words", [
    (([0.1, 0.2], [0.1], 0.0), ([0.1], [0.1], 0.0), "pair up"),
    (([], [], 0.0), ([0.1], [0.1], 0.0), "no residuals"),
    (([0.1], [0.1], -0.1), ([0.1], [0.1], 0.0), "σn"),
    (([0.1], [0.1]), ([0.1], [0.1], 0.0), "(residuals, epistemic σ, σn)"),
])
def test_bad_input_names_the_problem(fit, test, words):
    with pytest.raises(InvalidInput, match=__import__("re").escape(words)):
        heldout_calibration(fit, test)
