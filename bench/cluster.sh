#!/usr/bin/env bash
# tuneserve on "several hosts" on one machine: network namespaces joined by veth pairs to a bridge
# (run as root; `bash bench/cluster.sh`; a few minutes on 2 cores with tiny models and data).
#
#   tsc-sw      the switch: bridge br0, one veth port per host (no address, nothing else runs here)
#   tsc-lb      10.77.0.2    haproxy :8080, health check GET /readyz every 0.5 s; /finetune* → r1
#   tsc-r1      10.77.0.11   replica 1 = job controller (TUNESERVE_JOB_BACKEND=ray, jobs DB on its own disk)
#   tsc-r2      10.77.0.12   replica 2 (TUNESERVE_JOB_BACKEND=none)
#   tsc-rh      10.77.0.21   Ray head, 1 CPU (GCS :6379, dashboard/job API :8265)
#   tsc-rw      10.77.0.22   Ray worker, 2 CPUs
#   tsc-client  10.77.0.100  where requests come from
# Shared by every "host" (a shared volume stands in for it): the model store, the API key file,
# the job folders. A fine-tune asks Ray for 2 CPUs (TUNESERVE_RAY_NUM_CPUS), so only the worker fits it.
#
# Steps: (1) a fine-tune submitted through the balancer runs on the Ray worker, is published once
# and served by both replicas; (2) `tuneserve score --engine ray` spreads over both Ray nodes and
# writes every row once; (3) replica 2 SIGKILLed under load: failed requests before and after
# haproxy marks it DOWN, time from restart to UP; (4) the Ray worker node killed mid-job: the job
# ends `interrupted`, is resumed after the node rejoins, and is published once.
# Ends with one line `CLUSTER ok|FAILED key=value …`; exits 1 when any step fails. Everything it
# started (namespaces and their processes) goes on exit.
set -uo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
RAY=$(dirname "$PY")/ray
WORK=${WORK:-/tmp/tsc}  # short: Ray's socket paths must fit in 107 bytes
NET=10.77.0
LB=$NET.2 R1=$NET.11 R2=$NET.12 HEAD=$NET.21 WORKER=$NET.22 CLIENT=$NET.100
HOSTS="lb:$LB r1:$R1 r2:$R2 rh:$HEAD rw:$WORKER client:$CLIENT"
DASHBOARD=http://$HEAD:8265
KEY=cluster-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
FAILURES=()
declare -A RESULT

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; FAILURES+=("$1"); }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
in_ns() { local ns=$1; shift; ip netns exec "tsc-$ns" "$@"; }
json() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
api() {  # METHOD PATH [curl options…] → body, from the client host through the balancer
    local method=$1 path=$2; shift 2
    in_ns client curl -s -m 30 -X "$method" -H "Authorization: Bearer $KEY" "$@" "http://$LB:8080$path"
}

# -- namespaces, processes, cleanup -----------------------------------------------------------
cleanup() {
    local ns pid
    for ns in $(ip netns list | awk '/^tsc-/ { print $1 }'); do
        for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
    done
    sleep 0.5
    for ns in $(ip netns list | awk '/^tsc-/ { print $1 }'); do ip netns del "$ns"; done
}

make_network() {
    local entry name addr
    ip netns add tsc-sw
    ip -n tsc-sw link add br0 type bridge
    ip -n tsc-sw link set br0 up
    for entry in $HOSTS; do
        name=${entry%%:*} addr=${entry#*:}
        ip netns add "tsc-$name"
        ip link add "v-$name" netns tsc-sw type veth peer name eth0 netns "tsc-$name"
        ip -n tsc-sw link set "v-$name" master br0 up
        ip -n "tsc-$name" addr add "$addr/24" dev eth0
        ip -n "tsc-$name" link set eth0 up
        ip -n "tsc-$name" link set lo up
    done
}

kill_host() { local pid; for pid in $(ip netns pids "tsc-$1"); do kill -9 "$pid" 2>/dev/null; done; }

wait_until() {  # SECONDS DESCRIPTION COMMAND… → 0 once COMMAND succeeds
    local limit=$1 what=$2 started; shift 2
    started=$(now)
    while ! "$@" >/dev/null 2>&1; do
        if awk -v a="$started" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            log "timed out after ${limit}s waiting for $what"; return 1
        fi
        sleep 0.3
    done
}

# -- inputs on the shared "volume" ------------------------------------------------------------
prepare_shared() {
    mkdir -p "$WORK/shared/bentoml/models" "$WORK/score-images" "$WORK/r1/bentoml" "$WORK/r2/bentoml"
    printf 'cluster: %s\n' "$KEY" >"$WORK/shared/api-keys"
    for replica in r1 r2; do ln -s "$WORK/shared/bentoml/models" "$WORK/$replica/bentoml/models"; done
    BENTOML_HOME=$WORK/shared/bentoml "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, ".")
from models.artifact import store
from tests.finetune_support import make_dataset, zip_dir
from tests.tiny import write_tiny_model

work = Path(sys.argv[1])
store.publish("colours", write_tiny_model(work / "stage", accuracy=0.9))  # the default model, served at start
(work / "train.zip").write_bytes(zip_dir(make_dataset(work / "train", per_class=8)))
make_dataset(work / "score-images", per_class=60, seed=1)  # 120 images to score
EOF
}

start_ray_node() {  # head | worker
    local env=(RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$HERE" FAKE_TRAIN_STEP_S=0.25
               RAY_health_check_period_ms=1000 RAY_health_check_failure_threshold=3)
    local common=(--num-gpus 0 --object-store-memory 150000000 --disable-usage-stats)
    if [ "$1" = head ]; then
        in_ns rh env "${env[@]}" "$RAY" start --head --node-ip-address "$HEAD" --port 6379 --dashboard-host 0.0.0.0 \
            --dashboard-port 8265 --include-dashboard true --num-cpus 1 --temp-dir "$WORK/ray" "${common[@]}" \
            >"$WORK/ray-head.log" 2>&1
    else
        in_ns rw env "${env[@]}" "$RAY" start --address "$HEAD:6379" --node-ip-address "$WORKER" --num-cpus 2 \
            "${common[@]}" >>"$WORK/ray-worker.log" 2>&1
    fi
}

ray_alive_nodes() {  # number of live Ray nodes ≥ $1
    local alive
    alive=$(in_ns client "$PY" -c "
from ray.util.state import list_nodes
print(sum(n.state == 'ALIVE' for n in list_nodes(address='$DASHBOARD')))" 2>/dev/null) || return 1
    [ "${alive:-0}" -ge "$1" ]
}

start_replica() {  # r1 | r2
    local name=$1 backend=none
    [ "$name" = r1 ] && backend=ray
    mkdir -p "$WORK/$name/home"
    in_ns "$name" env BENTOML_HOME="$WORK/$name/bentoml" BENTOML_DO_NOT_TRACK=true TUNESERVE_HOME="$WORK/$name/home" \
        TUNESERVE_API_KEYS_FILE="$WORK/shared/api-keys" TUNESERVE_DEFAULT_MODEL=colours TUNESERVE_WORKERS=1 \
        TUNESERVE_POLL_SECONDS=1 TUNESERVE_JOB_BACKEND=$backend TUNESERVE_RAY_ADDRESS="$DASHBOARD" \
        TUNESERVE_RAY_NUM_CPUS=2 TUNESERVE_TRAINING_COMMAND="$PY $HERE/tests/finetune_fake_train.py" \
        TUNESERVE_FINETUNE_MIN_PER_CLASS=3 TUNESERVE_JOB_GRACE_SECONDS=2 PYTHONPATH="$HERE" \
        "$PY" -m tuneserve serve --port 3000 --no-bootstrap >>"$WORK/$name.log" 2>&1 &
}

replica_ready() { [ "$(in_ns client curl -s -o /dev/null -w '%{http_code}' "http://$1:3000/readyz")" = 200 ]; }

start_haproxy() {
    cat >"$WORK/haproxy.cfg" <<EOF
global
    stats socket $WORK/haproxy.sock mode 600 level admin
    maxconn 512
defaults
    mode http
    timeout connect 1s
    # /readyz waits behind requests on a busy 2-core machine: a slow answer is not a dead replica
    # (a killed one refuses the connection at once, so this does not delay noticing it)
    timeout check 3s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch 1
frontend api
    bind $LB:8080
    acl jobs path_beg /finetune
    use_backend controller if jobs
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 3 rise 2
    http-response set-header X-Served-By %[srv_name]
    server r1 $R1:3000 check
    server r2 $R2:3000 check
backend controller
    option httpchk GET /readyz
    http-response set-header X-Served-By %[srv_name]
    server r1 $R1:3000 check inter 500ms fall 3 rise 2
EOF
    haproxy -c -f "$WORK/haproxy.cfg" >/dev/null || { fail haproxy_config; return 1; }
    in_ns lb haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
}

start_cluster() {
    local started
    started=$(now)
    start_ray_node head || { fail ray_head; return 1; }
    start_ray_node worker || { fail ray_worker; return 1; }
    start_haproxy || return 1
    start_replica r1
    start_replica r2
    wait_until 120 "2 Ray nodes" ray_alive_nodes 2 || { fail ray_nodes; return 1; }
    wait_until 180 "replica 1 ready" replica_ready "$R1" || { fail r1_ready; return 1; }
    wait_until 180 "replica 2 ready" replica_ready "$R2" || { fail r2_ready; return 1; }
    local server
    for server in replicas/r1 replicas/r2 controller/r1; do
        wait_until 30 "haproxy to mark $server UP" "$PY" "$HERE/bench/cluster_probe.py" server-up "$WORK/haproxy.sock" "$server" \
            || { fail haproxy_checks; return 1; }
    done
    log "cluster up in $(elapsed "$started") s: Ray head $HEAD + worker $WORKER, replicas $R1 $R2 behind $LB:8080"
}

# -- steps ------------------------------------------------------------------------------------
submit_finetune() {  # NAME EPOCHS → job id
    local answer
    answer=$(api POST /finetune -F dataset=@"$WORK/train.zip" \
        -F "config={\"name\": \"$1\", \"source\": \"simple_cnn:none\", \"epochs\": $2}")
    echo "$answer" | json "d['job_id']" 2>/dev/null || { log "POST /finetune answered: ${answer:0:300}"; return 1; }
}
job_field() { api GET "/finetune/$1" | json "$2"; }
epochs_done_at_least() { [ "$(job_field "$1" "d['progress'].get('epochs_done') or 0")" -ge "$2" ]; }
job_ended() { case "$(job_field "$1" "d['state']")" in succeeded|failed|cancelled|interrupted) return 0;; esac; return 1; }
versions_of() { api GET /models | json "len(d['models'].get('$1', {}).get('versions', []))"; }
replica_version() {  # REPLICA_ADDR MODEL → the version it answers /classify with
    in_ns client curl -s -m 10 -H "Authorization: Bearer $KEY" -F model="$2" -F image=@"$WORK/train/red/$(ls "$WORK/train/red" | head -1)" \
        "http://$1:3000/classify" | json "d.get('version', '')" 2>/dev/null
}
serves() { [ "$(replica_version "$1" "$2")" = "$3" ]; }

step_finetune() {
    local job started version node
    started=$(now)
    job=$(submit_finetune clusterft 2) || { fail finetune_submit; return; }
    wait_until 180 "fine-tune $job" job_ended "$job" || { fail finetune_timeout; return; }
    [ "$(job_field "$job" "d['state']")" = succeeded ] || { fail "finetune_$(job_field "$job" "d['state']")"; return; }
    version=$(job_field "$job" "d['model'].split(':')[1]")
    node=$(in_ns client "$PY" "$HERE/bench/cluster_probe.py" job-node "$DASHBOARD" "tuneserve-$job-1")
    RESULT[ft_node]=$node RESULT[ft_s]=$(elapsed "$started") RESULT[ft_versions]=$(versions_of clusterft)
    log "fine-tune $job: succeeded in ${RESULT[ft_s]} s on Ray node $node; clusterft versions: ${RESULT[ft_versions]}"
    [ "$node" = "$WORKER" ] || fail "finetune_ran_on_$node"
    [ "${RESULT[ft_versions]}" = 1 ] || fail finetune_published_${RESULT[ft_versions]}_times
    local served=0 replica
    for replica in "$R1" "$R2"; do
        if wait_until 30 "$replica serving clusterft:$version" serves "$replica" clusterft "$version"; then
            served=$((served + 1))
        else
            fail "replica_${replica}_not_serving_new_version"
        fi
    done
    RESULT[ft_served_by]=$served
    log "clusterft:$version answered by $served of 2 replicas (asked directly)"
}

step_score() {
    local started nodes counts
    started=$(now)
    if ! in_ns rh env RAY_AUTH_MODE=disabled BENTOML_HOME="$WORK/shared/bentoml" PYTHONPATH="$HERE" "$PY" -m tuneserve \
        score --engine ray --ray-address "$HEAD:6379" --workers 2 --cpus-per-actor 0.5 --batch-size 16 --model clusterft \
        --input "$WORK/score-images" --output "$WORK/scores.parquet" --no-progress >"$WORK/score.log" 2>&1; then
        tail -20 "$WORK/score.log" >&2; fail score_run; return
    fi
    nodes=$(in_ns client "$PY" "$HERE/bench/cluster_probe.py" scorer-nodes "$DASHBOARD")
    counts=$("$PY" "$HERE/bench/cluster_probe.py" rows "$WORK/scores.parquet")
    RESULT[score_s]=$(elapsed "$started") RESULT[score_nodes]=$(echo "$nodes" | wc -w)
    RESULT[rows]=$(echo "$counts" | json "d['rows']") RESULT[unique_rows]=$(echo "$counts" | json "d['unique_paths']")
    log "Ray Data scoring: ${RESULT[rows]} rows (${RESULT[unique_rows]} distinct paths) of 120 images in ${RESULT[score_s]} s; actors on: $nodes"
    [ "${RESULT[rows]}" = 120 ] && [ "${RESULT[unique_rows]}" = 120 ] || fail score_rows_not_once
    [ "${RESULT[score_nodes]}" = 2 ] || fail score_not_spread
}

step_replica_kill() {
    local kill_t restart_t report
    rm -f "$WORK/load.stop"
    in_ns client "$PY" "$HERE/bench/cluster_probe.py" load "http://$LB:8080/classify" "$KEY" "$WORK/load.jsonl" \
        "$WORK/load.stop" "$WORK/haproxy.sock" &
    local load_pid=$!
    sleep 4
    kill_t=$(now)
    kill_host r2
    log "replica 2 SIGKILLed (every process of its host) under load"
    sleep 6
    restart_t=$(now)
    start_replica r2
    wait_until 180 "haproxy to mark replica 2 UP again" "$PY" "$HERE/bench/cluster_probe.py" server-up \
        "$WORK/haproxy.sock" replicas/r2 || fail r2_restart
    sleep 4  # a few health checks and requests after it rejoined
    touch "$WORK/load.stop"
    wait "$load_pid"
    report=$("$PY" "$HERE/bench/cluster_probe.py" kill-report "$WORK/load.jsonl" r2 "$kill_t" "$restart_t")
    log "replica kill: $report"
    RESULT[requests]=$(echo "$report" | json "d['requests']")
    RESULT[failed_before_down]=$(echo "$report" | json "d['failed_before_down']")
    RESULT[failed_after_down]=$(echo "$report" | json "d['failed_after_down']")
    RESULT[down_after_s]=$(echo "$report" | json "d['down_after_s']")
    RESULT[rejoin_s]=$(echo "$report" | json "d['rejoin_s']")
    RESULT[served_after_rejoin]=$(echo "$report" | json "d['served_by_restarted']")
    RESULT[survivor_marked_down]=$(echo "$report" | json "d['survivor_marked_down']")
    [ "${RESULT[failed_after_down]}" = 0 ] || fail requests_failed_after_health_check
    [ "${RESULT[rejoin_s]}" != None ] || fail r2_never_rejoined
    [ "${RESULT[served_after_rejoin]}" -gt 0 ] 2>/dev/null || fail r2_served_nothing_after_rejoin
}

step_ray_worker_kill() {
    local job state attempts
    job=$(submit_finetune survivor 60) || { fail survivor_submit; return; }
    wait_until 120 "survivor training on the worker" epochs_done_at_least "$job" 1 || { fail survivor_never_trained; return; }
    kill_host rw
    log "Ray worker node SIGKILLed during job $job (epoch $(job_field "$job" "d['progress'].get('epochs_done')") of 60)"
    wait_until 120 "job $job to end" job_ended "$job" || { fail survivor_hung; return; }
    state=$(job_field "$job" "d['state']")
    RESULT[worker_kill_state]=$state
    log "job $job after the worker died: $state ($(job_field "$job" "d.get('error')"))"
    [ "$state" = interrupted ] || fail "survivor_$state"
    start_ray_node worker && wait_until 120 "the worker to rejoin" ray_alive_nodes 2 || { fail ray_worker_rejoin; return; }
    if [ "$state" = interrupted ]; then
        api POST "/finetune/$job/resume" >/dev/null
        wait_until 240 "resumed $job" job_ended "$job" || { fail survivor_resume_hung; return; }
        state=$(job_field "$job" "d['state']")
        attempts=$(job_field "$job" "d.get('attempts')")
        RESULT[resumed_state]=$state
        RESULT[resumed_after_epoch]=$(cat "$WORK/r1/home/finetune/jobs/$job/output/resumed_from.txt" 2>/dev/null)
        log "resumed $job: $state (attempts $attempts; attempt 2 continued after epoch ${RESULT[resumed_after_epoch]:-?})"
        [ "$state" = succeeded ] || fail "survivor_resume_$state"
    fi
    RESULT[survivor_versions]=$(versions_of survivor)
    [ "${RESULT[survivor_versions]}" -le 1 ] || fail survivor_published_twice
}

summary() {
    local status=ok fields="" key
    [ ${#FAILURES[@]} -eq 0 ] || status=FAILED
    for key in ft_node ft_versions ft_served_by rows unique_rows score_nodes requests failed_before_down \
               failed_after_down survivor_marked_down down_after_s rejoin_s served_after_rejoin worker_kill_state resumed_state resumed_after_epoch survivor_versions; do
        fields+=" $key=${RESULT[$key]:-na}"
    done
    [ "$status" = ok ] || fields+=" failed=$(IFS=,; echo "${FAILURES[*]}")"
    echo "CLUSTER $status$fields load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)"
    [ "$status" = ok ]
}

main() {
    [ "$(id -u)" = 0 ] || { echo "CLUSTER FAILED failed=needs_root"; exit 1; }
    command -v haproxy >/dev/null || apt-get install -y -qq haproxy >/dev/null || { echo "CLUSTER FAILED failed=no_haproxy"; exit 1; }
    cleanup
    rm -rf "$WORK" && mkdir -p "$WORK"
    trap 'cleanup' EXIT
    trap 'FAILURES+=(interrupted); summary; exit 130' INT TERM
    make_network || { echo "CLUSTER FAILED failed=network"; exit 1; }
    cd "$HERE" && prepare_shared || { echo "CLUSTER FAILED failed=inputs"; exit 1; }
    if start_cluster; then
        step_finetune
        step_score
        step_replica_kill
        step_ray_worker_kill
    fi
    summary
}

main "$@"
