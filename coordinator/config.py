"""The run configuration: one YAML file, validated up front.

Every error names the offending key by its dotted path and says what is
allowed, e.g. ``sampler.timestep_fs: must be > 0 fs, got -1``.  Unknown keys
are errors too (a typo must not silently fall back to a default).

Units: Å, eV, eV/Å, fs, K, GPa.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from learner_service.defaults import DEFAULT_HYPERPARAMETERS
from protos.errors import InvalidInput


class ConfigError(InvalidInput):
    """A bad run configuration (the message names the key)."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class StructureConfig:
    """Either ``file`` (any format ASE reads; ``index`` picks the frame) or a built-in generator."""

    file: str | None = None
    index: int = 0
    generator: str | None = "fcc"            # fcc | bcc | sc | diamond | l12 (A3B)
    element: str | list[str] = "Al"          # l12: [A, B]
    a: float = 4.05                          # lattice constant, Å
    repeat: tuple[int, int, int] = (2, 2, 2)
    rattle: float = 0.0                      # σ of random displacements, Å (seeded by run seed)


@dataclass(frozen=True)
class OracleConfig:
    backend: str = "emt"                     # embedded backend (ignored when addresses are given)
    settings: Mapping[str, Any] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()          # remote workers "host:port" or one "dns:///name:port"
    timeout_s: float = 600.0                 # deadline of one label call
    attempts: int = 3                        # workers tried for one label before giving up
    workers: int = 1                         # embedded: concurrent calculations
    # labels computed at once across the pool (0: one per worker — len(addresses), or `workers` embedded)
    max_in_flight: int = 0
    # every worker unreachable: retry with backoff for this long, then stop the run (exit 1, resumable)
    outage_timeout_s: float = 600.0
    # a frame no oracle could label: "stop" the run (default) or "skip": integrate that one step on the
    # model, counted in the report and metrics (the model never learns that configuration)
    on_failure: str = "stop"


@dataclass(frozen=True)
class OptimizeConfig:
    every: int = 1             # re-optimise hyperparameters after every N-th oracle call (0: never)
    until_calls: int = 30      # ... and stop re-optimising after this many oracle calls
    max_iterations: int = 50
    # {name: [lower, upper]} replacing the learner's default boxes (units of each hyperparameter:
    # sig eV, ls Å, noise eV/Å), e.g. noise: [0.002, 1.0] for a floor on σn and so on k·σn
    bounds: Mapping[str, Any] = field(default_factory=dict)
    # search space of L-BFGS-B: "linear" (θ, FLARE 0.2.4's on-the-fly optimiser) or "log" (log θ); method ml
    space: str = "linear"
    # "ml": maximise the likelihood (ML-II); "map": data-derived prior, restarts, held-out check on the
    # model's own frames (OptimizeRequest.method; exact GP only)
    method: str = "ml"
    restarts: int = 3          # map: prior draws besides the prior centre and the current values
    holdout: float = 0.0       # map: share of the frames kept out of the search as extra folds (0: none)


#: ``learner.sparse.labels``: which labels of each oracle call a sparse model trains on
SPARSE_LABELS = ("forces", "forces+energy", "all")


@dataclass(frozen=True)
class SparseLearnerConfig:
    """``learner.sparse:`` — settings of a new sparse model (learner_service/model.py SparseSettings)."""

    max_inducing: int | None = None          # at most this many inducing environments (None: no cap)
    inducing_rule: str = "acquisition"       # acquisition: the selected atoms; variance: the model's own pick
    per_call: int = 4                        # variance rule: at most this many per oracle call
    tolerance: float = 1e-6                  # variance rule: ... while the residual/prior local-energy variance exceeds this
    # inducing variables: energy_force (each inducing environment's local energy and force; its DTC
    # force σ gates MD like the exact GP's) or energy (FLARE 1.x's; that σ keeps a large prior part,
    # so a relative threshold calls the oracle at every step -- BENCHMARKS.md, issue 16)
    functionals: str = "energy_force"
    # the labels of each oracle call the sparse model trains on: every force, plus the energy
    # (forces+energy), plus the stress when the oracle computed it (all).  Default forces: with each
    # call's energy the DTC likelihood drove energy_noise to its floor and fitted the hyperparameters
    # to the energies (measured: the Al melt reached the exact GP's 12-call RMSE in 3 of 3 seeds with
    # forces, 1 of 3 with energies; BENCHMARKS.md, issue 16)
    labels: str = "forces"


@dataclass(frozen=True)
class LearnerConfig:
    address: str | None = None               # remote learner; None: embedded
    # exact (full GP), sparse (every label of every call; learner.sparse), or the path of a saved
    # model file to start from (its kind read from the file; relative to the config file)
    model: str = "exact"
    sparse: SparseLearnerConfig = SparseLearnerConfig()
    cutoffs: tuple[float, float] = (6.0, 4.0)  # (r2, r3), Å
    hyperparameters: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_HYPERPARAMETERS))  # the one set (learner_service/defaults.py)
    use_energy: bool = False
    use_stress: bool = False
    optimize: OptimizeConfig = OptimizeConfig()
    # labelled data the training set starts from, added before the first oracle call: extended XYZ files
    # (forces eV/Å) and/or run directories (their labels, on the atoms that run trained on); relative
    # paths are relative to the config file (learner_service/labelled_data.py)
    data: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplerConfig:
    address: str | None = None               # remote sampler; None: embedded
    addresses: tuple[str, ...] = ()          # several remote samplers, used round robin by the walkers
    engine: str = "builtin"
    ensemble: str = "nve"
    timestep_fs: float = 5.0
    temperature_K: float = 300.0             # initial Maxwell–Boltzmann temperature (and thermostat target)
    friction_per_fs: float | None = None
    taut_fs: float | None = None
    pressure_GPa: float | None = None
    schedule: tuple[tuple[float, float], ...] = ()   # ((time_fs, T_K), ...) velocity rescaling
    steps: int = 500
    frame_interval: int = 10                 # frames streamed/written every k steps
    checkpoint_interval: int = 100           # durable MD checkpoint every k steps


@dataclass(frozen=True)
class CalibrationConfig:
    """``calibration:`` — the model's σ calibrated at the run's oracle calls (coordinator/calibration.py)."""

    scale: bool = False                      # the threshold applies to s·σ_ep (σ_cal), s fitted at the calls
    prior_alpha: float = 5.0                 # IG(α, α+1) prior on s²: worth 2(α+1) residuals with z² = 1


@dataclass(frozen=True)
class TrialConfig:
    """``policy.update: trial`` (coordinator/trial.py): how a walker tries a new model version."""

    window_steps: int = 20                   # steps integrated on the new model before accepting it
    max_energy_change_eV_per_atom: float = 0.01  # largest |E_cons(t) - E_cons(t0)| in the window, eV/atom
    max_force_eV_A: float = 50.0             # any force norm above this fails the trial, eV/Å
    timestep_factor: float = 0.5             # Δt multiplies by this on each rollback (and divides to recover)
    min_timestep_fs: float = 0.1             # Δt floor, fs: a trial that fails at the floor rejects the update
    max_retries: int = 3                     # rollbacks with a smaller Δt before the update is rejected
    recover_steps: int = 200                 # stable steps before a reduced Δt grows back one factor


@dataclass(frozen=True)
class PolicyConfig:
    # The uncertainty threshold that stops MD for an oracle call (eV/Å, on any force component's σ):
    # sigma_factor · σn (relative), absolute_threshold (absolute), or the smaller of the two when both
    # are given.  sigma_factor unset/null: 1.0 without an absolute_threshold, absolute only with one.
    sigma_factor: float | None = None
    absolute_threshold: float | None = None  # eV/Å
    # after a walker's oracle call at step s, steps s .. s+N are integrated without the uncertainty
    # gate (FLARE's min_steps_with_model): the walker's next call is at step s+N+1 at the earliest
    min_steps_between_calls: int = 0
    initial_atoms: int | tuple[int, ...] = 4  # atoms of the first frame trained on (count or indices)
    atoms_per_call: int = 1                  # environments added per oracle call
    acquisition: str = "max_sigma"
    update: str = "accept"
    # a new uncertain frame is not sent to the oracle when the learner's σ, conditioned on the
    # environments of the labels already queued or in flight, is below the threshold everywhere
    dedupe: bool = True
    trial: TrialConfig = TrialConfig()       # policy.update: trial

    @property
    def relative_factor(self) -> float | None:
        """k of the relative threshold k·σn, None for an absolute threshold alone."""
        if self.sigma_factor is None:
            return None if self.absolute_threshold is not None else 1.0
        return float(self.sigma_factor)

    def threshold(self, noise: float) -> tuple[float, str]:
        """``(threshold eV/Å, rule)`` for noise σn (eV/Å): the rule that decided is ``"relative"``
        (sigma_factor · σn) or ``"absolute"`` (absolute_threshold; also when the two are equal)."""
        k = self.relative_factor
        relative = None if k is None else k * float(noise)
        if self.absolute_threshold is not None and (relative is None or self.absolute_threshold <= relative):
            return float(self.absolute_threshold), "absolute"
        return float(relative), "relative"
    # acquisition knobs (coordinator/acquisition.py; formulas in docs/configuration.md)
    add_above_sigma: float | None = None     # eV/Å: also pick every atom whose σ exceeds this ...
    max_atoms_per_call: int | None = None    # ... up to this many atoms per call in all
    max_atoms_per_species: Mapping[str, int] = field(default_factory=dict)  # e.g. {Cu: 2, Au: 1}
    exploration_bonus: float = 0.0           # β: β·d_min (kernel distance to the training set, eV) added
    hybrid_fps_calls: int = 5                # hybrid: fps for oracle calls 1..K, max_sigma after ...
    hybrid_max_z2: float | None = None       # ... and while σ's mean z² at the oracle calls exceeds this


@dataclass(frozen=True)
class TLSConfig:
    """TLS for every connection of the run (PEM files); mutual TLS when a client certificate is given."""

    ca_file: str | None = None               # CA the servers' certificates chain to; set: TLS on
    cert_file: str | None = None             # the coordinator's client certificate (mutual TLS)
    key_file: str | None = None
    server_name: str | None = None           # override the name checked in server certificates
    # embedded services: their server certificate (SAN 127.0.0.1); they then require client
    # certificates from the same CA when cert_file is given
    server_cert_file: str | None = None
    server_key_file: str | None = None

    def client(self):
        """The :class:`protos.client.ClientTLS` of this section, or None (plaintext)."""
        from protos.client import ClientTLS

        if not self.ca_file:
            return None
        return ClientTLS(Path(self.ca_file), Path(self.cert_file) if self.cert_file else None,
                         Path(self.key_file) if self.key_file else None, self.server_name)


@dataclass(frozen=True)
class StopConfig:
    """When the run ends before every walker has done its steps (0 switches a criterion off)."""

    # converged: no oracle call in the last window_steps steps of every walker, and at least
    # accurate_ratio of the frames streamed in that window had every force σ below the threshold
    window_steps: int = 0
    accurate_ratio: float = 0.99
    max_labels: int = 0                      # label budget (oracle calls, the first frame included)
    max_wall_s: float = 0.0                  # wall-time budget, s (summed over resumes)


#: walker keys that override the `sampler:` section
WALKER_SAMPLER_KEYS = ("engine", "ensemble", "timestep_fs", "temperature_K", "friction_per_fs", "taut_fs",
                       "pressure_GPa", "schedule", "steps")
#: most walkers in one run (metrics carry one `walker` label value per walker)
MAX_WALKERS = 64


@dataclass(frozen=True)
class WalkerConfig:
    """One MD walker: keys left out take the `sampler:` section's value (structure: the top-level one)."""

    name: str | None = None                  # default w0, w1, ...
    structure: StructureConfig | None = None
    engine: str | None = None
    ensemble: str | None = None
    timestep_fs: float | None = None
    temperature_K: float | None = None
    friction_per_fs: float | None = None
    taut_fs: float | None = None
    pressure_GPa: float | None = None
    schedule: tuple[tuple[float, float], ...] | None = None
    steps: int | None = None
    seed: int | None = None                  # default: run seed + walker index


@dataclass(frozen=True)
class Walker:
    """A walker with every setting resolved (see :meth:`RunConfig.walker_list`)."""

    index: int
    name: str
    structure: StructureConfig
    sampler: SamplerConfig
    seed: int


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    structure: StructureConfig = StructureConfig()
    oracle: OracleConfig = OracleConfig()
    learner: LearnerConfig = LearnerConfig()
    sampler: SamplerConfig = SamplerConfig()
    policy: PolicyConfig = PolicyConfig()
    #: MD walkers (empty: one walker from `structure` and `sampler`)
    walkers: tuple[WalkerConfig, ...] = ()
    stop: StopConfig = StopConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    tls: TLSConfig = TLSConfig()
    #: the coordinator's own /metrics port (None: off; 0: any free port); embedded services use the next ones
    metrics_port: int | None = None
    #: address the /metrics endpoints bind (0.0.0.0 in a pod, so Prometheus can scrape it)
    metrics_host: str = "127.0.0.1"

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def walker_list(self) -> list[Walker]:
        """Every walker with its settings resolved; one walker ``w0`` when ``walkers`` is empty."""
        specs = self.walkers or (WalkerConfig(),)
        out = []
        for i, w in enumerate(specs):
            overrides = {k: getattr(w, k) for k in WALKER_SAMPLER_KEYS if getattr(w, k) is not None}
            out.append(Walker(index=i, name=w.name or f"w{i}", structure=w.structure or self.structure,
                              sampler=dataclasses.replace(self.sampler, **overrides),
                              seed=self.seed + i if w.seed is None else w.seed))
        return out


# --------------------------------------------------------------------------- parsing


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _walkers(path: str, value: Any) -> tuple[WalkerConfig, ...]:
    """``walkers:`` as a list of walker mappings, or the ladder short form ``{temperatures: [...]}``."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"temperatures"}
        if unknown or "temperatures" not in value:
            raise ConfigError(f"{path}: expected a list of walkers, or the ladder form {{temperatures: [T1, T2, ...]}} "
                              f"(K), got keys {sorted(value)}")
        temps = value["temperatures"]
        if not isinstance(temps, (list, tuple)) or not temps:
            raise ConfigError(f"{path}.temperatures: expected a non-empty list of temperatures in K, got {temps!r}")
        out = []
        for i, t in enumerate(temps):
            t = _number(f"{path}.temperatures[{i}]", t)
            out.append(WalkerConfig(name=f"T{t:g}", temperature_K=t))
        return tuple(out)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of walkers or {{temperatures: [...]}}, got {value!r}")
    return tuple(_build(WalkerConfig, item, f"{path}[{i}]") for i, item in enumerate(value))


def _convert(path: str, value: Any, default: Any, annotation: str) -> Any:
    """Convert ``value`` to the type implied by the field's default/annotation."""
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, path)
    if annotation.startswith("StructureConfig"):
        return None if value is None else _build(StructureConfig, value, path)
    if annotation.startswith("tuple[WalkerConfig"):
        return () if value is None else _walkers(path, value)
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{path}: must not be empty")
    if annotation.startswith("tuple[tuple"):
        if value is None and "None" in annotation:
            return None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of [time_fs, temperature_K] pairs, got {value!r}")
        pairs = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                unknown = set(item) - {"time_fs", "temperature_K"}
                if unknown or not {"time_fs", "temperature_K"} <= set(item):
                    raise ConfigError(f"{path}[{i}]: expected keys time_fs and temperature_K, got {sorted(item)}")
                item = (item["time_fs"], item["temperature_K"])
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ConfigError(f"{path}[{i}]: expected [time_fs, temperature_K], got {item!r}")
            pairs.append((_number(f"{path}[{i}][0]", item[0]), _number(f"{path}[{i}][1]", item[1])))
        return tuple(pairs)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation.startswith("int | tuple"):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an atom count or a list of atom indices, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{path}: expected an atom count or a list of atom indices, got {value!r}")
    if annotation.startswith("tuple[float") or annotation.startswith("tuple[int"):
        n = annotation.count(",") + 1 if "..." not in annotation else None
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            raise ConfigError(f"{path}: expected a list of {n} numbers, got {value!r}")
        conv = int if annotation.startswith("tuple[int") else float
        out = []
        for i, v in enumerate(value):
            num = _number(f"{path}[{i}]", v)
            if conv is int and num != int(num):
                raise ConfigError(f"{path}[{i}]: expected an integer, got {v!r}")
            out.append(conv(num))
        return tuple(out)
    if annotation.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            what = "paths (XYZ files or run directories)" if path.endswith(".data") else "addresses"
            raise ConfigError(f"{path}: expected a list of {what}, got {value!r}")
        return tuple(value)
    if annotation.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation.startswith("str | list"):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError(f"{path}: expected an element symbol or a list of symbols, got {value!r}")
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        return _number(path, value)
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{path}: must be finite, got {value!r}")
    return float(value)


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of settings, got {type(data).__name__}")
    defaults = cls()
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(where + k for k in unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        f = names[name]
        kwargs[name] = _convert(f"{path}.{name}" if path else name, value, getattr(defaults, name), str(f.type))
    return cls(**kwargs)


def parse_config(data: Any) -> RunConfig:
    """Build and validate a :class:`RunConfig` from parsed YAML."""
    config = _build(RunConfig, data, "")
    validate(config)
    return config


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    learner = data.get("learner") if isinstance(data, Mapping) else None
    model = learner.get("model") if isinstance(learner, Mapping) else None
    if isinstance(model, str) and model not in ("exact", "sparse") and not Path(model).is_absolute():
        # a model file is relative to the config file, as structure files are
        data = {**data, "learner": {**learner, "model": str(path.parent / model)}}
    config = parse_config(data)

    def relative_to_config(s: StructureConfig | None) -> StructureConfig | None:
        if s is None or s.file is None or Path(s.file).is_absolute():
            return s
        return dataclasses.replace(s, file=str(path.parent / s.file))

    config = dataclasses.replace(
        config, structure=relative_to_config(config.structure),
        walkers=tuple(dataclasses.replace(w, structure=relative_to_config(w.structure)) for w in config.walkers),
        learner=dataclasses.replace(config.learner, data=tuple(
            str((path.parent / d).resolve()) for d in config.learner.data)))
    check_data_paths(config)
    return config


def check_data_paths(config: RunConfig) -> None:
    """``learner.data``: every entry an existing file or run directory (checked when a run starts from the
    file, not when a run directory's saved configuration is read on resume)."""
    for i, d in enumerate(config.learner.data):
        p = Path(d)
        if not p.exists():
            raise ConfigError(f"learner.data[{i}]: {d} does not exist (an extended XYZ file or a run directory)")
        if p.is_dir() and not (p / "state.json").is_file():
            raise ConfigError(f"learner.data[{i}]: {d} is a directory but not a run directory (no state.json)")


# --------------------------------------------------------------------------- semantic checks


def learner_model_kind(le: LearnerConfig) -> str:
    """The kind of model a run's learner serves: ``exact`` or ``sparse`` (a model file: its kind)."""
    if le.model in ("exact", "sparse"):
        return le.model
    from learner_service.model import model_file_kind

    return model_file_kind(le.model)


def trained_labels(le: LearnerConfig) -> tuple[bool, bool]:
    """``(energy, stress)``: whether a run's learner trains on the total energies and stresses of its
    labels -- ``use_energy`` / ``use_stress``; a sparse model also on the energy when
    ``learner.sparse.labels`` is ``forces+energy`` or ``all`` (stresses: ``all`` takes them when the
    oracle computes them, i.e. with ``use_stress``)."""
    sparse = le.sparse.labels if learner_model_kind(le) == "sparse" else ""
    return bool(le.use_energy or sparse in ("forces+energy", "all")), bool(le.use_stress)


def learner_model_file(le: LearnerConfig) -> Path | None:
    """The model file a run starts from (``learner.model`` a path), else None."""
    return None if le.model in ("exact", "sparse") else Path(le.model)


def _validate_learner_model(le: LearnerConfig, need) -> None:
    from protos.errors import InvalidInput, NotFound

    if le.model not in ("exact", "sparse"):
        need(Path(le.model).is_file(), f"learner.model: expected exact, sparse or the path of a saved model file; "
                                       f"{le.model!r} is neither (no such file)")
        try:
            learner_model_kind(le)
        except (InvalidInput, NotFound) as exc:
            need(False, f"learner.model: {exc}")
        need(le.address is None, "learner.model: a model file starts an embedded learner; a remote learner "
                                 "(learner.address) loads its model with `epicycle serve learner --model FILE`")
    sp = le.sparse
    need(sp.max_inducing is None or sp.max_inducing >= 1,
         f"learner.sparse.max_inducing: must be >= 1 (or omitted: no cap), got {sp.max_inducing}")
    need(sp.inducing_rule in ("acquisition", "variance"),
         f"learner.sparse.inducing_rule: allowed acquisition, variance, got {sp.inducing_rule!r}")
    need(sp.per_call >= 1, f"learner.sparse.per_call: must be >= 1, got {sp.per_call}")
    need(0 <= sp.tolerance < 1, f"learner.sparse.tolerance: must be in [0, 1), got {sp.tolerance}")
    need(sp.functionals in ("energy", "energy_force"),
         f"learner.sparse.functionals: allowed energy, energy_force, got {sp.functionals!r}")
    need(sp.labels in SPARSE_LABELS,
         f"learner.sparse.labels: allowed {', '.join(SPARSE_LABELS)}, got {sp.labels!r}")
    if le.model == "sparse":
        need(not (le.use_energy and sp.labels == "forces"),
             "learner.use_energy: true contradicts learner.sparse.labels: forces (a sparse model takes the labels "
             "learner.sparse.labels names; use forces+energy or all)")
        need(not (le.use_stress and sp.labels != "all"),
             f"learner.use_stress: true contradicts learner.sparse.labels: {sp.labels} (a sparse model takes the "
             f"labels learner.sparse.labels names; use all)")


def validate(c: RunConfig) -> None:
    from coordinator.policies import ACQUISITION, UPDATE

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    _validate_structure(c.structure, "structure", need)
    o = c.oracle
    need(o.timeout_s > 0, f"oracle.timeout_s: must be > 0 s, got {o.timeout_s}")
    need(o.attempts >= 1, f"oracle.attempts: must be >= 1, got {o.attempts}")
    need(o.workers >= 1, f"oracle.workers: must be >= 1, got {o.workers}")
    if o.addresses and any(a.startswith("dns:///") for a in o.addresses):
        need(len(o.addresses) == 1, "oracle.addresses: a dns:/// name must be the only address")
    if not o.addresses:
        from oracle_service.base import available_backends

        need(o.backend in available_backends(),
             f"oracle.backend: unknown backend {o.backend!r}; allowed: {', '.join(available_backends())}")
    le = c.learner
    _validate_learner_model(le, need)
    need(all(x > 0 for x in le.cutoffs), f"learner.cutoffs: must be positive lengths in Å, got {list(le.cutoffs)}")
    need(le.cutoffs[1] <= le.cutoffs[0],
         f"learner.cutoffs: the 3-body cutoff ({le.cutoffs[1]} Å) must not exceed the 2-body cutoff ({le.cutoffs[0]} Å)")
    allowed_h = {"sig2", "ls2", "sig3", "ls3", "noise"}
    unknown = set(le.hyperparameters) - allowed_h
    need(not unknown, f"learner.hyperparameters: unknown {sorted(unknown)}; allowed: {sorted(allowed_h)}")
    for k, v in le.hyperparameters.items():
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
             f"learner.hyperparameters.{k}: must be a positive number, got {v!r}")
    need(le.optimize.every >= 0, f"learner.optimize.every: must be >= 0, got {le.optimize.every}")
    for i, d in enumerate(le.data):
        need(bool(d.strip()), f"learner.data[{i}]: empty path")
    need(le.optimize.max_iterations >= 1,
         f"learner.optimize.max_iterations: must be >= 1, got {le.optimize.max_iterations}")
    need(le.optimize.space in ("linear", "log"),
         f"learner.optimize.space: allowed linear, log, got {le.optimize.space!r}")
    need(le.optimize.method in ("ml", "map"), f"learner.optimize.method: allowed ml, map, got {le.optimize.method!r}")
    need(isinstance(le.optimize.restarts, int) and le.optimize.restarts >= 0,
         f"learner.optimize.restarts: must be an integer >= 0, got {le.optimize.restarts!r}")
    need(isinstance(le.optimize.holdout, (int, float)) and 0 <= le.optimize.holdout < 1,
         f"learner.optimize.holdout: must be in [0, 1) (a share of the frames), got {le.optimize.holdout!r}")
    if le.optimize.method == "map" and le.optimize.every:
        need(learner_model_kind(le) == "exact",
             f"learner.optimize.method: map (prior, restarts, held-out check) is for the exact GP; this run's "
             f"learner is {learner_model_kind(le)} (learner.model): use ml")
    allowed_b = allowed_h | ({"energy_noise"} if le.use_energy else set()) | ({"stress_noise"} if le.use_stress else set())
    for k, v in le.optimize.bounds.items():
        need(k in allowed_b, f"learner.optimize.bounds: unknown hyperparameter {k!r}; allowed: {sorted(allowed_b)}")
        ok = (isinstance(v, (list, tuple)) and len(v) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))
        need(ok and 0 < v[0] < v[1], f"learner.optimize.bounds.{k}: expected [lower, upper] with 0 < lower < upper, "
                                     f"got {v!r}")
        h = le.hyperparameters.get(k)
        need(h is None or v[0] <= h <= v[1],
             f"learner.optimize.bounds.{k}: the initial value {h} lies outside [{v[0]}, {v[1]}]")
    need(o.max_in_flight >= 0, f"oracle.max_in_flight: must be >= 0 (0: one per oracle worker), got {o.max_in_flight}")
    need(o.outage_timeout_s >= 0, f"oracle.outage_timeout_s: must be >= 0 s, got {o.outage_timeout_s}")
    need(o.on_failure in ("stop", "skip"), f"oracle.on_failure: allowed stop, skip, got {o.on_failure!r}")
    need(not (c.sampler.address and c.sampler.addresses),
         "sampler: give either sampler.address or sampler.addresses, not both")
    _validate_sampler(c.sampler, "sampler", need)
    need(len(c.walkers) <= MAX_WALKERS, f"walkers: at most {MAX_WALKERS} walkers, got {len(c.walkers)}")
    names = set()
    for w in c.walker_list():
        where = f"walkers[{w.index}]"
        need(bool(w.name) and all(ch.isalnum() or ch in "-_." for ch in w.name),
             f"{where}.name: letters, digits, '-', '_' and '.' only, got {w.name!r}")
        need(w.name not in names, f"{where}.name: {w.name!r} is used by two walkers")
        names.add(w.name)
        if c.walkers:
            _validate_structure(w.structure, f"{where}.structure", need)
            _validate_sampler(w.sampler, where, need)
    t = c.tls
    if any((t.cert_file, t.key_file, t.server_name, t.server_cert_file, t.server_key_file)):
        need(bool(t.ca_file), "tls.ca_file: required with the other tls keys (the CA that server certificates chain to)")
    need(bool(t.cert_file) == bool(t.key_file), "tls: give both tls.cert_file and tls.key_file (mutual TLS), or neither")
    need(bool(t.server_cert_file) == bool(t.server_key_file),
         "tls: give both tls.server_cert_file and tls.server_key_file, or neither")
    embedded = [n for n, a in (("oracle", c.oracle.addresses), ("learner", c.learner.address),
                               ("sampler", c.sampler.address or c.sampler.addresses)) if not a]
    if t.ca_file and embedded:
        need(bool(t.server_cert_file), f"tls.server_cert_file: the embedded {', '.join(embedded)} service(s) need a "
                                       f"server certificate (SAN 127.0.0.1) when tls is on")
    for key in ("ca_file", "cert_file", "key_file", "server_cert_file", "server_key_file"):
        f = getattr(t, key)
        need(f is None or Path(f).is_file(), f"tls.{key}: file not found: {f}")
    st = c.stop
    need(st.window_steps >= 0, f"stop.window_steps: must be >= 0 steps (0: off), got {st.window_steps}")
    need(0 < st.accurate_ratio <= 1, f"stop.accurate_ratio: must be in (0, 1], got {st.accurate_ratio}")
    need(st.max_labels >= 0, f"stop.max_labels: must be >= 0 (0: no budget), got {st.max_labels}")
    need(st.max_wall_s >= 0, f"stop.max_wall_s: must be >= 0 s (0: no budget), got {st.max_wall_s}")
    p = c.policy
    need(p.sigma_factor is None or p.sigma_factor > 0,
         f"policy.sigma_factor: must be > 0 (threshold = sigma_factor · σn), or null for absolute_threshold "
         f"alone, got {p.sigma_factor}")
    need(p.min_steps_between_calls >= 0,
         f"policy.min_steps_between_calls: must be >= 0 steps (0: every step is gated), "
         f"got {p.min_steps_between_calls}")
    need(p.absolute_threshold is None or p.absolute_threshold > 0,
         f"policy.absolute_threshold: must be > 0 eV/Å, got {p.absolute_threshold}")
    need(p.atoms_per_call >= 1, f"policy.atoms_per_call: must be >= 1, got {p.atoms_per_call}")
    if isinstance(p.initial_atoms, int):
        need(p.initial_atoms >= 1, f"policy.initial_atoms: must be >= 1, got {p.initial_atoms}")
    need(p.acquisition in ACQUISITION, f"policy.acquisition: allowed {', '.join(sorted(ACQUISITION))}, "
         f"got {p.acquisition!r}")
    need(p.update in UPDATE, f"policy.update: allowed {', '.join(sorted(UPDATE))}, got {p.update!r}")
    need(c.calibration.prior_alpha >= 0, f"calibration.prior_alpha: must be >= 0, got {c.calibration.prior_alpha}")
    tr = p.trial
    need(tr.window_steps >= 1, f"policy.trial.window_steps: must be >= 1 step, got {tr.window_steps}")
    need(tr.max_energy_change_eV_per_atom > 0,
         f"policy.trial.max_energy_change_eV_per_atom: must be > 0 eV/atom, got {tr.max_energy_change_eV_per_atom}")
    need(tr.max_force_eV_A > 0, f"policy.trial.max_force_eV_A: must be > 0 eV/Å, got {tr.max_force_eV_A}")
    need(0 < tr.timestep_factor < 1, f"policy.trial.timestep_factor: must be in (0, 1), got {tr.timestep_factor}")
    need(tr.min_timestep_fs > 0, f"policy.trial.min_timestep_fs: must be > 0 fs, got {tr.min_timestep_fs}")
    need(tr.max_retries >= 0, f"policy.trial.max_retries: must be >= 0, got {tr.max_retries}")
    need(tr.recover_steps >= 1, f"policy.trial.recover_steps: must be >= 1 step, got {tr.recover_steps}")
    for w in c.walker_list():
        need(tr.min_timestep_fs <= w.sampler.timestep_fs,
             f"policy.trial.min_timestep_fs ({tr.min_timestep_fs} fs) exceeds walker {w.name}'s timestep "
             f"({w.sampler.timestep_fs} fs)")
    _validate_acquisition(p, need)


def _validate_acquisition(p: PolicyConfig, need) -> None:
    from ase.data import atomic_numbers

    need(p.add_above_sigma is None or p.add_above_sigma > 0,
         f"policy.add_above_sigma: must be > 0 eV/Å, got {p.add_above_sigma}")
    need(p.max_atoms_per_call is None or p.max_atoms_per_call >= p.atoms_per_call,
         f"policy.max_atoms_per_call: must be >= policy.atoms_per_call ({p.atoms_per_call}), "
         f"got {p.max_atoms_per_call}")
    for symbol, cap in dict(p.max_atoms_per_species).items():
        need(isinstance(symbol, str) and symbol in atomic_numbers and atomic_numbers[symbol] > 0,
             f"policy.max_atoms_per_species: {symbol!r} is not a chemical symbol (e.g. Cu, Au)")
        need(isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1,
             f"policy.max_atoms_per_species.{symbol}: must be an integer >= 1 (atoms per oracle call), got {cap!r}")
    need(p.exploration_bonus >= 0, f"policy.exploration_bonus: must be >= 0, got {p.exploration_bonus}")
    need(p.hybrid_fps_calls >= 0, f"policy.hybrid_fps_calls: must be >= 0 oracle calls, got {p.hybrid_fps_calls}")
    need(p.hybrid_max_z2 is None or p.hybrid_max_z2 > 0,
         f"policy.hybrid_max_z2: must be > 0 (mean z² of σ at the oracle calls; ideal 1), got {p.hybrid_max_z2}")


def _validate_structure(s: StructureConfig, where: str, need) -> None:
    need(s.file is not None or s.generator in ("fcc", "bcc", "sc", "diamond", "l12"),
         f"{where}.generator: allowed fcc, bcc, sc, diamond, l12 (or give {where}.file), got {s.generator!r}")
    need(s.a > 0, f"{where}.a: lattice constant must be > 0 Å, got {s.a}")
    need(all(r >= 1 for r in s.repeat), f"{where}.repeat: each repeat must be >= 1, got {list(s.repeat)}")
    need(s.rattle >= 0, f"{where}.rattle: must be >= 0 Å, got {s.rattle}")
    if s.generator == "l12" and s.file is None:
        need(isinstance(s.element, list) and len(s.element) == 2,
             f"{where}.element: l12 needs two elements [A, B] (A3B), got {s.element!r}")


def _validate_sampler(sm: SamplerConfig, where: str, need) -> None:
    from sampler_service.settings import ENGINES, ENSEMBLES

    need(sm.engine in ENGINES, f"{where}.engine: allowed {', '.join(ENGINES)}, got {sm.engine!r}")
    need(sm.ensemble in ENSEMBLES, f"{where}.ensemble: allowed {', '.join(ENSEMBLES)}, got {sm.ensemble!r}")
    need(sm.timestep_fs > 0, f"{where}.timestep_fs: must be > 0 fs, got {sm.timestep_fs}")
    need(sm.temperature_K >= 0, f"{where}.temperature_K: must be >= 0 K, got {sm.temperature_K}")
    need(sm.steps >= 1, f"{where}.steps: must be >= 1, got {sm.steps}")
    need(sm.frame_interval >= 1, f"{where}.frame_interval: must be >= 1, got {sm.frame_interval}")
    need(sm.checkpoint_interval >= 1, f"{where}.checkpoint_interval: must be >= 1, got {sm.checkpoint_interval}")
    for i, (t, temp) in enumerate(sm.schedule):
        need(t >= 0 and temp >= 0, f"{where}.schedule[{i}]: time_fs and temperature_K must be >= 0, got {[t, temp]}")
