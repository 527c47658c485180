"""``epicycle probe``: the exec probe of TLS pods, against real servers on 127.0.0.1.

Exit 0 only when the health service answers SERVING; 1 for everything else,
with one line that says what was wrong (k8s/components/tls relies on both).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import main
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos.server import ServerConfig, TLSConfig

REPO = Path(__file__).resolve().parents[1]
ORACLE = "epicycle.v1.Oracle"


def oracle(tls: TLSConfig | None = None):
    return start_oracle_server(OracleServiceConfig(server=ServerConfig(tls=tls)))


def probe(capsys, *argv: str) -> tuple[int, str]:
    code = main(["probe", *argv])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1, f"the probe prints exactly one line, got {lines}"
    return code, lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- plaintext


def test_serving_exits_0(capsys) -> None:
    with oracle() as running:
        code, line = probe(capsys, running.address, "--service", ORACLE)
        assert (code, line) == (0, f"{running.address} {ORACLE}: SERVING")
        code, line = probe(capsys, running.address)  # the server as a whole (liveness)
        assert code == 0 and line.endswith("(server): SERVING")


def test_not_serving_exits_1(capsys) -> None:
    """A server that is up but not ready (warming up, or draining after SIGTERM) fails at once."""
    with oracle() as running:
        running.mark_not_ready()
        code, line = probe(capsys, running.address, "--service", ORACLE, "--timeout", "30")
        assert code == 1 and line.endswith(f"{ORACLE}: NOT_SERVING")


def test_unknown_service_exits_1(capsys) -> None:
    with oracle() as running:
        code, line = probe(capsys, running.address, "--service", "epicycle.v1.Learner")
        assert code == 1 and "NOT_FOUND" in line and "no health status for this service" in line


def test_absent_server_exits_1(capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, line = probe(capsys, address, "--service", ORACLE, "--timeout", "3")
    assert code == 1 and line.startswith(f"{address} {ORACLE}: UNAVAILABLE") and "nothing listens there" in line


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_oracle(pki):
    with oracle(TLSConfig(pki.server_cert, pki.server_key, pki.ca)) as running:
        yield running


def test_mutual_tls_serving_exits_0(capsys, pki, mtls_oracle) -> None:
    code, line = probe(capsys, mtls_oracle.address, "--service", ORACLE, "--tls-ca", str(pki.ca),
                       "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert (code, line) == (0, f"{mtls_oracle.address} {ORACLE}: SERVING")


def test_mutual_tls_without_a_client_certificate_exits_1(capsys, pki, mtls_oracle) -> None:
    code, line = probe(capsys, mtls_oracle.address, "--service", ORACLE, "--tls-ca", str(pki.ca))
    assert code == 1 and "UNAVAILABLE" in line
    assert "requires a client certificate (mutual TLS): give --tls-cert and --tls-key" in line


def test_plaintext_probe_of_a_tls_server_exits_1(capsys, mtls_oracle) -> None:
    code, line = probe(capsys, mtls_oracle.address, "--service", ORACLE)
    assert code == 1 and "does it use TLS? give --tls-ca" in line


def test_untrusted_server_certificate_exits_1(capsys, pki, mtls_oracle) -> None:
    code, line = probe(capsys, mtls_oracle.address, "--tls-ca", str(pki.other_ca),
                       "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert code == 1 and "does not chain to --tls-ca" in line


def test_server_name_is_checked(capsys, pki, mtls_oracle) -> None:
    """In a pod the probe dials 127.0.0.1 and checks the Service's name in the certificate."""
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    code, _ = probe(capsys, mtls_oracle.address, *tls, "--tls-server-name", "localhost")  # in the test SAN
    assert code == 0
    code, line = probe(capsys, mtls_oracle.address, *tls, "--tls-server-name", "learner")  # not in it
    assert code == 1 and "does not name the host" in line


def test_tls_to_a_plaintext_server_exits_1(capsys, pki) -> None:
    with oracle() as running:
        code, line = probe(capsys, running.address, "--tls-ca", str(pki.ca))
        assert code == 1 and "speaks plaintext" in line


@pytest.mark.parametrize("argv, message", [
    (["--tls-ca", "{missing}"], "TLS file not found"),
    (["--tls-ca", "{ca}", "--tls-cert", "{cert}"], "give both --tls-cert and --tls-key"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}"], "need --tls-ca"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_bad_options_exit_1_with_one_line(capsys, pki, mtls_oracle, tmp_path, argv, message) -> None:
    names = {"missing": tmp_path / "nope.crt", "ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
    code, line = probe(capsys, mtls_oracle.address, *[a.format(**names) for a in argv])
    assert code == 1 and message in line


def test_module_entry_point_is_what_the_pods_run(pki, mtls_oracle) -> None:
    """k8s/components/tls runs `python -m coordinator.probe_cli` (no other CLI imported): one line, no gRPC
    log noise on stderr, the same exit codes."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    base = [sys.executable, "-m", "coordinator.probe_cli", mtls_oracle.address, "--service", ORACLE,
            "--tls-ca", str(pki.ca), "--tls-server-name", "localhost", "--timeout", "10"]
    ok = subprocess.run([*base, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, f"{mtls_oracle.address} {ORACLE}: SERVING\n", "")
    refused = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and "requires a client certificate" in refused.stderr
