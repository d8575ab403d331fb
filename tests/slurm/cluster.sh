#!/usr/bin/env bash
# A real one-node Slurm cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd from
# Debian's munge and slurm-wlm, no slurmdbd, two fake GPUs. Everything (config, key, state, logs,
# PID files) lives in DIR; clients find it through SLURM_CONF=DIR/slurm.conf.
#   tests/slurm/cluster.sh start DIR   # idempotent: starts what is not already running
#   tests/slurm/cluster.sh stop DIR    # stops only the daemons whose PID files are in DIR
# Needs root (slurmd runs jobs as their users; munged runs as user munge, so DIR's parents must be
# searchable by others: not under pytest's private /tmp/pytest-of-root).
set -euo pipefail
action=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")
export SLURM_CONF="$dir/slurm.conf"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  for pid_file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if running "$pid_file"; then
      pid=$(cat "$pid_file")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pid_file"
  done
}

configure() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
  [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir/munge"
  chmod 711 "$dir/munge"  # clients reach the socket; the key stays private
  chmod 400 "$dir/munge/munge.key"
  # The node's CPUs as slurmd sees them; its memory declared (config_overrides) at 64 GiB, as the
  # rules request it for real models, whatever this machine has: the tiny test jobs use far less.
  local layout
  layout=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
  # MinJobAge: finished jobs stay visible to squeue (the status checks) and scontrol (the tests).
  cat > "$dir/slurm.conf" <<EOF
ClusterName=quantbench-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MinJobAge=3600
ReturnToService=2
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 $layout RealMemory=65536 Gres=gpu:2 State=UNKNOWN
PartitionName=quantbench Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # Fake GPUs: gres needs a character device per GPU (count-only lines drain the node).
  cat > "$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=localhost Name=gpu File=/dev/null
NodeName=localhost Name=gpu File=/dev/zero
EOF
}

start() {
  configure
  if ! runuser -u munge -- test -x "$dir/munge"; then
    echo "munged runs as user munge and cannot reach $dir/munge: every directory above it must be searchable by others (chmod o+x)" >&2
    return 1
  fi
  running "$dir/munge/munged.pid" || runuser -u munge -- munged --socket="$dir/munge/munge.socket" \
    --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  running "$dir/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  running "$dir/slurmd.pid" || slurmd -f "$SLURM_CONF" -N localhost
  for _ in $(seq 60); do  # up when the node takes jobs
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm is up: SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm did not come up; logs in $dir/log" >&2
  sinfo -N -l >&2 || true
  return 1
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
