#!/usr/bin/env bash
# Build and run tuneserve's containers on a machine with no image registry (run by hand, as root).
#
#   bash bench/container.sh            # setup + full, serve-only and CPU serving images: build, run, check
#   bash bench/container.sh setup      # only: Docker daemon and the Debian bookworm base image
#   STEPS="cpu" bash bench/container.sh     # some images only: "full", "serve", "cpu"
#   KEEP_IMAGES=1 keeps the images afterwards; REUSE_IMAGES=1 checks an image already built instead
#
# setup: starts dockerd (vfs storage, no iptables/bridge) when none answers, and builds the base
# image `tuneserve-base:bookworm` with debootstrap from the Debian archive apt on this machine
# already uses (read from /etc/apt/sources.list and sources.list.d; MIRROR overrides it), when it
# is missing (python3.11, pip, the host's CA bundle; what BentoML's Dockerfile template needs).
# The image's package install uses the index pip on this machine is configured with
# (PIP_INDEX_URL, else pip's configuration files), else pip's default.
# Then, per image: `tuneserve build` (+ `--serve-only`, + `--cpu`) with `--base-image` →
# `bentoml containerize` (BuildKit, host network) → `docker run` with volumes (host folders) for
# the model store and jobs → /readyz → /classify → full image: a small fine-tune job inside;
# serving images: /finetune answers 501 naming the Ray backend, and a version published into the
# mounted store from outside is served without a restart → `docker rm` → `docker run` on the same
# state folder → still there. Logs image size, build time and time from `docker run` to ready.
# A failed check is logged `[image] FAILED: …`; the last line is one summary
# (`CONTAINER ok|FAILED full=… serve=… cpu=…`) and the exit status is 1 when anything failed.
# Needs root, ~25 GB of disk per image with vfs.
set -uo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
PY=${PY:-$HERE/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-tuneserve-base:bookworm}
SUITE=bookworm
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK:-/tmp/tuneserve-container}
STEPS=${STEPS:-full serve cpu}
PORT=${PORT:-3900}
# API keys are on by default; give the container one from outside (README: keys in containers)
KEY=${KEY:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}
AUTH="Authorization: Bearer $KEY"
# Debian's docker client (20.10) builds BentoML's Dockerfile with the daemon's own BuildKit;
# a newer client first on PATH would need the buildx plugin.
export PATH=/usr/bin:$PATH DOCKER_BUILDKIT=1
FAILURES=()
declare -A SIZE

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { log "[$1] FAILED: $2"; FAILURES+=("$1:$2"); return 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

start_dockerd() {
    if docker info >/dev/null 2>&1; then return; fi
    log "starting dockerd (vfs storage driver; log in $WORK/dockerd.log)"
    mkdir -p "$WORK"
    nohup dockerd --storage-driver vfs --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
    log "dockerd did not start; see $WORK/dockerd.log"; return 1
}

apt_mirror() {  # the archive URI apt on this machine fetches $SUITE from (one-line and deb822 sources)
    "$PY" - "$SUITE" <<'PYTHON'
import glob, re, sys

suite = sys.argv[1]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):  # deb822: stanzas of "Field: value", blank-line separated
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                    and fields.get("enabled", ["yes"]) != ["no"] and fields.get("uris")):
                sys.exit(print(fields["uris"][0]))
    else:  # deb [options] URI SUITE COMPONENTS…
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                sys.exit(print(words[1]))
sys.exit(f"apt has no source for {suite} in /etc/apt/sources.list(.d); set MIRROR")
PYTHON
}

pip_index() {  # the package index pip on this machine is configured with, if any
    if [ -n "${PIP_INDEX_URL:-}" ]; then echo "$PIP_INDEX_URL"; return; fi
    "$PY" -m pip config get global.index-url 2>/dev/null || true
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    local root="$WORK/rootfs" started mirror
    started=$(now)
    mirror=${MIRROR:-$(apt_mirror)} || return 1
    log "debootstrap $SUITE from apt's own source $mirror → $BASE_IMAGE"
    rm -rf "$root"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1,passwd \
        "$SUITE" "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
    # The package index is reached through the host's CA: copy its bundle in, for pip (Debian's
    # reads the system bundle) and uv (UV_NATIVE_TLS + SSL_CERT_FILE).
    cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    tar -C "$root" -c . | docker import \
        -c 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' -c 'ENV UV_NATIVE_TLS=1' \
        -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null || return 1
    rm -rf "$root"
    log "base image $BASE_IMAGE: $(docker run --rm --network none "$BASE_IMAGE" python --version) in $(elapsed "$started") s"
}

setup() { start_dockerd && build_base_image; }
# -- inputs: a model to bake, a photo, a small dataset (built on the host, offline) ---------------
prepare_inputs() {
    export BENTOML_HOME="$WORK/bentoml" BENTOML_DO_NOT_TRACK=true
    SEVEN="$WORK/inputs/seven.png"
    mkdir -p "$WORK/inputs"
    if ! "$PY" -m tuneserve models show imagenet >/dev/null 2>&1; then
        log "bootstrap: the ImageNet EfficientNet-Lite0 → model 'imagenet' (baked into every image)"
        "$PY" -m tuneserve bootstrap >"$WORK/bootstrap.log" 2>&1 || return 1
    fi
    if [ ! -f "$WORK/inputs/cat.jpg" ]; then
        "$PY" -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('$WORK/inputs/cat.jpg')" || return 1
    fi
    if [ ! -f "$WORK/inputs/digits.zip" ]; then
        rm -rf "$WORK/inputs/digits"
        "$PY" -m tuneserve demo-data digits "$WORK/inputs/digits-all" --size 32 >/dev/null || return 1
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
    local started created ready
    started=$(now)
    # The two paths README "Model stores and container volumes" says to mount: the writable model
    # store and TUNESERVE_HOME (jobs database, job folders). Host folders here: with vfs, a helper
    # container to chown a named volume would cost another full copy of the image.
    docker create --name "$CONTAINER" --network host -e PORT="$PORT" -e TUNESERVE_WORKERS=2 \
        -e TUNESERVE_API_KEY="$KEY" -e TUNESERVE_POLL_SECONDS=2 -v "$STATE/models:/home/bentoml/models" \
        -v "$STATE/tuneserve:/home/bentoml/tuneserve" "$IMAGE" >/dev/null || return 1
    created=$(elapsed "$started")  # vfs copies the whole image into the container's root here
    docker start "$CONTAINER" >/dev/null || return 1
    ready=$(wait_ready "$started") || return 1
    echo "$ready s (of which $created s docker create)"
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

publish_outside() {  # a tiny model 'outside' published into $STATE/models from the host → its version
    local home="$WORK/publisher-$VARIANT"
    rm -rf "$home" && mkdir -p "$home" && ln -s "$STATE/models" "$home/models"
    BENTOML_HOME="$home" "$PY" -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from models.artifact import store
from tests.tiny import write_tiny_model
print(store.publish('outside', write_tiny_model(Path('$home/stage'), accuracy=0.9)).version)" && chown -R 1034:1034 "$STATE/models"
}

check_serving_image() {  # serve | cpu: what a replica must do that a job controller need not
    local answer code version served=""
    code=$(curl -s -o "$WORK/$VARIANT-finetune.json" -w '%{http_code}' -H "$AUTH" -F x=1 "$(url /finetune)")
    answer=$(cat "$WORK/$VARIANT-finetune.json")
    log "[$VARIANT] POST /finetune → $code $answer"
    [ "$code" = 501 ] && grep -q "TUNESERVE_JOB_BACKEND=ray" <<<"$answer" || fail "$VARIANT" "/finetune is not the 501 naming the Ray backend"
    version=$(publish_outside) || { fail "$VARIANT" "could not publish into the mounted store"; return; }
    for _ in $(seq 60); do  # hot reload: the worker polls the store every TUNESERVE_POLL_SECONDS
        served=$(classify outside | awk '{ print $3 }')
        [ "$served" = "outside:$version" ] && break
        sleep 1
    done
    log "[$VARIANT] published outside:$version into the mounted store from the host → served: ${served:-nothing}"
    [ "$served" = "outside:$version" ] || fail "$VARIANT" "a version published into the shared store was not served"
}

check_full_image() {
    local source final job
    for source in imagenet efficientnet_lite0; do  # a baked model as the source first: fine-tuning from it must work
        job=$(finetune "$source")
        final=$(wait_job "$job")
        log "[full] fine-tune from '$source' ($job): $(echo "$final" | json "d['state'] + ' ' + str(d.get('model') or d.get('error'))[:300]")"
        [ "$(echo "$final" | json "d['state']")" = succeeded ] && break
    done
    [ "$(echo "$final" | json "d['state']")" = succeeded ] || fail full "fine-tune inside the container"
    sleep 3  # one poll interval
    log "[full] classify a 7 with the new model: $(classify digits "$SEVEN" || echo "not served")"
}

build_image() {  # → IMAGE built from the bento of this variant; logs build time and size
    local options="" bento=tuneserve started tag index
    case "$VARIANT" in
        serve) options="--serve-only" bento=tuneserve-serve ;;
        cpu) options="--serve-only --cpu" bento=tuneserve-serve-cpu ;;
    esac
    index=$(pip_index)
    log "[$VARIANT] tuneserve build $options --base-image $BASE_IMAGE imagenet${index:+, pip index from this host}"
    started=$(now)
    "$PY" -m tuneserve build $options --base-image "$BASE_IMAGE" ${index:+--pip-index-url "$index"} imagenet \
        >"$WORK/build-$VARIANT.log" 2>&1 || { tail -20 "$WORK/build-$VARIANT.log" >&2; return 1; }
    tag="$bento:$(ls -t "$BENTOML_HOME/bentos/$bento" | grep -v latest | head -1)"
    log "[$VARIANT] bentoml containerize $tag (BuildKit, host network; log $WORK/containerize-$VARIANT.log)"
    # from /: BentoML 1.4 re-reads a bento's Dockerfile template (the CPU image's docker/serve-slim.j2)
    # from a temporary folder and refuses it unless that folder is under the working directory
    (cd / && "$PY" -m bentoml containerize "$tag" --backend docker --opt network=host -t "$IMAGE") >"$WORK/containerize-$VARIANT.log" 2>&1 \
        || { tail -40 "$WORK/containerize-$VARIANT.log" >&2; return 1; }
    SIZE[$VARIANT]=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.2fGB", $1 / 1e9 }')
    log "[$VARIANT] image $IMAGE: ${SIZE[$VARIANT]}, built in $(elapsed "$started") s"
}

check_image() {  # $1: full | serve | cpu
    VARIANT=$1 IMAGE="tuneserve-$1:bench" CONTAINER="ts-bench-$1" STATE="$WORK/state-$1"
    local ready started cuda
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    rm -rf "$STATE"
    if [ "${REUSE_IMAGES:-0}" = 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
        SIZE[$VARIANT]=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.2fGB", $1 / 1e9 }')
        log "[$VARIANT] reusing the image $IMAGE (${SIZE[$VARIANT]}); REUSE_IMAGES=1"
    else
        build_image || { fail "$VARIANT" build; return 1; }
    fi
    mkdir -p "$STATE/models" "$STATE/tuneserve" && chown -R 1034:1034 "$STATE"  # the image's user: bentoml, uid 1034
    ready=$(run_container) || { fail "$VARIANT" "container never ready"; return 1; }
    log "[$VARIANT] docker run → /readyz: $ready; classify: $(classify)"
    [ -n "$(classify)" ] || fail "$VARIANT" "/classify"
    log "[$VARIANT] largest installed packages (MB): $(docker exec "$CONTAINER" sh -c \
        'du -sm /app/.venv/lib/python3.11/site-packages/* | sort -n | tail -8 | sed "s|/app/.venv/lib/python3.11/site-packages/||"' | tr '\n\t' ', ')"
    if [ "$VARIANT" = cpu ]; then
        # the CUDA wheels unpack into site-packages/nvidia/; BentoML's own NVML binding (nvidia-ml-py,
        # pure Python, loads the driver's library if there is one) carries no CUDA and is not counted
        cuda=$(docker exec "$CONTAINER" sh -c 'ls -d /app/.venv/lib/python3.11/site-packages/nvidia /app/.venv/lib/python3.11/site-packages/onnxruntime_gpu* 2>/dev/null; find / -xdev \( -name "libcudart*.so*" -o -name "libcublas*.so*" -o -name "libcudnn*.so*" -o -name "libonnxruntime_providers_cuda*" \) 2>/dev/null')
        log "[cpu] CUDA libraries or packages inside: ${cuda:-none}"
        [ -z "$cuda" ] || fail cpu "CUDA inside the CPU image"
    fi
    if [ "$VARIANT" = full ]; then check_full_image; else check_serving_image; fi
    started=$(now)
    docker rm -f "$CONTAINER" >/dev/null
    log "[$VARIANT] docker rm: $(elapsed "$started") s (vfs deletes the container's full copy of the image)"
    ready=$(run_container) || { fail "$VARIANT" "not ready again on the same state"; return 1; }
    log "[$VARIANT] docker run again on the same state folder → /readyz: $ready"
    log "[$VARIANT] after restart: models $(curl -s -H "$AUTH" "$(url /models)" | json "sorted(d['models'])")"
    if [ "$VARIANT" = full ]; then
        log "[full] after restart: jobs $(curl -s -H "$AUTH" "$(url /finetune)" | json "[(j['job_id'], j['state'], j.get('model')) for j in d['jobs']]")"
    fi
    docker rm -f "$CONTAINER" >/dev/null
    df -h / | tail -1 >&2
}

summary() {
    local fields="" step status=ok
    for step in full serve cpu; do fields+=" $step=${SIZE[$step]:-not_built}"; done
    [ ${#FAILURES[@]} -eq 0 ] || status=FAILED fields+=" failed=$(IFS=,; echo "${FAILURES[*]}" | tr ' ' _)"
    echo "CONTAINER $status$fields load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
    [ "$status" = ok ]
}

main() {
    mkdir -p "$WORK"
    setup || { fail setup "dockerd or the base image"; summary; exit 1; }
    if [ "${1:-all}" = setup ]; then summary; exit; fi
    prepare_inputs || { fail inputs "bootstrap or demo data"; summary; exit 1; }
    for step in $STEPS; do
        check_image "$step"
        docker rm -f "ts-bench-$step" >/dev/null 2>&1
        if [ "${KEEP_IMAGES:-0}" != 1 ]; then
            docker rmi -f "tuneserve-$step:bench" >/dev/null 2>&1 || true
            docker builder prune -af >/dev/null 2>&1 || true
        fi
    done
    summary
}

main "$@"
