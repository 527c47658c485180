"""Unit tests of the pure MD pieces: MB velocities, temperature, thermostat factors, wrapping, settings."""

import numpy as np
import pytest

from protos.errors import InvalidInput
from sampler_service import checkpoint as ckpt
from sampler_service import dynamics as dyn
from sampler_service.engine_interface import DriftTracker
from sampler_service.settings import SamplerSettings


def masses(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([1.008, 26.98, 63.55, 195.1], size=n)


@pytest.mark.parametrize("exact", [False, True])
def test_maxwell_boltzmann_has_zero_momentum(exact):
    m = masses()
    v = dyn.maxwell_boltzmann(m, 800.0, np.random.default_rng(1), zero_momentum=True, exact=exact)
    assert v.shape == (500, 3)
    assert np.linalg.norm(m @ v) < 1e-10


def test_maxwell_boltzmann_exact_temperature_uses_3n_minus_3_dof():
    m = masses(32)
    v = dyn.maxwell_boltzmann(m, 300.0, np.random.default_rng(2), exact=True)
    assert dyn.temperature(m, v, conserves_momentum=True) == pytest.approx(300.0, rel=1e-12)
    ke = dyn.kinetic_energy(m, v)
    assert ke == pytest.approx(0.5 * (3 * 32 - 3) * dyn.KB * 300.0, rel=1e-12)


def test_maxwell_boltzmann_samples_the_right_distribution():
    m = masses(20000)
    v = dyn.maxwell_boltzmann(m, 500.0, np.random.default_rng(3), zero_momentum=False)
    # per-component variance kT/m, in Å/fs: check the mass-weighted second moment
    ratio = (m[:, None] * v**2 * dyn.KINETIC / (dyn.KB * 500.0)).mean()
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert dyn.temperature(m, v, conserves_momentum=False) == pytest.approx(500.0, rel=0.02)


def test_maxwell_boltzmann_is_reproducible_and_zero_at_zero_kelvin():
    m = masses(10)
    a = dyn.maxwell_boltzmann(m, 300.0, np.random.default_rng(5))
    b = dyn.maxwell_boltzmann(m, 300.0, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.any(dyn.maxwell_boltzmann(m, 0.0, np.random.default_rng(5)))


def test_units_of_kinetic_energy():
    # one Cu atom at 1 Å/fs: ½ m v² = ½ · 63.546 amu · (1e5 m/s)² in eV
    from ase import units
    ke = dyn.kinetic_energy(np.array([63.546]), np.array([[1.0, 0.0, 0.0]]))
    ke_si = 0.5 * 63.546 * units._amu * (1e5) ** 2 / units._e
    assert ke == pytest.approx(ke_si, rel=1e-9)


def test_degrees_of_freedom():
    assert dyn.degrees_of_freedom(32, True) == 93
    assert dyn.degrees_of_freedom(32, False) == 96
    assert dyn.degrees_of_freedom(1, True) == 3


def test_temperature_excludes_centre_of_mass_motion_when_momentum_is_conserved():
    m = masses(50)
    v = dyn.maxwell_boltzmann(m, 300.0, np.random.default_rng(0), exact=True)
    drifting = v + np.array([0.01, 0.0, 0.0])
    assert dyn.temperature(m, drifting, True) == pytest.approx(300.0, rel=1e-10)
    assert dyn.temperature(m, drifting, False) > 300.0


def test_csvr_samples_the_canonical_kinetic_energy():
    """Repeated CSVR on an ideal gas: ⟨K⟩ = dof kT/2 and Var K = dof (kT)²/2."""
    rng = np.random.default_rng(4)
    dof, target = 93, 400.0
    k = 0.5 * dof * dyn.KB * 100.0
    ks = []
    for _ in range(20000):
        k *= dyn.csvr_alpha(k, target, dof, 1.0, 20.0, rng) ** 2
        ks.append(k)
    ks = np.array(ks[2000:])
    kt = dyn.KB * target
    assert ks.mean() == pytest.approx(0.5 * dof * kt, rel=0.03)
    assert ks.var() == pytest.approx(0.5 * dof * kt**2, rel=0.15)


def test_langevin_o_step_relaxes_to_the_target_variance():
    m = masses(5000)
    v = np.zeros((5000, 3))
    rng = np.random.default_rng(6)
    for _ in range(50):
        v = dyn.langevin_o_step(v, m, 700.0, 0.1, 2.0, rng)
    assert dyn.temperature(m, v, False) == pytest.approx(700.0, rel=0.03)


def test_berendsen_lambda_moves_towards_the_target_and_is_clipped():
    assert dyn.berendsen_lambda(300.0, 300.0, 1.0, 100.0) == 1.0
    assert dyn.berendsen_lambda(200.0, 300.0, 1.0, 100.0) > 1.0
    assert dyn.berendsen_lambda(1.0, 3000.0, 1.0, 1.0) == 1.1
    assert dyn.berendsen_lambda(0.0, 300.0, 1.0, 100.0) == 1.0


def test_pressure_of_an_ideal_gas():
    # no stress, N atoms at T in volume V: P = N k T / V (with 3N dof)
    n, t, vol = 100, 300.0, 1000.0
    ke = 1.5 * n * dyn.KB * t
    assert dyn.pressure(np.zeros(6), ke, vol) == pytest.approx(n * dyn.KB * t / vol)
    assert dyn.berendsen_mu(1.0, 1.0, 0.5, 1.0, 10.0) == 1.0
    assert dyn.berendsen_mu(2.0, 1.0, 0.5, 1.0, 10.0) > 1.0  # too high a pressure → expand


def test_wrap_returns_image_shifts():
    cell = np.array([[4.0, 0, 0], [1.0, 4.0, 0], [0, 0, 5.0]])
    pos = np.array([[1.0, 1.0, 1.0], [5.5, -0.5, 11.0], [-3.0, 2.0, 2.0]])
    w, shift = dyn.wrap(pos, cell, np.array([True, True, True]))
    np.testing.assert_allclose(w + shift @ cell, pos)
    frac = np.linalg.solve(cell.T, w.T).T
    assert np.all((frac >= 0) & (frac < 1))
    np.testing.assert_array_equal(w[0], pos[0])  # untouched atoms are bit-identical
    w2, s2 = dyn.wrap(pos, cell, np.array([True, False, True]))
    assert np.all(s2[:, 1] == 0)


def test_drift_tracker_fits_a_line_and_restarts_on_a_new_model_version():
    d = DriftTracker()
    for i in range(10):
        d.add(float(i), 2.0 + 0.5 * i + (0.01 if i % 2 else -0.01), version=1)
    assert d.slope() == pytest.approx(0.5, rel=1e-2)
    d.add(10.0, 100.0, version=2)
    assert d.slope() is None
    e = DriftTracker()
    e.load(d.to_list())
    assert e.to_list() == d.to_list()


# -- settings --------------------------------------------------------------------------

def test_settings_defaults_and_dict_round_trip():
    s = SamplerSettings(ensemble="nvt_langevin", schedule=[(5000, 10000)], seed=3)
    assert s.schedule == ((5000.0, 10000.0),)
    assert SamplerSettings.from_dict(s.to_dict()) == s
    assert s.thermostat == "langevin" and s.barostat is None and not s.conserves_momentum
    assert SamplerSettings(ensemble="npt_berendsen").barostat == "berendsen"


@pytest.mark.parametrize("kw, words", [
    (dict(engine="gromacs"), ["engine", "builtin", "lammps"]),
    (dict(ensemble="nvt_nose_hoover"), ["ensemble", "nve", "nvt_langevin"]),
    (dict(timestep_fs=0), ["timestep_fs", "> 0"]),
    (dict(timestep_fs=100), ["timestep_fs"]),
    (dict(temperature_K=-1), ["temperature_K", "≥ 0"]),
    (dict(ensemble="nvt_berendsen", taut_fs=0), ["taut_fs"]),
    (dict(ensemble="npt_berendsen", taup_fs=-1), ["taup_fs"]),
    (dict(ensemble="npt_berendsen", compressibility=0), ["compressibility"]),
    (dict(temperature_K="hot"), ["temperature_K", "number"]),
    (dict(initial_temperature_K=-3), ["initial_temperature_K"]),
    (dict(schedule=[(1.0,)]), ["schedule[0]"]),
    (dict(wrap="yes"), ["wrap"]),
    (dict(seed=1.5), ["seed"]),
])
def test_bad_settings_name_the_key(kw, words):
    with pytest.raises(InvalidInput) as err:
        SamplerSettings(**kw)
    for w in words:
        assert w in str(err.value)


def test_unknown_setting_keys_are_invalid():
    with pytest.raises(InvalidInput, match="unknown sampler settings.*thermostat"):
        SamplerSettings.from_dict({"thermostat": "nose"})
    with pytest.raises(InvalidInput, match="unknown"):
        SamplerSettings().replace(dt=1.0)


def test_checkpoint_blob_errors():
    blob = ckpt.pack("builtin", {"x": 1.5}, {"a": np.arange(3.0)})
    doc, arrays = ckpt.unpack(blob, "builtin")
    assert doc["x"] == 1.5 and arrays["a"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(InvalidInput, match="engine 'builtin'"):
        ckpt.unpack(blob, "lammps")
    with pytest.raises(InvalidInput, match="not a sampler checkpoint"):
        ckpt.unpack(b"\x00" * 100, "builtin")
    with pytest.raises(InvalidInput, match="bytes"):
        ckpt.unpack("text", "builtin")
