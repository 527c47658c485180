"""gRPC adapter for the Learner service, and the versioned model store it serves.

:class:`ModelStore` holds the current Gaussian process and its version.
Writers (AddData, Optimize, LoadModel) are serialised and work on a *copy*;
the copy replaces the served model atomically when it is ready, and the
version goes up by one.  Readers (Predict, PredictStream) take a snapshot
reference, so a prediction always sees one consistent model — the old one
while an update is under way — and reports that model's version.
"""

from __future__ import annotations

import copy
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from ase import Atoms

from protos import wire
from protos.epicycle.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.errors import InvalidInput, ModelError

#: units of the hyperparameters, for ModelInfo
HYPERPARAMETER_UNITS = {"sig2": "eV", "ls2": "Å", "sig3": "eV", "ls3": "Å", "noise": "eV/Å",
                        "energy_noise": "eV", "stress_noise": "eV/Å³"}


class ModelStore:
    """The served model and its version; copy-on-write updates."""

    def __init__(self, gp, version: int = 1) -> None:
        self._gp = gp
        self._version = version
        self._swap = threading.Lock()
        self._writer = threading.Lock()
        self.last_update_seconds = 0.0
        self.last_optimize = None

    def snapshot(self):
        """``(gp, version)`` to read from; never mutated afterwards."""
        with self._swap:
            return self._gp, self._version

    @property
    def version(self) -> int:
        return self.snapshot()[1]

    def update(self, change: Callable[[object], object]):
        """Apply ``change(gp_copy)`` to a copy, refactorise it, then serve it.

        Returns ``(result_of_change, new_version)``.  If ``change`` raises, the
        served model is untouched.
        """
        with self._writer:
            started = time.perf_counter()
            current, _ = self.snapshot()
            work = copy.deepcopy(current)
            result = change(work)
            if work.n_labels:
                work.train()
            with self._swap:
                self._gp = work
                self._version += 1
                version = self._version
            self.last_update_seconds = time.perf_counter() - started
            return result, version

    def replace(self, gp) -> int:
        with self._writer:
            if gp.n_labels:
                gp.train()
            with self._swap:
                self._gp = gp
                self._version += 1
                return self._version


# --------------------------------------------------------------------------- conversions


def prediction_to_proto(pred, version: int, out: common_pb2.Prediction) -> common_pb2.Prediction:
    wire.encode_array(pred.forces, "<f8", out.forces)
    wire.encode_array(pred.force_std, "<f8", out.force_std)
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


def model_info(gp, version: int) -> learner_pb2.ModelInfo:
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


class LearnerServicer(learner_pb2_grpc.LearnerServicer):
    def __init__(self, store: ModelStore, default_max_iterations: int = 200,
                 observer: ServicerObserver | None = None) -> None:
        self.store = store
        self.default_max_iterations = default_max_iterations
        self.observer = observer or ServicerObserver()

    # -- prediction -----------------------------------------------------------------------

    def _predict(self, atoms: Atoms, request: learner_pb2.PredictRequest, rpc: str) -> learner_pb2.PredictResponse:
        started = time.perf_counter()
        _check_positions(atoms, "structure")
        _indices(request.atom_indices, len(atoms), "atom_indices")
        gp, version = self.store.snapshot()
        pred = gp.predict(atoms, stress=request.compute_stress)
        reply = learner_pb2.PredictResponse(sequence=request.sequence)
        prediction_to_proto(pred, version, reply.prediction)
        self.observer.prediction(rpc, len(atoms), time.perf_counter() - started)
        return reply

    def Predict(self, request, context):
        return self._predict(wire.structure_from_proto(request.structure), request, "Predict")

    def PredictStream(self, request_iterator, context) -> Iterator[learner_pb2.PredictResponse]:
        state = _StreamState()
        for request in request_iterator:
            atoms = _stream_structure(request.structure, state)
            yield self._predict(atoms, request, "PredictStream")

    # -- training -------------------------------------------------------------------------

    def AddData(self, request, context):
        atoms = wire.structure_from_proto(request.structure)
        _check_positions(atoms, "structure")
        n = len(atoms)
        energy, forces, stress = wire.labels_from_proto(request.labels, n)
        idx = _indices(request.atom_indices, n, "atom_indices")
        if idx.size and forces is None:
            raise InvalidInput("labels.forces is required when atom_indices are given")
        if not idx.size and not request.use_energy and not request.use_stress:
            raise InvalidInput("nothing to add: give atom_indices, or set use_energy/use_stress")
        if request.use_energy and energy is None:
            raise InvalidInput("use_energy is set but labels.energy is missing")
        if request.use_stress and stress is None:
            raise InvalidInput("use_stress is set but labels.stress is missing")
        if request.use_stress and not atoms.pbc.all():
            raise InvalidInput("use_stress needs a structure periodic in all three directions")
        wire.check_finite("labels.forces", forces)
        wire.check_finite("labels.energy", energy)
        wire.check_finite("labels.stress", stress)

        def change(gp):
            gp.add_structure(atoms, forces=forces, atom_indices=idx.tolist(),
                             energy=energy if request.use_energy else None,
                             stress=stress if request.use_stress else None)

        started = time.perf_counter()
        _, version = self.store.update(change)
        self.observer.data_added(time.perf_counter() - started)
        gp, _ = self.store.snapshot()
        return learner_pb2.AddDataResponse(model_version=version, n_environments=gp.n_environments,
                                           n_labels=gp.n_labels)

    def Optimize(self, request, context):
        if request.max_iterations < 0 or request.tolerance < 0:
            raise InvalidInput("max_iterations and tolerance must be >= 0")
        gp, _ = self.store.snapshot()
        if not gp.n_labels:
            raise ModelError("cannot optimise hyperparameters without training data; call AddData first")
        max_it = request.max_iterations or self.default_max_iterations
        started = time.perf_counter()
        kwargs = {"max_iterations": max_it, "bounds": bounds_from_proto(request.bounds, gp.hyperparameter_names),
                  "fix": tuple(request.fixed), "space": request.space or "log"}
        if request.tolerance:
            kwargs["ftol"] = request.tolerance
        result, version = self.store.update(lambda g: g.optimize(**kwargs))
        self.store.last_optimize = result
        seconds = time.perf_counter() - started
        self.observer.optimized(seconds, result)
        gp, _ = self.store.snapshot()
        return learner_pb2.OptimizeResponse(
            hyperparameters=hyperparameters_to_proto(dict(gp.hyperparameters)),
            log_likelihood=float(result.log_likelihood), iterations=int(result.iterations),
            converged=bool(result.converged), message=str(result.message),
            seconds=seconds, model_version=version, at_bounds=sorted(result.at_bounds))

    # -- model management -----------------------------------------------------------------

    def GetModelInfo(self, request, context):
        gp, version = self.store.snapshot()
        info = model_info(gp, version)
        if gp.n_labels:
            value = gp.log_likelihood(gradient=False)
            info.log_likelihood = float(value[0] if isinstance(value, tuple) else value)
        return info

    def ExportModel(self, request, context):
        from learner_service.gp import FORMAT_VERSION

        gp, version = self.store.snapshot()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            gp.save(path)
            data = path.read_bytes()
        return learner_pb2.ExportModelResponse(model=data, format="epicycle-gp", format_version=FORMAT_VERSION,
                                               model_version=version)

    def LoadModel(self, request, context):
        from learner_service.gp import GaussianProcess

        if not request.model:
            raise InvalidInput("model is empty")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            path.write_bytes(request.model)
            try:
                gp = GaussianProcess.load(path)
            except (InvalidInput, ModelError):
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt upload is the client's problem
                raise InvalidInput(f"cannot load the model: {type(exc).__name__}: {exc}") from None
        current, _ = self.store.snapshot()
        gp.predict_threads = getattr(current, "predict_threads", gp.predict_threads)  # a service setting, not the model's
        version = self.store.replace(gp)
        return model_info(gp, version)
