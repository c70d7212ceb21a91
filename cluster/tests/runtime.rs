//! Integration tests of the actor runtime: local mode, a coordinator with worker child processes
//! (`examples/test_runtime_node`), a SIGKILLed worker, a worker of another job, a failing item,
//! and a killed coordinator. Everything runs on 127.0.0.1 with port
//! 0 and `ClusterOptions::fast()` (QUIC idle 1 s, heartbeat 0.2 s, lost after 1.5 s).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use fusion_cluster::{
    runtime::{
        run_coordinator, run_worker, ClusterError, ClusterOptions, Executor, RunSummary, Shard,
        ShardLoader, ShardOptions, LOCAL_WORKER_NAME,
    },
    transport::TransportError,
};
use support::{
    runtime::{expected, items, loopback, opts, toy, Toy, JOB},
    watchdog, Reaper,
};

mod support;

fn local_run(n: u64) -> RunSummary {
    let dir = tempfile::tempdir().unwrap();
    run_coordinator(items(n), Some(Box::new(toy(0))), None, &opts(dir.path()), |_| {}).unwrap()
}

/// Starts a worker child process (`examples/test_runtime_node worker …`).
fn spawn_worker(
    addr: SocketAddr,
    dir: &Path,
    name: &str,
    sleep_ms: u64,
    marker: Option<(&Path, usize)>,
) -> Child {
    let mut args: Vec<String> = vec![
        "worker".into(),
        addr.to_string(),
        dir.display().to_string(),
        name.into(),
        sleep_ms.to_string(),
    ];
    if let Some((path, after)) = marker {
        args.extend([path.display().to_string(), after.to_string()]);
    }
    Command::new(support::example_bin("test_runtime_node"))
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn local_mode_returns_every_result_in_item_order() {
    let _watchdog =
        watchdog("local_mode_returns_every_result_in_item_order", Duration::from_secs(20));
    let start = Instant::now();
    let s = local_run(50);
    println!("local run of 50 items: {:?}", start.elapsed());
    assert_eq!(s.results, expected(50));
    assert_eq!(s.executed, vec![1; 50]);
    assert_eq!(s.per_worker, vec![(LOCAL_WORKER_NAME.to_string(), 50)]);
    assert_eq!((s.workers_lost, s.computed_twice, s.refused), (0, 0, 0));
}

#[test]
fn local_mode_with_no_items_returns_at_once() {
    let _watchdog = watchdog("local_mode_with_no_items_returns_at_once", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let s = run_coordinator(Vec::new(), Some(Box::new(toy(0))), None, &opts(dir.path()), |_| {})
        .unwrap();
    assert!(s.results.is_empty() && s.executed.is_empty());
}

#[test]
fn local_executor_panic_fails_the_run_with_the_item_and_worker() {
    let _watchdog = watchdog(
        "local_executor_panic_fails_the_run_with_the_item_and_worker",
        Duration::from_secs(20),
    );
    let dir = tempfile::tempdir().unwrap();
    let exec = Toy { panic_on: Some(3), ..Toy::default() };
    let err = run_coordinator(items(10), Some(Box::new(exec)), None, &opts(dir.path()), |_| {})
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ClusterError::ItemFailed { item: 3, ref worker, .. } if worker == LOCAL_WORKER_NAME),
        "{err:?}"
    );
    assert!(msg.contains("item 3") && msg.contains("panicked") && msg.contains("1003"), "{msg}");
}

#[test]
fn three_processes_give_the_same_report_as_one() {
    let _watchdog =
        watchdog("three_processes_give_the_same_report_as_one", Duration::from_secs(20));
    let n = 40;
    let local = local_run(n);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 2;
    let mut reaper = Reaper(Vec::new());
    let start = Instant::now();
    let s = run_coordinator(items(n), None, loopback(), &o, |addr| {
        for name in ["w-1", "w-2"] {
            reaper.0.push(spawn_worker(addr, dir.path(), name, 20, None));
        }
    })
    .unwrap();
    println!("3-process run of {n} items: {:?}, per worker {:?}", start.elapsed(), s.per_worker);
    assert_eq!(s.results, local.results);
    assert_eq!(s.executed, vec![1; n as usize]);
    assert_eq!((s.workers_lost, s.computed_twice), (0, 0));
    let mut names: Vec<&str> = s.per_worker.iter().map(|(w, _)| w.as_str()).collect();
    names.sort();
    assert_eq!(names, ["w-1", "w-2"]);
    assert!(s.per_worker.iter().all(|(_, c)| *c > 0), "{:?}", s.per_worker);
    assert_eq!(s.per_worker.iter().map(|(_, c)| c).sum::<usize>(), n as usize);
    for child in &mut reaper.0 {
        assert!(child.wait().unwrap().success(), "a worker exited with an error");
    }
}

#[test]
fn killed_worker_is_replaced_and_nothing_finished_is_recomputed() {
    let _watchdog = watchdog(
        "killed_worker_is_replaced_and_nothing_finished_is_recomputed",
        Duration::from_secs(20),
    );
    let n = 60;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("victim-started-3rd-item");
    let mut o = opts(dir.path());
    o.min_workers = 2;
    let (tx, rx) = mpsc::channel();
    let coordinator = {
        let dir = dir.path().to_path_buf();
        let marker = marker.clone();
        thread::spawn(move || {
            let start = Instant::now();
            let s = run_coordinator(items(n), None, loopback(), &o, |addr| {
                let victim = spawn_worker(addr, &dir, "victim", 40, Some((&marker, 3)));
                let survivor = spawn_worker(addr, &dir, "survivor", 40, None);
                tx.send((victim, survivor)).unwrap();
            });
            (s, start.elapsed())
        })
    };
    let (mut victim, survivor) = rx.recv().unwrap();
    let mut reaper = Reaper(vec![survivor]);
    let waited = Instant::now();
    while !marker.exists() {
        if waited.elapsed() > Duration::from_secs(10) {
            let _ = victim.kill();
            panic!("the victim never started its third item");
        }
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(60)); // mid-item, with results returned before
    victim.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    victim.wait().unwrap();
    let (s, took) = coordinator.join().unwrap();
    let s = s.unwrap();
    assert_eq!(s.workers_lost, 1, "{:?}", s.lost);
    let lost = &s.lost[0];
    let detected = lost.at.saturating_duration_since(killed_at);
    println!(
        "kill run of {n} items: {took:?}; loss detected after {detected:?} ({}), re-queued {:?}; per worker {:?}",
        lost.reason, lost.requeued, s.per_worker
    );
    assert_eq!(lost.name, "victim");
    assert!(!lost.requeued.is_empty(), "the victim held no item when killed");
    assert_eq!(s.results, expected(n));
    assert_eq!(s.executed, vec![1; n as usize], "an item was computed twice or never");
    assert_eq!(s.computed_twice, 0);
    let count = |w: &str| s.per_worker.iter().find(|(name, _)| name == w).map(|(_, c)| *c);
    assert!(count("victim").unwrap() >= 2, "{:?}", s.per_worker);
    assert_eq!(count("victim").unwrap() + count("survivor").unwrap(), n as usize);
    assert!(reaper.0[0].wait().unwrap().success(), "the survivor exited with an error");
}

#[test]
fn worker_of_another_job_is_refused_and_the_run_completes() {
    let _watchdog =
        watchdog("worker_of_another_job_is_refused_and_the_run_completes", Duration::from_secs(20));
    let n = 30;
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut refusal = None;
    let s = run_coordinator(items(n), Some(Box::new(toy(30))), loopback(), &o, |addr| {
        let mut other = o.clone();
        other.job_id = "another-job".into();
        let intruder =
            thread::spawn(move || run_worker(addr, "intruder", Box::new(toy(0)), &other));
        refusal = Some(intruder.join().unwrap());
    })
    .unwrap();
    let err = refusal.unwrap().unwrap_err();
    assert!(
        matches!(err, ClusterError::Transport(TransportError::RefusedByPeer { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("job id mismatch"), "{err}");
    assert_eq!(s.results, expected(n));
    assert!(s.refused >= 1, "the coordinator counted no refusal");
    assert_eq!(s.per_worker, vec![(LOCAL_WORKER_NAME.to_string(), n as usize)]);
}

#[test]
fn failing_item_on_a_remote_worker_fails_the_run_with_a_clear_error() {
    let _watchdog = watchdog(
        "failing_item_on_a_remote_worker_fails_the_run_with_a_clear_error",
        Duration::from_secs(20),
    );
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut worker = None;
    let err = run_coordinator(items(20), None, loopback(), &o, |addr| {
        let o = o.clone();
        let exec = Toy { fail_on: Some(5), ..Toy::default() };
        worker = Some(thread::spawn(move || run_worker(addr, "w-bad", Box::new(exec), &o)));
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ClusterError::ItemFailed { item: 5, ref worker, .. } if worker == "w-bad"),
        "{err:?}"
    );
    assert!(msg.contains("boom on item value 1005"), "{msg}");
    let worker_err = worker.unwrap().join().unwrap().unwrap_err();
    assert!(matches!(worker_err, ClusterError::Aborted { .. }), "{worker_err:?}");
    assert!(worker_err.to_string().contains("item 5"), "{worker_err}");
}

#[test]
fn worker_returns_an_error_when_its_coordinator_is_killed() {
    let _watchdog =
        watchdog("worker_returns_an_error_when_its_coordinator_is_killed", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(support::example_bin("test_runtime_node"))
        .args(["coordinator", &dir.path().display().to_string(), "200"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reaper = Reaper(vec![child]);
    let addr: SocketAddr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once("LISTENING ").map(|(_, a)| a.trim().parse().unwrap()))
        .expect("the coordinator child never listened");
    let count = Arc::new(AtomicUsize::new(0));
    let exec = Toy { sleep: Duration::from_millis(50), count: count.clone(), ..Toy::default() };
    let o = opts(dir.path());
    let worker = thread::spawn(move || run_worker(addr, "orphan", Box::new(exec), &o));
    let waited = Instant::now();
    while count.load(Ordering::SeqCst) < 3 {
        assert!(waited.elapsed() < Duration::from_secs(10), "the worker never got items");
        thread::sleep(Duration::from_millis(5));
    }
    reaper.0[0].kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    let err = worker.join().unwrap().unwrap_err();
    let detected = killed_at.elapsed();
    println!("coordinator loss noticed by the worker after {detected:?}: {err}");
    assert!(matches!(err, ClusterError::CoordinatorLost { .. }), "{err:?}");
}

#[test]
fn options_that_cannot_work_are_refused() {
    let _watchdog = watchdog("options_that_cannot_work_are_refused", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let err = run_coordinator(items(1), None, None, &opts(dir.path()), |_| {}).unwrap_err();
    assert!(matches!(err, ClusterError::Options(_)), "{err:?}");
    let mut o = opts(dir.path());
    o.lost_after = o.heartbeat_interval;
    let err = run_coordinator(items(1), Some(Box::new(toy(0))), None, &o, |_| {}).unwrap_err();
    assert!(err.to_string().contains("lost_after"), "{err}");
}

#[test]
fn silent_worker_is_declared_lost_by_its_missing_heartbeats() {
    let _watchdog = watchdog(
        "silent_worker_is_declared_lost_by_its_missing_heartbeats",
        Duration::from_secs(20),
    );
    let n = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 1; // the silent worker gets items as soon as items are handed out
    let (joined_tx, joined_rx) = mpsc::channel();
    let mut silent = None;
    let s = run_coordinator(items(n), Some(Box::new(toy(30))), loopback(), &o, |addr| {
        let dir = dir.path().to_path_buf();
        silent = Some(thread::spawn(move || silent_worker(addr, &dir, joined_tx)));
    })
    .unwrap();
    let assigned: Vec<u64> = joined_rx.recv().unwrap();
    silent.unwrap().join().unwrap();
    println!("silent worker: held {assigned:?}; lost {:?}", s.lost);
    assert_eq!(s.workers_lost, 1);
    assert_eq!(s.lost[0].name, "silent");
    assert!(s.lost[0].reason.contains("no heartbeat"), "{}", s.lost[0].reason);
    let requeued: Vec<u64> = s.lost[0].requeued.iter().map(|&i| i as u64).collect();
    assert_eq!(requeued, assigned, "the silent worker's items were not re-queued");
    assert_eq!(s.results, expected(n));
    assert_eq!(s.executed, vec![1; n as usize]);
    assert_eq!(
        s.per_worker,
        vec![(LOCAL_WORKER_NAME.to_string(), n as usize), ("silent".to_string(), 0)]
    );
}

/// A worker that joins, takes its items, and then says nothing (its QUIC connection stays up
/// with keep-alives): only the missing heartbeats can reveal it.
fn silent_worker(addr: SocketAddr, dir: &Path, joined: mpsc::Sender<Vec<u64>>) {
    use fusion_cluster::{
        runtime::wire::Wire,
        transport::{Endpoint, JobCredentials, TransportOptions},
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let node = JobCredentials::load(dir).unwrap().issue_node("silent", &[]).unwrap();
        let ep =
            Endpoint::bind("127.0.0.1:0".parse().unwrap(), &node, JOB, TransportOptions::fast())
                .unwrap();
        let mut peer = ep.connect(addr, "localhost").await.unwrap();
        let mut assigned = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), peer.recv::<Wire>()).await {
                Ok(Ok(Wire::Assign { items, .. })) => {
                    assigned.extend(items.iter().map(|(item, _)| *item));
                    if assigned.len() == 2 {
                        joined.send(assigned.clone()).unwrap();
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => break, // the coordinator dropped us
            }
        }
    });
}

#[test]
fn item_too_large_for_a_frame_fails_the_run_instead_of_losing_workers() {
    let _watchdog = watchdog("item_too_large", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.transport.max_frame_len = 1024;
    let mut worker = None;
    let big = vec![vec![7u8; 4096]; 3];
    let err = run_coordinator(big, None, loopback(), &o, |addr| {
        let o = o.clone();
        worker = Some(thread::spawn(move || run_worker(addr, "w-1", Box::new(toy(0)), &o)));
    })
    .unwrap_err();
    assert!(
        matches!(err, ClusterError::ItemFailed { item: 0, ref worker, .. } if worker == "w-1"),
        "{err:?}"
    );
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let worker_err = worker.unwrap().join().unwrap().unwrap_err();
    assert!(matches!(worker_err, ClusterError::Aborted { .. }), "{worker_err:?}");
}

#[test]
fn public_types_cross_threads_and_fit_anyhow() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<ClusterError>(); // so callers can wrap it in anyhow::Error
    send_sync::<ClusterOptions>();
    send_sync::<RunSummary>();
    let o = ClusterOptions::new("j", "/tmp/j");
    assert_eq!(
        (o.heartbeat_interval, o.lost_after),
        (Duration::from_millis(500), Duration::from_secs(3))
    );
    assert_eq!((o.in_flight_per_worker, o.min_workers), (2, 0));
    let f = o.fast();
    assert_eq!(
        (f.heartbeat_interval, f.lost_after),
        (Duration::from_millis(200), Duration::from_millis(1500))
    );
    assert_eq!(f.transport.idle_timeout, Duration::from_secs(1));
}

/// Batch `b` = four bytes of value `b`, after 20 ms; batch 7 fails; records every load.
struct Numbers(Arc<std::sync::Mutex<Vec<usize>>>);

impl ShardLoader for Numbers {
    fn batches(&self) -> usize {
        10
    }
    fn load(&mut self, batch: usize) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().push(batch);
        thread::sleep(Duration::from_millis(20));
        if batch == 7 {
            return Err("bad batch 7".into());
        }
        Ok(vec![batch as u8; 4])
    }
}

#[test]
fn shard_actor_shares_loads_reads_ahead_and_evicts() {
    let _watchdog = watchdog("shard_actor", Duration::from_secs(20));
    let loads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loaded = |b: usize| loads.lock().unwrap().iter().filter(|&&x| x == b).count();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = ShardOptions { cache_batches: 4, prefetch: 2 };
        let shard = Shard::spawn(Box::new(Numbers(loads.clone())), opts).await.unwrap();
        // Two concurrent requests for one batch share one load.
        let (a, b) = tokio::join!(shard.batch(0), shard.batch(0));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(*a, vec![0; 4]);
        assert!(Arc::ptr_eq(&a, &b), "the two requests got different loads");
        assert_eq!(loaded(0), 1);
        // Batches 1 and 2 were read ahead: asking for 1 later is a hit.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hits = shard.stats().await.unwrap().hits;
        assert_eq!(*shard.batch(1).await.unwrap(), vec![1; 4]);
        assert_eq!(shard.stats().await.unwrap().hits, hits + 1);
        for i in 2..7 {
            assert_eq!(*shard.batch(i).await.unwrap(), vec![i as u8; 4]);
        }
        for i in 0..7 {
            assert_eq!(loaded(i), 1, "batch {i} loaded {} times", loaded(i));
        }
        // A loader error reaches the client, naming the batch; so does an out-of-range batch.
        let err = shard.batch(7).await.unwrap_err();
        assert!(matches!(err, ClusterError::Shard { batch: 7, .. }), "{err:?}");
        assert!(err.to_string().contains("bad batch 7"), "{err}");
        assert!(shard.batch(10).await.unwrap_err().to_string().contains("out of range"));
        // Only the 4 most recently used batches stay: batch 0 is loaded again.
        assert_eq!(*shard.batch(0).await.unwrap(), vec![0; 4]);
        assert_eq!(loaded(0), 2);
        // From an executor's blocking thread.
        let handle = shard.clone();
        let b3 = tokio::task::spawn_blocking(move || handle.batch_blocking(3)).await.unwrap();
        assert_eq!(*b3.unwrap(), vec![3; 4]);
        shard.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(shard.batch(1).await, Err(ClusterError::Runtime(_))));
    });
}

/// An executor whose prefetcher records the items it is told about.
struct Prefetching {
    inner: Toy,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Executor for Prefetching {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        self.inner.execute(item)
    }
    fn prefetcher(&self) -> Option<fusion_cluster::runtime::Prefetcher> {
        let seen = self.seen.clone();
        Some(std::sync::Arc::new(move |item: &[u8]| seen.lock().unwrap().push(item.to_vec())))
    }
}

#[test]
fn queued_items_are_announced_to_the_prefetcher() {
    let _watchdog =
        watchdog("queued_items_are_announced_to_the_prefetcher", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let exec = Prefetching { inner: toy(20), seen: seen.clone() };
    let s =
        run_coordinator(items(10), Some(Box::new(exec)), None, &opts(dir.path()), |_| {}).unwrap();
    assert_eq!(s.results, expected(10));
    let seen = seen.lock().unwrap();
    // Two items in flight: every item after the first is queued behind a running one.
    assert!(seen.len() >= 8, "prefetcher saw {} items", seen.len());
    assert!(seen.iter().all(|i| items(10).contains(i)));
}
