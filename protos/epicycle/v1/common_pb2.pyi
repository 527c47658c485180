from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT32: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Structure(_message.Message):
    __slots__ = ("positions", "numbers", "cell", "pbc", "velocities", "masses", "info")
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    PBC_FIELD_NUMBER: _ClassVar[int]
    VELOCITIES_FIELD_NUMBER: _ClassVar[int]
    MASSES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    positions: Array
    numbers: Array
    cell: Array
    pbc: _containers.RepeatedScalarFieldContainer[bool]
    velocities: Array
    masses: Array
    info: _containers.ScalarMap[str, str]
    def __init__(self, positions: _Optional[_Union[Array, _Mapping]] = ..., numbers: _Optional[_Union[Array, _Mapping]] = ..., cell: _Optional[_Union[Array, _Mapping]] = ..., pbc: _Optional[_Iterable[bool]] = ..., velocities: _Optional[_Union[Array, _Mapping]] = ..., masses: _Optional[_Union[Array, _Mapping]] = ..., info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Labels(_message.Message):
    __slots__ = ("energy", "forces", "stress")
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FIELD_NUMBER: _ClassVar[int]
    STRESS_FIELD_NUMBER: _ClassVar[int]
    energy: float
    forces: Array
    stress: Array
    def __init__(self, energy: _Optional[float] = ..., forces: _Optional[_Union[Array, _Mapping]] = ..., stress: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("energy", "forces", "force_std", "stress", "local_energies", "noise_std", "model_version", "energy_std", "atom_std")
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FIELD_NUMBER: _ClassVar[int]
    FORCE_STD_FIELD_NUMBER: _ClassVar[int]
    STRESS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ENERGIES_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENERGY_STD_FIELD_NUMBER: _ClassVar[int]
    ATOM_STD_FIELD_NUMBER: _ClassVar[int]
    energy: float
    forces: Array
    force_std: Array
    stress: Array
    local_energies: Array
    noise_std: float
    model_version: int
    energy_std: float
    atom_std: Array
    def __init__(self, energy: _Optional[float] = ..., forces: _Optional[_Union[Array, _Mapping]] = ..., force_std: _Optional[_Union[Array, _Mapping]] = ..., stress: _Optional[_Union[Array, _Mapping]] = ..., local_energies: _Optional[_Union[Array, _Mapping]] = ..., noise_std: _Optional[float] = ..., model_version: _Optional[int] = ..., energy_std: _Optional[float] = ..., atom_std: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class Hyperparameter(_message.Message):
    __slots__ = ("name", "value", "unit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    unit: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ...) -> None: ...
