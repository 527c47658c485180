#!/usr/bin/env bash
# Smoke-build an Epicycle image where no container registry is reachable.
#
# python:3.11-slim cannot be pulled here, so a stand-in base is made locally:
# a minimal Debian bookworm root filesystem (debootstrap, from Debian's
# package mirror) with Debian's python3.11, its headers (python:3.11-slim has
# them too), venv and `python` on PATH,
# imported as a local image (trusting this machine's CA bundle, so that pip
# works behind a TLS-intercepting proxy).  Then k8s/images/Containerfile is built with
# buildah (chroot isolation: works inside an unprivileged container, where
# OCI runtimes cannot set rlimits) and the result is checked: it runs as uid
# 10001, `epicycle` is the entrypoint and every service module imports.
#
# Needs root and: apt-get install -y --no-install-recommends buildah podman debootstrap
# Usage: bash k8s/images/smoke_build.sh [k8s/images/Containerfile.oracle]
#        (2 cores: ~4.5 min service image, ~7 min oracle image; network: Debian + PyPI)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FILE="${1:-k8s/images/Containerfile}"
BASE=localhost/epicycle-smoke-base:bookworm
TAG=localhost/epicycle-smoke:$(basename "$FILE" | tr '[:upper:].' '[:lower:]-')
for tool in buildah podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "smoke_build: $tool missing: apt-get install -y --no-install-recommends buildah podman debootstrap" >&2; exit 2; }
done

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "smoke_build: debootstrap bookworm -> $BASE"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates \
        bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    # Trust what this machine trusts (e.g. a TLS-intercepting proxy's CA), for
    # apt and for pip, which otherwise uses its own certifi bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$work/rootfs/etc/pip.conf"
    tar -C "$work/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

echo "smoke_build: building $FILE -> $TAG"
buildah build --isolation chroot --network host --layers \
    --build-arg PYTHON_IMAGE="$BASE" \
    --ignorefile "$REPO/k8s/images/Containerfile.dockerignore" \
    -f "$REPO/$FILE" -t "$TAG" "$REPO"

echo "smoke_build: checking $TAG"
ctr="$(buildah from "$TAG")"
trap 'buildah rm "$ctr" >/dev/null' EXIT
[ "$(buildah inspect --format '{{.OCIv1.Config.User}}' "$TAG")" = "10001:10001" ]
buildah inspect --format '{{.OCIv1.Config.Entrypoint}}' "$TAG" | grep -q '\[epicycle\]'
uid="$(buildah run --isolation chroot "$ctr" -- id -u)"
[ "$uid" = "10001" ] || { echo "smoke_build: runs as uid $uid, expected 10001" >&2; exit 1; }
buildah run --isolation chroot "$ctr" -- epicycle --help >/dev/null
buildah run --isolation chroot "$ctr" -- epicycle serve oracle --list-backends
buildah run --isolation chroot "$ctr" -- python -c \
    "import oracle_service.server, learner_service.server, sampler_service.server, coordinator.cli; print('imports ok')"
if buildah run --isolation chroot "$ctr" -- sh -c 'command -v gcc cc g++' >/dev/null 2>&1; then
    echo "smoke_build: a compiler is in the runtime image" >&2; exit 1
fi
echo "smoke_build: OK ($TAG, $(buildah inspect --format '{{.FromImageID}}' "$TAG" | cut -c1-12))"
