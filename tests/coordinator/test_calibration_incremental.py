"""OnlineCalibration keeps its points in growing buffers (O(new points) per label): the incremental
state must be exactly the from-scratch one, across buffer growths, frames of different sizes and a
σn that changes from label to label."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.calibration import OnlineCalibration, epistemic_scale
from learner_service.calibration import calibration_summary


def _labels(seed: int, n_labels: int):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_labels):
        n_atoms = int(rng.integers(1, 700))  # some frames larger than the initial capacity
        std = np.exp(rng.uniform(np.log(0.005), np.log(0.4), (n_atoms, 3)))
        truth = rng.normal(0.0, 1.0, (n_atoms, 3))
        noise = float(rng.uniform(0.0, 0.05)) if k % 5 else 0.0
        pred = truth + rng.normal(0.0, np.sqrt((2.5 * std) ** 2 + noise ** 2))
        out.append((pred, truth, std, noise))
    return out


def test_incremental_scale_and_summary_equal_the_from_scratch_fit_after_every_label() -> None:
    labels = _labels(3, 25)
    cal = OnlineCalibration(prior_alpha=2.0)
    capacities = set()
    for k, (pred, truth, std, noise) in enumerate(labels):
        cal.add(pred, truth, std, noise)
        capacities.add(cal._buf.shape[1])
        done = labels[:k + 1]
        r = np.concatenate([(p - t).ravel() for p, t, _, _ in done])
        e = np.concatenate([s.ravel() for _, _, s, _ in done])
        nu = np.concatenate([np.full(p.size, n) for p, _, _, n in done])
        # the points themselves, bit for bit, in order
        got_r, got_e2, got_nu2 = cal.arrays()
        np.testing.assert_array_equal(got_r, r)
        np.testing.assert_array_equal(got_e2, e ** 2)
        np.testing.assert_array_equal(got_nu2, nu ** 2)
        assert cal.points == r.size and len(cal) == k + 1
        s = epistemic_scale(r, e, nu, 2.0)
        assert cal.scale() == pytest.approx(s, rel=1e-12)
        out = cal.summary()
        assert out["scale"] == pytest.approx(s, rel=1e-12)
        scaled = calibration_summary(r, np.sqrt((s * e) ** 2 + nu ** 2), prior_alpha=2.0)
        raw = calibration_summary(r, np.sqrt(e ** 2 + nu ** 2), prior_alpha=2.0)
        assert out["scaled"]["mean_squared_z"] == pytest.approx(scaled.mean_squared_z, rel=1e-12)
        assert out["raw"]["within_2_sigma"] == raw.within_2_sigma
        assert out["scaled"]["observed"] == list(scaled.observed)
    assert len(capacities) >= 3  # the buffers grew (at least) twice during the test
    # the true scale is 2.5: many points find it (a check that the points are the right ones)
    assert cal.scale() == pytest.approx(2.5, rel=0.05)


def test_views_are_read_only_and_a_rebuilt_calibration_matches() -> None:
    labels = _labels(4, 8)
    a, b = OnlineCalibration(), OnlineCalibration()
    for lab in labels:
        a.add(*lab)
        a.scale()
    for lab in labels:  # a resumed run re-adds the labels on disk, then asks s once
        b.add(*lab)
    assert b.scale() == a.scale() and b.summary() == a.summary()
    r, _, _ = a.arrays()
    with pytest.raises(ValueError):
        r[0] = 1.0
    # a new label changes s: the per-label memo must not serve the old value
    before = a.scale()
    pred, truth, std, noise = labels[0]
    a.add(truth + 50 * std, truth, std, noise)
    assert a.scale() > before
