#!/usr/bin/env bash
# Stops the cluster of ray_up.sh (same RAY_LOCAL_DIR): for each node (workers first, head last),
# the processes of its own session only, in the order `ray stop` uses: raylet (it reaps its
# workers), then agents and dashboard, gcs_server last. `--purge` also deletes the folder.
set -uo pipefail
DIR=${RAY_LOCAL_DIR:-/tmp/ebt-ray}
pids_in() { ps -eo pid=,sid=,comm= | awk -v s="$1" -v m="$2" '$2==s {
  if (m=="all" || (m=="raylet" && $3=="raylet") || (m=="gcs" && $3=="gcs_server") ||
      (m=="rest" && $3!="raylet" && $3!="gcs_server")) print $1 }'; }
term_wait() { local pids i; pids=$(pids_in "$1" "$2"); [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null
  for i in $(seq 100); do [ -z "$(pids_in "$1" "$2")" ] && return 0; sleep 0.1; done; return 1; }
[ -d "$DIR/run" ] || exit 0
for f in $(ls "$DIR"/run/worker*.sid 2>/dev/null) "$DIR/run/head.sid"; do
  [ -s "$f" ] || continue
  sid=$(cat "$f")
  term_wait "$sid" raylet; term_wait "$sid" rest; term_wait "$sid" gcs
  left=$(pids_in "$sid" all)
  # shellcheck disable=SC2086
  [ -n "$left" ] && kill -KILL $left 2>/dev/null
  rm -f "$f"
done
[ "${1:-}" = --purge ] && rm -rf "$DIR"
echo "ray_down: stopped"
