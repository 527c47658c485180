"""Shared service plumbing on real servers: health, reflection, metrics, limits, TLS, shutdown, retries."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from ase.build import bulk
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from oracle_service.client import OracleClient
from oracle_service.server import OracleServiceConfig, build_label_service, start_oracle_server
from oracle_service.servicer import OracleServicer
from protos import errors
from protos.client import ClientTLS, make_channel, wait_until_serving
from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc
from protos.server import ServerConfig, TLSConfig, create_server

ROOT = Path(__file__).resolve().parent.parent


def cu(seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=seed)
    return atoms


def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_not_serving_until_ready() -> None:
    service = build_label_service(OracleServiceConfig())

    def add(server):
        oracle_pb2_grpc.add_OracleServicer_to_server(OracleServicer(service), server)
        return ["epicycle.v1.Oracle"]

    with create_server(ServerConfig(), add) as running:
        channel = make_channel(running.address)
        NOT, YES = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel) == NOT
        assert health_status(channel, "epicycle.v1.Oracle") == NOT
        running.mark_ready()
        assert health_status(channel) == YES
        assert health_status(channel, "epicycle.v1.Oracle") == YES
        with pytest.raises(grpc.RpcError) as info:
            health_status(channel, "epicycle.v1.NoSuchService")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services() -> None:
    with start_oracle_server(OracleServiceConfig()) as running:
        stub = reflection_pb2_grpc.ServerReflectionStub(make_channel(running.address))
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"epicycle.v1.Oracle", "grpc.health.v1.Health"} <= names


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_endpoint_counts_rpcs_by_method_and_code() -> None:
    config = OracleServiceConfig(server=ServerConfig(metrics_port=0))
    with start_oracle_server(config) as running:
        assert running.metrics_port
        with OracleClient(running.address, timeout=10) as c:
            c.label(cu(1))
            c.label(cu(1))  # cached
            bad = cu(2)
            bad.positions[0, 0] = float("nan")
            with pytest.raises(errors.InvalidInput):
                c.label(bad)
        text = scrape(running.metrics_port)
    ok = metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="Label", grpc_code="OK")
    invalid = metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="Label",
                           grpc_code="INVALID_ARGUMENT")
    assert ok == 2 and invalid == 1  # the bad request was not retried
    assert metric_value(text, "epicycle_grpc_server_handling_seconds_count", grpc_method="Label") == 3
    assert "epicycle_oracle_calls_total" in text
    assert metric_value(text, "epicycle_oracle_cache_entries", backend="emt") == 1


def test_message_size_limit_is_enforced() -> None:
    config = OracleServiceConfig(server=ServerConfig(max_message_bytes=64 * 1024))
    with start_oracle_server(config) as running:
        big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))  # 4000 atoms, ~110 kB request
        with OracleClient(running.address, timeout=10) as c:
            with pytest.raises(errors.Overloaded, match="RESOURCE_EXHAUSTED"):
                c.label(big)


def test_a_10k_atom_structure_crosses_the_wire() -> None:
    """Functional (not timed) check of the large-structure path; timing lives in benchmarks/."""
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((14, 14, 13))
    assert len(big) > 10_000
    with start_oracle_server(OracleServiceConfig()) as running:
        with OracleClient(running.address, timeout=120) as c:
            first = c.label(big)
            again = c.label(big)
    assert again.cached and first.labels.forces.shape == (len(big), 3)


def tls_oracle(pki, mutual: bool):
    tls = TLSConfig(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    return start_oracle_server(OracleServiceConfig(server=ServerConfig(tls=tls)))


def test_tls_server(pki) -> None:
    with tls_oracle(pki, mutual=False) as running:
        with OracleClient(running.address, tls=ClientTLS(pki.ca), timeout=10) as c:
            assert c.label(cu()).labels.forces.shape == (32, 3)
        with OracleClient(running.address, tls=ClientTLS(pki.other_ca), timeout=3) as c:
            with pytest.raises(errors.NotReady):  # certificate not trusted -> UNAVAILABLE
                c.label(cu())
        with OracleClient(running.address, timeout=3) as c:  # plaintext client
            with pytest.raises(errors.NotReady):
                c.label(cu())


def test_mutual_tls_requires_a_client_certificate(pki) -> None:
    with tls_oracle(pki, mutual=True) as running:
        with OracleClient(running.address, tls=ClientTLS(pki.ca, pki.client_cert, pki.client_key),
                          timeout=10) as c:
            assert c.label(cu()).labels.energy is not None
        with OracleClient(running.address, tls=ClientTLS(pki.ca), timeout=3) as c:
            with pytest.raises(errors.NotReady):
                c.label(cu())


def test_missing_tls_file_is_a_setup_error(tmp_path) -> None:
    tls = TLSConfig(tmp_path / "nope.pem", tmp_path / "nope.key")
    with pytest.raises(errors.SetupError, match="nope.pem"):
        start_oracle_server(OracleServiceConfig(server=ServerConfig(tls=tls)))


def test_unreachable_server_is_not_ready_within_the_deadline() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OracleClient(f"127.0.0.1:{port}", timeout=3) as c:
        started = time.monotonic()
        with pytest.raises(errors.NotReady, match="UNAVAILABLE"):
            c.label(cu())
        assert time.monotonic() - started < 10


def test_client_retries_unavailable_until_the_server_appears() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    holder: dict = {}

    def start_late():
        time.sleep(0.4)
        holder["server"] = start_oracle_server(OracleServiceConfig(server=ServerConfig(port=port)))

    t = threading.Thread(target=start_late)
    t.start()
    try:
        with OracleClient(f"127.0.0.1:{port}", timeout=15) as c:
            result = c.label(cu(4))
        assert result.labels.forces.shape == (32, 3)
    finally:
        t.join()
        if "server" in holder:
            holder["server"].stop(grace=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_drains_and_exits_on_sigterm(tmp_path) -> None:
    port, mport = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "oracle", "--backend", "emt", "--port", str(port),
         "--metrics-port", str(mport), "--grace", "5"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        channel = make_channel(f"127.0.0.1:{port}")
        wait_until_serving(channel, "epicycle.v1.Oracle", timeout=60)
        with OracleClient(f"127.0.0.1:{port}", timeout=10) as c:
            assert c.label(cu()).labels.forces.shape == (32, 3)
        assert "epicycle_grpc_server_handled_total" in scrape(mport)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert re.search(r"oracle \(emt\) serving on 127\.0\.0\.1:\d+", out), out
    assert "oracle stopped" in out


def test_label_command_writes_extxyz(tmp_path) -> None:
    import ase.io
    from ase.calculators.emt import EMT

    from coordinator.cli import main

    src = tmp_path / "in.xyz"
    frames = [cu(s) for s in range(3)]
    ase.io.write(src, frames)
    out = tmp_path / "out.xyz"
    with start_oracle_server(OracleServiceConfig()) as running:
        assert main(["label", str(src), "--oracle", running.address, "--out", str(out)]) == 0
    labelled = ase.io.read(out, ":")
    assert len(labelled) == 3
    for got, ref in zip(labelled, frames):
        ref.calc = EMT()
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-7)
        assert abs(got.get_forces() - ref.get_forces()).max() < 1e-6


def test_label_command_reports_bad_frames_and_keeps_the_good_ones(tmp_path, capsys) -> None:
    import ase.io

    from coordinator.cli import main

    good, bad = cu(1), cu(2)
    bad.positions[3] = bad.positions[4] + 0.1
    src = tmp_path / "in.xyz"
    ase.io.write(src, [good, bad, cu(3)])
    out = tmp_path / "out.xyz"
    with start_oracle_server(OracleServiceConfig()) as running:
        assert main(["label", str(src), "--oracle", running.address, "--out", str(out)]) == 1
    assert len(ase.io.read(out, ":")) == 2
    assert "frame 1" in capsys.readouterr().err


def test_label_command_missing_file_is_a_clear_error(tmp_path, capsys) -> None:
    from coordinator.cli import main

    code = main(["label", str(tmp_path / "missing.xyz"), "--oracle", "127.0.0.1:1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "input file not found" in capsys.readouterr().err


def test_a_cancelled_stream_is_counted_as_cancelled_not_internal(caplog) -> None:
    """A PredictStream client that goes away mid-stream is a cancellation, not a server bug."""
    import logging

    from learner_service.client import LearnerClient
    from learner_service.server import LearnerServiceConfig, start_learner_server

    hyps = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
    config = LearnerServiceConfig(species=(29,), cutoffs=(4.0, 3.0), hyperparameters=hyps,
                                  server=ServerConfig(metrics_port=0))
    with start_learner_server(config) as running, caplog.at_level(logging.WARNING, logger="epicycle.server"):
        client = LearnerClient(running.address)
        stream = client.stream(timeout=60)
        atoms = cu()
        stream.predict(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
        stream._responses.cancel()  # the client goes away without closing the stream
        client.close()
        deadline = time.monotonic() + 60  # a wait, generous for a loaded machine (failed once at 10 s in CI)
        text = ""
        while time.monotonic() < deadline:
            text = scrape(running.metrics_port)
            if metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="PredictStream"):
                break
            time.sleep(0.05)
    assert metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="PredictStream",
                        grpc_code="CANCELLED") == 1
    assert metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="PredictStream",
                        grpc_code="INTERNAL") == 0
    assert "unexpected error" not in caplog.text


def test_a_request_that_does_not_parse_is_invalid_argument_with_one_log_line(caplog) -> None:
    """Random bytes as a request: INVALID_ARGUMENT naming the message type, one log line,
    no traceback -- for unary methods and for the messages of a client stream (reflection's
    ServerReflectionInfo is one), and counted under INVALID_ARGUMENT."""
    import logging

    garbage = b"\xff\xff\xff\x07 not a protobuf message"
    config = OracleServiceConfig(server=ServerConfig(metrics_port=0))
    with start_oracle_server(config) as running, caplog.at_level(logging.DEBUG):
        channel = make_channel(running.address)
        raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        for method, message in (("/epicycle.v1.Oracle/Label", "epicycle.v1.LabelRequest"),
                                ("/epicycle.v1.Oracle/Describe", "epicycle.v1.DescribeRequest")):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(method, **raw)(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"does not parse as {message}" in info.value.details()
        stream = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", **raw)
        valid = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([valid, garbage]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request message #1 of the stream" in info.value.details()
        text = scrape(running.metrics_port)
    assert metric_value(text, "epicycle_grpc_server_handled_total", grpc_method="Label",
                        grpc_code="INVALID_ARGUMENT") == 1
    assert "Traceback" not in caplog.text and "Exception deserializing" not in caplog.text
    lines = [r for r in caplog.records if "does not parse" in r.getMessage()]
    assert len(lines) == 3 and all("\n" not in r.getMessage() and r.exc_info is None for r in lines)
