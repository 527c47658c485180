"""Built-in engine specifics beyond the contract: Berendsen/CSVR/NPT, velocities API, σ-free providers."""

import numpy as np
import pytest

from protos.errors import InvalidInput
from sampler_service.builtin_engine import BuiltinEngine
from sampler_service.force_providers import ForceResult
from sampler_service.settings import SamplerSettings

from .contract import Recorder, cu32, emt_provider


def make(**kw):
    kw.setdefault("timestep_fs", 2.0)
    return BuiltinEngine(SamplerSettings(**kw), emt_provider(), cu32())


@pytest.mark.parametrize("ensemble", ["nvt_berendsen", "nvt_csvr"])
def test_velocity_rescaling_thermostats_reach_the_target(ensemble):
    eng = make(ensemble=ensemble, temperature_K=600.0, taut_fs=20.0, initial_temperature_K=100.0, seed=2)
    rec = Recorder()
    eng.run(400, on_frame=rec)
    temps = np.array([f.observables.temperature_K for f in rec.frames])
    assert abs(temps[150:].mean() - 600.0) < 60.0
    e = np.array([f.observables.conserved_eV for f in rec.frames])
    assert np.max(np.abs(e - e[0])) / 32 < 2e-3  # heat bookkeeping
    # momentum is conserved by velocity rescaling
    assert np.linalg.norm(rec.frames[-1].masses @ rec.frames[-1].velocities) < 1e-9


def test_npt_berendsen_relaxes_the_pressure():
    atoms = cu32()
    atoms.set_cell(atoms.cell * 0.98, scale_atoms=True)  # compressed: positive pressure
    eng = BuiltinEngine(SamplerSettings(ensemble="npt_berendsen", timestep_fs=2.0, temperature_K=300.0,
                                        initial_temperature_K=300.0, taup_fs=100.0, compressibility=0.01,
                                        pressure_GPa=0.0), emt_provider(), atoms)
    rec = Recorder()
    eng.run(300, on_frame=rec)
    p = np.array([f.observables.pressure_GPa for f in rec.frames])
    vol = np.array([f.observables.volume_A3 for f in rec.frames])
    assert p[0] > 5.0
    assert abs(p[200:].mean()) < 1.0
    assert vol[-1] > vol[0] * 1.03
    assert rec.frames[-1].observables.conserved_eV is None


def test_npt_without_stress_is_reported():
    class NoStress:
        def __init__(self):
            self.base = emt_provider()

        def compute(self, *a):
            r = self.base.compute(*a)
            return ForceResult(r.energy, r.forces)

    eng = BuiltinEngine(SamplerSettings(ensemble="npt_berendsen"), NoStress(), cu32())
    with pytest.raises(InvalidInput, match="stress"):
        eng.run(1)


def test_no_sigma_never_gates_and_no_steps_is_a_no_op():
    eng = make(initial_temperature_K=300.0)
    r = eng.run(0, threshold=1e-9)
    assert r.reason == "max_steps" and r.steps_taken == 0 and eng.step == 0
    r = eng.run(5, threshold=1e-9)  # EMT gives no σ
    assert r.reason == "max_steps" and eng.step == 5


def test_set_velocities_and_atoms_round_trip():
    eng = make()
    v = np.full((32, 3), 0.001)
    eng.set_velocities(v)
    np.testing.assert_array_equal(eng.velocities(), v)
    a = eng.atoms()
    from ase import units
    np.testing.assert_allclose(a.get_velocities() * units.fs, v)
    with pytest.raises(InvalidInput, match="velocities"):
        eng.set_velocities(np.zeros((2, 3)))


def test_initial_velocities_come_from_the_seed():
    a = make(initial_temperature_K=300.0, seed=5).velocities()
    b = make(initial_temperature_K=300.0, seed=5).velocities()
    c = make(initial_temperature_K=300.0, seed=6).velocities()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_images_unwrap_the_trajectory():
    eng = make(initial_temperature_K=300.0)
    eng.set_velocities(eng.velocities() + np.array([0.05, 0.0, 0.0]))  # drift 1 Å/20 fs along x
    x0 = eng.positions()
    eng.run(200)  # 400 fs → 20 Å, more than the 7.2 Å cell
    unwrapped = eng.positions() + eng.images @ eng.cell()
    shift = (unwrapped - x0)[:, 0].mean()
    assert shift == pytest.approx(20.0, abs=0.5)
    assert eng.images[:, 0].min() >= 2
