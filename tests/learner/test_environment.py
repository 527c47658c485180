"""Neighbour lists and triplets under periodic boundary conditions."""

import numpy as np
import pytest
from ase import Atoms

from learner_service.environment import Cutoffs, build_environments
from protos.errors import InvalidInput

from . import reference as ref


def _small_triclinic(seed=0):
    rng = np.random.default_rng(seed)
    cell = np.array([[3.1, 0.0, 0.0], [0.9, 2.9, 0.0], [-0.6, 0.5, 3.3]])  # far below 2 x 6 Å
    pos = rng.uniform(0, 1, (3, 3)) @ cell + rng.normal(0, 2.0, (3, 3))  # some outside the cell
    return pos, np.array([13, 29, 13]), cell


def test_small_cell_neighbours_and_triplets_match_brute_force_images():
    pos, nums, cell = _small_triclinic()
    cut = Cutoffs.create([13, 29], (6.0, 4.0))
    b = build_environments(pos, nums, cell, [True] * 3, cut)
    for e in range(3):
        want = ref.brute_environment(pos, nums, cell, e, 6.0, 4.0, n_img=4)
        r = b.bond_r[b.bond_offsets[e]:b.bond_offsets[e + 1]]
        np.testing.assert_allclose(np.sort(r), sorted(x[0] for x in want["bonds"]), atol=1e-10)
        # images of the atom itself are neighbours
        atoms_seen = b.bond_atom[b.bond_offsets[e]:b.bond_offsets[e + 1]]
        assert (atoms_seen == e).sum() > 1
        t = b.trip_r[b.trip_offsets[e]:b.trip_offsets[e + 1]]
        got = np.sort(np.sort(t[:, :2], axis=1), axis=0)
        exp = np.sort(np.sort(np.array([x[:2] for x in want["triplets"]]), axis=1), axis=0)
        assert len(t) == len(want["triplets"])
        np.testing.assert_allclose(got, exp, atol=1e-10)
        np.testing.assert_allclose(np.sort(t[:, 2]), np.sort([x[2] for x in want["triplets"]]), atol=1e-10)


def test_small_cell_environment_equals_explicit_supercell():
    pos, nums, cell = _small_triclinic(1)
    cut = Cutoffs.create([13, 29], (6.0, 4.0))
    small = Atoms(nums, positions=pos, cell=cell, pbc=True)
    big = small.repeat((4, 4, 4))
    b1 = build_environments(small.positions, small.numbers, small.cell.array, small.pbc, cut, [1])
    b2 = build_environments(big.positions, big.numbers, big.cell.array, big.pbc, cut, [1])
    np.testing.assert_allclose(np.sort(b1.bond_r), np.sort(b2.bond_r), atol=1e-9)
    np.testing.assert_allclose(np.sort(b1.trip_F), np.sort(b2.trip_F), rtol=1e-9)


def test_pair_cutoffs_and_species():
    cut = Cutoffs.create([13, 29], (5.0, 4.0), {"twobody": {(13, 29): 3.0}})
    atoms = Atoms([13, 29, 13], positions=[[0, 0, 0], [3.5, 0, 0], [0, 1.5, 0]])
    b = build_environments(atoms.positions, atoms.numbers, np.zeros((3, 3)), [False] * 3, cut, [0])
    assert b.bond_atom.tolist() == [2]  # Cu at 3.5 Å is beyond the Al–Cu cutoff of 3 Å
    assert b.bond_rc.tolist() == [5.0]
    # ... but inside the 3-body cutoff: (Al centre, Al, Cu) as species indices
    assert b.trip_species.tolist() == [[0, 0, 1]]
    with pytest.raises(InvalidInput, match="atomic number \\[8\\]"):
        build_environments(atoms.positions, [13, 8, 13], np.zeros((3, 3)), [False] * 3, cut)


def test_triplets_need_the_cross_bond_inside_the_cutoff():
    cut = Cutoffs.create([13], (6.0, 3.0))
    # centre at origin, neighbours at 2.5 Å on opposite sides: cross bond 5 Å > r3
    atoms = Atoms([13] * 3, positions=[[0, 0, 0], [2.5, 0, 0], [-2.5, 0, 0]])
    b = build_environments(atoms.positions, atoms.numbers, np.zeros((3, 3)), [False] * 3, cut, [0])
    assert b.n_bonds.tolist() == [2] and b.n_triplets.tolist() == [0]


def test_bad_structures_are_invalid_input():
    cut = Cutoffs.create([13], (5.0, 3.0))
    with pytest.raises(InvalidInput):
        build_environments([[0, 0, np.nan]], [13], np.eye(3) * 4, [True] * 3, cut)
    with pytest.raises(InvalidInput):
        build_environments([[0, 0, 0]], [13], np.zeros((3, 3)), [True] * 3, cut)
    with pytest.raises(InvalidInput):
        Cutoffs.create([13], (-1.0, 3.0))
