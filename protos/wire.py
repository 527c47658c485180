"""Conversions between protobuf messages and NumPy / ASE objects.

Arrays cross as raw little-endian bytes (:class:`Array`), so encoding and
decoding a 10,000-atom structure costs a few memory copies, not a Python loop.
Every decoder checks dtype, shape and byte length and raises
:class:`protos.errors.InvalidInput` naming the field, so servicers can hand
client data straight to these functions.  A dtype is converted on decoding only
when no meaning is lost (integers to floats; floats to integers only when every
value is integral; booleans never to numbers or back), and the structure and
label decoders also reject values no atomistic structure has (non-finite or
beyond :data:`MAX_LENGTH`, atomic numbers outside 1..:data:`MAX_ATOMIC_NUMBER`),
so every service gets the same first line of defence.
"""

from __future__ import annotations

from typing import Any, Sequence

import math

import numpy as np
from ase import Atoms

from protos.epicycle.v1 import common_pb2 as pb
from protos.errors import InvalidInput

# Velocities cross the wire in Å/fs; ASE stores them in Å/(ASE time unit).
from ase import units as _units

ASE_VELOCITY_PER_A_FS = 1.0 / _units.fs  # multiply Å/fs by this to get ASE units
A_FS_PER_ASE_VELOCITY = _units.fs

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_CODES: dict[np.dtype, int] = {v: k for k, v in _DTYPES.items()}

#: largest magnitude of a coordinate or a cell-vector component, Å.  No atomistic structure
#: comes near it; beyond it (1e300) volumes overflow and image counts become NaN downstream.
MAX_LENGTH = 1.0e6
#: largest speed component accepted on the wire, Å/fs (the speed of light is 2998 Å/fs)
MAX_SPEED = 3.0e3
#: atomic numbers 1..MAX_ATOMIC_NUMBER (hydrogen..oganesson); 0 (ASE's dummy "X") is not an atom
MAX_ATOMIC_NUMBER = 118
#: numpy's limit on the number of dimensions
_MAX_NDIM = 32


def encode_array(values: Any, dtype: str | np.dtype = "<f8", out: pb.Array | None = None) -> pb.Array:
    """Encode an array-like as an :class:`Array` message of the given dtype."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).kind != "b" else np.dtype("?")
    arr = np.asarray(values, dtype=dt)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    msg = out if out is not None else pb.Array()
    msg.dtype = _CODES[dt]
    msg.shape[:] = arr.shape
    msg.data = arr.tobytes()
    return msg


def decode_array(
    msg: pb.Array,
    name: str,
    shape: Sequence[int | None] | None = None,
    dtype: str | np.dtype | None = None,
    writable: bool = False,
    finite: bool = False,
    max_abs: float | None = None,
) -> np.ndarray:
    """Decode an :class:`Array`, checking its byte length and (optionally) shape.

    ``shape`` may contain ``None`` for "any length" along that axis.  With
    ``dtype`` the result is converted (e.g. float32 on the wire -> float64), but only
    without loss of meaning: booleans convert to nothing else and nothing converts to
    booleans, and floats convert to integers only if every value is an integer.
    ``finite`` rejects NaN and infinities, ``max_abs`` values of larger magnitude.
    The returned array is read-only (a view on the message bytes) unless
    ``writable`` is true.  Every failure is :class:`InvalidInput` naming ``name``.
    """
    try:
        wire_dtype = _DTYPES[msg.dtype]
    except KeyError:
        raise InvalidInput(f"{name}: unknown or unspecified dtype code {msg.dtype}") from None
    dims = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{name}: negative dimension in shape {_short(dims)}")
    if len(dims) > _MAX_NDIM:
        raise InvalidInput(f"{name}: {len(dims)} dimensions (at most {_MAX_NDIM})")
    if shape is not None:
        if len(dims) != len(shape) or any(s is not None and s != d for s, d in zip(shape, dims)):
            want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
            raise InvalidInput(f"{name}: expected shape {want}, got {_short(dims)}")
    count = math.prod(dims)  # Python integers: a claimed shape cannot overflow to match the data
    if len(msg.data) != count * wire_dtype.itemsize:
        raise InvalidInput(
            f"{name}: {len(msg.data)} bytes do not match shape {_short(dims)} of {wire_dtype.name} "
            f"({count * wire_dtype.itemsize} bytes expected)"
        )
    arr = np.frombuffer(msg.data, dtype=wire_dtype).reshape(dims)
    if dtype is not None and arr.dtype != np.dtype(dtype):
        arr = _convert(arr, np.dtype(dtype), name)
    elif writable:
        arr = arr.copy()
    if dtype is not None and arr.dtype == np.dtype(dtype) and writable and not arr.flags.writeable:
        arr = arr.copy()
    if (finite or max_abs is not None) and arr.dtype.kind in "fiu":
        _check_values(arr, name, max_abs)
    return arr


def _short(dims: tuple) -> str:
    text = str(dims)
    return text if len(text) <= 80 else text[:60] + " ... " + f"({len(dims)} dimensions)"


def _convert(arr: np.ndarray, target: np.dtype, name: str) -> np.ndarray:
    """``arr`` as ``target``, refusing conversions that change what the values mean."""
    src, dst = arr.dtype.kind, target.kind
    if (src == "b") != (dst == "b"):
        raise InvalidInput(f"{name}: expected {'booleans' if dst == 'b' else 'numbers'} "
                           f"({target.name}), got {arr.dtype.name}")
    if src == "f" and dst in "iu":
        integral = np.isfinite(arr) & (arr == np.round(arr))
        if arr.size and not integral.all():
            k = tuple(int(i) for i in np.argwhere(~integral)[0])
            raise InvalidInput(f"{name}: expected integers, got {float(arr[k])!r} at index {k}")
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InvalidInput(f"{name}: values outside the range of {target.name}")
    return arr.astype(target)


def _check_values(arr: np.ndarray, name: str, max_abs: float | None) -> None:
    arr = arr if arr.dtype.kind == "f" else arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if max_abs is not None:
        with np.errstate(invalid="ignore"):
            bad |= np.abs(arr) > max_abs
    if bad.any():
        k = tuple(int(i) for i in np.argwhere(bad)[0])
        value = arr[k] if k else arr[()]
        value = float(value)
        where = f" at index {k}" if k else ""
        if not math.isfinite(value):
            text = "NaN" if math.isnan(value) else repr(value)
            raise InvalidInput(f"{name} contains a non-finite value ({text}){where}")
        raise InvalidInput(f"{name} contains a value beyond ±{max_abs:g} ({value!r}){where}")


def has_array(msg: Any, field: str) -> bool:
    return msg.HasField(field) and len(getattr(msg, field).shape) > 0


def decode_atom_std(prediction: Any, n_atoms: int, name: str = "prediction") -> np.ndarray | None:
    """``Prediction.atom_std`` (n_atoms,) eV/Å -- the rotation-invariant epistemic σ of each
    atom's force -- as a float64 array, or ``None`` when the sender did not fill it (a model
    with per-component σ only; readers then fall back to the largest component σ of each
    atom).  Every value must be finite and >= 0 (InvalidInput naming ``name.atom_std``)."""
    if not has_array(prediction, "atom_std"):
        return None
    where = f"{name}.atom_std"
    arr = decode_array(prediction.atom_std, where, (n_atoms,), "<f8", finite=True)
    if arr.size and float(arr.min()) < 0.0:
        i = int(np.argmin(arr))
        raise InvalidInput(f"{where} contains a negative σ ({float(arr[i])!r}) at index ({i},)")
    return arr


# --------------------------------------------------------------------------- structures


def structure_to_proto(atoms: Atoms, out: pb.Structure | None = None, velocities: bool = True) -> pb.Structure:
    """Encode ``atoms``: positions Å, numbers, cell Å, pbc, velocities Å/fs (if any)."""
    msg = out if out is not None else pb.Structure()
    encode_array(atoms.positions, "<f8", msg.positions)
    encode_array(atoms.numbers, "<i4", msg.numbers)
    encode_array(atoms.cell.array, "<f8", msg.cell)
    msg.pbc[:] = [bool(p) for p in atoms.pbc]
    if velocities and atoms.has("momenta"):
        encode_array(atoms.get_velocities() * A_FS_PER_ASE_VELOCITY, "<f8", msg.velocities)
    if atoms.has("masses"):
        encode_array(atoms.get_masses(), "<f8", msg.masses)
    return msg


def structure_from_proto(msg: pb.Structure, name: str = "structure") -> Atoms:
    """Decode a :class:`Structure` into ASE ``Atoms``, checking every shape.

    Raises :class:`InvalidInput` for missing positions/numbers, inconsistent
    lengths, a wrong cell/pbc shape, a wrong dtype (booleans, non-integral atomic
    numbers), non-finite or absurd values (beyond :data:`MAX_LENGTH` Å,
    :data:`MAX_SPEED` Å/fs), atomic numbers outside 1..118 and non-positive
    masses.  Physics (overlapping atoms, singular periodic cell, elements a
    backend or model does not know, atom limits) is the service's validator's job.
    """
    if not has_array(msg, "positions"):
        raise InvalidInput(f"{name}.positions is missing")
    if not has_array(msg, "numbers"):
        raise InvalidInput(f"{name}.numbers is missing")
    positions = decode_array(msg.positions, f"{name}.positions", (None, 3), "<f8", max_abs=MAX_LENGTH)
    numbers = decode_array(msg.numbers, f"{name}.numbers", (None,), "<i8")
    n = len(numbers)
    if len(positions) != n:
        raise InvalidInput(f"{name}: {len(positions)} positions but {n} atomic numbers")
    check_atomic_numbers(f"{name}.numbers", numbers)
    if has_array(msg, "cell"):
        cell = decode_array(msg.cell, f"{name}.cell", (3, 3), "<f8", max_abs=MAX_LENGTH)
    else:
        cell = np.zeros((3, 3))
    if len(msg.pbc) not in (0, 3):
        raise InvalidInput(f"{name}.pbc must have 3 flags (or none), got {len(msg.pbc)}")
    pbc = list(msg.pbc) if len(msg.pbc) == 3 else [False, False, False]
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if has_array(msg, "masses"):
        masses = decode_array(msg.masses, f"{name}.masses", (n,), "<f8", finite=True)
        if n and masses.min() <= 0:
            k = int(np.argmin(masses))
            raise InvalidInput(f"{name}.masses: mass of atom {k} is {float(masses[k])!r} amu, not positive")
        atoms.set_masses(masses)
    if has_array(msg, "velocities"):
        vel = decode_array(msg.velocities, f"{name}.velocities", (n, 3), "<f8", max_abs=MAX_SPEED)
        atoms.set_velocities(vel * ASE_VELOCITY_PER_A_FS)
    if msg.info:
        atoms.info.update(dict(msg.info))
    return atoms


# --------------------------------------------------------------------------- labels


def labels_to_proto(
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
    out: pb.Labels | None = None,
) -> pb.Labels:
    msg = out if out is not None else pb.Labels()
    if energy is not None:
        msg.energy = float(energy)
    if forces is not None:
        encode_array(forces, "<f8", msg.forces)
    if stress is not None:
        encode_array(stress, "<f8", msg.stress)
    return msg


def labels_from_proto(
    msg: pb.Labels, n_atoms: int | None = None, name: str = "labels"
) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    """Decode labels to ``(energy eV, forces (n,3) eV/Å, stress (6,) eV/Å³)``; absent -> None.
    Non-finite values are :class:`InvalidInput`."""
    energy = msg.energy if msg.HasField("energy") else None
    check_finite(f"{name}.energy", energy)
    forces = (
        decode_array(msg.forces, f"{name}.forces", (n_atoms, 3), "<f8", finite=True)
        if has_array(msg, "forces") else None
    )
    stress = (decode_array(msg.stress, f"{name}.stress", (6,), "<f8", finite=True)
              if has_array(msg, "stress") else None)
    return energy, forces, stress


def check_finite(name: str, values: np.ndarray | float | None) -> None:
    """Raise :class:`InvalidInput` if ``values`` contains NaN or inf (naming the first bad index)."""
    if values is None:
        return
    arr = np.asarray(values)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0]) if arr.ndim else ()
        where = f" at index {idx}" if idx else ""
        raise InvalidInput(f"{name} contains a non-finite value ({arr[idx] if idx else arr}){where}")


def check_atomic_numbers(name: str, numbers: np.ndarray) -> None:
    """Raise :class:`InvalidInput` unless every atomic number is in 1..:data:`MAX_ATOMIC_NUMBER`."""
    numbers = np.asarray(numbers)
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if bad.size:
        k = int(bad[0])
        more = f" ({bad.size - 1} more)" if bad.size > 1 else ""
        raise InvalidInput(f"{name}: atomic number {int(numbers[k])} of atom {k} is outside "
                           f"1..{MAX_ATOMIC_NUMBER}{more}")
