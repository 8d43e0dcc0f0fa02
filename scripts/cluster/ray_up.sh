#!/usr/bin/env bash
# Brings up a real 2-node Ray cluster on loopback for the launcher tests: the head on 127.0.0.2,
# worker nodes on 127.0.0.3, 127.0.0.4, ... (each its own raylet). Ray rewrites 127.0.0.1 to the
# machine's outward address, so other loopback addresses are what keep it on lo. Each node is
# started under its own setsid; its session id (== pid) goes to $RAY_LOCAL_DIR/run/<node>.sid so
# ray_down.sh stops exactly these processes (never `ray stop`, which stops every Ray here).
#
#   RAY_LOCAL_DIR=/tmp/ebt-ray     temp dirs, logs, session ids, env.sh (keep it short: socket paths)
#   RAY_LOCAL_PYTHON=python3       interpreter with ray[train] (its bin/ goes first on PATH, so
#                                  workers and job entrypoints use the same environment)
#   RAY_LOCAL_WORKERS=1            worker nodes besides the head
#   RAY_LOCAL_CPUS=1               logical CPUs per node (one Ray Train worker each)
#   RAY_LOCAL_PORT=26379           GCS port (client server: +1);  RAY_LOCAL_DASHBOARD=0|1 (1: jobs API on 127.0.0.1:8265)
# Then: source "$RAY_LOCAL_DIR/env.sh" (RAY_ADDRESS=127.0.0.2:PORT, RAY_AUTH_MODE=disabled).
set -euo pipefail
DIR=${RAY_LOCAL_DIR:-/tmp/ebt-ray}
PY=${RAY_LOCAL_PYTHON:-python3}
WORKERS=${RAY_LOCAL_WORKERS:-1}
CPUS=${RAY_LOCAL_CPUS:-1}
PORT=${RAY_LOCAL_PORT:-26379}
DASH=${RAY_LOCAL_DASHBOARD:-0}
HEAD_IP=127.0.0.2
RAY_BIN="$(dirname "$PY")/ray"
[ -x "$RAY_BIN" ] || RAY_BIN=$("$PY" -c 'import os,sys; print(os.path.join(os.path.dirname(sys.executable), "ray"))')
[ -x "$RAY_BIN" ] || { echo "ray_up: no ray CLI next to $PY (pip install 'ebt-pretrain[cluster]')" >&2; exit 1; }
export PATH="$(dirname "$RAY_BIN"):$PATH"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ADDRESS="$HEAD_IP:$PORT"
mkdir -p "$DIR/run" "$DIR/log"
{ echo "export RAY_ADDRESS=$HEAD_IP:$PORT"; echo "export RAY_AUTH_MODE=disabled"; echo "export RAY_USAGE_STATS_ENABLED=0"
  [ "$DASH" = 1 ] && echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265"; true; } > "$DIR/env.sh"
sid_alive() { [ -s "$1" ] && ps -eo sid=,comm= | awk -v s="$(cat "$1")" '$1==s && ($2=="raylet" || $2=="gcs_server") {f=1} END {exit !f}'; }
start_node() { # NAME ARGS...: `ray start` in a new session; setsid does not fork here, so sid == pid
  local name=$1; shift
  sid_alive "$DIR/run/$name.sid" && return 0
  setsid "$RAY_BIN" start "$@" --num-cpus="$CPUS" --num-gpus=0 --object-store-memory=$(( 256 * 1024 * 1024 )) \
    --disable-usage-stats > "$DIR/log/$name.start.log" 2>&1 &
  local pid=$!
  if ! wait "$pid"; then echo "ray_up: ray start ($name) failed:" >&2; tail -n 20 "$DIR/log/$name.start.log" >&2; return 1; fi
  echo "$pid" > "$DIR/run/$name.sid"
}
dash_args=(--include-dashboard=false)
[ "$DASH" = 1 ] && dash_args=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=8265)
start_node head --head --node-ip-address="$HEAD_IP" --port="$PORT" --ray-client-server-port=$(( PORT + 1 )) --temp-dir="$DIR/tmp-head" "${dash_args[@]}"
for i in $(seq 1 "$WORKERS"); do
  start_node "worker$i" --address="$HEAD_IP:$PORT" --node-ip-address="127.0.0.$(( 2 + i ))" --temp-dir="$DIR/tmp-worker$i"
done
want=$(( 1 + WORKERS )); deadline=$(( $(date +%s) + 120 ))
until [ "$("$PY" -c 'import ray; ray.init(logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null | tail -n1)" = "$want" ]; do
  [ "$(date +%s)" -ge "$deadline" ] && { echo "ray_up: fewer than $want nodes alive after 120 s" >&2; exit 1; }
  sleep 1
done
echo "ray_up: $want node(s) alive; RAY_ADDRESS=$HEAD_IP:$PORT"
