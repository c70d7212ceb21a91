//! Shared by the integration tests: where `cargo` put the example binaries they start as child
//! processes, what each test shares with its child (`ring`, `runtime`, `transport`), and the
//! verdict of a bash harness.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod ring;
pub mod runtime;
pub mod transport;

/// The path of example `name` built beside this test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/examples/<name>`); panics with the command
/// that builds it when it is missing.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join("examples").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: a plain `cargo test --release` builds the examples; with a target filter \
         (`--test …`) build them first with `cargo build --release -p fusion_cluster --examples`",
        bin.display()
    );
    bin
}

/// A harness's output must hold a `PASS:` line, or (outside CI only) a `SKIP:` line: under
/// `CI=true` a skip is a failure (as in the main crate's `tests/common/mod.rs`).
pub fn assert_harness_verdict(stdout: &str, ci: bool) {
    let line = |tag: &str| stdout.lines().any(|l| l.starts_with(tag));
    if ci {
        assert!(!line("SKIP:"), "a harness skipped under CI=true, where a skip is a failure");
        assert!(line("PASS:"), "no PASS line from the harness:\n{stdout}");
    } else {
        assert!(
            line("PASS:") || line("SKIP:"),
            "neither PASS nor SKIP from the harness:\n{stdout}"
        );
    }
}
