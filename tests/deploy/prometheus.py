"""A real, empty Prometheus on 127.0.0.1 for checking PromQL, and the metric names the services export."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .tools import require


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen

    def query(self, expr: str, time: float | None = None) -> dict:
        """``/api/v1/query`` response (JSON) — also for errors, which come back as HTTP 400/422."""
        params = {"query": expr} if time is None else {"query": expr, "time": f"{time:.3f}"}
        return self.api("query", params)

    def api(self, endpoint: str, params: dict | list | None = None) -> dict:
        """``GET /api/v1/<endpoint>?params`` (JSON), e.g. ``api("series", [("match[]", "up")])``."""
        q = urllib.parse.urlencode(params or {})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{q}", timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}") | {"http_status": exc.code}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EMPTY_CONFIG = "global:\n  scrape_interval: 1m\nscrape_configs: []\n"


def start_prometheus(workdir: Path, timeout: float = 60.0, config_text: str = EMPTY_CONFIG) -> PrometheusServer:
    """Start ``prometheus`` with ``config_text`` as its configuration (default: scrape nothing);
    wait until it is ready.  Relative paths in the configuration (``rule_files``) are relative to ``workdir``."""
    binary = require("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    log = open(workdir / "prometheus.log", "w")
    for _ in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return PrometheusServer(url, proc)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"prometheus did not become ready; log:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")


def stop_prometheus(server: PrometheusServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# --------------------------------------------------------------------------- metric names

def _sample_names(registry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def exported_metric_names() -> set[str]:
    """Series names that real oracle (EMT), learner and sampler servers and the coordinator export."""
    from prometheus_client import CollectorRegistry

    from coordinator.metrics import CoordinatorMetrics
    from learner_service.server import LearnerServiceConfig, start_learner_server
    from oracle_service.server import OracleServiceConfig, start_oracle_server
    from protos.server import ServerConfig
    from sampler_service.server import SamplerServiceConfig, start_sampler_server

    coordinator = CollectorRegistry()
    CoordinatorMetrics(coordinator)
    names = _sample_names(coordinator)
    local = ServerConfig(host="127.0.0.1", port=0)
    for start in (
        lambda: start_oracle_server(OracleServiceConfig(backend="emt", server=local)),
        lambda: start_learner_server(LearnerServiceConfig(species=(13,), warm_up=False, server=local)),
        lambda: start_sampler_server(SamplerServiceConfig(default_learner="oracle:emt", server=local)),
    ):
        running = start()
        try:
            names |= _sample_names(running.registry)
        finally:
            running.stop(grace=0)
    return names
