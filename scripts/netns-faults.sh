#!/usr/bin/env bash
# Network-namespace fault harness for the cluster transport + scheduler (run as root).
#
# Topology: three namespaces; the coordinator's namespace is the hub, joined to each worker's
# namespace by its own veth pair (10.201.1.0/24 to worker w1, 10.201.2.0/24 to worker w2).
# Runs cluster/examples/netns_node (transport + Scheduler, toy items of WORK_MS each):
#   1. a foreign node (another job's CA) tries to join across namespaces: must be refused;
#   2. an uninterrupted run: records the result digest;
#   3. the same run, with `ip link set <veth> down` on w1's link after CUT_AFTER seconds: the
#      coordinator must detect the loss (how long it took is printed, not checked), re-queue
#      w1's items and finish with the same digest.
# Everything (namespaces, processes by PID, temp files) is cleaned up on exit.
#
# Usage: scripts/netns-faults.sh [path/to/netns_node]
# Without root or `ip netns` it skips (exit 0), except under CI=true, where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

ITEMS=${ITEMS:-80}
WORK_MS=${WORK_MS:-50}
CUT_AFTER=${CUT_AFTER:-1}
PORT=47100

BIN=${1:-${CARGO_TARGET_DIR:-target}/release/examples/netns_node}
if [[ ! -x "$BIN" ]]; then
    cargo build --release -p fusion_cluster --example netns_node
fi

# shellcheck source=netns-lib.sh
source scripts/netns-lib.sh
[[ -x "$BIN" ]] || fail "no netns_node binary at $BIN"

JOB="$TMP/job"
mkdir -m 700 "$JOB"

# run NAME CUT: one coordinator + two workers; CUT=1 cuts w1's link mid-run.
run() {
    local name=$1 cut=$2 log="$TMP/$1"
    ip netns exec "$NS_C" "$BIN" coordinator "0.0.0.0:$PORT" "$JOB" 2 "$ITEMS" "$WORK_MS" \
        >"$log.c" 2>&1 &
    local cpid=$!
    PIDS+=("$cpid")
    wait_for "$log.c" LISTENING 10
    if [[ $name == first ]]; then
        # A node holding another job's CA, from a worker's namespace: refused at TLS.
        local rc=0
        ip netns exec "$NS_2" timeout 20 "$BIN" intruder "10.201.2.1:$PORT" "$TMP/other-job" \
            >"$log.intruder" 2>&1 || rc=$?
        [[ $rc -eq 0 ]] || fail "intruder was not refused (exit $rc): $(cat "$log.intruder")"
        grep -q '^REFUSED' "$log.intruder" || fail "intruder: $(cat "$log.intruder")"
        echo "intruder refused across namespaces: $(sed -n 's/^REFUSED //p' "$log.intruder")"
    fi
    ip netns exec "$NS_1" "$BIN" worker "10.201.1.1:$PORT" "$JOB" w1 >"$log.w1" 2>&1 &
    PIDS+=("$!")
    ip netns exec "$NS_2" "$BIN" worker "10.201.2.1:$PORT" "$JOB" w2 >"$log.w2" 2>&1 &
    PIDS+=("$!")
    if [[ $cut == 1 ]]; then
        wait_for "$log.c" "JOINED w2" 20
        wait_for "$log.c" "JOINED w1" 20
        sleep "$CUT_AFTER"
        ip -n "$NS_1" link set "${P}w1" down
        CUT_MS=$(date +%s%3N)
        echo "cut w1's link at $CUT_MS"
    fi
    local rc=0
    wait_pid "$cpid" 120 || rc=$?
    [[ $rc -eq 0 ]] || fail "coordinator of run $name exited with $rc: $(cat "$log.c")"
    grep '^RESULT' "$log.c" || fail "no RESULT in run $name: $(cat "$log.c")"
}

run first 0
DIGEST1=$(awk '/^RESULT/ {print $2}' "$TMP/first.c")
grep -q 'lost=\[\]' "$TMP/first.c" || fail "the uninterrupted run lost a worker: $(cat "$TMP/first.c")"

run cut 1
DIGEST2=$(awk '/^RESULT/ {print $2}' "$TMP/cut.c")
LOST_MS=$(awk '$1 == "LOST" && $2 == "w1" {print $3; exit}' "$TMP/cut.c")
[[ -n "$LOST_MS" ]] || fail "the coordinator never reported w1 lost: $(cat "$TMP/cut.c")"
DETECT_MS=$(( LOST_MS - CUT_MS ))
grep '^LOST\|^REQUEUED' "$TMP/cut.c"
echo "link cut detected after ${DETECT_MS} ms"
grep -q 'lost=\[w1\]' "$TMP/cut.c" || fail "expected exactly w1 lost: $(cat "$TMP/cut.c")"
[[ "$DIGEST1" == "$DIGEST2" ]] || fail "digest differs: uninterrupted $DIGEST1, cut $DIGEST2"
echo "PASS: same digest $DIGEST1 with and without the cut; w1's items re-queued"
