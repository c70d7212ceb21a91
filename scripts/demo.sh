#!/usr/bin/env bash
# The main job on the bundled fixtures: evaluate the tiny pretrained CLIP on the eight tiny TA8
# tasks (FusionBench's `method=dummy`), offline, from the hub cache in tests/fixtures/hf_home.
# Installs libtorch and builds on first use. Extra key=value overrides are passed through, e.g.
#   scripts/demo.sh modelpool.models._pretrained_=tanganke/clip-vit-base-patch32_mnist fast_dev_run=true
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
cargo build --release --locked --bin fusion_bench
export HF_HOME="$PWD/tests/fixtures/hf_home" HF_HUB_OFFLINE=1
unset HF_HUB_CACHE HUGGINGFACE_HUB_CACHE
exec target/release/fusion_bench method=dummy \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
    report_save_path=outputs/demo/report.json "$@"
