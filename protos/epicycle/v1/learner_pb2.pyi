from protos.epicycle.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("structure", "compute_stress", "atom_indices", "sequence", "condition_on", "model_version")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_STRESS_FIELD_NUMBER: _ClassVar[int]
    ATOM_INDICES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    compute_stress: bool
    atom_indices: _containers.RepeatedScalarFieldContainer[int]
    sequence: int
    condition_on: _containers.RepeatedCompositeFieldContainer[ConditionOn]
    model_version: int
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., compute_stress: _Optional[bool] = ..., atom_indices: _Optional[_Iterable[int]] = ..., sequence: _Optional[int] = ..., condition_on: _Optional[_Iterable[_Union[ConditionOn, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ConditionOn(_message.Message):
    __slots__ = ("structure", "atom_indices")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    ATOM_INDICES_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    atom_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., atom_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("prediction", "sequence")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    prediction: _common_pb2.Prediction
    sequence: int
    def __init__(self, prediction: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class AddDataRequest(_message.Message):
    __slots__ = ("structure", "labels", "atom_indices", "use_energy", "use_stress")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATOM_INDICES_FIELD_NUMBER: _ClassVar[int]
    USE_ENERGY_FIELD_NUMBER: _ClassVar[int]
    USE_STRESS_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    labels: _common_pb2.Labels
    atom_indices: _containers.RepeatedScalarFieldContainer[int]
    use_energy: bool
    use_stress: bool
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., labels: _Optional[_Union[_common_pb2.Labels, _Mapping]] = ..., atom_indices: _Optional[_Iterable[int]] = ..., use_energy: _Optional[bool] = ..., use_stress: _Optional[bool] = ...) -> None: ...

class AddDataBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AddDataRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[AddDataRequest, _Mapping]]] = ...) -> None: ...

class AddDataResponse(_message.Message):
    __slots__ = ("model_version", "n_environments", "n_labels")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    N_ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    N_LABELS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    n_environments: int
    n_labels: int
    def __init__(self, model_version: _Optional[int] = ..., n_environments: _Optional[int] = ..., n_labels: _Optional[int] = ...) -> None: ...

class HyperparameterBounds(_message.Message):
    __slots__ = ("name", "lower", "upper")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    name: str
    lower: float
    upper: float
    def __init__(self, name: _Optional[str] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("max_iterations", "tolerance", "bounds", "fixed", "space", "method", "restarts", "seed", "holdout")
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    max_iterations: int
    tolerance: float
    bounds: _containers.RepeatedCompositeFieldContainer[HyperparameterBounds]
    fixed: _containers.RepeatedScalarFieldContainer[str]
    space: str
    method: str
    restarts: int
    seed: int
    holdout: float
    def __init__(self, max_iterations: _Optional[int] = ..., tolerance: _Optional[float] = ..., bounds: _Optional[_Iterable[_Union[HyperparameterBounds, _Mapping]]] = ..., fixed: _Optional[_Iterable[str]] = ..., space: _Optional[str] = ..., method: _Optional[str] = ..., restarts: _Optional[int] = ..., seed: _Optional[int] = ..., holdout: _Optional[float] = ...) -> None: ...

class OptimizeResponse(_message.Message):
    __slots__ = ("hyperparameters", "log_likelihood", "iterations", "converged", "message", "seconds", "model_version", "at_bounds")
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    hyperparameters: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hyperparameter]
    log_likelihood: float
    iterations: int
    converged: bool
    message: str
    seconds: float
    model_version: int
    at_bounds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hyperparameters: _Optional[_Iterable[_Union[_common_pb2.Hyperparameter, _Mapping]]] = ..., log_likelihood: _Optional[float] = ..., iterations: _Optional[int] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., seconds: _Optional[float] = ..., model_version: _Optional[int] = ..., at_bounds: _Optional[_Iterable[str]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "hyperparameters", "noise_std", "n_environments", "n_labels", "species", "cutoff_two_body", "cutoff_three_body", "log_likelihood", "ready", "checkpoint_id", "warnings", "model_kind", "n_inducing")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    N_ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    N_LABELS_FIELD_NUMBER: _ClassVar[int]
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_TWO_BODY_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_THREE_BODY_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    N_INDUCING_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    hyperparameters: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hyperparameter]
    noise_std: float
    n_environments: int
    n_labels: int
    species: _containers.RepeatedScalarFieldContainer[int]
    cutoff_two_body: float
    cutoff_three_body: float
    log_likelihood: float
    ready: bool
    checkpoint_id: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    model_kind: str
    n_inducing: int
    def __init__(self, model_version: _Optional[int] = ..., hyperparameters: _Optional[_Iterable[_Union[_common_pb2.Hyperparameter, _Mapping]]] = ..., noise_std: _Optional[float] = ..., n_environments: _Optional[int] = ..., n_labels: _Optional[int] = ..., species: _Optional[_Iterable[int]] = ..., cutoff_two_body: _Optional[float] = ..., cutoff_three_body: _Optional[float] = ..., log_likelihood: _Optional[float] = ..., ready: _Optional[bool] = ..., checkpoint_id: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., model_kind: _Optional[str] = ..., n_inducing: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("checkpoint_id", "model_version", "n_environments", "n_labels", "bytes_written", "seconds")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    N_ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    N_LABELS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    model_version: int
    n_environments: int
    n_labels: int
    bytes_written: int
    seconds: float
    def __init__(self, checkpoint_id: _Optional[str] = ..., model_version: _Optional[int] = ..., n_environments: _Optional[int] = ..., n_labels: _Optional[int] = ..., bytes_written: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id",)
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    def __init__(self, checkpoint_id: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("model", "format", "format_version", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    format: str
    format_version: int
    model_version: int
    def __init__(self, model: _Optional[bytes] = ..., format: _Optional[str] = ..., format_version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    def __init__(self, model: _Optional[bytes] = ...) -> None: ...

class HoldVersionsRequest(_message.Message):
    __slots__ = ("model_versions",)
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class HoldVersionsResponse(_message.Message):
    __slots__ = ("held", "missing", "newest")
    HELD_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedScalarFieldContainer[int]
    missing: _containers.RepeatedScalarFieldContainer[int]
    newest: int
    def __init__(self, held: _Optional[_Iterable[int]] = ..., missing: _Optional[_Iterable[int]] = ..., newest: _Optional[int] = ...) -> None: ...

class KernelDistancesRequest(_message.Message):
    __slots__ = ("structure", "atom_indices", "within", "skip_train")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    ATOM_INDICES_FIELD_NUMBER: _ClassVar[int]
    WITHIN_FIELD_NUMBER: _ClassVar[int]
    SKIP_TRAIN_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    atom_indices: _containers.RepeatedScalarFieldContainer[int]
    within: KernelDistanceRows
    skip_train: bool
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., atom_indices: _Optional[_Iterable[int]] = ..., within: _Optional[_Union[KernelDistanceRows, _Mapping]] = ..., skip_train: _Optional[bool] = ...) -> None: ...

class KernelDistanceRows(_message.Message):
    __slots__ = ("atoms",)
    ATOMS_FIELD_NUMBER: _ClassVar[int]
    atoms: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, atoms: _Optional[_Iterable[int]] = ...) -> None: ...

class KernelDistancesResponse(_message.Message):
    __slots__ = ("d_train", "d_within", "atom_indices", "model_version", "within_rows")
    D_TRAIN_FIELD_NUMBER: _ClassVar[int]
    D_WITHIN_FIELD_NUMBER: _ClassVar[int]
    ATOM_INDICES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WITHIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    d_train: _common_pb2.Array
    d_within: _common_pb2.Array
    atom_indices: _containers.RepeatedScalarFieldContainer[int]
    model_version: int
    within_rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, d_train: _Optional[_Union[_common_pb2.Array, _Mapping]] = ..., d_within: _Optional[_Union[_common_pb2.Array, _Mapping]] = ..., atom_indices: _Optional[_Iterable[int]] = ..., model_version: _Optional[int] = ..., within_rows: _Optional[_Iterable[int]] = ...) -> None: ...

class MapRequest(_message.Message):
    __slots__ = ("spacing2", "spacing3", "spacing_jk", "samples", "body_order")
    SPACING2_FIELD_NUMBER: _ClassVar[int]
    SPACING3_FIELD_NUMBER: _ClassVar[int]
    SPACING_JK_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BODY_ORDER_FIELD_NUMBER: _ClassVar[int]
    spacing2: float
    spacing3: float
    spacing_jk: float
    samples: int
    body_order: int
    def __init__(self, spacing2: _Optional[float] = ..., spacing3: _Optional[float] = ..., spacing_jk: _Optional[float] = ..., samples: _Optional[int] = ..., body_order: _Optional[int] = ...) -> None: ...

class MapResponse(_message.Message):
    __slots__ = ("model_version", "mapped", "uf3", "table", "snippet", "report_json")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAPPED_FIELD_NUMBER: _ClassVar[int]
    UF3_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    mapped: bytes
    uf3: str
    table: str
    snippet: str
    report_json: str
    def __init__(self, model_version: _Optional[int] = ..., mapped: _Optional[bytes] = ..., uf3: _Optional[str] = ..., table: _Optional[str] = ..., snippet: _Optional[str] = ..., report_json: _Optional[str] = ...) -> None: ...
