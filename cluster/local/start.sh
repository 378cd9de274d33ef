#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head and N worker nodes, each a separate raylet with
# its own temp dir and port block, token authentication on. Prints the addresses and how to submit jobs.
#
# Every node is a `ray start --block` process in the background (its pid in DIR/pids/NAME.pid); stop.sh stops
# exactly those processes, never other Ray instances on the machine (unlike `ray stop`, which stops them all).
#
# Network: Ray's multi-node mode binds its gRPC services (GCS, raylets, object managers) to this machine's own
# address (Ray rewrites 127.0.0.1 to it, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would refuse a second node);
# HTTP (the dashboard / job API) binds 127.0.0.1. Every gRPC and HTTP call needs the cluster's token.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: cluster/local/start.sh [options]

  --dir DIR            cluster state: token, pid files, logs, node temp dirs   [/tmp/vembed-cluster]
  --workers N          worker nodes besides the head                            [1]
  --head-cpus N        logical CPUs of the head node                            [2]
  --worker-cpus N      logical CPUs of each worker node                         [2]
  --base-port P        first port of the cluster's range; node i uses P+200*i .. P+200*i+199   [26000]
  --object-store-mb M  object store per node, MiB                               [512]
  --token-file FILE    use this token file (default: generate DIR/auth_token)
  --timeout S          seconds to wait for each node to come up                 [120]
  --attempts N         tries per node (a busy machine can miss Ray's start-up deadline)   [3]
  --join               add --workers N worker nodes to the running cluster in DIR (after a node was lost, say);
                       they are named and numbered after the ones DIR has seen, and use its token and port range
  -h, --help           this help

Run it from the Python environment that has vembed installed (job entrypoints run `python` from this PATH).
Stop the cluster with: cluster/local/stop.sh --dir DIR
USAGE
}

DIR=/tmp/vembed-cluster
WORKERS=1
HEAD_CPUS=2
WORKER_CPUS=2
BASE_PORT=26000
OBJECT_STORE_MB=512
TOKEN_FILE=
TIMEOUT=120
ATTEMPTS=3
JOIN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    --base-port) BASE_PORT=$2; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB=$2; shift 2 ;;
    --token-file) TOKEN_FILE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --attempts) ATTEMPTS=$2; shift 2 ;;
    --join) JOIN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "start.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for value in "$WORKERS" "$HEAD_CPUS" "$WORKER_CPUS" "$BASE_PORT" "$OBJECT_STORE_MB" "$TIMEOUT" "$ATTEMPTS"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "start.sh: '$value' is not a non-negative integer" >&2; exit 2; }
done
FIRST_WORKER=1
if (( JOIN )); then
  [[ -s "$DIR/nodes/head/ray_current_cluster" && -s "$DIR/cluster.env" ]] \
    || { echo "start.sh: --join needs a running cluster in $DIR (no $DIR/cluster.env)" >&2; exit 1; }
  GCS_ADDRESS=$(cat "$DIR/nodes/head/ray_current_cluster")
  BASE_PORT=${GCS_ADDRESS##*:}  # the head's GCS port is the first of the cluster's range
  TOKEN_FILE=${TOKEN_FILE:-$(sed -n 's/^export RAY_AUTH_TOKEN_PATH=//p' "$DIR/cluster.env")}
  # Number new workers after every worker this cluster has had (their logs stay), so ports are never reused.
  for log in "$DIR"/logs/worker-*.out; do
    [[ -e "$log" ]] || continue
    index=${log##*/worker-}; index=${index%.out}
    (( index >= FIRST_WORKER )) && FIRST_WORKER=$((index + 1))
  done
fi
LAST_WORKER=$((FIRST_WORKER + WORKERS - 1))

if (( BASE_PORT < 1024 || BASE_PORT + 200 * (LAST_WORKER + 1) > 32768 )); then
  echo "start.sh: ports $BASE_PORT..$((BASE_PORT + 200 * (LAST_WORKER + 1) - 1)) must lie in 1024..32767" \
       "(below the kernel's ephemeral range, so they cannot collide with random ports)" >&2
  exit 2
fi
RAY=${RAY:-ray}
command -v "$RAY" >/dev/null || { echo "start.sh: '$RAY' not found; activate the environment with Ray" >&2; exit 2; }
command -v setsid >/dev/null || { echo "start.sh: 'setsid' (util-linux) not found" >&2; exit 2; }
command -v curl >/dev/null || { echo "start.sh: 'curl' not found" >&2; exit 2; }
# Unix socket paths (DIR/nodes/NAME/session_*/sockets/plasma_store) must stay under 108 bytes.
if (( ${#DIR} > 40 )); then
  echo "start.sh: --dir '$DIR' is longer than 40 characters; Ray's socket paths under it would be too long" >&2
  exit 2
fi
if (( ! JOIN )) && [[ -e "$DIR/pids" ]] && compgen -G "$DIR/pids/*.pid" >/dev/null; then
  echo "start.sh: $DIR already holds a cluster (pid files in $DIR/pids); stop it first: cluster/local/stop.sh --dir $DIR" >&2
  exit 1
fi

mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/nodes"
DIR=$(cd "$DIR" && pwd)
if [[ -z "$TOKEN_FILE" ]]; then
  TOKEN_FILE=$DIR/auth_token
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
fi
[[ -s "$TOKEN_FILE" ]] || { echo "start.sh: token file '$TOKEN_FILE' is missing or empty" >&2; exit 2; }
TOKEN_FILE=$(cd "$(dirname "$TOKEN_FILE")" && pwd)/$(basename "$TOKEN_FILE")

# Every node and client of this cluster authenticates with the token; a multi-node cluster cannot run with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single-node test fixtures set it).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
unset RAY_AUTH_TOKEN RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER RAY_ADDRESS
export RAY_USAGE_STATS_ENABLED=0
# A busy machine can take longer than Ray's default (15 s) to start a node's agents; let the raylet wait longer.
export RAY_raylet_start_wait_time_s=${RAY_raylet_start_wait_time_s:-60}

# node_ports INDEX -> the node's fixed ports (the head also uses +0 GCS, +1 dashboard, +2 Ray client).
node_ports() {
  local p=$((BASE_PORT + 200 * $1))
  echo "--node-manager-port=$((p + 3)) --object-manager-port=$((p + 4))" \
       "--dashboard-agent-listen-port=$((p + 5)) --dashboard-agent-grpc-port=$((p + 6))" \
       "--runtime-env-agent-port=$((p + 7)) --metrics-export-port=$((p + 8))" \
       "--min-worker-port=$((p + 100)) --max-worker-port=$((p + 199))"
}

# launch_node NAME ARGS...: one try of `ray start --block ARGS` in the background; waits until the node is up.
launch_node() {
  local name=$1; shift
  local log=$DIR/logs/$name.out
  mkdir -p "$DIR/nodes/$name"
  # setsid: the node leads its own process group, so stop.sh can signal it and everything it spawned.
  setsid nohup "$RAY" start --block --temp-dir="$DIR/nodes/$name" --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) \
    --disable-usage-stats "$@" >>"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$DIR/pids/$name.pid"
  local waited=0
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || (( waited >= TIMEOUT )); then
      echo "start.sh: node '$name' did not start (log: $log):" >&2
      tail -n 5 "$log" >&2
      kill -KILL -- "-$pid" 2>/dev/null
      rm -f "$DIR/pids/$name.pid"
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "started $name (pid $pid)"
}

# start_node NAME ARGS...: launch_node, tried up to ATTEMPTS times. Ray gives a node 30 s to register with the
# GCS, which a heavily loaded machine can miss; a later try usually makes it.
start_node() {
  local attempt
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    launch_node "$@" && return 0
    (( attempt < ATTEMPTS )) && { echo "start.sh: retrying node '$1' ($((attempt + 1))/$ATTEMPTS)" >&2; sleep 3; }
  done
  return 1
}

# wait_for_dashboard: the head's dashboard (the job API) answers HTTP. Starting worker nodes only then keeps
# them from competing with the dashboard's own start-up for the CPU.
wait_for_dashboard() {
  local waited=0
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$DASHBOARD_PORT/api/version")" != 000 ]]; do
    (( waited >= TIMEOUT )) && { echo "start.sh: the dashboard did not answer within ${TIMEOUT}s" >&2; return 1; }
    sleep 1
    waited=$((waited + 1))
  done
}

# If a node fails to start, stop whatever this script started (when joining, only the new nodes).
STARTED=()
stop_started() {
  if (( ! JOIN )); then
    "$(dirname "$0")/stop.sh" --dir "$DIR" >&2 || true
  elif (( ${#STARTED[@]} )); then
    "$(dirname "$0")/stop.sh" --dir "$DIR" $(printf -- '--node %s ' "${STARTED[@]}") >&2 || true
  fi
}
trap 'status=$?; if (( status != 0 )); then stop_started; fi' EXIT

if (( JOIN )); then
  for ((i = FIRST_WORKER; i <= LAST_WORKER; i++)); do
    # shellcheck disable=SC2046
    start_node "worker-$i" --address="$GCS_ADDRESS" --num-cpus="$WORKER_CPUS" $(node_ports "$i")
    STARTED+=("worker-$i")
  done
  echo "joined worker-$FIRST_WORKER..worker-$LAST_WORKER to the cluster at $GCS_ADDRESS"
  exit 0
fi

GCS_PORT=$BASE_PORT
DASHBOARD_PORT=$((BASE_PORT + 1))
# shellcheck disable=SC2046
start_node head --head --num-cpus="$HEAD_CPUS" --port="$GCS_PORT" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port=$((BASE_PORT + 2)) $(node_ports 0)
# `ray start` writes the address file just after announcing the node.
for _ in $(seq 30); do [[ -s "$DIR/nodes/head/ray_current_cluster" ]] && break; sleep 1; done
GCS_ADDRESS=$(cat "$DIR/nodes/head/ray_current_cluster")
wait_for_dashboard

for ((i = 1; i <= WORKERS; i++)); do
  # shellcheck disable=SC2046
  start_node "worker-$i" --address="$GCS_ADDRESS" --num-cpus="$WORKER_CPUS" $(node_ports "$i")
done

cat >"$DIR/cluster.env" <<ENV
# source this file to talk to the vembed local cluster in $DIR
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
export VEMBED_RAY_GCS_ADDRESS=$GCS_ADDRESS
ENV

cat <<INFO

Ray cluster up: head + $WORKERS worker node(s), token authentication on.
  GCS address (ray start --address / ray.init):  $GCS_ADDRESS
  dashboard and job API:                          http://127.0.0.1:$DASHBOARD_PORT
  token file:                                     $TOKEN_FILE
  logs:                                           $DIR/logs, $DIR/nodes/*/session_latest/logs

Submit a job (from the repository root):
  source $DIR/cluster.env
  ray job submit --working-dir . -- python ray_jobs/train.py configs/train_clip_t2i.yaml

Stop it:
  cluster/local/stop.sh --dir $DIR
INFO
