//! Distributed evaluation on loopback: a coordinator (`--serve`) and two workers (`--join`), each
//! a real `fusion_bench` process running the same command line, give the single-process report
//! byte for byte — also when a worker is killed mid-run, with nothing finished recomputed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn args(report: &Path) -> Vec<String> {
    vec![
        "method=task_arithmetic".into(),
        "method.scaling_factor=0.3".into(),
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8".into(),
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8".into(),
        "fabric.accelerator=cpu".into(),
        // Small batches: many work items, so a worker is killed with work still in flight.
        "taskpool.dataloader_kwargs.batch_size=16".into(),
        "print_config=false".into(),
        format!("report_save_path={}", report.display()),
    ]
}

fn command(extra: &[String], log: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(extra)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
        // One intra-op thread per process, so several share the cores without oversubscribing
        // them (reports do not depend on the thread count: see the devices test).
        .env("OMP_NUM_THREADS", "1")
        .env("FUSION_BENCH_IMAGE_CACHE_GB", "0")
        .env("RUST_LOG", log)
        .env("RUST_BACKTRACE", "0")
        .current_dir(root());
    c
}

/// Starts `c` with stderr forwarded line by line to a channel (and kept for error messages).
fn spawn_logged(mut c: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line containing `needle`; returns it (panics with the lines seen on timeout).
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("no line with `{needle}` within {timeout:?}; saw:\n{}", seen.join("\n"));
}

/// The report of the job run alone, on two intra-op threads (the cluster processes have one).
fn single_process_report(dir: &Path) -> Vec<u8> {
    let report = dir.join("single.json");
    let out = command(&args(&report), "warn").env("OMP_NUM_THREADS", "2").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(report).unwrap()
}

/// Coordinator plus two workers; `kill_one` SIGKILLs the first worker after its first batch.
fn distributed_report(dir: &Path, kill_one: bool) -> (Vec<u8>, serde_json::Value) {
    let report = dir.join(if kill_one { "killed.json" } else { "three.json" });
    let job = dir.join(if kill_one { "job-killed" } else { "job" });
    let mut coord_args = args(&report);
    coord_args.extend([
        "--serve".into(),
        "127.0.0.1:0".into(),
        "--min-workers".into(),
        "2".into(),
        "--job-dir".into(),
        job.display().to_string(),
    ]);
    let (mut coord, coord_log) = spawn_logged(command(&coord_args, "info"));
    let line = wait_for(&coord_log, "coordinator listening", Duration::from_secs(60));
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in `{line}`"))
        .to_string();
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut a = args(&dir.join(format!("worker{i}.json")));
        a.extend([
            "--join".into(),
            addr.clone(),
            "--node-name".into(),
            format!("w{i}"),
            "--job-dir".into(),
            job.display().to_string(),
        ]);
        workers.push(spawn_logged(command(&a, "info,fusion_bench::program::work=debug")));
    }
    if kill_one {
        let (w, log) = &mut workers[0];
        wait_for(log, "batch", Duration::from_secs(60));
        w.kill().unwrap();
    }
    let status = coord.wait().unwrap();
    let rest: Vec<String> = coord_log.try_iter().collect();
    assert!(status.success(), "coordinator failed:\n{}", rest.join("\n"));
    for (i, (w, _)) in workers.iter_mut().enumerate() {
        let s = w.wait().unwrap();
        if !(kill_one && i == 0) {
            assert!(s.success(), "worker {i} failed");
        }
        assert!(!dir.join(format!("worker{i}.json")).exists(), "a worker wrote a report");
    }
    let mut meta = report.as_os_str().to_owned();
    meta.push(".meta.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(PathBuf::from(meta)).unwrap()).unwrap();
    (std::fs::read(&report).unwrap(), meta)
}

#[test]
fn three_processes_give_the_single_process_report_even_with_a_worker_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let single = single_process_report(tmp.path());

    let (three, meta) = distributed_report(tmp.path(), false);
    assert_eq!(String::from_utf8_lossy(&three), String::from_utf8_lossy(&single));
    let cluster = &meta["cluster"];
    let per_worker = cluster["per_worker"].as_array().unwrap();
    let busy = per_worker.iter().filter(|w| w[1].as_u64().unwrap() > 0).count();
    assert!(busy >= 2, "the work was not shared: {cluster}");
    assert_eq!(cluster["computed_twice"], 0);

    let (killed, meta) = distributed_report(tmp.path(), true);
    assert_eq!(String::from_utf8_lossy(&killed), String::from_utf8_lossy(&single));
    let cluster = &meta["cluster"];
    assert_eq!(cluster["workers_lost"], 1, "{cluster}");
    assert_eq!(cluster["computed_twice"], 0, "{cluster}");
}

#[test]
fn a_missing_coordinator_is_a_clear_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut a = args(&tmp.path().join("w.json"));
    a.extend([
        "--join".into(),
        format!("127.0.0.1:{port}"),
        "--wait".into(),
        "2".into(),
        "--job-dir".into(),
        tmp.path().join("job").display().to_string(),
    ]);
    // `--wait 2`: the worker must give up by itself. How long it took is printed, not asserted;
    // only a worker still running after 120 s counts as a hang.
    let t0 = Instant::now();
    let (mut child, log) = spawn_logged(command(&a, "warn"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("a worker with `--wait 2` and no coordinator still runs after 120 s: a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("the worker gave up after {:?}", t0.elapsed());
    let err = log.iter().collect::<Vec<_>>().join("\n");
    assert!(!status.success());
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    let bad = command(&["--join".into(), "nowhere:".into()], "warn").output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--join nowhere:"));
    for (hosts, rank, want) in [
        ("h1,h2", "0", "needs a port"),
        ("h1:7000,h2", "2", "has 2 hosts"),
        ("h1:7000,,h3", "1", "empty host"),
    ] {
        let a = vec!["--hosts".to_string(), hosts.into(), "--rank".into(), rank.into()];
        let out = command(&a, "warn").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{hosts} {rank}: {err}");
    }
}

#[test]
fn a_host_list_sets_the_roles_of_a_launch_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let single = single_process_report(tmp.path());
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hosts = format!("localhost:{port},localhost,localhost");
    let report = tmp.path().join("hosts.json");
    let children: Vec<_> = (0..3)
        .map(|rank| {
            let mut a = args(&if rank == 0 {
                report.clone()
            } else {
                tmp.path().join(format!("r{rank}.json"))
            });
            a.extend([
                "--hosts".into(),
                hosts.clone(),
                "--rank".into(),
                rank.to_string(),
                "--job-dir".into(),
                tmp.path().join("job").display().to_string(),
            ]);
            command(&a, "warn").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(std::fs::read(&report).unwrap(), single);
    let mut meta = report.as_os_str().to_owned();
    meta.push(".meta.json");
    let meta = std::fs::read_to_string(PathBuf::from(meta)).unwrap();
    assert!(meta.contains("rank-1") && meta.contains("rank-2"), "{meta}");
}

/// `fabric.devices=N`: N workers in this one process share the evaluation's batches, and the
/// report is the single-worker one, byte for byte, whatever the intra-op thread count (the
/// thread-sensitive steps run on one thread; `device::single_threaded`).
#[test]
fn local_devices_and_thread_counts_give_the_single_worker_report() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, threads: &str, extra: &[&str]| {
        let report = tmp.path().join(format!("{name}.json"));
        let mut a = args(&report);
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = command(&a, "info").env("OMP_NUM_THREADS", threads).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let mut meta = report.as_os_str().to_owned();
        meta.push(".meta.json");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(PathBuf::from(meta)).unwrap()).unwrap();
        (std::fs::read(&report).unwrap(), meta)
    };
    let (one, _) = run("one", "2", &[]);
    let (one_thread, _) = run("one-thread", "1", &[]);
    assert_eq!(one, one_thread, "the report depends on the intra-op thread count");
    for devices in ["2", "3"] {
        let (many, meta) =
            run(&format!("devices-{devices}"), "2", &[&format!("fabric.devices={devices}")]);
        assert_eq!(many, one, "fabric.devices={devices} changed the report");
        let workers = meta["cluster"]["per_worker"].as_array().unwrap();
        let n: usize = devices.parse().unwrap();
        assert_eq!(workers.len(), n, "{meta}");
        assert!(workers.iter().all(|w| w[1].as_u64().unwrap() > 0), "an idle worker: {meta}");
        assert_eq!(meta["devices"].as_array().unwrap().len(), n, "{meta}");
    }
    let bad = command(
        &[args(&tmp.path().join("x.json")), vec!["fabric.devices=[0,1]".into()]].concat(),
        "warn",
    )
    .output()
    .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("names GPUs"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
