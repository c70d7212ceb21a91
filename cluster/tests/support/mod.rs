//! Shared by the integration tests: where `cargo` put the example binaries they start as child
//! processes, what each test shares with its child (`ring`, `runtime`, `transport`), and the
//! verdict of a bash harness.
#![allow(dead_code)]

use std::{io::Write, path::PathBuf, process::Child, sync::mpsc, thread, time::Duration};

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

/// Fails the whole test binary if a test runs longer than `limit`: a run that never completes
/// (an item lost for good, a missed `Done`) must fail, not hang. Disarmed when the returned
/// sender is dropped.
pub fn watchdog(test: &'static str, limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to stderr: libtest captures `eprintln!` in threads spawned by a test.
            let _ = writeln!(
                std::io::stderr(),
                "{test} still running after {limit:?}: it hangs; aborting the test binary"
            );
            std::process::exit(101);
        }
    });
    tx
}

/// Kills leftover children when a test fails half-way.
pub struct Reaper(pub Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
