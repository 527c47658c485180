"""Build and run an Oracle service: backend + core + gRPC plumbing."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Mapping

from prometheus_client import CollectorRegistry

from oracle_service.base import create_oracle
from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc
from protos.errors import InvalidInput
from protos.server import RunningServer, ServerConfig, create_server

SERVICE_NAME = oracle_pb2.DESCRIPTOR.services_by_name["Oracle"].full_name


@dataclass(frozen=True)
class OracleServiceConfig:
    """Everything an oracle worker needs; built once from flags or a config file."""

    backend: str = "emt"
    settings: Mapping[str, Any] = field(default_factory=dict)  # backend settings
    workers: int = 1             # concurrent calculations
    queue_limit: int = 16        # requests waiting for a worker before RESOURCE_EXHAUSTED
    min_distance: float = 0.5    # Å: closer atom pairs are rejected
    max_atoms: int = 100_000
    cache_size: int = 4096       # labelled structures remembered by content hash
    server: ServerConfig = ServerConfig()

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInput(f"oracle workers must be >= 1, got {self.workers}")
        if self.queue_limit < 0:
            raise InvalidInput(f"oracle queue_limit must be >= 0, got {self.queue_limit}")
        if not self.min_distance >= 0:
            raise InvalidInput(f"oracle min_distance must be >= 0 Å, got {self.min_distance}")
        if self.max_atoms < 1:
            raise InvalidInput(f"oracle max_atoms must be >= 1, got {self.max_atoms}")


def build_label_service(config: OracleServiceConfig, registry: CollectorRegistry | None = None):
    from oracle_service.core import LabelService, ServiceConfig
    from oracle_service.validation import Limits

    oracle = create_oracle(config.backend, **dict(config.settings))
    return LabelService(oracle, ServiceConfig(
        workers=config.workers,
        queue_limit=config.queue_limit,
        cache_size=config.cache_size,
        limits=Limits(min_distance=config.min_distance, max_atoms=config.max_atoms),
    ))


def start_oracle_server(config: OracleServiceConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Start an Oracle server; health is SERVING once the backend is built."""
    from oracle_service.metrics import OracleMetrics
    from oracle_service.servicer import OracleServicer

    registry = registry if registry is not None else CollectorRegistry()
    service = build_label_service(config)
    # a server needs one thread per queued request plus a few for health/describe
    server_cfg = config.server
    needed = config.workers + config.queue_limit + 4
    if server_cfg.max_workers < needed:
        from dataclasses import replace

        server_cfg = replace(server_cfg, max_workers=needed)

    servicer = OracleServicer(service)

    def add(server):
        oracle_pb2_grpc.add_OracleServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    running = create_server(server_cfg, add, registry=registry)
    servicer.worker = f"{socket.gethostname()}:{running.port}"
    OracleMetrics(registry, service)
    running.label_service = service  # type: ignore[attr-defined]
    running.mark_ready()
    return running
