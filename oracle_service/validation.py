"""Input checks run before an oracle does any work.

Every rejected structure raises :class:`protos.errors.InvalidInput` with a
message that names the offending atom, axis or value, so the user can fix
the request (the servicer turns it into ``INVALID_ARGUMENT`` verbatim).

Two stages, so the labelling core can put the content-hash cache between
them:

* :func:`check_cheap` -- O(n) array checks: shapes, finiteness, atomic
  numbers, atom count, cell/pbc consistency, elements the backend treats,
  whether the cell allows the requested properties (stress needs a volume).
* :func:`check_geometry` -- the minimum interatomic distance under periodic
  boundary conditions, with periodic images (k-d tree, fast for 10^4 atoms;
  the shared search of :mod:`protos.structures`).

:func:`validate_structure` runs both.  :func:`atoms_from_arrays` builds an
:class:`ase.Atoms` from raw arrays (as decoded from the wire) and rejects
wrong shapes and dtypes first.

Units: positions and cell in Å.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from protos.errors import InvalidInput
# the neighbour search lives in protos.structures (shared by every service); re-exported here
from protos.structures import (  # noqa: F401
    ClosePairs,
    check_min_distance,
    close_pairs,
    reduced_cell,
    shortest_period,
    _close_pairs_ase,
    _complete_cell,
)

from .base import Oracle

#: largest atomic number accepted (oganesson)
MAX_ATOMIC_NUMBER = 118


@dataclass(frozen=True)
class Limits:
    """Limits applied to every structure before it reaches a backend.

    min_distance: Å; two atoms (or an atom and a periodic image of any atom,
        itself included) closer than this are rejected.  ``0`` disables.
    max_atoms: structures with more atoms are rejected.
    min_atoms: structures with fewer atoms are rejected (an empty structure
        has nothing to label).
    cell_tolerance: relative tolerance for a degenerate cell: the non-zero
        cell vectors are rejected as linearly dependent when the smallest
        singular value of the (row-normalised) cell is below it.
    zero_vector: Å; a cell vector shorter than this counts as "zero".
    """

    min_distance: float = 0.5
    max_atoms: int = 20_000
    min_atoms: int = 1
    cell_tolerance: float = 1e-6
    zero_vector: float = 1e-8

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_distance) and self.min_distance >= 0):
            raise ValueError(f"min_distance must be finite and >= 0 Å, got {self.min_distance}")
        if self.max_atoms < 1 or self.min_atoms < 0 or self.min_atoms > self.max_atoms:
            raise ValueError(f"need 0 <= min_atoms <= max_atoms and max_atoms >= 1, got {self}")
        if not 0 < self.cell_tolerance < 1:
            raise ValueError(f"cell_tolerance must be in (0, 1), got {self.cell_tolerance}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# raw arrays -> Atoms


def atoms_from_arrays(
    numbers: Any,
    positions: Any,
    cell: Any = None,
    pbc: Any = False,
    *,
    initial_magmoms: Any = None,
    initial_charges: Any = None,
) -> Atoms:
    """Build :class:`ase.Atoms` from raw arrays, rejecting bad shapes/dtypes.

    numbers: (n,) integers; positions: (n, 3) Å (or flat (3n,));
    cell: (3, 3) Å (or flat (9,)), or ``None``/empty for no cell;
    pbc: bool or (3,) bools.  Optional per-atom ``initial_magmoms`` (n,)
    and ``initial_charges`` (n,).
    """
    numbers_arr = np.asarray(numbers)
    if numbers_arr.ndim != 1:
        raise InvalidInput(f"atomic numbers must be a 1-D array, got shape {numbers_arr.shape}")
    n = numbers_arr.shape[0]
    if numbers_arr.dtype.kind == "f":
        if not np.all(np.isfinite(numbers_arr)) or np.any(numbers_arr != np.round(numbers_arr)):
            bad = int(np.flatnonzero(~np.isfinite(numbers_arr) | (numbers_arr != np.round(numbers_arr)))[0])
            raise InvalidInput(f"atomic number of atom {bad} is not an integer: {float(numbers_arr[bad])!r}")
    elif numbers_arr.dtype.kind not in "iub" and n > 0:
        raise InvalidInput(f"atomic numbers must be integers, got dtype {numbers_arr.dtype}")
    numbers_arr = numbers_arr.astype(np.int64) if n else np.zeros(0, np.int64)

    pos = _float_array("positions", positions) if np.size(positions) else np.zeros((0, 3))
    if pos.ndim == 1 and pos.shape[0] == 3 * n:
        pos = pos.reshape(n, 3)
    if pos.shape != (n, 3):
        raise InvalidInput(
            f"positions must have shape (n_atoms, 3) = ({n}, 3) to match {n} atomic numbers, "
            f"got {pos.shape}"
        )

    if cell is None or np.size(cell) == 0:
        cell_arr = np.zeros((3, 3))
    else:
        cell_arr = _float_array("cell", cell)
        if cell_arr.shape == (9,):
            cell_arr = cell_arr.reshape(3, 3)
        if cell_arr.shape != (3, 3):
            raise InvalidInput(f"cell must have shape (3, 3) (Å, one lattice vector per row), got {cell_arr.shape}")

    pbc_arr = np.asarray(pbc)
    if pbc_arr.ndim == 0:
        pbc_arr = np.repeat(pbc_arr, 3)
    if pbc_arr.shape != (3,):
        raise InvalidInput(f"pbc must be a bool or 3 bools, got shape {pbc_arr.shape}")
    if pbc_arr.dtype.kind not in "biu" or np.any((pbc_arr != 0) & (pbc_arr != 1)):
        raise InvalidInput(f"pbc must be booleans, got {pbc_arr.tolist()!r}")

    _check_numbers(numbers_arr)
    _check_finite_positions(pos)
    _check_finite_cell(cell_arr)

    atoms = Atoms(numbers=numbers_arr, positions=pos, cell=cell_arr, pbc=pbc_arr.astype(bool))
    for name, values in (("initial_magmoms", initial_magmoms), ("initial_charges", initial_charges)):
        if values is None or np.size(values) == 0:
            continue
        arr = _float_array(name, values)
        if arr.shape != (n,):
            raise InvalidInput(f"{name} must have shape ({n},), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise InvalidInput(f"{name} of atom {bad} is not finite: {arr[bad]!r}")
        atoms.set_array(name, arr)
    return atoms


def _float_array(name: str, values: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be an array of numbers: {exc}") from None


# ---------------------------------------------------------------------------
# the two stages


def validate_structure(
    atoms: Atoms,
    limits: Limits = Limits(),
    oracle: Oracle | None = None,
    properties: Iterable[str] = (),
) -> None:
    """Run every check; raise :class:`InvalidInput` on the first failure."""
    check_cheap(atoms, limits, oracle, properties)
    check_geometry(atoms, limits)


def check_cheap(
    atoms: Atoms,
    limits: Limits = Limits(),
    oracle: Oracle | None = None,
    properties: Iterable[str] = (),
) -> None:
    """O(n) checks: shapes, finiteness, numbers, size, cell/pbc, elements, properties."""
    if not isinstance(atoms, Atoms):
        raise InvalidInput(f"expected an ase.Atoms structure, got {type(atoms).__name__}")
    numbers = np.asarray(atoms.numbers)
    positions = np.asarray(atoms.positions)
    n = len(numbers)
    if positions.shape != (n, 3):
        raise InvalidInput(f"positions must have shape ({n}, 3), got {positions.shape}")
    if n < limits.min_atoms:
        raise InvalidInput(f"structure has {n} atoms; at least {limits.min_atoms} required")
    if n > limits.max_atoms:
        raise InvalidInput(f"structure has {n} atoms; this oracle accepts at most {limits.max_atoms}")
    _check_numbers(numbers)
    _check_finite_positions(positions)
    cell = np.asarray(atoms.cell.array, dtype=float)
    _check_finite_cell(cell)
    _check_cell_and_pbc(cell, np.asarray(atoms.pbc, dtype=bool), limits)
    for name in ("initial_magmoms", "initial_charges"):
        if name in atoms.arrays:
            arr = np.asarray(atoms.arrays[name], dtype=float)
            if arr.ndim >= 1 and not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr).reshape(n, -1).all(axis=1))[0])
                raise InvalidInput(f"{name} of atom {bad} is not finite")
    if oracle is not None:
        _check_elements(numbers, oracle)
    if "stress" in tuple(properties):
        _check_stress_possible(cell, limits)


def check_geometry(atoms: Atoms, limits: Limits = Limits()) -> None:
    """Reject atoms closer than ``limits.min_distance`` (periodic images included).

    The message names the closest pair, its distance and how many pairs are
    too close.  The search is the shared one, :func:`protos.structures.check_min_distance`.
    """
    check_min_distance(atoms.positions, atoms.cell.array, atoms.pbc, limits.min_distance, atoms.numbers)


# ---------------------------------------------------------------------------
# individual rules


def _check_numbers(numbers: np.ndarray) -> None:
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if bad.size:
        k = int(bad[0])
        more = f" ({bad.size - 1} more)" if bad.size > 1 else ""
        raise InvalidInput(
            f"atomic number {int(numbers[k])} of atom {k} is outside 1..{MAX_ATOMIC_NUMBER}{more}"
        )


def _check_finite_positions(positions: np.ndarray) -> None:
    finite = np.isfinite(positions)
    if not finite.all():
        bad_atoms = np.flatnonzero(~finite.all(axis=1))
        k = int(bad_atoms[0])
        more = f" ({bad_atoms.size - 1} more atoms)" if bad_atoms.size > 1 else ""
        raise InvalidInput(f"position of atom {k} is not finite: {positions[k].tolist()}{more}")


def _check_finite_cell(cell: np.ndarray) -> None:
    finite = np.isfinite(cell)
    if not finite.all():
        k = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInput(f"cell vector {k} is not finite: {cell[k].tolist()}")


def _check_cell_and_pbc(cell: np.ndarray, pbc: np.ndarray, limits: Limits) -> None:
    lengths = np.linalg.norm(cell, axis=1)
    for k in range(3):
        if pbc[k] and lengths[k] < limits.zero_vector:
            raise InvalidInput(
                f"axis {'xyz'[k]} (cell vector {k}) is periodic but cell vector {k} is zero; "
                "give a lattice vector or set pbc False on that axis"
            )
    nonzero = np.flatnonzero(lengths >= limits.zero_vector)
    if nonzero.size >= 2:
        unit = cell[nonzero] / lengths[nonzero, None]
        s = np.linalg.svd(unit, compute_uv=False)
        if s[-1] < limits.cell_tolerance:
            det = np.linalg.det(cell) if nonzero.size == 3 else 0.0
            which = ", ".join(str(int(k)) for k in nonzero)
            kind = "coplanar" if nonzero.size == 3 else "parallel"
            raise InvalidInput(
                f"cell is singular: cell vectors {which} are {kind} "
                f"(|det| = {abs(det):.3g} Å³, smallest normalised singular value {s[-1]:.3g})"
            )


def _check_elements(numbers: np.ndarray, oracle: Oracle) -> None:
    supported = oracle.supported_numbers()
    if supported is None:
        return
    present = np.unique(numbers)
    missing = [int(z) for z in present if int(z) not in supported]
    if missing:
        first_atom = int(np.flatnonzero(numbers == missing[0])[0])
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        known = ", ".join(chemical_symbols[z] for z in sorted(supported))
        raise InvalidInput(
            f"backend {oracle.name!r} cannot treat element(s) {names} "
            f"(first at atom {first_atom}); it supports {known}"
        )


def _check_stress_possible(cell: np.ndarray, limits: Limits) -> None:
    lengths = np.linalg.norm(cell, axis=1)
    if np.any(lengths < limits.zero_vector):
        zero = [int(k) for k in np.flatnonzero(lengths < limits.zero_vector)]
        raise InvalidInput(
            f"stress requested but cell vector(s) {zero} are zero: stress needs a cell "
            "with three lattice vectors (a volume)"
        )
