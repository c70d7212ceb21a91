# shellcheck shell=bash
# Shared by the fault and cluster harnesses the tests run (scripts/netns-*.sh,
# scripts/slurm/test.sh). Set HARNESS to the harness's name before sourcing.
#   skip REASON   exit 0 with "SKIP: …", except under CI=true, where a skip is a failure
#   fail MSG…     exit 1 with "FAIL: …"
#   now, secs A B wall-clock seconds, and B − A to a tenth
#   fixture_job REPO  exports the environment of a small, fast job on the bundled fixtures
#                 (offline hub cache, short QUIC timeouts, one intra-op thread) and sets ARGS to
#                 task arithmetic on TA8 in batches of 16, the job every harness runs.
skip() {
    if [[ "${CI:-}" == "true" ]]; then
        echo "FAIL: ${HARNESS:-harness} cannot run: $1 (a skip is a failure under CI=true)"
        exit 1
    fi
    echo "SKIP: ${HARNESS:-harness}: $1"
    exit 0
}
fail() { echo "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

fixture_job() {
    export HF_HOME="$1/tests/fixtures/hf_home" FUSION_BENCH_FAST_TIMEOUTS=1 \
        FUSION_BENCH_IMAGE_CACHE_GB=0 OMP_NUM_THREADS=1 RUST_BACKTRACE=0
    # shellcheck disable=SC2034  # read by the sourcing script
    ARGS=(method=task_arithmetic method.scaling_factor=0.3
          modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8
          taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8
          taskpool.dataloader_kwargs.batch_size=16 fabric.accelerator=cpu print_config=false)
}
