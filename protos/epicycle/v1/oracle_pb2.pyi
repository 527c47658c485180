from protos.epicycle.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelRequest(_message.Message):
    __slots__ = ("structure", "properties", "request_id")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    properties: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., properties: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class LabelResponse(_message.Message):
    __slots__ = ("labels", "backend", "structure_hash", "cached", "compute_seconds", "request_id", "worker")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    labels: _common_pb2.Labels
    backend: str
    structure_hash: str
    cached: bool
    compute_seconds: float
    request_id: str
    worker: str
    def __init__(self, labels: _Optional[_Union[_common_pb2.Labels, _Mapping]] = ..., backend: _Optional[str] = ..., structure_hash: _Optional[str] = ..., cached: _Optional[bool] = ..., compute_seconds: _Optional[float] = ..., request_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("backend", "implemented_properties", "supported_numbers", "settings", "version", "min_distance", "max_atoms", "workers", "queue_limit")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTED_PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATOMS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    backend: str
    implemented_properties: _containers.RepeatedScalarFieldContainer[str]
    supported_numbers: _containers.RepeatedScalarFieldContainer[int]
    settings: _containers.ScalarMap[str, str]
    version: str
    min_distance: float
    max_atoms: int
    workers: int
    queue_limit: int
    def __init__(self, backend: _Optional[str] = ..., implemented_properties: _Optional[_Iterable[str]] = ..., supported_numbers: _Optional[_Iterable[int]] = ..., settings: _Optional[_Mapping[str, str]] = ..., version: _Optional[str] = ..., min_distance: _Optional[float] = ..., max_atoms: _Optional[int] = ..., workers: _Optional[int] = ..., queue_limit: _Optional[int] = ...) -> None: ...
