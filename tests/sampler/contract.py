"""The MD engine contract: one test class that every engine inherits.

A concrete test module sets ``engine = "<name>"`` (and, honestly, what the
engine cannot do, with a reason).  Forces are real: ASE's EMT on a 32-atom
FCC Cu cell; σ is a deterministic function of the positions (|u| from the
starting sites), so the uncertainty stop is reproducible.

Tolerances (stated here so every engine is held to the same numbers):

* NVE, 32 Cu atoms, MB at 300 K, Δt = 2 fs, 300 steps: the conserved energy
  stays within ``NVE_MAX_DEV`` = 2e-4 eV/atom of its start, and its fitted
  drift is below ``NVE_MAX_DRIFT`` = 1e-3 eV/atom/ps.
* Total momentum (NVE): |Σ m v| < 1e-9 amu·Å/fs.
* Langevin at 500 K from rest: ⟨T⟩ over the last 2/3 of 600 steps within 10 %.
* Langevin sampling, Einstein crystal (256 harmonic Cu atoms, ω = 0.05 rad/fs,
  Δt = 2 fs, γ = 0.1/fs, 300 K, 8000 steps after 250 of equilibration): the
  mean kinetic and configurational temperatures equal 300 K within
  4 standard errors (20 block averages of 400 steps) plus the discretisation
  bias bound (ωΔt)²/4 = 0.25 %; the standard error must be below 0.4 %.
* Schedule: T is the event temperature to 1e-9 relative at the first step with t ≥ t_event.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT

from protos.errors import CalculationFailed, InvalidInput
from sampler_service import dynamics as dyn
from sampler_service.engine_interface import MDEngine
from sampler_service.engine_registry import create_engine, engine_from_checkpoint
from sampler_service.force_providers import AseCalculatorProvider, ForceResult, SigmaFunctionProvider, displacement_sigma
from sampler_service.settings import SamplerSettings
from sampler_service.trajectory import ExtXYZWriter, read_frames

NVE_MAX_DEV = 2e-4  # eV/atom
NVE_MAX_DRIFT = 1e-3  # eV/atom/ps


def cu32():
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))


def emt_provider():
    return AseCalculatorProvider(EMT())


def sigma_provider(atoms):
    """EMT forces; σ_iα = |u_iα| (Å, read as eV/Å) from the starting sites."""
    return SigmaFunctionProvider(emt_provider(), displacement_sigma(atoms.get_positions()), noise=0.05,
                                 model_version=7)


class AtomSigmaProvider:
    """:func:`sigma_provider` plus a per-atom σ, ``atom_std`` = |σ_i| (the norm of the atom's
    component σ, >= its largest component): a stand-in for a GP's rotation-invariant σ."""

    def __init__(self, atoms):
        self.base = sigma_provider(atoms)

    def compute(self, *args):
        r = self.base.compute(*args)
        return dataclasses.replace(r, atom_std=np.linalg.norm(r.force_std, axis=1))


def min_image(d, cell):
    frac = np.linalg.solve(cell.T, d.T).T
    frac -= np.round(frac)
    return frac @ cell


class FlakyProvider:
    """EMT, but fails once at the 15th call (a learner that dropped its stream)."""

    def __init__(self):
        self.base, self.calls, self.failed = emt_provider(), 0, False

    def compute(self, *a):
        self.calls += 1
        if self.calls == 15 and not self.failed:
            self.failed = True
            raise CalculationFailed("learner went away")
        return self.base.compute(*a)


class EinsteinProvider:
    """Every atom on its own spring to its starting site: F = −k u, E = ½ k Σ u² (u minimum-image, Å).

    3N independent harmonic oscillators of angular frequency ω = √(k/m): in the canonical
    ensemble ⟨m v²⟩ = ⟨k u²⟩ = k_B T per component, with no anharmonic or finite-size subtleties.
    """

    def __init__(self, atoms, omega_per_fs: float) -> None:
        self.sites = atoms.get_positions()
        mass = atoms.get_masses()
        assert np.all(mass == mass[0])
        self.k = omega_per_fs**2 * mass[0] / units.fs**2  # eV/Å²: ω² = k/m in ASE time units

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        u = min_image(positions - self.sites, cell)
        return ForceResult(energy=0.5 * self.k * float(np.sum(u * u)), forces=-self.k * u)


def block_mean_and_error(x: np.ndarray, n_blocks: int) -> tuple[float, float]:
    """Mean of a correlated series and its standard error from ``n_blocks`` block means."""
    blocks = x[: len(x) // n_blocks * n_blocks].reshape(n_blocks, -1).mean(axis=1)
    return float(x.mean()), float(blocks.std(ddof=1) / math.sqrt(n_blocks))


class Recorder:
    def __init__(self):
        self.frames = []

    def __call__(self, frame):
        self.frames.append(frame)


class EngineContract:
    #: registry name of the engine under test
    engine: str = ""
    #: ensembles the engine implements
    ensembles: tuple[str, ...] = ("nve", "nvt_langevin")

    # -- helpers -----------------------------------------------------------------
    def make(self, atoms=None, provider=None, **kw) -> MDEngine:
        atoms = cu32() if atoms is None else atoms
        kw.setdefault("timestep_fs", 2.0)
        kw.setdefault("seed", 11)
        settings = SamplerSettings(engine=self.engine, **kw)
        return create_engine(settings, provider if provider is not None else emt_provider(), atoms)

    def from_checkpoint(self, blob: bytes, provider) -> MDEngine:
        """An engine of the kind under test rebuilt from ``blob`` with ``provider``."""
        return engine_from_checkpoint(blob, provider)

    @staticmethod
    def state(engine: MDEngine):
        return engine.positions(), engine.velocities()

    # -- physics -------------------------------------------------------------------
    def test_nve_conserves_energy(self):
        eng = self.make(ensemble="nve", initial_temperature_K=300.0)
        rec = Recorder()
        report = eng.run(300, on_frame=rec)
        assert report.reason == "max_steps" and report.steps_taken == 300 and eng.step == 300
        assert eng.time_fs == pytest.approx(600.0)
        e = np.array([f.observables.conserved_eV for f in rec.frames])
        n = eng.n_atoms
        assert np.max(np.abs(e - e[0])) / n < NVE_MAX_DEV
        assert abs(eng.energy_drift()) < NVE_MAX_DRIFT
        temps = np.array([f.observables.temperature_K for f in rec.frames])
        assert temps[0] == pytest.approx(300.0, rel=1e-9)
        assert 80 < temps[100:].mean() < 250  # equipartition from a perfect lattice: about T0/2
        ke_pe = np.array([f.observables.kinetic_eV + f.observables.potential_eV for f in rec.frames])
        np.testing.assert_allclose(ke_pe, e, atol=1e-12)  # NVE: no heat
        eng.close()

    def test_nve_conserves_momentum(self):
        eng = self.make(ensemble="nve", initial_temperature_K=500.0)
        rec = Recorder()
        eng.run(100, frame_interval=10, on_frame=rec)
        assert len(rec.frames) == 10
        masses = rec.frames[0].masses
        for f in rec.frames:
            assert np.linalg.norm(masses @ f.velocities) < 1e-9
        eng.close()

    def test_langevin_reaches_target_temperature(self):
        eng = self.make(ensemble="nvt_langevin", temperature_K=500.0, friction=0.05)
        rec = Recorder()
        eng.run(600, on_frame=rec)
        temps = np.array([f.observables.temperature_K for f in rec.frames])
        assert temps[0] == 0.0
        assert abs(temps[200:].mean() - 500.0) < 50.0
        # heat bookkeeping: the conserved quantity stays flat although E_kin + E_pot rose
        e = np.array([f.observables.conserved_eV for f in rec.frames])
        tot = np.array([f.observables.total_eV for f in rec.frames])
        assert tot[-1] - tot[0] > 1.0
        assert np.max(np.abs(e - e[0])) / eng.n_atoms < 2e-3
        eng.close()

    def test_langevin_samples_the_canonical_temperature(self):
        """Kinetic and configurational temperature of an Einstein crystal, from raw velocities and positions.

        BAOAB's full-step velocities are biased by −(ωΔt)²/4 = −0.25 % on a harmonic system and its
        positions are exact (Leimkuhler & Matthews 2013); any second-order scheme stays within that bound.
        """
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
        t0, omega, dt = 300.0, 0.05, 2.0
        provider = EinsteinProvider(atoms, omega)
        eng = self.make(atoms=atoms, provider=provider, ensemble="nvt_langevin", timestep_fs=dt,
                        temperature_K=t0, friction=0.1, initial_temperature_K=t0, seed=23)
        eng.run(250, frame_interval=0)  # equilibrate the positions (relaxation time ~1/ω = 20 fs)
        rec = Recorder()
        eng.run(8000, frame_interval=2, on_frame=rec)  # successive steps are strongly correlated
        eng.close()
        assert len(rec.frames) == 4000
        dof_kb = 3 * len(atoms) * units.kB
        m = atoms.get_masses()[:, None]
        t_kin = np.array([np.sum(m * f.velocities**2) / units.fs**2 / dof_kb for f in rec.frames])
        t_conf = np.array([provider.k * np.sum(min_image(f.positions - provider.sites, f.cell) ** 2) / dof_kb
                           for f in rec.frames])
        bias = (omega * dt) ** 2 / 4
        for name, series in (("kinetic", t_kin), ("configurational", t_conf)):
            mean, se = block_mean_and_error(series / t0, 20)
            assert se < 0.004, f"{name}: standard error {se:.4f} too large for the test to mean anything"
            assert abs(mean - 1.0) < 4 * se + bias, f"{name} ⟨T⟩/T0 = {mean:.4f} ± {se:.4f}"

    @pytest.mark.parametrize("dt", [2.0, 1.5])
    def test_schedule_rescales_at_event_time(self, dt):
        eng = self.make(ensemble="nve", timestep_fs=dt, initial_temperature_K=300.0,
                        schedule=((40.0, 1000.0), (70.0, 50.0)))
        rec = Recorder()
        eng.run(60, on_frame=rec)
        first = next(i for i, f in enumerate(rec.frames) if f.time_fs >= 40.0 - 1e-9)
        assert first == math.ceil(40.0 / dt - 1e-9)
        assert rec.frames[first].observables.temperature_K == pytest.approx(1000.0, rel=1e-9)
        assert rec.frames[first - 1].observables.temperature_K < 500.0
        second = next(i for i, f in enumerate(rec.frames) if f.time_fs >= 70.0 - 1e-9)
        assert rec.frames[second].observables.temperature_K == pytest.approx(50.0, rel=1e-9)
        assert rec.frames[second - 1].observables.temperature_K > 200.0
        # the rescale is heat: the conserved quantity does not jump
        e = np.array([f.observables.conserved_eV for f in rec.frames])
        assert np.max(np.abs(np.diff(e))) < 0.01
        eng.close()

    def test_a_replaced_schedule_applies_what_is_ahead_and_never_repeats_what_passed(self):
        """set_schedule (a run resumed with a changed schedule): an event due at the start of the next
        step is still applied; one whose step has been integrated is not applied again."""
        eng = self.make(ensemble="nve", timestep_fs=6.0, initial_temperature_K=300.0, schedule=((40.0, 1000.0),))
        eng.run(7)  # steps start at 0..36 fs: the event at 40 fs is due at the start of the step from 42 fs
        eng.set_schedule(((40.0, 1000.0), (100.0, 50.0)))
        rec = Recorder()
        eng.run(12, on_frame=rec)
        at = {round(f.time_fs): f.observables.temperature_K for f in rec.frames}
        assert at[42] == pytest.approx(1000.0, rel=1e-9)
        assert at[102] == pytest.approx(50.0, rel=1e-9)
        eng.set_schedule(((40.0, 1000.0), (130.0, 700.0)))  # at 114 fs: 40 fs has passed, 130 fs is ahead
        rec = Recorder()
        eng.run(5, on_frame=rec)
        at = {round(f.time_fs): f.observables.temperature_K for f in rec.frames}
        assert abs(at[114] - 1000.0) > 50.0  # the 40 fs event is not applied again ...
        assert at[132] == pytest.approx(700.0, rel=1e-9)  # ... the one ahead is
        eng.close()

    # -- checkpoint / restore ------------------------------------------------------
    @pytest.mark.parametrize("ensemble", ["nve", "nvt_langevin"])
    def test_checkpoint_restore_is_bit_for_bit(self, ensemble):
        kw = dict(ensemble=ensemble, initial_temperature_K=400.0, temperature_K=400.0, friction=0.02)
        straight = self.make(**kw)
        straight.run(50)
        ref = self.state(straight)

        first = self.make(**kw)
        first.run(20)
        blob = first.checkpoint()
        assert isinstance(blob, bytes)
        first.run(30)
        np.testing.assert_array_equal(self.state(first)[0], ref[0])
        np.testing.assert_array_equal(self.state(first)[1], ref[1])

        again = self.from_checkpoint(blob, emt_provider())
        assert again.step == 20
        again.run(30)
        np.testing.assert_array_equal(again.positions(), ref[0])
        np.testing.assert_array_equal(again.velocities(), ref[1])
        assert again.step == straight.step and again.time_fs == straight.time_fs

        # restore in place into an engine that has moved on
        first.restore(blob)
        assert first.step == 20
        first.run(30)
        np.testing.assert_array_equal(first.positions(), ref[0])
        for e in (straight, first, again):
            e.close()

    def test_checkpoint_of_another_engine_kind_or_garbage_is_invalid(self):
        eng = self.make()
        with pytest.raises(InvalidInput):
            eng.restore(b"not a checkpoint")
        eng.close()

    # -- uncertainty gating --------------------------------------------------------
    def _reference_and_threshold(self, **kw):
        atoms = cu32()
        ref = self.make(atoms=atoms, provider=sigma_provider(atoms), **kw)
        rec = Recorder()
        ref.run(60, on_frame=rec)
        ref.close()
        maxs = np.array([f.force_std.max() for f in rec.frames])
        running = np.maximum.accumulate(maxs)
        k = next(s for s in range(25, 60) if maxs[s] > running[s - 1] * 1.02)
        threshold = 0.5 * (running[k - 1] + maxs[k])
        return atoms, rec.frames, k, threshold

    def test_threshold_stop_on_exactly_the_right_frame(self):
        kw = dict(ensemble="nve", initial_temperature_K=600.0)
        atoms, frames, k, threshold = self._reference_and_threshold(**kw)
        eng = self.make(atoms=atoms, provider=sigma_provider(atoms), **kw)
        rec = Recorder()
        report = eng.run(100, threshold=threshold, on_frame=rec)
        assert report.reason == "uncertain" and report.uncertain
        assert report.step == k and report.steps_taken == k and eng.step == k
        assert len(rec.frames) == k  # frames 0..k-1 were integrated, frame k was not
        assert report.time_fs == pytest.approx(frames[k].time_fs)
        np.testing.assert_allclose(report.frame.positions, frames[k].positions, rtol=0, atol=1e-12)
        expect = np.argwhere(frames[k].force_std > threshold)
        np.testing.assert_array_equal(report.uncertain_components, expect)
        np.testing.assert_array_equal(report.uncertain_atoms, np.unique(expect[:, 0]))
        np.testing.assert_allclose(report.uncertain_std, frames[k].force_std[frames[k].force_std > threshold],
                                   rtol=1e-10)
        assert report.max_std == pytest.approx(frames[k].force_std.max(), rel=1e-10)
        assert report.frame.model_version == 7 and report.frame.noise == 0.05
        assert report.frame.velocities is None and not report.frame.forces_supplied
        # nothing was integrated: asking again stops again at once
        again = eng.run(100, threshold=threshold)
        assert again.reason == "uncertain" and again.step == k and again.steps_taken == 0
        eng.close()

    def test_threshold_on_the_per_atom_sigma_when_the_provider_gives_it(self):
        kw = dict(ensemble="nve", initial_temperature_K=600.0)
        atoms = cu32()
        ref = self.make(atoms=atoms, provider=AtomSigmaProvider(atoms), **kw)
        rec = Recorder()
        ref.run(60, on_frame=rec)
        ref.close()
        frames = rec.frames
        assert all(f.atom_std is not None and f.atom_std.shape == (32,) for f in frames)
        np.testing.assert_allclose(frames[30].atom_std, np.linalg.norm(frames[30].force_std, axis=1), rtol=1e-12)
        maxs = np.array([f.atom_std.max() for f in frames])
        running = np.maximum.accumulate(maxs)
        k = next(s for s in range(20, 60) if maxs[s] > running[s - 1] * 1.01)
        threshold = 0.5 * (running[k - 1] + maxs[k])
        eng = self.make(atoms=atoms, provider=AtomSigmaProvider(atoms), **kw)
        report = eng.run(100, threshold=threshold)
        assert report.reason == "uncertain" and report.step == k
        over = np.flatnonzero(frames[k].atom_std > threshold)
        np.testing.assert_array_equal(report.uncertain_components, np.stack([over, np.full_like(over, -1)], axis=1))
        np.testing.assert_array_equal(report.uncertain_atoms, over)
        np.testing.assert_allclose(report.uncertain_std, frames[k].atom_std[over], rtol=1e-10)
        assert report.max_std == pytest.approx(frames[k].atom_std.max(), rel=1e-10)
        np.testing.assert_allclose(report.frame.atom_std, frames[k].atom_std, rtol=1e-10)
        out = report.frame.to_atoms()  # what the trajectory writer writes
        np.testing.assert_array_equal(out.arrays["atom_std"], report.frame.atom_std)
        assert out.info["max_atom_std"] == report.max_std
        # restored from the checkpoint at the stop: the same prediction stops it again at once
        b = self.from_checkpoint(eng.checkpoint(), AtomSigmaProvider(atoms))
        again = b.run(5, threshold=threshold)
        assert again.reason == "uncertain" and again.step == k and again.steps_taken == 0
        np.testing.assert_array_equal(again.uncertain_atoms, over)
        b.close()
        eng.close()

    def test_supplied_forces_are_used_for_that_step(self):
        kw = dict(ensemble="nve", initial_temperature_K=600.0)
        atoms, frames, k, threshold = self._reference_and_threshold(**kw)
        eng = self.make(atoms=atoms, provider=sigma_provider(atoms), **kw)
        report = eng.run(100, threshold=threshold)
        assert report.step == k
        # "DFT" forces: different from the model's, deterministic
        rng = np.random.default_rng(3)
        f_dft = report.frame.forces * 0.5 + rng.normal(0, 0.3, report.frame.forces.shape)
        dft = ForceResult(energy=report.frame.energy + 0.1, forces=f_dft, model_version=-1)
        rec = Recorder()
        after = eng.run(3, threshold=None, on_frame=rec, forces_for_current_step=dft)
        assert after.reason == "max_steps" and after.steps_taken == 3 and eng.step == k + 3
        fk, fk1 = rec.frames[0], rec.frames[1]
        assert fk.step == k and fk.forces_supplied and not fk1.forces_supplied
        np.testing.assert_array_equal(fk.forces, f_dft)
        assert fk.model_version == -1 and fk1.model_version == 7
        np.testing.assert_allclose(fk.positions, frames[k].positions, atol=1e-12)
        m = fk.masses[:, None]
        dt = 2.0
        # v_k = v_{k-1} + dt/2 (F_{k-1} + F_dft)/m ; x_{k+1} = x_k + dt v_k + dt²/2 F_dft/m
        prev = frames[k - 1]
        v_k = prev.velocities + 0.5 * dt * (prev.forces + f_dft) / m * dyn.ACCEL
        np.testing.assert_allclose(fk.velocities, v_k, rtol=0, atol=1e-10)
        x_next = fk.positions + dt * v_k + 0.5 * dt * dt * f_dft / m * dyn.ACCEL
        np.testing.assert_allclose(min_image(fk1.positions - x_next, fk1.cell), 0.0, atol=1e-10)
        # the model's forces would have given a different step
        x_model = frames[k + 1].positions
        assert np.max(np.abs(min_image(fk1.positions - x_model, fk1.cell))) > 1e-5
        eng.close()

    def test_supply_forces_with_wrong_shape_is_invalid(self):
        eng = self.make()
        with pytest.raises(InvalidInput, match="forces"):
            eng.supply_forces(ForceResult(energy=0.0, forces=np.zeros((3, 3))))
        with pytest.raises(InvalidInput, match="forces"):
            eng.supply_forces(ForceResult(energy=0.0, forces=np.full((32, 3), np.nan)))
        eng.close()

    def test_checkpoint_across_a_gated_stop_is_bit_for_bit(self):
        kw = dict(ensemble="nve", initial_temperature_K=600.0)
        atoms, frames, k, threshold = self._reference_and_threshold(**kw)
        eng = self.make(atoms=atoms, provider=sigma_provider(atoms), **kw)
        report = eng.run(100, threshold=threshold)
        at_stop = eng.checkpoint()
        dft = ForceResult(energy=report.frame.energy, forces=report.frame.forces * 0.9, model_version=-1)
        eng.supply_forces(dft)
        with_supplied = eng.checkpoint()
        eng.run(20)
        ref = self.state(eng)

        a = self.from_checkpoint(at_stop, sigma_provider(atoms))
        again = a.run(5, threshold=threshold)
        assert again.reason == "uncertain" and again.step == k  # same prediction, same stop
        a.run(20, forces_for_current_step=dft)
        b = self.from_checkpoint(with_supplied, sigma_provider(atoms))
        b.run(20)
        for e in (a, b):
            np.testing.assert_array_equal(e.positions(), ref[0])
            np.testing.assert_array_equal(e.velocities(), ref[1])
            e.close()
        eng.close()

    # -- output ----------------------------------------------------------------------
    def test_trajectory_is_extended_xyz_with_sigma(self, tmp_path):
        atoms = cu32()
        eng = self.make(atoms=atoms, provider=sigma_provider(atoms), ensemble="nve", initial_temperature_K=300.0)
        path = tmp_path / "md.xyz"
        with ExtXYZWriter(path) as w:
            eng.run(10, frame_interval=5, on_frame=w)
        back = read_frames(path)
        assert [a.info["step"] for a in back] == [0, 5]
        a = back[1]
        assert a.arrays["force_std"].shape == (32, 3)
        assert a.info["model_version"] == 7 and a.info["time_fs"] == pytest.approx(10.0)
        assert a.info["temperature_K"] > 0 and "conserved_eV" in a.info
        assert a.get_forces().shape == (32, 3) and np.isfinite(a.get_potential_energy())
        assert np.all(a.get_scaled_positions(wrap=False) >= -1e-9)
        eng.close()

    def test_positions_are_wrapped_into_the_cell(self):
        atoms = cu32()
        atoms.positions[0] += atoms.cell[0] * 2.0 - atoms.cell[1]  # an image outside the cell
        eng = self.make(atoms=atoms, ensemble="nve", initial_temperature_K=3000.0)
        eng.run(30)
        frac = np.linalg.solve(eng.cell().T, eng.positions().T).T
        assert np.all(frac >= -1e-12) and np.all(frac < 1 + 1e-12)
        eng.close()

    # -- bad input -------------------------------------------------------------------
    @pytest.mark.parametrize("bad, key", [
        (dict(ensemble="nvt_nose"), "ensemble"),
        (dict(timestep_fs=0.0), "timestep_fs"),
        (dict(timestep_fs=-1.0), "timestep_fs"),
        (dict(temperature_K=-5.0), "temperature_K"),
        (dict(ensemble="nvt_langevin", friction=0.0), "friction"),
        (dict(schedule=((10.0, 300.0), (5.0, 100.0))), "schedule"),
        (dict(schedule=((10.0, -1.0),)), "schedule"),
        (dict(timestep_fs=float("nan")), "timestep_fs"),
        (dict(seed=-1), "seed"),
    ])
    def test_bad_settings_are_invalid_input(self, bad, key):
        with pytest.raises(InvalidInput, match=key):
            self.make(**bad)

    def test_nan_in_structure_is_invalid_input(self):
        atoms = cu32()
        atoms.positions[3, 1] = np.nan
        with pytest.raises(InvalidInput, match="NaN"):
            self.make(atoms=atoms)

    def test_bad_run_arguments_are_invalid_input(self):
        eng = self.make()
        with pytest.raises(InvalidInput, match="max_steps"):
            eng.run(-1)
        with pytest.raises(InvalidInput, match="threshold"):
            eng.run(1, threshold=-0.1)
        eng.close()

    def test_set_timestep_applies_from_the_next_step(self):
        eng = self.make(ensemble="nve", initial_temperature_K=300.0)
        eng.run(10)
        eng.set_timestep(0.5)
        eng.run(4)
        assert eng.time_fs == pytest.approx(22.0)
        assert eng.settings.timestep_fs == 0.5
        eng.close()

    def test_nve_on_a_triclinic_rotated_cell(self):
        """A general (non-lower-triangular) cell: forces must be rotated consistently (energy is conserved)."""
        atoms = bulk("Cu", "fcc", a=3.61).repeat((3, 3, 3))  # primitive FCC: 60° cell
        atoms.rotate(30, "z", rotate_cell=True)
        atoms.rotate(20, "x", rotate_cell=True)
        eng = self.make(atoms=atoms, ensemble="nve", initial_temperature_K=300.0)
        rec = Recorder()
        eng.run(100, frame_interval=5, on_frame=rec)
        e = np.array([f.observables.conserved_eV for f in rec.frames])
        assert np.max(np.abs(e - e[0])) / len(atoms) < NVE_MAX_DEV
        frac = np.linalg.solve(eng.cell().T, eng.positions().T).T
        assert np.all(frac >= -1e-9) and np.all(frac < 1 + 1e-9)
        np.testing.assert_allclose(eng.cell(), atoms.cell.array)
        eng.close()

    def test_a_failing_provider_or_callback_leaves_a_resumable_state(self):
        kw = dict(ensemble="nve", initial_temperature_K=400.0)
        ref = self.make(**kw)
        ref.run(30)
        eng = self.make(provider=FlakyProvider(), **kw)
        with pytest.raises(CalculationFailed, match="went away"):
            eng.run(30)
        assert eng.step == 14
        eng.run(30 - eng.step)
        np.testing.assert_allclose(eng.positions(), ref.positions(), atol=1e-12)

        def bad_callback(frame):
            if frame.step == 40:
                raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            eng.run(20, on_frame=bad_callback)
        ref.run(20)
        eng.run(ref.step - eng.step)
        np.testing.assert_allclose(eng.positions(), ref.positions(), atol=1e-12)
        for e in (eng, ref):
            e.close()

    def test_request_stop_cancels_before_the_next_step_and_resumes_exactly(self):
        kw = dict(ensemble="nve", initial_temperature_K=400.0)
        ref = self.make(**kw)
        ref.run(30)
        eng = self.make(**kw)

        def stop_at_7(frame):
            if frame.step == 7:
                eng.request_stop()

        report = eng.run(30, on_frame=stop_at_7)
        assert report.reason == "cancelled" and report.step == 8 and report.steps_taken == 8
        eng.run(22)
        np.testing.assert_array_equal(eng.positions(), ref.positions())
        eng.request_stop()  # with no run active: the next run returns at once
        assert eng.run(5).reason == "cancelled" and eng.step == 30
        assert eng.run(1).reason == "max_steps"
        for e in (eng, ref):
            e.close()

    def test_atoms_snapshot_and_image_flags(self):
        from ase import units

        eng = self.make(ensemble="nve")
        eng.set_velocities(np.tile([0.05, 0.0, 0.0], (32, 1)))
        x0 = eng.positions()
        eng.run(100)  # 10 Å along x in a 7.22 Å cell
        unwrapped = eng.positions() + eng.images @ eng.cell()
        np.testing.assert_allclose((unwrapped - x0)[:, 0], 10.0, atol=1e-6)
        a = eng.atoms()
        assert len(a) == 32 and list(a.numbers) == [29] * 32
        np.testing.assert_allclose(a.get_velocities() * units.fs, eng.velocities())
        np.testing.assert_allclose(a.get_masses(), eng.masses)
        eng.close()
