#!/usr/bin/env bash
# Brings up a real Slurm cluster on this machine for the launcher tests: a private munged,
# slurmctld, and one slurmd per emulated node (Debian's slurmd runs several nodes on one host:
# distinct ports, %n in spool/pid/log paths, NodeAddr=127.0.0.1). Root only, no systemd.
# Installs slurmctld slurmd slurm-client munge with apt-get when missing. Idempotent.
#
#   SLURM_LOCAL_DIR=/tmp/ebt-slurm   state, config, logs, pid files, munge key and socket
#   SLURM_LOCAL_NODES=2              emulated nodes node1..nodeN
#   SLURM_LOCAL_PORT=16817           slurmctld port; slurmd ports follow it
# Then: source "$SLURM_LOCAL_DIR/env.sh" (SLURM_CONF). Stop with slurm_down.sh (same dir).
# Why the settings: cred_expire=10 (a requeued job otherwise waits 121 s before it may start
# again) and 2-second scheduler intervals keep a requeue + resume within seconds.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
DIR=${SLURM_LOCAL_DIR:-/tmp/ebt-slurm}
NODES=${SLURM_LOCAL_NODES:-2}
PORT=${SLURM_LOCAL_PORT:-16817}
CPUS=$(nproc)
MEM=$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) / 2 / NODES ))
HOST=$(hostname -s 2>/dev/null || hostname)
MARK="# ebt-slurm:$DIR"
alive() { local pid; [ -s "$1" ] || return 1; pid=$(cat "$1"); [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]; }
wait_pid() { local i; for i in $(seq 100); do alive "$1" "$2" && return 0; sleep 0.05; done
  echo "slurm_up: $2 did not start (see $DIR/log)" >&2; return 1; }
[ "$(id -u)" = 0 ] || { echo "slurm_up: must run as root (slurmd and munged)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "slurm_up: installing slurmctld slurmd slurm-client munge (apt-get)"
  # keep the packages' maintainer scripts from starting system-wide daemons
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d; own_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
chmod 755 "$DIR" "$DIR/munge"   # munged insists that its socket's folders be world-searchable
CONF="$DIR/etc/slurm.conf"
{
cat <<EOF
# written by scripts/cluster/slurm_up.sh: $NODES emulated nodes on one machine
ClusterName=ebtlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
Waittime=0
EOF
for i in $(seq 1 "$NODES"); do
  echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(( PORT + i )) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$CONF.new"
if [ -f "$CONF" ] && ! cmp -s "$CONF" "$CONF.new" && alive "$DIR/run/slurmctld.pid" slurmctld; then
  echo "slurm_up: config changed: restart with slurm_down.sh first" >&2; rm -f "$CONF.new"; exit 1
fi
mv "$CONF.new" "$CONF"
echo "export SLURM_CONF=$CONF" > "$DIR/env.sh"
export SLURM_CONF="$CONF"
# MASTER_ADDR is the first node's name: make the emulated names resolve (marked; removed by down)
for i in $(seq 1 "$NODES"); do
  getent hosts "node$i" >/dev/null || echo "127.0.0.1 node$i $MARK" >> /etc/hosts
done

if [ ! -s "$DIR/munge/munge.key" ]; then
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 600 "$DIR/munge/munge.key"
fi
if ! alive "$DIR/run/munged.pid" munged; then
  munged --socket="$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
         --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_pid "$DIR/run/munged.pid" munged
fi
if ! alive "$DIR/run/slurmctld.pid" slurmctld; then
  slurmctld -f "$CONF"; wait_pid "$DIR/run/slurmctld.pid" slurmctld
fi
for i in $(seq 1 "$NODES"); do
  if ! alive "$DIR/run/slurmd-node$i.pid" slurmd; then
    slurmd -f "$CONF" -N "node$i"; wait_pid "$DIR/run/slurmd-node$i.pid" slurmd
  fi
done
deadline=$(( $(date +%s) + 60 )); resumed=0
while :; do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  bad=$(printf '%s\n' "$states" | awk 'NF && $2!="idle" && $2!="mix" && $2!="alloc"' || true)
  [ -n "$states" ] && [ -z "$bad" ] && break
  if [ "$resumed" = 0 ] && printf '%s\n' "$bad" | grep -Eq ' (down|drain|drng|fail)'; then
    scontrol update NodeName="node[1-$NODES]" State=RESUME 2>/dev/null || true; resumed=1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "slurm_up: nodes not idle after 60 s: $states" >&2; tail -n 20 "$DIR"/log/*.log >&2; exit 1
  fi
  sleep 0.2
done
echo "slurm_up: $NODES node(s) idle in partition debug; SLURM_CONF=$CONF"
