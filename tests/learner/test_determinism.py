"""Bit-for-bit reproducibility of the learner's numbers (issue 12, item 6).

The same model gave forces and σ that differed in the last bits depending on whether numba's
cache was cold or warm: a fastmath kernel called from another numba function exists twice
(its own compiled copy, and a weak copy linked into and re-optimised with the caller), and
which copy ran depended on whether the caller had been compiled in this process or loaded
from the cache.  The on-the-fly loop turned those bits into different oracle decisions.

* ``test_cold_and_warm_cache_agree`` runs one small prediction in a process with an empty
  ``NUMBA_CACHE_DIR`` and again in one with the cache it left, and compares bytes.
* ``test_fastmath_kernels_are_entry_points_or_inlined`` checks the rule that prevents it
  (see the comment at ``_FM`` in learner_service/kernels/common.py) without compiling anything,
  across the modules of the kernels package (an entry point inlines kernels of other files).
* ``test_kernel_cache_stamp_covers_the_whole_package``: numba keys a cached function on its
  own file only; the kernels package adds a digest of all its sources to the key
  (learner_service/kernels/_numba_cache.py), so an edit of an inlined kernel in one file
  cannot leave a stale compiled entry point of another file in the cache.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODULES = sorted((ROOT / "learner_service" / "kernels").glob("*.py"))
NUMBA_MODULES = [*KERNEL_MODULES, ROOT / "learner_service" / "environment.py"]

# a 2-species model small enough that the run is all compilation (with the code before the
# fix, every one of these digests differed between the two runs): a force-only training set
# (force_covariance, with the length-scale gradient), the fast prediction path
# (prediction_covariance) with one and two kernel threads; prints a SHA-256 of the bytes of
# each result.  (The general path, kernel_blocks/assemble, is left to the static check below:
# compiling it cold would double the time of this test.)
CHILD = textwrap.dedent(
    """
    import hashlib, json
    import numpy as np
    from ase import Atoms
    from learner_service.gp import GaussianProcess

    def cell(seed):
        rng = np.random.default_rng(seed)
        c = np.array([[3.9, 0.0, 0.0], [0.4, 4.0, 0.0], [-0.3, 0.5, 4.1]])
        pos = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) @ c
        pos = pos + rng.normal(0, 0.12, pos.shape)
        return Atoms([13, 29, 13, 29], positions=pos, cell=c, pbc=True)

    def digest(*arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()

    gp = GaussianProcess([13, 29], (4.5, 3.5), {"sig2": 0.4, "ls2": 0.9, "sig3": 0.07, "ls3": 0.8, "noise": 0.02})
    for seed in (1, 2):
        rng = np.random.default_rng(seed + 10)
        gp.add_structure(cell(seed), forces=rng.normal(0, 0.5, (4, 3)))
    gp.train()
    lml, grad = gp.log_likelihood(gradient=True)
    test = cell(7)
    out = {"lml": digest([lml], np.asarray(grad, dtype=np.float64)), "alpha": digest(gp.alpha)}
    for threads in (1, 2):
        gp.predict_threads = threads
        p = gp.predict(test)
        out[f"predict_{threads}"] = digest(p.forces, p.force_var, [p.energy])
    print(json.dumps(out))
    """
)


def _run_child(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cold_and_warm_cache_agree(tmp_path):
    cache = tmp_path / "numba-cache"
    cold = _run_child(cache)
    assert any(cache.rglob("*.nbi")), "the first run left no numba cache: the warm run would test nothing"
    warm = _run_child(cache)
    assert warm == cold
    # the kernel threads split the test atoms; every atom is computed whole by one thread
    assert cold["predict_1"] == cold["predict_2"]


def _njit_functions(tree: ast.Module) -> dict[str, dict]:
    """name -> decorator keywords (as source text) of every @njit(...) function of a module."""
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            call = dec if isinstance(dec, ast.Call) else None
            name = ast.unparse(call.func if call else dec)
            if name in ("njit", "numba.njit", "jit", "numba.jit"):
                kw = {k.arg: ast.unparse(k.value) for k in (call.keywords if call else [])}
                found[node.name] = {"kw": kw, "node": node}
    return found


def _package_functions(path: Path) -> dict[str, dict]:
    """The njit functions a module can call: its own and, for a module of the kernels
    package, those of every module of the package (they import each other's kernels)."""
    if path not in KERNEL_MODULES:
        return _njit_functions(ast.parse(path.read_text()))
    funcs = {}
    for other in KERNEL_MODULES:
        for name, info in _njit_functions(ast.parse(other.read_text())).items():
            assert name not in funcs, f"numba function {name} defined twice in the kernels package"
            funcs[name] = info
    return funcs


def test_kernel_modules_are_found():
    names = {p.name for p in KERNEL_MODULES}
    assert {"common.py", "twobody.py", "threebody.py", "assemble.py", "covariance.py"} <= names


@pytest.mark.parametrize("path", [p for p in NUMBA_MODULES if _njit_functions(ast.parse(p.read_text()))],
                         ids=lambda p: p.name)
def test_fastmath_kernels_are_entry_points_or_inlined(path):
    own = _njit_functions(ast.parse(path.read_text()))
    funcs = _package_functions(path)
    problems = []
    for name, info in own.items():
        kw = info["kw"]
        if kw.get("parallel", "False") != "False":
            problems.append(f"{name}: parallel=True (prange reductions depend on the thread count)")
        for call in ast.walk(info["node"]):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                continue
            callee = funcs.get(call.func.id)
            if callee is None or call.func.id == name:
                continue
            fast = callee["kw"].get("fastmath", "False") not in ("False", "None")
            inlined = callee["kw"].get("inline") in ("'always'", '"always"')
            if fast and not inlined:
                problems.append(f"{name} calls fastmath function {call.func.id}, which is not inline='always'")
    assert not problems, "\n".join(problems)


def test_kernel_cache_stamp_covers_the_whole_package():
    import hashlib

    from learner_service.kernels import _numba_cache, covariance, packing

    expected = hashlib.sha256()
    for path in KERNEL_MODULES:
        expected.update(path.name.encode() + b"\0" + path.read_bytes())
    assert _numba_cache.package_digest() == expected.hexdigest()
    for dispatcher in (covariance.prediction_covariance, covariance.force_covariance, packing._build_fast_pack):
        locator = dispatcher._cache._impl.locator
        assert isinstance(locator, _numba_cache.PackageSourceLocator), type(locator)
        stamp = dispatcher._cache._cache_file._source_stamp
        assert stamp[1] == expected.hexdigest()
