# shellcheck shell=bash
# Shared by the network-namespace fault scripts (run as root): skip/fail, a hub topology of
# three namespaces (the coordinator's, ${NS_C}, joined to ${NS_1} and ${NS_2} by veth pairs
# ${P}c1/${P}w1 on 10.201.1.0/24 and ${P}c2/${P}w2 on 10.201.2.0/24), a scratch folder ${TMP},
# PIDS to kill on exit, and polling helpers. Everything is removed on exit.
# Without root or `ip netns` a script skips (exit 0), except under CI=true, where a skip is a
# failure.
HARNESS=${HARNESS:-netns fault harness}
# shellcheck source=harness-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness-lib.sh"

[[ $(id -u) -eq 0 ]] || skip "needs root (creates network namespaces)"
# A fresh machine may lack iproute2: install it (as scripts/slurm/cluster.sh installs Slurm).
if ! command -v ip >/dev/null && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null 2>&1; } || true
fi
command -v ip >/dev/null || skip "the ip command (iproute2) is missing and could not be installed"
ip netns list >/dev/null 2>&1 || skip "ip netns is unavailable"

P="fbn$(( $$ % 10000 ))"
NS_C="${P}c" NS_1="${P}w1" NS_2="${P}w2"
TMP=$(mktemp -d)
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for ns in "$NS_C" "$NS_1" "$NS_2"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

if ! ip netns add "$NS_C" 2>"$TMP/err"; then
    skip "ip netns add failed: $(cat "$TMP/err")"
fi
ip netns add "$NS_1"
ip netns add "$NS_2"
for i in 1 2; do
    ns_var="NS_$i"
    ip link add "${P}c$i" type veth peer name "${P}w$i"
    ip link set "${P}c$i" netns "$NS_C"
    ip link set "${P}w$i" netns "${!ns_var}"
    ip -n "$NS_C" addr add "10.201.$i.1/24" dev "${P}c$i"
    ip -n "${!ns_var}" addr add "10.201.$i.2/24" dev "${P}w$i"
    ip -n "$NS_C" link set "${P}c$i" up
    ip -n "${!ns_var}" link set "${P}w$i" up
    ip -n "${!ns_var}" link set lo up
done
ip -n "$NS_C" link set lo up

# wait_for FILE PATTERN SECONDS
wait_for() {
    local i
    for (( i = 0; i < $3 * 20; i++ )); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    fail "no '$2' in $1 within $3 s: $(cat "$1" 2>/dev/null)"
}

# wait_pid PID SECONDS: the exit status, or fails on timeout.
wait_pid() {
    local i st
    for (( i = 0; i < $2 * 20; i++ )); do
        st=$(ps -o stat= -p "$1" 2>/dev/null || true)
        if [[ -z $st || $st == Z* ]]; then
            wait "$1"
            return $?
        fi
        sleep 0.05
    done
    fail "process $1 still running after $2 s"
}

