"""Client of the Oracle service: deadlines on every call, domain errors on failure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from ase import Atoms

from oracle_service.base import Labels
from protos import wire
from protos.client import ClientTLS, make_channel, wait_until_serving
from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc
from protos.status import error_from_rpc


@dataclass(frozen=True)
class LabelResult:
    labels: Labels
    backend: str
    structure_hash: str
    cached: bool
    compute_seconds: float
    worker: str
    request_id: str


class OracleClient:
    """Label structures through a remote Oracle service.

    ``timeout`` (seconds) is the deadline of each Label call: it must cover
    queueing plus one calculation (DFT can take minutes).
    """

    def __init__(self, address: str, tls: ClientTLS | None = None, timeout: float = 600.0,
                 describe_timeout: float = 10.0, round_robin: bool = False) -> None:
        self.address = address
        self.timeout = timeout
        self.describe_timeout = describe_timeout
        self._channel = make_channel(address, tls=tls, round_robin=round_robin)
        self._stub = oracle_pb2_grpc.OracleStub(self._channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until_serving(self._channel, "epicycle.v1.Oracle", timeout)

    def label(self, atoms: Atoms, properties: tuple[str, ...] = (), request_id: str | None = None,
              timeout: float | None = None) -> LabelResult:
        request = oracle_pb2.LabelRequest(properties=list(properties), request_id=request_id or uuid.uuid4().hex)
        wire.structure_to_proto(atoms, out=request.structure, velocities=False)
        try:
            reply = self._stub.Label(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"oracle {self.address}") from None
        energy, forces, stress = wire.labels_from_proto(reply.labels, len(atoms))
        return LabelResult(
            labels=Labels(energy=energy, forces=forces, stress=stress,
                          info={"backend": reply.backend, "worker": reply.worker}),
            backend=reply.backend, structure_hash=reply.structure_hash, cached=reply.cached,
            compute_seconds=reply.compute_seconds, worker=reply.worker, request_id=reply.request_id,
        )

    def describe(self) -> oracle_pb2.DescribeResponse:
        try:
            return self._stub.Describe(oracle_pb2.DescribeRequest(), timeout=self.describe_timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"oracle {self.address}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "OracleClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
