"""Checkpoint blobs: an ``.npz`` archive in memory, no pickle.

Layout: every array under its own name (float64 arrays are stored exactly, so a
restored run repeats the original bit for bit) plus ``__meta__``, a JSON
document (UTF-8 bytes as a uint8 array) with ``format``, ``version``,
``engine``, the settings and scalar state (Python floats round-trip exactly
through JSON's ``repr``; the NumPy ``bit_generator.state`` dict is plain JSON).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from protos.errors import InvalidInput
from sampler_service.force_providers import ForceResult

FORMAT = "epicycle.sampler.checkpoint"
VERSION = 1


def pack(engine: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    doc = {"format": FORMAT, "version": VERSION, "engine": engine, **meta}
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["__meta__"] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    return buf.getvalue()


def unpack(blob: bytes, engine: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Decode a blob made by :func:`pack`; :class:`InvalidInput` if it is not one, or of another engine
    (``engine=None``: any engine)."""
    return _read(blob, engine, with_arrays=True)


def engine_of(blob: bytes) -> str:
    """The name of the engine that wrote ``blob`` (only the metadata is decoded); :class:`InvalidInput`
    if it is not a checkpoint."""
    doc, _ = _read(blob, None, with_arrays=False)
    return str(doc.get("engine"))


def _read(blob, engine: str | None, with_arrays: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"checkpoint must be bytes, got {type(blob).__name__}")
    try:
        with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as z:
            meta = z["__meta__"]
            arrays = {k: z[k] for k in z.files if k != "__meta__"} if with_arrays else {}
        doc = json.loads(meta.tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not a sampler checkpoint ({exc})") from None
    if doc.get("format") != FORMAT:
        raise InvalidInput(f"not a sampler checkpoint (format {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise InvalidInput(
            f"sampler checkpoint version {doc.get('version')!r} is not supported (this code reads {VERSION})"
        )
    if engine is not None and doc.get("engine") != engine:
        raise InvalidInput(f"checkpoint is from engine {doc.get('engine')!r}, cannot restore into {engine!r}")
    return doc, arrays


def result_to_arrays(prefix: str, r: ForceResult | None, meta: dict[str, Any],
                     arrays: dict[str, np.ndarray]) -> None:
    """Store a ForceResult (or None) under ``prefix`` in ``meta``/``arrays``."""
    if r is None:
        meta[prefix] = None
        return
    meta[prefix] = {"energy": r.energy, "noise": r.noise, "model_version": r.model_version,
                    "has_stress": r.stress is not None, "has_std": r.force_std is not None,
                    "has_atom_std": r.atom_std is not None}
    arrays[f"{prefix}.forces"] = r.forces
    if r.stress is not None:
        arrays[f"{prefix}.stress"] = r.stress
    if r.force_std is not None:
        arrays[f"{prefix}.force_std"] = r.force_std
    if r.atom_std is not None:
        arrays[f"{prefix}.atom_std"] = r.atom_std


def result_from_arrays(prefix: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ForceResult | None:
    m = meta.get(prefix)
    if m is None:
        return None
    return ForceResult(
        energy=m["energy"], forces=arrays[f"{prefix}.forces"].copy(),
        stress=arrays[f"{prefix}.stress"].copy() if m["has_stress"] else None,
        force_std=arrays[f"{prefix}.force_std"].copy() if m["has_std"] else None,
        noise=m["noise"], model_version=m["model_version"],
        atom_std=arrays[f"{prefix}.atom_std"].copy() if m.get("has_atom_std") else None,
    )
