"""``epicycle probe ADDRESS``: one gRPC health check, for exec probes and people.

Kubernetes' native ``grpc:`` probes speak plaintext only, so a pod whose server
uses TLS (k8s/components/tls) is probed with this command instead.  It asks
the standard ``grpc.health.v1.Health/Check`` once — over TLS, presenting a
client certificate when the server wants mutual TLS — prints one line and
exits 0 if the answer is SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, handshake refused, deadline passed, a certificate file missing).

One check, not a poll: a draining server (NOT_SERVING on SIGTERM) must fail
its readiness probe at once, not after a timeout.

The probes in k8s/ run ``python -m coordinator.probe_cli ...`` — the same
command without loading every role's CLI (about 1 CPU-second per probe for
``epicycle`` itself, which imports ASE, SciPy and the MD engines to build its
parser; this module imports only gRPC).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: exit status when the service answered SERVING / anything else
SERVING, FAILED = 0, 1


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="check a service's gRPC health (exit 0 if SERVING, 1 otherwise)",
        description="Ask the standard gRPC health service (grpc.health.v1) of ADDRESS once and print one line. "
        "Exit status 0 if the service is SERVING, 1 otherwise. For Kubernetes exec probes of servers that use "
        "TLS (native grpc probes cannot), and for checking a deployment by hand.\n\n"
        "example:\n"
        "  epicycle probe 127.0.0.1:50051 --service epicycle.v1.Oracle")
    add_arguments(p)
    p.set_defaults(func=probe_command)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", help="host:port of the server (in a pod: 127.0.0.1:PORT)")
    p.add_argument("--service", default="",
                   help="health service name, e.g. epicycle.v1.Oracle (default: the server as a whole)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="CA the server's certificate chains to: connect with TLS (default: plaintext)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="client certificate (PEM) to present: for servers that require mutual TLS")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check in the server's certificate instead of ADDRESS's host (e.g. the "
                        "Service name when probing 127.0.0.1 inside a pod)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds for connecting and the answer (default 5; keep it below the probe's "
                        "timeoutSeconds)")


def probe_command(args: argparse.Namespace) -> int:
    ok, line = probe(args.address, service=args.service, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                     server_name=args.tls_server_name, timeout=args.timeout)
    print(line, file=sys.stdout if ok else sys.stderr, flush=True)
    return SERVING if ok else FAILED


def probe(address: str, service: str = "", ca: Path | None = None, cert: Path | None = None,
          key: Path | None = None, server_name: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    """``(serving, one line saying what was found)`` for the health of ``service`` at ``address``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.client import ClientTLS, make_channel
    from protos.errors import EpicycleError

    what = f"{address} {service or '(server)'}"
    if (cert is None) != (key is None):
        return False, f"{what}: give both --tls-cert and --tls-key (mutual TLS), or neither"
    if (cert or server_name) and ca is None:
        return False, f"{what}: --tls-cert/--tls-key/--tls-server-name need --tls-ca (TLS)"
    if timeout <= 0:
        return False, f"{what}: --timeout must be > 0 s, got {timeout}"
    tls = ClientTLS(ca, cert, key, server_name) if ca is not None else None
    try:
        channel = make_channel(address, tls=tls)
    except EpicycleError as exc:  # a certificate file that is not there
        return False, f"{what}: {exc}"
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{what}: {_explain(exc.code(), exc.details() or '', tls)}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


def _explain(code, details: str, tls) -> str:
    """The RPC error as one line, with the likely cause of a refused connection."""
    import grpc

    text = f"{code.name}: {' '.join(details.split())}" if details else code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{text} (the server has no health status for this service name)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{text} (no answer in time)"
    if code != grpc.StatusCode.UNAVAILABLE:
        return text
    lowered = details.lower()
    if "connection refused" in lowered:
        return f"{text} (nothing listens there)"
    if "wrong_version_number" in lowered:
        return f"{text} (TLS to a server that speaks plaintext? drop the --tls-* options)"
    if "certificate_verify_failed" in lowered:
        return f"{text} (the server's certificate does not chain to --tls-ca)"
    if "hostname verification" in lowered:
        return (f"{text} (the server's certificate does not name the host: set --tls-server-name to a name "
                f"in its subjectAltName)")
    if "socket closed" in lowered:
        if tls is None:
            return f"{text} (the server closed the connection: does it use TLS? give --tls-ca)"
        if tls.cert_file is None:
            return (f"{text} (the server closed the connection after the TLS handshake: it requires a client "
                    f"certificate (mutual TLS): give --tls-cert and --tls-key)")
        return (f"{text} (the server closed the connection after the TLS handshake: does it trust the CA of "
                f"--tls-cert?)")
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m coordinator.probe_cli ADDRESS ...``: ``epicycle probe`` without the other commands."""
    # gRPC's C core logs handshake failures on stderr (read when gRPC starts, so before any import of it);
    # the probe's one line says it better.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = argparse.ArgumentParser(prog="epicycle probe", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return probe_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
