"""Client of the Learner service, including the MD stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np
from ase import Atoms

from protos import wire
from protos.client import ClientTLS, make_channel, wait_until_serving
from protos.epicycle.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.errors import CalculationFailed, InvalidInput
from protos.status import error_from_rpc


@dataclass(frozen=True)
class RemotePrediction:
    """A prediction received from the learner (units as in the proto)."""

    forces: np.ndarray          # (n, 3) eV/Å
    force_std: np.ndarray       # (n, 3) eV/Å
    energy: float | None        # eV
    stress: np.ndarray | None   # (6,) eV/Å³
    local_energies: np.ndarray | None
    noise: float                # σn, eV/Å
    model_version: int
    atom_std: np.ndarray | None = None  # (n,) eV/Å, rotation-invariant per-atom σ (None: not sent)


def prediction_from_proto(msg: common_pb2.Prediction, n_atoms: int) -> RemotePrediction:
    return RemotePrediction(
        forces=wire.decode_array(msg.forces, "prediction.forces", (n_atoms, 3), "<f8"),
        force_std=wire.decode_array(msg.force_std, "prediction.force_std", (n_atoms, 3), "<f8"),
        energy=msg.energy if msg.HasField("energy") else None,
        stress=wire.decode_array(msg.stress, "prediction.stress", (6,), "<f8") if wire.has_array(msg, "stress") else None,
        local_energies=(wire.decode_array(msg.local_energies, "prediction.local_energies", (n_atoms,), "<f8")
                        if wire.has_array(msg, "local_energies") else None),
        noise=msg.noise_std,
        model_version=msg.model_version,
        atom_std=wire.decode_atom_std(msg, n_atoms),
    )


class LearnerClient:
    """Deadlines on every call (``timeout`` for quick RPCs, ``train_timeout`` for updates)."""

    def __init__(self, address: str, tls: ClientTLS | None = None, timeout: float = 60.0,
                 train_timeout: float = 3600.0) -> None:
        self.address = address
        self.timeout = timeout
        self.train_timeout = train_timeout
        self._channel = make_channel(address, tls=tls)
        self._stub = learner_pb2_grpc.LearnerStub(self._channel)

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"learner {self.address}") from None

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_until_serving(self._channel, "epicycle.v1.Learner", timeout)

    def predict(self, atoms: Atoms, stress: bool = False,
                condition_on: Iterable[tuple[Atoms, Iterable[int]]] = (), model_version: int = 0) -> RemotePrediction:
        """Forces, σ (energy, stress) of ``atoms``.  ``condition_on``: ``[(atoms, atom_indices),
        ...]`` environments whose labels are queued or in flight; σ is reported as if they were
        already in the training set (the mean stays the current model's).  ``model_version``: a
        held older version (:meth:`hold_versions`), 0 = the newest."""
        req = learner_pb2.PredictRequest(compute_stress=stress, model_version=int(model_version))
        wire.structure_to_proto(atoms, out=req.structure, velocities=False)
        for c_atoms, c_idx in condition_on:
            c = req.condition_on.add(atom_indices=[int(i) for i in c_idx])
            wire.structure_to_proto(c_atoms, out=c.structure, velocities=False)
        reply = self._call(self._stub.Predict, req, self.timeout)
        return prediction_from_proto(reply.prediction, len(atoms))

    @staticmethod
    def add_data_request(atoms: Atoms, forces=None, atom_indices=(), energy=None, stress=None,
                         use_energy: bool = False, use_stress: bool = False) -> learner_pb2.AddDataRequest:
        """The AddDataRequest of :meth:`add_data`'s arguments."""
        req = learner_pb2.AddDataRequest(atom_indices=[int(i) for i in atom_indices], use_energy=use_energy,
                                         use_stress=use_stress)
        wire.structure_to_proto(atoms, out=req.structure, velocities=False)
        wire.labels_to_proto(energy, forces, stress, out=req.labels)
        return req

    def add_data(self, atoms: Atoms, forces=None, atom_indices=(), energy=None, stress=None,
                 use_energy: bool = False, use_stress: bool = False) -> learner_pb2.AddDataResponse:
        req = self.add_data_request(atoms, forces, atom_indices, energy, stress, use_energy, use_stress)
        return self._call(self._stub.AddData, req, self.train_timeout)

    def add_data_batch(self, items: Iterable[Mapping]) -> learner_pb2.AddDataResponse:
        """Several labelled structures in one update (all or nothing; one version bump).  Each
        item is a dict with :meth:`add_data`'s arguments: ``atoms``, ``forces``,
        ``atom_indices``, ``energy``, ``stress``, ``use_energy``, ``use_stress`` (all but
        ``atoms`` optional)."""
        req = learner_pb2.AddDataBatchRequest()
        for k, item in enumerate(items):
            unknown = set(item) - {"atoms", "forces", "atom_indices", "energy", "stress", "use_energy", "use_stress"}
            if unknown or "atoms" not in item:
                raise InvalidInput(f"add_data_batch item {k}: needs 'atoms'; unknown keys {sorted(unknown)}")
            req.items.append(self.add_data_request(**item))
        return self._call(self._stub.AddDataBatch, req, self.train_timeout)

    def checkpoint(self) -> learner_pb2.CheckpointResponse:
        """Have the learner write a durable checkpoint into its model directory; its id is
        ``.checkpoint_id`` (SetupError without a model directory)."""
        return self._call(self._stub.Checkpoint, learner_pb2.CheckpointRequest(), self.train_timeout)

    def restore_checkpoint(self, checkpoint_id: str) -> learner_pb2.ModelInfo:
        """Serve checkpoint ``checkpoint_id`` (or ``"initial"``) again (NotFound if unknown)."""
        return self._call(self._stub.RestoreCheckpoint,
                          learner_pb2.RestoreCheckpointRequest(checkpoint_id=checkpoint_id), self.train_timeout)

    def optimize(self, max_iterations: int = 0, tolerance: float = 0.0,
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 fixed: Iterable[str] = (), space: str = "", method: str = "", restarts: int | None = None,
                 seed: int = 0, holdout: float | None = None) -> learner_pb2.OptimizeResponse:
        """Fit the hyperparameters; ``bounds`` {name: (lower, upper)} replace the learner's default boxes.
        ``method`` "ml" ("": ML-II; ``space`` "log" or "linear", "": log) or "map" (prior, ``restarts``
        prior draws, a held-out check on a ``holdout`` share of the model's frames, ``seed``; None: the
        learner's defaults 3 and 0.2) -- see OptimizeRequest in protos/epicycle/v1/learner.proto."""
        req = optimize_request(max_iterations, tolerance, bounds, fixed, space, method, restarts, seed, holdout)
        return self._call(self._stub.Optimize, req, self.train_timeout)

    def hold_versions(self, versions: Iterable[int]) -> learner_pb2.HoldVersionsResponse:
        """Keep exactly these model versions in memory besides the newest (see the RPC)."""
        req = learner_pb2.HoldVersionsRequest(model_versions=sorted({int(v) for v in versions if int(v) > 0}))
        return self._call(self._stub.HoldVersions, req, self.timeout)

    def kernel_distances(self, atoms: Atoms, atom_indices: Iterable[int] | None = None,
                         rows: Iterable[int] | None = None, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(d_train (m,), d_within (r, m))`` in eV: distances of the environments of the atoms
        ``atom_indices`` of ``atoms`` (None: all) in the model's local-energy kernel, to the
        nearest training environment (inf: no training data; empty with ``train=False``) and from
        the atoms ``rows`` (None: all m) to the m (the learner's ``GaussianProcess.kernel_distances``)."""
        req = kernel_distances_request(atoms, atom_indices, rows, train)
        return kernel_distances_from_proto(self._call(self._stub.KernelDistances, req, self.timeout), train)

    def info(self) -> learner_pb2.ModelInfo:
        return self._call(self._stub.GetModelInfo, learner_pb2.GetModelInfoRequest(), self.timeout)

    def export_model(self) -> learner_pb2.ExportModelResponse:
        return self._call(self._stub.ExportModel, learner_pb2.ExportModelRequest(), self.timeout)

    def map(self, spacing2: float | None = None, spacing3: float | None = None, spacing_jk: float | None = None,
            samples: int | None = None, body_order: int | None = None) -> learner_pb2.MapResponse:
        """The learner's ``Map`` RPC: its model mapped to splines (knot spacings in Å; None: defaults)."""
        req = learner_pb2.MapRequest(spacing2=spacing2 or 0.0, spacing3=spacing3 or 0.0, spacing_jk=spacing_jk or 0.0,
                                     samples=samples or 0, body_order=body_order or 0)
        return self._call(self._stub.Map, req, self.train_timeout)

    def load_model(self, data: bytes) -> learner_pb2.ModelInfo:
        return self._call(self._stub.LoadModel, learner_pb2.LoadModelRequest(model=data), self.train_timeout)

    def stream(self, timeout: float | None = None) -> "PredictionStream":
        return PredictionStream(self._stub, self.address, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "LearnerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_END = object()


class PredictionStream:
    """One long-lived PredictStream call: send a structure, receive its prediction, in order.

    After the first request only positions (and the cell, if it changes) are
    sent; numbers and pbc are reused by the server.  ``timeout`` is the deadline
    of the whole stream (None: no limit — the MD run decides when to stop).
    """

    def __init__(self, stub, address: str, timeout: float | None = None) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._address = address
        self._sequence = 0
        self._sent_static = False
        self._cell: np.ndarray | None = None
        self._lock = threading.Lock()
        self._responses = stub.PredictStream(iter(self._requests.get, _END), timeout=timeout)

    def predict(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc,
                stress: bool = False, model_version: int = 0) -> RemotePrediction:
        with self._lock:
            self._sequence += 1
            req = learner_pb2.PredictRequest(compute_stress=stress, sequence=self._sequence,
                                             model_version=int(model_version))
            s = req.structure
            wire.encode_array(positions, "<f8", s.positions)
            if not self._sent_static:
                wire.encode_array(numbers, "<i4", s.numbers)
                s.pbc[:] = [bool(p) for p in pbc]
                self._sent_static = True
            if self._cell is None or not np.array_equal(self._cell, cell):
                wire.encode_array(cell, "<f8", s.cell)
                self._cell = np.array(cell, copy=True)
            self._requests.put(req)
            try:
                reply = next(self._responses)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, f"learner {self._address} (stream)") from None
            except StopIteration:
                raise CalculationFailed(f"learner {self._address} closed the prediction stream") from None
            if reply.sequence != self._sequence:
                raise CalculationFailed(f"learner stream out of order: sent {self._sequence}, got {reply.sequence}")
            return prediction_from_proto(reply.prediction, len(positions))

    def close(self) -> None:
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass


def kernel_distances_request(atoms: Atoms, atom_indices: Iterable[int] | None = None,
                             rows: Iterable[int] | None = None, train: bool = True
                             ) -> learner_pb2.KernelDistancesRequest:
    """The KernelDistancesRequest of :meth:`LearnerClient.kernel_distances` (also the in-process learner's)."""
    req = learner_pb2.KernelDistancesRequest(
        atom_indices=[] if atom_indices is None else [int(i) for i in atom_indices], skip_train=not train)
    if rows is not None:
        req.within.atoms.extend(int(i) for i in rows)
    wire.structure_to_proto(atoms, out=req.structure, velocities=False)
    return req


def kernel_distances_from_proto(reply: learner_pb2.KernelDistancesResponse,
                                train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(d_train, d_within)`` of a KernelDistancesResponse, shapes checked."""
    m, r = len(reply.atom_indices), len(reply.within_rows)
    return (wire.decode_array(reply.d_train, "d_train", (m if train else 0,), "<f8"),
            wire.decode_array(reply.d_within, "d_within", (r, m), "<f8"))


def optimize_request(max_iterations: int = 0, tolerance: float = 0.0,
                     bounds: Mapping[str, tuple[float, float]] | None = None, fixed: Iterable[str] = (),
                     space: str = "", method: str = "", restarts: int | None = None, seed: int = 0,
                     holdout: float | None = None) -> learner_pb2.OptimizeRequest:
    """The OptimizeRequest of :meth:`LearnerClient.optimize` (also the in-process learner's)."""
    req = learner_pb2.OptimizeRequest(max_iterations=max_iterations, tolerance=tolerance, fixed=list(fixed),
                                      space=space, method=method, seed=int(seed))
    if restarts is not None:
        req.restarts = int(restarts)
    if holdout is not None:
        req.holdout = float(holdout)
    for name, (lo, hi) in (bounds or {}).items():
        req.bounds.add(name=name, lower=lo, upper=hi)
    return req
