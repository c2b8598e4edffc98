#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the tests marked `slurm` (tests/test_slurm_cluster.py):
#
#   tests/cluster/slurm.sh start   # writes the config, starts munged, slurmctld and slurmd, waits for an idle node
#   tests/cluster/slurm.sh stop    # stops what `start` started (by the PID files it wrote), nothing else
#   tests/cluster/slurm.sh env     # the line to eval so that sbatch, squeue, ... talk to this cluster
#
# It installs nothing: where slurmctld, slurmd and munged are missing, or it is not root, it says so and exits 3
# (the tests then skip with the reason); exit 4: already running. Everything lives in $ROBUST_SPARSE_SLURM_DIR
# (default /tmp/robust-sparse-slurm): its own munge key and socket, slurm.conf, state, spool, logs and PID files,
# so no system file (/etc/slurm, /etc/munge, /run/munge) is read or written and a machine-wide Slurm, if any, is
# left alone (its own ports too). Must run as root (slurmd starts the jobs as their users). No accounting
# storage, as on many small clusters: sacct answers "Slurm accounting storage is disabled", and job states come
# from scontrol/squeue while Slurm remembers the job (MinJobAge).
set -euo pipefail

DIR="${ROBUST_SPARSE_SLURM_DIR:-/tmp/robust-sparse-slurm}"
CONF="$DIR/slurm.conf"
# Ports of our own, away from Slurm's defaults (6817, 6818), so that a system Slurm on this host is not touched
CTLD_PORT="${ROBUST_SPARSE_SLURM_PORT:-16817}"
SLURMD_PORT="$((CTLD_PORT + 1))"
WAIT_SECONDS=60  # for the node to come up idle; a loaded 2-core VM takes a few seconds

say() { echo "slurm.sh: $*" >&2; }

missing() {
    local name absent=()
    for name in munged slurmctld slurmd sinfo scontrol sbatch; do
        command -v "$name" >/dev/null 2>&1 || [ -x "/usr/sbin/$name" ] || absent+=("$name")
    done
    echo "${absent[*]:-}"
}

running() {  # whether the process of PID file $1 is alive
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
    local absent
    absent="$(missing)"
    if [ -n "$absent" ]; then
        say "not started: $absent not installed (Debian: apt-get install slurm-wlm munge)"
        exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
        say "not started: must run as root (slurmd starts jobs as their users)"
        exit 3
    fi
    if running "$DIR/slurmctld.pid" || running "$DIR/slurmd.pid" || running "$DIR/munged.pid"; then
        say "already running in $DIR (stop it first: $0 stop)"
        exit 4
    fi
    export PATH="$PATH:/usr/sbin"
    mkdir -p "$DIR"/{state,spool,munge}
    chmod 700 "$DIR/munge"
    # a key of our own: the system's /etc/munge/munge.key belongs to the munge user, and munged refuses a key
    # its user does not own
    [ -s "$DIR/munge/munge.key" ] || head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"

    local host node cpus memory
    host="$(hostname -s)"
    node="$(slurmd -C | head -n 1)"  # NodeName=host CPUs=2 Boards=1 ... RealMemory=24105
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")"
    memory="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
    # below the machine's: slurmd drains a node that has less memory than slurm.conf claims
    memory=$((memory * 8 / 10))
    cat >"$CONF" <<EOF
# written by tests/cluster/slurm.sh for the tests marked slurm; one node, this host
ClusterName=robust-sparse-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# an ended job stays in scontrol/squeue -t all for 2 minutes: long enough for a test (and a sweep polling
# every few seconds) to read its final state, short enough that the test's own later jobs are not crowded
MinJobAge=120
# SIGTERM to SIGKILL at a time limit or scancel: the training saves last.pt within this
KillWait=10
InactiveLimit=0
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munge.seed" --force
    # -c: no job of an earlier start is recovered from $DIR/state (it would hold the node: not idle)
    SLURM_CONF="$CONF" slurmctld -c -f "$CONF"
    SLURM_CONF="$CONF" slurmd -f "$CONF"

    local deadline=$((SECONDS + WAIT_SECONDS)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$host" -o %t 2>/dev/null || true)"
        if [ "$state" = idle ]; then
            say "up: node $host ($cpus CPUs, ${memory} MB), partition debug; $(env_line)"
            return 0
        fi
        sleep 1
    done
    say "the node did not come up idle within ${WAIT_SECONDS} s (sinfo: ${state:-no answer}); logs in $DIR"
    stop
    exit 1
}

stop_one() {  # $1: name, $2: PID file
    local pid
    running "$2" || { rm -f "$2"; return 0; }
    pid="$(cat "$2")"
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }
        sleep 0.2
    done
    say "$1 (pid $pid) did not stop on SIGTERM within 10 s; killed"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$2"
}

stop() {
    # slurmd first: it ends its jobs' steps (their processes) as it goes
    stop_one slurmd "$DIR/slurmd.pid"
    stop_one slurmctld "$DIR/slurmctld.pid"
    stop_one munged "$DIR/munged.pid"
    say "stopped (what was started in $DIR)"
}

env_line() {
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) env_line ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
