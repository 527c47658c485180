"""Trajectory output: extended XYZ frames with per-atom σ.

Each frame is written by ASE's extxyz writer from :meth:`Frame.to_atoms`:
``forces`` (eV/Å) and ``energy`` (eV) from the calculator, ``force_std``
(eV/Å, per atom and component), ``atom_std`` (eV/Å, the rotation-invariant σ of each
atom's force, when the model gives it) and ``momenta`` (if velocities are known) as
per-atom arrays, and ``step``, ``time_fs``, ``model_version``, ``max_atom_std``,
``forces_supplied``, ``temperature_K``, ``kinetic_eV``, ``potential_eV``,
``conserved_eV``, ``heat_eV``, ``pressure_GPa`` ... in the comment line (``info``).
"""

from __future__ import annotations

import os
from typing import IO, Iterable

import ase.io
from ase import Atoms

from sampler_service.engine_interface import Frame


class ExtXYZWriter:
    """Append frames to an extended XYZ file; usable directly as ``on_frame``.

    >>> with ExtXYZWriter(tmp_path / "md.xyz") as w:
    ...     engine.run(100, on_frame=w)
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = os.fspath(path)
        self._fh: IO[str] | None = open(self.path, "a" if append else "w")
        self.count = 0

    def __call__(self, frame: Frame) -> None:
        self.write(frame)

    def write(self, frame: Frame) -> None:
        if self._fh is None:
            raise ValueError(f"trajectory writer for {self.path} is closed")
        ase.io.write(self._fh, frame.to_atoms(), format="extxyz")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ExtXYZWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_frames(path: str | os.PathLike, frames: Iterable[Frame], append: bool = False) -> int:
    """Write ``frames`` to ``path``; returns how many."""
    with ExtXYZWriter(path, append=append) as w:
        for f in frames:
            w.write(f)
        return w.count


def read_frames(path: str | os.PathLike) -> list[Atoms]:
    """All frames of an extended XYZ trajectory as ASE Atoms (σ in ``arrays['force_std']``)."""
    return ase.io.read(os.fspath(path), index=":", format="extxyz")
