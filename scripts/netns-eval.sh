#!/usr/bin/env bash
# Distributed evaluation across network namespaces with a link cut (run as root).
#
# The real `fusion_bench` binary, task arithmetic on the bundled fixtures (TA8, batches of 16):
#   1. one process alone: the reference report;
#   2. a coordinator (--serve) in the hub namespace and two workers (--join) in their own
#      namespaces, each joined to the hub by a veth pair; once worker w1 has evaluated a batch,
#      its link goes down (`ip link set <veth> down`). The coordinator must detect the loss,
#      re-queue w1's items, and write a report byte-identical to the reference, with
#      workers_lost = 1 and computed_twice = 0 in its provenance file.
# Everything (namespaces, processes by PID, temp files) is removed on exit.
#
# Usage: scripts/netns-eval.sh [path/to/fusion_bench]
# Without root or `ip netns` it skips (exit 0), except under CI=true, where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${1:-target/release/fusion_bench}
PORT=47200

# shellcheck source=netns-lib.sh
source scripts/netns-lib.sh
[[ -x "$FB" ]] || fail "no fusion_bench binary at $FB (cargo build --release)"

fixture_job "$PWD"

RUST_LOG=warn "$FB" "${ARGS[@]}" "report_save_path=$TMP/single.json" >"$TMP/single.log" 2>&1 \
    || fail "single-process run: $(cat "$TMP/single.log")"

RUST_LOG=info ip netns exec "$NS_C" "$FB" "${ARGS[@]}" "report_save_path=$TMP/cut.json" \
    --serve "0.0.0.0:$PORT" --min-workers 2 --job-dir "$TMP/job" >"$TMP/c.log" 2>&1 &
CPID=$!
PIDS+=("$CPID")
wait_for "$TMP/c.log" "coordinator listening" 60
for i in 1 2; do
    RUST_LOG=info,fusion_bench::program::work=debug ip netns exec "${P}w$i" "$FB" "${ARGS[@]}" \
        "report_save_path=$TMP/w$i.json" --join "10.201.$i.1:$PORT" --node-name "w$i" \
        --job-dir "$TMP/job" >"$TMP/w$i.log" 2>&1 &
    PIDS+=("$!")
done
wait_for "$TMP/w1.log" "batch" 60
ip -n "$NS_1" link set "${P}w1" down
CUT=$(date +%s.%N)
echo "cut w1's link after its first batch"
wait_pid "$CPID" 120 || fail "coordinator failed: $(tail -20 "$TMP/c.log")"
LOST_LINE=$(grep -m1 "lost" "$TMP/c.log" | grep -i "w1" || true)
[[ -n "$LOST_LINE" ]] || fail "the coordinator never reported w1 lost: $(tail -20 "$TMP/c.log")"
LOST_AT=$(date -d "$(echo "$LOST_LINE" | awk '{print $1}')" +%s.%N)
DETECT_MS=$(awk -v a="$LOST_AT" -v b="$CUT" 'BEGIN { printf "%d", (a - b) * 1000 }')
echo "w1 declared lost ${DETECT_MS} ms after the cut (printed, not checked: a loaded machine is slow, not wrong)"
cmp "$TMP/single.json" "$TMP/cut.json" || fail "reports differ: $(cat "$TMP/single.json") vs $(cat "$TMP/cut.json")"
grep -q '"workers_lost": 1' "$TMP/cut.json.meta.json" || fail "provenance: $(cat "$TMP/cut.json.meta.json")"
grep -q '"computed_twice": 0' "$TMP/cut.json.meta.json" || fail "provenance: $(cat "$TMP/cut.json.meta.json")"
[[ ! -e "$TMP/w1.json" && ! -e "$TMP/w2.json" ]] || fail "a worker wrote a report"
echo "PASS: the report with w1's link cut equals the single-process report"
