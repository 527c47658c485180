"""k8s/: every overlay and component combination builds, validates and means what it should.

* built-in kinds: strict schema validation with ``kubernetes-validate``
  (unknown fields are errors) against :data:`K8S_VERSION`;
* custom resources (KEDA ScaledObject, Prometheus Operator ServiceMonitor and
  PrometheusRule): JSON schemas in k8s/schemas/, written from their CRDs;
* semantics: hardened containers, gRPC probes, grace periods consistent with
  the services' --grace and the coordinator's label timeout, the oracle
  reached only through a headless Service, NetworkPolicies that let exactly
  the right pods in, resolvable references, pinned images.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from .conftest import get_build
from .manifests import (
    Build,
    build_plan,
    container_ports,
    flag,
    pod_labels,
    pod_spec,
    role,
    selector_matches,
)
from .tools import K8S, REPO

#: Kubernetes version the built-in objects are validated against (the oldest
#: the manifests need is 1.32: StatefulSet PVC retention, PDB unhealthy-pod
#: eviction policy and gRPC probes are GA there).
K8S_VERSIONS = ("1.32.0", "1.33.0")

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("cert-manager.io/v1", "Certificate"): "certificate-cert-manager.io-v1.json",
    ("cert-manager.io/v1", "Issuer"): "issuer-cert-manager.io-v1.json",
}
ROLES = ("oracle", "learner", "sampler", "coordinator")
GRPC_PORT = {"oracle": 50051, "learner": 50052, "sampler": 50053}
HEALTH_SERVICE = {"oracle": "epicycle.v1.Oracle", "learner": "epicycle.v1.Learner", "sampler": "epicycle.v1.Sampler"}
#: who may open a gRPC connection to whom (NetworkPolicy ingress)
GRPC_CLIENTS = {"oracle": {"coordinator"}, "learner": {"coordinator", "sampler"}, "sampler": {"coordinator"},
                "coordinator": set()}
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}
RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                      "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version")


def _workload(build: Build, component: str) -> dict:
    found = [w for w in build.workloads() if role(w) == component]
    assert len(found) == 1, f"{build.name}: expected one {component} workload, found {len(found)}"
    return found[0]


def _containers(build: Build):
    for w in build.workloads():
        spec = pod_spec(w)
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield w, spec, c


def _run_config(build: Build) -> tuple[dict, dict]:
    """(ConfigMap, parsed run.yaml) mounted into the coordinator."""
    job = _workload(build, "coordinator")
    names = [v["configMap"]["name"] for v in pod_spec(job)["volumes"] if "configMap" in v]
    cms = [cm for cm in build.of_kind("ConfigMap") if cm["metadata"]["name"] in names and "run.yaml" in cm["data"]]
    assert len(cms) == 1, f"{build.name}: the coordinator must mount one ConfigMap with run.yaml"
    return cms[0], yaml.safe_load(cms[0]["data"]["run.yaml"])


# --------------------------------------------------------------------------- schemas


def test_build_plan_covers_every_overlay_and_component():
    names = {n for n, _, _ in build_plan()}
    on_disk_overlays = {p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()}
    on_disk_components = {p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file()}
    from .manifests import COMPONENTS, OVERLAYS

    assert on_disk_overlays == set(OVERLAYS), "add new overlays to tests/deploy/manifests.py:OVERLAYS"
    assert on_disk_components == set(COMPONENTS), "add new components to tests/deploy/manifests.py:COMPONENTS"
    assert {"base", "dev", "prod", "dev+keda+monitoring+oracle-qe+resume", "prod+keda+resume"} <= names


@lru_cache(maxsize=None)
def _validate_builtin(text: str, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(json.loads(text), version, strict=True)


@lru_cache(maxsize=None)
def _crd_validator(filename: str) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S / "schemas" / filename).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_objects_pass_schema_validation(any_build: Build):
    import kubernetes_validate

    assert any_build.objects, f"{any_build.name}: kustomize produced nothing"
    errors = []
    for obj in any_build.objects:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if key in CRD_SCHEMAS:
            for err in _crd_validator(CRD_SCHEMAS[key]).iter_errors(obj):
                errors.append(f"{where}: {'/'.join(map(str, err.absolute_path))}: {err.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                _validate_builtin(json.dumps(obj, sort_keys=True), version)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{where}: {key} is neither a built-in kind of Kubernetes {version} nor has a "
                              f"schema in k8s/schemas/ (add one and register it in CRD_SCHEMAS)")
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{where} (k8s {version}): {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, f"{any_build.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("bad, message", [
    ({"spec": {"triggers": [{"type": "prometheus", "metadata": {"threshold": 1}}]}}, "is not of type 'string'"),
    ({"spec": {"minReplicas": 1}}, "Additional properties"),
])
def test_scaledobject_schema_rejects_mistakes(bad, message):
    """The hand-written CRD schemas are strict where the CRDs are (guards against a permissive schema)."""
    obj = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    for key, value in bad["spec"].items():
        obj["spec"][key] = value
    errors = [e.message for e in _crd_validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]).iter_errors(obj)]
    assert any(message in e for e in errors), errors


def test_strict_validation_rejects_unknown_fields():
    """kubernetes-validate in strict mode really rejects a misspelt field."""
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i:1", "readinesProbe": {"grcp": {"port": 1}}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------- containers


def test_containers_are_hardened(any_build: Build):
    problems = []
    for w, spec, c in _containers(any_build):
        where = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{where}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid in (None, 0):
            problems.append(f"{where}: runAsUser must be a non-zero uid (the image's user is 10001), got {uid}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in (sc.get("capabilities", {}).get("drop") or []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile must be RuntimeDefault")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problems.append(f"{where}: no {kind}.{r}")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
            problems.append(f"{where}: /tmp must be an emptyDir (the root filesystem is read-only)")
        for mount, name in mounts.items():
            claim_templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            if name not in volumes and name not in claim_templates:
                problems.append(f"{where}: volumeMount {mount} names no volume {name!r}")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: the pod needs no API token: automountServiceAccountToken must be false")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: host namespaces")
    assert not problems, f"{any_build.name}:\n" + "\n".join(problems)


def test_services_have_grpc_health_probes(any_build: Build):
    problems = []
    for w in any_build.workloads():
        if w["kind"] == "Job":
            continue  # the coordinator is a batch job: it serves no gRPC health
        r = role(w)
        c = pod_spec(w)["containers"][0]
        assert c.get("args", [])[:2] == ["serve", r], f"{w['metadata']['name']}: runs {c.get('args')}"
        port = int(flag(c["args"], "--port"))
        assert port == GRPC_PORT[r] == container_ports(w)["grpc"]
        if "tls" in any_build.components:  # native grpc probes cannot do TLS: exec `epicycle probe`
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                args = _probe_args(c.get(probe))
                if args is None:
                    problems.append(f"{r}: {probe} must exec `python -m coordinator.probe_cli` (TLS on)")
                    continue
                if args.address != f"127.0.0.1:{port}":
                    problems.append(f"{r}: {probe} probes {args.address}, the server listens on {port}")
                want = "" if probe == "livenessProbe" else HEALTH_SERVICE[r]
                if args.service != want:
                    problems.append(f"{r}: {probe} must ask for service {want!r}, asks {args.service!r}")
                if not (args.tls_ca and args.tls_cert and args.tls_key):
                    problems.append(f"{r}: {probe} must present a client certificate (the server wants mTLS)")
                if not args.timeout < c[probe].get("timeoutSeconds", 1):
                    problems.append(f"{r}: {probe}: --timeout={args.timeout} must be below timeoutSeconds")
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = c.get(probe)
            if not spec or "grpc" not in spec:
                problems.append(f"{r}: {probe} must be a native grpc probe")
                continue
            if spec["grpc"]["port"] != port:
                problems.append(f"{r}: {probe} probes port {spec['grpc']['port']}, the server listens on {port}")
        ready = c.get("readinessProbe", {}).get("grpc", {}).get("service")
        if ready != HEALTH_SERVICE[r]:
            problems.append(f"{r}: readinessProbe must ask for service {HEALTH_SERVICE[r]!r}, asks {ready!r}")
        assert flag(c["args"], "--host") == "0.0.0.0", f"{r}: must bind 0.0.0.0 in a pod"
        assert flag(c["args"], "--metrics-port") == "9100" and container_ports(w)["metrics"] == 9100
    assert not problems, f"{any_build.name}:\n" + "\n".join(problems)


def _probe_args(probe: dict | None):
    """The parsed options of an exec probe running ``python -m coordinator.probe_cli``, else None."""
    import argparse

    from coordinator import probe_cli

    command = ((probe or {}).get("exec") or {}).get("command") or []
    if command[:3] != ["python", "-m", "coordinator.probe_cli"]:
        return None
    parser = argparse.ArgumentParser(exit_on_error=False)
    probe_cli.add_arguments(parser)
    return parser.parse_args(command[3:])


def test_grace_periods_are_consistent(any_build: Build):
    """terminationGracePeriodSeconds > --grace (drain finishes before SIGKILL) and, for the
    oracle, --grace covers one label call (the coordinator's oracle.timeout_s)."""
    for w in any_build.workloads():
        if w["kind"] == "Job":
            assert pod_spec(w).get("terminationGracePeriodSeconds", 30) >= 60, "coordinator needs time to checkpoint"
            continue
        c = pod_spec(w)["containers"][0]
        grace = flag(c["args"], "--grace")
        assert grace is not None, f"{role(w)}: set --grace explicitly"
        period = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        assert period >= float(grace) + 5, (f"{role(w)}: terminationGracePeriodSeconds={period} must exceed "
                                            f"--grace={grace} (by >= 5 s)")
    if any_build.overlay is not None:
        oracle_grace = float(flag(pod_spec(_workload(any_build, "oracle"))["containers"][0]["args"], "--grace"))
        _, run = _run_config(any_build)
        timeout = float(run["oracle"]["timeout_s"])
        assert oracle_grace >= timeout, (f"oracle --grace={oracle_grace} is shorter than one label call "
                                         f"(run.yaml oracle.timeout_s={timeout}): scale-down would kill labels")


def test_images_are_pinned(deployable: Build):
    for _, _, c in _containers(deployable):
        image = c["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and "/" not in tag, f"{image}: no tag (means :latest)"
        assert tag != "latest", f"{image}: :latest is not allowed"
        assert c.get("imagePullPolicy") == "IfNotPresent"
        if deployable.overlay == "prod":
            registry = image.split("/")[0]
            assert "." in registry or ":" in registry, f"{image}: prod images come from a named registry"
            assert re.fullmatch(r"\d+\.\d+\.\d+|sha256:[0-9a-f]{64}|digest", tag), f"{image}: prod pins a release"


def test_recommended_labels(deployable: Build):
    problems = []
    for obj in deployable.objects:
        labels = obj["metadata"].get("labels", {})
        keys = RECOMMENDED_LABELS if obj["kind"] != "Namespace" else RECOMMENDED_LABELS[2:]
        missing = [k for k in keys if k not in labels]
        if obj["kind"] == "NetworkPolicy" and not obj["spec"]["podSelector"]:  # namespace-wide: no one component
            missing = [k for k in missing if k not in ("app.kubernetes.io/name", "app.kubernetes.io/component")]
        if missing:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: missing {missing}")
    for w in deployable.workloads():
        missing = [k for k in RECOMMENDED_LABELS if k not in pod_labels(w)]
        if missing:
            problems.append(f"pods of {w['metadata']['name']}: missing {missing}")
        for key in w["spec"]["selector"]["matchLabels"] if w["kind"] != "Job" else []:
            if key in ("app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
                problems.append(f"{w['metadata']['name']}: {key} in a selector makes upgrades impossible")
    assert not problems, f"{deployable.name}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- wiring


def test_oracle_is_reached_only_through_a_headless_service(any_build: Build):
    oracle = _workload(any_build, "oracle")
    selecting = [s for s in any_build.of_kind("Service") if s["spec"].get("selector")
                 and selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(oracle))]
    assert [s["metadata"]["name"] for s in selecting] == ["oracle-headless"]
    svc = selecting[0]
    assert svc["spec"].get("clusterIP") == "None", "a ClusterIP would pin the coordinator's connection to one pod"
    assert not svc["spec"].get("publishNotReadyAddresses"), "draining workers must leave the DNS answer"
    grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc and grpc[0]["port"] == 50051


def test_services_select_pods_and_their_ports(any_build: Build):
    for svc in any_build.of_kind("Service"):
        matched = [w for w in any_build.workloads()
                   if selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        ports = container_ports(matched[0])
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports or target in ports.values(), f"{svc['metadata']['name']}: no port {target}"
    for w in any_build.workloads():
        if w["kind"] != "Job":
            assert selector_matches(w["spec"]["selector"], pod_labels(w)), f"{w['metadata']['name']}: selector"


def test_run_config_is_valid_and_names_the_services(deployable: Build, tmp_path):
    """run.yaml passes the coordinator's own validation and points at this overlay's services."""
    from ase.data import atomic_numbers

    from coordinator.config import load_config
    from coordinator.cycle import build_structure

    cm, run = _run_config(deployable)
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
    if run.get("tls"):  # load_config checks that the files exist: stand-ins for the Secret's (test_tls_component)
        for key in ("ca_file", "cert_file", "key_file"):
            if run["tls"].get(key):
                run["tls"][key] = str(tmp_path / Path(run["tls"][key]).name)
                Path(run["tls"][key]).write_text("stand-in")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    config = load_config(tmp_path / "run.yaml")
    ns = deployable.namespace
    assert config.oracle.addresses == (f"dns:///oracle-headless.{ns}.svc.cluster.local:50051",), (
        "one dns:/// name of the headless Service in the overlay's namespace (client-side round-robin)")
    assert config.learner.address == "learner:50052"
    sampler_addresses = tuple(getattr(config.sampler, "addresses", ()) or ())
    if sampler_addresses:  # several walkers spread over every sampler pod (client-side round robin)
        assert config.sampler.address is None
        assert sampler_addresses == (f"dns:///sampler-headless.{ns}.svc.cluster.local:50053",), (
            "one dns:/// name of the sampler's headless Service in the overlay's namespace")
        headless = deployable.get("Service", "sampler-headless")
        assert headless and headless["spec"].get("clusterIP") == "None"
        assert not headless["spec"].get("publishNotReadyAddresses"), "draining samplers must leave the DNS answer"
    else:
        assert config.sampler.address == "sampler:50053"
    for name, port in (("learner", 50052), ("sampler", 50053), ("sampler-headless", 50053)):
        svc = deployable.get("Service", name)
        assert svc and any(p["port"] == port for p in svc["spec"]["ports"])
    assert config.metrics_port == 9100 == container_ports(_workload(deployable, "coordinator"))["metrics"]
    sampler = pod_spec(_workload(deployable, "sampler"))["containers"][0]
    assert flag(sampler["args"], "--learner") == "learner:50052"
    learner = pod_spec(_workload(deployable, "learner"))["containers"][0]["args"]
    assert tuple(float(c) for c in flag(learner, "--cutoffs").split(",")) == tuple(config.learner.cutoffs)
    served = {atomic_numbers[e] for e in flag(learner, "--species").split(",")}
    assert {int(z) for z in build_structure(config).numbers} <= served, "the learner must know every species"


def _walker_count(run: dict) -> int:
    walkers = run.get("walkers")
    if not walkers:
        return 1
    return len(walkers["temperatures"]) if isinstance(walkers, dict) else len(walkers)


def _oracle_pool_bounds(build: Build) -> tuple[int, int]:
    """(fewest, most) oracle pods the autoscaler (CPU HPA or KEDA) allows."""
    scaled = build.of_kind("ScaledObject")
    if scaled:
        spec = scaled[0]["spec"]
        return spec.get("minReplicaCount", 0), spec["maxReplicaCount"]
    (hpa,) = [h for h in build.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "oracle"]
    return hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]


def test_concurrency_fits_the_pools(deployable: Build):
    """Walkers, sampler replicas, oracle.max_in_flight and the oracle pool agree (docs/deploy.md, "Scaling:
    walkers and oracle workers"): no idle sampler pods, no more labels out than the largest pool can compute,
    and not so many that the smallest pool answers RESOURCE_EXHAUSTED while it scales up."""
    _, run = _run_config(deployable)
    walkers = _walker_count(run)
    sampler = _workload(deployable, "sampler")
    replicas = sampler["spec"].get("replicas", 1)
    assert replicas <= walkers, f"{replicas} sampler pods for {walkers} walker(s): the extra pods idle"
    if walkers > 1 and replicas > 1:
        assert run["sampler"].get("addresses"), "several sampler pods need sampler.addresses (headless Service)"
    oracle_args = pod_spec(_workload(deployable, "oracle"))["containers"][0]["args"]
    workers, queue_limit = int(flag(oracle_args, "--workers")), int(flag(oracle_args, "--queue-limit"))
    fewest, most = _oracle_pool_bounds(deployable)
    max_in_flight = int(run["oracle"].get("max_in_flight", 0))
    if max_in_flight:
        assert max_in_flight <= most * workers, (
            f"oracle.max_in_flight={max_in_flight} exceeds the largest pool ({most} pods x --workers={workers})")
        assert max_in_flight <= max(fewest, 1) * (workers + queue_limit), (
            f"oracle.max_in_flight={max_in_flight} overflows the smallest pool ({max(fewest, 1)} pod(s) x "
            f"(--workers={workers} + --queue-limit={queue_limit})): RESOURCE_EXHAUSTED while it scales up")
        assert max_in_flight <= walkers, (
            f"oracle.max_in_flight={max_in_flight} > {walkers} walker(s): a parked walker has one frame to label")


def test_coordinator_job(any_build: Build):
    job = _workload(any_build, "coordinator")
    spec = pod_spec(job)
    assert job["kind"] == "Job" and spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    c = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"]
    assert any_build.get("PersistentVolumeClaim", claim), f"run directory PVC {claim} missing"
    config_volume = volumes[mounts["/etc/epicycle"]]["configMap"]["name"]
    cm = any_build.get("ConfigMap", config_volume)
    assert cm is not None, f"ConfigMap {config_volume} not in the build (generated names must be rewritten)"
    run = yaml.safe_load(cm["data"]["run.yaml"])
    structure = run["structure"].get("file")
    assert structure is None or structure in cm["data"], f"structure.file {structure} is not in the ConfigMap"
    run_dir = f"/runs/{run['name']}"
    if "resume" in any_build.components:
        assert c["args"] == ["run", "--resume", run_dir]
    else:
        assert c["args"][:2] == ["run", "/etc/epicycle/run.yaml"] and flag(c["args"], "--run-dir") == run_dir


def test_config_maps_and_claims_resolve(any_build: Build):
    for w in any_build.workloads():
        for v in pod_spec(w).get("volumes", []):
            if "configMap" in v:
                assert any_build.get("ConfigMap", v["configMap"]["name"]), f"{v['configMap']['name']} missing"
            if "persistentVolumeClaim" in v:
                assert any_build.get("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])


def test_learner_is_a_single_stateful_replica(any_build: Build):
    learner = _workload(any_build, "learner")
    assert learner["kind"] == "StatefulSet" and learner["spec"]["replicas"] == 1
    claims = learner["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(learner)["containers"][0]["volumeMounts"]}
    assert claims and mounts[claims[0]["metadata"]["name"]] == "/var/lib/epicycle/model"
    # the coordinator's Checkpoint after every update is refused without a model directory
    args = pod_spec(learner)["containers"][0]["args"]
    assert flag(args, "--model-dir") == "/var/lib/epicycle/model", "checkpoints must go to the model PVC"


def test_oracle_disruption_budget(any_build: Build):
    oracle = _workload(any_build, "oracle")
    pdbs = [p for p in any_build.of_kind("PodDisruptionBudget") if selector_matches(p["spec"]["selector"],
                                                                                     pod_labels(oracle))]
    assert len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1


def test_oracle_autoscaling(any_build: Build):
    hpas = [h for h in any_build.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == "oracle"]
    scaled = any_build.of_kind("ScaledObject")
    oracle = _workload(any_build, "oracle")
    if "keda" in any_build.components:
        assert not hpas, "KEDA owns the oracle's HPA: the base HPA must be removed"
        assert len(scaled) == 1
        so = scaled[0]
        target = so["spec"]["scaleTargetRef"]
        assert (target.get("kind", "Deployment"), target["name"]) == (oracle["kind"], oracle["metadata"]["name"])
        trigger = so["spec"]["triggers"][0]
        query = trigger["metadata"]["query"]
        assert "epicycle_oracle_queued" in query and "epicycle_oracle_in_flight" in query
        # the concurrent coordinator's backlog is the real demand (semantics: test_prometheus_rules.py)
        assert "epicycle_coordinator_labels_queued" in query and "epicycle_coordinator_labels_in_flight" in query
        assert "NAMESPACE" not in query, "a namespace placeholder was not replaced"
        namespaces = set(re.findall(r'namespace="([^"]*)"', query))
        assert namespaces == {any_build.namespace}, f"query selects {namespaces}, pods run in {any_build.namespace}"
        workers = flag(pod_spec(oracle)["containers"][0]["args"], "--workers")
        assert float(trigger["metadata"]["threshold"]) == float(workers), "target demand per pod = --workers"
        assert trigger["metricType"] == "AverageValue"
    else:
        assert len(hpas) == 1 and not scaled
        hpa = hpas[0]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == oracle["kind"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# --------------------------------------------------------------------------- network policy


def _allowed_peers(build: Build, target: dict, port: int) -> list[dict] | None:
    """Ingress peers allowed to reach ``port`` of the target's pods (None: no policy, all allowed)."""
    labels, ports = pod_labels(target), container_ports(target)
    policies = [p for p in build.of_kind("NetworkPolicy")
                if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selector_matches(p["spec"]["podSelector"], labels)]
    if not policies:
        return None
    peers: list[dict] = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            rule_ports = [ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            for p in rule.get("ports", []):
                assert isinstance(p["port"], int) or p["port"] in ports, (
                    f"NetworkPolicy {policy['metadata']['name']}: named port {p['port']!r} not on {role(target)}")
            if rule_ports and port not in rule_ports:
                continue
            peers.extend(rule.get("from", [{"podSelector": {}, "namespaceSelector": {}}]))
    return peers


def test_network_policies(any_build: Build):
    workloads = {role(w): w for w in any_build.workloads()}
    assert set(workloads) == set(ROLES)
    for name, target in workloads.items():
        ports = container_ports(target)
        if "grpc" in ports:
            peers = _allowed_peers(any_build, target, ports["grpc"])
            assert peers is not None, f"no NetworkPolicy selects the {name} pods"
            allowed = {src for src, w in workloads.items()
                       if any("namespaceSelector" not in p and "ipBlock" not in p
                              and selector_matches(p.get("podSelector"), pod_labels(w)) for p in peers)}
            assert allowed == GRPC_CLIENTS[name], f"{name} gRPC reachable from {allowed}"
            assert all("namespaceSelector" not in p and "ipBlock" not in p for p in peers), (
                f"{name} gRPC reachable from outside the namespace: {peers}")
        peers = _allowed_peers(any_build, target, ports["metrics"])
        assert peers is not None
        assert peers and all(set(p) == {"namespaceSelector", "podSelector"} for p in peers), (
            f"{name} metrics must be reachable only from Prometheus pods in another namespace: {peers}")
        assert any(selector_matches(p["namespaceSelector"], PROMETHEUS_NAMESPACE)
                   and selector_matches(p["podSelector"], PROMETHEUS_POD) for p in peers)


#: who may open a connection to whom (a client's egress AND the server's ingress), as (client, server, port name)
CONNECTIONS = {("coordinator", "oracle", "grpc"), ("coordinator", "learner", "grpc"),
               ("coordinator", "sampler", "grpc"), ("sampler", "learner", "grpc")}
KUBE_DNS = ({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _peer_matches(peer: dict, labels: dict, ns_labels: dict, policy_ns_labels: dict) -> bool:
    """NetworkPolicyPeer semantics: podSelector alone means the policy's own namespace."""
    assert "ipBlock" not in peer, f"ipBlock peers are not expected here: {peer}"
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], ns_labels):
            return False
    elif ns_labels != policy_ns_labels:
        return False
    return selector_matches(peer.get("podSelector"), labels)


def _port_matches(rule_port: dict, port: int, protocol: str, named: dict[str, int]) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    value = rule_port.get("port")
    if value is None:
        return True
    number = named.get(value) if isinstance(value, str) else value
    return number is not None and number <= port <= rule_port.get("endPort", number)


def _egress_allowed(build: Build, client: dict, labels: dict, ns_labels: dict, port: int,
                    protocol: str = "TCP", named: dict[str, int] | None = None) -> bool:
    """May the client's pods open ``port``/``protocol`` to a pod with ``labels`` in a namespace with
    ``ns_labels``?  Only the client's egress policies (the server's ingress is checked separately)."""
    own_ns = {"kubernetes.io/metadata.name": build.namespace or "default"}
    policies = [p for p in build.of_kind("NetworkPolicy") if "Egress" in _policy_types(p)
                and selector_matches(p["spec"]["podSelector"], pod_labels(client))]
    if not policies:
        return True  # not isolated for egress
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            if rule.get("ports") and not any(_port_matches(p, port, protocol, named or {}) for p in rule["ports"]):
                continue
            if not rule.get("to") or any(_peer_matches(peer, labels, ns_labels, own_ns) for peer in rule["to"]):
                return True
    return False


def _ingress_allowed(build: Build, client: dict, server: dict, port: int) -> bool:
    peers = _allowed_peers(build, server, port)
    return peers is None or any("namespaceSelector" not in p and "ipBlock" not in p
                                and selector_matches(p.get("podSelector"), pod_labels(client)) for p in peers)


def test_every_pod_is_isolated_for_egress(any_build: Build):
    for w in any_build.workloads():
        egress = [p["metadata"]["name"] for p in any_build.of_kind("NetworkPolicy") if "Egress" in _policy_types(p)
                  and selector_matches(p["spec"]["podSelector"], pod_labels(w))]
        assert egress, f"{role(w)}: no egress NetworkPolicy selects its pods (they could connect anywhere)"
    for policy in any_build.of_kind("NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            where = f"NetworkPolicy {policy['metadata']['name']}"
            assert rule.get("to"), f"{where}: an egress rule without `to` allows every destination"
            assert rule.get("ports"), f"{where}: an egress rule without `ports` allows every port"
            for peer in rule["to"]:
                assert "ipBlock" not in peer, f"{where}: no ipBlock (no pod connects out of the cluster)"
                assert peer.get("podSelector"), f"{where}: egress to whole namespaces: {peer}"


def test_connections_between_pods(any_build: Build):
    """Client egress AND server ingress, pod by pod and port by port: exactly CONNECTIONS."""
    workloads = {role(w): w for w in any_build.workloads()}
    ns = {"kubernetes.io/metadata.name": any_build.namespace or "default"}
    allowed = set()
    for src, client in workloads.items():
        for dst, server in workloads.items():
            for name, port in container_ports(server).items():
                out = _egress_allowed(any_build, client, pod_labels(server), ns, port,
                                      named=container_ports(server))
                if out and _ingress_allowed(any_build, client, server, port):
                    allowed.add((src, dst, name))
    assert allowed == CONNECTIONS, (f"{any_build.name}: unexpected {sorted(allowed - CONNECTIONS)}, "
                                    f"missing {sorted(CONNECTIONS - allowed)}")
    # the one issue #12 names: a sampler cannot ask an oracle for labels (it would run pw.x for it)
    oracle_port = container_ports(workloads["oracle"])["grpc"]
    assert not _egress_allowed(any_build, workloads["sampler"], pod_labels(workloads["oracle"]), ns, oracle_port), (
        f"{any_build.name}: the sampler's egress allows the oracle's gRPC port (the oracle's ingress alone guards it)")


def test_dns_and_nothing_outside(any_build: Build):
    dns_labels, dns_ns = KUBE_DNS
    elsewhere = {"kubernetes.io/metadata.name": "somebody-else"}
    for name, w in ((role(w), w) for w in any_build.workloads()):
        for protocol in ("UDP", "TCP"):
            assert _egress_allowed(any_build, w, dns_labels, dns_ns, 53, protocol), f"{name}: no DNS over {protocol}"
        assert not _egress_allowed(any_build, w, dns_labels, dns_ns, 443), f"{name}: kube-dns beyond port 53"
        assert not _egress_allowed(any_build, w, {"app": "kube-apiserver"}, dns_ns, 53), f"{name}: all of kube-system"
        for port in (53, 443, 50051, 50052, 50053, 9100):
            assert not _egress_allowed(any_build, w, {"app.kubernetes.io/name": "epicycle", "app.kubernetes.io/"
                                                      "component": "oracle"}, elsewhere, port), (
                f"{name}: reaches port {port} in another namespace")


# --------------------------------------------------------------------------- monitoring component


def test_monitoring_component(any_build: Build):
    if "monitoring" not in any_build.components:
        assert not any_build.of_kind("ServiceMonitor") and not any_build.of_kind("PrometheusRule")
        return
    (monitor,) = any_build.of_kind("ServiceMonitor")
    scraped = {s["metadata"]["name"] for s in any_build.of_kind("Service")
               if selector_matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))}
    assert scraped == {"oracle-headless", "learner", "sampler", "coordinator-metrics"}
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for name in scraped:
        assert endpoint_ports <= {p["name"] for p in any_build.get("Service", name)["spec"]["ports"]}
    (rule,) = any_build.of_kind("PrometheusRule")
    assert rule["spec"] == yaml.safe_load((K8S / "monitoring" / "rules.yaml").read_text())
    (dash,) = [cm for cm in any_build.of_kind("ConfigMap") if cm["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["epicycle.json"]) == json.loads(
        (K8S / "monitoring" / "dashboards" / "epicycle.json").read_text())


def test_prod_overlay_is_what_the_docs_say():
    prod = get_build("prod")
    assert prod.namespace == "epicycle"
    oracle = pod_spec(_workload(prod, "oracle"))["containers"][0]
    assert flag(oracle["args"], "--backend") == "qe" and "epicycle-oracle" in oracle["image"]
    assert "monitoring" in prod.components
    dev = get_build("dev")
    assert dev.namespace == "epicycle-dev"
    assert flag(pod_spec(_workload(dev, "oracle"))["containers"][0]["args"], "--backend") == "emt"


def test_docs_mention_every_component():
    text = (REPO / "docs" / "deploy.md").read_text()
    from .manifests import COMPONENTS

    for c in COMPONENTS:
        assert f"components/{c}" in text, f"docs/deploy.md does not explain k8s/components/{c}"


def test_oracle_backend_settings_fit_the_timeouts(deployable: Build):
    """backend wall time x attempts <= coordinator's label timeout <= oracle --grace."""
    oracle = pod_spec(_workload(deployable, "oracle"))
    args = oracle["containers"][0]["args"]
    settings_file = Path(flag(args, "--settings-file"))
    volumes = {v["name"]: v for v in oracle["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in oracle["containers"][0]["volumeMounts"]}
    cm = deployable.get("ConfigMap", volumes[mounts[str(settings_file.parent)]]["configMap"]["name"])
    settings = yaml.safe_load(cm["data"][settings_file.name]) or {}
    _, run = _run_config(deployable)
    label_timeout = float(run["oracle"]["timeout_s"])
    backend = flag(args, "--backend")
    if backend == "qe":
        from oracle_service.backends.qe import DEFAULT_RETRIES

        attempts = 1 + len(settings.get("retries", DEFAULT_RETRIES))
        worst = attempts * float(settings["timeout"])
        assert worst <= label_timeout, (f"qe: {attempts} attempts x timeout {settings['timeout']} s = {worst} s "
                                        f"exceeds the coordinator's oracle.timeout_s={label_timeout}")
        containerfile = (K8S / "images" / "Containerfile.oracle").read_text()
        assert f"--out {settings['pseudo_dir']}" in containerfile, "pseudo_dir must be where the image generated them"
        assert settings.get("generate_pseudopotentials") is False, "the image's filesystem is read-only"
        assert "epicycle-oracle" in oracle["containers"][0]["image"]
    else:
        assert backend == "emt" and settings == {}
