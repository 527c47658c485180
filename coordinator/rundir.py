"""The durable run directory.

Layout::

    RUN_DIR/
      config.yaml           the validated run configuration
      state.json            where the run is (rewritten atomically after every durable step)
      events.jsonl          event log, one JSON object per line, flushed per event
      labels/label_000003.npz   every oracle label, written atomically (tmp + fsync + rename)
                                BEFORE it is used; with the structure, the stop frame's σ
                                and the sampler checkpoint at which it was taken
      models/model_000003.npz   learner model after applying label 3 (the latest two are kept)
      md_checkpoint.bin     latest sampler checkpoint at a chunk boundary
      trajectory.xyz        frames (extended XYZ, per-atom force_std), appended
      summary.json, report.md, *.png   written at the end (and by `epicycle report`)

Whatever moment the process dies, every label that was returned by the oracle
and written here survives, and ``state.json`` plus the label files say
exactly how to continue.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from protos.errors import InvalidInput, NotFound

STATE_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the whole new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class StoredLabel:
    """One oracle label as stored on disk (units: Å, eV, eV/Å, eV/Å³)."""

    index: int
    step: int
    time_fs: float
    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None
    forces: np.ndarray
    stress: np.ndarray | None
    force_std: np.ndarray | None        # σ of the stop frame under the old model (None: first frame)
    checkpoint: bytes                    # sampler state at the stop (b"" for the first frame)
    structure_hash: str = ""
    oracle_seconds: float = 0.0
    worker: str = ""

    def atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


@dataclass
class RunState:
    """Progress of a run; ``state.json``."""

    version: int = STATE_VERSION
    labels_applied: int = 0          # labels 0..labels_applied-1 are in the learner's training set
    model_file: str | None = None    # learner model after the last applied label
    md_checkpoint: str | None = None  # file holding the sampler checkpoint to continue from
    pending_override: int | None = None  # label whose forces integrate the checkpoint's step
    step: int = 0
    time_fs: float = 0.0
    oracle_calls: int = 0
    training_atoms: list[list[int]] = field(default_factory=list)  # per label, atoms added
    finished: bool = False
    seed_state: dict | None = None


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.labels_dir = self.path / "labels"
        self.models_dir = self.path / "models"
        self._events = None

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, config_text: str) -> "RunDirectory":
        rd = cls(path)
        if rd.path.exists() and any(rd.path.iterdir()):
            raise InvalidInput(f"run directory {rd.path} already exists and is not empty; "
                               f"use --resume {rd.path} to continue it, or choose another --run-dir")
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.labels_dir.mkdir()
        rd.models_dir.mkdir()
        atomic_write(rd.path / "config.yaml", config_text.encode())
        rd.save_state(RunState())
        return rd

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        rd = cls(path)
        if not (rd.path / "state.json").is_file() or not (rd.path / "config.yaml").is_file():
            raise NotFound(f"{rd.path} is not an Epicycle run directory (no state.json/config.yaml)")
        rd.labels_dir.mkdir(exist_ok=True)
        rd.models_dir.mkdir(exist_ok=True)
        return rd

    # -- state -----------------------------------------------------------------------------

    def load_state(self) -> RunState:
        data = json.loads((self.path / "state.json").read_text())
        if data.get("version") != STATE_VERSION:
            raise InvalidInput(f"{self.path}/state.json has version {data.get('version')}, "
                               f"this Epicycle reads version {STATE_VERSION}")
        return RunState(**data)

    def save_state(self, state: RunState) -> None:
        atomic_write(self.path / "state.json", json.dumps(state.__dict__, indent=1).encode())

    # -- events ----------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        if self._events is None:
            self._events = open(self.path / "events.jsonl", "a", buffering=1)
        record = {"event": kind, "wall_time": time.time(), **fields}
        self._events.write(json.dumps(record, default=_json_default) + "\n")
        self._events.flush()

    def events(self) -> Iterator[dict]:
        path = self.path / "events.jsonl"
        if not path.exists():
            return
        with open(path) as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill

    # -- labels ----------------------------------------------------------------------------

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"label_{index:06d}.npz"

    def write_label(self, label: StoredLabel) -> None:
        arrays = {
            "positions": label.positions, "numbers": label.numbers, "cell": label.cell, "pbc": label.pbc,
            "forces": label.forces, "checkpoint": np.frombuffer(label.checkpoint, dtype=np.uint8),
        }
        if label.stress is not None:
            arrays["stress"] = label.stress
        if label.force_std is not None:
            arrays["force_std"] = label.force_std
        meta = {"index": label.index, "step": label.step, "time_fs": label.time_fs, "energy": label.energy,
                "structure_hash": label.structure_hash, "oracle_seconds": label.oracle_seconds,
                "worker": label.worker}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write(self.label_path(label.index), buf.getvalue())

    def read_label(self, index: int) -> StoredLabel:
        with np.load(self.label_path(index), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return StoredLabel(
                index=meta["index"], step=meta["step"], time_fs=meta["time_fs"], positions=z["positions"],
                numbers=z["numbers"], cell=z["cell"], pbc=z["pbc"], energy=meta["energy"], forces=z["forces"],
                stress=z["stress"] if "stress" in z else None,
                force_std=z["force_std"] if "force_std" in z else None,
                checkpoint=z["checkpoint"].tobytes(), structure_hash=meta["structure_hash"],
                oracle_seconds=meta["oracle_seconds"], worker=meta.get("worker", ""))

    def label_count(self) -> int:
        """Number of consecutive complete label files 0, 1, 2, ..."""
        n = 0
        while self.label_path(n).exists():
            n += 1
        return n

    # -- models and MD checkpoints ---------------------------------------------------------

    def write_model(self, index: int, data: bytes) -> str:
        name = f"model_{index:06d}.npz"
        atomic_write(self.models_dir / name, data)
        for old in sorted(self.models_dir.glob("model_*.npz"))[:-2]:
            old.unlink()
        return f"models/{name}"

    def write_md_checkpoint(self, data: bytes) -> str:
        atomic_write(self.path / "md_checkpoint.bin", data)
        return "md_checkpoint.bin"

    def read_bytes(self, relative: str) -> bytes:
        return (self.path / relative).read_bytes()

    # -- trajectory ------------------------------------------------------------------------

    def append_frames(self, atoms_list) -> None:
        import ase.io

        if not atoms_list:
            return
        with open(self.path / "trajectory.xyz", "a") as handle:
            ase.io.write(handle, atoms_list, format="extxyz")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_trajectory(self, last_step: int) -> None:
        """Drop frames after ``last_step`` (written before a crash, to be recomputed identically)."""
        import ase.io

        path = self.path / "trajectory.xyz"
        if not path.exists():
            return
        try:
            frames = ase.io.read(path, index=":")
        except Exception:  # noqa: BLE001 - a frame cut by a kill: keep what parses
            frames = _read_complete_frames(path)
        keep = [f for f in frames if int(f.info.get("step", 0)) <= last_step]
        tmp = io.StringIO()
        if keep:
            ase.io.write(tmp, keep, format="extxyz")
        atomic_write(path, tmp.getvalue().encode())

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _read_complete_frames(path: Path):
    import ase.io

    lines = path.read_text().splitlines(keepends=True)
    frames, i = [], 0
    while i < len(lines):
        try:
            n = int(lines[i].strip())
        except ValueError:
            break
        chunk = lines[i:i + n + 2]
        if len(chunk) < n + 2:
            break
        try:
            frames.append(ase.io.read(io.StringIO("".join(chunk)), format="extxyz"))
        except Exception:  # noqa: BLE001
            break
        i += n + 2
    return frames


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
