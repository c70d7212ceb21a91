//! Shared by the integration tests that drive a bash harness with this build's `fusion_bench`.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/<script>` with the built `fusion_bench` as its argument, prints its output, and
/// asserts it passed (or skipped, which the harnesses allow only outside `CI=true`).
pub fn run_harness(script: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script);
    let out =
        Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_fusion_bench")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
    assert!(stdout.contains("PASS") || stdout.contains("SKIP"), "{stdout}");
}
