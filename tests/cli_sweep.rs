//! Sweeps (`-m`) on the bundled fixtures: cells equal single runs, a rerun skips finished
//! cells, a preempted sweep (SIGTERM/SIGUSR2) resumes without computing any cell twice, failed
//! cells are recorded and retried, and a folder of another sweep is refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fusion_bench(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(args)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("FUSION_BENCH_IMAGE_CACHE_GB", "0")
        // One intra-op thread per process, so the simulated ranks share the cores.
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .current_dir(root());
    c
}

fn base(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "print_config=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn sweep(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["-m".to_string()];
    args.extend(base(extra));
    args.push(format!("sweep_dir={}", dir.display()));
    fusion_bench(&args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Every cell's `name` file (`report.json`, `error.txt`) that exists, in cell-key order.
fn cell_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("cells"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v
}

fn reports(dir: &Path) -> Vec<PathBuf> {
    cell_files(dir, "report.json")
}

#[test]
fn cells_equal_single_runs_and_a_rerun_skips_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let out = sweep(&dir, &["method=task_arithmetic", "method.scaling_factor=0.2,0.4"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(count(&log, "cell done"), 2, "{log}");
    assert!(log.contains("computed=2 skipped=0 failed=0"), "{log}");
    let summary = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 3, "{summary}");
    assert!(
        summary.starts_with("cell,method.scaling_factor,status,average_accuracy,sun397_accuracy")
    );
    // Cell 1 is exactly the single run of its setting.
    let single = tmp.path().join("single.json");
    let mut args = base(&["method=task_arithmetic", "method.scaling_factor=0.4"]);
    args.push(format!("report_save_path={}", single.display()));
    let o = fusion_bench(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let single = std::fs::read(single).unwrap();
    let line = summary.lines().nth(2).unwrap();
    let key = line.split(',').rev().nth(1).unwrap();
    assert_eq!(std::fs::read(dir.join("cells").join(key).join("report.json")).unwrap(), single);

    let again = sweep(&dir, &["method=task_arithmetic", "method.scaling_factor=0.2,0.4"]);
    let log = stderr(&again);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("computed=0 skipped=2 failed=0"), "{log}");

    // A half-written result is not a result: that cell is computed again.
    let victim = &reports(&dir)[0];
    std::fs::write(victim, "{\"model_info\": {\"trainable").unwrap();
    let third = sweep(&dir, &["method=task_arithmetic", "method.scaling_factor=0.2,0.4"]);
    assert!(stderr(&third).contains("computed=1 skipped=1 failed=0"), "{}", stderr(&third));

    // Another sweep in the same folder is refused.
    let other = sweep(&dir, &["method=task_arithmetic", "method.scaling_factor=0.2,0.5"]);
    assert!(!other.status.success());
    assert!(stderr(&other).contains("different sweep"), "{}", stderr(&other));
}

#[test]
fn preempted_sweep_resumes_without_computing_a_cell_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let extra = ["method=task_arithmetic", "method.scaling_factor=0.1,0.2,0.3,0.4,0.5,0.6"];
    for signal in ["TERM", "USR2"] {
        let _ = std::fs::remove_dir_all(&dir);
        let mut args = vec!["-m".to_string()];
        args.extend(base(&extra));
        args.push(format!("sweep_dir={}", dir.display()));
        let mut child =
            fusion_bench(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut first_log = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            first_log.push_str(&line);
            first_log.push('\n');
            if line.contains("cell done") {
                let pid = child.id().to_string();
                assert!(Command::new("kill")
                    .args([&format!("-{signal}"), &pid])
                    .status()
                    .unwrap()
                    .success());
                break;
            }
        }
        for line in lines {
            first_log.push_str(&line.unwrap());
            first_log.push('\n');
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143), "SIG{signal}: {first_log}");
        assert!(first_log.contains("stopping the sweep for requeue"), "{first_log}");
        let done_first = count(&first_log, "cell done");
        assert!((1..6).contains(&done_first), "SIG{signal}: {first_log}");
        assert_eq!(reports(&dir).len(), done_first);

        let resumed = sweep(&dir, &extra);
        let log = stderr(&resumed);
        assert!(resumed.status.success(), "{log}");
        assert_eq!(done_first + count(&log, "cell done"), 6, "a cell was computed twice: {log}");
        assert!(log.contains(&format!("skipped={done_first}")), "{log}");
        assert_eq!(reports(&dir).len(), 6);
    }
}

#[test]
fn a_failing_cell_is_recorded_the_others_run_and_a_rerun_retries_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let extra = ["method=ties_merging", "method.threshold=20,0"];
    let out = sweep(&dir, &extra);
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("computed=1 skipped=0 failed=1"), "{log}");
    let summary = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert!(summary.contains(",done,") && summary.contains(",failed,"), "{summary}");
    let errors = cell_files(&dir, "error.txt");
    assert_eq!(errors.len(), 1);
    assert!(std::fs::read_to_string(&errors[0]).unwrap().contains("method.threshold"));
    let again = sweep(&dir, &extra);
    assert!(stderr(&again).contains("computed=0 skipped=1 failed=1"), "{}", stderr(&again));
}

/// The sweep `extra` as three processes that srun would start (simulated nodes on this host):
/// rank 0 serves, ranks 1 and 2 join; every process walks the same cells. (success, log) each.
fn slurm_sweep(tmp: &Path, dir: &Path, extra: &[&str]) -> Vec<(bool, String)> {
    slurm_sweep_with(tmp, dir, extra, |_| root().join("tests/fixtures/hf_home"))
}

/// [`slurm_sweep`] with rank `r` reading the hub cache `hf_home(r)`.
fn slurm_sweep_with(
    tmp: &Path,
    dir: &Path,
    extra: &[&str],
    hf_home: impl Fn(usize) -> PathBuf,
) -> Vec<(bool, String)> {
    let mut args = vec!["-m".to_string()];
    args.extend(base(extra));
    args.push(format!("sweep_dir={}", dir.display()));
    args.extend(["--job-dir".to_string(), tmp.join("job").display().to_string()]);
    // A job id (hence a coordinator port) of its own for every simulated job of this process.
    static JOBS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = JOBS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let job_id = (std::process::id() % 30_000 * 8 % 39_000 + 1_000 + n).to_string();
    let children: Vec<_> = (0..3)
        .map(|rank| {
            fusion_bench(&args)
                .env("HF_HOME", hf_home(rank))
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_NTASKS", "3")
                .env("SLURM_JOB_ID", &job_id)
                .env("SLURM_JOB_NODELIST", "localhost")
                .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
        })
        .collect()
}

/// Two cells for three processes: both are shared out in parts; the failing one's parts fail,
/// its error is recorded once, and the other's report equals the single-process sweep's.
#[test]
fn a_shared_cell_that_fails_is_recorded_and_the_other_matches_the_local_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["method=ties_merging", "method.threshold=20,0"];
    let local = tmp.path().join("local");
    assert!(!sweep(&local, &extra).status.success());
    let dist = tmp.path().join("dist");
    let logs = slurm_sweep(tmp.path(), &dist, &extra);
    let coord = &logs[0].1;
    assert!(!logs[0].0, "the coordinator reports the failed cell: {coord}");
    assert!(coord.contains("whole=0 shared=2 parts=2"), "{coord}");
    assert!(coord.contains("computed=1 skipped=0 failed=1"), "{coord}");
    for (ok, log) in &logs[1..] {
        assert!(ok, "a worker does not fail with a cell: {log}");
    }
    let errors = cell_files(&dist, "error.txt");
    assert_eq!(errors.len(), 1);
    assert!(std::fs::read_to_string(&errors[0]).unwrap().contains("method.threshold"));
    let (a, b) = (reports(&local), reports(&dist));
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 1);
    assert_eq!(a[0].parent().unwrap().file_name(), b[0].parent().unwrap().file_name());
    assert_eq!(std::fs::read(&a[0]).unwrap(), std::fs::read(&b[0]).unwrap());
}

#[test]
fn a_sweep_over_three_slurm_ranks_shares_out_whole_cells_then_parts_with_the_local_results() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "method=task_arithmetic",
        "method.scaling_factor=0.2,0.4,0.6,0.8",
        "taskpool.dataloader_kwargs.batch_size=16",
    ];
    let local = tmp.path().join("local");
    let out = sweep(&local, &extra);
    assert!(out.status.success(), "{}", stderr(&out));

    let dist = tmp.path().join("dist");
    let logs = slurm_sweep(tmp.path(), &dist, &extra);
    for (i, (ok, log)) in logs.iter().enumerate() {
        assert!(ok, "rank {i} failed:\n{log}");
    }
    assert!(logs[0].1.contains("computed=4 skipped=0 failed=0"), "{}", logs[0].1);
    assert!(logs[1].1.contains("sweep done (worker)"), "{}", logs[1].1);
    // Cells are the unit of distribution: three whole cells went to different processes; the
    // fourth would have left two of the three idle, so its evaluation was shared in three parts.
    assert!(logs[0].1.contains("whole=3 shared=1 parts=3"), "{}", logs[0].1);
    let whole: Vec<usize> = logs.iter().map(|(_, l)| count(l, "cell done cell=")).collect();
    assert_eq!(whole.iter().sum::<usize>(), 3, "{whole:?}");
    assert!(whole.iter().filter(|&&n| n > 0).count() >= 2, "{whole:?}");
    let parts: Vec<usize> = logs.iter().map(|(_, l)| count(l, "cell part done")).collect();
    assert_eq!(parts.iter().sum::<usize>(), 3, "{parts:?}");
    assert!(parts.iter().filter(|&&n| n > 0).count() >= 2, "{parts:?}");
    assert_eq!(count(&logs[0].1, "cell done (shared out in parts)"), 1, "{}", logs[0].1);
    let local_reports = reports(&local);
    let dist_reports = reports(&dist);
    assert_eq!(local_reports.len(), 4);
    assert_eq!(dist_reports.len(), 4);
    for (a, b) in local_reports.iter().zip(&dist_reports) {
        assert_eq!(a.file_name(), b.file_name());
        assert_eq!(a.parent().unwrap().file_name(), b.parent().unwrap().file_name(), "cell keys");
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{}", b.display());
    }
}

#[test]
fn a_killed_sweep_loses_only_the_cell_in_flight_and_resumes_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["method=task_arithmetic", "method.scaling_factor=0.1,0.2,0.3,0.4"];
    let reference = tmp.path().join("uninterrupted");
    assert!(sweep(&reference, &extra).status.success());

    let dir = tmp.path().join("killed");
    let mut args = vec!["-m".to_string()];
    args.extend(base(&extra));
    args.push(format!("sweep_dir={}", dir.display()));
    let mut child =
        fusion_bench(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first_log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        first_log.push_str(&line);
        first_log.push('\n');
        if line.contains("cell done") {
            child.kill().unwrap(); // SIGKILL: no chance to clean up
            break;
        }
    }
    child.wait().unwrap();
    let done_first = reports(&dir).len();
    assert!(done_first >= 1, "{first_log}");
    let resumed = sweep(&dir, &extra);
    let log = stderr(&resumed);
    assert!(resumed.status.success(), "{log}");
    assert_eq!(done_first + count(&log, "cell done"), 4, "{log}");
    // Same cells, same bytes as the uninterrupted sweep.
    let (a, b) = (reports(&reference), reports(&dir));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.parent().unwrap().file_name(), y.parent().unwrap().file_name());
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }
}

/// `cp -r src dst` (files as they are, links as links).
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let ok = Command::new("cp").arg("-r").arg(src).arg(dst).status().unwrap();
    assert!(ok.success(), "cp -r {} {}", src.display(), dst.display());
}

/// Node-local hub caches: each of three Slurm ranks reads its own copy of the hub cache, at its
/// own path. Cell keys name content, not paths, so the coordinator finds the reports the workers
/// wrote, the reports equal the local sweep's, and a rerun (from fresh copies, as after a
/// re-download) computes nothing.
#[test]
fn a_sweep_over_ranks_with_their_own_hub_caches_finishes_and_its_rerun_computes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "method=task_arithmetic",
        "method.scaling_factor=0.1,0.3,0.5,0.7,0.9,1.0",
        "taskpool.dataloader_kwargs.batch_size=32",
    ];
    let local = tmp.path().join("local");
    let out = sweep(&local, &extra);
    assert!(out.status.success(), "{}", stderr(&out));
    let caches = |run: &'static str| {
        let tmp = tmp.path().to_path_buf();
        move |rank: usize| {
            let home = tmp.join(format!("{run}/node-{rank}/hf_home"));
            if !home.exists() {
                copy_tree(&root().join("tests/fixtures/hf_home"), &home);
            }
            home
        }
    };
    let dist = tmp.path().join("dist");
    let logs = slurm_sweep_with(tmp.path(), &dist, &extra, caches("first"));
    for (i, (ok, log)) in logs.iter().enumerate() {
        assert!(ok, "rank {i} failed:\n{log}");
    }
    assert!(logs[0].1.contains("computed=6 skipped=0 failed=0"), "{}", logs[0].1);
    let ran: Vec<usize> = logs.iter().map(|(_, l)| count(l, "cell done cell=")).collect();
    assert_eq!(ran.iter().sum::<usize>(), 6, "{ran:?}");
    assert!(ran.iter().filter(|&&n| n > 0).count() >= 2, "cells ran on one rank only: {ran:?}");
    let (a, b) = (reports(&local), reports(&dist));
    assert_eq!((a.len(), b.len()), (6, 6));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.parent().unwrap().file_name(), y.parent().unwrap().file_name(), "cell keys");
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap(), "{}", y.display());
    }
    let again = slurm_sweep_with(tmp.path(), &dist, &extra, caches("second"));
    for (i, (ok, log)) in again.iter().enumerate() {
        assert!(ok, "rank {i} failed on the rerun:\n{log}");
    }
    assert!(again[0].1.contains("computed=0 skipped=6 failed=0"), "{}", again[0].1);
    let reran: usize = again.iter().map(|(_, l)| count(l, "cell done")).sum();
    assert_eq!(reran, 0, "the rerun computed cells");
}
