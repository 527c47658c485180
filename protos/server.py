"""Server plumbing shared by every Epicycle service.

``create_server(config, add_services)`` builds a ``grpc.Server`` with:

* the standard health service, NOT_SERVING until :meth:`RunningServer.mark_ready`
  (call it when the model is loaded / the JIT is warm), NOT_SERVING again on
  shutdown;
* server reflection;
* explicit maximum message sizes;
* optional TLS, and mutual TLS when a client CA is given;
* one interceptor that maps typed domain errors (:mod:`protos.errors`) to
  status codes through :mod:`protos.status` and counts and times every RPC by
  method and status code on a Prometheus registry; a request message that does
  not parse is ``INVALID_ARGUMENT`` with one log line (grpc's own deserialisation
  would answer ``INTERNAL`` and log a traceback per request);
* a ``/metrics`` HTTP endpoint (optional);
* port 0 binds an ephemeral port, returned in :attr:`RunningServer.port`.

:func:`serve_until_signalled` runs a server until SIGTERM/SIGINT and shuts it
down gracefully: health NOT_SERVING first, then ``stop(grace)``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from protos import errors
from protos.metrics import RpcMetrics, serve_metrics
from protos.status import details_for, status_for

log = logging.getLogger("epicycle.server")

MiB = 1024 * 1024
#: default max message size: a 100k-atom structure with velocities is ~6 MiB
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS.  With ``client_ca_file`` clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        for label, path in (("certificate", self.cert_file), ("key", self.key_file), ("client CA", self.client_ca_file)):
            if path is not None and not Path(path).is_file():
                raise errors.SetupError(f"TLS {label} file not found: {path}")
        key = Path(self.key_file).read_bytes()
        cert = Path(self.cert_file).read_bytes()
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ServerConfig:
    """How a service listens.  Built once (from flags/config) and never read from the environment."""

    host: str = "127.0.0.1"
    port: int = 0                      # 0: ephemeral (tests)
    max_workers: int = 16              # threads handling RPCs (queued requests hold one too)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None    # None: no /metrics endpoint; 0: ephemeral
    metrics_host: str | None = None    # default: same as host
    tls: TLSConfig | None = None
    grace_seconds: float = 30.0        # in-flight RPCs get this long on shutdown

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise errors.InvalidInput(f"port must be in 0..65535, got {self.port}")
        if self.max_workers < 1:
            raise errors.InvalidInput(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_message_bytes < 1024:
            raise errors.InvalidInput(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")


class _Unparseable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("size", "reason")

    def __init__(self, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason


def _message_name(deserializer) -> str:
    cls = getattr(deserializer, "__self__", None)  # RequestType.FromString
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "request"


def _tolerant(deserializer):
    """``deserializer`` that returns :class:`_Unparseable` instead of raising (grpc would
    answer INTERNAL and log the traceback)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises on garbage
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return _Unparseable(len(data), reason)

    return deserialize


def _unparseable_error(where: str, request: _Unparseable, message: str, which: str = "the request") -> errors.InvalidInput:
    """One log line (no traceback: the client sent garbage, the server is fine) and the error."""
    text = f"{which} ({request.size} bytes) does not parse as {message}: {request.reason}"
    log.warning("%s: %s", where, text)
    return errors.InvalidInput(text)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes, answers unparseable requests with
    INVALID_ARGUMENT and records per-RPC metrics."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method or "/unknown/unknown"
        parts = full.split("/")
        service, method = (parts[1], parts[2]) if len(parts) == 3 else ("unknown", full)
        message = _message_name(handler.request_deserializer)
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, message, streaming=False),
                deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, service, method, message, streaming=True),
                deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, message, streaming=False),
                deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, service, method, message, streaming=True),
            deserializer, handler.response_serializer)

    # -- helpers ---------------------------------------------------------------------------

    def _abort_for(self, exc: BaseException, context: grpc.ServicerContext, where: str) -> None:
        if context.code() is not None and context.code() != grpc.StatusCode.OK:
            raise exc  # the servicer already aborted with a code of its own
        if not context.is_active():
            # the client cancelled or its deadline passed: the error is a consequence, not a bug
            log.debug("%s ended after the client went away: %s", where, exc)
            return
        code = status_for(exc)
        if code is None:
            log.exception("unexpected error in %s", where)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error in {where}: {type(exc).__name__}: {details_for(exc)}")
        context.abort(code, details_for(exc))

    def _record(self, service: str, method: str, context, started: float) -> None:
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            name = code.name
        else:
            name = "OK" if context.is_active() else "CANCELLED"
        self._metrics.handled.labels(service, method, name).inc()
        self._metrics.seconds.labels(service, method).observe(time.perf_counter() - started)
        self._metrics.in_progress.labels(service, method).dec()

    @staticmethod
    def _checked(request, where: str, message: str, streaming: bool):
        """The request, or for a client stream an iterator over it, with unparseable
        messages turned into :class:`errors.InvalidInput` (raised where they are read)."""
        if not streaming:
            if isinstance(request, _Unparseable):
                raise _unparseable_error(where, request, message)
            return request

        def messages():
            for k, item in enumerate(request):
                if isinstance(item, _Unparseable):
                    raise _unparseable_error(where, item, message, f"request message #{k} of the stream")
                yield item

        return messages()

    def _wrap_unary(self, behavior, service: str, method: str, message: str, streaming: bool):
        where = f"{service}/{method}"

        def wrapped(request, context):
            started = time.perf_counter()
            self._metrics.in_progress.labels(service, method).inc()
            try:
                return behavior(self._checked(request, where, message, streaming), context)
            except Exception as exc:  # noqa: BLE001 - mapped, never leaked as a traceback
                self._abort_for(exc, context, where)
            finally:
                self._record(service, method, context, started)

        return wrapped

    def _wrap_stream(self, behavior, service: str, method: str, message: str, streaming: bool):
        where = f"{service}/{method}"

        def wrapped(request, context):
            started = time.perf_counter()
            self._metrics.in_progress.labels(service, method).inc()
            try:
                yield from behavior(self._checked(request, where, message, streaming), context)
            except Exception as exc:  # noqa: BLE001
                self._abort_for(exc, context, where)
            finally:
                self._record(service, method, context, started)

        return wrapped


@dataclass
class RunningServer:
    """A started server: its bound ports, health servicer and metrics registry."""

    server: grpc.Server
    port: int
    config: ServerConfig
    health: health.HealthServicer
    registry: CollectorRegistry
    service_names: tuple[str, ...]
    metrics_port: int | None = None
    _metrics_http: object | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def mark_ready(self) -> None:
        """Report SERVING for every service (and the server as a whole)."""
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def mark_not_ready(self) -> None:
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace``."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def create_server(
    config: ServerConfig,
    add_services: Callable[[grpc.Server], Iterable[str]],
    registry: CollectorRegistry | None = None,
    ready: bool = False,
) -> RunningServer:
    """Build and start a server.

    ``add_services(server)`` registers the servicers and returns their full
    service names (e.g. ``"epicycle.v1.Oracle"``), used for health and
    reflection.  With ``ready=False`` health reports NOT_SERVING until
    :meth:`RunningServer.mark_ready`.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = RpcMetrics.create(registry)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=[ServiceInterceptor(metrics)],
        options=server_options(config.max_message_bytes),
    )
    names = tuple(add_services(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    target = f"{config.host}:{config.port}"
    try:
        if config.tls is not None:
            port = server.add_secure_port(target, config.tls.server_credentials())
        else:
            port = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise errors.SetupError(f"cannot bind {target}: {exc}") from None
    if port == 0:
        raise errors.SetupError(f"cannot bind {target} (address in use or not available)")
    running = RunningServer(server=server, port=port, config=config, health=health_servicer,
                            registry=registry, service_names=names)
    running.mark_not_ready()
    if config.metrics_port is not None:
        http, mport = serve_metrics(registry, config.metrics_port, config.metrics_host or config.host)
        running._metrics_http, running.metrics_port = http, mport
    server.start()
    if ready:
        running.mark_ready()
    log.info("serving %s on %s (metrics: %s)", ", ".join(names), running.address,
             running.metrics_port if running.metrics_port is not None else "off")
    return running


def serve_until_signalled(running: RunningServer, on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully (health first, then drain)."""
    stop_requested = threading.Event()

    def handler(signum, _frame):
        log.info("received %s: draining for up to %.0f s", signal.Signals(signum).name, running.config.grace_seconds)
        stop_requested.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop_requested.wait(0.5):
            if running._stopped.is_set():
                return
        running.stop()
        if on_stop is not None:
            on_stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
