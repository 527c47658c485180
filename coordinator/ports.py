"""What the on-the-fly cycle uses of each role: the ports its policies are tested through.

:class:`coordinator.cycle.OnTheFlyRun` talks to three domain-level objects, never to gRPC
stubs.  The gRPC clients satisfy these protocols unchanged (``LearnerClient``,
``SamplerClient``, ``OraclePool``); :mod:`coordinator.inprocess` has in-process
implementations (the learner's own model store, an ASE calculator as oracle, a replayed
trajectory as sampler) so that acquisition, calibration and update policies can be tested by
replaying recorded frames in milliseconds, without servers.

Units as on the wire: Å, eV, eV/Å (forces and σ), eV/Å³ (stress), fs, K.  Replies keep the
proto message types the cycle reads (``learner_pb2.ModelInfo`` and friends,
``sampler_pb2.RunResponse``) so that both paths give the cycle the same fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from ase import Atoms

from protos.epicycle.v1 import learner_pb2, sampler_pb2


class Prediction(Protocol):
    """A learner prediction (``learner_service.client.RemotePrediction``)."""

    forces: np.ndarray          # (n, 3) eV/Å
    force_std: np.ndarray       # (n, 3) eV/Å, epistemic σ per force component
    energy: float | None        # eV
    stress: np.ndarray | None   # (6,) eV/Å³
    noise: float                # σn, eV/Å
    model_version: int


@runtime_checkable
class LearnerPort(Protocol):
    """The learner as the cycle uses it (``learner_service.client.LearnerClient``)."""

    def wait_ready(self, timeout: float = ...) -> None: ...

    def info(self) -> learner_pb2.ModelInfo: ...

    def predict(self, atoms: Atoms, stress: bool = False,
                condition_on: Iterable[tuple[Atoms, Iterable[int]]] = ()) -> Prediction:
        """σ conditioned on ``condition_on`` environments (labels queued or in flight)."""

    def add_data_batch(self, items: Iterable[Mapping]) -> learner_pb2.AddDataResponse:
        """One model update from items with ``atoms``, ``forces``, ``atom_indices``, ``energy``,
        ``stress``, ``use_energy``, ``use_stress``."""

    def optimize(self, max_iterations: int = 0, tolerance: float = 0.0,
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 fixed: Iterable[str] = (), space: str = "", method: str = "", restarts: int | None = None,
                 seed: int = 0, holdout: float | None = None) -> learner_pb2.OptimizeResponse:
        """``method`` "ml" (or "") or "map" (``restarts``, ``seed``, ``holdout``: OptimizeRequest)."""

    def checkpoint(self) -> learner_pb2.CheckpointResponse: ...

    def restore_checkpoint(self, checkpoint_id: str) -> learner_pb2.ModelInfo: ...

    def hold_versions(self, versions: Iterable[int]) -> learner_pb2.HoldVersionsResponse: ...

    def kernel_distances(self, atoms: Atoms, atom_indices: Iterable[int] | None = None,
                         rows: Iterable[int] | None = None, train: bool = True) -> tuple:
        """``(d_train (m,), d_within (r, m))`` eV in the model's local-energy kernel (acquisition):
        ``rows`` the atoms whose distances to all m are wanted (None: all); ``train=False``: no d_train."""

    def close(self) -> None: ...


@runtime_checkable
class RunCallPort(Protocol):
    """An open Run call: iterate for ``sampler_pb2.RunResponse`` (frames, then one stop report);
    :meth:`cancel` from any thread ends it with :attr:`cancelled` set."""

    cancelled: bool

    def __iter__(self) -> Iterator[sampler_pb2.RunResponse]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class SamplerPort(Protocol):
    """An MD sampler as the cycle uses it (``sampler_service.client.SamplerClient``)."""

    def wait_ready(self, timeout: float = ...) -> None: ...

    def open_run(self, request: sampler_pb2.RunRequest, timeout: float | None = None) -> RunCallPort: ...

    def close(self) -> None: ...


class Labels(Protocol):
    energy: float | None        # eV
    forces: np.ndarray          # (n, 3) eV/Å
    stress: np.ndarray | None   # (6,) eV/Å³


class LabelResultLike(Protocol):
    """What ``OraclePool.label`` returns (``oracle_service.client.LabelResult``)."""

    labels: Labels
    structure_hash: str
    worker: str


@runtime_checkable
class OraclePort(Protocol):
    """The oracle (pool) as the cycle uses it (``coordinator.services.OraclePool``).

    ``label`` raises ``coordinator.services.OracleUnavailable`` for an outage of the pool
    (retried by the cycle) and ``protos.errors.CalculationFailed`` for a structure that
    cannot be labelled."""

    def wait_ready(self, timeout: float = ...) -> None: ...

    def label(self, atoms: Atoms, properties: tuple[str, ...] = ()) -> LabelResultLike: ...


@dataclass
class Ports:
    """The three roles of one run.  ``samplers`` are used round robin by the walkers (walker
    ``i`` runs on ``samplers[i % len(samplers)]``).  ``learner_address``: what a Run request
    names as its learner ("" for in-process samplers, which hold their learner themselves);
    ``oracle_workers``: labels the oracle can compute at once (the default of
    ``oracle.max_in_flight``); ``describe``: names of the parts, for the ``run_started`` event."""

    learner: LearnerPort
    samplers: list[SamplerPort]
    oracle: OraclePort
    learner_address: str = ""
    oracle_workers: int = 1
    describe: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.samplers:
            raise ValueError("Ports needs at least one sampler")


def grpc_ports(services) -> Ports:
    """The gRPC clients of ``services`` (:class:`coordinator.services.Services`) as ports."""
    from learner_service.client import LearnerClient
    from sampler_service.client import SamplerClient

    return Ports(learner=LearnerClient(services.learner_address, tls=services.tls),
                 samplers=[SamplerClient(a, tls=services.tls) for a in services.sampler_addresses],
                 oracle=services.oracle, learner_address=services.learner_address,
                 oracle_workers=services.oracle_workers,
                 describe={"learner": services.learner_address, "samplers": list(services.sampler_addresses)})
