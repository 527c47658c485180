"""Prometheus metrics shared by every service: RPC counts and latencies.

Metrics live on an injected :class:`prometheus_client.CollectorRegistry`
(one per server, so tests can run many servers in one process), exposed on
an HTTP ``/metrics`` endpoint.  Label cardinality is bounded: ``service`` and
``method`` come from the protos, ``code`` from the fixed set of status codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: RPC latency buckets, seconds: from a cached oracle hit to a long DFT call
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass
class RpcMetrics:
    handled: Counter
    seconds: Histogram
    in_progress: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "RpcMetrics":
        return cls(
            handled=Counter(
                "epicycle_grpc_server_handled",
                "RPCs completed on the server, by service, method and gRPC status code.",
                ["grpc_service", "grpc_method", "grpc_code"],
                registry=registry,
            ),
            seconds=Histogram(
                "epicycle_grpc_server_handling_seconds",
                "Time from receiving an RPC to finishing its response, seconds.",
                ["grpc_service", "grpc_method"],
                buckets=RPC_BUCKETS,
                registry=registry,
            ),
            in_progress=Gauge(
                "epicycle_grpc_server_in_progress",
                "RPCs currently being handled.",
                ["grpc_service", "grpc_method"],
                registry=registry,
            ),
        )


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Start the ``/metrics`` HTTP endpoint; returns ``(http_server, bound_port)``.

    ``port=0`` binds an ephemeral port (tests).
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
