"""Client-side channel helpers: TLS, message sizes, retries only on UNAVAILABLE.

Every Epicycle client passes a deadline (``timeout=``) on every call; the
retry policy below is applied by gRPC itself and only for UNAVAILABLE (the
server was not reachable), so a request that reached a backend is never
silently recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.errors import NotReady, SetupError
from protos.server import DEFAULT_MAX_MESSAGE_BYTES

EPICYCLE_SERVICES = ("epicycle.v1.Oracle", "epicycle.v1.Learner", "epicycle.v1.Sampler")


@dataclass(frozen=True)
class ClientTLS:
    """Trust ``ca_file``; present ``cert_file``/``key_file`` for mutual TLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # override the name checked in the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p):
            if p is None:
                return None
            if not Path(p).is_file():
                raise SetupError(f"TLS file not found: {p}")
            return Path(p).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


def retry_service_config(services: Iterable[str] = EPICYCLE_SERVICES, max_attempts: int = 5,
                         load_balancing: str | None = None) -> str:
    config: dict = {
        "methodConfig": [{
            "name": [{"service": s} for s in services],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    }
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return json.dumps(config)


def make_channel(
    address: str,
    tls: ClientTLS | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    round_robin: bool = False,
) -> grpc.Channel:
    """A channel to ``address`` ("host:port" or "dns:///name:port" for client-side balancing)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(load_balancing="round_robin" if round_robin else None)),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if tls is not None:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


def wait_until_serving(channel: grpc.Channel, service: str = "", timeout: float = 30.0) -> None:
    """Poll the health service until ``service`` reports SERVING, or raise NotReady."""
    import time

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.05)
    raise NotReady(f"service {service or '(server)'} not SERVING after {timeout:.0f} s (last: {last})")
