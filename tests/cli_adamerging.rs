//! End to end: the seed's AdaMerging command lines (task-wise and layer-wise, saving the merging
//! weights, then `method.weights=` skipping the adaptation) on the bundled fixtures, a few steps
//! each; the saved files read by Python's `torch.load(weights_only=True)`; and a run stopped by
//! SIGTERM or killed with SIGKILL, restarted, ending at the uninterrupted run's λ bit for bit.

use common::cluster::{
    assert_worker_computed, assert_worker_succeeded, spawn_worker, Coordinator, ADAPTATION,
    EVALUATION,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn command(cwd: &Path, args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(args)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .current_dir(cwd);
    c
}

fn run(cwd: &Path, args: &[String]) -> Output {
    let out = command(cwd, args).output().expect("the binary runs");
    assert!(
        out.status.success(),
        "fusion_bench {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn args(line: &str, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = line.split_whitespace().map(String::from).collect();
    v.extend(extra.iter().cloned());
    v
}

/// Shape, dtype and float32 bit patterns of a `.pt` file as Python's torch reads it.
fn torch_load(path: &Path) -> (Vec<usize>, String, Vec<u32>) {
    let script = format!(
        "import torch\nt = torch.load({:?}, weights_only=True)\nprint(list(t.shape)); print(t.dtype); print(' '.join(str(v & 0xffffffff) for v in t.detach().contiguous().view(torch.int32).flatten().tolist()))",
        path.display().to_string()
    );
    let out = Command::new("python")
        .args(["-c", &script])
        .output()
        .expect("`python` with torch must be on PATH: `source scripts/env.sh` first");
    assert!(out.status.success(), "torch.load: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let shape = lines.next().unwrap().trim_matches(|c| c == '[' || c == ']').to_string();
    let shape = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let dtype = lines.next().unwrap().to_string();
    let bits = lines.next().unwrap_or("").split_whitespace().map(|v| v.parse().unwrap()).collect();
    (shape, dtype, bits)
}

fn common(dir: &Path) -> Vec<String> {
    vec![
        "fabric.accelerator=cpu".into(),
        "print_config=false".into(),
        "seed=42".into(),
        format!("path.cache_dir={}", dir.join("cache").display()),
        format!("path.log_dir={}", dir.join("logs").display()),
    ]
}

const TASK_WISE: &str = "method=adamerging method.name=clip_task_wise_adamerging method.save_merging_weights=outputs/clip-vit-base-patch32_TA8_task_wise_adamerging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8";
const LAYER_WISE: &str = "method=adamerging method.name=clip_layer_wise_adamerging method.save_merging_weights=merging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 fabric.loggers.root_dir=outputs/logs/ViT-B-32 fabric.loggers.name=clip_layer_wise_adamerging_adam";

#[test]
fn task_wise_saves_weights_torch_reads_and_method_weights_reproduces_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = common(dir.path());
    extra.push("method.max_steps=3".into());
    extra.push(format!("report_save_path={}", dir.path().join("trained.json").display()));
    run(dir.path(), &args(TASK_WISE, &extra));
    let saved =
        dir.path().join("outputs/clip-vit-base-patch32_TA8_task_wise_adamerging_weights.pt");
    let (shape, dtype, bits) = torch_load(&saved);
    assert_eq!((shape, dtype.as_str()), (vec![8], "torch.float32"));
    let lambda: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    assert!(
        lambda.iter().all(|&l| l != 0.3 && (l - 0.3).abs() < 0.01),
        "3 Adam steps of lr 1e-3 from 0.3: {lambda:?}"
    );
    // The second stage of the seed's recipe: the saved weights, no adaptation.
    let line = TASK_WISE.replace(
        "method.save_merging_weights=outputs/clip-vit-base-patch32_TA8_task_wise_adamerging_weights.pt",
        &format!("method.weights={}", saved.display()),
    );
    let mut extra = common(dir.path());
    extra.push(format!("report_save_path={}", dir.path().join("reused.json").display()));
    run(dir.path(), &args(&line, &extra));
    let a = std::fs::read_to_string(dir.path().join("trained.json")).unwrap();
    let b = std::fs::read_to_string(dir.path().join("reused.json")).unwrap();
    assert_eq!(a, b, "the report of the learned weights, reloaded");
    assert!(a.contains("\"trainable_params\": 0"), "{a}");
}

#[test]
fn layer_wise_writes_under_the_loggers_log_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = common(dir.path());
    extra.push("method.max_steps=2".into());
    extra.push("taskpool=dummy".into());
    run(dir.path(), &args(LAYER_WISE, &extra));
    let saved =
        dir.path().join("outputs/logs/ViT-B-32/clip_layer_wise_adamerging_adam/merging_weights.pt");
    let (shape, dtype, _) = torch_load(&saved);
    assert_eq!(
        (shape, dtype.as_str()),
        (vec![8, 55], "torch.float32"),
        "3 layers: 5 + 3·16 + 2 tensors"
    );
}

/// λ after `steps` steps of the layer-wise run, saved to `out`.
fn layer_wise(dir: &Path, steps: u64, out: &str, extra: &[&str]) -> Command {
    let mut a = common(dir);
    a.push(format!("method.max_steps={steps}"));
    a.push("taskpool=dummy".into());
    a.push("+method.checkpoint_every_steps=1".into());
    a.extend(extra.iter().map(|s| s.to_string()));
    let line = LAYER_WISE.replace(
        "method.save_merging_weights=merging_weights.pt",
        &format!(
            "method.save_merging_weights=/{}",
            dir.join(out).display().to_string().trim_start_matches('/')
        ),
    );
    command(dir, &args(&line, &a))
}

#[test]
fn a_killed_or_stopped_run_resumes_to_the_same_lambda() {
    let steps = 100;
    let reference = tempfile::tempdir().unwrap();
    let out = layer_wise(reference.path(), steps, "full.pt", &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, _, full) = torch_load(&reference.path().join("full.pt"));

    for signal in ["TERM", "KILL"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = layer_wise(dir.path(), steps, "resumed.pt", &[]).spawn().unwrap();
        // Wait for a checkpoint past step 1, then stop the run.
        let state_dir = dir.path().join("cache/tta");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let step =
                std::fs::read_dir(&state_dir).ok().and_then(|mut d| d.next()).and_then(|e| {
                    let text = std::fs::read_to_string(e.ok()?.path()).ok()?;
                    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                    v["step"].as_u64()
                });
            if step.is_some_and(|s| s >= 2) {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it was stopped");
            assert!(std::time::Instant::now() < deadline, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        if signal == "TERM" {
            assert_eq!(status.code(), Some(143), "SIGTERM: checkpoint, then exit 143");
        }
        assert!(!dir.path().join("resumed.pt").exists(), "{signal}: stopped before the end");
        let out = layer_wise(dir.path(), steps, "resumed.pt", &[]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (_, _, resumed) = torch_load(&dir.path().join("resumed.pt"));
        assert_eq!(
            resumed, full,
            "SIG{signal}, restarted: λ bit-identical to the uninterrupted run"
        );
        // The logs hold the whole run, the steps before the stop included.
        let csv = |d: &Path| {
            std::fs::read_to_string(
                d.join("outputs/logs/ViT-B-32/clip_layer_wise_adamerging_adam/metrics.csv"),
            )
            .unwrap()
        };
        let (want, got) = (csv(reference.path()), csv(dir.path()));
        assert_eq!(want.lines().count(), steps as usize + 1, "a header and a row per step");
        assert_eq!(got, want, "SIG{signal}, restarted: metrics.csv of the uninterrupted run");
    }
}

#[test]
fn a_checkpoint_of_another_configuration_is_refused_with_its_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |extra: &[&str]| {
        let mut a = common(dir.path());
        a.extend([
            "method=adamerging/clip".to_string(),
            "method.name=clip_task_wise_adamerging".into(),
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8".into(),
            "taskpool=dummy".into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        command(dir.path(), &a).output().unwrap()
    };
    let files = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.path().join("cache/tta"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    assert!(run_with(&["method.max_steps=1"]).status.success());
    let first = files();
    assert!(run_with(&["method.max_steps=1", "method.lr=2e-3"]).status.success());
    let second: Vec<PathBuf> = files().into_iter().filter(|f| !first.contains(f)).collect();
    assert_eq!((first.len(), second.len()), (1, 1), "one checkpoint per configuration");
    // The lr=2e-3 run's checkpoint replaced by the lr=1e-3 run's.
    std::fs::copy(&first[0], &second[0]).unwrap();
    let out = run_with(&["method.max_steps=2", "method.lr=2e-3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a foreign checkpoint was resumed:\n{err}");
    let name = second[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name) && err.contains("another configuration"), "{err}");
    // A truncated checkpoint: named too, not silently restarted.
    std::fs::write(&second[0], "{\"run\": ").unwrap();
    let out = run_with(&["method.max_steps=2", "method.lr=2e-3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&name) && err.contains("unreadable"), "{err}");
}

/// The layer-wise run's arguments for the distributed tests: `steps` steps, a trace and a report
/// in `dir` under `tag`.
fn dist_args(dir: &Path, steps: u64, tag: &str) -> Vec<String> {
    let mut a = common(dir);
    a.extend([
        "method=adamerging/clip".to_string(),
        "method.name=clip_layer_wise_adamerging".into(),
        "method.save_merging_weights=null".into(),
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8".into(),
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8".into(),
        "taskpool.dataloader_kwargs.batch_size=16".into(),
        format!("method.max_steps={steps}"),
        "+method.checkpoint_every_steps=1".into(),
        format!("+method.trace_path={}", dir.join(format!("{tag}.trace.json")).display()),
        format!("report_save_path={}", dir.join(format!("{tag}.json")).display()),
    ]);
    a
}

fn quiet(mut c: Command) -> Command {
    c.env("OMP_NUM_THREADS", "1").env("FUSION_BENCH_FAST_TIMEOUTS", "1").env("RUST_BACKTRACE", "0");
    c
}

/// One coordinator (`--serve`, also computing) and two workers (`--join`), optionally killing
/// one worker (SIGKILL) once the run has checkpointed step 3. Returns the λ trace's steps and
/// the report's bytes.
fn three_processes(dir: &Path, steps: u64, kill_one: bool) -> (serde_json::Value, Vec<u8>) {
    let job = dir.join("job");
    let mut a = dist_args(dir, steps, "coord");
    a.extend([
        "--serve".into(),
        "127.0.0.1:0".into(),
        "--min-workers".into(),
        "2".into(),
        // How long the job waits for both workers before starting (it starts as soon as they
        // joined; they come back for the evaluation after the adaptation).
        "--wait".into(),
        "60".into(),
        "--job-dir".into(),
        job.display().to_string(),
    ]);
    let (coord, addr) = Coordinator::spawn(quiet(command(dir, &a)));
    let mut workers: Vec<_> = (0..2)
        .map(|i| {
            let wdir = dir.join(format!("w{i}"));
            // The same command line as the coordinator's (the job id comes from the config).
            let mut a = dist_args(dir, steps, "coord");
            a.extend([
                "--join".into(),
                addr.clone(),
                "--node-name".into(),
                format!("w{i}"),
                "--job-dir".into(),
                job.display().to_string(),
            ]);
            spawn_worker(quiet(command(dir, &a)), &wdir)
        })
        .collect();
    if kill_one {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let step = std::fs::read_dir(dir.join("cache/tta"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| {
                    let v: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(e.ok()?.path()).ok()?)
                            .ok()?;
                    v["step"].as_u64()
                });
            if step.is_some_and(|s| s >= 3) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        workers[0].kill().unwrap();
    }
    coord.wait_success();
    // Every surviving worker adapted, then evaluated the merged model with the others.
    for (i, w) in workers.iter_mut().enumerate().skip(kill_one as usize) {
        let wdir = dir.join(format!("w{i}"));
        assert_worker_succeeded(w, i, &wdir);
        // A survivor of a killed worker may have been given no adaptation item.
        let jobs: &[&str] = if kill_one { &[EVALUATION] } else { &[ADAPTATION, EVALUATION] };
        assert_worker_computed(&wdir, jobs);
    }
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("coord.trace.json")).unwrap())
            .unwrap();
    (trace["steps"].clone(), std::fs::read(dir.join("coord.json")).unwrap())
}

#[test]
fn three_processes_give_the_single_process_lambda_and_report_also_with_a_worker_killed() {
    let steps = 40;
    let single = tempfile::tempdir().unwrap();
    let out =
        quiet(command(single.path(), &dist_args(single.path(), steps, "coord"))).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trace: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(single.path().join("coord.trace.json")).unwrap(),
    )
    .unwrap();
    let report = std::fs::read(single.path().join("coord.json")).unwrap();
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (steps_seen, bytes) = three_processes(dir.path(), steps, kill);
        assert_eq!(steps_seen.as_array().map(Vec::len), Some(steps as usize));
        for (s, (a, b)) in steps_seen
            .as_array()
            .unwrap()
            .iter()
            .zip(trace["steps"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(a["lambda"], b["lambda"], "kill={kill}: λ after step {s}, bit for bit");
        }
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&report),
            "kill={kill}: the report"
        );
    }
}

/// `fabric.devices=2`: two local workers share each step's items; λ is the one-worker λ, bit for
/// bit.
#[test]
fn two_devices_draw_fusionbenchs_ddp_batches_per_rank() {
    let run_with = |devices: &str, dir: &Path| {
        let mut a = dist_args(dir, 4, "run");
        a.push(format!("fabric.devices={devices}"));
        let out = quiet(command(dir, &a)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.trace.json")).unwrap())
                .unwrap();
        t["steps"].clone()
    };
    let (d1, d2, d2b) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = run_with("1", d1.path());
    let two = run_with("2", d2.path());
    assert_eq!(two, run_with("2", d2b.path()), "two devices: deterministic");
    let (one, two) = (one.as_array().unwrap(), two.as_array().unwrap());
    assert_eq!((one.len(), two.len()), (4, 4));
    for (a, b) in one.iter().zip(two) {
        let (a, b) = (a["tasks"].as_array().unwrap(), b["tasks"].as_array().unwrap());
        assert_eq!(b.len(), 2 * a.len(), "an item per task and rank");
        for pair in b.chunks(2) {
            assert_eq!((pair[0]["rank"].as_u64(), pair[1]["rank"].as_u64()), (Some(0), Some(1)));
            assert_eq!(pair[0]["task"], pair[1]["task"]);
            let (x, y) =
                (pair[0]["indices"].as_array().unwrap(), pair[1]["indices"].as_array().unwrap());
            assert!(x.len() <= 16 && y.len() <= 16, "method.batch_size is per rank");
        }
    }
    // Effective batch 2 × batch_size: λ moves otherwise than with one device.
    let last = |steps: &[serde_json::Value]| steps.last().unwrap()["lambda"].clone();
    assert_ne!(last(one), last(two));
}

/// Bad settings and weights files fail before any work, naming the key or the file.
#[test]
fn bad_input_is_refused_with_the_key_or_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = |extra: &[&str], needle: &str| {
        let mut a = common(dir.path());
        a.extend([
            "method=adamerging/clip".to_string(),
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8".into(),
            "taskpool=dummy".into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = command(dir.path(), &a).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(needle), "{extra:?}: the error should name `{needle}`:\n{err}");
    };
    bad(&["method.max_steps=0"], "method.max_steps");
    bad(&["method.lr=0"], "method.lr");
    bad(&["method.lr=-1e-3"], "method.lr");
    bad(&["method.batch_size=0"], "method.batch_size");
    bad(&["method.name=clip_nope_adamerging"], "clip_nope_adamerging");
    bad(&["method.optimizer=sgd"], "method.optimizer");
    // A task-wise [8] file for a layer-wise run: the shapes and the file are named.
    let pt =
        root().join("tests/fixtures/golden/fusionbench_adamerging/task_wise.merging_weights.pt");
    let w = format!("method.weights={}", pt.display());
    bad(&["method.name=clip_layer_wise_adamerging", &w], "task_wise.merging_weights.pt");
    bad(&["method.name=clip_layer_wise_adamerging", &w], "[8, 55]");
    bad(&["method.name=clip_task_wise_adamerging", "method.weights=[0.3,0.3]"], "[8]");
    let missing = format!("method.weights={}", dir.path().join("nope.pt").display());
    bad(&["method.name=clip_task_wise_adamerging", &missing], "nope.pt");
    let txt = dir.path().join("w.txt");
    std::fs::write(&txt, "0.3").unwrap();
    bad(
        &["method.name=clip_task_wise_adamerging", &format!("method.weights={}", txt.display())],
        "w.txt",
    );
}
