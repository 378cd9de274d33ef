#!/usr/bin/env bash
# Stop a cluster started by cluster/local/start.sh: every node (workers first, then the head) or only the named
# ones. Only the processes this cluster started are signalled: each node is a `ray start --block` process that
# leads its own process group (raylet, GCS, agents), plus the Ray workers below it in the process tree.
set -uo pipefail

usage() {
  cat <<'USAGE'
Usage: cluster/local/stop.sh [--dir DIR] [--node NAME]... [--kill] [--timeout S]

  --dir DIR      the cluster's state dir given to start.sh               [/tmp/vembed-cluster]
  --node NAME    stop only this node (head, worker-1, ...); repeatable   [all nodes]
  --kill         SIGKILL the node's whole process group at once: a node crash, as when a machine dies
                 (default: SIGTERM, Ray drains the node and exits; SIGKILL after --timeout)
  --timeout S    seconds to wait for a graceful stop                     [30]
  -h, --help     this help
USAGE
}

DIR=/tmp/vembed-cluster
NODES=()
KILL=0
TIMEOUT=30
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --node) NODES+=("$2"); shift 2 ;;
    --kill) KILL=1; shift ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "stop.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || { echo "stop.sh: --timeout '$TIMEOUT' is not a non-negative integer" >&2; exit 2; }

if [[ ${#NODES[@]} -eq 0 ]]; then
  [[ -d "$DIR/pids" ]] || { echo "stop.sh: no cluster in $DIR (no $DIR/pids)"; exit 0; }
  for pidfile in "$DIR"/pids/worker-*.pid; do
    [[ -e "$pidfile" ]] && NODES+=("$(basename "$pidfile" .pid)")
  done
  [[ -e "$DIR/pids/head.pid" ]] && NODES+=(head)
fi

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# descendants PID: every process below PID. The raylet starts each Ray worker in a process group of its own, so
# signalling the node's group does not reach them; their pids are collected before the node goes.
descendants() {
  local child
  for child in $(ps -eo pid=,ppid= | awk -v parent="$1" '$2 == parent {print $1}'); do
    echo "$child"
    descendants "$child"
  done
}

# stop_node NAME: signal the node's process group, wait for it to go, escalate to SIGKILL.
stop_node() {
  local name=$1 pidfile=$DIR/pids/$1.pid
  if [[ ! -e "$pidfile" ]]; then
    echo "stop.sh: no node '$name' in $DIR" >&2
    return 1
  fi
  local pid
  pid=$(cat "$pidfile")
  [[ "$pid" =~ ^[0-9]+$ ]] || { echo "stop.sh: $pidfile does not hold a pid" >&2; return 1; }
  if ! group_alive "$pid"; then
    rm -f "$pidfile"
    echo "$name: already stopped"
    return 0
  fi
  local workers
  workers=$(descendants "$pid")
  if (( KILL )); then
    # shellcheck disable=SC2086
    kill -KILL -- "-$pid" $workers 2>/dev/null
  else
    kill -TERM "$pid" 2>/dev/null  # `ray start --block` drains the node and stops its processes
  fi
  local waited=0
  while group_alive "$pid" && (( waited < TIMEOUT * 10 )); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if group_alive "$pid"; then
    echo "$name: still running after ${TIMEOUT}s, sending SIGKILL to process group $pid"
    kill -KILL -- "-$pid" 2>/dev/null
    sleep 1
  fi
  # Ray workers outlive their node only briefly (they exit when their raylet goes); do not wait for that.
  # shellcheck disable=SC2086
  [[ -n "$workers" ]] && kill -KILL $workers 2>/dev/null
  rm -f "$pidfile"
  echo "$name: stopped"
}

status=0
for name in "${NODES[@]}"; do
  stop_node "$name" || status=1
done
exit $status
