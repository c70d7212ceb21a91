#!/usr/bin/env bash
# WE-MoE router training across network namespaces, its ring cut by a lost link (run as root).
#
# The real `fusion_bench` binary, the seed's B/32 WE-MoE line on the bundled fixtures (30 steps,
# seed 42):
#   1. one process alone: the reference report and trained model;
#   2. a coordinator (--serve) in the hub namespace and two workers (--join) in their own
#      namespaces, each joined to the hub by a veth pair, the hub routing between them; the
#      router gradients go round the ring coordinator → w1 → w2 → coordinator. Once step 3 is
#      done, w1's link goes down (`ip link set <veth> down`), cutting its coordinator link and
#      both its ring links. The step under way must run again on a ring of the coordinator and
#      w2, and the trained model and the report must be the single process's, byte for byte.
# Everything (namespaces, processes by PID, temp files) is removed on exit.
#
# Usage: scripts/netns-wemoe.sh [path/to/fusion_bench]
# Without root or `ip netns` it skips (exit 0), except under CI=true, where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=${1:-target/release/fusion_bench}
PORT=47300
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

# shellcheck disable=SC2046
RUST_LOG=info,fusion_bench::methods::we_moe::tta=debug ip netns exec "$NS_C" "$FB" \
    $(run_args cut) --serve "0.0.0.0:$PORT" --min-workers 2 --job-dir "$TMP/job" \
    >"$TMP/c.log" 2>&1 &
CPID=$!
PIDS+=("$CPID")
wait_for "$TMP/c.log" "coordinator listening" 60
for i in 1 2; do
    # shellcheck disable=SC2046
    RUST_LOG=info ip netns exec "${P}w$i" "$FB" $(run_args cut) --join "10.201.$i.1:$PORT" \
        --node-name "w$i" --job-dir "$TMP/job" >"$TMP/w$i.log" 2>&1 &
    PIDS+=("$!")
done
wait_for "$TMP/c.log" " step=3 " 120
ip -n "$NS_1" link set "${P}w1" down
echo "cut w1's link after step 3"
wait_pid "$CPID" 180 || fail "coordinator failed: $(tail -30 "$TMP/c.log")"
grep -q "worker ring formed" "$TMP/w1.log" || fail "w1 never joined the ring: $(tail -20 "$TMP/w1.log")"
GENERATIONS=$(grep -o "generations=[0-9]*" "$TMP/c.log" | head -1 | cut -d= -f2)
[[ ${GENERATIONS:-0} -ge 2 ]] || fail "the ring was never re-formed: $(grep -i "ring\|lost" "$TMP/c.log" | tail -20)"
grep "the step runs again" "$TMP/c.log" | head -3 | sed 's/^/  /'
cmp "$TMP/single/report.json" "$TMP/cut/report.json" \
    || fail "reports differ: $(cat "$TMP/single/report.json") vs $(cat "$TMP/cut/report.json")"
cmp "$TMP/single/model.ckpt" "$TMP/cut/model.ckpt" || fail "the trained models differ"
echo "PASS: with w1's link cut mid-training, the ring re-formed ($GENERATIONS generations) and the trained model and report equal the single process's"
