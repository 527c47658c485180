#!/usr/bin/env bash
# Python packages of the real oracles, installed into the given interpreter's environment.
#
#   gpaw       built from its sdist against Debian's libxc/openblas/fftw (serial,
#              see gpaw_siteconfig.py); needs install_system_packages.sh first
#   gpaw-data  the PAW setups (found through the gpaw_data package; no download)
#   tblite     GFN1/GFN2-xTB (binary wheel)
#
# Usage: bash oracle_service/setup/install_python_packages.sh [PYTHON]   (default: .venv/bin/python)
# Idempotent: pip skips what is already installed at a matching version.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${1:-.venv/bin/python}"

# Tested: gpaw 26.7.0, gpaw-data 1.2.1, tblite 0.8.0.  gpaw 26.x requires ase>=3.29, so with the
# project's ase<3.30 the environment ends up on ase 3.29.x; GPAW 27 may need a newer ASE: pinned <27.
REQUIREMENTS=(
    "gpaw>=26.7,<27"
    "gpaw-data>=1.2,<2"
    "tblite>=0.8,<0.9"
)

if "$PYTHON" - "${REQUIREMENTS[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if version(req.name) not in req.specifier:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
try:
    import _gpaw  # noqa: F401  (GPAW's C extension: a broken build installs without it)
except ImportError:
    sys.exit(1)
PY
then
    echo "install_python_packages: already installed (${REQUIREMENTS[*]})"
    exit 0
fi

export GPAW_CONFIG="$HERE/gpaw_siteconfig.py"
# GPAW_BUILD_JOBS>1 switches GPAW to an experimental Makefile build whose wheel
# lacks the _gpaw extension: keep the plain setuptools build.
unset GPAW_BUILD_JOBS
"$PYTHON" -m pip install --quiet "${REQUIREMENTS[@]}"
"$PYTHON" -c "import _gpaw, gpaw, tblite.interface; from importlib.metadata import version as v; print('install_python_packages: gpaw', v('gpaw'), 'gpaw-data', v('gpaw-data'), 'tblite', v('tblite'))"
