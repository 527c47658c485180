"""One structure validator for every service, on one periodic neighbour search.

:func:`check_structure` is what the oracle (Label), the learner (AddData,
AddDataBatch, Predict, PredictStream) and the sampler (a new run's structure)
run on an incoming structure; it raises :class:`protos.errors.InvalidInput`
with a message that names the structure, the atoms, the value and the limit.
The rules (:class:`StructureLimits`): atom count, integral atomic numbers in
1..118 (and in the allowed species, e.g. the learner model's), finite
positions and cell, a non-singular cell along periodic axes, optionally a
structure periodic in all three directions (stress), and a minimum
interatomic distance with periodic images (an atom and its own image too).

The neighbour search is :func:`close_pairs`, moved here from
``oracle_service/validation.py`` (whose public names still work): a single
k-d tree query over the atoms wrapped into a Minkowski-reduced cell plus a
ghost layer ``cutoff`` thick, falling back to ASE's neighbour list for cells
thinner than twice the cutoff.  It was chosen over the learner's
``learner_service.environment.build_environments`` because the latter builds
full GP environments (sorted neighbour lists, 3-body triplets, numba) for a
fixed model cutoff -- far more than a "which pairs are closer than r" test
needs, and it would make protos/ depend on the learner.  ``close_pairs`` is
numpy/scipy/ASE only (no gRPC), handles triclinic, mixed-pbc and tiny cells,
and costs O(n log n) (~10 ms for 10^4 atoms).  :func:`isolated_atoms` uses the
same search to find atoms without a neighbour within a cutoff.

Units: positions, cell, distances in Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from scipy.spatial import cKDTree

from protos.errors import InvalidInput

#: largest atomic number accepted (oganesson)
MAX_ATOMIC_NUMBER = 118
#: Å; a cell vector shorter than this counts as zero
ZERO_VECTOR = 1e-8
#: smallest normalised singular value of a non-singular cell
CELL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class StructureLimits:
    """What :func:`check_structure` accepts.

    min_distance: Å; two atoms (or an atom and a periodic image of any atom,
        itself included) closer than this are rejected.  ``0`` disables.
    max_atoms / min_atoms: bounds on the number of atoms.
    species: allowed atomic numbers (e.g. a learner model's), or None for any
        element 1..118.
    require_periodic: the structure must be periodic in all three directions
        (stress needs a volume).
    """

    min_distance: float = 0.5
    max_atoms: int = 20_000
    min_atoms: int = 1
    species: frozenset[int] | None = None
    require_periodic: bool = False

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_distance) and self.min_distance >= 0):
            raise ValueError(f"min_distance must be finite and >= 0 Å, got {self.min_distance}")
        if self.max_atoms < 1 or self.min_atoms < 0 or self.min_atoms > self.max_atoms:
            raise ValueError(f"need 0 <= min_atoms <= max_atoms and max_atoms >= 1, got {self}")
        if self.species is not None:
            object.__setattr__(self, "species", frozenset(int(z) for z in self.species))


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def _arrays(structure: Any):
    if isinstance(structure, Atoms):
        return (np.asarray(structure.numbers), np.asarray(structure.positions, dtype=float),
                np.asarray(structure.cell.array, dtype=float), np.asarray(structure.pbc, dtype=bool))
    try:
        numbers, positions, cell, pbc = structure
    except (TypeError, ValueError):
        raise InvalidInput(f"expected an ase.Atoms or (numbers, positions, cell, pbc), got {type(structure).__name__}") from None
    numbers = np.asarray(numbers)
    try:
        positions = np.asarray(positions, dtype=float)
        cell = np.zeros((3, 3)) if cell is None or np.size(cell) == 0 else np.asarray(cell, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"positions and cell must be arrays of numbers: {exc}") from None
    pbc = np.asarray(pbc)
    if pbc.ndim == 0:
        pbc = np.repeat(pbc, 3)
    return numbers, positions, cell, pbc


def check_structure(structure: Any, limits: StructureLimits = StructureLimits(), name: str = "structure") -> None:
    """Raise :class:`InvalidInput` on the first broken rule of ``limits``.

    ``structure``: an :class:`ase.Atoms` or ``(numbers, positions, cell, pbc)``.
    Messages start with ``name`` (e.g. ``items[3].structure``).
    """
    numbers, positions, cell, pbc = _arrays(structure)
    p = f"{name}: "
    if numbers.ndim != 1:
        raise InvalidInput(f"{p}atomic numbers must be a 1-D array, got shape {numbers.shape}")
    n = numbers.shape[0]
    if positions.shape != (n, 3):
        raise InvalidInput(f"{p}positions must have shape ({n}, 3), got {positions.shape}")
    if cell.shape != (3, 3):
        raise InvalidInput(f"{p}cell must have shape (3, 3), got {cell.shape}")
    if pbc.shape != (3,):
        raise InvalidInput(f"{p}pbc must be 3 booleans, got shape {pbc.shape}")
    pbc = pbc.astype(bool)
    if n < limits.min_atoms:
        raise InvalidInput(f"{p}{n} atoms; at least {limits.min_atoms} required")
    if n > limits.max_atoms:
        raise InvalidInput(f"{p}{n} atoms; at most {limits.max_atoms} accepted (the atom limit)")
    if numbers.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(numbers) | (numbers != np.round(numbers)))
        if bad.size:
            raise InvalidInput(f"{p}atomic number of atom {int(bad[0])} is not an integer: {float(numbers[bad[0]])!r}")
    elif numbers.dtype.kind not in "iu" and n:
        raise InvalidInput(f"{p}atomic numbers must be integers, got dtype {numbers.dtype}")
    numbers = numbers.astype(np.int64)
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if bad.size:
        more = f" ({bad.size - 1} more)" if bad.size > 1 else ""
        raise InvalidInput(f"{p}atomic number {int(numbers[bad[0]])} of atom {int(bad[0])} is outside "
                           f"1..{MAX_ATOMIC_NUMBER}{more}")
    if limits.species is not None:
        check_species(numbers, limits.species, name)
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        more = f" ({bad.size - 1} more atoms)" if bad.size > 1 else ""
        raise InvalidInput(f"{p}position of atom {int(bad[0])} is not finite: {positions[bad[0]].tolist()}{more}")
    if not np.isfinite(cell).all():
        k = int(np.flatnonzero(~np.isfinite(cell).all(axis=1))[0])
        raise InvalidInput(f"{p}cell vector {k} is not finite: {cell[k].tolist()}")
    check_cell(cell, pbc, name)
    if limits.require_periodic and not pbc.all():
        raise InvalidInput(f"{p}needs a structure periodic in all three directions (pbc = {pbc.tolist()})")
    check_min_distance(positions, cell, pbc, limits.min_distance, numbers, name)


def check_species(numbers: np.ndarray, species: Iterable[int], name: str = "structure") -> None:
    """Every atomic number must be in ``species``; the message lists the allowed ones."""
    allowed = {int(z) for z in species}
    numbers = np.asarray(numbers, dtype=np.int64)
    missing = [int(z) for z in np.unique(numbers) if int(z) not in allowed]
    if missing:
        first = int(np.flatnonzero(numbers == missing[0])[0])
        names = ", ".join(f"{_symbol(z)} (Z={z})" for z in missing)
        known = ", ".join(f"{_symbol(z)} (Z={z})" for z in sorted(allowed)) or "none"
        raise InvalidInput(f"{name}: element(s) {names} not in the model's species (first at atom {first}); "
                           f"the model's species are {known}")


def check_cell(cell: np.ndarray, pbc: np.ndarray, name: str = "structure") -> None:
    """A periodic axis needs a non-zero cell vector; the non-zero vectors must be independent."""
    cell = np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(cell, axis=1)
    for k in range(3):
        if pbc[k] and lengths[k] < ZERO_VECTOR:
            raise InvalidInput(f"{name}: axis {'xyz'[k]} is periodic but cell vector {k} is zero; "
                               "give a lattice vector or set pbc False on that axis")
    nonzero = np.flatnonzero(lengths >= ZERO_VECTOR)
    if nonzero.size >= 2:
        s = np.linalg.svd(cell[nonzero] / lengths[nonzero, None], compute_uv=False)
        if s[-1] < CELL_TOLERANCE:
            kind = "coplanar" if nonzero.size == 3 else "parallel"
            raise InvalidInput(f"{name}: cell is singular: cell vectors {', '.join(str(int(k)) for k in nonzero)} "
                               f"are {kind} (smallest normalised singular value {s[-1]:.3g})")


def check_min_distance(positions, cell, pbc, min_distance: float, numbers=None, name: str | None = None) -> None:
    """Reject atoms closer than ``min_distance`` Å (periodic images included).

    The message names the closest pair, its distance and how many pairs are
    too close; ``name`` (if given) prefixes it.  The cell must have passed
    :func:`check_cell`.
    """
    positions = np.asarray(positions, dtype=float)
    n = len(positions)
    if min_distance <= 0 or n == 0:
        return
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if pbc.size == 1:
        pbc = np.repeat(pbc, 3)
    numbers = np.zeros(n, np.int64) if numbers is None else np.asarray(numbers, dtype=np.int64)
    sym = lambda k: _symbol(int(numbers[k])) if numbers[k] > 0 else "?"  # noqa: E731
    p = f"{name}: " if name else ""
    if pbc.any():
        period = shortest_period(cell, pbc)
        if period < min_distance:
            raise InvalidInput(
                f"{p}atom 0 ({sym(0)}) is {period:.4g} Å from its own periodic image, closer than "
                f"the minimum distance {min_distance:g} Å: the cell is too small (shortest lattice vector)")
    pairs = close_pairs(positions, cell, pbc, min_distance)
    if pairs.i.size == 0:
        return
    k = int(np.argmin(pairs.d))
    i, j, d = int(pairs.i[k]), int(pairs.j[k]), float(pairs.d[k])
    n_pairs = len({(min(a, b), max(a, b)) for a, b in zip(pairs.i.tolist(), pairs.j.tolist())})
    others = f" ({n_pairs - 1} more pair(s) too close)" if n_pairs > 1 else ""
    if i == j:
        raise InvalidInput(
            f"{p}atom {i} ({sym(i)}) is {d:.4g} Å from its own periodic image, closer than "
            f"the minimum distance {min_distance:g} Å: the cell is too small{others}")
    where = " (through periodic boundaries)" if pairs.periodic[k] else ""
    raise InvalidInput(
        f"{p}atoms {i} ({sym(i)}) and {j} ({sym(j)}) are {d:.4g} Å apart{where}, closer than "
        f"the minimum distance {min_distance:g} Å{others}")


def isolated_atoms(positions, cell, pbc, cutoff: float, indices=None) -> np.ndarray:
    """Indices (among ``indices``, default all) of atoms with no neighbour -- another atom
    or a periodic image, its own included -- within ``cutoff`` Å."""
    positions = np.asarray(positions, dtype=float)
    n = len(positions)
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if n == 0 or idx.size == 0:
        return np.zeros(0, np.int64)
    pairs = close_pairs(positions, cell, pbc, cutoff)
    has = np.zeros(n, bool)
    has[pairs.i] = True
    has[pairs.j] = True
    return idx[~has[idx]]


# ---------------------------------------------------------------------------
# neighbour search


@dataclass(frozen=True)
class ClosePairs:
    """Pairs closer than a cutoff: atom indices i <= j, distance d (Å),
    and whether the pair involves a periodic image (``i == j`` always does)."""

    i: np.ndarray
    j: np.ndarray
    d: np.ndarray
    periodic: np.ndarray
def close_pairs(positions: np.ndarray, cell: np.ndarray, pbc: Any, cutoff: float) -> ClosePairs:
    """All pairs (with periodic images) closer than ``cutoff`` Å.

    positions (n, 3) Å, cell (3, 3) Å, pbc (3,) bool.  The cell must have
    passed :func:`check_cheap`.  Periodic atoms are wrapped into the cell and
    a layer of ghost images ``cutoff`` thick is added on each periodic face;
    one k-d tree query then finds every pair: O(n log n), ~10 ms for
    10^4 atoms.  A pair may be reported more than once (through different
    images).
    """
    positions = np.asarray(positions, dtype=float)
    cell = np.asarray(cell, dtype=float)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if pbc.size == 1:
        pbc = np.repeat(pbc, 3)
    n = len(positions)
    periodic_axes = [k for k in range(3) if pbc[k]]
    if not periodic_axes:
        tree = cKDTree(positions)
        ij = tree.query_pairs(cutoff, output_type="ndarray")
        i, j = ij[:, 0], ij[:, 1]
        d = np.linalg.norm(positions[i] - positions[j], axis=1)
        return ClosePairs(i, j, d, np.zeros(len(i), bool))

    # same lattice, most compact basis: bounds the number of images to visit
    full = _complete_cell(reduced_cell(cell, pbc))
    inv = np.linalg.inv(full)
    frac = positions @ inv
    frac[:, periodic_axes] %= 1.0
    frac[:, periodic_axes] %= 1.0  # values like -1e-17 % 1 == 1.0
    wrapped = frac @ full
    volume = abs(np.linalg.det(full))
    # fractional thickness of the ghost layer along each periodic axis
    widths = {}
    for k in periodic_axes:
        a, b = full[(k + 1) % 3], full[(k + 2) % 3]
        spacing = volume / np.linalg.norm(np.cross(a, b))  # distance between lattice planes
        widths[k] = cutoff / spacing
    if max(widths.values()) >= 0.5:
        return _close_pairs_ase(positions, cell, pbc, cutoff)

    pts, owner, shifted = wrapped, np.arange(n), np.zeros(n, bool)
    fr = frac
    for k in periodic_axes:
        w = widths[k]
        low = fr[:, k] < w
        high = fr[:, k] >= 1.0 - w
        shift_up = np.zeros(3)
        shift_up[k] = 1.0
        pts = np.concatenate([pts, pts[low] + full[k], pts[high] - full[k]])
        fr = np.concatenate([fr, fr[low] + shift_up, fr[high] - shift_up])
        owner = np.concatenate([owner, owner[low], owner[high]])
        shifted = np.concatenate([shifted, np.ones(low.sum() + high.sum(), bool)])
    tree = cKDTree(pts)
    ij = tree.query_pairs(cutoff, output_type="ndarray")
    ij = ij[ij[:, 0] < n]  # keep pairs with one real atom (query_pairs gives i < j)
    a, b = ij[:, 0], ij[:, 1]
    d = np.linalg.norm(pts[a] - pts[b], axis=1)
    oi, oj = owner[a], owner[b]
    return ClosePairs(np.minimum(oi, oj), np.maximum(oi, oj), d, shifted[b])


def reduced_cell(cell: np.ndarray, pbc: Any) -> np.ndarray:
    """Minkowski-reduced basis of the periodic lattice (non-periodic rows kept).

    Cached by the exact cell and pbc (an MD stream keeps its cell: the reduction
    was most of the per-step cost of a 32-atom minimum-distance check)."""
    cell = np.ascontiguousarray(cell, dtype=float)
    pbc = np.ascontiguousarray(np.broadcast_to(np.asarray(pbc, dtype=bool).reshape(-1), (3,)))
    return _reduced_cell(cell.tobytes(), pbc.tobytes()).copy()


@lru_cache(maxsize=64)
def _reduced_cell(cell_bytes: bytes, pbc_bytes: bytes) -> np.ndarray:
    from ase.geometry.minkowski_reduction import minkowski_reduce

    cell = np.frombuffer(cell_bytes, dtype=float).reshape(3, 3).copy()
    pbc = np.frombuffer(pbc_bytes, dtype=bool).copy()
    rcell, _ = minkowski_reduce(cell, pbc=pbc)
    return np.array(rcell, dtype=float)


def shortest_period(cell: np.ndarray, pbc: Any) -> float:
    """Length of the shortest non-zero periodic lattice vector, Å (inf if no pbc)."""
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return float("inf")
    return float(np.linalg.norm(reduced_cell(cell, pbc)[pbc], axis=1).min())


def _close_pairs_ase(positions, cell, pbc, cutoff) -> ClosePairs:
    """Fallback for cells thinner than twice the cutoff: ASE's neighbour list."""
    from ase.neighborlist import neighbor_list

    atoms = Atoms(positions=positions, cell=reduced_cell(cell, pbc), pbc=pbc)
    i, j, d, shifts = neighbor_list("ijdS", atoms, cutoff, self_interaction=False)
    keep = i <= j
    i, j, d, shifts = i[keep], j[keep], d[keep], shifts[keep]
    return ClosePairs(i, j, d, np.any(shifts != 0, axis=1))


def _complete_cell(cell: np.ndarray) -> np.ndarray:
    """Replace zero (non-periodic) cell vectors by unit vectors orthogonal to the rest."""
    from ase.cell import Cell

    return np.asarray(Cell(cell).complete(), dtype=float)

