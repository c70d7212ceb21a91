//! Multi-process runs of the binary: a coordinator (`--serve 127.0.0.1:0`) whose log is read as
//! it comes, workers (`--join`) logging to files, and what the workers' logs say they did.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// A coordinator process, its stderr read line by line on a thread.
pub struct Coordinator {
    /// The process.
    pub child: Child,
    lines: Receiver<String>,
}

impl Coordinator {
    /// Spawns `c` with `RUST_LOG=info` and its stderr piped, and waits (up to 120 s) for the
    /// address it says it listens on.
    pub fn spawn(mut c: Command) -> (Self, String) {
        let mut child = c.env("RUST_LOG", "info").stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(120))
                .expect("the coordinator says where it listens");
            if line.contains("coordinator listening") {
                if let Some(a) = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")) {
                    break a.to_string();
                }
            }
        };
        (Self { child, lines }, addr)
    }

    /// Waits for the coordinator: its exit status and what it logged since it listened.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        // The reader thread ends with the process's stderr: every line is in the channel.
        let rest: Vec<String> = self.lines.iter().collect();
        (status, rest.join("\n"))
    }

    /// Waits for the coordinator and asserts it succeeded (what it logged since it listened is
    /// in the message).
    pub fn wait_success(self) {
        let (status, log) = self.wait();
        assert!(status.success(), "coordinator: {status}\n{log}");
    }
}

/// Spawns the worker command `c` with `RUST_LOG=info`, its stderr in `dir/stderr.log` (`dir`
/// is created).
pub fn spawn_worker(mut c: Command, dir: &Path) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
    c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// Waits for worker `i` (its log in `dir/stderr.log`) and asserts it succeeded.
pub fn assert_worker_succeeded(w: &mut Child, i: usize, dir: &Path) {
    let s = w.wait().unwrap();
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    assert!(s.success(), "worker {i}: {s}\n{log}");
}

/// The log line a worker ends its evaluation job with.
pub const EVALUATION: &str = "fusion_bench::program: worker done";
/// The log line a worker ends a test-time adaptation job with.
pub const ADAPTATION: &str = "test-time adaptation: worker done";
/// The log line a worker ends a Fisher statistics job with.
pub const FISHER: &str = "Fisher statistics: worker done";

/// The items a worker's log says it computed in the job that ends with the line `done` (the
/// `items=` of that line).
pub fn worker_items(log: &str, done: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains(done))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("items=")))
        .and_then(|n| n.parse::<u64>().ok())
}

/// Asserts that the worker whose log is `dir/stderr.log` computed items of every job of `jobs`
/// (their ending lines, [`EVALUATION`], [`ADAPTATION`], [`FISHER`]).
pub fn assert_worker_computed(dir: &Path, jobs: &[&str]) {
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    for job in jobs {
        let n = worker_items(&log, job);
        assert!(n.is_some_and(|n| n > 0), "{}: `{job}` items {n:?}:\n{log}", dir.display());
    }
}
