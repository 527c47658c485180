"""gRPC adapter for the Oracle service: proto <-> numpy, then delegate to the core.

No domain logic here: validation, caching and concurrency live in
:mod:`oracle_service.core`; errors are mapped to status codes by the shared
interceptor (:mod:`protos.server`).
"""

from __future__ import annotations

import json
import socket

from protos import wire
from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc
from protos.errors import EpicycleError


class OracleServicer(oracle_pb2_grpc.OracleServicer):
    def __init__(self, service, worker_name: str | None = None) -> None:
        self._service = service
        self.worker = worker_name or socket.gethostname()

    def Label(self, request: oracle_pb2.LabelRequest, context) -> oracle_pb2.LabelResponse:
        atoms = wire.structure_from_proto(request.structure)
        try:
            outcome = self._service.label(
                atoms, tuple(request.properties),
                # never wait past the caller's deadline; the core cancels a calculation nobody waits for
                timeout=context.time_remaining(),
                cancelled=lambda: not context.is_active(),
            )
        except EpicycleError:
            if not context.is_active():
                # the caller is gone (deadline passed, RPC cancelled): nobody reads an answer, and an
                # error here would make grpc log a serialisation traceback for the empty reply
                return oracle_pb2.LabelResponse()
            raise
        reply = oracle_pb2.LabelResponse(
            backend=self._service.oracle.name,
            structure_hash=outcome.structure_hash,
            cached=outcome.cached,
            compute_seconds=0.0 if outcome.cached else outcome.seconds,
            request_id=request.request_id,
            worker=self.worker,
        )
        labels = outcome.labels
        wire.labels_to_proto(labels.energy, labels.forces, labels.stress, out=reply.labels)
        return reply

    def Describe(self, request: oracle_pb2.DescribeRequest, context) -> oracle_pb2.DescribeResponse:
        d = self._service.describe()
        return oracle_pb2.DescribeResponse(
            backend=d["backend"],
            implemented_properties=list(d["implemented_properties"]),
            supported_numbers=sorted(d.get("supported_numbers") or []),
            settings={k: json.dumps(v, sort_keys=True, default=str) for k, v in d.get("settings", {}).items()},
            version=d.get("version", ""),
            min_distance=float(d["limits"]["min_distance"]),
            max_atoms=int(d["limits"]["max_atoms"]),
            workers=int(d["workers"]),
            queue_limit=int(d["queue_limit"]),
        )
