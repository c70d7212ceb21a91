#!/usr/bin/env bash
# GPU check, for a machine with CUDA and PyPI torch 2.11 but no Rust toolchain.
# Build here first:   source scripts/env.sh && cargo build --release --examples
# then carry target/release/examples/gpu_check and run this script there. It points the loader at
# that machine's torch (LD_LIBRARY_PATH beats the binary's RUNPATH), then runs CUDA-vs-CPU parity
# and forward throughput (fp32, bf16) for the real B/32 and L/14 vision shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
torch_lib=$("$py" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib"))')
nccl_lib=$("$py" -c 'import importlib.util, os; s = importlib.util.find_spec("nvidia.nccl"); print(os.path.join(s.submodule_search_locations[0], "lib") if s else "")' 2>/dev/null || true)
export LD_LIBRARY_PATH="$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$py" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec target/release/examples/gpu_check
