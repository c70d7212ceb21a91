//! End to end: a worker that joins WE-MoE's router training while it runs. It is handed the
//! job's last state, a step's commit, before anything else (it has no routers to apply it to, and
//! ignores it), then the routers and Adam's state of a new ring generation, and computes its
//! block of the later steps; the trained model and the report are the single process's, byte for
//! byte.

use common::cluster::{assert_worker_succeeded, spawn_worker, Coordinator};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

fn command(cwd: &Path, args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(args)
        .env("HF_HOME", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_home"))
        .env_remove("HF_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
        .env("RUST_BACKTRACE", "0")
        .current_dir(cwd);
    c
}

/// The seed's B/32 WE-MoE line (as `tests/cli_we_moe.rs`), `steps` steps, checkpointing every
/// step, the trained model in `dir/run.ckpt` and the report in `dir/run.json`.
fn args(dir: &Path, steps: u64) -> Vec<String> {
    [
        "method=wemoe/weight_ensembling_moe",
        "method.name=clip_weight_ensembling_moe",
        "method.use_grad_accumulate=false",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "fabric.accelerator=cpu",
        "print_config=false",
        "seed=42",
        "+method.checkpoint_every_steps=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("method.max_steps={steps}"),
        format!("method.save_checkpoint={}", dir.join("run.ckpt").display()),
        format!("report_save_path={}", dir.join("run.json").display()),
        format!("path.cache_dir={}", dir.join("cache").display()),
        format!("path.log_dir={}", dir.join("logs").display()),
    ])
    .collect()
}

/// Whether a router-training checkpoint is under `dir/cache/tta` (the first is written after
/// step 1).
fn checkpointed(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("cache/tta")).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "safetensors")))
    })
}

#[test]
fn a_worker_joining_mid_training_takes_part_and_keeps_the_single_process_bits() {
    // Enough steps that the joiner (started after step 1) starts up well before the last.
    let steps = 80;
    let one = tempfile::tempdir().unwrap();
    let out = command(one.path(), &args(one.path(), steps)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let job = dir.join("job").display().to_string();
    let mut a = args(dir, steps);
    a.extend(["--serve", "127.0.0.1:0", "--min-workers", "1", "--wait", "60"].map(String::from));
    a.extend(["--job-dir".to_string(), job.clone()]);
    let (mut coord, addr) = Coordinator::spawn(command(dir, &a));
    let worker = |i: usize| {
        let wdir = dir.join(format!("w{i}"));
        let mut a = args(dir, steps);
        a.extend(["--join".to_string(), addr.clone(), "--node-name".into(), format!("w{i}")]);
        a.extend(["--job-dir".to_string(), job.clone()]);
        spawn_worker(command(&wdir, &a), &wdir)
    };
    let mut first = worker(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !checkpointed(dir) {
        assert!(coord.child.try_wait().unwrap().is_none(), "the run ended before step 1");
        assert!(Instant::now() < deadline, "no checkpoint of step 1");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut late = worker(1);
    let (status, log) = coord.wait();
    assert!(status.success(), "coordinator: {status}\n{log}");
    assert_worker_succeeded(&mut first, 0, &dir.join("w0"));
    assert_worker_succeeded(&mut late, 1, &dir.join("w1"));
    // The joiner was taken into a new ring generation at a later step, and computed in it.
    let joined_at = log
        .lines()
        .filter(|l| l.contains("ring generation") && l.contains("\"w1\""))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("step=")))
        .and_then(|s| s.parse::<u64>().ok());
    assert!(joined_at.is_some_and(|s| s > 0 && s < steps), "joined at {joined_at:?}:\n{log}");
    let wlog = std::fs::read_to_string(dir.join("w1/stderr.log")).unwrap();
    assert!(wlog.contains("worker ring formed"), "the joiner never computed in the ring:\n{wlog}");
    assert!(
        std::fs::read(dir.join("run.ckpt")).unwrap()
            == std::fs::read(one.path().join("run.ckpt")).unwrap(),
        "the trained model differs from the single process's"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("run.json")).unwrap(),
        std::fs::read_to_string(one.path().join("run.json")).unwrap(),
        "the report"
    );
}
