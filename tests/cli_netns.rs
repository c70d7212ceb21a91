//! Distributed evaluation across network namespaces with a worker's link cut mid-run
//! (`scripts/netns-eval.sh`, run with this build's `fusion_bench`): the coordinator's report must
//! equal the single-process report byte for byte. Needs root and `ip netns`; without them the
//! script skips, except under `CI=true`, where a skip is a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn link_cut_during_distributed_evaluation_keeps_the_report() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-eval.sh");
    let out =
        Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_fusion_bench")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
    assert!(stdout.contains("PASS") || stdout.contains("SKIP"), "{stdout}");
}
