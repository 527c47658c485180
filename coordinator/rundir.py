"""The durable run directory.

Layout::

    RUN_DIR/
      config.yaml           the validated run configuration
      state.json            where the run is (rewritten atomically after every durable step)
      events.jsonl          event log, one JSON object per line, flushed per event
      queue/frame_000012.npz    an uncertain frame waiting for (or being computed by) the
                                oracle: structure, the old model's forces and σ, the atoms the
                                acquisition picked, the walker and its sampler checkpoint
      queue/labelled/           entries whose label arrived (kept: a lost label can be recomputed)
      labels/label_000003.npz   every oracle label, numbered in ARRIVAL order, written
                                atomically (tmp + fsync + rename) BEFORE it is used; with
                                everything its queue entry held
      walkers/<name>/md_00000200.bin   the walker's sampler checkpoints (the latest ones kept)
      walkers/<name>/trajectory.xyz    frames (extended XYZ, per-atom force_std), appended
      learner/              the embedded learner's own model directory (data batches and
                            checkpoint manifests; a remote learner keeps it on its volume)
      heldout.xyz           at the end: the run's held-out labels with the final model's predictions
                            (the report's validation block; coordinator/validate.py)
      validation/           `epicycle validate RUN`: an independent trajectory labelled by the oracle
      summary.json, report.md, *.png   written at the end (and by `epicycle report`)

Whatever moment the process dies, every label that was returned by the oracle
and written here survives, and ``state.json`` plus the label and queue files say
exactly how to continue: which labels the learner checkpoint holds, which
frames are still to be labelled, where each walker stands.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from protos.errors import InvalidInput, NotFound
from protos.files import atomic_write

STATE_VERSION = 2


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
    walker: str = ""
    queue_seq: int = -1                  # the queue entry it answered (-1: the first frame)
    selection: list[int] | None = None   # atoms whose environments enter the training set
    predicted_forces: np.ndarray | None = None  # the old model's forces at this frame, eV/Å
    model_version: int = 0               # learner version that predicted them
    temperature_K: float = 0.0
    noise: float | None = None           # σn of the model that predicted them, eV/Å (None: older run dir)
    atom_std: np.ndarray | None = None   # (n,) eV/Å rotation-invariant σ per atom, old model (None: not known)

    def atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


@dataclass
class QueuedFrame:
    """An uncertain frame waiting for a label (``queue/frame_<seq>.npz``)."""

    seq: int
    walker: str
    step: int
    time_fs: float
    temperature_K: float
    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    force_std: np.ndarray          # (n, 3) eV/Å, old model
    predicted_forces: np.ndarray   # (n, 3) eV/Å, old model
    selection: list[int]           # atoms the acquisition picked
    checkpoint: bytes              # sampler state at the stop
    model_version: int
    max_sigma: float               # eV/Å, largest per-atom σ (atom_std)
    threshold: float               # eV/Å
    atom_std: np.ndarray | None = None  # (n,) eV/Å rotation-invariant σ per atom, old model (None: older run dir)
    noise: float | None = None          # σn of the old model, eV/Å (None: older run dir)

    def atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)

    @property
    def ratio(self) -> float:
        return self.max_sigma / self.threshold if self.threshold > 0 else float("inf")


@dataclass
class WalkerState:
    """Where one walker stands (part of ``state.json``)."""

    step: int = 0
    time_fs: float = 0.0
    md_checkpoint: str | None = None     # "label:<i>" or a file under walkers/; None: not started
    pending_override: int | None = None  # label whose forces integrate the checkpoint's step
    parked: int | None = None            # queue seq whose label the walker waits for
    waiting_update: bool = False         # its frame was covered by another label: resume after the next update
    skip_gate: bool = False              # oracle.on_failure: skip — integrate one step on the model
    done: bool = False
    last_call_step: int = 0              # step of the walker's latest uncertain frame
    # policy.update: trial (coordinator/trial.py)
    model_version: int = 0               # learner version the walker integrates on (0: not started yet;
                                         # -1: unknown after a resume, its next chunk trials the newest)
    trial: dict | None = None            # the trial under way: version, attempt, rollback point, Δt before
    rejected_version: int = 0            # newest version this walker rejected (trial again only on a newer one)
    timestep_fs: float | None = None     # reduced Δt in force (None: the configured one)
    stable_steps: int = 0                # steps since Δt last changed without a failed trial
    judged_steps: int = 0                # steps judged on model_version from where the walker adopted it
                                         # (< policy.trial.window_steps: its next chunk is judged too)
    halted: str = ""                     # why the walker stopped for good (e.g. no stable model left)
    resend_schedule: bool = False        # the schedule changed on resume: send it with the next chunk
    ungated_until: int = -1              # policy.min_steps_between_calls: steps up to this one run ungated


@dataclass
class RunState:
    """Progress of a run; ``state.json``."""

    version: int = STATE_VERSION
    oracle_calls: int = 0            # labels written: labels/label_0..oracle_calls-1 (arrival order)
    labels_applied: int = 0          # labels 0..labels_applied-1 are in the learner's training set
    learner_checkpoint: str | None = None  # the learner's checkpoint holding exactly those labels
    apply_batches: list[list[int]] = field(default_factory=list)  # labels per AddData batch, in order
    label_sha256: list[str] = field(default_factory=list)  # per label: SHA-256 of its file as written
    label_seqs: list[int] = field(default_factory=list)    # per label: the queue entry it answered (-1: first)
    training_atoms: list[list[int]] = field(default_factory=list)  # per applied label, atoms added
    next_seq: int = 0                # next queue sequence number
    in_flight: list[int] = field(default_factory=list)  # queue seqs sent to the oracle, not yet labelled
    walkers: dict[str, dict] = field(default_factory=dict)  # name -> WalkerState fields
    counters: dict[str, int] = field(default_factory=dict)  # deduplicated, dropped, recomputed, skipped
    wall_seconds: float = 0.0        # summed over the run's processes (resumes)
    finished: bool = False
    stop_reason: str = ""

    def walker(self, name: str) -> WalkerState:
        return WalkerState(**self.walkers.get(name, {}))

    def set_walker(self, name: str, ws: WalkerState) -> None:
        self.walkers[name] = dict(ws.__dict__)

    def count(self, name: str, k: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + k

    @property
    def step(self) -> int:
        """MD steps summed over the walkers."""
        return sum(int(w.get("step", 0)) for w in self.walkers.values())

    @property
    def time_fs(self) -> float:
        """Simulated time summed over the walkers, fs."""
        return float(sum(float(w.get("time_fs", 0.0)) for w in self.walkers.values()))


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.labels_dir = self.path / "labels"
        self.queue_dir = self.path / "queue"
        self.labelled_dir = self.queue_dir / "labelled"
        self.walkers_dir = self.path / "walkers"
        self._events = None
        self._events_lock = threading.Lock()

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, config_text: str) -> "RunDirectory":
        rd = cls(path)
        if rd.path.exists() and any(rd.path.iterdir()):
            raise InvalidInput(f"run directory {rd.path} already exists and is not empty; "
                               f"use --resume {rd.path} to continue it, or choose another --run-dir")
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.labels_dir.mkdir()
        rd.queue_dir.mkdir()
        rd.walkers_dir.mkdir()
        atomic_write(rd.path / "config.yaml", config_text.encode())
        rd.save_state(RunState())
        return rd

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        rd = cls(path)
        if not (rd.path / "state.json").is_file() or not (rd.path / "config.yaml").is_file():
            raise NotFound(f"{rd.path} is not an Epicycle run directory (no state.json/config.yaml)")
        rd.labels_dir.mkdir(exist_ok=True)
        rd.queue_dir.mkdir(exist_ok=True)
        rd.walkers_dir.mkdir(exist_ok=True)
        return rd

    # -- state -----------------------------------------------------------------------------

    def load_state(self) -> RunState:
        path = self.path / "state.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path} is unreadable ({exc}); it is rewritten atomically, so this is damage "
                               f"from outside the run — restore it from a backup") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise InvalidInput(f"{path} has version {version}, this Epicycle reads version {STATE_VERSION} "
                               f"(runs of version 1 were made before multi-walker runs; finish them with the "
                               f"Epicycle that started them)")
        try:
            return RunState(**data)
        except TypeError as exc:
            raise InvalidInput(f"{path}: unexpected content ({exc})") from None

    def save_state(self, state: RunState) -> None:
        atomic_write(self.path / "state.json", json.dumps(state.__dict__, indent=1).encode())

    # -- events ----------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event (thread-safe: walkers log their frames from their own threads)."""
        record = {"event": kind, "wall_time": time.time(), **fields}
        line = json.dumps(record, default=_json_default) + "\n"
        with self._events_lock:
            if self._events is None:
                self._events = open(self.path / "events.jsonl", "a", buffering=1)
            self._events.write(line)
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

    def write_label(self, label: StoredLabel) -> str:
        """Write ``labels/label_<index>.npz`` atomically; returns the SHA-256 of the file."""
        arrays = {
            "positions": label.positions, "numbers": label.numbers, "cell": label.cell, "pbc": label.pbc,
            "forces": label.forces, "checkpoint": np.frombuffer(label.checkpoint, dtype=np.uint8),
        }
        if label.stress is not None:
            arrays["stress"] = label.stress
        if label.force_std is not None:
            arrays["force_std"] = label.force_std
        if label.atom_std is not None:
            arrays["atom_std"] = label.atom_std
        if label.predicted_forces is not None:
            arrays["predicted_forces"] = label.predicted_forces
        meta = {"index": label.index, "step": label.step, "time_fs": label.time_fs, "energy": label.energy,
                "structure_hash": label.structure_hash, "oracle_seconds": label.oracle_seconds,
                "worker": label.worker, "walker": label.walker, "queue_seq": label.queue_seq,
                "selection": label.selection, "model_version": label.model_version,
                "temperature_K": label.temperature_K, "noise": label.noise}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        data = buf.getvalue()
        atomic_write(self.label_path(label.index), data)
        return hashlib.sha256(data).hexdigest()

    def label_sha256(self, index: int) -> str:
        return hashlib.sha256(self.label_path(index).read_bytes()).hexdigest()

    def read_label(self, index: int) -> StoredLabel:
        path = self.label_path(index)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                label = StoredLabel(
                    index=meta["index"], step=meta["step"], time_fs=meta["time_fs"], positions=z["positions"],
                    numbers=z["numbers"], cell=z["cell"], pbc=z["pbc"], energy=meta["energy"], forces=z["forces"],
                    stress=z["stress"] if "stress" in z else None,
                    force_std=z["force_std"] if "force_std" in z else None,
                    checkpoint=z["checkpoint"].tobytes(), structure_hash=meta["structure_hash"],
                    oracle_seconds=meta["oracle_seconds"], worker=meta.get("worker", ""),
                    walker=meta.get("walker", ""), queue_seq=meta.get("queue_seq", -1),
                    selection=meta.get("selection"),
                    predicted_forces=z["predicted_forces"] if "predicted_forces" in z else None,
                    model_version=meta.get("model_version", 0), temperature_K=meta.get("temperature_K", 0.0),
                    atom_std=z["atom_std"] if "atom_std" in z else None, noise=meta.get("noise"))
        except FileNotFoundError:
            raise NotFound(f"label file {path} is missing") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise InvalidInput(f"label file {path} is damaged ({type(exc).__name__}: {exc})") from None
        if label.index != index:
            raise InvalidInput(f"label file {path} holds label {label.index}, not {index}")
        return label

    def label_count(self) -> int:
        """Number of consecutive complete label files 0, 1, 2, ..."""
        n = 0
        while self.label_path(n).exists():
            n += 1
        return n

    def check(self, state: RunState) -> tuple[int, list[tuple[int, str]]]:
        """Check the labels against ``state``: ``(labels on disk, [(index, problem), ...])``.

        Every label 0..oracle_calls-1 must be present, readable and — where ``state.json`` recorded
        it — byte for byte the file the run wrote (SHA-256).  Labels written after the last state
        update (a kill between the two writes) must follow on without a gap.
        """
        problems: list[tuple[int, str]] = []
        for i in range(state.oracle_calls):
            path = self.label_path(i)
            if not path.exists():
                problems.append((i, f"{path} is missing"))
                continue
            try:
                self.read_label(i)
            except (InvalidInput, NotFound) as exc:
                problems.append((i, str(exc)))
                continue
            if i < len(state.label_sha256) and self.label_sha256(i) != state.label_sha256[i]:
                problems.append((i, f"{path} is not the file the run wrote (its SHA-256 differs from the one in "
                                    f"state.json)"))
        n = state.oracle_calls
        while self.label_path(n).exists():
            try:
                self.read_label(n)
            except (InvalidInput, NotFound):
                break  # cut by a kill before its rename? (renames are atomic: damage from outside) — stop here
            n += 1
        stray = sorted(int(p.stem.split("_")[1]) for p in self.labels_dir.glob("label_*.npz"))
        stray = [i for i in stray if i > n or (i == n and self.label_path(n).exists())]
        if stray:
            problems.append((n, f"{self.label_path(n)} is missing or damaged but {self.label_path(stray[-1])} exists: "
                                f"the labels are not consecutive, so the run cannot know their order"))
        return n, problems

    def audit(self, state: RunState) -> int:
        """:meth:`check` before a resume, raising :class:`InvalidInput` that names every problem and the way
        out — a resume never renumbers or overwrites labels.  Temporary files of interrupted writes are removed.
        Returns the number of labels on disk."""
        self.remove_temporary_files()
        n, problems = self.check(state)
        if problems:
            raise InvalidInput(f"{self.path} cannot be resumed as it is:\n  " + "\n  ".join(p for _, p in problems)
                               + f"\nRestore the file(s) from a backup, or let the oracle label the same structure(s) "
                               f"again with: epicycle run --resume {self.path} --repair")
        return n

    # -- the label queue ------------------------------------------------------------------

    def queue_path(self, seq: int) -> Path:
        return self.queue_dir / f"frame_{seq:06d}.npz"

    def write_queue_entry(self, q: QueuedFrame) -> None:
        arrays = {"positions": q.positions, "numbers": q.numbers, "cell": q.cell, "pbc": q.pbc,
                  "force_std": q.force_std, "predicted_forces": q.predicted_forces,
                  "checkpoint": np.frombuffer(q.checkpoint, dtype=np.uint8)}
        if q.atom_std is not None:
            arrays["atom_std"] = q.atom_std
        meta = {"seq": q.seq, "walker": q.walker, "step": q.step, "time_fs": q.time_fs,
                "temperature_K": q.temperature_K, "selection": [int(i) for i in q.selection],
                "model_version": q.model_version, "max_sigma": q.max_sigma, "threshold": q.threshold,
                "noise": q.noise}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write(self.queue_path(q.seq), buf.getvalue())

    def read_queue_entry(self, seq: int, archived: bool = False) -> QueuedFrame:
        """Queue entry ``seq``; ``archived``: the one kept in ``queue/labelled/`` after its label arrived."""
        path = self.labelled_dir / self.queue_path(seq).name if archived else self.queue_path(seq)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return QueuedFrame(seq=meta["seq"], walker=meta["walker"], step=meta["step"],
                                   time_fs=meta["time_fs"], temperature_K=meta["temperature_K"],
                                   positions=z["positions"], numbers=z["numbers"], cell=z["cell"], pbc=z["pbc"],
                                   force_std=z["force_std"], predicted_forces=z["predicted_forces"],
                                   selection=list(meta["selection"]), checkpoint=z["checkpoint"].tobytes(),
                                   model_version=meta["model_version"], max_sigma=meta["max_sigma"],
                                   threshold=meta["threshold"],
                                   atom_std=z["atom_std"] if "atom_std" in z else None, noise=meta.get("noise"))
        except FileNotFoundError:
            raise NotFound(f"queue entry {path} is missing") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise InvalidInput(f"queue entry {path} is damaged ({type(exc).__name__}: {exc})") from None

    def queued_seqs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.queue_dir.glob("frame_*.npz"))

    def remove_queue_entry(self, seq: int) -> None:
        self.queue_path(seq).unlink(missing_ok=True)

    def archive_queue_entry(self, seq: int) -> None:
        """Keep a labelled frame's entry in ``queue/labelled/``: its label can be recomputed if it is lost."""
        src = self.queue_path(seq)
        if src.exists():
            self.labelled_dir.mkdir(exist_ok=True)
            os.replace(src, self.labelled_dir / src.name)

    # -- walkers ---------------------------------------------------------------------------

    def walker_dir(self, name: str) -> Path:
        d = self.walkers_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_walker_checkpoint(self, name: str, step: int, data: bytes, kind: str = "md") -> str:
        """Sampler checkpoint of walker ``name`` at ``step``; returns its path relative to the run.

        ``kind``: ``md`` at a chunk boundary, ``stop`` at an uncertain frame (its step not integrated yet).
        """
        path = self.walker_dir(name) / f"{kind}_{step:08d}.bin"
        atomic_write(path, data)
        return str(path.relative_to(self.path))

    def prune_walker_checkpoints(self, name: str, keep: set[str]) -> None:
        """Remove the walker's checkpoints except the newest two and those in ``keep`` (run-relative)."""
        files = sorted(self.walker_dir(name).glob("*_*.bin"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in files[:-2]:
            if str(old.relative_to(self.path)) not in keep:
                old.unlink(missing_ok=True)

    def read_bytes(self, relative: str) -> bytes:
        path = self.path / relative
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path} is missing") from None

    def remove_temporary_files(self) -> list[Path]:
        """Delete ``.*.tmp<pid>`` files left by writes that a kill interrupted; returns them."""
        removed = []
        for d in (self.path, self.labels_dir, self.queue_dir, self.labelled_dir, *self.walkers_dir.glob("*")):
            if d.is_dir():
                for tmp in d.glob(".*.tmp*"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    # -- trajectories ----------------------------------------------------------------------

    def trajectory_path(self, walker: str) -> Path:
        return self.walker_dir(walker) / "trajectory.xyz"

    def append_frames(self, walker: str, atoms_list) -> None:
        import ase.io

        if not atoms_list:
            return
        with open(self.trajectory_path(walker), "a") as handle:
            ase.io.write(handle, atoms_list, format="extxyz")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_trajectory(self, walker: str, last_step: int) -> None:
        """Drop frames after ``last_step`` (written before a crash, to be recomputed identically)."""
        import ase.io

        path = self.trajectory_path(walker)
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

    def read_trajectory(self, walker: str):
        import ase.io

        path = self.trajectory_path(walker)
        if not path.exists() or path.stat().st_size == 0:
            return []
        return ase.io.read(path, index=":")

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
