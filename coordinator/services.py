"""Connect the coordinator to its services: embedded on loopback, or remote by address.

Embedded mode starts real gRPC servers (oracle, learner, sampler) on
127.0.0.1 ephemeral ports in this process and talks to them through the same
clients as a deployment — nothing is bypassed.

:class:`OraclePool` spreads label requests over several oracle workers (or
one ``dns:///`` name with client-side round-robin) and sends a request that
failed for reasons of the *worker* (unreachable, overloaded, deadline) to
another one.  A calculation failure (the structure itself) is not retried
here: the oracle's own retry/quarantine policy owns that.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from pathlib import Path
from dataclasses import dataclass, field

from ase import Atoms

from coordinator.config import RunConfig
from oracle_service.client import LabelResult, OracleClient
from protos.errors import CalculationFailed, CalculationTimeout, EpicycleError, NotReady, Overloaded

log = logging.getLogger("epicycle.coordinator")

#: gRPC target schemes that may resolve to several workers: balanced per request on the client
BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")

#: worker problems: the same request may succeed on another worker
RETRY_ELSEWHERE = (NotReady, Overloaded, CalculationTimeout)


class OracleUnavailable(CalculationFailed):
    """No oracle worker could take the request (all unreachable, overloaded or too slow): an
    outage of the pool, not a problem of the structure — the same request may succeed later."""


class OraclePool:
    """Round-robin over oracle workers; a worker that was unreachable is skipped for ``cooldown`` seconds."""

    def __init__(self, addresses: list[str], timeout: float, attempts: int, cooldown: float = 30.0,
                 tls=None) -> None:
        if not addresses:
            raise ValueError("OraclePool needs at least one address")
        self.timeout = timeout
        self.attempts = attempts
        self.cooldown = cooldown
        self.clients = [OracleClient(a, tls=tls, timeout=timeout, round_robin=a.startswith(BALANCED_SCHEMES))
                        for a in addresses]
        self._next = itertools.cycle(range(len(self.clients)))
        self._down_until = [0.0] * len(self.clients)
        self._lock = threading.Lock()
        self.failovers = 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return as soon as one worker is SERVING; workers found down are skipped for a while."""
        deadline = time.monotonic() + timeout
        errors: dict[str, str] = {}
        while time.monotonic() < deadline:
            for i, c in enumerate(self.clients):
                try:
                    c.wait_ready(min(1.0, max(0.1, deadline - time.monotonic())))
                    return
                except NotReady as exc:
                    errors[c.address] = str(exc)
                    self._down_until[i] = time.monotonic() + self.cooldown
        raise NotReady("no oracle worker is SERVING: " + "; ".join(errors.values()))

    def _pick(self) -> tuple[int, OracleClient]:
        with self._lock:
            now = time.monotonic()
            for _ in range(len(self.clients)):
                i = next(self._next)
                if self._down_until[i] <= now:
                    return i, self.clients[i]
            i = next(self._next)  # every worker is marked down: try anyway
            return i, self.clients[i]

    def label(self, atoms: Atoms, properties: tuple[str, ...] = ()) -> LabelResult:
        request_id = uuid.uuid4().hex
        last: EpicycleError | None = None
        tries = max(self.attempts, len(self.clients))
        for attempt in range(tries):
            i, client = self._pick()
            try:
                return client.label(atoms, properties, request_id=request_id)
            except RETRY_ELSEWHERE as exc:
                last = exc
                self.failovers += 1
                if isinstance(exc, NotReady):
                    self._down_until[i] = time.monotonic() + self.cooldown
                log.warning("oracle %s failed (%s); trying another worker (%d/%d)", client.address, exc,
                            attempt + 1, tries)
        raise OracleUnavailable(f"no oracle worker could label the structure after {tries} attempts: {last}")

    def close(self) -> None:
        for c in self.clients:
            c.close()


@dataclass
class Services:
    oracle: OraclePool
    learner_address: str
    sampler_addresses: list[str]                    # walkers use them round robin
    servers: list = field(default_factory=list)     # embedded RunningServers
    metrics_ports: dict = field(default_factory=dict)
    oracle_workers: int = 1                         # labels the pool can compute at once
    tls: object = None                              # protos.client.ClientTLS of every client, or None

    def close(self) -> None:
        self.oracle.close()
        for s in reversed(self.servers):
            s.stop(grace=1)


def start_services(config: RunConfig, species: list[int], learner_dir=None) -> Services:
    """Start what the config does not name by address, on 127.0.0.1 ephemeral ports.

    ``learner_dir``: the embedded learner's model directory (its checkpoints), in the run directory.
    """
    from protos.server import ServerConfig

    from protos.server import TLSConfig

    servers = []
    metrics = {}
    mport = config.metrics_port
    t = config.tls
    client_tls = t.client()
    server_tls = (TLSConfig(Path(t.server_cert_file), Path(t.server_key_file),
                            Path(t.ca_file) if t.cert_file else None) if t.server_cert_file else None)

    def server_config(offset: int) -> ServerConfig:
        return ServerConfig(metrics_port=None if mport is None else (0 if mport == 0 else mport + offset),
                            metrics_host=config.metrics_host, tls=server_tls)

    try:
        if config.oracle.addresses:
            oracle_addresses = list(config.oracle.addresses)
        else:
            from oracle_service.server import OracleServiceConfig, start_oracle_server

            s = start_oracle_server(OracleServiceConfig(backend=config.oracle.backend,
                                                        settings=dict(config.oracle.settings),
                                                        workers=config.oracle.workers, server=server_config(1)))
            servers.append(s)
            metrics["oracle"] = s.metrics_port
            oracle_addresses = [s.address]
        if config.learner.address:
            learner_address = config.learner.address
        else:
            from learner_service.server import LearnerServiceConfig, start_learner_server

            le = config.learner
            s = start_learner_server(LearnerServiceConfig(species=tuple(species), cutoffs=tuple(le.cutoffs),
                                                          hyperparameters=dict(le.hyperparameters),
                                                          model_dir=learner_dir, server=server_config(2),
                                                          **learner_model_settings(le)))
            servers.append(s)
            metrics["learner"] = s.metrics_port
            learner_address = s.address
        if config.sampler.addresses:
            sampler_addresses = list(config.sampler.addresses)
        elif config.sampler.address:
            sampler_addresses = [config.sampler.address]
        else:
            from sampler_service.server import SamplerServiceConfig, start_sampler_server

            s = start_sampler_server(SamplerServiceConfig(default_learner=learner_address, server=server_config(3),
                                                          learner_tls=client_tls))
            servers.append(s)
            metrics["sampler"] = s.metrics_port
            sampler_addresses = [s.address]
        pool = OraclePool(oracle_addresses, config.oracle.timeout_s, config.oracle.attempts, tls=client_tls)
    except BaseException:
        for s in reversed(servers):
            s.stop(grace=0)
        raise
    workers = len(config.oracle.addresses) if config.oracle.addresses else config.oracle.workers
    return Services(oracle=pool, learner_address=learner_address, sampler_addresses=sampler_addresses,
                    servers=servers, metrics_ports=metrics, oracle_workers=max(1, workers), tls=client_tls)


def learner_model_settings(le) -> dict:
    """The ``LearnerServiceConfig`` arguments of ``learner.model`` / ``learner.sparse`` (a run's
    :class:`coordinator.config.LearnerConfig`): the kind of a new model and its sparse settings,
    or the model file to start from."""
    from coordinator.config import learner_model_file
    from learner_service.model import SparseSettings

    sp = le.sparse
    path = learner_model_file(le)
    return {"model_kind": "exact" if path is not None else le.model, "model_path": path,
            "sparse": SparseSettings(max_inducing=sp.max_inducing, inducing_rule=sp.inducing_rule,
                                     per_call=sp.per_call, tolerance=sp.tolerance, functionals=sp.functionals)}
