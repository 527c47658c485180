"""gRPC adapter for the Learner service, and the versioned model store it serves.

:class:`ModelStore` holds the current model and its version; the store and the
servicer use only the :class:`learner_service.model.LearnerModel` interface (the
exact or the sparse GP).  Writers (AddData, AddDataBatch, Optimize, LoadModel, RestoreCheckpoint) are
serialised and work on a *clone* (:meth:`LearnerModel.clone`: new containers,
shared arrays, which are never modified in place); the clone replaces the served
model atomically when it is ready, and the version goes up by one.  Readers
(Predict, PredictStream) take a snapshot reference, so a prediction always sees
one consistent model — the old one while an update is under way — and reports
that model's version.

With a model directory the store also owns the model's durability
(:mod:`learner_service.checkpoints`): every applied AddData/AddDataBatch is one
data batch, kept in memory until the next Checkpoint writes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from ase import Atoms

from protos import wire
from protos.epicycle.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.errors import InvalidInput, ModelError, NotFound, NotReady, SetupError
from protos.structures import StructureLimits, check_min_distance, check_structure, isolated_atoms

from learner_service.checkpoints import INITIAL, DataItem, Lineage, ModelDirectory, apply_items, base_name
from learner_service.defaults import HYPERPARAMETER_UNITS
from learner_service.diagnostics import model_warnings


def _log(message: str) -> None:
    print(f"learner: {message}", file=sys.stderr, flush=True)


class ModelStore:
    """The served model and its version; copy-on-write updates; checkpoints.

    ``model_dir`` (a :class:`ModelDirectory`, optional) enables :meth:`checkpoint` and
    :meth:`restore`; ``initial`` is the model the learner started with (restorable as
    ``"initial"``; default: ``gp`` as given), ``initial_base`` the bytes of the model file it
    was loaded from (None: an empty model).  ``lineage``/``checkpoint_id`` describe ``gp`` if
    it was rebuilt from a checkpoint.
    """

    def __init__(self, gp, version: int = 1, model_dir: ModelDirectory | None = None, initial=None,
                 initial_base: bytes | None = None, lineage: Lineage | None = None, checkpoint_id: str = "") -> None:
        self._gp = gp
        self._version = version
        self._swap = threading.Lock()
        self._writer = threading.Lock()
        self.last_update_seconds = 0.0
        self.last_optimize = None
        self.model_dir = model_dir
        #: set while the served model is not the one to serve yet (a checkpoint being rebuilt
        #: at start): the servicer answers UNAVAILABLE with this message
        self.loading: str | None = None
        self._pending_bases: dict[str, bytes] = {}
        initial_lineage = Lineage()
        if initial_base is not None:
            name = base_name(initial_base)
            self._pending_bases[name] = initial_base
            initial_lineage = Lineage(base=name)
        self._initial = ((initial if initial is not None else gp).clone(), initial_lineage)
        self._lineage = lineage if lineage is not None else initial_lineage
        self._pending: dict[int, list[DataItem]] = {}
        self.checkpoint_id = checkpoint_id
        #: older versions kept in memory for walkers pinned to them (:meth:`hold`)
        self._held: dict[int, object] = {}
        self._hold_wanted: set[int] = set()

    def snapshot(self, version: int = 0):
        """``(gp, version)`` to read from; never mutated afterwards.  ``version`` > 0: that held
        version (:meth:`hold`) or the newest if it is that one; :class:`NotFound` otherwise."""
        with self._swap:
            if not version or version == self._version:
                return self._gp, self._version
            gp = self._held.get(int(version))
            if gp is None:
                held = ", ".join(str(v) for v in sorted(self._held)) or "none"
                raise NotFound(f"model version {version} is not held by this learner (newest {self._version}, "
                               f"held: {held}); a restarted learner holds only its newest model")
            return gp, int(version)

    def hold(self, versions) -> tuple[list[int], list[int], int]:
        """Keep exactly ``versions`` (besides the newest) in memory from now on: each later
        update keeps the outgoing model if its version is wanted.  Returns ``(held, missing,
        newest)``: ``missing`` were asked for but are no longer in memory."""
        wanted = {int(v) for v in versions if int(v) > 0}
        with self._swap:
            self._hold_wanted = wanted
            self._held = {v: gp for v, gp in self._held.items() if v in wanted}
            missing = sorted(v for v in wanted if v not in self._held and v != self._version)
            return sorted(self._held), missing, self._version

    def _retire(self) -> None:
        """Called under ``_swap`` just before the newest model is replaced: keep it if held."""
        if self._version in self._hold_wanted:
            self._held[self._version] = self._gp

    @property
    def version(self) -> int:
        return self.snapshot()[1]

    def adopt(self, gp, lineage: Lineage, checkpoint_id: str) -> None:
        """Serve ``gp``, rebuilt from ``checkpoint_id`` at start, and clear :attr:`loading`."""
        with self._writer:
            with self._swap:
                self._gp, self._lineage, self._pending, self.checkpoint_id = gp, lineage, {}, checkpoint_id
                self.loading = None

    def update(self, change: Callable[[object], object], items: Sequence[DataItem] | None = None):
        """Apply ``change(clone)`` to a clone, refactorise it, then serve it.

        ``items``: the data ``change`` adds (one data batch of the model's lineage, written at
        the next checkpoint).  Returns ``(result_of_change, new_version)``.  If ``change``
        raises, the served model is untouched.
        """
        with self._writer:
            started = time.perf_counter()
            current, _ = self.snapshot()
            work = current.clone()
            result = change(work)
            if work.n_labels:
                work.train()
            with self._swap:
                self._retire()
                self._gp = work
                self._version += 1
                version = self._version
                if items is not None and self.model_dir is not None:  # without a directory: nothing to write
                    index = self._lineage.end
                    self._pending[index] = list(items)
                    self._lineage = dataclasses.replace(self._lineage, end=index + 1)
            self.last_update_seconds = time.perf_counter() - started
            return result, version

    def replace(self, gp, model_file: bytes | None = None) -> int:
        """Serve ``gp`` (LoadModel); ``model_file``: the bytes it was loaded from, the base of
        the new lineage (written at the next checkpoint)."""
        with self._writer:
            if gp.n_labels:
                gp.train()
            with self._swap:
                self._retire()
                self._gp = gp
                self._version += 1
                end = self._lineage.end
                if model_file is not None:
                    name = base_name(model_file)
                    self._pending_bases[name] = model_file
                    self._lineage = Lineage(base=name, first=end, end=end)
                else:
                    self._lineage = Lineage(first=end, end=end)
                self._pending = {}
                self.checkpoint_id = ""
                return self._version

    def _need_dir(self, what: str) -> ModelDirectory:
        if self.model_dir is None:
            raise SetupError(f"{what} needs a model directory; start the learner with --model-dir DIR "
                             f"(LearnerServiceConfig.model_dir)")
        return self.model_dir

    def checkpoint(self):
        """Write a checkpoint of the served model (:meth:`ModelDirectory.write_checkpoint`);
        returns ``(CheckpointWritten, model_version, gp)``."""
        md = self._need_dir("Checkpoint")
        with self._writer:
            gp, version = self.snapshot()
            base = self._lineage.base
            written, lineage, _ = md.write_checkpoint(gp, version, self._lineage, self._pending,
                                                      self._pending_bases.get(base) if base else None)
            with self._swap:
                self._lineage = lineage
                self._pending = {}
                self.checkpoint_id = written.checkpoint_id
            return written, version, gp

    def restore(self, checkpoint_id: str, progress: Callable[[str], None] | None = _log):
        """Serve the model of ``checkpoint_id`` (or ``"initial"``) again; later checkpoints are
        superseded.  Cheap when the checkpoint's data and factor history are a prefix of the
        served model's (:meth:`GaussianProcess.truncated`), else rebuilt from the directory.
        Returns ``(gp, version)``."""
        md = self._need_dir("RestoreCheckpoint")
        with self._writer:
            current, _ = self.snapshot()
            if checkpoint_id == INITIAL:
                gp, lineage = self._initial[0].clone(), self._initial[1]
                new_id = ""
            else:
                manifest = md.read_manifest(checkpoint_id)
                lineage = Lineage.from_json(manifest["lineage"])
                live = self._lineage
                gp = None
                if (lineage.base == live.base and lineage.first == live.first
                        and live.files[:len(lineage.files)] == lineage.files):
                    try:
                        gp = current.truncated(manifest["counts"], manifest["hyperparameters"], manifest["factor"])
                        gp.set_version(int(manifest["gp_version"]))
                    except ModelError:
                        gp = None
                if gp is None:
                    if progress:
                        progress(f"rebuilding checkpoint {checkpoint_id} from {md.path}")
                    gp = md.rebuild(manifest, progress, kernel_cache_max_rows=current.kernel_cache_max_rows)
                new_id = checkpoint_id
            gp.predict_threads = current.predict_threads
            gp.kernel_cache_max_rows = current.kernel_cache_max_rows
            superseded = md.supersede_after(new_id or None)
            if superseded and progress:
                progress(f"restored {checkpoint_id}; superseded checkpoints {', '.join(superseded)}")
            with self._swap:
                self._retire()
                self._gp = gp
                self._version += 1
                self._lineage = lineage
                self._pending = {}
                self.checkpoint_id = new_id
                return gp, self._version


# --------------------------------------------------------------------------- conversions


def prediction_to_proto(pred, version: int, out: common_pb2.Prediction) -> common_pb2.Prediction:
    wire.encode_array(pred.forces, "<f8", out.forces)
    wire.encode_array(pred.force_std, "<f8", out.force_std)
    if getattr(pred, "atom_std", None) is not None:
        wire.encode_array(pred.atom_std, "<f8", out.atom_std)
    if getattr(pred, "energy", None) is not None:
        out.energy = float(pred.energy)
    if getattr(pred, "local_energies", None) is not None:
        wire.encode_array(pred.local_energies, "<f8", out.local_energies)
    if getattr(pred, "stress", None) is not None:
        wire.encode_array(pred.stress, "<f8", out.stress)
    if getattr(pred, "energy_std", None) is not None:
        out.energy_std = float(pred.energy_std)
    out.noise_std = float(pred.noise)
    out.model_version = version
    return out


def hyperparameters_to_proto(values: dict) -> list[common_pb2.Hyperparameter]:
    return [common_pb2.Hyperparameter(name=k, value=float(v), unit=HYPERPARAMETER_UNITS.get(k, ""))
            for k, v in values.items()]


def bounds_from_proto(bounds, names) -> dict[str, tuple[float, float]]:
    """OptimizeRequest.bounds as ``{name: (lower, upper)}``, every box checked."""
    out: dict[str, tuple[float, float]] = {}
    for b in bounds:
        if b.name not in names:
            raise InvalidInput(f"bounds: unknown hyperparameter {b.name!r}; this model has {', '.join(names)}")
        if b.name in out:
            raise InvalidInput(f"bounds: {b.name} given twice")
        if not (math.isfinite(b.lower) and math.isfinite(b.upper) and 0.0 < b.lower < b.upper):
            raise InvalidInput(f"bounds: {b.name} needs 0 < lower < upper (finite), got [{b.lower}, {b.upper}]")
        out[b.name] = (float(b.lower), float(b.upper))
    return out


def model_info(gp, version: int, checkpoint_id: str = "") -> learner_pb2.ModelInfo:
    hyps = dict(gp.hyperparameters)
    cutoffs = (float(np.max(gp.cutoffs.twobody)), float(np.max(gp.cutoffs.threebody)))
    info = learner_pb2.ModelInfo(
        model_version=version,
        hyperparameters=hyperparameters_to_proto(hyps),
        noise_std=float(hyps.get("noise", 0.0)),
        n_environments=int(gp.n_environments),
        n_labels=int(gp.n_labels),
        species=[int(z) for z in gp.species],
        cutoff_two_body=float(cutoffs[0]),
        cutoff_three_body=cutoffs[1],
        ready=True,
        checkpoint_id=checkpoint_id,
        warnings=model_warnings(gp),
        model_kind=gp.kind,
        n_inducing=int(getattr(gp, "n_inducing", 0)),
    )
    return info


def _check_positions(atoms: Atoms, name: str) -> None:
    wire.check_finite(f"{name}.positions", atoms.positions)
    wire.check_finite(f"{name}.cell", atoms.cell.array)
    if atoms.pbc.any():
        periodic = atoms.cell.array[atoms.pbc]
        if np.any(np.linalg.norm(periodic, axis=1) < 1e-8) or abs(np.linalg.det(atoms.cell.array)) < 1e-8:
            raise InvalidInput(f"{name}: the cell is singular or has a zero vector along a periodic direction "
                               f"(cell = {atoms.cell.array.tolist()}, pbc = {atoms.pbc.tolist()})")


def _indices(values, n_atoms: int, name: str) -> np.ndarray:
    idx = np.asarray(list(values), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_atoms):
        bad = int(idx[(idx < 0) | (idx >= n_atoms)][0])
        raise InvalidInput(f"{name}: atom index {bad} is out of range for a structure of {n_atoms} atoms")
    if len(np.unique(idx)) != len(idx):
        raise InvalidInput(f"{name}: atom indices must be unique, got {idx.tolist()}")
    return idx


@dataclass
class _StreamState:
    numbers: np.ndarray | None = None
    cell: np.ndarray | None = None
    pbc: list | None = None


def _stream_structure(msg: common_pb2.Structure, state: _StreamState) -> Atoms:
    """Decode a stream request; numbers/cell/pbc may be omitted to reuse the previous ones."""
    if wire.has_array(msg, "numbers"):
        atoms = wire.structure_from_proto(msg)
        state.numbers, state.cell, state.pbc = atoms.numbers.copy(), atoms.cell.array.copy(), list(atoms.pbc)
        return atoms
    if state.numbers is None:
        raise InvalidInput("structure.numbers is missing (the first request of a stream must carry it)")
    if not wire.has_array(msg, "positions"):
        raise InvalidInput("structure.positions is missing")
    n = len(state.numbers)
    positions = wire.decode_array(msg.positions, "structure.positions", (n, 3), "<f8")
    if wire.has_array(msg, "cell"):
        state.cell = wire.decode_array(msg.cell, "structure.cell", (3, 3), "<f8", writable=True)
    if len(msg.pbc) not in (0, 3):
        raise InvalidInput(f"structure.pbc must have 3 flags (or none), got {len(msg.pbc)}")
    if len(msg.pbc) == 3:
        state.pbc = list(msg.pbc)
    return Atoms(numbers=state.numbers, positions=positions, cell=state.cell, pbc=state.pbc)


class ServicerObserver:
    """What the servicer reports for metrics; these no-ops by default
    (``learner_service.server.LearnerMetrics`` records them in Prometheus)."""

    def prediction(self, rpc: str, n_atoms: int, seconds: float) -> None:
        """One structure predicted (``rpc``: ``Predict`` or ``PredictStream``), ``seconds`` of GP work."""

    def data_added(self, seconds: float) -> None:
        """AddData finished: the model was extended and refactorised in ``seconds``."""

    def optimized(self, seconds: float, result) -> None:
        """Optimize finished in ``seconds`` (``result``: the GP's optimisation result)."""


#: OptimizeRequest.method values ("" means "ml")
OPTIMIZE_METHODS = ("ml", "map")
#: most prior draws of one "map" Optimize (each is screened with one kernel build)
MAX_MAP_RESTARTS = 100

#: most entries of one KernelDistances answer's d_within (r rows × m atoms; the full m × m
#: matrix of 2,048 atoms): 32 MiB of float64
MAX_KERNEL_DISTANCE_ENTRIES = 2048 * 2048

#: defaults of the structure checks (LearnerServiceConfig.min_distance / max_atoms)
DEFAULT_MIN_DISTANCE = 0.5   # Å
DEFAULT_MAX_ATOMS = 20_000


class LearnerServicer(learner_pb2_grpc.LearnerServicer):
    """Structures are checked with :func:`protos.structures.check_structure` (the oracle's rules):
    at most ``max_atoms`` atoms, no two atoms (or periodic images) closer than ``min_distance``
    Å, atomic numbers in the served model's species.  AddData also refuses a selected atom with
    no neighbour within the model's 2-body cutoff (it teaches the GP nothing).  A PredictStream
    follow-up (positions only) gets the minimum-distance check alone: the atoms, numbers and
    count were checked on the stream's first message, and wire decoding already rejects
    non-finite positions (measured cost: see :meth:`_check_followup`)."""

    def __init__(self, store: ModelStore, default_max_iterations: int = 200,
                 observer: ServicerObserver | None = None, min_distance: float = DEFAULT_MIN_DISTANCE,
                 max_atoms: int = DEFAULT_MAX_ATOMS) -> None:
        self.store = store
        self.default_max_iterations = default_max_iterations
        self.observer = observer or ServicerObserver()
        StructureLimits(min_distance=min_distance, max_atoms=max_atoms)  # raises on bad settings
        self.min_distance = float(min_distance)
        self.max_atoms = int(max_atoms)

    def _limits(self, gp, require_periodic: bool = False) -> StructureLimits:
        species = [int(z) for z in getattr(gp, "species", ())]
        return StructureLimits(min_distance=self.min_distance, max_atoms=self.max_atoms,
                               species=frozenset(species) if species else None,
                               require_periodic=require_periodic)

    def _check_followup(self, atoms: Atoms, name: str = "structure") -> None:
        """A stream follow-up: minimum distance only.  Measured (2 cores, Al fcc, 24 training
        environments): 0.24 ms per 32-atom step against an 11 ms prediction (2 %), 0.9 ms per
        1,008-atom step against 266 ms (0.3 %); the reduced cell is cached, so a stream with a
        fixed cell pays for the k-d tree query only."""
        check_min_distance(atoms.positions, atoms.cell.array, atoms.pbc, self.min_distance, atoms.numbers, name)

    def _ready(self) -> None:
        """UNAVAILABLE while the store is loading (a checkpoint rebuilt at start)."""
        loading = self.store.loading
        if loading:
            raise NotReady(loading)

    # -- prediction -----------------------------------------------------------------------

    def _predict(self, atoms: Atoms, request: learner_pb2.PredictRequest, rpc: str,
                 full_check: bool = True) -> learner_pb2.PredictResponse:
        self._ready()
        started = time.perf_counter()
        gp, version = self.store.snapshot(int(getattr(request, "model_version", 0)))
        _check_positions(atoms, "structure")
        if full_check:
            check_structure(atoms, self._limits(gp), "structure")
        else:
            self._check_followup(atoms)
        _indices(request.atom_indices, len(atoms), "atom_indices")
        condition = []
        for k, c in enumerate(getattr(request, "condition_on", ())):
            name = f"condition_on[{k}]"
            c_atoms = wire.structure_from_proto(c.structure, name=f"{name}.structure")
            _check_positions(c_atoms, f"{name}.structure")
            check_structure(c_atoms, self._limits(gp), f"{name}.structure")
            c_idx = _indices(c.atom_indices, len(c_atoms), f"{name}.atom_indices")
            if not c_idx.size:
                raise InvalidInput(f"{name}.atom_indices is empty: name the atoms whose environments to condition on")
            condition.append((c_atoms, c_idx))
        pred = gp.predict(atoms, stress=request.compute_stress, condition_on=condition)
        reply = learner_pb2.PredictResponse(sequence=request.sequence)
        prediction_to_proto(pred, version, reply.prediction)
        self.observer.prediction(rpc, len(atoms), time.perf_counter() - started)
        return reply

    def Predict(self, request, context):
        return self._predict(wire.structure_from_proto(request.structure), request, "Predict")

    def PredictStream(self, request_iterator, context) -> Iterator[learner_pb2.PredictResponse]:
        state = _StreamState()
        for request in request_iterator:
            full = wire.has_array(request.structure, "numbers")  # a first message, or a new structure
            atoms = _stream_structure(request.structure, state)
            yield self._predict(atoms, request, "PredictStream", full_check=full)

    # -- training -------------------------------------------------------------------------

    def _data_item(self, gp, request: learner_pb2.AddDataRequest, prefix: str = "") -> DataItem:
        """An AddDataRequest validated against the served model ``gp`` (field names in errors
        carry ``prefix``, e.g. ``items[3].``)."""
        atoms = wire.structure_from_proto(request.structure, name=f"{prefix}structure")
        _check_positions(atoms, f"{prefix}structure")
        check_structure(atoms, self._limits(gp), f"{prefix}structure")
        n = len(atoms)
        energy, forces, stress = wire.labels_from_proto(request.labels, n, name=f"{prefix}labels")
        idx = _indices(request.atom_indices, n, f"{prefix}atom_indices")
        if idx.size and forces is None:
            raise InvalidInput(f"{prefix}labels.forces is required when atom_indices are given")
        if not idx.size and not request.use_energy and not request.use_stress:
            raise InvalidInput(f"{prefix or 'AddData: '}nothing to add: give atom_indices, or set use_energy/use_stress")
        if request.use_energy and energy is None:
            raise InvalidInput(f"{prefix}use_energy is set but {prefix}labels.energy is missing")
        if request.use_stress and stress is None:
            raise InvalidInput(f"{prefix}use_stress is set but {prefix}labels.stress is missing")
        if request.use_stress and not atoms.pbc.all():
            raise InvalidInput(f"{prefix}use_stress needs a structure periodic in all three directions")
        wire.check_finite(f"{prefix}labels.forces", forces)
        wire.check_finite(f"{prefix}labels.energy", energy)
        wire.check_finite(f"{prefix}labels.stress", stress)
        if idx.size:
            cutoff = float(np.max(gp.cutoffs.twobody))
            lonely = isolated_atoms(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, idx)
            if lonely.size:
                k = int(lonely[0])
                more = f" ({lonely.size - 1} more: {lonely[1:10].tolist()})" if lonely.size > 1 else ""
                raise InvalidInput(
                    f"{prefix}atom_indices: atom {k} ({atoms.get_chemical_symbols()[k]}) has no neighbour within the "
                    f"model's 2-body cutoff {cutoff:g} Å{more}; an isolated atom teaches the GP nothing")
        return DataItem(atoms=atoms, forces=None if forces is None else np.array(forces), atom_indices=idx,
                        energy=energy, stress=None if stress is None else np.array(stress),
                        use_energy=bool(request.use_energy), use_stress=bool(request.use_stress))

    def _add(self, items: list[DataItem]) -> learner_pb2.AddDataResponse:
        self._ready()
        started = time.perf_counter()
        _, version = self.store.update(lambda gp: apply_items(gp, items), items=items)
        self.observer.data_added(time.perf_counter() - started)
        gp, _ = self.store.snapshot()
        return learner_pb2.AddDataResponse(model_version=version, n_environments=gp.n_environments,
                                           n_labels=gp.n_labels)

    def AddData(self, request, context):
        self._ready()
        return self._add([self._data_item(self.store.snapshot()[0], request)])

    def AddDataBatch(self, request, context):
        """Every item validated first, then one model update (all or nothing), one
        refactorisation, one version bump."""
        if not request.items:
            raise InvalidInput("AddDataBatch: items is empty")
        self._ready()
        gp, _ = self.store.snapshot()
        return self._add([self._data_item(gp, item, f"items[{k}].") for k, item in enumerate(request.items)])

    def Optimize(self, request, context):
        """method "ml" (or empty): ``LearnerModel.optimize`` (ML-II); "map": prior, restarts and a held-out
        check on the model's own frames (:func:`learner_service.served_selection.map_select`)."""
        self._ready()
        method = request.method or "ml"
        if method not in OPTIMIZE_METHODS:
            raise InvalidInput(f"method: unknown optimisation method {request.method!r}; allowed: "
                               f"{', '.join(OPTIMIZE_METHODS)}")
        if request.max_iterations < 0 or request.tolerance < 0:
            raise InvalidInput("max_iterations and tolerance must be >= 0")
        gp, _ = self.store.snapshot()
        if not gp.n_labels:
            raise ModelError("cannot optimise hyperparameters without training data; call AddData first")
        bounds = bounds_from_proto(request.bounds, gp.hyperparameter_names)
        started = time.perf_counter()
        if method == "map":
            change = self._map_change(request, gp, bounds)
        else:
            for name in ("restarts", "holdout"):
                if request.HasField(name):
                    raise InvalidInput(f"{name} applies to method 'map', not {method!r}")
            kwargs = {"max_iterations": request.max_iterations or self.default_max_iterations, "bounds": bounds,
                      "fix": tuple(request.fixed), "space": request.space or "log"}
            if request.tolerance:
                kwargs["ftol"] = request.tolerance

            def change(g):
                return g.optimize(**kwargs)
        result, version = self.store.update(change)
        gp, _ = self.store.snapshot()
        if method == "map":  # the search ran on the kept atoms: report (and export) the served model's likelihood
            value = gp.log_likelihood(gradient=False)
            result = dataclasses.replace(result, log_likelihood=float(value[0] if isinstance(value, tuple) else value))
        self.store.last_optimize = result
        seconds = time.perf_counter() - started
        self.observer.optimized(seconds, result)
        return learner_pb2.OptimizeResponse(
            hyperparameters=hyperparameters_to_proto(dict(gp.hyperparameters)),
            log_likelihood=float(result.log_likelihood), iterations=int(result.iterations),
            converged=bool(result.converged), message=str(result.message),
            seconds=seconds, model_version=version, at_bounds=sorted(result.at_bounds))

    @staticmethod
    def _map_change(request, gp, bounds):
        """The store update of method "map" (request checked here, before the writer lock)."""
        from learner_service.served_selection import (DEFAULT_HOLDOUT, DEFAULT_MAP_ITERATIONS, DEFAULT_RESTARTS,
                                                      map_select)

        if gp.kind != "exact":
            raise ModelError(f"method 'map' (prior, restarts, held-out check) is for the exact GP; this learner "
                             f"serves a {gp.kind} model, whose hyperparameters maximise its own likelihood: "
                             f"use method 'ml'")
        if request.tolerance:
            raise InvalidInput("tolerance applies to method 'ml'; method 'map' stops on its gradient "
                               "(max_iterations caps it)")
        if request.space not in ("", "log"):
            raise InvalidInput(f"space {request.space!r} applies to method 'ml'; method 'map' searches in log θ")
        restarts = request.restarts if request.HasField("restarts") else DEFAULT_RESTARTS
        holdout = request.holdout if request.HasField("holdout") else DEFAULT_HOLDOUT
        if not 0 <= restarts <= MAX_MAP_RESTARTS:
            raise InvalidInput(f"restarts must be in [0, {MAX_MAP_RESTARTS}] (each costs a kernel build), got {restarts}")
        if not (math.isfinite(holdout) and 0.0 <= holdout < 1.0):
            raise InvalidInput(f"holdout must be in [0, 1) (a share of the frames), got {holdout}")
        unknown = set(request.fixed) - set(gp.hyperparameter_names)
        if unknown:
            raise InvalidInput(f"fixed: unknown hyperparameter(s) {sorted(unknown)}; this model has "
                               f"{', '.join(gp.hyperparameter_names)}")
        kwargs = {"restarts": int(restarts), "seed": int(request.seed), "holdout": float(holdout),
                  "max_iterations": request.max_iterations or DEFAULT_MAP_ITERATIONS, "bounds": bounds,
                  "fix": tuple(request.fixed)}

        def change(g):
            return map_select(g, **kwargs)
        return change

    # -- model management -----------------------------------------------------------------

    def GetModelInfo(self, request, context):
        gp, version = self.store.snapshot()
        info = model_info(gp, version, self.store.checkpoint_id)
        if self.store.loading:
            info.ready = False
            return info
        if gp.n_labels:
            value = gp.log_likelihood(gradient=False)
            info.log_likelihood = float(value[0] if isinstance(value, tuple) else value)
        return info

    def ExportModel(self, request, context):
        self._ready()
        from learner_service.model import model_format_version

        gp, version = self.store.snapshot()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            gp.save(path)
            data = path.read_bytes()
        return learner_pb2.ExportModelResponse(model=data, format=gp.format_name,
                                               format_version=model_format_version(gp), model_version=version)

    def LoadModel(self, request, context):
        self._ready()
        from learner_service.model import load_model

        if not request.model:
            raise InvalidInput("model is empty")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            path.write_bytes(request.model)
            try:
                gp = load_model(path)
            except (InvalidInput, ModelError):
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt upload is the client's problem
                raise InvalidInput(f"cannot load the model: {type(exc).__name__}: {exc}") from None
        current, _ = self.store.snapshot()
        gp.predict_threads = getattr(current, "predict_threads", gp.predict_threads)  # a service setting, not the model's
        version = self.store.replace(gp, model_file=bytes(request.model))
        return model_info(gp, version, self.store.checkpoint_id)

    # -- checkpoints ----------------------------------------------------------------------

    def Checkpoint(self, request, context):
        self._ready()
        written, version, gp = self.store.checkpoint()
        return learner_pb2.CheckpointResponse(
            checkpoint_id=written.checkpoint_id, model_version=version, n_environments=gp.n_environments,
            n_labels=gp.n_labels, bytes_written=written.bytes_written, seconds=written.seconds)

    def RestoreCheckpoint(self, request, context):
        self._ready()
        if not request.checkpoint_id:
            raise InvalidInput("checkpoint_id is empty (give an id from Checkpoint, or 'initial')")
        gp, version = self.store.restore(request.checkpoint_id)
        return model_info(gp, version, self.store.checkpoint_id)

    def HoldVersions(self, request, context):
        self._ready()
        held, missing, newest = self.store.hold(request.model_versions)
        return learner_pb2.HoldVersionsResponse(held=held, missing=missing, newest=newest)

    def Map(self, request, context):
        """The served model mapped to splines (learner_service/offline.py ``map_to_directory``)."""
        self._ready()
        from learner_service.offline import map_to_directory

        gp, version = self.store.snapshot()
        if gp.kind != "exact":
            raise ModelError(f"Map: only the exact GP can be mapped to splines, this learner serves a {gp.kind} model")
        for name in ("spacing2", "spacing3", "spacing_jk"):
            value = getattr(request, name)
            if not (np.isfinite(value) and value >= 0):
                raise InvalidInput(f"Map: {name} must be a spacing in Å > 0 (0: the default), got {value}")
        if request.body_order not in (0, 2, 3):
            raise InvalidInput(f"Map: body_order must be 2 or 3 (0: the model's), got {request.body_order}")
        if request.samples < 0:
            raise InvalidInput(f"Map: samples must be >= 1 (0: the default), got {request.samples}")
        with tempfile.TemporaryDirectory() as tmp:
            report = map_to_directory(
                gp, tmp, f"learner model version {version}", spacing2=request.spacing2 or None,
                spacing3=request.spacing3 or None, spacing_jk=request.spacing_jk or None,
                samples=request.samples or None, body_order=request.body_order or None, log=_log)
            files = report.pop("files")
            reply = learner_pb2.MapResponse(
                model_version=version, mapped=Path(files["model"]).read_bytes(), uf3=Path(files["uf3"]).read_text(),
                snippet=Path(files["snippet"]).read_text(), report_json=json.dumps(report),
                table=Path(files["table"]).read_text() if "table" in files else "")
        return reply

    # -- acquisition support --------------------------------------------------------------

    def KernelDistances(self, request, context):
        """Kernel distances of the requested atoms' environments (see GaussianProcess.kernel_distances)."""
        self._ready()
        gp, version = self.store.snapshot()
        atoms = wire.structure_from_proto(request.structure)
        _check_positions(atoms, "structure")
        check_structure(atoms, self._limits(gp), "structure")
        idx = _indices(request.atom_indices, len(atoms), "atom_indices")
        if not idx.size:
            idx = np.arange(len(atoms))
        rows = None
        if request.HasField("within"):
            rows = _indices(request.within.atoms, len(atoms), "within.atoms")
            outside = np.setdiff1d(rows, idx)
            if outside.size:
                raise InvalidInput(f"KernelDistances: within.atoms {outside.tolist()} are not among the atoms "
                                   f"measured (atom_indices)")
        n_rows = idx.size if rows is None else rows.size
        if n_rows * idx.size > MAX_KERNEL_DISTANCE_ENTRIES:
            raise InvalidInput(f"KernelDistances: d_within would have {n_rows} x {idx.size} entries; at most "
                               f"{MAX_KERNEL_DISTANCE_ENTRIES} per request: ask for fewer atoms (atom_indices) or "
                               f"only the rows needed (within.atoms)")
        d_train, d_within = gp.kernel_distances(atoms, idx, rows=rows, train=not request.skip_train)
        reply = learner_pb2.KernelDistancesResponse(atom_indices=[int(i) for i in idx], model_version=version,
                                                    within_rows=[int(i) for i in (idx if rows is None else rows)])
        wire.encode_array(d_train, "<f8", reply.d_train)
        wire.encode_array(d_within, "<f8", reply.d_within)
        return reply
