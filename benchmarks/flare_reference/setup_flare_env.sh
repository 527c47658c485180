#!/usr/bin/env bash
# Create the opt-in FLARE 0.2.4 reference environment (Python 3.9, outside the repo tree
# that is committed). Usage:
#   benchmarks/flare_reference/setup_flare_env.sh [VENV_DIR]
# VENV_DIR defaults to $FLARE_REF_VENV or <repo>/.flare-ref/venv (git-ignored).
# PYTHON39 overrides the interpreter used to create the venv.
# At the end it prints the venv's python path; export it as EPICYCLE_FLARE_PYTHON.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${FLARE_REF_VENV:-$repo/.flare-ref/venv}}"

if [[ -z "${PYTHON39:-}" ]]; then
    # (a pyenv shim named python3.9 may exist but refuse to run, so each candidate is tried)
    for cand in python3.9 "$HOME"/.pyenv/versions/3.9*/bin/python /root/.pyenv/versions/3.9*/bin/python; do
        if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 9)' >/dev/null 2>&1; then
            PYTHON39="$cand"; break
        fi
    done
fi
if [[ -z "${PYTHON39:-}" ]]; then
    echo "error: no Python 3.9 interpreter found; set PYTHON39=/path/to/python3.9" >&2
    exit 1
fi
"$PYTHON39" -c 'import sys; assert sys.version_info[:2] == (3, 9), sys.version' || {
    echo "error: $PYTHON39 is not Python 3.9 (mir-flare 0.2.4 needs numpy<=1.20.3, which has no wheels for newer Pythons)" >&2
    exit 1
}

if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON39" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade "pip<25" "setuptools<70" wheel

# Pins: numpy 1.20.3 is the newest numpy mir-flare 0.2.4 accepts; numba 0.53.1/llvmlite 0.36
# is the numba line built against numpy 1.20; scipy 1.7.3 and ase 3.22.1 / matplotlib 3.5.3
# are the last releases with cp39 wheels that still accept numpy 1.20. --only-binary keeps it
# to PyPI wheels (no compilers needed).
# The transitive pins (matplotlib's dependencies) are the set that resolved and worked here
# on 2026-11-21; they only keep the environment reproducible.
"$py" -m pip install --quiet --only-binary=:all: \
    "numpy==1.20.3" "llvmlite==0.36.0" "numba==0.53.1" "scipy==1.7.3" \
    "matplotlib==3.5.3" "ase==3.22.1" \
    "cycler==0.12.1" "fonttools==4.60.2" "kiwisolver==1.4.7" "pillow==11.3.0" \
    "pyparsing==3.3.3" "python-dateutil==3.0.0" "packaging==26.3" "six==1.17.0"
# mir-flare's declared extras (nbsphinx, IPython, pytest, memory-profiler, nptyping) are for
# its docs/tests only; the classic GP imports numpy, scipy, numba and ase.
"$py" -m pip install --quiet --no-deps "mir-flare==0.2.4"

"$py" - <<'PY'
import numpy, numba, scipy, ase
import flare.gp, flare.kernels.mc_simple, flare.env, flare.struc, flare.predict  # noqa: F401
from importlib.metadata import version
print("mir-flare", version("mir-flare"), "numpy", numpy.__version__, "numba", numba.__version__,
      "scipy", scipy.__version__, "ase", ase.__version__)
PY
echo "FLARE reference python: $py"
echo "export EPICYCLE_FLARE_PYTHON=$py"
