#!/usr/bin/env bash
# WE-MoE router training across network namespaces, its ring cut mid-training (run as root).
#
# The real `fusion_bench` binary, the seed's B/32 WE-MoE line on the bundled fixtures (30 steps,
# seed 42):
#   1. one process alone: the reference report and trained model;
#   2. a coordinator (--serve) in the hub namespace and two workers (--join) in their own
#      namespaces, each joined to the hub by a veth pair, the hub routing between them; the
#      router gradients go round the ring coordinator → w1 → w2 → coordinator. Once step 3 is
#      done, w1's link goes down (`ip link set <veth> down`), cutting its coordinator link and
#      both its ring links. The step under way must run again on a ring of the coordinator and
#      w2, and the trained model and the report must be the single process's, byte for byte;
#   3. the same three processes again (w1's link back up), but once step 3 is done the hub stops
#      forwarding (`net.ipv4.ip_forward=0`): the workers can no longer reach each other, while
#      each still reaches the coordinator (a firewall that opens only the coordinator's port).
#      Every ring attempt fails with every process joined; after two in a row the coordinator
#      must say so and relay the gradients itself, and the trained model and the report must
#      again be the single process's, byte for byte.
# Everything (namespaces, processes by PID, temp files) is removed on exit.
#
# Usage: scripts/netns-wemoe.sh [path/to/fusion_bench]
# Without root or `ip netns` it skips (exit 0), except under CI=true, where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${1:-target/release/fusion_bench}
HARNESS="netns WE-MoE ring harness"

# shellcheck source=netns-lib.sh
source scripts/netns-lib.sh
[[ -x "$FB" ]] || fail "no fusion_bench binary at $FB (cargo build --release)"

# The workers reach each other through the hub.
ip netns exec "$NS_C" sysctl -qw net.ipv4.ip_forward=1
for i in 1 2; do
    ns_var="NS_$i"
    ip -n "${!ns_var}" route add default via "10.201.$i.1"
done

fixture_job "$PWD"
WEMOE=(method=wemoe/weight_ensembling_moe method.name=clip_weight_ensembling_moe
       method.use_grad_accumulate=false modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8
       taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 fabric.accelerator=cpu
       print_config=false seed=42 method.max_steps=30)
# run_args TAG: the WE-MoE line writing $TMP/TAG/{model.ckpt,report.json} and its caches there
# (every process of a job has the same arguments: the job id comes from them; the checkpoint's
# archive is named after its file, so both runs use one file name).
run_args() {
    local tag=$1
    echo "${WEMOE[@]}" "method.save_checkpoint=$TMP/$tag/model.ckpt" \
        "report_save_path=$TMP/$tag/report.json" "path.cache_dir=$TMP/$tag/cache" \
        "path.log_dir=$TMP/$tag/logs"
}

# shellcheck disable=SC2046
RUST_LOG=warn "$FB" $(run_args single) >"$TMP/single.log" 2>&1 \
    || fail "single-process run: $(tail -20 "$TMP/single.log")"

# start_three TAG PORT: a coordinator in the hub and a worker in each worker namespace, all
# training with run_args TAG; returns once the coordinator has finished step 3 (CPID: its PID,
# WPIDS: the workers').
start_three() {
    local tag=$1 port=$2 i
    WPIDS=()
    # shellcheck disable=SC2046
    RUST_LOG=info,fusion_bench::methods::we_moe::tta=debug ip netns exec "$NS_C" "$FB" \
        $(run_args "$tag") --serve "0.0.0.0:$port" --min-workers 2 --job-dir "$TMP/$tag-job" \
        >"$TMP/$tag-c.log" 2>&1 &
    CPID=$!
    PIDS+=("$CPID")
    wait_for "$TMP/$tag-c.log" "coordinator listening" 60
    for i in 1 2; do
        # shellcheck disable=SC2046
        RUST_LOG=info ip netns exec "${P}w$i" "$FB" $(run_args "$tag") \
            --join "10.201.$i.1:$port" --node-name "w$i" --job-dir "$TMP/$tag-job" \
            >"$TMP/$tag-w$i.log" 2>&1 &
        PIDS+=("$!")
        WPIDS+=("$!")
    done
    wait_for "$TMP/$tag-c.log" " step=3 " 120
}

# same_as_single TAG: the run's report and trained model are the single process's, byte for byte.
same_as_single() {
    cmp "$TMP/single/report.json" "$TMP/$1/report.json" \
        || fail "$1: reports differ: $(cat "$TMP/single/report.json") vs $(cat "$TMP/$1/report.json")"
    cmp "$TMP/single/model.ckpt" "$TMP/$1/model.ckpt" || fail "$1: the trained models differ"
}

# Scenario 1: w1's link cut.
start_three cut 47300
ip -n "$NS_1" link set "${P}w1" down
echo "cut w1's link after step 3"
wait_pid "$CPID" 180 || fail "coordinator failed: $(tail -30 "$TMP/cut-c.log")"
grep -q "worker ring formed" "$TMP/cut-w1.log" || fail "w1 never joined the ring: $(tail -20 "$TMP/cut-w1.log")"
GENERATIONS=$(grep -o "generations=[0-9]*" "$TMP/cut-c.log" | head -1 | cut -d= -f2)
[[ ${GENERATIONS:-0} -ge 2 ]] || fail "the ring was never re-formed: $(grep -i "ring\|lost" "$TMP/cut-c.log" | tail -20)"
grep "the step runs again" "$TMP/cut-c.log" | head -3 | sed 's/^/  /'
grep "adaptation loop" "$TMP/cut-c.log" | grep -q "exchange=ring" \
    || fail "the cut run left the ring: $(grep -i "exchange" "$TMP/cut-c.log" | tail -5)"
same_as_single cut
echo "PASS: with w1's link cut mid-training, the ring re-formed ($GENERATIONS generations) and the trained model and report equal the single process's"

# Scenario 2: the workers cannot reach each other, each still reaches the coordinator. The first
# run's workers are done (w2 was released at its end; w1, cut off, gives up): stop what is left.
for pid in "${WPIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
ip -n "$NS_1" link set "${P}w1" up
ip -n "$NS_1" route replace default via 10.201.1.1
STARTED=$(now)
start_three relay 47301
grep -q "worker ring formed" "$TMP/relay-w1.log" || fail "relay: the ring never formed: $(tail -20 "$TMP/relay-w1.log")"
ip netns exec "$NS_C" sysctl -qw net.ipv4.ip_forward=0
echo "stopped forwarding between the workers after step 3"
wait_pid "$CPID" 180 || fail "relay: coordinator failed: $(tail -30 "$TMP/relay-c.log")"
grep -q "the workers cannot reach each other" "$TMP/relay-c.log" \
    || fail "relay: no fallback warning: $(grep -i "ring\|runs again" "$TMP/relay-c.log" | tail -20)"
grep "the workers cannot reach each other" "$TMP/relay-c.log" | head -1 | cut -c1-200 | sed 's/^/  /'
grep "adaptation loop" "$TMP/relay-c.log" | grep -q "exchange=coordinator" \
    || fail "relay: the loop's summary does not say exchange=coordinator: $(grep "adaptation loop" "$TMP/relay-c.log")"
same_as_single relay
echo "PASS: with the workers unable to reach each other mid-training, the gradients went through the coordinator ($(secs "$STARTED" "$(now)") s for the run) and the trained model and report equal the single process's"
