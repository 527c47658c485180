"""Build and run a Learner service: GP model store + gRPC plumbing + metrics."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from learner_service.defaults import DEFAULT_HYPERPARAMETERS  # the one set: fit, run, serve
from learner_service.model import MODEL_KINDS, SparseSettings
from protos.epicycle.v1 import learner_pb2, learner_pb2_grpc
from protos.errors import InvalidInput
from protos.server import RunningServer, ServerConfig, create_server

log = logging.getLogger("epicycle.learner")
SERVICE_NAME = learner_pb2.DESCRIPTOR.services_by_name["Learner"].full_name



@dataclass(frozen=True)
class LearnerServiceConfig:
    """A new empty model (species, cutoffs, hyperparameters) or one loaded from ``model_path``.

    ``model_dir``: the learner's own model directory (:mod:`learner_service.checkpoints`):
    Checkpoint/RestoreCheckpoint write and read it, and if it holds checkpoints the learner
    serves the latest one at start (rebuilt from its data), not the new/loaded model (which
    stays restorable as ``"initial"``).  ``keep_checkpoints``: manifests kept (older ones are
    pruned).  ``kernel_cache_max_rows``: see :data:`learner_service.gp.DEFAULT_KERNEL_CACHE_MAX_ROWS`.
    """

    species: tuple[int, ...] = ()
    cutoffs: tuple[float, float] = (6.0, 4.0)               # (r2, r3), Å
    model_kind: str = "exact"                                 # a new model: exact | sparse (learner_service/model.py)
    sparse: SparseSettings = SparseSettings()                 # settings of a new sparse model
    hyperparameters: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_HYPERPARAMETERS))
    energy_noise: float | None = None                         # eV
    stress_noise: float | None = None                         # eV/Å³
    model_path: Path | None = None
    max_iterations: int = 200                                 # Optimize default
    predict_threads: int | None = None                        # kernel threads per prediction (None: 2 if 2 CPUs)
    warm_up: bool = True                                      # compile kernels before SERVING
    model_dir: Path | None = None                             # checkpoints (None: Checkpoint is refused)
    keep_checkpoints: int = 5
    kernel_cache_max_rows: int | None = None                  # None: the GP default
    min_distance: float = 0.5                                 # Å; closer atoms are refused (0: off)
    max_atoms: int = 20_000                                   # atoms per structure (Predict and AddData)
    server: ServerConfig = ServerConfig()

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise InvalidInput(f"learner model kind must be one of {', '.join(MODEL_KINDS)}, got {self.model_kind!r}")
        if self.keep_checkpoints < 1:
            raise InvalidInput(f"learner keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.kernel_cache_max_rows is not None and self.kernel_cache_max_rows < 0:
            raise InvalidInput(f"learner kernel_cache_max_rows must be >= 0, got {self.kernel_cache_max_rows}")
        if not (math.isfinite(self.min_distance) and self.min_distance >= 0):
            raise InvalidInput(f"learner min_distance must be finite and >= 0 Å, got {self.min_distance}")
        if self.max_atoms < 1:
            raise InvalidInput(f"learner max_atoms must be >= 1, got {self.max_atoms}")
        if self.model_path is None and not self.species and self.model_dir is None:
            raise InvalidInput("learner: give the species (atomic numbers) of a new model, or a model_path")
        if len(self.cutoffs) != 2 or not all(c > 0 for c in self.cutoffs):
            raise InvalidInput(f"learner cutoffs must be two positive lengths (r2, r3) in Å, got {self.cutoffs}")
        if self.cutoffs[1] > self.cutoffs[0]:
            raise InvalidInput(f"learner: the 3-body cutoff {self.cutoffs[1]} Å exceeds the 2-body cutoff "
                               f"{self.cutoffs[0]} Å")


def build_model(config: LearnerServiceConfig):
    """The configured model: loaded from ``model_path`` (its kind read from the file), else a new
    empty model of ``model_kind``."""
    from learner_service.model import create_model, load_model

    if config.model_path is not None:
        if not Path(config.model_path).is_file():
            raise InvalidInput(f"learner model file not found: {config.model_path}")
        return load_model(config.model_path)
    return create_model(config.model_kind, list(config.species), tuple(config.cutoffs),
                        hyperparameters=dict(config.hyperparameters), energy_noise=config.energy_noise,
                        stress_noise=config.stress_noise, sparse=config.sparse)


def build_store(config: LearnerServiceConfig, defer_rebuild: bool = False):
    """The model store: the latest checkpoint of ``config.model_dir`` if it has one (rebuilt,
    with progress on stdout), else the new/loaded model of the config.

    With ``defer_rebuild`` returns ``(store, rebuild)``: the store is marked loading (its
    RPCs answer UNAVAILABLE) and ``rebuild()`` -- None if there is nothing to rebuild --
    rebuilds the checkpoint and serves it, so a server can listen (health NOT_SERVING)
    during a rebuild of minutes instead of refusing connections."""
    from learner_service.checkpoints import Lineage, ModelDirectory
    from learner_service.servicer import ModelStore

    if config.predict_threads is not None and config.predict_threads < 1:
        raise InvalidInput(f"learner predict_threads must be >= 1, got {config.predict_threads}")
    md = ModelDirectory(config.model_dir, config.keep_checkpoints).create() if config.model_dir else None
    latest = md.latest_id() if md is not None else None
    if latest is None and config.model_path is None and not config.species:
        raise InvalidInput(f"learner: model directory {config.model_dir} has no checkpoints; give the species "
                           f"(atomic numbers) of a new model, or a model_path")
    initial = build_model(config) if (config.model_path is not None or config.species) else None
    served, lineage, checkpoint_id, manifest = initial, None, "", None
    if latest is not None:
        manifest = md.read_manifest(latest)
        kind = (manifest.get("model") or {}).get("kind", "exact")
        if initial is not None and config.model_path is None and initial.kind != kind:
            raise InvalidInput(f"learner: model directory {config.model_dir} holds a {kind} model, but a new "
                               f"{initial.kind} model was asked for; start with --model-kind {kind} (or an "
                               f"empty model directory)")
        if initial is None:
            from learner_service.environment import Cutoffs
            from learner_service.model import create_model

            initial = create_model(kind, manifest["species"], manifest["cutoffs"],
                                   hyperparameters=dict(config.hyperparameters),
                                   energy_noise=config.energy_noise, stress_noise=config.stress_noise,
                                   pair_cutoffs=Cutoffs.parse_pair_dict(manifest.get("pair_cutoffs")),
                                   settings=(manifest.get("model") or {}).get("settings"))
    served = served if served is not None else initial

    def configure(model):
        if config.predict_threads is not None:
            model.predict_threads = config.predict_threads
        if config.kernel_cache_max_rows is not None:
            model.kernel_cache_max_rows = config.kernel_cache_max_rows
        return model

    configure(initial)
    initial_base = Path(config.model_path).read_bytes() if config.model_path is not None else None
    store = ModelStore(served, model_dir=md, initial=initial, initial_base=initial_base, lineage=lineage,
                       checkpoint_id=checkpoint_id)

    def rebuild() -> None:
        print(f"learner: serving checkpoint {latest} of {md.path} ({manifest['n_environments']} environments, "
              f"{manifest['n_labels']} labels); rebuilding ...", flush=True)
        gp = configure(md.rebuild(manifest, progress=lambda m: print(f"learner: {m}", flush=True),
                                  kernel_cache_max_rows=config.kernel_cache_max_rows))
        store.adopt(gp, Lineage.from_json(manifest["lineage"]), latest)

    if manifest is None:
        return (store, None) if defer_rebuild else store
    if defer_rebuild:
        store.loading = f"the learner is rebuilding checkpoint {latest} of {md.path}; retry when it is SERVING"
        return store, rebuild
    rebuild()
    return store


def warm_up(gp) -> None:
    """Run one prediction on a tiny structure of the model's species so the JIT is compiled."""
    import numpy as np
    from ase import Atoms

    species = list(gp.species)
    n = max(3, len(species))
    rng = np.random.default_rng(0)
    numbers = [species[i % len(species)] for i in range(n)]
    r2 = float(np.max(gp.cutoffs.twobody))
    positions = np.array([[0.0, 0.0, 0.0], [2.2, 0.0, 0.0], [1.1, 1.9, 0.0]] + [[1.1, 0.6, 1.8 * k] for k in
                                                                                 range(1, n - 2)])[:n]
    positions += rng.uniform(-0.05, 0.05, size=positions.shape)
    atoms = Atoms(numbers=numbers, positions=positions + 1.0, cell=np.eye(3) * (2 * r2 + 6.0), pbc=True)
    gp.predict(atoms)               # the fast forces + σ path used by MD
    gp.predict(atoms, stress=True)  # the general path (stress, energies)


#: GP prediction per structure, seconds (a few atoms: sub-millisecond; 10k atoms: seconds)
PREDICTION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                      5, 10, 30)
#: model updates (AddData refactorisation, hyperparameter optimisation), seconds
UPDATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: the servicer's prediction RPCs (label values of ``rpc``)
PREDICTION_RPCS = ("Predict", "PredictStream")


class LearnerMetrics:
    """Learner metrics: a collector reading the model store at scrape time, and histograms fed by the servicer.

    * gauges ``epicycle_learner_model_version``, ``_training_environments``,
      ``_training_labels``, ``_noise_ev_per_angstrom`` (σn), ``_last_update_seconds``,
      ``_hyperparameter{name}``, ``_log_marginal_likelihood`` (after the first optimisation);
    * histograms ``epicycle_learner_prediction_seconds{rpc}`` (GP work per predicted
      structure, Predict or PredictStream), ``epicycle_learner_optimization_seconds``
      (Optimize, refactorisation included), ``epicycle_learner_add_data_seconds``;
    * counters ``epicycle_learner_predicted_atoms_total{rpc}``,
      ``epicycle_learner_optimizations_total{converged}``.

    It is also the servicer's :class:`~learner_service.servicer.ServicerObserver`.
    """

    def __init__(self, registry: CollectorRegistry, store) -> None:
        from prometheus_client import Counter, Histogram

        self.store = store
        self.prediction_seconds = Histogram(
            "epicycle_learner_prediction_seconds",
            "GP prediction per structure (forces, σ, energy, stress), seconds, by RPC.",
            ["rpc"], buckets=PREDICTION_BUCKETS, registry=registry)
        self.predicted_atoms = Counter("epicycle_learner_predicted_atoms", "Atoms predicted, by RPC.", ["rpc"],
                                       registry=registry)
        for rpc in PREDICTION_RPCS:
            self.prediction_seconds.labels(rpc)
            self.predicted_atoms.labels(rpc)
        self.optimization_seconds = Histogram(
            "epicycle_learner_optimization_seconds",
            "Hyperparameter optimisation (Optimize, refactorisation included), seconds.",
            buckets=UPDATE_BUCKETS, registry=registry)
        self.optimizations = Counter("epicycle_learner_optimizations", "Hyperparameter optimisations by whether "
                                     "they converged.", ["converged"], registry=registry)
        for flag in ("true", "false"):
            self.optimizations.labels(flag)
        self.add_data_seconds = Histogram(
            "epicycle_learner_add_data_seconds",
            "AddData: extending the training set and refactorising the model, seconds.",
            buckets=UPDATE_BUCKETS, registry=registry)
        registry.register(self)

    # -- ServicerObserver ------------------------------------------------------------------

    def prediction(self, rpc: str, n_atoms: int, seconds: float) -> None:
        self.prediction_seconds.labels(rpc).observe(seconds)
        self.predicted_atoms.labels(rpc).inc(n_atoms)

    def data_added(self, seconds: float) -> None:
        self.add_data_seconds.observe(seconds)

    def optimized(self, seconds: float, result) -> None:
        self.optimization_seconds.observe(seconds)
        self.optimizations.labels("true" if getattr(result, "converged", False) else "false").inc()

    # -- collector -------------------------------------------------------------------------

    def describe(self):
        return []

    def collect(self):
        gp, version = self.store.snapshot()
        for name, value, help_text in (
            ("epicycle_learner_model_version", version, "Version of the served model."),
            ("epicycle_learner_training_environments", gp.n_environments, "Environments in the training set."),
            ("epicycle_learner_training_labels", gp.n_labels, "Training labels (force components, energies, stresses)."),
            ("epicycle_learner_inducing_environments", getattr(gp, "n_inducing", 0),
             "Inducing environments of a sparse model (0: the exact GP)."),
            ("epicycle_learner_noise_ev_per_angstrom", dict(gp.hyperparameters).get("noise", 0.0),
             "Force noise σn, eV/Å."),
            ("epicycle_learner_last_update_seconds", self.store.last_update_seconds,
             "Duration of the last model update (add data / optimise), seconds."),
        ):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], float(value))
            yield g
        h = GaugeMetricFamily("epicycle_learner_hyperparameter", "Current hyperparameters.", labels=["name"])
        for k, v in dict(gp.hyperparameters).items():
            h.add_metric([k], float(v))
        yield h
        last = self.store.last_optimize
        if last is not None and getattr(last, "log_likelihood", None) is not None:
            g = GaugeMetricFamily("epicycle_learner_log_marginal_likelihood",
                                  "Log marginal likelihood at the end of the last hyperparameter optimisation.")
            g.add_metric([], float(last.log_likelihood))
            yield g


def start_learner_server(config: LearnerServiceConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    from learner_service.servicer import LearnerServicer

    registry = registry if registry is not None else CollectorRegistry()
    store, rebuild = build_store(config, defer_rebuild=True)
    metrics = LearnerMetrics(registry, store)

    def add(server):
        learner_pb2_grpc.add_LearnerServicer_to_server(
            LearnerServicer(store, config.max_iterations, observer=metrics,
                            min_distance=config.min_distance, max_atoms=config.max_atoms), server)
        return [SERVICE_NAME]

    running = create_server(config.server, add, registry=registry)
    running.model_store = store  # type: ignore[attr-defined]
    try:
        if rebuild is not None:  # listening, NOT_SERVING, RPCs UNAVAILABLE meanwhile
            rebuild()
        if config.warm_up:
            warm_up(store.snapshot()[0])
    except BaseException:
        running.stop(grace=0)
        raise
    running.mark_ready()
    return running


# --------------------------------------------------------------------------- CLI


def _species(text: str) -> tuple[int, ...]:
    from ase.data import atomic_numbers

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.isdigit():
            out.append(int(item))
        elif item in atomic_numbers:
            out.append(atomic_numbers[item])
        else:
            raise InvalidInput(f"unknown element {item!r} in --species")
    return tuple(out)


def register_serve_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--species", default="", help="elements of a new model, e.g. Al,Cu (or atomic numbers)")
    p.add_argument("--cutoffs", default="6.0,4.0", help="2- and 3-body cutoffs, Å (default 6.0,4.0)")
    p.add_argument("--model", type=Path, help="load this saved model instead of starting empty (its kind, "
                                              "exact or sparse, is read from the file)")
    p.add_argument("--model-kind", choices=MODEL_KINDS, default="exact",
                   help="kind of a new model: exact (full GP; each oracle call adds the selected atoms' forces) or "
                        "sparse (every force, energy and stress of a call; the selected atoms become inducing "
                        "environments). Default exact")
    p.add_argument("--max-inducing", type=int, default=None,
                   help="sparse: at most this many inducing environments in total (default: no cap)")
    p.add_argument("--inducing-rule", choices=("acquisition", "variance"), default="acquisition",
                   help="sparse: inducing environments are the atoms the acquisition selected (acquisition) or "
                        "the model's own pick by local-energy residual variance (variance). Default acquisition")
    p.add_argument("--hyperparameters", default="",
                   help="sig2,ls2,sig3,ls3,noise (eV, Å, eV, Å, eV/Å) of a new model")
    p.add_argument("--max-iterations", type=int, default=200, help="default iteration cap of Optimize")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="the learner's own model directory: Checkpoint writes it, and at start the latest "
                        "checkpoint in it is served (rebuilt from its data)")
    p.add_argument("--keep-checkpoints", type=int, default=5, help="checkpoint manifests kept (default 5)")
    p.add_argument("--kernel-cache-max-rows", type=int, default=None,
                   help="keep the 2-/3-body kernel matrices up to this many covariance rows (default 8192; "
                        "3 rows per force environment)")
    p.add_argument("--min-distance", type=float, default=0.5,
                   help="refuse structures with two atoms (or periodic images) closer than this, Å (default 0.5; 0: off)")
    p.add_argument("--max-atoms", type=int, default=20_000,
                   help="refuse Predict/AddData structures with more atoms (default 20000)")
    p.set_defaults(func=serve_learner)


def serve_learner(args: argparse.Namespace) -> int:
    from protos.server import serve_until_signalled

    cutoffs = tuple(float(c) for c in args.cutoffs.split(","))
    hyps = dict(DEFAULT_HYPERPARAMETERS)
    if args.hyperparameters:
        values = [float(v) for v in args.hyperparameters.split(",")]
        if len(values) != 5:
            raise InvalidInput("--hyperparameters needs 5 values: sig2,ls2,sig3,ls3,noise")
        hyps = dict(zip(("sig2", "ls2", "sig3", "ls3", "noise"), values))
    config = LearnerServiceConfig(species=_species(args.species), cutoffs=cutoffs, hyperparameters=hyps,
                                  model_kind=args.model_kind,
                                  sparse=SparseSettings(max_inducing=args.max_inducing,
                                                        inducing_rule=args.inducing_rule),
                                  model_path=args.model, max_iterations=args.max_iterations,
                                  model_dir=args.model_dir, keep_checkpoints=args.keep_checkpoints,
                                  kernel_cache_max_rows=args.kernel_cache_max_rows,
                                  min_distance=args.min_distance, max_atoms=args.max_atoms,
                                  server=args.server_config(args))
    print("learner: compiling kernels ...", flush=True)
    running = start_learner_server(config)
    print(f"learner serving on {running.address}; SIGTERM to stop", flush=True)
    serve_until_signalled(running)
    print("learner stopped", flush=True)
    return 0
