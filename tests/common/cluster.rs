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
/// The log line a worker ends a RegMean Grams job with.
pub const REGMEAN: &str = "RegMean Grams: worker done";

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

/// A per-model statistics job (Fisher, RegMean: `method`) run by a coordinator and two workers,
/// also with one worker killed once the first statistics are in `path.cache_dir/<cache_sub>`:
/// one model per work item, written into the shared cache; every process merges the same model
/// and the workers join its evaluation (each worker's log ends the statistics job with `done`).
/// The merged model and the report are the single process's, byte for byte.
pub fn assert_statistics_job_gives_the_single_process_result(
    method: &[&str],
    cache_sub: &str,
    done: &str,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Every process at the same intra-op thread count (libtorch's reductions split by thread).
    let command = |dir: &Path, extra: &[String]| {
        let job = dir.join("job").display().to_string();
        let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
        c.args(method)
            .args([
                "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
                "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
                "fabric.accelerator=cpu",
                "print_config=false",
            ])
            .arg(format!("path.cache_dir={}", dir.join("cache").display()))
            .args(extra)
            .args(["--job-dir", &job])
            .env("HF_HOME", root.join("tests/fixtures/hf_home"))
            .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
            .env("OMP_NUM_THREADS", "1")
            .current_dir(dir);
        c
    };
    let outputs = |dir: &Path| -> Vec<String> {
        vec![
            format!("merged_model_save_path={}", dir.join("merged").display()),
            format!("report_save_path={}", dir.join("report.json").display()),
        ]
    };
    let single = tempfile::tempdir().unwrap();
    let out = command(single.path(), &outputs(single.path())).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = std::fs::read(single.path().join("merged/model.safetensors")).unwrap();
    let report = std::fs::read(single.path().join("report.json")).unwrap();
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut serve = outputs(dir.path());
        serve.extend(
            ["--serve", "127.0.0.1:0", "--min-workers", "2", "--wait", "60"].map(String::from),
        );
        let (coord, addr) = Coordinator::spawn(command(dir.path(), &serve));
        let mut workers: Vec<_> = (0..2)
            .map(|i| {
                let wdir = dir.path().join(format!("w{i}"));
                let extra =
                    ["--join".to_string(), addr.clone(), "--node-name".into(), format!("w{i}")];
                spawn_worker(command(dir.path(), &extra), &wdir)
            })
            .collect();
        if kill {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while std::fs::read_dir(dir.path().join("cache").join(cache_sub))
                .map_or(true, |mut d| d.next().is_none())
            {
                assert!(std::time::Instant::now() < deadline, "no statistics reached the cache");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            workers[0].kill().unwrap();
        }
        coord.wait_success();
        for (i, w) in workers.iter_mut().enumerate().skip(kill as usize) {
            let wdir = dir.path().join(format!("w{i}"));
            assert_worker_succeeded(w, i, &wdir);
            // Each worker joined the statistics job (a survivor may have had no model to
            // compute) and then the evaluation.
            let log = std::fs::read_to_string(wdir.join("stderr.log")).unwrap_or_default();
            assert!(log.contains(done), "worker {i}:\n{log}");
            assert_worker_computed(&wdir, &[EVALUATION]);
        }
        assert!(
            std::fs::read(dir.path().join("merged/model.safetensors")).unwrap() == model,
            "kill={kill}: the merged model differs from the single process's"
        );
        assert_eq!(
            String::from_utf8_lossy(&std::fs::read(dir.path().join("report.json")).unwrap()),
            String::from_utf8_lossy(&report),
            "kill={kill}: the report"
        );
    }
}
