from __future__ import annotations

import pytest

from .manifests import Build, build, build_plan

_CACHE: dict[str, Build] = {}


def get_build(name: str) -> Build:
    """Each kustomization is built once per test session."""
    if name not in _CACHE:
        plan = {n: (o, e) for n, o, e in build_plan()}
        overlay, extra = plan[name]
        _CACHE[name] = build(name, overlay, extra)
    return _CACHE[name]


@pytest.fixture(params=[n for n, _, _ in build_plan()])
def any_build(request) -> Build:
    """Every build: the base, each overlay, each overlay with every subset of optional components."""
    return get_build(request.param)


@pytest.fixture(params=[n for n, o, _ in build_plan() if o is not None])
def deployable(request) -> Build:
    """Every overlay build (the base alone has no namespace and untagged images)."""
    return get_build(request.param)
