#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (munged + slurmctld + slurmd, no systemd, no
# slurmdbd), for the slurm-profile test and for trying profiles/slurm by hand.
#
#   scripts/local_slurm.sh start    install Debian's slurmctld/slurmd/munge if missing, start
#   scripts/local_slurm.sh status   which daemons run (exit 0 only when all three do), sinfo
#   scripts/local_slurm.sh stop     cancel the cluster's jobs, stop the daemons this script started
#
# Needs root (apt-get; slurmd runs jobs as the submitting user). All state lives in one folder,
# $SLURM_LOCAL_DIR (default .slurm-local/ in the repository): slurm.conf, gres.conf, the munge key
# and socket, spool, logs, pid files. SLURM's clients find the cluster through SLURM_CONF:
#   export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf; sinfo; squeue --states=all
# and through /etc/slurm/slurm.conf, which `start` links to that file when no SLURM
# configuration is installed there (and `stop` removes again): inside a job, the plugin's
# `srun` runs with SLURM_CONF removed from its environment and reads only the default path.
#
# The cluster: one node (this machine's CPUs and memory, as `slurmd -C` reports them) in two
# partitions named like profiles/slurm's, `cpu` (default) and `gpu`, and one GRES `gpu` whose
# "device" is /dev/null, so that `--gpus=1` jobs are schedulable on a machine without a GPU (they
# then run on the CPU). No accounting storage: `sacct` has no data, status comes from `squeue`,
# and finished jobs stay visible there for MinJobAge (1 h).
# Ports: SLURM_LOCAL_CTLD_PORT (default 6817) and SLURM_LOCAL_SLURMD_PORT (default 6818).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SLURM_LOCAL_DIR:-$REPO/.slurm-local}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
PACKAGES=(munge slurm-client slurmctld slurmd)
DAEMONS=(munged slurmctld slurmd)
SYSTEM_CONF=/etc/slurm/slurm.conf
# Finished jobs stay in squeue this long (s); the plugin needs >= 3x its first status-check delay.
MIN_JOB_AGE=3600

die() {
    echo "local_slurm.sh: $*" >&2
    exit 1
}

# PID recorded for a daemon if that process still runs the daemon, else nothing.
recorded_pid() {
    local name=$1 pidfile=$STATE/pids/$1.pid pid
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 0
    local program
    program=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)
    if [[ ${program##*/} == "$name" ]]; then
        echo "$pid"
    fi
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing Debian packages ${missing[*]}; run as root or: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu only)"
    echo "local_slurm.sh: installing ${missing[*]}"
    local apt=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${PACKAGES[@]}")
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$STATE/log/apt.log" 2>&1; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq >>"$STATE/log/apt.log" 2>&1 ||
            die "apt-get update failed, see $STATE/log/apt.log"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$STATE/log/apt.log" 2>&1 ||
            die "apt-get install ${PACKAGES[*]} failed, see $STATE/log/apt.log"
    fi
}

write_config() {
    local host node_line
    host=$(hostname -s)
    # `slurmd -C` prints this machine's real shape: CPUs, sockets, cores, threads, memory.
    node_line=$(slurmd -C | sed -n 's/^NodeName=[^ ]* //p' | sed 's/ *UpTime=.*//')
    [[ $node_line == *CPUs=* ]] || die "slurmd -C did not report this machine's CPUs: $(slurmd -C 2>&1)"
    cat >"$STATE/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on $host; all state under $STATE.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd or cgroups here: track job processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs and memory are the consumable resources (one job per CPU on a small machine).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
# No slurmdbd: sacct has no data; squeue keeps finished jobs for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=$MIN_JOB_AGE
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
# A GPU resource without a device file: --gpus=1 is schedulable, jobs run on the CPU.
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 $node_line Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/gres.conf" <<EOF
# Written by scripts/local_slurm.sh: one GPU slot whose "device" is /dev/null (see slurm.conf);
# SLURM drops GPUs without a device file.
AutoDetect=off
NodeName=$host Name=gpu File=/dev/null
EOF
}

# /etc/slurm/slurm.conf -> our slurm.conf, unless a real SLURM configuration is installed there.
link_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$STATE/slurm.conf" ]]; then
        return 0
    fi
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        die "$SYSTEM_CONF exists (another SLURM configuration on this machine); jobs would" \
            "read it instead of $STATE/slurm.conf. Move it away to use the local cluster."
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$STATE/slurm.conf" "$SYSTEM_CONF"
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$STATE/slurm.conf" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

# Start one daemon in the foreground of its own session, output to its log, and record its PID.
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/pids/$name.pid"
}

# Run a command once a second until it succeeds, at most $1 times.
wait_for() {
    local seconds=$1
    shift
    for _ in $(seq "$seconds"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}

no_running_jobs() {
    [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i) ]]
}

node_idle() {
    [[ $(sinfo -h -N -o %t | head -1) =~ ^(idle|mix|alloc)$ ]]
}

start() {
    mkdir -p "$STATE"/{log,pids,run,state,spool,munge}
    chmod 755 "$STATE/munge"
    install_packages
    export SLURM_CONF=$STATE/slurm.conf
    local running=0 name
    for name in "${DAEMONS[@]}"; do
        [[ -n $(recorded_pid "$name") ]] && running=$((running + 1))
    done
    if ((running == ${#DAEMONS[@]})); then
        echo "local_slurm.sh: already running ($STATE)"
        return 0
    fi
    ((running == 0)) || stop
    [[ $(id -u) == 0 ]] || die "slurmd must run as root"
    write_config
    link_system_conf
    if [[ ! -s $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$STATE/munge/munge.key"
    fi
    rm -f "$STATE/munge/munge.socket.2"  # left behind by a killed munged
    launch munged munged --foreground --force --key-file="$STATE/munge/munge.key" \
        --socket="$STATE/munge/munge.socket.2" --pid-file="$STATE/run/munged.pid" \
        --seed-file="$STATE/munge/munged.seed" --log-file="$STATE/log/munged.log"
    wait_for 20 test -S "$STATE/munge/munge.socket.2" ||
        die "munged did not start; see $STATE/log/munged.log and munged.out"
    # -c: every start is a fresh cluster (no job or node state from an older slurm.conf).
    launch slurmctld slurmctld -D -c -f "$STATE/slurm.conf"
    wait_for 30 scontrol ping ||
        die "slurmctld did not answer; see $STATE/log/slurmctld.log"
    launch slurmd slurmd -D -f "$STATE/slurm.conf"
    wait_for 60 node_idle ||
        die "node not idle ($(sinfo -h -N -o '%t %E' | head -1)); see $STATE/log/slurmd.log"
    echo "local_slurm.sh: running; export SLURM_CONF=$STATE/slurm.conf"
}

stop() {
    export SLURM_CONF=$STATE/slurm.conf
    local name pid jobs
    if [[ -n $(recorded_pid slurmctld) ]]; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            scancel $jobs 2>/dev/null || true
            wait_for 15 no_running_jobs || true
        fi
    fi
    for name in slurmd slurmctld munged; do
        pid=$(recorded_pid "$name")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait_for 15 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
            echo "local_slurm.sh: stopped $name ($pid)"
        fi
        rm -f "$STATE/pids/$name.pid"
    done
    unlink_system_conf
}

status() {
    local name pid down=0
    for name in "${DAEMONS[@]}"; do
        pid=$(recorded_pid "$name")
        if [[ -n $pid ]]; then
            echo "$name: running ($pid)"
        else
            echo "$name: stopped"
            down=1
        fi
    done
    if ((down == 0)); then
        SLURM_CONF=$STATE/slurm.conf sinfo
        echo "export SLURM_CONF=$STATE/slurm.conf"
    fi
    return $((down * 3))
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start|stop|status (state in \$SLURM_LOCAL_DIR, default $REPO/.slurm-local)" ;;
esac
