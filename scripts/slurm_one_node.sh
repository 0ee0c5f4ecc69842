#!/usr/bin/env bash
# A real one-node SLURM cluster in one directory, for trying normbench's SLURM launcher (and for its
# tests): munged with its own key and socket, slurmctld and slurmd on free ports, all state, spool and
# logs under DIR. Needs root and Debian's slurm-wlm + munge (scripts/install.sh --dev installs them).
#
#   sudo bash scripts/slurm_one_node.sh start /tmp/nbslurm   # prints: export SLURM_CONF=/tmp/nbslurm/slurm.conf
#   export SLURM_CONF=/tmp/nbslurm/slurm.conf
#   sinfo; python bench/train.py -m hydra/launcher=slurm hydra.launcher.gpus_per_node=null ...
#   sudo bash scripts/slurm_one_node.sh stop /tmp/nbslurm
#
# Nothing outside DIR is touched: no /etc/slurm, no system munge socket, no systemd units, so it runs
# next to any other SLURM or munge on the machine.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop() {
  local conf="$dir/slurm.conf"
  # cancel this cluster's jobs while the daemons can still end them
  if [ -f "$conf" ] && [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$conf scancel --full --user=root >/dev/null 2>&1 || true
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  # slurmd first, then the controller, then munged; by their pid files only
  for name in slurmd slurmctld munged; do
    pidfile="$dir/run/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  # anything still running from this cluster (slurmstepd and job processes carry its SLURM_CONF)
  for env in /proc/[0-9]*/environ; do
    if { tr '\0' '\n' < "$env" | grep -qxF "SLURM_CONF=$conf"; } 2>/dev/null; then
      pid=${env#/proc/}; pid=${pid%/environ}
      [ "$pid" != $$ ] && kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm_one_node: needs root (slurmd runs jobs as their user)" >&2; exit 3; }
  for bin in munged mungekey slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || { echo "slurm_one_node: $bin not found: apt-get install slurm-wlm munge" >&2; exit 3; }
  done
  mkdir -p "$dir"/{munge,munge-socket,run,state,spool,log}
  chmod 755 "$dir"
  # munged runs as the munge user and insists its key and logs are its own and private, and its
  # socket's dir reachable by all.
  chown munge:munge "$dir/munge" "$dir/munge-socket"
  chmod 700 "$dir/munge"
  chmod 755 "$dir/munge-socket"
  [ -f "$dir/munge/munge.key" ] || runuser -u munge -- mungekey -c -k "$dir/munge/munge.key"
  local socket="$dir/munge-socket/munge.socket"
  runuser -u munge -- munged --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  cp "$dir/munge/munged.pid" "$dir/run/munged.pid"

  local node cpus mem_mb ctld_port slurmd_port
  node=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=nb$ctld_port
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# a requeued or cancelled job is gone in 2 s (SIGTERM, then SIGKILL), not the default 30 s
KillWait=2
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=300
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  # ready when the node takes jobs
  for _ in $(seq 150); do
    if sinfo -h -N -o %t 2>/dev/null | grep -qx "idle"; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  echo "slurm_one_node: node not idle after 30 s; see $dir/log/*.log" >&2
  sinfo -N -l >&2 || true
  stop
  exit 4
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
