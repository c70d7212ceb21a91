#!/usr/bin/env bash
# GPU check, for a machine with CUDA and PyPI torch 2.11 but no Rust toolchain.
# Build here first:
#   source scripts/env.sh && cargo build --release --bin fusion_bench --example gpu_check \
#     && cargo build --release -p fusion_cluster --features cuda --example nccl_check
# then carry target/release/{fusion_bench,examples/gpu_check,examples/nccl_check} and run this
# script there. It points the loader at that machine's torch, CUDA runtime and NCCL
# (LD_LIBRARY_PATH beats the binary's RUNPATH), then runs:
#   1. gpu_check: CUDA-vs-CPU parity and forward throughput (fp32, bf16), real B/32 and L/14 shapes;
#   2. nccl_check: NCCL through collectives::nccl (error paths, world-1 identity, latency, one
#      process per GPU);
#   3. the fixture evaluation (scripts/demo.sh's job) with fabric.accelerator=cuda and =cpu, and
#      the largest difference between the two reports;
#   4. that evaluation as a coordinator and two GPU workers (QUIC on loopback);
#   5. test-time adaptation on the fixtures (AdaMerging layer-wise, WE-MoE), cuda vs cpu: each
#      side's seconds per step and the difference of the learned λ and routers. gpu_check (1.)
#      also times a B/32- and L/14-size adaptation step's forward and backward passes.
# Each part prints PASS/FAIL; the script's status is non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=$("$py" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").submodule_search_locations[0]))')
torch_lib="$site/torch/lib"
# cudarc opens libcudart.so.<major> and libnccl.so, but the wheels ship libnccl.so.2 only: link
# every CUDA library the wheels have under the names cudarc looks for.
links=$(mktemp -d)
while IFS= read -r f; do
    base=$(basename "$f")
    ln -sf "$f" "$links/$base"
    ln -sf "$f" "$links/${base%%.so*}.so"
done < <(find "$site/nvidia" \( -name 'libnccl.so*' -o -name 'libcudart.so*' \) 2>/dev/null)
export LD_LIBRARY_PATH="$links:$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$py" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
ls "$links"

bin=${BIN:-target/release}
status=0
echo "== 1. CUDA vs CPU parity and throughput"
"$bin"/examples/gpu_check || status=1
echo "== 2. NCCL"
timeout 120 "$bin"/examples/nccl_check || status=1
echo "== 3. fixture evaluation, cuda vs cpu"
export HF_HOME="$PWD/tests/fixtures/hf_home" HF_HUB_OFFLINE=1
out=${OUT:-$(mktemp -d)}/gpu-check
mkdir -p "$out"
for acc in cuda cpu; do
    start=$EPOCHREALTIME
    "$bin"/fusion_bench method=dummy \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
        fabric.accelerator=$acc report_save_path="$out/$acc/report.json" >"$out/$acc.log" 2>&1 || status=1
    tail -2 "$out/$acc.log"
    awk -v a="$start" -v b="$EPOCHREALTIME" -v n="$acc" 'BEGIN { printf "%s: %.2f s wall\n", n, b - a }'
done
"$py" - "$out" <<'EOF' || status=1
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{k}/report.json")) for k in ("cuda", "cpu"))
worst = 0.0
def walk(x, y, path):
    global worst
    if isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x: walk(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, (int, float)):
        worst = max(worst, abs(x - y))
walk(a, b, "")
acc = [(k, a[k]["accuracy"], b[k]["accuracy"]) for k in a if isinstance(a[k], dict) and "accuracy" in a[k]]
same = all(x == y for _, x, y in acc)
print(f"report cuda vs cpu: {len(acc)} tasks, accuracies identical: {same}, largest |diff| {worst:.3e}")
print("fixture eval parity:", "PASS" if same and worst < 1e-4 else "FAIL")
sys.exit(0 if same and worst < 1e-4 else 1)
EOF
echo "== 4. distributed fixture evaluation on the GPU: coordinator + 2 workers (QUIC, loopback)"
eval_args=(method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 fabric.accelerator=cuda)
"$bin"/fusion_bench "${eval_args[@]}" report_save_path="$out/dist/report.json" \
    --serve 127.0.0.1:29517 --min-workers 2 --job-dir "$out/dist/job" >"$out/dist.log" 2>&1 &
coord=$!
sleep 1
for i in 0 1; do
    "$bin"/fusion_bench "${eval_args[@]}" report_save_path="$out/dist/w$i.json" \
        --join 127.0.0.1:29517 --node-name "w$i" --job-dir "$out/dist/job" >"$out/w$i.log" 2>&1 &
done
if timeout 120 tail --pid=$coord -f /dev/null && wait $coord \
    && cmp "$out/dist/report.json" "$out/cuda/report.json"; then
    echo "distributed GPU report identical to single-process GPU report: PASS"
else
    echo "distributed GPU evaluation: FAIL"; tail -5 "$out/dist.log"; status=1
fi
wait
echo "== 5. test-time adaptation on the GPU (fixtures, seed 42, 20 steps): cuda vs cpu"
# AdaMerging layer-wise (λ file) and dense WE-MoE (trained model), each side's seconds per step
# from its own log line, and the largest difference between the two sides' results.
tta_common=(modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=dummy seed=42
    method.max_steps=20 print_config=false)
for acc in cuda cpu; do
    mkdir -p "$out/tta/$acc"
    RUST_LOG=info "$bin"/fusion_bench method=adamerging/clip method.name=clip_layer_wise_adamerging \
        "${tta_common[@]}" fabric.accelerator=$acc "path.cache_dir=$out/tta/$acc/cache" \
        "method.save_merging_weights=$out/tta/$acc/lambda.pt" "path.log_dir=$out/tta/$acc/logs" \
        >"$out/tta/$acc/adamerging.log" 2>&1 || { status=1; tail -5 "$out/tta/$acc/adamerging.log"; }
    RUST_LOG=info "$bin"/fusion_bench method=wemoe/weight_ensembling_moe \
        method.name=clip_weight_ensembling_moe method.use_grad_accumulate=false \
        "${tta_common[@]}" fabric.accelerator=$acc "path.cache_dir=$out/tta/$acc/cache" \
        "method.save_checkpoint=$out/tta/$acc/wemoe.ckpt" \
        >"$out/tta/$acc/wemoe.log" 2>&1 || { status=1; tail -5 "$out/tta/$acc/wemoe.log"; }
    for m in adamerging wemoe; do
        echo "$m $acc: $(grep -o 'seconds_per_step=[0-9.e-]*' "$out/tta/$acc/$m.log" | tail -1)"
    done
done
"$py" - "$out/tta" <<'EOF' || status=1
import sys, torch
d = sys.argv[1]
a, b = (torch.load(f"{d}/{k}/lambda.pt", weights_only=True) for k in ("cuda", "cpu"))
lam = (a - b).abs().max().item()
ra, rb = ({k: v for k, v in torch.load(f"{d}/{s}/wemoe.ckpt", weights_only=True, mmap=True)["model"].items()
           if ".mlp.gate." in k} for s in ("cuda", "cpu"))
rel = max(((ra[k] - rb[k]).abs().max() / rb[k].abs().max().clamp_min(1e-30)).item() for k in rb)
ok = lam < 1e-3 and rel < 1e-3 and ra.keys() == rb.keys()
print(f"AdaMerging λ cuda vs cpu: max |diff| {lam:.3e}; WE-MoE routers: max relative diff {rel:.3e}")
print("test-time adaptation parity:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
echo "gpu-check status: $status"
exit $status
