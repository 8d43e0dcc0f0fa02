#!/usr/bin/env bash
# Stops the cluster of slurm_up.sh (same SLURM_LOCAL_DIR): cancels its jobs, then stops the
# slurmds, slurmctld and munged by their own pid files only (never by name), and removes the
# node names it added to /etc/hosts. `--purge` also deletes the folder.
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
DIR=${SLURM_LOCAL_DIR:-/tmp/ebt-slurm}
MARK="# ebt-slurm:$DIR"
alive() { local pid; [ -s "$1" ] || return 1; pid=$(cat "$1"); [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]; }
stop_pid() { # TERM, wait up to 15 s, then KILL: only the pid in the file, only if it is still $2
  local pid i; alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1"); kill -TERM "$pid" 2>/dev/null
  for i in $(seq 150); do [ -d /proc/"$pid" ] || break; sleep 0.1; done
  [ -d /proc/"$pid" ] && kill -KILL "$pid" 2>/dev/null
  rm -f "$1"
}
[ -d "$DIR" ] || exit 0
if alive "$DIR/run/slurmctld.pid" slurmctld; then
  export SLURM_CONF="$DIR/etc/slurm.conf"
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for i in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd & done; wait
stop_pid "$DIR/run/slurmctld.pid" slurmctld
stop_pid "$DIR/run/munged.pid" munged
if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
  # rewrite in place: /etc/hosts may be a bind mount that cannot be replaced
  kept=$(grep -vF "$MARK" /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
fi
[ "${1:-}" = --purge ] && rm -rf "$DIR"
echo "slurm_down: stopped"
