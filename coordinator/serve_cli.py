"""``epicycle serve oracle|learner|sampler``: what each container runs."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from protos.errors import InvalidInput
from protos.server import ServerConfig, TLSConfig

log = logging.getLogger("epicycle.serve")


def _common(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port, help=f"gRPC port (0: pick a free one; default {default_port})")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (default: off)")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest gRPC message, MiB (default 64)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight RPCs get on SIGTERM (default 30)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to: mutual TLS")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise InvalidInput("TLS needs both --tls-cert and --tls-key")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    return ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                        grace_seconds=args.grace, tls=tls)


def _parse_settings(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when possible (numbers, lists, booleans)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInput(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


ROLE_DESCRIPTIONS = {
    "learner": "Serve the Learner service: the GP force field. Predict returns energy (eV), forces and the σ "
               "of every force component (eV/Å) and stress (eV/Å³); AddData adds labelled environments; "
               "Optimize fits the hyperparameters (sig eV, ls Å, σn eV/Å). Starts empty (--species, "
               "--cutoffs Å), from a saved model (--model) or from its own latest checkpoint (--model-dir).\n\n"
               "example:\n"
               "  epicycle serve learner --species Al --cutoffs 6.0,4.0 --port 50052 --model-dir learner",
    "sampler": "Serve the Sampler service: MD engines (built-in NumPy integrators, LAMMPS) that take forces "
               "and their σ (eV/Å) from a learner stream and stop when σ crosses the threshold the "
               "coordinator sets; timestep fs, temperature K, pressure GPa.\n\n"
               "example:\n"
               "  epicycle serve sampler --learner 127.0.0.1:50052 --port 50053",
}


def register_cli(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run one Epicycle service until SIGTERM",
                           description="Run one service (what each container runs): the oracle labels structures "
                           "(energy eV, forces eV/Å, stress eV/Å³), the learner serves the GP (forces and their σ, "
                           "eV/Å), the sampler runs MD (Δt fs, T K). Every server also serves gRPC health and, "
                           "with --metrics-port, Prometheus metrics; SIGTERM stops it gracefully.\n\n"
                           "example:\n"
                           "  epicycle serve oracle --backend emt --port 50051")
    roles = serve.add_subparsers(dest="role", metavar="ROLE", required=True)

    o = roles.add_parser("oracle", help="label structures with a reference method (EMT, LJ, DFT ...)",
                         description="Serve the Oracle service: label structures (positions Å) with energy (eV), "
                         "forces (eV/Å) and stress (eV/Å³) from a backend (--list-backends). Backend settings "
                         "(e.g. a DFT code's cutoffs and k-points) come from --set or --settings-file.\n\n"
                         "example:\n"
                         "  epicycle serve oracle --backend emt --port 50051 --workers 2")
    _common(o, 50051)
    o.add_argument("--backend", default="emt", help="oracle backend name (see --list-backends; default emt)")
    o.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="backend setting, repeatable (values parsed as JSON when possible)")
    o.add_argument("--settings-file", type=Path, help="YAML/JSON file with backend settings")
    o.add_argument("--workers", type=int, default=1, help="concurrent calculations (default 1)")
    o.add_argument("--queue-limit", type=int, default=16, help="waiting requests before RESOURCE_EXHAUSTED (default 16)")
    o.add_argument("--min-distance", type=float, default=0.5, help="reject atom pairs closer than this, Å (default 0.5)")
    o.add_argument("--max-atoms", type=int, default=100_000, help="reject larger structures (default 100000)")
    o.add_argument("--list-backends", action="store_true", help="print the registered backends and exit")
    o.set_defaults(func=serve_oracle)

    for role in ("learner", "sampler"):
        try:
            module = __import__(f"{role}_service.server", fromlist=["register_serve_cli"])
        except ModuleNotFoundError:
            continue
        if hasattr(module, "register_serve_cli"):
            r = roles.add_parser(role, help=f"run the {role} service", description=ROLE_DESCRIPTIONS[role])
            _common(r, 50052 if role == "learner" else 50053)
            module.register_serve_cli(r)
            r.set_defaults(server_config=_server_config)


def serve_oracle(args: argparse.Namespace) -> int:
    from oracle_service.base import available_backends
    from oracle_service.server import OracleServiceConfig, start_oracle_server
    from protos.server import serve_until_signalled

    if args.list_backends:
        print("\n".join(available_backends()))
        return 0
    settings: dict = {}
    if args.settings_file:
        import yaml

        if not args.settings_file.is_file():
            raise InvalidInput(f"settings file not found: {args.settings_file}")
        loaded = yaml.safe_load(args.settings_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidInput(f"{args.settings_file}: expected a mapping of backend settings")
        settings.update(loaded)
    settings.update(_parse_settings(args.settings))
    config = OracleServiceConfig(backend=args.backend, settings=settings, workers=args.workers,
                                 queue_limit=args.queue_limit, min_distance=args.min_distance,
                                 max_atoms=args.max_atoms, server=_server_config(args))
    running = start_oracle_server(config)
    metrics = f", metrics on :{running.metrics_port}/metrics" if running.metrics_port is not None else ""
    print(f"oracle ({args.backend}) serving on {running.address}{metrics}; SIGTERM to stop", flush=True)
    serve_until_signalled(running)
    print("oracle stopped", flush=True)
    return 0
