"""The trial update policy's decisions (coordinator/trial.py), on frames built by hand: no services."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from coordinator import trial
from coordinator.config import ConfigError, TrialConfig, parse_config


def frame(step: int, conserved: float, forces: float = 0.5, n: int = 4, oracle: bool = False) -> Atoms:
    atoms = Atoms("Al" * n, positions=np.arange(3 * n, dtype=float).reshape(n, 3) * 2.0)
    f = np.zeros((n, 3))
    f[0, 0] = forces
    atoms.calc = SinglePointCalculator(atoms, forces=f)
    atoms.info.update(step=step, conserved_eV=conserved, forces_from_oracle=oracle)
    return atoms


CFG = TrialConfig(max_energy_change_eV_per_atom=0.01, max_force_eV_A=10.0, timestep_factor=0.5,
                  min_timestep_fs=0.5, max_retries=3, recover_steps=100)


def test_a_conserving_trial_passes_and_reports_its_largest_change() -> None:
    frames = [frame(s, -10.0 + 0.001 * (s % 3)) for s in range(20)]
    v = trial.judge(frames, CFG)
    assert v.ok and v.steps == 19
    assert v.max_energy_change == pytest.approx(0.002 / 4)
    assert v.max_force == pytest.approx(0.5)


def test_drift_past_the_tolerance_fails_with_the_number_in_the_reason() -> None:
    frames = [frame(s, -10.0 + 0.003 * s) for s in range(20)]  # 0.057 eV over 4 atoms = 0.014 eV/atom
    v = trial.judge(frames, CFG)
    assert not v.ok and v.max_energy_change == pytest.approx(0.057 / 4)
    assert "0.0143 eV/atom in 19 steps" in v.reason


def test_the_oracle_forced_first_frame_is_not_the_energy_reference() -> None:
    """The step integrated with the oracle's forces carries the old potential energy: a jump there is
    not drift of the new model."""
    frames = [frame(0, -5.0, oracle=True)] + [frame(s, -10.0) for s in range(1, 10)]
    assert trial.judge(frames, CFG).ok
    assert not trial.judge([frame(0, -5.0)] + frames[1:], CFG).ok


def test_huge_or_non_finite_forces_fail_whatever_the_energy() -> None:
    assert not trial.judge([frame(0, -10.0), frame(1, -10.0, forces=11.0)], CFG).ok
    v = trial.judge([frame(0, -10.0), frame(1, -10.0, forces=math.nan)], CFG)
    assert not v.ok and "non-finite" in v.reason


def test_without_a_conserved_quantity_only_forces_are_watched() -> None:
    v = trial.judge([frame(s, math.nan) for s in range(5)], CFG)
    assert v.ok and "forces only" in v.reason
    assert not trial.judge([frame(0, math.nan), frame(1, math.nan, forces=20.0)], CFG).ok


def test_retries_halve_the_timestep_down_to_the_floor_then_reject() -> None:
    assert trial.after_failure(1, 4.0, CFG) == 2.0
    assert trial.after_failure(2, 2.0, CFG) == 1.0
    assert trial.after_failure(3, 1.0, CFG) == 0.5
    assert trial.after_failure(4, 0.5, CFG) is None            # retries used up
    assert trial.after_failure(1, 0.6, CFG) == 0.5             # not below the floor
    assert trial.after_failure(2, 0.5, CFG) is None            # already at the floor
    assert trial.after_failure(1, 4.0, TrialConfig(max_retries=0, min_timestep_fs=0.1)) is None


def test_the_timestep_grows_back_one_factor_per_recover_steps_up_to_the_configured_one() -> None:
    assert trial.recovered(1.0, 99, 4.0, CFG) == (1.0, 99)
    assert trial.recovered(1.0, 100, 4.0, CFG) == (2.0, 0)
    assert trial.recovered(1.0, 250, 4.0, CFG) == (4.0, 0)       # two factors, capped, counter reset
    assert trial.recovered(3.0, 100, 4.0, CFG) == (4.0, 0)       # capped at the configured Δt


def test_trial_settings_are_validated_with_units() -> None:
    base = {"structure": {"generator": "fcc", "element": "Al"}, "sampler": {"timestep_fs": 2.0}}
    cfg = parse_config({**base, "policy": {"update": "trial", "trial": {"window_steps": 5}}})
    assert cfg.policy.update == "trial" and cfg.policy.trial.window_steps == 5
    for bad, message in (({"timestep_factor": 1.5}, "timestep_factor: must be in \\(0, 1\\)"),
                         ({"min_timestep_fs": 3.0}, "exceeds walker w0's timestep \\(2.0 fs\\)"),
                         ({"max_energy_change_eV_per_atom": 0}, "eV/atom"),
                         ({"window": 5}, "unknown key policy.trial.window")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "policy": {"update": "trial", "trial": bad}})
