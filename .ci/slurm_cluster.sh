#!/usr/bin/env bash
# A real, single-host Slurm cluster for tests: install | start | stop | status.
#
# Why: the Slurm templates, `ernie submit` and rank discovery are only worth
# something if they run under the real slurmctld/slurmd, so CI brings one up.
# One host plays NODES virtual nodes (n1..nN), each its own slurmd on its own
# port; several nodes are needed because Slurm never starts a heterogeneous
# job's components on one node (backfill reserves whole nodes per component).
#
# Everything (config, spool, logs, PID files, munge socket) lives under
# ERNIE_SLURM_DIR; `stop` kills exactly the daemons whose PID files are there.
# Clients find the cluster through "$ERNIE_SLURM_DIR/env.sh" (exports SLURM_CONF).
# No RequeueExit here on purpose: slurm/*.sbatch must requeue themselves, as on
# clusters whose admins set none.
set -euo pipefail

DIR=${ERNIE_SLURM_DIR:-/tmp/ernie-slurm}
NODES=${ERNIE_SLURM_NODES:-4}
CPUS=${ERNIE_SLURM_CPUS:-4}           # per virtual node (more than the host has: config_overrides)
GPUS=${ERNIE_SLURM_GPUS:-2}           # count-only "gpu" GRES per node, so GPU templates can be submitted
# Several clusters may share a host (one per checkout or CI job): each takes a slot 0..15 (0 for the
# default DIR, else from a hash of DIR; ERNIE_SLURM_SLOT picks one) that gives it its own ports: the
# daemons' (PORT, PORT+1..PORT+NODES) and, through its first job id, the ports jobs derive from their
# job id (runtime/env.py: 20000 + id mod 20000, plus small offsets per het group): 1250 ids per slot.
if [[ -n ${ERNIE_SLURM_SLOT:-} ]]; then SLOT=$ERNIE_SLURM_SLOT
elif [[ $DIR == /tmp/ernie-slurm ]]; then SLOT=0
else SLOT=$((1 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 15)); fi
PORT=${ERNIE_SLURM_PORT:-$((16817 + SLOT * 32))}   # slurmctld; slurmd n_i listens on PORT+i
FIRST_JOB_ID=$((SLOT * 1250 + 1))
HOSTS_TAG="# ernie-slurm-test $DIR"   # this cluster's own /etc/hosts line: `stop` removes only it
PACKAGES=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev libpmix-dev)

log() { echo "[slurm_cluster] $*" >&2; }

need_install() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 0
  done
  return 1
}

# Debian post-install scripts try to start the daemons; policy-rc.d exit 101 forbids it.
install_packages() {
  if ! need_install; then log "packages already installed"; return; fi
  local policy=/usr/sbin/policy-rc.d had_policy=0
  [[ -e $policy ]] && had_policy=1
  [[ $had_policy == 1 ]] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" >/dev/null
  [[ $had_policy == 1 ]] || rm -f "$policy"
}

# mpi4py's wheel picks the MPI it finds; prove it can run a 2-rank allreduce.
check_mpi4py() {
  local out
  out=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 \
        mpirun --oversubscribe -n 2 python3 -c \
        'from mpi4py import MPI; c=MPI.COMM_WORLD; s=c.allreduce(c.rank + 1); c.rank or print("sum", s)' 2>&1) \
    || { log "mpi4py 2-rank allreduce failed: $out"; return 1; }
  grep -q "^sum 3$" <<<"$out" || { log "mpi4py allreduce gave: $out"; return 1; }
  log "mpi4py 2-rank allreduce ok"
}

cmd_install() {
  install_packages
  python3 -c 'import mpi4py' 2>/dev/null || python3 -m pip install -q "mpi4py>=4"
  check_mpi4py
}

# Slurm drops file-less GPUs, and wants character devices: give it /dev/null clones.
# Tasks then get CUDA_VISIBLE_DEVICES like on a real GPU node (no CUDA behind it).
write_fake_gpus() {
  mkdir -p "$DIR/dev"
  for g in $(seq 0 $((GPUS - 1))); do mknod "$DIR/dev/gpu$g" c 1 3; done
  echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" > "$DIR/etc/gres.conf"
}

write_config() {
  local host last_port
  host=$(hostname -s)
  last_port=$((PORT + NODES))
  mkdir -p "$DIR"/{etc,state,log,run,munge,tmp}
  for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done
  cat > "$DIR/etc/slurm.conf" <<CONF
ClusterName=ernie-test
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
GresTypes=gpu
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$last_port] CPUs=$CPUS RealMemory=1000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=n[1-$NODES] MaxTime=INFINITE State=UP
CONF
  write_fake_gpus
  cat > "$DIR/env.sh" <<ENV
# Source this to use the test cluster (sbatch passes it on to the jobs).
export SLURM_CONF=$DIR/etc/slurm.conf
export ERNIE_SLURM_DIR=$DIR
# Every virtual node is this one host: Open MPI must use TCP over loopback (its
# shared-memory transport crashes across "nodes" that share a host, and eth0
# may be unreachable); everything runs as root here.
export OMPI_MCA_btl=self,tcp
export OMPI_MCA_btl_tcp_if_include=lo
export OMPI_MCA_oob_tcp_if_include=lo
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ENV
}

# Virtual node names must resolve (they are the "first host" a job's ranks rendezvous on).
# Every cluster adds its own line (same names, all 127.0.0.1), so stopping one leaves the others'.
# Lines are matched whole-tag at the end (a DIR that extends another's does not match it).
has_hosts_entry() { awk -v tag="$HOSTS_TAG" 'substr($0, length($0) - length(tag) + 1) == tag { f = 1 } END { exit !f }' /etc/hosts; }

add_hosts_entry() {
  has_hosts_entry && return
  echo "127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$NODES") $HOSTS_TAG" >> /etc/hosts
}

remove_hosts_entry() {
  has_hosts_entry || return 0
  local kept
  kept=$(awk -v tag="$HOSTS_TAG" 'substr($0, length($0) - length(tag) + 1) != tag' /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts   # rewrite in place: /etc/hosts may be a bind mount
}

start_munge() {
  [[ -f /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  chmod 755 "$DIR/munge"
  munged --force --socket="$DIR/munge/munge.socket.2" --pid-file="$DIR/run/munged.pid" \
         --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
}

wait_idle() {
  local deadline=$((SECONDS + 60)) idle
  while ((SECONDS < deadline)); do
    idle=$(SLURM_CONF=$DIR/etc/slurm.conf sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    ((idle >= NODES)) && { log "$NODES nodes idle"; return 0; }
    sleep 0.5
  done
  log "nodes not idle after 60 s:"; SLURM_CONF=$DIR/etc/slurm.conf sinfo -N >&2 || true
  return 1
}

cmd_start() {
  if cmd_status >/dev/null 2>&1; then log "already running in $DIR"; return; fi
  cmd_stop 2>/dev/null
  rm -rf "$DIR"
  write_config
  export SLURM_CONF=$DIR/etc/slurm.conf   # daemons find gres.conf beside it only through this
  add_hosts_entry
  start_munge
  slurmctld -f "$DIR/etc/slurm.conf" -i
  for i in $(seq 1 "$NODES"); do slurmd -f "$DIR/etc/slurm.conf" -N "n$i"; done
  wait_idle
}

pids() { cat "$DIR"/run/*.pid 2>/dev/null || true; }

# A zombie passes `kill -0` (PID 1 here may never reap our daemons), so read its state.
alive() { [[ -r /proc/$1/stat ]] && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat"; }

# Jobs still running would leave slurmstepd and their tasks behind the daemons.
cancel_jobs() {
  local jobs
  jobs=$(SLURM_CONF=$DIR/etc/slurm.conf squeue -h -o %A 2>/dev/null) || return 0
  [[ -n $jobs ]] || return 0
  # shellcheck disable=SC2086  # one id per word
  SLURM_CONF=$DIR/etc/slurm.conf scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 40); do
    [[ -z $(SLURM_CONF=$DIR/etc/slurm.conf squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null) ]] && return 0
    sleep 0.25
  done
}

cmd_stop() {
  local pid
  [[ -n $(pids) ]] && cancel_jobs
  for pid in $(pids); do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in $(pids); do alive "$pid" && alive=1; done
    ((alive == 0)) && break
    sleep 0.1
  done
  for pid in $(pids); do alive "$pid" && kill -9 "$pid" 2>/dev/null; done
  rm -f "$DIR"/run/*.pid
  remove_hosts_entry
  log "stopped"
}

cmd_status() {
  local pid n=0
  for pid in $(pids); do alive "$pid" && n=$((n + 1)); done
  ((n == NODES + 2)) || { echo "not running ($n of $((NODES + 2)) daemons)"; return 1; }
  SLURM_CONF=$DIR/etc/slurm.conf sinfo -N
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
