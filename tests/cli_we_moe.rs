//! End to end: WE-MoE's router training on the cluster runtime. A coordinator and two workers
//! (also with one worker killed mid-run, the step then recomputed on a ring of the two left)
//! train the routers to the single process's bits, their gradients summed over the ring, then
//! evaluate the trained model together and give the single process's report; a run stopped by
//! SIGTERM (also in the middle of a step) or killed with SIGKILL, restarted, ends with the
//! uninterrupted run's routers bit for bit; a worker joining mid-training takes part and keeps
//! the single process's bits.

use common::cluster::{
    assert_worker_computed, assert_worker_succeeded, spawn_worker, Coordinator, ADAPTATION,
    EVALUATION,
};
use fusion_bench::weights::torch_file::{self, TorchValue};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn command(cwd: &Path, args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(args)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env_remove("HF_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
        .env("RUST_BACKTRACE", "0")
        .current_dir(cwd);
    c
}

/// The seed's B/32 WE-MoE line, `steps` steps, checkpointing every step, saving the trained
/// model to `<tag>.ckpt` and the report to `<tag>.json` in `dir`.
fn args(dir: &Path, steps: u64, tag: &str) -> Vec<String> {
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
        format!("method.save_checkpoint={}", dir.join(format!("{tag}.ckpt")).display()),
        format!("report_save_path={}", dir.join(format!("{tag}.json")).display()),
        format!("path.cache_dir={}", dir.join("cache").display()),
        format!("path.log_dir={}", dir.join("logs").display()),
    ])
    .collect()
}

/// The trained state dict: names and float32 bit patterns, in file order.
fn routers_and_all(path: &Path) -> Vec<(String, Vec<u32>)> {
    let v = torch_file::load(path).unwrap();
    let Some(TorchValue::Dict(items)) = v.get("model") else { panic!("{}", path.display()) };
    items
        .iter()
        .map(|(k, v)| {
            let t = v.as_tensor().unwrap();
            (k.clone(), t.to_f32().unwrap().iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// The step of the router-training checkpoint under `dir/cache/tta`, if one is there.
fn checkpointed_step(dir: &Path) -> Option<u64> {
    let entry = std::fs::read_dir(dir.join("cache/tta")).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        (p.extension()? == "safetensors").then_some(p)
    })?;
    let bytes = std::fs::read(entry).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let state: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["state"].as_str()?).ok()?;
    state["step"].as_u64()
}

fn wait_for_step(dir: &Path, at_least: u64, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while checkpointed_step(dir).is_none_or(|s| s < at_least) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {at_least}");
        assert!(std::time::Instant::now() < deadline, "no checkpoint of step {at_least}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn single(dir: &Path, steps: u64) -> (Vec<(String, Vec<u32>)>, Vec<u8>) {
    let out = command(dir, &args(dir, steps, "run")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (routers_and_all(&dir.join("run.ckpt")), std::fs::read(dir.join("run.json")).unwrap())
}

/// A coordinator (`--serve`, also computing) and two workers (`--join`), optionally killing one
/// worker once step 3 is checkpointed.
fn three_processes(dir: &Path, steps: u64, kill_one: bool) -> (Vec<(String, Vec<u32>)>, Vec<u8>) {
    let job = dir.join("job");
    let mut a = args(dir, steps, "run");
    a.extend(["--serve", "127.0.0.1:0", "--min-workers", "2", "--wait", "60"].map(String::from));
    a.extend(["--job-dir".to_string(), job.display().to_string()]);
    let (mut coord, addr) = Coordinator::spawn(command(dir, &a));
    let mut workers: Vec<_> = (0..2)
        .map(|i| {
            let wdir = dir.join(format!("w{i}"));
            let mut a = args(dir, steps, "run");
            a.extend(["--join".to_string(), addr.clone(), "--node-name".into(), format!("w{i}")]);
            a.extend(["--job-dir".to_string(), job.display().to_string()]);
            spawn_worker(command(&wdir, &a), &wdir)
        })
        .collect();
    if kill_one {
        wait_for_step(dir, 3, &mut coord.child);
        workers[0].kill().unwrap();
    }
    let (status, log) = coord.wait();
    assert!(status.success(), "coordinator: {status}\n{log}");
    // The gradients went round a ring of the three processes; a killed worker's step ran again
    // on a ring of the two left.
    let generations = log
        .lines()
        .filter(|l| l.contains("test-time adaptation loop"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("generations=")))
        .and_then(|n| n.parse::<u64>().ok());
    if kill_one {
        assert!(generations.is_some_and(|g| g >= 2), "generations {generations:?}:\n{log}");
        assert!(log.contains("the step runs again on a new ring"), "{log}");
    } else {
        assert_eq!(generations, Some(1), "{log}");
    }
    // Every surviving worker trained in the ring, then evaluated the trained model with the
    // others.
    for (i, w) in workers.iter_mut().enumerate().skip(kill_one as usize) {
        let wdir = dir.join(format!("w{i}"));
        assert_worker_succeeded(w, i, &wdir);
        assert_worker_computed(&wdir, &[ADAPTATION, EVALUATION]);
        let wlog = std::fs::read_to_string(wdir.join("stderr.log")).unwrap();
        let rings = wlog.matches("worker ring formed").count();
        assert_eq!(rings, if kill_one { 2 } else { 1 }, "worker {i}:\n{wlog}");
    }
    (routers_and_all(&dir.join("run.ckpt")), std::fs::read(dir.join("run.json")).unwrap())
}

#[test]
fn three_processes_train_the_single_process_routers_also_with_a_worker_killed() {
    let steps = 30;
    let one = tempfile::tempdir().unwrap();
    let (want, report) = single(one.path(), steps);
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (got, bytes) = three_processes(dir.path(), steps, kill);
        assert_eq!(got.len(), want.len());
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            assert!(a == b, "kill={kill}: `{name}` differs from the single process's bits");
        }
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&report),
            "kill={kill}: the report"
        );
    }
}

#[test]
fn a_stopped_or_killed_router_training_resumes_to_the_same_routers() {
    let steps = 60;
    let reference = tempfile::tempdir().unwrap();
    let (want, report) = single(reference.path(), steps);
    for signal in ["TERM", "KILL"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = command(dir.path(), &args(dir.path(), steps, "run")).spawn().unwrap();
        wait_for_step(dir.path(), 2, &mut child);
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        if signal == "TERM" {
            assert_eq!(status.code(), Some(143), "SIGTERM: checkpoint, then exit 143");
        }
        assert!(!dir.path().join("run.ckpt").exists(), "SIG{signal}: stopped before the end");
        let stopped_at = checkpointed_step(dir.path()).unwrap();
        assert!(stopped_at < steps, "SIG{signal}: stopped at step {stopped_at}");
        let out = command(dir.path(), &args(dir.path(), steps, "run")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = routers_and_all(&dir.path().join("run.ckpt"));
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            assert!(
                a == b,
                "SIG{signal}, restarted: `{name}` differs from the uninterrupted run's bits"
            );
        }
        let bytes = std::fs::read(dir.path().join("run.json")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&report),
            "SIG{signal}: the report"
        );
    }
}

/// A stop signal does not wait for the step under way: a coordinator still waiting for its
/// workers (a step that cannot finish) writes the state of its last finished step (here the
/// initial one) at once and exits 143; the same command without `--serve` resumes from it to the
/// uninterrupted run's routers.
#[test]
fn a_stop_signal_mid_step_checkpoints_the_last_finished_step_at_once() {
    let steps = 4;
    let reference = tempfile::tempdir().unwrap();
    let (want, _) = single(reference.path(), steps);
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), steps, "run");
    a.extend(["--serve", "127.0.0.1:0", "--min-workers", "1", "--wait", "600"].map(String::from));
    a.extend(["--job-dir".to_string(), dir.path().join("job").display().to_string()]);
    let (coord, _) = Coordinator::spawn(command(dir.path(), &a));
    Command::new("kill").args(["-TERM", &coord.child.id().to_string()]).status().unwrap();
    // Waiting for a worker that never comes: only the watcher can end the process (the wait for
    // workers lasts 600 s).
    let (status, log) = coord.wait();
    assert_eq!(status.code(), Some(143), "SIGTERM: checkpoint, then exit 143\n{log}");
    assert!(log.contains("signal received: checkpointed"), "{log}");
    assert_eq!(checkpointed_step(dir.path()), Some(0), "the initial state, checkpointed");
    let out = command(dir.path(), &args(dir.path(), steps, "run"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming the router training from its checkpoint"), "{err}");
    let got = routers_and_all(&dir.path().join("run.ckpt"));
    assert_eq!(got.len(), want.len());
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        assert!(a == b, "resumed: `{name}` differs from the uninterrupted run's bits");
    }
}

/// Bad settings and files are refused before any work, naming the key or the file.
#[test]
fn bad_input_is_refused_with_the_key_or_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = [
        "method=wemoe/sparse_weight_ensembling_moe".to_string(),
        "method.name=sparse_clip_weight_ensembling_moe".into(),
    ];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![sparse[0].clone(), sparse[1].clone(), "method.tv_prune_ratio=1.0".into()],
            "method.tv_prune_ratio",
        ),
        (
            vec![sparse[0].clone(), sparse[1].clone(), "method.gate_prune_ratio=-0.1".into()],
            "method.gate_prune_ratio",
        ),
        (vec!["method.router_hidden_layers=3".into()], "method.router_hidden_layers"),
        (vec!["method.lr=0".into()], "method.lr"),
        (vec!["method.max_steps=0".into()], "method.max_steps"),
        (vec!["method.batch_size=0".into()], "method.batch_size"),
        (vec!["method.name=clip_task_wise_adamerging".into()], "method.name"),
        (
            vec![format!("method.checkpoint={}", dir.path().join("nope.ckpt").display())],
            "nope.ckpt",
        ),
    ];
    for (extra, named) in cases {
        let mut a = args(dir.path(), 2, "bad");
        a.extend(extra.iter().cloned());
        let out = command(dir.path(), &a).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(named), "{extra:?}: the error names `{named}`:\n{err}");
        assert!(!err.contains("panicked"), "{extra:?}: a panic:\n{err}");
        assert!(!dir.path().join("bad.ckpt").exists() && !dir.path().join("bad.json").exists());
    }
}

/// A worker that joins while the routers train: it is handed the job's last state, a step's
/// commit, before anything else (it has no routers to apply it to, and ignores it), then the
/// routers and Adam's state of a new ring generation, and computes its block of the later steps;
/// the trained model and the report are the single process's, byte for byte.
#[test]
fn a_worker_joining_mid_training_takes_part_and_keeps_the_single_process_bits() {
    // Enough steps that the joiner (started after step 1) starts up well before the last.
    let steps = 80;
    let one = tempfile::tempdir().unwrap();
    let out = command(one.path(), &args(one.path(), steps, "run")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let job = dir.join("job").display().to_string();
    let mut a = args(dir, steps, "run");
    a.extend(["--serve", "127.0.0.1:0", "--min-workers", "1", "--wait", "60"].map(String::from));
    a.extend(["--job-dir".to_string(), job.clone()]);
    let (mut coord, addr) = Coordinator::spawn(command(dir, &a));
    let worker = |i: usize| {
        let wdir = dir.join(format!("w{i}"));
        let mut a = args(dir, steps, "run");
        a.extend(["--join".to_string(), addr.clone(), "--node-name".into(), format!("w{i}")]);
        a.extend(["--job-dir".to_string(), job.clone()]);
        spawn_worker(command(&wdir, &a), &wdir)
    };
    let mut first = worker(0);
    wait_for_step(dir, 1, &mut coord.child);
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
