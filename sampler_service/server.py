"""Build and run a Sampler service."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protos.client import ClientTLS
from protos.epicycle.v1 import sampler_pb2, sampler_pb2_grpc
from protos.errors import InvalidInput
from protos.server import RunningServer, ServerConfig, create_server
from sampler_service.force_providers import ForceResult
from sampler_service.settings import ENGINES

SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["Sampler"].full_name

#: a learner address of this form runs MD on an oracle backend in-process
#: (e.g. "oracle:emt") — for equilibration, benchmarks and engine tests
ORACLE_PREFIX = "oracle:"


class OracleProvider:
    """Forces from an oracle backend in the sampler's own process (σ = None: never gates)."""

    def __init__(self, backend: str, stress: bool = False) -> None:
        from oracle_service.base import create_oracle

        self.oracle = create_oracle(backend)
        self.want_stress = stress

    def compute(self, positions, cell, numbers, pbc) -> ForceResult:
        from ase import Atoms

        props = ("energy", "forces") + (("stress",) if self.want_stress else ())
        labels = self.oracle.calculate(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc), props)
        return ForceResult(energy=labels.energy, forces=labels.forces, stress=labels.stress)


def default_provider_factory(address: str, want_stress: bool, tls=None):
    if address.startswith(ORACLE_PREFIX):
        return OracleProvider(address[len(ORACLE_PREFIX):], stress=want_stress)
    from sampler_service.learner_stream_provider import LearnerStreamProvider

    return LearnerStreamProvider(address, stress=want_stress, tls=tls)


class AllowedProviders:
    """The sampler's provider factory: it dials only the learner addresses it was started with.

    A Run request names its learner (``learner_address``); a client must not be able to make the
    sampler connect anywhere (a port scanner inside the cluster) nor start an in-process oracle
    (``oracle:qe`` would run ``pw.x`` in the sampler).  So only ``default_learner`` and the
    ``allowed_learners`` of the service's configuration are accepted — ``oracle:NAME`` included only
    when the operator listed it — and the learner stream uses the configured client TLS.
    """

    def __init__(self, config: "SamplerServiceConfig") -> None:
        self.allowed = {a for a in (config.default_learner, *config.allowed_learners) if a}
        self.tls = config.learner_tls

    def __call__(self, address: str, want_stress: bool):
        if address not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "none"
            raise InvalidInput(f"learner_address {address!r} is not one this sampler may use (allowed: {allowed}); "
                               f"the sampler's operator adds addresses with --allow-learner")
        return default_provider_factory(address, want_stress, self.tls)


@dataclass(frozen=True)
class SamplerServiceConfig:
    default_learner: str = ""          # "host:port" of the learner, or "oracle:emt"
    engines: tuple[str, ...] = ENGINES
    server: ServerConfig = ServerConfig()
    allowed_learners: tuple[str, ...] = ()   # other learner addresses Run requests may name
    learner_tls: ClientTLS | None = None     # TLS (mutual with a client certificate) to the learner


class SamplerMetrics:
    def __init__(self, registry: CollectorRegistry, servicer) -> None:
        self.servicer = servicer
        registry.register(self)

    def describe(self):
        return []

    def collect(self):
        s = self.servicer
        c = CounterMetricFamily("epicycle_sampler_steps", "MD steps integrated.")
        c.add_metric([], float(s.steps_total))
        yield c
        c = CounterMetricFamily("epicycle_sampler_runs_cancelled", "Run calls stopped because the client went away.")
        c.add_metric([], float(s.runs_cancelled_total))
        yield c
        for name, value, help_text in (
            ("epicycle_sampler_temperature_kelvin", s.last_temperature_k,
             "MD temperature of the last integrated frame, K (NaN before the first)."),
            ("epicycle_sampler_energy_drift_ev_per_atom_ps", s.last_drift,
             "Drift of the conserved energy, eV/atom/ps, last measured in a run call (over the frames of one "
             "model version; NaN before the first measurement)."),
            ("epicycle_sampler_steps_per_second", s.last_steps_per_second, "MD throughput of the last run call."),
            ("epicycle_sampler_active_runs", s.active_runs, "Run calls whose engine is integrating now."),
        ):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], float(value))
            yield g


def start_sampler_server(config: SamplerServiceConfig, provider_factory=None,
                         registry: CollectorRegistry | None = None) -> RunningServer:
    from sampler_service.servicer import SamplerServicer

    registry = registry if registry is not None else CollectorRegistry()
    servicer = SamplerServicer(provider_factory or AllowedProviders(config), config.default_learner,
                               config.engines)

    def add(server):
        sampler_pb2_grpc.add_SamplerServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    running = create_server(config.server, add, registry=registry)
    SamplerMetrics(registry, servicer)
    running.servicer = servicer  # type: ignore[attr-defined]
    running.mark_ready()
    return running


def register_serve_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--learner", default="", help="default learner address host:port (or oracle:emt for "
                   "MD on an oracle backend in-process)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"engines to offer (default {','.join(ENGINES)})")
    p.add_argument("--allow-learner", action="append", default=[], metavar="ADDRESS",
                   help="another learner address Run requests may name (repeatable); by default the sampler "
                        "dials only --learner")
    p.add_argument("--learner-tls-ca", type=Path, help="CA (PEM) the learner's certificate chains to: TLS to the learner")
    p.add_argument("--learner-tls-cert", type=Path, help="client certificate (PEM) for mutual TLS with the learner")
    p.add_argument("--learner-tls-key", type=Path, help="client key (PEM) for mutual TLS with the learner")
    p.set_defaults(func=serve_sampler)


def serve_sampler(args: argparse.Namespace) -> int:
    from protos.server import serve_until_signalled

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    tls = None
    if args.learner_tls_ca or args.learner_tls_cert or args.learner_tls_key:
        if not args.learner_tls_ca:
            raise InvalidInput("--learner-tls-cert/--learner-tls-key need --learner-tls-ca")
        if bool(args.learner_tls_cert) != bool(args.learner_tls_key):
            raise InvalidInput("give both --learner-tls-cert and --learner-tls-key (mutual TLS), or neither")
        tls = ClientTLS(args.learner_tls_ca, args.learner_tls_cert, args.learner_tls_key)
    config = SamplerServiceConfig(default_learner=args.learner, engines=engines, server=args.server_config(args),
                                  allowed_learners=tuple(args.allow_learner), learner_tls=tls)
    running = start_sampler_server(config)
    print(f"sampler serving on {running.address}; SIGTERM to stop", flush=True)
    serve_until_signalled(running)
    print("sampler stopped", flush=True)
    return 0
