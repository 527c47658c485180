from protos.epicycle.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_UNCERTAIN: _ClassVar[StopReason]
    STOP_REASON_MAX_STEPS: _ClassVar[StopReason]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_UNCERTAIN: StopReason
STOP_REASON_MAX_STEPS: StopReason

class TemperatureEvent(_message.Message):
    __slots__ = ("time_fs", "temperature_k")
    TIME_FS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_K_FIELD_NUMBER: _ClassVar[int]
    time_fs: float
    temperature_k: float
    def __init__(self, time_fs: _Optional[float] = ..., temperature_k: _Optional[float] = ...) -> None: ...

class MDSettings(_message.Message):
    __slots__ = ("engine", "ensemble", "timestep_fs", "temperature_k", "friction_per_fs", "taut_fs", "pressure_gpa", "taup_fs", "compressibility_per_gpa", "seed", "schedule", "initial_temperature_k", "wrap_positions")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_K_FIELD_NUMBER: _ClassVar[int]
    FRICTION_PER_FS_FIELD_NUMBER: _ClassVar[int]
    TAUT_FS_FIELD_NUMBER: _ClassVar[int]
    PRESSURE_GPA_FIELD_NUMBER: _ClassVar[int]
    TAUP_FS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSIBILITY_PER_GPA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_TEMPERATURE_K_FIELD_NUMBER: _ClassVar[int]
    WRAP_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    engine: str
    ensemble: str
    timestep_fs: float
    temperature_k: float
    friction_per_fs: float
    taut_fs: float
    pressure_gpa: float
    taup_fs: float
    compressibility_per_gpa: float
    seed: int
    schedule: _containers.RepeatedCompositeFieldContainer[TemperatureEvent]
    initial_temperature_k: float
    wrap_positions: bool
    def __init__(self, engine: _Optional[str] = ..., ensemble: _Optional[str] = ..., timestep_fs: _Optional[float] = ..., temperature_k: _Optional[float] = ..., friction_per_fs: _Optional[float] = ..., taut_fs: _Optional[float] = ..., pressure_gpa: _Optional[float] = ..., taup_fs: _Optional[float] = ..., compressibility_per_gpa: _Optional[float] = ..., seed: _Optional[int] = ..., schedule: _Optional[_Iterable[_Union[TemperatureEvent, _Mapping]]] = ..., initial_temperature_k: _Optional[float] = ..., wrap_positions: _Optional[bool] = ...) -> None: ...

class RunControl(_message.Message):
    __slots__ = ("sigma_threshold", "max_steps", "frame_interval", "timestep_fs", "model_version", "replace_schedule", "schedule")
    SIGMA_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    sigma_threshold: float
    max_steps: int
    frame_interval: int
    timestep_fs: float
    model_version: int
    replace_schedule: bool
    schedule: _containers.RepeatedCompositeFieldContainer[TemperatureEvent]
    def __init__(self, sigma_threshold: _Optional[float] = ..., max_steps: _Optional[int] = ..., frame_interval: _Optional[int] = ..., timestep_fs: _Optional[float] = ..., model_version: _Optional[int] = ..., replace_schedule: _Optional[bool] = ..., schedule: _Optional[_Iterable[_Union[TemperatureEvent, _Mapping]]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("new_run", "checkpoint", "control", "override_forces", "learner_address")
    NEW_RUN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FORCES_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    new_run: NewRun
    checkpoint: bytes
    control: RunControl
    override_forces: _common_pb2.Labels
    learner_address: str
    def __init__(self, new_run: _Optional[_Union[NewRun, _Mapping]] = ..., checkpoint: _Optional[bytes] = ..., control: _Optional[_Union[RunControl, _Mapping]] = ..., override_forces: _Optional[_Union[_common_pb2.Labels, _Mapping]] = ..., learner_address: _Optional[str] = ...) -> None: ...

class NewRun(_message.Message):
    __slots__ = ("structure", "settings")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    structure: _common_pb2.Structure
    settings: MDSettings
    def __init__(self, structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., settings: _Optional[_Union[MDSettings, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("step", "time_fs", "structure", "prediction", "temperature_k", "kinetic_energy", "potential_energy", "conserved_energy", "forces_from_override")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_K_FIELD_NUMBER: _ClassVar[int]
    KINETIC_ENERGY_FIELD_NUMBER: _ClassVar[int]
    POTENTIAL_ENERGY_FIELD_NUMBER: _ClassVar[int]
    CONSERVED_ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FROM_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    step: int
    time_fs: float
    structure: _common_pb2.Structure
    prediction: _common_pb2.Prediction
    temperature_k: float
    kinetic_energy: float
    potential_energy: float
    conserved_energy: float
    forces_from_override: bool
    def __init__(self, step: _Optional[int] = ..., time_fs: _Optional[float] = ..., structure: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., prediction: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., temperature_k: _Optional[float] = ..., kinetic_energy: _Optional[float] = ..., potential_energy: _Optional[float] = ..., conserved_energy: _Optional[float] = ..., forces_from_override: _Optional[bool] = ...) -> None: ...

class UncertainComponent(_message.Message):
    __slots__ = ("atom", "component", "sigma")
    ATOM_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    atom: int
    component: int
    sigma: float
    def __init__(self, atom: _Optional[int] = ..., component: _Optional[int] = ..., sigma: _Optional[float] = ...) -> None: ...

class StopReport(_message.Message):
    __slots__ = ("reason", "frame", "uncertain", "max_sigma", "threshold", "checkpoint", "energy_drift_ev_per_atom_ps", "steps_per_second", "step", "time_fs", "steps_taken", "state", "images", "settings")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    MAX_SIGMA_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ENERGY_DRIFT_EV_PER_ATOM_PS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FS_FIELD_NUMBER: _ClassVar[int]
    STEPS_TAKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    reason: StopReason
    frame: Frame
    uncertain: _containers.RepeatedCompositeFieldContainer[UncertainComponent]
    max_sigma: float
    threshold: float
    checkpoint: bytes
    energy_drift_ev_per_atom_ps: float
    steps_per_second: float
    step: int
    time_fs: float
    steps_taken: int
    state: _common_pb2.Structure
    images: _common_pb2.Array
    settings: MDSettings
    def __init__(self, reason: _Optional[_Union[StopReason, str]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., uncertain: _Optional[_Iterable[_Union[UncertainComponent, _Mapping]]] = ..., max_sigma: _Optional[float] = ..., threshold: _Optional[float] = ..., checkpoint: _Optional[bytes] = ..., energy_drift_ev_per_atom_ps: _Optional[float] = ..., steps_per_second: _Optional[float] = ..., step: _Optional[int] = ..., time_fs: _Optional[float] = ..., steps_taken: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.Structure, _Mapping]] = ..., images: _Optional[_Union[_common_pb2.Array, _Mapping]] = ..., settings: _Optional[_Union[MDSettings, _Mapping]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("frame", "stop")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    frame: Frame
    stop: StopReport
    def __init__(self, frame: _Optional[_Union[Frame, _Mapping]] = ..., stop: _Optional[_Union[StopReport, _Mapping]] = ...) -> None: ...

class SamplerDescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SamplerDescribeResponse(_message.Message):
    __slots__ = ("engines", "ensembles", "default_learner")
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LEARNER_FIELD_NUMBER: _ClassVar[int]
    engines: _containers.RepeatedScalarFieldContainer[str]
    ensembles: _containers.RepeatedScalarFieldContainer[str]
    default_learner: str
    def __init__(self, engines: _Optional[_Iterable[str]] = ..., ensembles: _Optional[_Iterable[str]] = ..., default_learner: _Optional[str] = ...) -> None: ...
