"""Learner-owned checkpoints: the model directory (issue #11, part 3).

The learner owns its model's durability; nothing of size O(N²) crosses the wire or is
written.  A checkpoint is the training data as received (structures and labels, never
environments or matrices), the hyperparameters, and the history of how the Cholesky factor
was built, so that the model rebuilt from it predicts *bit for bit* like the model that wrote
it (a resumed on-the-fly run must continue the same trajectory).  The directory is
append-only: a checkpoint writes the data batches applied since the previous one and a small
manifest, so its cost is O(new data) and the directory grows linearly with the data::

    MODEL_DIR/
      data/batch_000017.npz       one per applied AddData / AddDataBatch (see write_batch)
      data/base_<crc32>_<bytes>.npz   a model file the data build on (LoadModel, --model)
      checkpoints/000042.json     manifests (see ModelDirectory.write_checkpoint)
      checkpoints/000041.json.superseded   abandoned by a restore of an earlier checkpoint
      checkpoints/LAST_ID         the last id handed out (ids are never reused)

Every file is written atomically (temporary file, fsync, rename, fsync of the directory).
The latest ``keep`` manifests are kept; data files referenced by none of them are removed.
Restoring checkpoint k supersedes the checkpoints after k: their data batches beyond k's are
overwritten by the next data batches of the restored model.

The manifest names the model's kind and settings (``model``: exact or sparse,
:mod:`learner_service.model`); its ``factor`` is the model's ``factor_history`` -- for the exact
GP a full factorisation (row count, hyperparameters, the kernel segments K was assembled from)
or a model file load, then block extensions at given row counts; for the sparse GP the blocks
its K_fU cache was built in.  :meth:`ModelDirectory.rebuild` re-adds the data in the same order
and replays that history (:meth:`LearnerModel.rebuild_factor`).
Rebuilding costs what the original factorisations cost (one kernel build and Cholesky at the
last full factorisation plus every extension since), and prints progress.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from ase import Atoms

from protos.errors import InvalidInput, ModelError, NotFound
from protos.files import atomic_write, fsync_dir

from learner_service.defaults import HYPERPARAMETER_UNITS

__all__ = ["ModelDirectory", "DataItem", "Lineage", "apply_items", "write_batch", "read_batch", "atomic_write",
           "INITIAL"]

CHECKPOINT_FORMAT = "epicycle-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
BATCH_FORMAT = "epicycle-data-batch"
INITIAL = "initial"
_ID_RE = re.compile(r"^\d{6,}$")


@dataclass(frozen=True)
class DataItem:
    """One labelled structure as AddData applies it (units as the proto: Å, eV, eV/Å, eV/Å³).

    ``forces`` (n, 3) or None; ``atom_indices`` the atoms whose environments enter the
    training set with their force labels; ``energy``/``stress`` (6,) ASE Voigt, used only if
    ``use_energy``/``use_stress``."""

    atoms: Atoms
    forces: np.ndarray | None
    atom_indices: np.ndarray
    energy: float | None = None
    stress: np.ndarray | None = None
    use_energy: bool = False
    use_stress: bool = False


def apply_items(gp, items: Sequence[DataItem]) -> None:
    """Add ``items`` to the model ``gp`` in order, exactly as the servicer's AddData does (the one
    place that turns a data item into :meth:`LearnerModel.add_frame` arguments, so a rebuild
    repeats it).  The model decides what of the frame enters it (learner_service/model.py)."""
    for it in items:
        gp.add_frame(it.atoms, forces=it.forces, selected=[int(i) for i in it.atom_indices],
                     energy=it.energy if it.use_energy else None,
                     stress=it.stress if it.use_stress else None)


@dataclass(frozen=True)
class Lineage:
    """Where the served model's data come from: the base model file (None: the empty
    model), the data batches ``first .. end-1`` applied on top of it, and ``files``: the
    ``(index, bytes, crc32)`` of those already written (a prefix of them)."""

    base: str | None = None
    first: int = 0
    end: int = 0
    files: tuple = ()

    def to_json(self) -> dict:
        return {"base": self.base, "first": self.first, "end": self.end, "files": [list(f) for f in self.files]}

    @classmethod
    def from_json(cls, d: Mapping) -> "Lineage":
        return cls(d.get("base"), int(d["first"]), int(d["end"]), tuple(tuple(int(v) for v in f) for f in d["files"]))


def code_fingerprint() -> dict:
    """What the bits of a rebuilt model depend on besides the data: the sources of the GP,
    its kernels and environments (numba compiles them; fastmath choices change the last
    bits) and the numpy/scipy/numba versions (BLAS/LAPACK, LLVM).  Recorded in every
    manifest; a rebuild by different code is exact to round-off but not bit for bit."""
    return dict(_fingerprint())


@functools.lru_cache(maxsize=1)
def _fingerprint() -> tuple:
    import numba
    import scipy

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("gp.py", "sparse_gp.py", *sorted(f"kernels/{p.name}" for p in (here / "kernels").glob("*.py")),
                 "environment.py", "checkpoints.py"):
        digest.update((here / name).read_bytes())
    return (("sources_sha256", digest.hexdigest()[:16]), ("numpy", np.__version__), ("scipy", scipy.__version__),
            ("numba", numba.__version__))


# --------------------------------------------------------------------------- files


def batch_bytes(items: Sequence[DataItem], index: int) -> bytes:
    """A data batch as .npz bytes: per item the structure (numbers, positions Å, cell Å,
    pbc), its labels (forces eV/Å, energy eV, stress eV/Å³; flags for absent ones), the
    atom indices and the use_energy/use_stress flags.  No environments, no matrices."""
    k = len(items)
    n_atoms = np.array([len(it.atoms) for it in items], dtype=np.int64)
    total = int(n_atoms.sum())
    forces = np.zeros((total, 3))
    has_forces = np.zeros(k, bool)
    energy = np.zeros(k)
    has_energy = np.zeros(k, bool)
    stress = np.zeros((k, 6))
    has_stress = np.zeros(k, bool)
    offset = 0
    for j, it in enumerate(items):
        n = len(it.atoms)
        if it.forces is not None:
            forces[offset:offset + n] = np.asarray(it.forces, dtype=np.float64).reshape(n, 3)
            has_forces[j] = True
        if it.energy is not None:
            energy[j] = float(it.energy)
            has_energy[j] = True
        if it.stress is not None:
            stress[j] = np.asarray(it.stress, dtype=np.float64).reshape(6)
            has_stress[j] = True
        offset += n
    arrays = {
        "n_atoms": n_atoms,
        "numbers": (np.concatenate([it.atoms.numbers for it in items]).astype(np.int64) if k
                    else np.zeros(0, np.int64)),
        "positions": (np.concatenate([it.atoms.positions for it in items]).astype(np.float64) if k
                      else np.zeros((0, 3))),
        "cell": np.array([it.atoms.cell.array for it in items], dtype=np.float64).reshape(k, 3, 3),
        "pbc": np.array([it.atoms.pbc for it in items], dtype=bool).reshape(k, 3),
        "forces": forces, "has_forces": has_forces,
        "index_count": np.array([len(it.atom_indices) for it in items], dtype=np.int64),
        "atom_indices": (np.concatenate([np.asarray(it.atom_indices, dtype=np.int64) for it in items]) if k
                         else np.zeros(0, np.int64)),
        "energy": energy, "has_energy": has_energy, "stress": stress, "has_stress": has_stress,
        "use_energy": np.array([it.use_energy for it in items], dtype=bool),
        "use_stress": np.array([it.use_stress for it in items], dtype=bool),
        "meta": np.frombuffer(json.dumps({"format": BATCH_FORMAT, "format_version": 1, "index": index}).encode(),
                              dtype=np.uint8),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_batch(path: Path) -> list[DataItem]:
    """The items of a data batch file written by :func:`batch_bytes`."""
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(bytes(d["meta"]).decode())
            if meta.get("format") != BATCH_FORMAT:
                raise InvalidInput(f"{path} is not an Epicycle data batch")
            a = {k: d[k] for k in d.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read data batch {path}: {exc}") from exc
    items = []
    atom0 = idx0 = 0
    for j in range(len(a["n_atoms"])):
        n = int(a["n_atoms"][j])
        m = int(a["index_count"][j])
        atoms = Atoms(numbers=a["numbers"][atom0:atom0 + n], positions=a["positions"][atom0:atom0 + n],
                      cell=a["cell"][j], pbc=a["pbc"][j])
        items.append(DataItem(
            atoms=atoms,
            forces=a["forces"][atom0:atom0 + n].copy() if a["has_forces"][j] else None,
            atom_indices=a["atom_indices"][idx0:idx0 + m].copy(),
            energy=float(a["energy"][j]) if a["has_energy"][j] else None,
            stress=a["stress"][j].copy() if a["has_stress"][j] else None,
            use_energy=bool(a["use_energy"][j]), use_stress=bool(a["use_stress"][j])))
        atom0 += n
        idx0 += m
    return items


def write_batch(path: Path, items: Sequence[DataItem], index: int) -> tuple[int, int]:
    """Write a data batch atomically; returns ``(bytes, crc32)``."""
    data = batch_bytes(items, index)
    atomic_write(path, data)
    return len(data), zlib.crc32(data)


def base_name(data: bytes) -> str:
    """Content-addressed name of a base model file (never overwritten by another)."""
    return f"base_{zlib.crc32(data):08x}_{len(data)}.npz"


# --------------------------------------------------------------------------- the directory


@dataclass
class CheckpointWritten:
    checkpoint_id: str
    bytes_written: int
    seconds: float
    files: tuple = field(default=())


class ModelDirectory:
    """A learner's model directory (layout in the module docstring)."""

    def __init__(self, path, keep: int = 5) -> None:
        if keep < 1:
            raise InvalidInput(f"keep_checkpoints must be >= 1, got {keep}")
        self.path = Path(path)
        self.keep = int(keep)
        self.data = self.path / "data"
        self.checkpoints = self.path / "checkpoints"

    def create(self) -> "ModelDirectory":
        for d in (self.path, self.data, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # -- naming -------------------------------------------------------------------------

    def batch_path(self, index: int) -> Path:
        return self.data / f"batch_{index:06d}.npz"

    def manifest_path(self, checkpoint_id: str) -> Path:
        return self.checkpoints / f"{checkpoint_id}.json"

    def checkpoint_ids(self) -> list[str]:
        """Restorable checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p.stem for p in self.checkpoints.glob("*.json") if _ID_RE.match(p.stem)), key=int)

    def latest_id(self) -> str | None:
        ids = self.checkpoint_ids()
        return ids[-1] if ids else None

    def _next_id(self) -> str:
        last = 0
        marker = self.checkpoints / "LAST_ID"
        if marker.exists():
            try:
                last = int(marker.read_text().strip() or 0)
            except ValueError:
                last = 0
        for p in self.checkpoints.glob("*.json*"):
            stem = p.name.split(".")[0]
            if _ID_RE.match(stem):
                last = max(last, int(stem))
        return f"{last + 1:06d}"

    # -- reading ------------------------------------------------------------------------

    def read_manifest(self, checkpoint_id: str) -> dict:
        """The manifest of ``checkpoint_id``; :class:`NotFound` naming the directory if absent."""
        if not _ID_RE.match(checkpoint_id or ""):
            raise NotFound(f"checkpoint id {checkpoint_id!r} is not a checkpoint of {self.path} "
                           f"(ids look like '000042', or '{INITIAL}')")
        path = self.manifest_path(checkpoint_id)
        if not path.exists():
            if path.with_name(path.name + ".superseded").exists():
                raise NotFound(f"checkpoint {checkpoint_id} in {self.path} was superseded by a restore of an "
                               f"earlier checkpoint")
            have = ", ".join(self.checkpoint_ids()[-5:]) or "none"
            raise NotFound(f"checkpoint {checkpoint_id} not found in {self.checkpoints} (latest: {have})")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"checkpoint manifest {path} is unreadable: {exc}") from exc
        if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ModelError(f"{path} is not an Epicycle checkpoint manifest of format version "
                             f"{CHECKPOINT_FORMAT_VERSION}")
        return manifest

    def rebuild(self, manifest: Mapping, progress: Callable[[str], None] | None = None,
                kernel_cache_max_rows: int | None = None):
        """The model of ``manifest``, rebuilt from its base file and data batches by
        replaying its factor history: bit for bit the model that wrote it."""
        from learner_service.environment import Cutoffs
        from learner_service.model import create_model, load_model

        t0 = time.perf_counter()
        lineage = Lineage.from_json(manifest["lineage"])
        hyps = {k: float(v) for k, v in manifest["hyperparameters"].items()}
        model = manifest.get("model") or {"kind": "exact", "settings": {}}
        if lineage.base:
            gp = load_model(self.data / lineage.base)
        else:
            gp = create_model(model["kind"], manifest["species"], manifest["cutoffs"], hyperparameters=hyps,
                              pair_cutoffs=Cutoffs.parse_pair_dict(manifest.get("pair_cutoffs")),
                              settings=model.get("settings"))
        if gp.kind != model["kind"]:
            raise ModelError(f"checkpoint {manifest['id']}: the manifest names a {model['kind']} model, its base "
                             f"file {lineage.base} holds a {gp.kind} one")
        gp.kernel_cache_max_rows = int(kernel_cache_max_rows or manifest["kernel_cache_max_rows"])
        if len(lineage.files) != lineage.end - lineage.first:
            raise ModelError(f"checkpoint {manifest['id']}: data batches {lineage.first}..{lineage.end - 1} but "
                             f"{len(lineage.files)} files listed")
        for index, size, crc in lineage.files:
            path = self.batch_path(index)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ModelError(f"checkpoint {manifest['id']}: data batch {path} is missing ({exc})") from exc
            if len(data) != size or zlib.crc32(data) != crc:
                raise ModelError(f"checkpoint {manifest['id']}: data batch {path} does not match the manifest "
                                 f"({len(data)} bytes, crc {zlib.crc32(data)}; expected {size}, {crc}) -- "
                                 f"overwritten after a restore of an earlier checkpoint?")
            apply_items(gp, read_batch(io.BytesIO(data)))
        if progress:
            progress(f"checkpoint {manifest['id']}: {gp.n_environments} environments, {gp.n_labels} labels read "
                     f"({time.perf_counter() - t0:.1f} s); rebuilding the factor")
        counts = gp.data_counts()
        if counts != manifest["counts"]:
            raise ModelError(f"checkpoint {manifest['id']}: the data give {counts}, the manifest says "
                             f"{manifest['counts']}")
        code = code_fingerprint()
        if manifest.get("code") not in (None, code) and progress:
            progress(f"checkpoint {manifest['id']} was written by other code ({manifest['code']}; this is {code}): "
                     f"the rebuilt model equals it to round-off, not bit for bit")
        gp.rebuild_factor(hyps, manifest["factor"], progress)
        gp.set_version(int(manifest["gp_version"]))
        if progress:
            progress(f"checkpoint {manifest['id']} rebuilt in {time.perf_counter() - t0:.1f} s")
        return gp

    def load(self, checkpoint_id: str | None = None, progress: Callable[[str], None] | None = None):
        """The model of ``checkpoint_id`` (default: the latest), rebuilt."""
        checkpoint_id = checkpoint_id or self.latest_id()
        if checkpoint_id is None:
            raise NotFound(f"model directory {self.path} has no checkpoints")
        return self.rebuild(self.read_manifest(checkpoint_id), progress)

    # -- writing ------------------------------------------------------------------------

    def write_checkpoint(self, gp, model_version: int, lineage: Lineage, pending: Mapping[int, Sequence[DataItem]],
                         pending_base: bytes | None) -> tuple[CheckpointWritten, Lineage, dict]:
        """Write the data batches not yet on disk (``pending``: index -> items; ``pending_base``:
        the bytes of ``lineage.base`` if not yet written), then the manifest, then prune.
        Returns what was written, the lineage with every file listed, and the manifest."""
        t0 = time.perf_counter()
        self.create()
        written = 0
        if lineage.base and pending_base is not None and not (self.data / lineage.base).exists():
            written += atomic_write(self.data / lineage.base, pending_base)
        files = list(lineage.files)
        for index in range(lineage.first + len(files), lineage.end):
            if index not in pending:
                raise ModelError(f"data batch {index} is neither written nor pending")
            size, crc = write_batch(self.batch_path(index), pending[index], index)
            files.append((index, size, crc))
            written += size
        lineage = Lineage(lineage.base, lineage.first, lineage.end, tuple(files))
        checkpoint_id = self._next_id()
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "id": checkpoint_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_version": int(model_version),
            "gp_version": int(gp.version),
            "model": {"kind": gp.kind, "settings": gp.settings()},
            "species": [int(z) for z in gp.species],
            "cutoffs": [float(gp.cutoffs.r2), float(gp.cutoffs.r3)],
            "pair_cutoffs": gp.cutoffs.pair_dict(),
            "hyperparameters": gp.hyperparameters,
            "units": {"cutoffs": "Å", **HYPERPARAMETER_UNITS},
            "n_environments": int(gp.n_environments),
            "n_labels": int(gp.n_labels),
            "counts": gp.data_counts(),
            "kernel_cache_max_rows": int(gp.kernel_cache_max_rows),
            "lineage": lineage.to_json(),
            "factor": gp.factor_history,
            "code": code_fingerprint(),
        }
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        written += atomic_write(self.manifest_path(checkpoint_id), data)
        atomic_write(self.checkpoints / "LAST_ID", f"{checkpoint_id}\n".encode())
        self.prune()
        return CheckpointWritten(checkpoint_id, written, time.perf_counter() - t0), lineage, manifest

    def supersede_after(self, checkpoint_id: str | None) -> list[str]:
        """Mark every checkpoint after ``checkpoint_id`` (None: all) as superseded."""
        done = []
        for cid in self.checkpoint_ids():
            if checkpoint_id is None or int(cid) > int(checkpoint_id):
                path = self.manifest_path(cid)
                os.replace(path, path.with_name(path.name + ".superseded"))
                done.append(cid)
        if done:
            fsync_dir(self.checkpoints)
        return done

    def prune(self) -> None:
        """Keep the latest ``keep`` manifests (and the newest superseded one), and the data
        files they reference; remove the rest."""
        ids = self.checkpoint_ids()
        for cid in ids[:-self.keep]:
            self.manifest_path(cid).unlink(missing_ok=True)
        superseded = sorted(self.checkpoints.glob("*.json.superseded"), key=lambda p: int(p.name.split(".")[0]))
        for p in superseded[:-1]:
            p.unlink(missing_ok=True)
        kept = [self.read_manifest(cid) for cid in ids[-self.keep:]]
        if not kept:
            return
        bases = {Lineage.from_json(m["lineage"]).base for m in kept}
        first = min(Lineage.from_json(m["lineage"]).first for m in kept)
        for p in self.data.glob("base_*.npz"):
            if p.name not in bases:
                p.unlink(missing_ok=True)
        for p in self.data.glob("batch_*.npz"):
            try:
                index = int(p.stem.split("_")[1])
            except (IndexError, ValueError):
                continue
            if index < first:
                p.unlink(missing_ok=True)


# fingerprint the sources as imported (a later edit of a file does not change this process's code)
_fingerprint()
