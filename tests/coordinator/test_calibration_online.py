"""The online calibration's maths (coordinator/calibration.py) against analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.calibration import OnlineCalibration, epistemic_scale
from protos.errors import InvalidInput


def test_without_noise_the_scale_is_the_closed_form_posterior_mode() -> None:
    rng = np.random.default_rng(0)
    e = rng.uniform(0.01, 0.1, 500)
    r = rng.normal(0.0, 3.0 * e)
    for alpha in (0.0, 5.0, 50.0):
        n0 = 2 * (alpha + 1)
        expected = math.sqrt((np.sum((r / e) ** 2) + n0) / (r.size + n0))
        assert epistemic_scale(r, e, 0.0, alpha) == pytest.approx(expected, rel=1e-6)


def test_many_points_recover_the_true_epistemic_scale_whatever_the_noise() -> None:
    rng = np.random.default_rng(1)
    e = rng.uniform(0.02, 0.2, 20000)
    noise = 0.05
    for true_s in (0.5, 2.0, 4.0):
        r = rng.normal(0.0, np.sqrt((true_s * e) ** 2 + noise ** 2))
        assert epistemic_scale(r, e, noise) == pytest.approx(true_s, rel=0.05)


def test_the_prior_holds_few_points_near_one_and_noise_alone_explains_nothing_about_s() -> None:
    e = np.full(3, 0.1)
    s = epistemic_scale(np.full(3, 1.0), e, 0.0)  # three residuals at 10σ
    assert 1.0 < s < 10.0 / 2  # pulled far towards 1 by the prior's 12 pseudo-points
    # when σ_ep is negligible against σn the data say nothing about s: the prior's mode, 1
    assert epistemic_scale(np.full(100, 0.3), np.full(100, 1e-9), 0.3) == pytest.approx(1.0, rel=1e-3)


def test_online_summary_improves_with_the_fitted_scale() -> None:
    rng = np.random.default_rng(2)
    cal = OnlineCalibration()
    for _ in range(40):
        std = rng.uniform(0.02, 0.1, (32, 3))
        truth = rng.normal(size=(32, 3))
        pred = truth + rng.normal(0.0, np.sqrt((3 * std) ** 2 + 0.01 ** 2))
        cal.add(pred, truth, std, 0.01)
    out = cal.summary()
    assert out["labels"] == 40 and out["scale"] == pytest.approx(3.0, rel=0.08)
    assert out["raw"]["mean_squared_z"] > 4 and out["scaled"]["mean_squared_z"] == pytest.approx(1.0, abs=0.1)
    assert out["scaled"]["within_2_sigma"] == pytest.approx(0.9545, abs=0.02)
    assert OnlineCalibration().scale() == 1.0 and OnlineCalibration().summary() == {"labels": 0}
    with pytest.raises(InvalidInput, match="differ in shape"):
        cal.add(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 3)), 0.01)
