#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests: Debian's slurm-wlm and munge.
#   scripts/slurm_local.sh start   installs the packages if needed (root), writes slurm.conf, starts the daemons
#   scripts/slurm_local.sh stop    stops them
# State lives in $SLURM_LOCAL_DIR (default /tmp/trainer-slurm). Prints the reason and exits 1 where it cannot.
set -euo pipefail
state="${SLURM_LOCAL_DIR:-/tmp/trainer-slurm}"
conf=/etc/slurm/slurm.conf

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}

start() {
  [[ $(id -u) == 0 ]] || { echo "needs root (to install and run slurmctld, slurmd and munged)"; exit 1; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >/dev/null 2>&1 \
      || { echo "could not apt-get install slurm-wlm munge"; exit 1; }
  fi
  # munge: a key, a run folder it owns, the daemon as user munge.
  [[ -f /etc/munge/munge.key ]] || mungekey -c -f >/dev/null 2>&1 || mungekey -c >/dev/null
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge >/dev/null || { echo "munge does not work"; exit 1; }

  host=$(hostname -s)
  if [[ -f "$conf" ]] && grep -q "ClusterName=trainer-local" "$conf" && sinfo -h -o %t 2>/dev/null | grep -qvE '^(down|drain)'; then
    echo "SLURM already up on $host"; return 0
  fi
  stop
  mkdir -p "$state"/{state,spool,log} /etc/slurm
  cat > "$conf" <<CONF
ClusterName=trainer-local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$host CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -i
  slurmd
  for _ in $(seq 120); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc|comp)'; then echo "SLURM up on $host"; return 0; fi
    sleep 0.5
  done
  echo "slurmd did not come up: see $state/log"; exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop"; exit 2 ;;
esac
