#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests of `--launcher slurm` (tests/test_slurm.py).
#   .ci/slurm.sh start   write /etc/slurm/slurm.conf, start munged, slurmctld and slurmd, wait until the node is idle
#   .ci/slurm.sh stop    stop them (by their pid files)
#   .ci/slurm.sh status  sinfo
# Needs root and Debian's slurmctld slurmd munge slurm-client packages (.ci/run installs them). No systemd: the
# daemons are started directly. No accounting database (slurmdbd): `sacct` fails, which cnnlab's launcher allows
# for (it watches the job through squeue); see README "On a cluster (Slurm)".
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
STATE=/var/lib/slurm
RUN=/run/cnnlab-slurm                     # pid files of the daemons this script started
TIMEOUT=${SLURM_START_TIMEOUT:-60}        # seconds to wait for the node to come up

write_conf() {
    local host node
    host=$(hostname -s)
    # slurmd -C reports the node as slurmd sees it (CPUs, sockets, cores, RealMemory): a node configured with more
    # than it has is drained, so take its own figures.
    node=$(slurmd -C | head -n 1)
    mkdir -p /etc/slurm "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
    cat >"$CONF" <<EOF
# Written by cnnlab's .ci/slurm.sh: a one-node cluster for tests.
ClusterName=cnnlab-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container without systemd: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# Cores are the consumable resource (memory is not: a job without --mem would otherwise take the whole node).
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
# No accounting database: nothing is gathered or stored (sacct reports "accounting storage is disabled").
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# A node that was down (e.g. slurmd restarted) comes back by itself.
ReturnToService=2
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
        return                                # already running (started earlier or by the system)
    fi
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null || true
}

logs_tail() {
    for f in "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
        [ -f "$f" ] && { echo "--- tail of $f"; tail -n 20 "$f"; }
    done
}

running() {                                 # running NAME: such a daemon runs on this machine
    pgrep -x "$1" >/dev/null
}

node_ready() {                              # the node takes jobs (idle, or already running some)
    sinfo -h -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated|completing'
}

start() {
    [ "$(id -u)" = 0 ] || { echo "slurm.sh: must run as root (it writes $CONF and starts the daemons)" >&2; exit 2; }
    for cmd in slurmctld slurmd munged sinfo sbatch pgrep; do
        command -v "$cmd" >/dev/null || { echo "slurm.sh: $cmd not found: apt-get install slurmctld slurmd munge slurm-client procps" >&2; exit 2; }
    done
    # A second start (or a cluster up already) leaves it as it is. The controller still calls a node idle for
    # SlurmdTimeout after its slurmd died: hence the look at the daemons themselves.
    if node_ready && running slurmd && running slurmctld; then
        echo "slurm: already running ($(sinfo -h -o 'partition %P, %D node (%N), %T'))"
        return
    fi
    # Never overwrite a real cluster's configuration: only the one this script wrote.
    if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -q "^# Written by cnnlab's .ci/slurm.sh"; then
        echo "slurm.sh: $CONF exists and is not cnnlab's test cluster; not touching it (sinfo: $(sinfo -h 2>&1 | head -n 1))" >&2
        exit 2
    fi
    mkdir -p "$RUN"
    start_munge
    if ! running slurmctld; then            # a half-started cluster (e.g. slurmd died) keeps its controller
        write_conf
        slurmctld                           # both daemonize and write their pid files
    fi
    running slurmd || slurmd
    local waited=0
    until node_ready; do
        if [ "$waited" -ge "$TIMEOUT" ]; then
            echo "slurm.sh: the node did not become idle within ${TIMEOUT}s (sinfo: $(sinfo -h 2>&1 | head -n 3))" >&2
            logs_tail >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "slurm: up after ${waited}s: $(sinfo -h -o 'partition %P, %D node (%N), %T, CPUs A/I/O/T %C')"
}

stop() {
    local name pid stopped=""
    for name in slurmd slurmctld munged; do     # only what start started (their pid files), never another's
        [ -f "$RUN/$name.pid" ] || continue
        pid=$(cat "$RUN/$name.pid")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            stopped="$stopped $name"
        fi
        rm -f "$RUN/$name.pid"
    done
    echo "slurm: stopped${stopped:- nothing (none of its daemons was running)}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
