#!/usr/bin/env bash
# Debian packages the real oracles need (run as root; idempotent).
#
#   quantum-espresso   pw.x (the QE oracle) and ld1.x (generates its pseudopotentials)
#   cp2k, cp2k-data    cp2k.psmp (the CP2K oracle) and its MOLOPT basis sets and GTH pseudopotentials
#   libxc-dev          exchange-correlation library GPAW is built against
#   libopenblas-dev    BLAS/LAPACK for GPAW's C extension
#   libfftw3-dev       FFTs for GPAW plane-wave mode
#   build-essential, python3-dev, pkg-config
#                      compiler toolchain for building GPAW's C extension from its sdist
#
# Packages already installed are skipped, so a second run does no network access.
# Usage: bash oracle_service/setup/install_system_packages.sh
set -euo pipefail

PACKAGES=(quantum-espresso cp2k cp2k-data libxc-dev libopenblas-dev libfftw3-dev build-essential python3-dev pkg-config)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system_packages: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_system_packages: need root to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install_system_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
