"""The shared structure validator (protos.structures) and its neighbour search."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from protos.errors import InvalidInput
from protos.structures import (
    StructureLimits,
    check_min_distance,
    check_structure,
    close_pairs,
    isolated_atoms,
)


def al32(rattle: float = 0.02) -> Atoms:
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.rattle(rattle, seed=3)
    return atoms


def brute_pairs(atoms: Atoms, cutoff: float) -> set:
    """(i, j) pairs with i <= j closer than cutoff, through images up to 3 cells away."""
    out = set()
    rng = range(-3, 4)
    shifts = [np.array([a, b, c]) for a in rng for b in rng for c in rng]
    shifts = [s * atoms.pbc for s in shifts]
    for i, p in enumerate(atoms.positions):
        for j, q in enumerate(atoms.positions):
            for s in shifts:
                if i == j and not s.any():
                    continue
                if np.linalg.norm(q + s @ atoms.cell.array - p) < cutoff:
                    out.add((min(i, j), max(i, j)))
    return out


def test_good_structure_passes() -> None:
    check_structure(al32(), StructureLimits(species={13}))
    check_structure((al32().numbers, al32().positions, al32().cell.array, True), StructureLimits())


def test_close_atoms_across_the_periodic_boundary_are_named() -> None:
    atoms = Atoms("Al2", positions=[[0.1, 1, 1], [3.9, 1, 1]], cell=[4, 4, 4], pbc=True)
    with pytest.raises(InvalidInput, match=r"items\[2\]\.structure: atoms 0 \(Al\) and 1 \(Al\) are 0\.2 Å apart "
                                           r"\(through periodic boundaries\), closer than the minimum distance 0\.5 Å"):
        check_structure(atoms, StructureLimits(), "items[2].structure")
    atoms.pbc = False  # 3.8 Å apart without images
    check_structure(atoms, StructureLimits())


def test_atoms_on_the_same_site() -> None:
    atoms = al32()
    atoms.positions[5] = atoms.positions[9]
    with pytest.raises(InvalidInput, match=r"atoms 5 \(Al\) and 9 \(Al\) are 0 Å apart"):
        check_structure(atoms)


def test_small_cell_atom_close_to_its_own_image() -> None:
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[0.3, 5, 5], pbc=True)
    with pytest.raises(InvalidInput, match=r"0\.3 Å from its own periodic image.*cell is too small"):
        check_structure(atoms)
    atoms.pbc = [False, True, True]  # no longer periodic along the short axis
    check_structure(atoms)
    # a 1.0 Å cell is fine for 0.5 Å but not for 1.2 Å
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[1.0, 5, 5], pbc=True)
    check_structure(atoms)
    with pytest.raises(InvalidInput, match="own periodic image"):
        check_structure(atoms, StructureLimits(min_distance=1.2))


def test_triclinic_cell_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    cell = np.array([[5.0, 0, 0], [4.2, 3.0, 0], [1.0, 2.5, 4.0]])  # strongly sheared
    atoms = Atoms("Cu12", cell=cell, pbc=True, scaled_positions=rng.random((12, 3)))
    cutoff = 1.8
    pairs = close_pairs(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    got = {(int(i), int(j)) for i, j in zip(pairs.i, pairs.j)}
    assert got == brute_pairs(atoms, cutoff)
    d_min = min(np.linalg.norm(atoms.positions[j] - atoms.positions[i] + s @ cell)
                for i in range(12) for j in range(12)
                for s in np.array(np.meshgrid(*[range(-3, 4)] * 3)).reshape(3, -1).T
                if i != j or s.any())
    check_structure(atoms, StructureLimits(min_distance=0.999 * d_min))
    with pytest.raises(InvalidInput, match=f"{d_min:.4g} Å"):
        check_structure(atoms, StructureLimits(min_distance=1.001 * d_min))


def test_non_periodic_and_mixed_pbc() -> None:
    atoms = Atoms("C2", positions=[[0, 0, 0], [0.4, 0, 0]])
    with pytest.raises(InvalidInput, match=r"atoms 0 \(C\) and 1 \(C\) are 0\.4 Å apart, closer"):
        check_structure(atoms)
    check_structure(atoms, StructureLimits(min_distance=0))  # 0 disables
    slab = Atoms("C2", positions=[[0, 0, 0.2], [0, 0, 9.8]], cell=[3, 3, 10], pbc=[True, True, False])
    check_structure(slab)  # 9.6 Å apart: z is not periodic


def test_species_and_atom_limits() -> None:
    atoms = al32()
    atoms.numbers[7] = 29
    with pytest.raises(InvalidInput, match=r"Cu \(Z=29\) not in the model's species \(first at atom 7\); "
                                           r"the model's species are Al \(Z=13\)"):
        check_structure(atoms, StructureLimits(species={13}))
    check_structure(atoms, StructureLimits(species={13, 29}))
    with pytest.raises(InvalidInput, match=r"structure: 32 atoms; at most 31 accepted \(the atom limit\)"):
        check_structure(atoms, StructureLimits(max_atoms=31))


def test_numbers_finiteness_cell_and_periodicity() -> None:
    atoms = al32()
    with pytest.raises(InvalidInput, match="atomic number of atom 0 is not an integer: 29.5"):
        check_structure((np.r_[29.5, atoms.numbers[1:]], atoms.positions, atoms.cell.array, True))
    with pytest.raises(InvalidInput, match="atomic number 200 of atom 1 is outside 1..118"):
        check_structure((np.r_[13, 200, atoms.numbers[2:]], atoms.positions, atoms.cell.array, True))
    pos = atoms.positions.copy()
    pos[4, 1] = np.nan
    with pytest.raises(InvalidInput, match="position of atom 4 is not finite"):
        check_structure((atoms.numbers, pos, atoms.cell.array, True))
    with pytest.raises(InvalidInput, match="axis y is periodic but cell vector 1 is zero"):
        check_structure((atoms.numbers, atoms.positions, np.diag([8.1, 0, 8.1]), True))
    with pytest.raises(InvalidInput, match="cell is singular"):
        check_structure((atoms.numbers, atoms.positions, [[8, 0, 0], [16, 0, 0], [0, 0, 8]], True))
    with pytest.raises(InvalidInput, match="periodic in all three directions"):
        check_structure(Atoms("H", cell=[5, 5, 5], pbc=[True, True, False]), StructureLimits(require_periodic=True))


def test_isolated_atoms() -> None:
    atoms = Atoms("Al3", positions=[[0, 0, 0], [2.8, 0, 0], [20, 0, 0]], cell=[40, 40, 40], pbc=True)
    assert isolated_atoms(atoms.positions, atoms.cell.array, atoms.pbc, 5.0).tolist() == [2]
    assert isolated_atoms(atoms.positions, atoms.cell.array, atoms.pbc, 5.0, [0, 1]).tolist() == []
    # a single atom in a small periodic cell has its own images as neighbours
    one = Atoms("Al", cell=[4, 4, 4], pbc=True)
    assert isolated_atoms(one.positions, one.cell.array, one.pbc, 5.0).tolist() == []


def test_min_distance_message_without_a_name_is_the_oracles() -> None:
    with pytest.raises(InvalidInput, match=r"^atoms 0 \(\?\) and 1 \(\?\) are 0\.1 Å apart"):
        check_min_distance([[0, 0, 0], [0.1, 0, 0]], np.zeros((3, 3)), False, 0.5)
