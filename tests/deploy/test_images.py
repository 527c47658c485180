"""k8s/images/Containerfile*: hadolint, and the structure the pods rely on.

Base images cannot be pulled in CI, so the images are not built here; the
build is documented in docs/deploy.md.  These checks pin what the manifests
assume: uid 10001 (runAsUser), `epicycle` as the entrypoint (args start with
`serve ...`/`run ...`), no compiler in the runtime stage, the pseudopotential
directory the QE settings point at.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from .tools import K8S, REPO, require, run

IMAGES = K8S / "images"
FILES = ("Containerfile", "Containerfile.oracle")
COMPILERS = ("gcc", "g++", "build-essential", "-dev ", "-dev\n", "clang", "gfortran")


def stages(path: Path) -> list[tuple[str, list[str]]]:
    """``[(FROM line, [instructions...]), ...]`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return out


def test_hadolint():
    run([require("hadolint"), "--config", str(IMAGES / ".hadolint.yaml"), *(str(IMAGES / f) for f in FILES)])


@pytest.mark.parametrize("name", FILES)
def test_multi_stage_non_root_runtime(name):
    text = (IMAGES / name).read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"docker\.io/library/python:3\.11-slim-bookworm", base.group(1)), (
        "pin the Python base image by tag (python:3.11-slim on Debian bookworm)")
    st = stages(IMAGES / name)
    assert [s[0] for s in st] == ["FROM ${PYTHON_IMAGE} AS builder", "FROM ${PYTHON_IMAGE} AS runtime"]
    builder, runtime = st[0][1], st[1][1]
    assert any("gcc" in i for i in builder), "the builder stage compiles wheels"
    assert any("pip wheel" in i for i in builder)
    for instruction in runtime:
        if instruction.startswith("RUN") and "apt-get install" in instruction:
            for c in COMPILERS:
                assert c not in instruction + "\n", f"runtime stage installs a compiler/header package: {c.strip()}"
    assert "COPY --from=builder /opt/epicycle /opt/epicycle" in runtime
    assert "USER 10001:10001" in runtime, "runAsUser 10001 in the pods must be the image's user"
    assert runtime.index("USER 10001:10001") > max(i for i, s in enumerate(runtime) if s.startswith(("RUN", "COPY")))
    assert 'ENTRYPOINT ["epicycle"]' in runtime
    assert any("--uid 10001" in i for i in runtime)
    env = " ".join(i for i in runtime if i.startswith("ENV"))
    for var in ("HOME=/tmp", "NUMBA_CACHE_DIR=/tmp", "MPLCONFIGDIR=/tmp", "PYTHONDONTWRITEBYTECODE=1"):
        assert var in env, f"{var}: the root filesystem is read-only in the pods"


@pytest.mark.parametrize("name", FILES)
def test_copies_every_project_package(name):
    """The wheel is built from the packages pyproject.toml includes: all must be in the context."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (IMAGES / name).read_text(), re.M))
    assert packages <= copied, f"not copied into the build: {packages - copied}"
    # the readme and the license-files named in pyproject.toml are read by the wheel build
    assert "COPY pyproject.toml README.md LICENSE ./" in (IMAGES / name).read_text()
    assert project["project"]["license-files"] == ["LICENSE"]
    for source in re.findall(r"^COPY (?!--from)(\S+) ", (IMAGES / name).read_text(), re.M):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_oracle_image_has_the_dft_codes():
    st = stages(IMAGES / "Containerfile.oracle")
    builder, runtime = " ".join(st[0][1]), " ".join(st[1][1])
    assert "quantum-espresso" in runtime, "pw.x must be in the runtime image"
    assert "cp2k cp2k-data" in runtime, "cp2k and its basis sets/pseudopotentials must be in the runtime image"
    for pkg in ("gpaw", "gpaw-data", "tblite"):
        assert f'"{pkg}>=' in builder
    setup = (REPO / "oracle_service" / "setup" / "install_python_packages.sh").read_text()
    for spec in re.findall(r'"((?:gpaw|gpaw-data|tblite)[<>=!][^"]+)"', builder):
        assert f'"{spec}"' in setup, f"{spec}: keep the version range in step with oracle_service/setup/"
    assert "GPAW_CONFIG=/tmp/gpaw_siteconfig.py" in builder
    assert "python -m oracle_service.pseudo generate --out /opt/epicycle/pseudo" in builder


@pytest.mark.parametrize("name", FILES)
def test_dockerignore_keeps_the_context_small(name):
    ignore = (IMAGES / f"{name}.dockerignore").read_text().split()
    for pattern in (".venv", ".git", "out", "runs"):
        assert pattern in ignore or f"{pattern}/" in ignore
