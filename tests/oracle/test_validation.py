"""Every validation rule rejects bad input with a message naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from oracle_service.backends.analytic import EMTOracle, LennardJonesOracle
from oracle_service.validation import (
    Limits,
    atoms_from_arrays,
    check_cheap,
    check_geometry,
    close_pairs,
    validate_structure,
)
from protos.errors import InvalidInput


@pytest.fixture
def copper() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.positions += np.random.default_rng(3).normal(0, 0.03, atoms.positions.shape)
    return atoms


def reject(atoms, match, limits=Limits(), oracle=None, properties=()):
    with pytest.raises(InvalidInput, match=match):
        validate_structure(atoms, limits, oracle, properties)


# ---------------------------------------------------------------------------
# valid structures pass


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Cu", "fcc", a=3.61),  # primitive, triclinic-looking cell
        bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3),
        fcc111("Al", size=(2, 2, 3), vacuum=8.0),  # pbc (T, T, F)
        molecule("H2O"),  # no cell at all
        Atoms("Ar", positions=[[0, 0, 0]], cell=[5, 5, 5], pbc=True),
        Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[[5.2, 0, 0], [0, 0, 0], [0, 0, 0]],
              pbc=[True, False, False]),  # a chain
    ],
    ids=["primitive", "cubic-3x3x3", "slab", "molecule", "single-atom", "chain"],
)
def test_valid_structures_pass(atoms):
    validate_structure(atoms, Limits(), None, ("energy", "forces"))


# ---------------------------------------------------------------------------
# finiteness


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_position_names_the_atom(copper, bad):
    copper.positions[5, 1] = bad
    copper.positions[9, 0] = bad
    reject(copper, r"position of atom 5 is not finite.*\(1 more atoms\)")


def test_nan_in_cell_names_the_vector(copper):
    cell = copper.cell.array.copy()
    cell[1, 2] = np.nan
    copper.cell.array[:] = cell  # bypass ASE's setter
    reject(copper, r"cell vector 1 is not finite")


def test_non_finite_magnetic_moment_names_the_atom(copper):
    moments = np.zeros(len(copper))
    moments[4] = np.nan
    copper.set_initial_magnetic_moments(moments)
    reject(copper, r"initial_magmoms of atom 4 is not finite")


# ---------------------------------------------------------------------------
# cell and pbc


def test_coplanar_periodic_cell_is_singular():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True)
    reject(atoms, r"cell is singular: cell vectors 0, 1, 2 are coplanar \(\|det\| = 0")


def test_nearly_singular_cell_is_rejected():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 1e-8]], pbc=True)
    reject(atoms, r"cell is singular")


def test_parallel_periodic_vectors_are_singular():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 0]],
                  pbc=[True, True, False])
    reject(atoms, r"cell vectors 0, 1 are parallel")


def test_periodic_axis_with_zero_vector_is_inconsistent():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[[5, 0, 0], [0, 5, 0], [0, 0, 0]],
                  pbc=True)
    reject(atoms, r"axis z \(cell vector 2\) is periodic but cell vector 2 is zero")


def test_stress_needs_a_cell_with_volume():
    reject(molecule("H2O"), r"stress requested but cell vector\(s\) \[0, 1, 2\] are zero",
           properties=("energy", "stress"))


# ---------------------------------------------------------------------------
# atoms and elements


@pytest.mark.parametrize("z, atom", [(0, 2), (119, 7), (-3, 0)])
def test_atomic_number_out_of_range_names_the_atom(copper, z, atom):
    numbers = copper.numbers.copy()
    numbers[atom] = z
    copper.arrays["numbers"] = numbers  # bypass ASE's symbol checks
    reject(copper, rf"atomic number {z} of atom {atom} is outside 1\.\.118")


def test_unsupported_elements_are_named_by_symbol(copper):
    copper.numbers[3] = 26  # Fe
    copper.numbers[10] = 30  # Zn
    reject(copper, r"backend 'emt' cannot treat element\(s\) Fe \(Z=26\), Zn \(Z=30\) \(first at atom 3\)",
           oracle=EMTOracle())


def test_any_element_backend_accepts_everything(copper):
    copper.numbers[3] = 26
    validate_structure(copper, Limits(), LennardJonesOracle())


def test_too_many_atoms(copper):
    reject(copper, r"structure has 32 atoms; this oracle accepts at most 31", limits=Limits(max_atoms=31))


def test_empty_structure():
    reject(Atoms(), r"structure has 0 atoms; at least 1 required")


def test_not_an_atoms_object():
    with pytest.raises(InvalidInput, match="expected an ase.Atoms structure, got dict"):
        check_cheap({"positions": []})


# ---------------------------------------------------------------------------
# minimum distance


def test_close_pair_is_named_with_distance(copper):
    copper.positions[7] = copper.positions[3] + [0.2, 0.1, 0.0]
    reject(copper, r"atoms 3 \(Cu\) and 7 \(Cu\) are 0\.2236 Å apart, closer than the minimum distance 0\.5 Å")


def test_closest_pair_is_reported_first_and_others_counted(copper):
    copper.positions[7] = copper.positions[3] + [0.3, 0.0, 0.0]
    copper.positions[12] = copper.positions[20] + [0.0, 0.1, 0.0]
    reject(copper, r"atoms 12 \(Cu\) and 20 \(Cu\) are 0\.1 Å apart.*\(1 more pair\(s\) too close\)")


def test_close_pair_across_the_periodic_boundary():
    atoms = Atoms("CuAu", positions=[[0.1, 5, 5], [9.8, 5, 5]], cell=[10, 10, 10], pbc=True)
    reject(atoms, r"atoms 0 \(Cu\) and 1 \(Au\) are 0\.3 Å apart \(through periodic boundaries\)")
    atoms.pbc = False  # without pbc they are 9.7 Å apart
    validate_structure(atoms)


def test_atoms_outside_the_cell_are_wrapped_for_the_distance():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [20.2, 0, 0]], cell=[10, 10, 10], pbc=True)
    reject(atoms, r"atoms 0 \(Cu\) and 1 \(Cu\) are 0\.2 Å apart")


def test_tiny_periodic_cell_clashes_with_own_image():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[0.3, 5, 5], pbc=True)
    reject(atoms, r"atom 0 \(Cu\) is 0\.3 Å from its own periodic image.*cell is too small")


def test_min_distance_is_configurable(copper):
    copper.positions[7] = copper.positions[3] + [0.8, 0.0, 0.0]
    validate_structure(copper)  # 0.8 Å is fine with the default 0.5 Å
    reject(copper, r"are 0\.8 Å apart, closer than the minimum distance 1 Å", limits=Limits(min_distance=1.0))
    copper.positions[7] = copper.positions[3]
    validate_structure(copper, Limits(min_distance=0.0))  # 0 disables the check


def test_geometry_check_handles_ten_thousand_atoms():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((14, 14, 13))  # 10,192 atoms
    atoms.positions += np.random.default_rng(5).normal(0, 0.05, atoms.positions.shape)
    check_geometry(atoms, Limits())
    atoms.positions[9000] = atoms.positions[4321] + [0.0, 0.0, 0.25]
    with pytest.raises(InvalidInput, match=r"atoms 4321 \(Cu\) and 9000 \(Cu\) are 0\.25 Å apart"):
        check_geometry(atoms, Limits())


@pytest.mark.parametrize("seed", range(6))
def test_close_pairs_agree_with_ase_neighbor_list(seed):
    """Random triclinic cells, mixed pbc, atoms inside and outside the cell."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        cell = np.diag(rng.uniform(2.0, 6.0, 3)) + rng.normal(0.0, 0.8, (3, 3))
        if abs(np.linalg.det(cell)) < 2.0:
            continue  # nearly flat: the reference search would be slow (see the skewed-cell test)
        pbc = rng.random(3) < 0.6
        cell[(~pbc) & (rng.random(3) < 0.5)] = 0.0
        n = int(rng.integers(1, 40))
        positions = rng.uniform(-3.0, 9.0, (n, 3))
        cutoff = float(rng.uniform(0.3, 1.6))
        atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        expected = {(min(a, b), max(a, b), round(x, 9)) for a, b, x in zip(i.tolist(), j.tolist(), d.tolist())}
        found = close_pairs(positions, cell, pbc, cutoff)
        got = set(zip(found.i.tolist(), found.j.tolist(), np.round(found.d, 9).tolist()))
        assert got == expected, (pbc, cutoff)


def test_close_pairs_do_not_depend_on_the_choice_of_lattice_basis():
    """A very skewed basis of the same lattice finds the same pairs (and stays fast)."""
    rng = np.random.default_rng(8)
    a, b, c = np.diag([3.0, 4.0, 5.0])
    skewed = np.array([a, b + 7 * a, c + 5 * b - 3 * a])  # same lattice, |det| unchanged
    positions = rng.uniform(0.0, 6.0, (40, 3))
    reference = close_pairs(positions, np.array([a, b, c]), True, 1.2)
    found = close_pairs(positions, skewed, True, 1.2)
    as_set = lambda p: set(zip(p.i.tolist(), p.j.tolist(), np.round(p.d, 9).tolist()))  # noqa: E731
    assert as_set(found) == as_set(reference) and len(as_set(reference)) > 0


def test_shortest_period_sees_through_a_skewed_basis():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[[10, 0, 0], [9.9, 0.3, 0], [0, 0, 10]], pbc=True)
    reject(atoms, r"atom 0 \(Cu\) is 0\.3162 Å from its own periodic image")


# ---------------------------------------------------------------------------
# raw arrays (as decoded from the wire)


def test_atoms_from_arrays_builds_atoms():
    atoms = atoms_from_arrays([29, 29], np.arange(6.0), np.eye(3).ravel() * 5, [1, 1, 0],
                              initial_magmoms=[0.5, -0.5])
    assert atoms.get_chemical_symbols() == ["Cu", "Cu"]
    assert atoms.positions.shape == (2, 3) and atoms.pbc.tolist() == [True, True, False]
    np.testing.assert_array_equal(atoms.get_initial_magnetic_moments(), [0.5, -0.5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"numbers": [[29, 29]]}, r"atomic numbers must be a 1-D array, got shape \(1, 2\)"),
        ({"numbers": [29, 29.5]}, r"atomic number of atom 1 is not an integer: 29\.5"),
        ({"numbers": ["Cu", "Cu"]}, r"atomic numbers must be integers"),
        ({"positions": np.zeros((2, 2))}, r"positions must have shape \(n_atoms, 3\) = \(2, 3\).*got \(2, 2\)"),
        ({"positions": np.zeros((3, 3))}, r"positions must have shape .*2 atomic numbers, got \(3, 3\)"),
        ({"positions": [["a", "b", "c"]] * 2}, r"positions must be an array of numbers"),
        ({"cell": np.eye(2)}, r"cell must have shape \(3, 3\).*got \(2, 2\)"),
        ({"pbc": [True, False]}, r"pbc must be a bool or 3 bools, got shape \(2,\)"),
        ({"pbc": [0, 1, 2]}, r"pbc must be booleans"),
        ({"positions": [[0, 0, 0], [np.nan, 0, 0]]}, r"position of atom 1 is not finite"),
        ({"numbers": [29, 200]}, r"atomic number 200 of atom 1 is outside 1\.\.118"),
        ({"initial_magmoms": [1.0]}, r"initial_magmoms must have shape \(2,\), got \(1,\)"),
    ],
)
def test_atoms_from_arrays_rejects(kwargs, message):
    args = {"numbers": [29, 29], "positions": [[0, 0, 0], [2.5, 0, 0]], "cell": None, "pbc": False}
    args.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        atoms_from_arrays(**args)


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="min_distance"):
        Limits(min_distance=-1.0)
    with pytest.raises(ValueError, match="max_atoms"):
        Limits(max_atoms=0)
