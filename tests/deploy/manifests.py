"""Build the kustomizations under k8s/ and helpers to read the objects they produce."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .tools import K8S, require, run

OVERLAYS = ("dev", "prod")
#: optional components; each overlay is also built with every subset of those it lacks
COMPONENTS = ("keda", "monitoring", "oracle-qe", "resume", "tls", "tls-cert-manager")
#: components that only make sense with another (built only together with it)
REQUIRES = {"tls-cert-manager": "tls"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


@dataclass
class Build:
    name: str                       # e.g. "dev", "prod+keda+resume", "base"
    overlay: str | None             # None for the base
    components: tuple[str, ...]     # all components in effect (the overlay's own + extra)
    objects: list[dict] = field(default_factory=list)

    @property
    def namespace(self) -> str | None:
        names = [o["metadata"]["name"] for o in self.objects if o["kind"] == "Namespace"]
        return names[0] if names else None

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict | None:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        return None

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]


def overlay_components(overlay: str) -> tuple[str, ...]:
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    return tuple(Path(c).name for c in kustomization.get("components", []))


def build_plan() -> list[tuple[str, str | None, tuple[str, ...]]]:
    """``(name, overlay, extra_components)`` for the base, every overlay and every component subset."""
    plan: list[tuple[str, str | None, tuple[str, ...]]] = [("base", None, ())]
    for overlay in OVERLAYS:
        own = overlay_components(overlay)
        optional = [c for c in COMPONENTS if c not in own]
        for r in range(len(optional) + 1):
            for extra in itertools.combinations(optional, r):
                present = set(own) | set(extra)
                if all(REQUIRES.get(c, c) in present for c in present):
                    plan.append(("+".join((overlay, *extra)), overlay, extra))
    return plan


def kustomize(directory: Path) -> str:
    kubectl = require("kubectl")
    return run([kubectl, "kustomize", str(directory)]).stdout


def build(name: str, overlay: str | None, extra: tuple[str, ...]) -> Build:
    """Build the base, an overlay, or an overlay with ``extra`` components added to its
    ``components:`` list exactly as a user would (so its namespace, labels, images
    and patches apply to what the components add)."""
    if overlay is None:
        text = kustomize(K8S / "base")
    elif not extra:
        text = kustomize(K8S / "overlays" / overlay)
    else:
        source = K8S / "overlays" / overlay
        with tempfile.TemporaryDirectory(prefix="epicycle-kustomize-") as tmp:
            copy = Path(tmp) / overlay
            shutil.copytree(source, copy)
            doc = yaml.safe_load((copy / "kustomization.yaml").read_text())

            def moved(path: str) -> str:  # kustomize accepts only relative paths to kustomizations
                target = (source / path).resolve()
                return os.path.relpath(target, copy) if target.is_dir() else path

            doc["resources"] = [moved(r) for r in doc.get("resources", [])]
            doc["components"] = [moved(c) for c in doc.get("components", [])] + [
                os.path.relpath(K8S / "components" / c, copy) for c in extra]
            (copy / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            text = kustomize(copy)
    objects = [o for o in yaml.safe_load_all(text) if o]
    components = (overlay_components(overlay) if overlay else ()) + extra
    return Build(name=name, overlay=overlay, components=components, objects=objects)


# --------------------------------------------------------------------------- pods


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def role(workload: dict) -> str:
    return pod_labels(workload)["app.kubernetes.io/component"]


def flag(args: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def command_line(container: dict) -> str:
    return shlex.join(container.get("command", []) + container.get("args", []))


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (an empty selector matches everything)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_ports(workload: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out
