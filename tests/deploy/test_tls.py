"""k8s/components/tls: every pod mounts its Secret, every server wants mutual TLS, every client presents a
certificate, the probes are `epicycle probe` exec probes — and the built manifests really work: their
flags, probe commands and run-config `tls:` section, with paths mapped to certificates issued as
docs/deploy.md says, against real gRPC servers on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import get_build
from .manifests import Build, build_plan, flag, pod_labels, pod_spec, role, selector_matches
from .pki import service_sans, write_secrets
from .test_manifests import GRPC_PORT, HEALTH_SERVICE, _probe_args, _run_config, _workload
from .tools import K8S

TLS_DIR = "/etc/epicycle/tls"
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
SERVER_FLAGS = {"--tls-cert": "tls.crt", "--tls-key": "tls.key", "--tls-client-ca": "ca.crt"}
SAMPLER_CLIENT_FLAGS = {"--learner-tls-ca": "ca.crt", "--learner-tls-cert": "tls.crt", "--learner-tls-key": "tls.key"}
TLS_BUILDS = [n for n, _, extra in build_plan() if "tls" in extra]


def _tls_mount(build: Build, workload: dict) -> str:
    """The Secret mounted at /etc/epicycle/tls in the workload's (first) container, checked."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, f"{role(workload)}: mount {TLS_DIR} read-only"
    secret = volumes[mounts[0]["name"]].get("secret")
    assert secret, f"{role(workload)}: {TLS_DIR} must be a Secret volume"
    mode = secret.get("defaultMode", 0o644)
    assert mode & 0o007 == 0 and mode & 0o040, f"{role(workload)}: key readable by fsGroup only, mode {oct(mode)}"
    assert pod_spec(workload)["securityContext"].get("fsGroup") == 10001, "the Secret's files are group 10001"
    return secret["secretName"]


def _in_secret(path: str | None, key: str, where: str) -> None:
    assert path == f"{TLS_DIR}/{key}", f"{where}: expected {TLS_DIR}/{key}, got {path}"


def test_tls_component_wires_every_pod(any_build: Build):
    workloads = {role(w): w for w in any_build.workloads()}
    _, run = _run_config(any_build)
    if "tls" not in any_build.components:
        for r, w in workloads.items():
            args = " ".join(pod_spec(w)["containers"][0].get("args", []))
            assert "tls" not in args, f"{r}: TLS flags without the tls component: {args}"
        assert "tls" not in run, "run.yaml has a tls section without the tls component"
        return
    for r, w in workloads.items():
        assert _tls_mount(any_build, w) == f"epicycle-{r}-tls", f"{r}: one Secret per role"
        args = pod_spec(w)["containers"][0]["args"]
        if r != "coordinator":
            for name, key in SERVER_FLAGS.items():  # --tls-client-ca: mutual TLS, every client shows a cert
                _in_secret(flag(args, name), key, f"{r} {name}")
        if r == "sampler":
            for name, key in SAMPLER_CLIENT_FLAGS.items():
                _in_secret(flag(args, name), key, f"sampler {name}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe") if r != "coordinator" else ():
            p = _probe_args(pod_spec(w)["containers"][0][probe])
            for key, value in (("ca.crt", p.tls_ca), ("tls.crt", p.tls_cert), ("tls.key", p.tls_key)):
                _in_secret(str(value), key, f"{r} {probe}")
            services = [s["metadata"]["name"] for s in any_build.of_kind("Service")
                        if selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(w))]
            assert p.tls_server_name in services, (
                f"{r} {probe}: --tls-server-name={p.tls_server_name} must be the name of a Service of the pods "
                f"({services}): the certificate carries the Service names its clients dial")
    tls = run["tls"]
    for key, name in (("ca_file", "ca.crt"), ("cert_file", "tls.crt"), ("key_file", "tls.key")):
        _in_secret(tls.get(key), name, f"run.yaml tls.{key}")
    assert tls.get("server_name") is None, "each address's own name is checked (one override cannot fit all)"
    cm, _ = _run_config(any_build)
    text = cm["data"]["run.yaml"]
    assert sum(line.startswith("tls:") for line in text.splitlines()) == 1, "one tls section in run.yaml"
    assert run["name"] and run["structure"], "the overlay's run.yaml is kept below the tls section"


def test_container_args_parse_with_the_real_cli(any_build: Build):
    """Every container's args are a valid `epicycle` command line (a misspelt --learner-tls-* would crash-loop)."""
    from coordinator.cli import build_parser

    parser = build_parser()
    for w in any_build.workloads():
        args = pod_spec(w)["containers"][0]["args"]
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{any_build.name}: {role(w)}: `epicycle {' '.join(args)}` does not parse")


def _host(address: str) -> str:
    return address.removeprefix("dns:///").rsplit(":", 1)[0]


@pytest.mark.parametrize("name", ["dev+tls", "prod+tls"])
def test_tls_manifests_work_against_real_servers(name: str, tmp_path):
    """The servers' TLS flags, the probes and the coordinator's and sampler's client TLS — as built, with
    /etc/epicycle/tls mapped to each role's Secret issued with the documented SANs — over real mTLS."""
    from coordinator import probe_cli
    from coordinator.cli import build_parser
    from coordinator.config import parse_config
    from protos.client import ClientTLS, make_channel, wait_until_serving
    from protos.server import ServerConfig, TLSConfig, create_server

    build = get_build(name)
    secrets = write_secrets(tmp_path, service_sans(build.namespace))

    def local(r: str, path) -> Path | None:
        return None if path is None else secrets[r] / Path(path).relative_to(TLS_DIR)

    parser = build_parser()
    servers, ports = {}, {}
    try:
        for r in ("oracle", "learner", "sampler"):
            args = parser.parse_args(pod_spec(_workload(build, r))["containers"][0]["args"])
            tls = TLSConfig(local(r, args.tls_cert), local(r, args.tls_key), local(r, args.tls_client_ca))
            servers[r] = create_server(ServerConfig(host="127.0.0.1", port=0, tls=tls),
                                       lambda s, r=r: [HEALTH_SERVICE[r]], ready=True)
            ports[r] = servers[r].port
            c = pod_spec(_workload(build, r))["containers"][0]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = _probe_args(c[probe])
                assert p.address == f"127.0.0.1:{GRPC_PORT[r]}"
                ok, line = probe_cli.probe(f"127.0.0.1:{ports[r]}", p.service, local(r, p.tls_ca),
                                           local(r, p.tls_cert), local(r, p.tls_key), p.tls_server_name, timeout=5)
                assert ok, f"{name}: {r} {probe}: {line}"
            # mutual TLS really is on: the right CA but no client certificate is refused
            ok, line = probe_cli.probe(f"127.0.0.1:{ports[r]}", "", local(r, "/etc/epicycle/tls/ca.crt"),
                                       server_name=p.tls_server_name, timeout=5)
            assert not ok and "requires a client certificate" in line, line

        # the coordinator: its run config's tls section, checking the names of the addresses it dials
        _, run = _run_config(build)
        run["tls"] = {k: (str(local("coordinator", v)) if k.endswith("_file") and v else v)
                      for k, v in run["tls"].items()}
        run["structure"] = {"file": None}
        config = parse_config({k: v for k, v in run.items() if k != "structure"})
        client = config.tls.client()
        dialled = {"oracle": config.oracle.addresses[0], "learner": config.learner.address,
                   "sampler": config.sampler.address or config.sampler.addresses[0]}
        for r, address in dialled.items():
            tls = ClientTLS(client.ca_file, client.cert_file, client.key_file, client.server_name or _host(address))
            channel = make_channel(f"127.0.0.1:{ports[r]}", tls=tls)
            try:
                wait_until_serving(channel, HEALTH_SERVICE[r], timeout=5)
            finally:
                channel.close()

        # the sampler's stream to the learner: its --learner-tls-* against the learner's --learner name
        args = parser.parse_args(pod_spec(_workload(build, "sampler"))["containers"][0]["args"])
        tls = ClientTLS(local("sampler", args.learner_tls_ca), local("sampler", args.learner_tls_cert),
                        local("sampler", args.learner_tls_key), _host(args.learner))
        channel = make_channel(f"127.0.0.1:{ports['learner']}", tls=tls)
        try:
            wait_until_serving(channel, HEALTH_SERVICE["learner"], timeout=5)
        finally:
            channel.close()
    finally:
        for s in servers.values():
            s.stop(grace=0)


def test_tls_component_order_does_not_matter():
    """tls appends flags to the args; oracle-qe changes only --backend, so listing tls first still works."""
    from .manifests import kustomize

    source = K8S / "overlays" / "dev"
    with tempfile.TemporaryDirectory(prefix="epicycle-kustomize-") as tmp:
        copy = Path(tmp) / "dev"
        shutil.copytree(source, copy)
        doc = yaml.safe_load((copy / "kustomization.yaml").read_text())
        doc["resources"] = [os.path.relpath((source / r).resolve(), copy) if (source / r).is_dir() else r
                            for r in doc["resources"]]
        doc["components"] = [os.path.relpath(K8S / "components" / c, copy) for c in ("tls", "oracle-qe")]
        (copy / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        objects = [o for o in yaml.safe_load_all(kustomize(copy)) if o]
    (oracle,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "oracle"]
    args = pod_spec(oracle)["containers"][0]["args"]
    assert flag(args, "--backend") == "qe" and flag(args, "--tls-client-ca") == f"{TLS_DIR}/ca.crt"


def test_secret_file_modes_are_octal_in_the_component():
    """defaultMode 0440 in the patches is YAML octal; it builds to 288 (a decimal 440 would be world-readable)."""
    for role_name in ("oracle", "learner", "sampler"):
        w = _workload(get_build("dev+tls"), role_name)
        (secret,) = [v["secret"] for v in pod_spec(w)["volumes"] if "secret" in v]
        assert secret["defaultMode"] == 0o440 and not stat.S_IROTH & secret["defaultMode"]


def test_cert_manager_issues_what_the_pods_mount(any_build: Build):
    """components/tls-cert-manager: a Certificate for every Secret the pods mount, with the documented SANs
    (the ones test_tls_manifests_work_against_real_servers issues) and usages, signed by the namespace CA."""
    certificates = {c["metadata"]["name"]: c for c in any_build.of_kind("Certificate")}
    issuers = {i["metadata"]["name"]: i for i in any_build.of_kind("Issuer")}
    if "tls-cert-manager" not in any_build.components:
        assert not certificates and not issuers
        return
    sans = service_sans(any_build.namespace)
    ca_secrets = {c["spec"]["secretName"] for c in certificates.values() if c["spec"].get("isCA")}
    for w in any_build.workloads():
        r = role(w)
        secret = _tls_mount(any_build, w)
        (cert,) = [c for c in certificates.values() if c["spec"]["secretName"] == secret]
        spec = cert["spec"]
        if r == "coordinator":
            assert set(spec["usages"]) >= {"client auth"} and "server auth" not in spec["usages"]
        else:
            assert spec["dnsNames"] == sans[r], f"{r}: dnsNames {spec['dnsNames']} (docs/deploy.md: {sans[r]})"
            assert set(spec["usages"]) >= {"server auth", "client auth"}, f"{r}: serves, and probes with it"
        assert not any("NAMESPACE" in d for d in spec.get("dnsNames", [])), "namespace placeholder left"
        ref = spec["issuerRef"]
        assert ref.get("kind", "Issuer") == "Issuer" and ref["name"] in issuers, f"{r}: issuer {ref} not in the build"
        assert issuers[ref["name"]]["spec"]["ca"]["secretName"] in ca_secrets, f"{r}: not signed by the namespace CA"
    for cert in certificates.values():
        ref = cert["spec"]["issuerRef"]
        assert ref["name"] in issuers, f"Certificate {cert['metadata']['name']}: no Issuer {ref['name']}"


@pytest.mark.parametrize("patch, message", [
    ({"dnsName": ["learner"]}, "Additional properties"),
    ({"privateKey": {"algorithm": "ECDSA", "sise": 256}}, "Additional properties"),
    ({"usages": ["client-auth"]}, "is not one of"),
])
def test_certificate_schema_rejects_mistakes(patch, message):
    """The generated cert-manager schema is strict (guards against a permissive schema)."""
    from .test_manifests import CRD_SCHEMAS, _crd_validator

    docs = yaml.safe_load_all((K8S / "components" / "tls-cert-manager" / "certificates.yaml").read_text())
    cert = next(d for d in docs if d)
    cert["spec"].update(patch)
    errors = [e.message for e in _crd_validator(CRD_SCHEMAS[("cert-manager.io/v1", "Certificate")]).iter_errors(cert)]
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("containerfile", ["Containerfile", "Containerfile.oracle"])
def test_probe_python_is_the_images_environment(containerfile):
    """The exec probes run `python -m coordinator.probe_cli`: the image's PATH must find the venv's python
    (where epicycle is installed) before the base image's /usr/local/bin/python."""
    text = (K8S / "images" / containerfile).read_text()
    runtime = text[text.rindex("\nFROM "):]
    assert "ENV PATH=/opt/epicycle/bin:$PATH" in runtime, f"{containerfile}: venv first on PATH in the runtime stage"
