"""Local atomic environments for the 2- and 3-body kernels (seed 004, Methods).

An *environment* is what one atom sees: every neighbour (including periodic images,
and images of the atom itself when the cell is small) within the 2-body cutoff, and
every triplet (centre, j, k) with both bonds and the cross bond j–k inside the
3-body cutoff.  This follows FLARE 0.2.4 (``flare/env.py``,
``flare/utils/env_getarray.py``): a neighbour at distance ``0 < r < r_cut`` counts,
and a triplet counts when ``r_ij < r3``, ``r_ik < r3`` and ``r_jk < r3`` (strict);
every unordered pair of 3-body neighbours is one triplet.

Environments are stored as flat arrays with offsets (:class:`EnvironmentBatch`) so that
one numba call can loop over many of them.  Species are stored as *indices* into the
model's species list (not atomic numbers).

Units: Å.  Shapes are given in the docstrings; ``nb`` = number of bonds in a batch,
``nt`` = number of triplets.

Cutoff function (FLARE's ``quadratic_cutoff``): ``f(r) = (r_c - r)^2``, ``f'(r) =
-2 (r_c - r)``.  Each bond uses the cutoff of its own species pair, so with
per-pair cutoffs the model stays smooth; with one cutoff per body order this is
FLARE's convention exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from numba import njit
from scipy.spatial import cKDTree

from protos.errors import InvalidInput

__all__ = [
    "Cutoffs",
    "EnvironmentBatch",
    "build_environments",
    "neighbour_pairs",
    "species_indices",
]


# ---------------------------------------------------------------------------
# cutoffs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutoffs:
    """2- and 3-body cutoffs (Å), optionally per species pair.

    ``twobody[a, b]`` / ``threebody[a, b]`` are symmetric (S, S) matrices indexed by
    species *index* (position in ``species``).
    """

    species: tuple[int, ...]
    twobody: np.ndarray
    threebody: np.ndarray

    @classmethod
    def create(
        cls,
        species: Sequence[int],
        cutoffs: Sequence[float],
        pair_cutoffs: Mapping[str, Mapping[tuple[int, int], float]] | None = None,
    ) -> "Cutoffs":
        """``cutoffs=(r2, r3)``; ``pair_cutoffs={"twobody": {(Z1, Z2): r}, "threebody": {...}}``
        overrides individual species pairs (atomic numbers, order irrelevant)."""
        species = tuple(int(z) for z in species)
        if len(species) == 0:
            raise InvalidInput("the model needs at least one species")
        if len(set(species)) != len(species):
            raise InvalidInput(f"duplicate species in {species}")
        try:
            r2, r3 = (float(c) for c in cutoffs)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"cutoffs must be two numbers (r2, r3) in Å, got {cutoffs!r}") from exc
        if not (np.isfinite(r2) and np.isfinite(r3)) or r2 <= 0 or r3 < 0:
            raise InvalidInput(f"cutoffs must be positive and finite, got r2={r2}, r3={r3}")
        s = len(species)
        two = np.full((s, s), r2)
        three = np.full((s, s), r3)
        index = {z: i for i, z in enumerate(species)}
        for name, mat in (("twobody", two), ("threebody", three)):
            for pair, value in ((pair_cutoffs or {}).get(name) or {}).items():
                z1, z2 = pair
                if z1 not in index or z2 not in index:
                    raise InvalidInput(f"pair cutoff {pair} names a species not in the model {species}")
                value = float(value)
                if not np.isfinite(value) or value < 0:
                    raise InvalidInput(f"pair cutoff {pair}={value} must be non-negative")
                mat[index[z1], index[z2]] = mat[index[z2], index[z1]] = value
        two.setflags(write=False)
        three.setflags(write=False)
        return cls(species, two, three)

    @property
    def r2(self) -> float:
        return float(self.twobody.max())

    @property
    def r3(self) -> float:
        return float(self.threebody.max())

    @property
    def max_cutoff(self) -> float:
        return max(self.r2, self.r3)

    @property
    def uniform(self) -> bool:
        return bool(np.ptp(self.twobody) == 0 and np.ptp(self.threebody) == 0)

    def pair_dict(self) -> dict:
        """JSON-friendly description of non-default pair cutoffs."""
        out: dict = {"twobody": {}, "threebody": {}}
        for name, mat, default in (("twobody", self.twobody, self.r2), ("threebody", self.threebody, self.r3)):
            for i, zi in enumerate(self.species):
                for j in range(i, len(self.species)):
                    if mat[i, j] != default:
                        out[name][f"{zi}-{self.species[j]}"] = float(mat[i, j])
        return out

    @staticmethod
    def parse_pair_dict(d: Mapping | None) -> dict:
        if not d:
            return {}
        out: dict = {}
        for name, entries in d.items():
            out[name] = {tuple(int(x) for x in k.split("-")): float(v) for k, v in entries.items()}
        return out


def species_indices(numbers: Iterable[int], species: Sequence[int]) -> np.ndarray:
    """Map atomic numbers to indices into ``species``; unknown elements -> InvalidInput."""
    numbers = np.asarray(list(numbers) if not isinstance(numbers, np.ndarray) else numbers, dtype=np.int64)
    outside = (numbers < 1) | (numbers > _MAX_ATOMIC_NUMBER)
    if outside.any():  # a negative number would index the lookup table from its end
        raise InvalidInput(f"atomic number(s) {sorted(set(numbers[outside].tolist()))[:10]} are not elements "
                           f"(1..{_MAX_ATOMIC_NUMBER})")
    lookup = np.full(max(max(species), int(numbers.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[np.asarray(species, dtype=np.int64)] = np.arange(len(species))
    idx = lookup[numbers]
    if (idx < 0).any():
        unknown = sorted(set(numbers[idx < 0].tolist()))
        raise InvalidInput(
            f"element(s) with atomic number {unknown} are not in the model's species {list(species)}"
        )
    return idx


# ---------------------------------------------------------------------------
# neighbour search under periodic boundary conditions
# ---------------------------------------------------------------------------


_MAX_ATOMIC_NUMBER = 118
#: Å; as protos.wire.MAX_LENGTH (no structure comes near it)
MAX_LENGTH = 1.0e6
#: most periodic images of one atom a neighbour search visits, and most (image, atom) pairs it
#: looks at: a cell far smaller than the cutoff (1e-3 Å with pbc) would ask for billions
MAX_IMAGES = 100_000
MAX_IMAGE_ATOMS = 20_000_000
#: most neighbours of one atom within the largest cutoff.  Dense solids have ~100 within 6 Å;
#: thousands mean overlapping atoms (or a cell thinner than an atom), and the 3-body work and
#: memory grow with their square (a 0.05 Å thin cell: 1900 neighbours, GBs of triplets).
MAX_NEIGHBOURS = 1000


def _check_structure(positions, cell, pbc):
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise InvalidInput(f"positions must have shape (n, 3), got {positions.shape}")
    if not np.isfinite(positions).all():
        raise InvalidInput("positions contain NaN or infinite values")
    if positions.size and np.abs(positions).max() > MAX_LENGTH:
        # (wrapping 1e300 into a cell loses every digit: no neighbours, silently)
        raise InvalidInput(f"a coordinate exceeds {MAX_LENGTH:g} Å: {np.abs(positions).max():.3g} Å")
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if not np.isfinite(cell).all():
        raise InvalidInput("cell contains NaN or infinite values")
    if np.abs(cell).max() > MAX_LENGTH:
        raise InvalidInput(f"a cell vector component exceeds {MAX_LENGTH:g} Å: {np.abs(cell).max():.3g} Å")
    for d in range(3):
        if pbc[d] and np.linalg.norm(cell[d]) < 1e-8:
            raise InvalidInput(f"cell vector {d} is zero but the direction is periodic")
    return positions, cell, pbc


def _complete_cell(cell: np.ndarray) -> np.ndarray:
    """Replace missing (zero) cell vectors by orthogonal unit vectors (like ase.geometry)."""
    from ase.geometry import complete_cell

    return np.asarray(complete_cell(cell), dtype=np.float64)


def neighbour_pairs(positions, cell, pbc, centers, r_max):
    """All (centre, neighbour) pairs with ``0 < |r| < r_max`` under PBC.

    Works for cells smaller than ``2 r_max``: the needed number of periodic images per
    direction is ``ceil(r_max / d_i)`` with ``d_i`` the spacing of lattice planes.

    Returns ``(ci, j, vec)``: index into ``centers`` (int64, sorted), neighbour atom
    index, and vector from centre to the neighbour's image (Å, shape (m, 3)).
    """
    positions, cell, pbc = _check_structure(positions, cell, pbc)
    centers = np.asarray(centers, dtype=np.int64)
    n = len(positions)
    if n == 0 or len(centers) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    full = _complete_cell(cell)
    with np.errstate(over="ignore", invalid="ignore"):
        volume = abs(np.linalg.det(full))
    if pbc.any() and not np.isfinite(volume):
        raise InvalidInput(f"the cell is too large: its volume overflows (cell = {cell.tolist()} Å)")
    if pbc.any() and volume < 1e-12:
        raise InvalidInput("the cell is singular (zero volume)")

    if pbc.any():
        inv = np.linalg.inv(full)
        frac = positions @ inv
        frac[:, pbc] -= np.floor(frac[:, pbc])
        wrapped = frac @ full
    else:
        frac = None
        wrapped = positions.copy()

    # images: shifts along periodic directions, from the lattice-plane spacings
    ranges = []
    margins = np.zeros(3)
    for d in range(3):
        if pbc[d]:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                spacing = volume / np.linalg.norm(np.cross(full[(d + 1) % 3], full[(d + 2) % 3]))
                m = r_max / spacing
            if not (np.isfinite(m) and m * 2 + 1 <= MAX_IMAGES):
                raise InvalidInput(f"the cell is too thin for the cutoff {r_max:g} Å: lattice planes "
                                   f"{spacing:.3g} Å apart along cell vector {d}")
            margins[d] = m
            k = int(np.ceil(m))
            ranges.append(np.arange(-k, k + 1))
        else:
            ranges.append(np.zeros(1, dtype=np.int64))
    n_images = int(np.prod([len(r) for r in ranges]))
    if n_images > MAX_IMAGES or n_images * n > MAX_IMAGE_ATOMS:
        raise InvalidInput(f"the cell is too small for the cutoff {r_max:g} Å: {n_images} periodic images of "
                           f"each of {n} atoms would be searched (at most {MAX_IMAGES} images and "
                           f"{MAX_IMAGE_ATOMS} image atoms)")
    shifts = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T  # (ns, 3)

    if pbc.any():
        # keep images whose fractional coordinates lie within r_max of the cell
        img_frac = frac[None, :, :] + shifts[:, None, :]  # (ns, n, 3)
        keep = np.ones(img_frac.shape[:2], dtype=bool)
        for d in range(3):
            if pbc[d]:
                keep &= (img_frac[:, :, d] > -margins[d] - 1e-9) & (img_frac[:, :, d] < 1 + margins[d] + 1e-9)
        s_idx, a_idx = np.nonzero(keep)
        ghost_pos = wrapped[a_idx] + shifts[s_idx] @ full
        ghost_atom = a_idx
    else:
        ghost_pos = wrapped
        ghost_atom = np.arange(n)

    tree_g = cKDTree(ghost_pos)
    tree_c = cKDTree(wrapped[centers])
    sdm = tree_c.sparse_distance_matrix(tree_g, r_max, output_type="ndarray")
    ci = sdm["i"].astype(np.int64)
    gj = sdm["j"].astype(np.int64)
    vec = ghost_pos[gj] - wrapped[centers][ci]
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    ok = (dist < r_max) & (dist > 0.0)
    ci, gj, vec = ci[ok], gj[ok], vec[ok]
    order = np.lexsort((np.sqrt(np.einsum("ij,ij->i", vec, vec)), ci))
    return ci[order], ghost_atom[gj[order]], vec[order]


# ---------------------------------------------------------------------------
# batch of environments
# ---------------------------------------------------------------------------

_ARRAY_FIELDS = (
    "center_species",
    "center_atom",
    "bond_offsets",
    "bond_r",
    "bond_rc",
    "bond_f",
    "bond_df",
    "bond_u",
    "bond_species",
    "bond_atom",
    "trip_offsets",
    "trip_r",
    "trip_F",
    "trip_dF",
    "trip_u",
    "trip_species",
    "trip_key",
)


@dataclass
class EnvironmentBatch:
    """Many local environments packed into flat arrays.

    Per environment ``e``: bonds ``bond_offsets[e]:bond_offsets[e+1]`` and triplets
    ``trip_offsets[e]:trip_offsets[e+1]``.

    * ``center_species`` (n,) int64 — species index of the central atom
    * ``center_atom`` (n,) int64 — index of the central atom in its structure
    * ``bond_r`` (nb,) Å, ``bond_rc`` (nb,) Å (the pair's 2-body cutoff),
      ``bond_f``/``bond_df`` (nb,) cutoff function and its r-derivative,
      ``bond_u`` (nb, 3) unit vector centre -> neighbour, ``bond_species`` (nb,),
      ``bond_atom`` (nb,) neighbour's atom index in its structure
    * ``trip_r`` (nt, 3) distances (r_cj, r_ck, r_jk) Å; ``trip_F`` (nt,) product of the
      three cutoff functions; ``trip_dF`` (nt, 2) its derivative w.r.t. r_cj and r_ck;
      ``trip_u`` (nt, 2, 3) unit vectors centre -> j and centre -> k;
      ``trip_species`` (nt, 3) species (centre, j, k); ``trip_key`` (nt,) species
      multiset code (clusters of different multisets never match)
    """

    center_species: np.ndarray
    center_atom: np.ndarray
    bond_offsets: np.ndarray
    bond_r: np.ndarray
    bond_rc: np.ndarray
    bond_f: np.ndarray
    bond_df: np.ndarray
    bond_u: np.ndarray
    bond_species: np.ndarray
    bond_atom: np.ndarray
    trip_offsets: np.ndarray
    trip_r: np.ndarray
    trip_F: np.ndarray
    trip_dF: np.ndarray
    trip_u: np.ndarray
    trip_species: np.ndarray
    trip_key: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.center_species.shape[0])

    @property
    def n_bonds(self) -> np.ndarray:
        return np.diff(self.bond_offsets)

    @property
    def n_triplets(self) -> np.ndarray:
        return np.diff(self.trip_offsets)

    @classmethod
    def empty(cls) -> "EnvironmentBatch":
        return cls(
            center_species=np.zeros(0, np.int64),
            center_atom=np.zeros(0, np.int64),
            bond_offsets=np.zeros(1, np.int64),
            bond_r=np.zeros(0),
            bond_rc=np.zeros(0),
            bond_f=np.zeros(0),
            bond_df=np.zeros(0),
            bond_u=np.zeros((0, 3)),
            bond_species=np.zeros(0, np.int64),
            bond_atom=np.zeros(0, np.int64),
            trip_offsets=np.zeros(1, np.int64),
            trip_r=np.zeros((0, 3)),
            trip_F=np.zeros(0),
            trip_dF=np.zeros((0, 2)),
            trip_u=np.zeros((0, 2, 3)),
            trip_species=np.zeros((0, 3), np.int64),
            trip_key=np.zeros(0, np.int64),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAY_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "EnvironmentBatch":
        missing = [n for n in _ARRAY_FIELDS if n not in arrays]
        if missing:
            raise InvalidInput(f"environment arrays missing: {missing}")
        return cls(**{n: np.ascontiguousarray(arrays[n]) for n in _ARRAY_FIELDS})

    @staticmethod
    def concatenate(batches: Sequence["EnvironmentBatch"]) -> "EnvironmentBatch":
        batches = [b for b in batches if len(b) > 0]
        if not batches:
            return EnvironmentBatch.empty()
        if len(batches) == 1:
            return batches[0]
        out = {}
        for name in _ARRAY_FIELDS:
            if name.endswith("_offsets"):
                parts, base = [np.zeros(1, np.int64)], 0
                for b in batches:
                    off = getattr(b, name)
                    parts.append(off[1:] + base)
                    base += off[-1]
                out[name] = np.concatenate(parts)
            else:
                out[name] = np.concatenate([getattr(b, name) for b in batches])
        return EnvironmentBatch(**out)

    def subset(self, indices: Sequence[int]) -> "EnvironmentBatch":
        """A new batch with the environments ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        bo, to = self.bond_offsets, self.trip_offsets
        b_idx = np.concatenate([np.arange(bo[i], bo[i + 1]) for i in indices]) if len(indices) else np.zeros(0, np.int64)
        t_idx = np.concatenate([np.arange(to[i], to[i + 1]) for i in indices]) if len(indices) else np.zeros(0, np.int64)
        b_off = np.concatenate([[0], np.cumsum(bo[indices + 1] - bo[indices])]).astype(np.int64)
        t_off = np.concatenate([[0], np.cumsum(to[indices + 1] - to[indices])]).astype(np.int64)
        return EnvironmentBatch(
            center_species=self.center_species[indices],
            center_atom=self.center_atom[indices],
            bond_offsets=b_off,
            bond_r=self.bond_r[b_idx],
            bond_rc=self.bond_rc[b_idx],
            bond_f=self.bond_f[b_idx],
            bond_df=self.bond_df[b_idx],
            bond_u=self.bond_u[b_idx],
            bond_species=self.bond_species[b_idx],
            bond_atom=self.bond_atom[b_idx],
            trip_offsets=t_off,
            trip_r=self.trip_r[t_idx],
            trip_F=self.trip_F[t_idx],
            trip_dF=self.trip_dF[t_idx],
            trip_u=self.trip_u[t_idx],
            trip_species=self.trip_species[t_idx],
            trip_key=self.trip_key[t_idx],
        )


@njit(cache=True)
def _count_triplets(off, dist, vec, spec, center_spec, r3):
    n_env = off.shape[0] - 1
    counts = np.zeros(n_env, np.int64)
    for e in range(n_env):
        c = center_spec[e]
        cnt = 0
        for m in range(off[e], off[e + 1]):
            if dist[m] >= r3[c, spec[m]]:
                continue
            for n in range(m + 1, off[e + 1]):
                if dist[n] >= r3[c, spec[n]]:
                    continue
                dx = vec[n, 0] - vec[m, 0]
                dy = vec[n, 1] - vec[m, 1]
                dz = vec[n, 2] - vec[m, 2]
                if dx * dx + dy * dy + dz * dz < r3[spec[m], spec[n]] ** 2:
                    if np.sqrt(dx * dx + dy * dy + dz * dz) < r3[spec[m], spec[n]]:
                        cnt += 1
        counts[e] = cnt
    return counts


@njit(cache=True)
def _fill_triplets(off, dist, vec, spec, center_spec, r3, trip_off, n_species, t_r, t_F, t_dF, t_u, t_s, t_key):
    n_env = off.shape[0] - 1
    for e in range(n_env):
        c = center_spec[e]
        t = trip_off[e]
        for m in range(off[e], off[e + 1]):
            rc_m = r3[c, spec[m]]
            if dist[m] >= rc_m:
                continue
            for n in range(m + 1, off[e + 1]):
                rc_n = r3[c, spec[n]]
                if dist[n] >= rc_n:
                    continue
                dx = vec[n, 0] - vec[m, 0]
                dy = vec[n, 1] - vec[m, 1]
                dz = vec[n, 2] - vec[m, 2]
                rc_x = r3[spec[m], spec[n]]
                if dx * dx + dy * dy + dz * dz >= rc_x * rc_x:
                    continue
                r_x = np.sqrt(dx * dx + dy * dy + dz * dz)
                if r_x >= rc_x:
                    continue
                r1 = dist[m]
                r2 = dist[n]
                f1 = (rc_m - r1) ** 2
                f2 = (rc_n - r2) ** 2
                f3 = (rc_x - r_x) ** 2
                t_r[t, 0] = r1
                t_r[t, 1] = r2
                t_r[t, 2] = r_x
                t_F[t] = f1 * f2 * f3
                t_dF[t, 0] = -2.0 * (rc_m - r1) * f2 * f3
                t_dF[t, 1] = -2.0 * (rc_n - r2) * f1 * f3
                for d in range(3):
                    t_u[t, 0, d] = vec[m, d] / r1
                    t_u[t, 1, d] = vec[n, d] / r2
                s0, s1, s2 = c, spec[m], spec[n]
                t_s[t, 0] = s0
                t_s[t, 1] = s1
                t_s[t, 2] = s2
                # sorted multiset code
                a, b, cc = s0, s1, s2
                if a > b:
                    a, b = b, a
                if b > cc:
                    b, cc = cc, b
                if a > b:
                    a, b = b, a
                t_key[t] = (a * n_species + b) * n_species + cc
                t += 1


def build_environments(
    positions,
    numbers,
    cell,
    pbc,
    cutoffs: Cutoffs,
    atom_indices: Sequence[int] | None = None,
) -> EnvironmentBatch:
    """Environments of the atoms ``atom_indices`` (default: all) of one structure.

    ``positions`` (n, 3) Å, ``numbers`` (n,) atomic numbers, ``cell`` (3, 3) Å (rows are
    lattice vectors), ``pbc`` (3,) bool.  Unknown elements raise InvalidInput.
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    spec_all = species_indices(numbers, cutoffs.species) if n else np.zeros(0, np.int64)
    if atom_indices is None:
        centers = np.arange(n, dtype=np.int64)
    else:
        centers = np.asarray(atom_indices, dtype=np.int64).reshape(-1)
        if len(centers) and (centers.min() < 0 or centers.max() >= n):
            raise InvalidInput(f"atom indices {centers.tolist()} out of range for {n} atoms")
    if len(centers) == 0:
        return EnvironmentBatch.empty()

    ci, nj, vec = neighbour_pairs(positions, cell, pbc, centers, cutoffs.max_cutoff)
    if len(ci):
        per_atom = np.bincount(ci, minlength=len(centers))
        k = int(np.argmax(per_atom))
        if per_atom[k] > MAX_NEIGHBOURS:
            raise InvalidInput(
                f"atom {int(centers[k])} has {int(per_atom[k])} neighbours within {cutoffs.max_cutoff:g} Å "
                f"(at most {MAX_NEIGHBOURS}): atoms overlap, or the cell is thinner than the atoms")
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    cspec = spec_all[centers]
    nspec = spec_all[nj]

    # ---- 2-body: neighbours inside the pair's 2-body cutoff
    rc2 = cutoffs.twobody[cspec[ci], nspec]
    keep2 = dist < rc2
    b_ci = ci[keep2]
    b_r = dist[keep2]
    b_rc = rc2[keep2]
    b_off = np.zeros(len(centers) + 1, np.int64)
    np.add.at(b_off, b_ci + 1, 1)
    b_off = np.cumsum(b_off)

    # ---- 3-body: from all neighbours within the largest cutoff (sorted by distance)
    all_off = np.zeros(len(centers) + 1, np.int64)
    np.add.at(all_off, ci + 1, 1)
    all_off = np.cumsum(all_off)
    r3 = np.ascontiguousarray(cutoffs.threebody, dtype=np.float64)
    counts = _count_triplets(all_off, dist, vec, nspec, cspec, r3)
    t_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nt = int(t_off[-1])
    t_r = np.zeros((nt, 3))
    t_F = np.zeros(nt)
    t_dF = np.zeros((nt, 2))
    t_u = np.zeros((nt, 2, 3))
    t_s = np.zeros((nt, 3), np.int64)
    t_key = np.zeros(nt, np.int64)
    _fill_triplets(all_off, dist, vec, nspec, cspec, r3, t_off, len(cutoffs.species), t_r, t_F, t_dF, t_u, t_s, t_key)

    return EnvironmentBatch(
        center_species=cspec.astype(np.int64),
        center_atom=centers,
        bond_offsets=b_off,
        bond_r=b_r,
        bond_rc=b_rc,
        bond_f=(b_rc - b_r) ** 2,
        bond_df=-2.0 * (b_rc - b_r),
        bond_u=vec[keep2] / b_r[:, None],
        bond_species=nspec[keep2].astype(np.int64),
        bond_atom=nj[keep2].astype(np.int64),
        trip_offsets=t_off,
        trip_r=t_r,
        trip_F=t_F,
        trip_dF=t_dF,
        trip_u=t_u,
        trip_species=t_s,
        trip_key=t_key,
    )


def environments_of_atoms(atoms, cutoffs: Cutoffs, atom_indices=None) -> EnvironmentBatch:
    """:func:`build_environments` for an ``ase.Atoms``."""
    return build_environments(
        atoms.get_positions(), atoms.get_atomic_numbers(), atoms.get_cell().array, atoms.get_pbc(), cutoffs, atom_indices
    )
