#!/usr/bin/env bash
# Build and run tuneserve's containers on a machine with no image registry (run by hand, as root).
#
#   bash bench/container.sh            # setup + full image + serve-only image, each: build, run, check
#   bash bench/container.sh setup      # only: Docker daemon and the Debian bookworm base image
#   STEPS="full" bash bench/container.sh    # one image only ("full" or "serve")
#
# setup: starts dockerd (vfs storage, no iptables/bridge) when none answers, and builds the base
# image `tuneserve-base:bookworm` with debootstrap from the Debian mirror apt already uses, when it
# is missing (python3.11, pip, the host's CA bundle; what BentoML's Dockerfile template needs).
# Then, per image: `tuneserve build` (+ `--serve-only`) with `--base-image` → `bentoml containerize`
# (BuildKit, host network) → `docker run` with one volume for the model store and the job database
# → /readyz → /classify → (full image) a small fine-tune job inside → `docker rm` → `docker run`
# on the same volume → the model and the job history are still there. Prints image size, build
# time and time from `docker run` to ready. Needs root, ~25 GB of disk per image with vfs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
PY=${PY:-$HERE/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-tuneserve-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK:-/tmp/tuneserve-container}
STEPS=${STEPS:-full serve}
PORT=${PORT:-3900}
# Debian's docker client (20.10) builds BentoML's Dockerfile with the daemon's own BuildKit;
# a newer client first on PATH would need the buildx plugin.
export PATH=/usr/bin:$PATH DOCKER_BUILDKIT=1

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

start_dockerd() {
    if docker info >/dev/null 2>&1; then return; fi
    log "starting dockerd (vfs storage driver; log in $WORK/dockerd.log)"
    mkdir -p "$WORK"
    nohup dockerd --storage-driver vfs --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
    log "dockerd did not start; see $WORK/dockerd.log"; exit 1
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    local root="$WORK/rootfs" started
    started=$(now)
    log "debootstrap bookworm → $BASE_IMAGE"
    rm -rf "$root"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1,passwd \
        bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1
    # The registry is reached through the host's CA: copy its bundle in, for pip (Debian's reads
    # the system bundle) and uv (UV_NATIVE_TLS + SSL_CERT_FILE).
    cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    tar -C "$root" -c . | docker import \
        -c 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' -c 'ENV UV_NATIVE_TLS=1' \
        -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    log "base image $BASE_IMAGE: $(docker run --rm --network none "$BASE_IMAGE" python --version) in $(elapsed "$started") s"
}

setup() { start_dockerd; build_base_image; }

if [ "${1:-all}" = setup ]; then setup; exit 0; fi
