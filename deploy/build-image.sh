#!/usr/bin/env bash
# Build the kubevirt-vnc-proxy container image from deploy/Dockerfile with
# whichever builder is available: docker (with a reachable daemon), podman,
# or buildah. The build context is the repository root.
#
#   deploy/build-image.sh                      # tags kubevirt-vnc-proxy:latest
#   IMAGE=registry.example.com/kubevirt-vnc-proxy:0.1.0 deploy/build-image.sh
#   BUILDER=podman deploy/build-image.sh --pull=always   # extra args go to the builder
#
# The base images (docker.io/library/rust, gcr.io/distroless/cc-debian12)
# are pulled from their registries, so the machine needs to reach them.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-kubevirt-vnc-proxy:latest}
builder=${BUILDER:-}

if [ -z "$builder" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    builder=docker
  elif command -v podman >/dev/null 2>&1; then
    builder=podman
  elif command -v buildah >/dev/null 2>&1; then
    builder=buildah
  fi
fi

case "$builder" in
  docker)  set -x; exec docker build -f deploy/Dockerfile -t "$image" "$@" . ;;
  podman)  set -x; exec podman build -f deploy/Dockerfile -t "$image" "$@" . ;;
  buildah) set -x; exec buildah bud -f deploy/Dockerfile -t "$image" "$@" . ;;
  "")
    echo "build-image.sh: no container builder found: need docker (with a running daemon), podman or buildah" >&2
    if command -v docker >/dev/null 2>&1; then
      echo "build-image.sh: (the docker client is installed but cannot reach a daemon)" >&2
    fi
    echo "build-image.sh: on Debian/Ubuntu: apt-get install podman (or buildah)" >&2
    exit 1 ;;
  *)
    echo "build-image.sh: unknown BUILDER=$builder (use docker, podman or buildah)" >&2
    exit 1 ;;
esac
