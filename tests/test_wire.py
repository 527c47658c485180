"""Encoding of arrays, structures and labels on the wire."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from protos import wire
from protos.epicycle.v1 import common_pb2 as pb
from protos.errors import InvalidInput


@pytest.mark.parametrize("dtype", ["<f8", "<f4", "<i4", "<i8", "?"])
def test_array_round_trip_every_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 3)) * 10
    if dtype == "?":
        values = values > 0
    arr = np.asarray(values, dtype=dtype)
    msg = pb.Array.FromString(wire.encode_array(arr, dtype).SerializeToString())
    back = wire.decode_array(msg, "x", (7, 3))
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, arr)


def test_scalar_and_empty_arrays() -> None:
    empty = wire.decode_array(wire.encode_array(np.zeros((0, 3))), "e", (None, 3))
    assert empty.shape == (0, 3)
    scalar = wire.decode_array(wire.encode_array(np.float64(2.5)), "s", ())
    assert scalar.shape == () and float(scalar) == 2.5


def test_structure_round_trip_is_exact() -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    rng = np.random.default_rng(1)
    atoms.set_velocities(rng.normal(size=(len(atoms), 3)) * 0.01)
    atoms.pbc = [True, True, False]
    data = wire.structure_to_proto(atoms).SerializeToString()
    back = wire.structure_from_proto(pb.Structure.FromString(data))
    np.testing.assert_array_equal(back.positions, atoms.positions)
    np.testing.assert_array_equal(back.numbers, atoms.numbers)
    np.testing.assert_array_equal(back.cell.array, atoms.cell.array)
    assert list(back.pbc) == [True, True, False]
    # velocities cross in Å/fs: one multiplication each way, exact to rounding
    np.testing.assert_allclose(back.get_velocities(), atoms.get_velocities(), rtol=1e-14, atol=0)


def test_velocities_are_angstrom_per_fs_on_the_wire() -> None:
    from ase import units

    atoms = Atoms("H", positions=[[0, 0, 0]])
    atoms.set_velocities([[1.0 / units.fs, 0, 0]])  # 1 Å/fs in ASE units
    msg = wire.structure_to_proto(atoms)
    v = wire.decode_array(msg.velocities, "v", (1, 3))
    np.testing.assert_allclose(v, [[1.0, 0, 0]], rtol=1e-14)


def test_molecule_without_cell_round_trips() -> None:
    atoms = molecule("H2O")
    back = wire.structure_from_proto(wire.structure_to_proto(atoms))
    assert not back.pbc.any()
    np.testing.assert_array_equal(back.positions, atoms.positions)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.ClearField("positions"), "positions is missing"),
        (lambda m: m.ClearField("numbers"), "numbers is missing"),
        (lambda m: m.positions.shape.__setitem__(slice(None), [5, 3]), "bytes do not match shape"),
        (lambda m: wire.encode_array(np.zeros((4, 2)), out=m.positions), "expected shape (n, 3)"),
        (lambda m: wire.encode_array(np.zeros((3, 3)), out=m.positions), "3 positions but 4 atomic numbers"),
        (lambda m: wire.encode_array(np.zeros((2, 3)), out=m.cell), "cell: expected shape (3, 3)"),
        (lambda m: m.pbc.extend([True]), "pbc must have 3 flags"),
        (lambda m: setattr(m.positions, "dtype", 0), "unknown or unspecified dtype"),
        (lambda m: wire.encode_array(np.zeros((2, 3)), out=m.velocities), "velocities: expected shape (4, 3)"),
    ],
)
def test_malformed_structures_are_rejected_with_a_named_field(mutate, message: str) -> None:
    msg = wire.structure_to_proto(bulk("Al", "fcc", a=4.05, cubic=True))
    mutate(msg)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        wire.structure_from_proto(msg)


def _set_array(field: str, values, dtype: str = "<f8"):
    return lambda m: wire.encode_array(values, dtype, out=getattr(m, field))


def _nan_at(shape, index, value=np.nan):
    a = np.zeros(shape)
    a[index] = value
    return a


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set_array("positions", _nan_at((4, 3), (2, 1))), "structure.positions contains a non-finite value (NaN) at index (2, 1)"),
        (_set_array("positions", _nan_at((4, 3), (0, 0), np.inf)), "structure.positions contains a non-finite value (inf)"),
        (_set_array("positions", _nan_at((4, 3), (3, 2), 1e300)), "structure.positions contains a value beyond ±1e+06 (1e+300) at index (3, 2)"),
        (_set_array("cell", np.eye(3) * 1e300), "structure.cell contains a value beyond ±1e+06 (1e+300) at index (0, 0)"),
        (_set_array("cell", _nan_at((3, 3), (1, 1))), "structure.cell contains a non-finite value (NaN)"),
        (_set_array("positions", np.ones((4, 3), bool), "?"), "structure.positions: expected numbers (float64), got bool"),
        (_set_array("numbers", [13, 13, 13, True], "?"), "structure.numbers: expected numbers"),
        (_set_array("numbers", [13, 13, 29.5, 13]), "structure.numbers: expected integers, got 29.5 at index (2,)"),
        (_set_array("numbers", [13, 13, np.nan, 13]), "structure.numbers: expected integers, got nan"),
        (_set_array("numbers", [13, 13, 1e30, 13]), "structure.numbers: values outside the range of int64"),
        (_set_array("numbers", [13, 200, 13, 13], "<i4"), "atomic number 200 of atom 1 is outside 1..118"),
        (_set_array("numbers", [13, 13, 13, 0], "<i4"), "atomic number 0 of atom 3 is outside 1..118"),
        (_set_array("numbers", [-3, 13, 13, -1], "<i8"), r"atomic number -3 of atom 0 is outside 1..118 (1 more)"),
        (_set_array("masses", [27.0, 0.0, 27.0, 27.0]), "structure.masses: mass of atom 1 is 0.0 amu, not positive"),
        (_set_array("masses", [27.0, np.nan, 27.0, 27.0]), "structure.masses contains a non-finite value (NaN)"),
        (_set_array("velocities", _nan_at((4, 3), (1, 0), 1e5)), "structure.velocities contains a value beyond ±3000 (100000.0) at index (1, 0)"),
    ],
)
def test_values_no_structure_has_are_rejected_at_the_wire(mutate, message: str) -> None:
    msg = wire.structure_to_proto(bulk("Al", "fcc", a=4.05, cubic=True))
    mutate(msg)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        wire.structure_from_proto(msg)


def test_integral_float_numbers_and_integer_positions_are_accepted() -> None:
    msg = wire.structure_to_proto(bulk("Al", "fcc", a=4.05, cubic=True))
    wire.encode_array([13.0, 13.0, 13.0, 13.0], "<f8", out=msg.numbers)
    wire.encode_array(np.arange(12).reshape(4, 3), "<i8", out=msg.positions)
    atoms = wire.structure_from_proto(msg)
    assert atoms.numbers.tolist() == [13] * 4
    assert atoms.positions[3].tolist() == [9.0, 10.0, 11.0]


@pytest.mark.parametrize(
    "shape, data, message",
    [
        ([2**62, 4], b"", "bytes do not match shape"),  # 2**64 elements: wraps to 0 in int64
        ([1] * 40, b"\0" * 8, "40 dimensions"),
        ([3, -1], b"", "negative dimension"),
    ],
)
def test_absurd_shapes_are_rejected(shape, data, message) -> None:
    msg = pb.Array(dtype=pb.DTYPE_FLOAT64, shape=shape, data=data)
    with pytest.raises(InvalidInput, match=message):
        wire.decode_array(msg, "x")


def test_non_finite_labels_are_rejected() -> None:
    forces = np.zeros((4, 3))
    forces[1, 2] = np.nan
    with pytest.raises(InvalidInput, match=r"labels.forces contains a non-finite value \(NaN\) at index \(1, 2\)"):
        wire.labels_from_proto(wire.labels_to_proto(forces=forces), 4)
    with pytest.raises(InvalidInput, match="labels.energy contains a non-finite value"):
        wire.labels_from_proto(wire.labels_to_proto(energy=float("inf")), 4)
    with pytest.raises(InvalidInput, match=r"labels.stress contains a non-finite value \(NaN\)"):
        wire.labels_from_proto(wire.labels_to_proto(stress=[0, 0, 0, 0, 0, np.nan]), 4)


def test_labels_round_trip_and_shape_check() -> None:
    forces = np.arange(12.0).reshape(4, 3)
    stress = np.linspace(-1, 1, 6)
    msg = pb.Labels.FromString(wire.labels_to_proto(-3.5, forces, stress).SerializeToString())
    e, f, s = wire.labels_from_proto(msg, 4)
    assert e == -3.5
    np.testing.assert_array_equal(f, forces)
    np.testing.assert_array_equal(s, stress)
    with pytest.raises(InvalidInput, match="labels.forces: expected shape"):
        wire.labels_from_proto(msg, 5)
    e, f, s = wire.labels_from_proto(pb.Labels(), 4)
    assert e is None and f is None and s is None


def test_check_finite_names_the_first_bad_index() -> None:
    arr = np.zeros((3, 3))
    arr[2, 1] = np.nan
    with pytest.raises(InvalidInput, match=r"positions contains a non-finite value .* at index \(2, 1\)"):
        wire.check_finite("positions", arr)
    wire.check_finite("ok", np.ones(3))


def test_prediction_atom_std_is_optional_and_checked() -> None:
    p = pb.Prediction()
    assert wire.decode_atom_std(p, 3) is None  # a model with per-component σ only
    wire.encode_array([0.1, 0.0, 0.25], "<f8", p.atom_std)
    np.testing.assert_array_equal(wire.decode_atom_std(pb.Prediction.FromString(p.SerializeToString()), 3),
                                  [0.1, 0.0, 0.25])
    with pytest.raises(InvalidInput, match=r"prediction.atom_std: expected shape \(4\)"):
        wire.decode_atom_std(p, 4)
    wire.encode_array([0.1, -0.2, 0.25], "<f8", p.atom_std)
    with pytest.raises(InvalidInput, match=r"prediction.atom_std contains a negative σ"):
        wire.decode_atom_std(p, 3)
    wire.encode_array([0.1, np.nan, 0.25], "<f8", p.atom_std)
    with pytest.raises(InvalidInput, match=r"frame.atom_std contains a non-finite"):
        wire.decode_atom_std(p, 3, "frame")
