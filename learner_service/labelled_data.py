"""Labelled structures from several inputs, merged: extended XYZ files and run directories.

Used by ``epicycle fit`` (one or more inputs) and by a run's ``learner.data`` (the training set a
run starts from).  No numba, no scipy: the coordinator reads data with it.

An input is either

* an (extended) XYZ file whose frames carry forces (eV/Å; energy eV and stress eV/Å³, ASE
  Voigt order and sign, optional) — e.g. ``epicycle label`` or ``epicycle export`` output; or
* a run directory: every oracle label of that run (:func:`coordinator.export.run_frames`), with
  the per-atom ``training`` mask of the atoms the run trained on.

A frame of one input that occurs in an earlier input (same atomic numbers, positions, cell and
pbc — e.g. a run directory and its export, or two runs started from the same structure and seed)
is dropped; repeats within one input are kept as given.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from protos.errors import InvalidInput

__all__ = ["read_frames", "read_labelled", "LabelledData", "Source", "frame_forces"]


def read_frames(path) -> list:
    """All frames of an (extended) XYZ file, or every label of a run directory (``epicycle export``:
    per-atom ``training`` marks the atoms the run trained on); clear errors for missing/empty/broken files."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if path.is_dir():
        from coordinator.export import run_frames

        frames = run_frames(path)
        if not frames:
            raise InvalidInput(f"{path}: the run has no labels yet")
        return frames
    try:
        frames = read(str(path), index=":")
    except Exception as exc:  # ase raises many types for malformed files
        raise InvalidInput(f"{path}: cannot read as extended XYZ ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise InvalidInput(f"{path}: contains no structures")
    return frames


def frame_forces(atoms) -> np.ndarray | None:
    """The frame's force labels (n, 3) eV/Å: the calculator's, else a per-atom ``forces`` array."""
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    forces = results.get("forces")
    if forces is None and "forces" in atoms.arrays:
        forces = atoms.arrays["forces"]
    return None if forces is None else np.asarray(forces, dtype=float)


def _results(atoms) -> dict:
    return getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}


def _structure_key(atoms) -> bytes:
    h = hashlib.sha256()
    for a in (atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64),
              np.asarray(atoms.cell.array, dtype=np.float64), np.asarray(atoms.pbc, dtype=bool)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


@dataclass(frozen=True)
class Source:
    """What one input contributed (after dropping frames already seen in an earlier input)."""

    path: str
    kind: str                   # "extended XYZ" or "run directory"
    frames: int                 # frames kept
    duplicates: int             # frames dropped: the same structure was in an earlier input
    atoms: int                  # atoms over the kept frames
    species: dict[str, int]     # element -> atoms over the kept frames
    energies: int               # kept frames with an energy label
    stresses: int               # kept frames with a stress label
    training_atoms: int | None  # atoms marked by a per-atom 'training' array (None: no such array)

    def line(self) -> str:
        if not self.frames:
            return f"{self.path} ({self.kind}): all {self.duplicates} frame(s) already in an earlier input, none added"
        species = ", ".join(f"{s} {n}" for s, n in self.species.items())
        extra = [f"{self.energies} with energy" if self.energies else "no energies",
                 f"{self.stresses} with stress" if self.stresses else "no stresses"]
        if self.training_atoms is not None:
            extra.append(f"{self.training_atoms} atoms marked 'training'")
        if self.duplicates:
            extra.append(f"{self.duplicates} duplicate frame(s) dropped")
        return (f"{self.path} ({self.kind}): {self.frames} frames, {self.atoms} atoms ({species}); "
                + ", ".join(extra))


@dataclass
class LabelledData:
    """Frames of several inputs, merged in input order, and where each came from."""

    frames: list = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (input, frame index in that input)
    sources: list[Source] = field(default_factory=list)

    @property
    def species(self) -> list[int]:
        """Atomic numbers present, sorted."""
        return sorted({int(z) for f in self.frames for z in f.numbers})

    def summary_lines(self) -> list[str]:
        from ase.data import chemical_symbols

        lines = [s.line() for s in self.sources]
        if len(self.sources) > 1:
            counts = Counter(chemical_symbols[int(z)] for f in self.frames for z in f.numbers)
            lines.append(f"merged: {len(self.frames)} frames from {len(self.sources)} inputs, "
                         f"{sum(counts.values())} atoms ({', '.join(f'{s} {n}' for s, n in sorted(counts.items()))})")
        return lines


def read_labelled(paths: Iterable, need_forces: bool = True) -> LabelledData:
    """Read and merge ``paths`` (XYZ files or run directories; see the module docstring).

    Raises :class:`InvalidInput` naming the input and frame for a missing input, an unreadable
    file, an empty run, or (``need_forces``) a frame without force labels.
    """
    from ase.data import chemical_symbols

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise InvalidInput("no labelled data given (an extended XYZ file or a run directory)")
    data, seen = LabelledData(), set()
    for path in paths:
        frames = read_frames(path)
        kept, duplicates = [], 0
        for k, frame in enumerate(frames):
            if need_forces and frame_forces(frame) is None:
                raise InvalidInput(f"{path}: frame {k} has no forces (expected a per-atom 'forces' array in eV/Å)")
            if _structure_key(frame) in seen:
                duplicates += 1
                continue
            kept.append((k, frame))
        seen.update(_structure_key(f) for _, f in kept)
        marked = [f.arrays["training"] for _, f in kept if "training" in f.arrays]
        data.sources.append(Source(
            path=str(path), kind="run directory" if path.is_dir() else "extended XYZ", frames=len(kept),
            duplicates=duplicates, atoms=sum(len(f) for _, f in kept),
            species=dict(sorted(Counter(chemical_symbols[int(z)] for _, f in kept for z in f.numbers).items())),
            energies=sum(_results(f).get("energy") is not None for _, f in kept),
            stresses=sum(_results(f).get("stress") is not None for _, f in kept),
            training_atoms=int(sum(np.count_nonzero(m) for m in marked)) if marked else None))
        for k, frame in kept:
            data.frames.append(frame)
            data.origins.append((str(path), k))
    return data
