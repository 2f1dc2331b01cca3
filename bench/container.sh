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
# (BuildKit, host network) → `docker run` with volumes (host folders) for the model store and jobs
# → /readyz → /classify → (full image) a small fine-tune job inside → `docker rm` → `docker run`
# on the same state folder → the model and the job history are still there. Prints image size, build
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
# API keys are on by default; give the container one from outside (README: keys in containers)
KEY=${KEY:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}
AUTH="Authorization: Bearer $KEY"
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
# -- inputs: a model to bake, a photo, a small dataset (built on the host, offline) ---------------
prepare_inputs() {
    export BENTOML_HOME="$WORK/bentoml" BENTOML_DO_NOT_TRACK=true
    SEVEN="$WORK/inputs/seven.png"
    mkdir -p "$WORK/inputs"
    if ! "$PY" -m tuneserve models show imagenet >/dev/null 2>&1; then
        log "bootstrap: the ImageNet EfficientNet-Lite0 → model 'imagenet' (baked into both images)"
        "$PY" -m tuneserve bootstrap >"$WORK/bootstrap.log" 2>&1
    fi
    if [ ! -f "$WORK/inputs/cat.jpg" ]; then
        "$PY" -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('$WORK/inputs/cat.jpg')"
    fi
    if [ ! -f "$WORK/inputs/digits.zip" ]; then
        rm -rf "$WORK/inputs/digits"
        "$PY" -m tuneserve demo-data digits "$WORK/inputs/digits-all" --size 32 >/dev/null
        # 12 images per class: enough for a real (small) fine-tune inside the container
        for d in "$WORK/inputs/digits-all"/*/; do
            mkdir -p "$WORK/inputs/digits/$(basename "$d")"
            ls "$d" | head -12 | while read -r f; do cp "$d/$f" "$WORK/inputs/digits/$(basename "$d")/"; done
        done
        (cd "$WORK/inputs/digits" && zip -qr ../digits.zip .)
        cp "$(ls "$WORK/inputs/digits-all/7/"* | tail -1)" "$WORK/inputs/seven.png"  # not in the training subset
        rm -rf "$WORK/inputs/digits-all"
    fi
}

# -- one image: build, run, check, restart, check ---------------------------------------------
json() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
url() { echo "http://127.0.0.1:$PORT$1"; }

wait_ready() {  # seconds from $1 until /readyz answers 200 (or fail after 600 s)
    local started=$1
    for _ in $(seq 1200); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$(url /readyz)")" = 200 ]; then elapsed "$started"; return; fi
        if [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" != true ]; then
            docker logs --tail 50 "$CONTAINER" >&2; log "container exited"; return 1
        fi
        sleep 0.5
    done
    docker logs --tail 50 "$CONTAINER" >&2; return 1
}

run_container() {  # prints "seconds from `docker run` to /readyz (of which N s docker create)"
    local started created
    started=$(now)
    # The two paths README "Model stores and container volumes" says to mount: the writable model
    # store and TUNESERVE_HOME (jobs database, job folders). Host folders here: with vfs, a helper
    # container to chown a named volume would cost another full copy of the image.
    docker create --name "$CONTAINER" --network host -e PORT="$PORT" -e TUNESERVE_WORKERS=2 \
        -e TUNESERVE_API_KEY="$KEY" -e TUNESERVE_POLL_SECONDS=2 -v "$STATE/models:/home/bentoml/models" \
        -v "$STATE/tuneserve:/home/bentoml/tuneserve" "$IMAGE" >/dev/null
    created=$(elapsed "$started")  # vfs copies the whole image into the container's root here
    docker start "$CONTAINER" >/dev/null
    echo "$(wait_ready "$started") s (of which $created s docker create)"
}

classify() {  # $1: model (optional), $2: image (default the cat) → "label probability model:version"
    curl -s -H "$AUTH" -F image=@"${2:-$WORK/inputs/cat.jpg}" ${1:+-F model="$1"} "$(url /classify)" \
        | json "d['predictions'][0]['label'] + ' ' + str(round(d['predictions'][0]['probability'], 3)) + ' ' + d['model'] + ':' + d['version']" 2>/dev/null
}

finetune() {  # $1: source → job id
    curl -s -H "$AUTH" -F dataset=@"$WORK/inputs/digits.zip" \
        -F "config={\"name\": \"digits\", \"source\": \"$1\", \"strategy\": \"linear\", \"epochs\": 2, \"image_size\": 32, \"hflip\": false, \"batch_size\": 16}" \
        "$(url /finetune)" | json "d.get('job_id') or d"
}

wait_job() {  # $1: job id → final job JSON (one line)
    local state
    for _ in $(seq 900); do
        state=$(curl -s -H "$AUTH" "$(url /finetune/$1)" | json "d['state']")
        case "$state" in succeeded|failed|cancelled|interrupted) curl -s -H "$AUTH" "$(url /finetune/$1)"; return;; esac
        sleep 1
    done
}

check_image() {  # $1: full | serve
    local variant=$1 options="" started build_s size_mb create_s ready1 ready2 job="" tag
    [ "$variant" = serve ] && options="--serve-only"
    IMAGE="tuneserve-$variant:bench" CONTAINER="ts-bench-$variant" STATE="$WORK/state-$variant"
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    rm -rf "$STATE"

    log "[$variant] tuneserve build $options --base-image $BASE_IMAGE imagenet"
    started=$(now)
    "$PY" -m tuneserve build $options --base-image "$BASE_IMAGE" imagenet >"$WORK/build-$variant.log" 2>&1
    tag=$(ls -t "$BENTOML_HOME/bentos/$( [ "$variant" = serve ] && echo tuneserve-serve || echo tuneserve )" | grep -v latest | head -1)
    tag="$( [ "$variant" = serve ] && echo tuneserve-serve || echo tuneserve ):$tag"
    log "[$variant] bentoml containerize $tag (BuildKit, host network; log $WORK/containerize-$variant.log)"
    "$PY" -m bentoml containerize "$tag" --backend docker --opt network=host -t "$IMAGE" >"$WORK/containerize-$variant.log" 2>&1 \
        || { tail -40 "$WORK/containerize-$variant.log" >&2; return 1; }
    build_s=$(elapsed "$started")
    size_mb=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }')
    log "[$variant] image $IMAGE: $size_mb MB, built in $build_s s"

    mkdir -p "$STATE/models" "$STATE/tuneserve" && chown -R 1034:1034 "$STATE"  # the image's user: bentoml, uid 1034
    ready1=$(run_container)
    log "[$variant] docker run → /readyz: $ready1; classify: $(classify)"
    log "[$variant] largest installed packages (MB): $(docker exec "$CONTAINER" sh -c \
        'du -sm /app/.venv/lib/python3.11/site-packages/* | sort -n | tail -8 | sed "s|/app/.venv/lib/python3.11/site-packages/||"' | tr '\n\t' ', ')"
    if [ "$variant" = serve ]; then
        log "[$variant] POST /finetune → $(curl -s -o "$WORK/serve-finetune.json" -w '%{http_code}' -H "$AUTH" -F x=1 "$(url /finetune)") $(cat "$WORK/serve-finetune.json")"
    else
        local source final model
        for source in imagenet efficientnet_lite0; do  # a baked model as the source first: fine-tuning from it must work
            job=$(finetune "$source")
            started=$(now)
            final=$(wait_job "$job")
            log "[$variant] fine-tune from '$source' ($job): $(echo "$final" | json "d['state'] + ' ' + str(d.get('model') or d.get('error'))[:300]") in $(elapsed "$started") s"
            [ "$(echo "$final" | json "d['state']")" = succeeded ] && break
        done
        model=$(echo "$final" | json "d.get('model') or ''")
        sleep 3  # one poll interval
        log "[$variant] classify a 7 with the new model: $(classify digits "$SEVEN" || echo "not served")"
    fi
    started=$(now)
    docker rm -f "$CONTAINER" >/dev/null
    log "[$variant] docker rm: $(elapsed "$started") s (vfs deletes the container's full copy of the image)"
    ready2=$(run_container)
    log "[$variant] docker run again on the same state folder → /readyz: $ready2"
    if [ "$variant" = full ]; then
        log "[$variant] after restart: jobs $(curl -s -H "$AUTH" "$(url /finetune)" | json "[(j['job_id'], j['state'], j.get('model')) for j in d['jobs']]")"
        log "[$variant] after restart: models $(curl -s -H "$AUTH" "$(url /models)" | json "sorted(d['models'])"); classify a 7: $(classify digits "$SEVEN" || echo "not served")"
    fi
    docker rm -f "$CONTAINER" >/dev/null
    echo "RESULT $variant: image $size_mb MB, build $build_s s, docker run → ready $ready1; again on the same state: $ready2${job:+, job $job}"
    df -h / | tail -1 >&2
}

setup
if [ "${1:-all}" = setup ]; then exit 0; fi
prepare_inputs
for step in $STEPS; do
    check_image "$step" || log "[$step] FAILED"
    if [ "${KEEP_IMAGES:-0}" != 1 ]; then
        docker rmi -f "tuneserve-$step:bench" >/dev/null 2>&1 || true
        docker builder prune -af >/dev/null 2>&1 || true
    fi
done
