//! Distributed evaluation across network namespaces with a worker's link cut mid-run
//! (`scripts/netns-eval.sh`, run with this build's `fusion_bench`): the coordinator's report must
//! equal the single-process report byte for byte. Needs root and `ip netns`; without them the
//! script skips, except under `CI=true`, where a skip is a failure.

mod common;

#[test]
fn link_cut_during_distributed_evaluation_keeps_the_report() {
    common::run_harness("netns-eval.sh");
}
