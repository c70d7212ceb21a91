#!/usr/bin/env bash
# A real Slurm on one host, for tests: one slurmctld and one `slurmd -N nX` per simulated node
# (n1..n3 by default, every node at 127.0.0.1 with its own slurmd port), and a private munged.
#
#   scripts/slurm/cluster.sh up   [STATE_DIR]   install if missing, configure, start, wait for idle
#   scripts/slurm/cluster.sh down [STATE_DIR]   stop every daemon it started (by PID), remove state
#   scripts/slurm/cluster.sh status [STATE_DIR]
#
# STATE_DIR (default ${FB_SLURM_DIR:-/tmp/fusion_bench-slurm}) holds slurm.conf, the munge key and
# socket, the controller's state, one spool folder per node, logs, and the daemons' PID files;
# `source STATE_DIR/env.sh` points sinfo/sbatch/scontrol at this cluster (SLURM_CONF).
# Settings: FB_SLURM_NODES (3), FB_SLURM_CPUS (CPUs per node, 2), FB_SLURM_PORT_BASE (17800:
# slurmctld on it, node i's slurmd on base+i), FB_SLURM_CRED_EXPIRE (10 s; a requeued job waits
# this long before it may start again, Slurm's default is 120 s), FB_SLURM_FIRST_JOB_ID (1; set
# it so that ports derived from job ids, like fusion_bench's coordinator's, differ between
# clusters). Each node advertises one "GPU" (gres/gpu backed by /dev/null: a count, no device),
# so recipes with --gpus-per-task run unchanged.
# Node names must resolve to this host for programs that connect to "the first node": names that
# do not resolve are added to /etc/hosts (127.0.0.1, with a marker) by `up` and removed by `down`.
# Exit status of `up`: 0 up, 3 Slurm cannot be installed here (caller may skip), 1 other failure.
# Run as root (installs packages, daemons run jobs as the submitting user). No systemd needed.
set -euo pipefail

CMD=${1:-}
S=${2:-${FB_SLURM_DIR:-/tmp/fusion_bench-slurm}}
NODES=${FB_SLURM_NODES:-3}
CPUS=${FB_SLURM_CPUS:-2}
PORT_BASE=${FB_SLURM_PORT_BASE:-17800}
CRED_EXPIRE=${FB_SLURM_CRED_EXPIRE:-10}
FIRST_JOB_ID=${FB_SLURM_FIRST_JOB_ID:-1}
MARK="# fusion_bench-slurm ${S}"
DAEMONS=(munged slurmctld slurmd)

die() { echo "cluster.sh: $*" >&2; exit 1; }
cannot() { echo "cluster.sh: Slurm cannot run here: $*" >&2; exit 3; }
node_names() { local i; for (( i = 1; i <= NODES; i++ )); do echo "n$i"; done; }

# alive PIDFILE: the PID if that process is alive and is one of our daemons.
alive() {
    local pid comm
    [[ -s "$1" ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ " ${DAEMONS[*]} " == *" $comm "* ]] || return 1
    echo "$pid"
}

install_if_missing() {
    local missing=0 c
    for c in slurmctld slurmd sinfo sbatch munged; do
        command -v "$c" >/dev/null 2>&1 || [[ -x "/usr/sbin/$c" ]] || missing=1
    done
    [[ $missing -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || cannot "not installed, and installing needs root"
    command -v apt-get >/dev/null || cannot "not installed, and there is no apt-get"
    echo "cluster.sh: installing slurmctld slurmd slurm-client munge (apt-get)"
    local t0=$SECONDS
    local log="/tmp/fb-slurm-apt.$$.log"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurmctld slurmd slurm-client munge; } >"$log" 2>&1; then
        tail -5 "$log" >&2
        rm -f "$log"
        cannot "apt-get install slurmctld slurmd slurm-client munge failed"
    fi
    rm -f "$log"
    echo "cluster.sh: installed in $(( SECONDS - t0 )) s"
}

write_conf() {
    local h i
    h=$(hostname -s)
    cat >"$S/slurm.conf" <<EOF
# Written by scripts/slurm/cluster.sh: a test cluster of $NODES simulated nodes on $h.
ClusterName=fbtest
SlurmctldHost=$h
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$S/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/pid/slurmctld.pid
SlurmdPidFile=$S/pid/slurmd.%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.%n.log
# No cgroups in a container: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
# Preemption-friendly: jobs may be requeued; SIGTERM, then SIGKILL after KillWait seconds.
JobRequeue=1
KillWait=10
MinJobAge=600
FirstJobId=$FIRST_JOB_ID
# Start jobs (a requeued one too, once its hold is over) within seconds, not minutes.
SchedulerParameters=sched_interval=2,bf_interval=2
GresTypes=gpu
EOF
    echo "NodeName=n[1-$NODES] Name=gpu File=/dev/null Count=1" >"$S/gres.conf"
    for (( i = 1; i <= NODES; i++ )); do
        echo "NodeName=n$i NodeHostname=$h NodeAddr=127.0.0.1 Port=$(( PORT_BASE + i ))" \
            "CPUs=$CPUS RealMemory=1000 Gres=gpu:1 State=UNKNOWN" >>"$S/slurm.conf"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$S/slurm.conf"
    echo "export SLURM_CONF='$S/slurm.conf'" >"$S/env.sh"
}

add_hosts() {
    local n
    for n in $(node_names); do
        # Also when it resolves through another test cluster's line, which may go first.
        if ! getent hosts "$n" >/dev/null 2>&1 \
                || grep -q "^127\.0\.0\.1 $n # fusion_bench-slurm " /etc/hosts; then
            [[ -w /etc/hosts ]] || die "$n does not resolve and /etc/hosts is not writable"
            echo "127.0.0.1 $n $MARK" >>/etc/hosts
        fi
    done
}

# Removes our /etc/hosts lines, and those of clusters whose state folder is gone (a killed test).
remove_hosts() {
    local line dir kept=() drop=0
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" == *"# fusion_bench-slurm "* ]]; then
            dir=${line##*# fusion_bench-slurm }
            if [[ "$dir" == "$S" || ! -d "$dir" ]]; then
                drop=1
                continue
            fi
        fi
        kept+=("$line")
    done </etc/hosts
    (( drop )) || return 0
    # Rewrite in place: /etc/hosts may be a bind mount that cannot be replaced by a rename.
    printf '%s\n' "${kept[@]}" >/etc/hosts
}

wait_idle() {
    local i idle
    for (( i = 0; i < 300; i++ )); do
        idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$' || true)
        [[ "$idle" -ge "$NODES" ]] && return 0
        sleep 0.1
    done
    sinfo -N >&2 || true
    die "the nodes are not idle after 30 s (logs in $S/log)"
}

up() {
    local t0=$SECONDS n pid
    [[ $(id -u) -eq 0 ]] || cannot "needs root (installs packages, starts daemons)"
    if [[ -f "$S/.fusion_bench-slurm" ]]; then
        if alive "$S/pid/slurmctld.pid" >/dev/null && alive "$S/pid/munged.pid" >/dev/null; then
            # shellcheck source=/dev/null
            source "$S/env.sh"
            if wait_idle 2>/dev/null; then
                echo "cluster.sh: already up in $S"
                return 0
            fi
        fi
        echo "cluster.sh: stale state in $S; stopping what is left of it"
        down
    fi
    install_if_missing
    [[ -e "$S" ]] && die "$S exists and is not a cluster.sh state folder; remove it or pick another"
    mkdir -p "$S"/{state,spool,pid,log,munge}
    touch "$S/.fusion_bench-slurm"
    chmod 755 "$S"
    for n in $(node_names); do mkdir -p "$S/spool/$n"; done

    # A private munged with its own key and socket: no clash with a system munged.
    dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$S/munge"
    chmod 755 "$S/munge"
    chmod 400 "$S/munge/munge.key"
    runuser -u munge -- /usr/sbin/munged --key-file="$S/munge/munge.key" \
        --socket="$S/munge/munge.socket" --pid-file="$S/munge/munged.pid" \
        --log-file="$S/munge/munged.log" --seed-file="$S/munge/munged.seed" \
        || die "munged did not start: $(tail -3 "$S/munge/munged.log" 2>/dev/null)"
    cp "$S/munge/munged.pid" "$S/pid/munged.pid"
    munge -n --socket="$S/munge/munge.socket" | unmunge --socket="$S/munge/munge.socket" >/dev/null \
        || die "munge -n | unmunge fails"

    write_conf
    add_hosts
    export SLURM_CONF="$S/slurm.conf"
    /usr/sbin/slurmctld -f "$SLURM_CONF" -i || die "slurmctld: $(tail -5 "$S/log/slurmctld.log")"
    for n in $(node_names); do
        /usr/sbin/slurmd -f "$SLURM_CONF" -N "$n" || die "slurmd -N $n: $(tail -5 "$S/log/slurmd.$n.log")"
    done
    wait_idle
    for pid in "$S"/pid/*.pid; do
        alive "$pid" >/dev/null || die "$(basename "$pid" .pid) is not running"
    done
    echo "cluster.sh: $NODES nodes idle in $(( SECONDS - t0 )) s; source $S/env.sh"
}

down() {
    local f pid i left
    [[ -d "$S" ]] || { remove_hosts; return 0; }
    [[ -f "$S/.fusion_bench-slurm" ]] || die "$S is not a cluster.sh state folder; not touching it"
    if [[ -f "$S/slurm.conf" ]] && alive "$S/pid/slurmctld.pid" >/dev/null; then
        export SLURM_CONF="$S/slurm.conf"
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for (( i = 0; i < 100; i++ )); do
            [[ -z "$(squeue -h -t R,CG,CF,S 2>/dev/null)" ]] && break
            sleep 0.1
        done
    fi
    # slurmd first, then the controller, then munge; each by the PID in its file.
    for f in "$S"/pid/slurmd.*.pid "$S/pid/slurmctld.pid" "$S/pid/munged.pid"; do
        pid=$(alive "$f") || continue
        kill -TERM "$pid" 2>/dev/null || true
        for (( i = 0; i < 100; i++ )); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.1
        done
        if [[ -d "/proc/$pid" ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    left=""
    for f in "$S"/pid/*.pid; do
        [[ -e "$f" ]] || continue
        pid=$(alive "$f") && left+=" $pid"
    done
    [[ -z "$left" ]] || die "daemons still running:$left"
    remove_hosts
    rm -rf "$S"
    echo "cluster.sh: stopped, $S removed"
}

status() {
    local f pid
    [[ -f "$S/.fusion_bench-slurm" ]] || { echo "down"; return 1; }
    for f in "$S"/pid/*.pid; do
        pid=$(alive "$f") && echo "$(basename "$f" .pid) $pid" || echo "$(basename "$f" .pid) dead"
    done
    SLURM_CONF="$S/slurm.conf" sinfo -N || true
}

case "$CMD" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status [STATE_DIR]" >&2; exit 2 ;;
esac
