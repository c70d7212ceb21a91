//! Integration tests of jobs with rounds ([`run_job`], [`Job::round`]): the toy test-time
//! adaptation of `tests/support/runtime.rs` (each round's items carry a state folded from the
//! last round's results) on local executors, on worker child processes
//! (`examples/test_runtime_node stepper`) with one SIGKILLed in round 2, a failed round whose
//! late results reach the next one, broadcasts and a late joiner, and a panicking driver. All on
//! 127.0.0.1, port 0, `ClusterOptions::fast()`; no assertion on wall time.

use std::{
    cell::Cell,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{atomic::Ordering, mpsc, Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use fusion_cluster::runtime::{
    local_worker_name, run_job, run_worker, ClusterError, ClusterOptions, Executor, Job,
    RoundResults, WorkerSummary, LOCAL_WORKER_NAME,
};
use support::{
    runtime::{
        drive_steps, loopback, mix, opts, parse_step, step_items, step_model, step_reference,
        step_result, stepper, Stepper, STEP_STATE_0,
    },
    watchdog, Reaper,
};

mod support;

fn results(rounds: &[RoundResults]) -> Vec<Vec<Vec<u8>>> {
    rounds.iter().map(|r| r.results.clone()).collect()
}

/// The toy job on one local executor: what every other run must reproduce.
fn single_local(rounds: u64, n: u64) -> Vec<Vec<Vec<u8>>> {
    let dir = tempfile::tempdir().unwrap();
    let local: Vec<Box<dyn Executor>> = vec![Box::new(stepper(0))];
    let (done, _) =
        run_job(local, None, &opts(dir.path()), |_| {}, |job| drive_steps(job, rounds, n)).unwrap();
    results(&done.unwrap())
}

/// Starts `examples/test_runtime_node stepper …`, hanging at `hang` = (marker, round, after).
fn spawn_stepper(
    addr: SocketAddr,
    dir: &Path,
    name: &str,
    sleep_ms: u64,
    hang: Option<(&Path, u64, usize)>,
) -> Child {
    let mut args: Vec<String> = vec![
        "stepper".into(),
        addr.to_string(),
        dir.display().to_string(),
        name.into(),
        sleep_ms.to_string(),
    ];
    if let Some((marker, round, after)) = hang {
        args.extend([marker.display().to_string(), round.to_string(), after.to_string()]);
    }
    Command::new(support::example_bin("test_runtime_node"))
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn local_job_runs_rounds_in_item_order_on_executors_that_keep_their_state() {
    let _watchdog = watchdog("local_job_runs_rounds", Duration::from_secs(20));
    let (rounds, n) = (3, 10);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (stepper(2), stepper(5));
    let counters = [(a.builds.clone(), a.seen.clone()), (b.builds.clone(), b.seen.clone())];
    let local: Vec<Box<dyn Executor>> = vec![Box::new(a), Box::new(b)];
    let ((names, done), job) = run_job(
        local,
        None,
        &opts(dir.path()),
        |_| {},
        |job| (job.workers(), drive_steps(job, rounds, n)),
    )
    .unwrap();
    let done = done.unwrap();
    assert_eq!(names, [LOCAL_WORKER_NAME.to_string(), local_worker_name(1)]);
    assert_eq!(results(&done), step_reference(rounds, n));
    for (i, r) in done.iter().enumerate() {
        let s = &r.summary;
        assert_eq!(s.round, i as u64 + 1);
        assert_eq!(s.executed, vec![1; n as usize]);
        assert_eq!(s.per_worker.iter().map(|(_, c)| c).sum::<usize>(), n as usize);
        assert!(s.lost.is_empty() && s.stale == 0 && s.computed_twice == 0, "{s:?}");
    }
    let seen: Vec<usize> = counters.iter().map(|(_, s)| s.load(Ordering::SeqCst)).collect();
    let builds: Vec<usize> = counters.iter().map(|(b, _)| b.load(Ordering::SeqCst)).collect();
    println!("items seen per executor {seen:?}, models built {builds:?}");
    // Each executor counted in its own state: had one been rebuilt, its count would fall short.
    assert_eq!(seen.iter().sum::<usize>(), (rounds * n) as usize);
    // It built its model at most once per round, and reused it for the round's other items.
    for (&s, &b) in seen.iter().zip(&builds) {
        assert!(b <= rounds as usize && s > b, "seen {s}, built {b}");
    }
    assert_eq!(job.rounds.len(), rounds as usize);
    assert_eq!((job.rounds_failed, job.stale, job.refused), (0, 0, 0));
    assert!(job.lost.is_empty());
    let names = [LOCAL_WORKER_NAME.to_string(), local_worker_name(1)];
    assert_eq!(job.per_worker, vec![(names[0].clone(), seen[0]), (names[1].clone(), seen[1])]);
}

#[test]
fn remote_job_of_five_rounds_matches_one_local_executor() {
    let _watchdog = watchdog("remote_job_of_five_rounds", Duration::from_secs(30));
    let (rounds, n) = (5, 12);
    let reference = single_local(rounds, n);
    assert_eq!(reference, step_reference(rounds, n));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 2;
    let mut reaper = Reaper(Vec::new());
    let ((names, done), job) = run_job(
        Vec::new(),
        loopback(),
        &o,
        |addr| {
            for name in ["w-1", "w-2"] {
                reaper.0.push(spawn_stepper(addr, dir.path(), name, 10, None));
            }
        },
        |job| {
            let mut names = job.workers();
            names.sort();
            (names, drive_steps(job, rounds, n))
        },
    )
    .unwrap();
    let done = done.unwrap();
    assert_eq!(names, ["w-1", "w-2"], "min_workers holds the driver until both joined");
    assert_eq!(results(&done), reference);
    for r in &done {
        assert_eq!(r.summary.executed, vec![1; n as usize]);
        assert!(r.summary.lost.is_empty() && r.summary.stale == 0, "{:?}", r.summary);
    }
    println!("5 rounds on 2 processes: per worker {:?}, {:?}", job.per_worker, job.elapsed);
    assert!(job.lost.is_empty());
    assert_eq!(job.rounds.len(), rounds as usize);
    assert_eq!(job.per_worker.iter().map(|(_, c)| c).sum::<usize>(), (rounds * n) as usize);
    for child in &mut reaper.0 {
        assert!(child.wait().unwrap().success(), "a worker exited with an error");
    }
}

#[test]
fn worker_killed_in_round_two_is_reported_and_later_rounds_go_on_without_it() {
    let _watchdog = watchdog("worker_killed_in_round_two", Duration::from_secs(30));
    let (rounds, n) = (5, 12);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("victim-hangs-in-round-2");
    let mut o = opts(dir.path());
    o.min_workers = 2;
    let (tx, rx) = mpsc::channel();
    let coordinator = {
        let dir = dir.path().to_path_buf();
        let marker = marker.clone();
        thread::spawn(move || {
            let spawn = |addr| {
                // The victim hangs in its second item of round 2, after returning its first.
                let victim = spawn_stepper(addr, &dir, "victim", 10, Some((&marker, 2, 2)));
                let survivor = spawn_stepper(addr, &dir, "survivor", 10, None);
                tx.send((victim, survivor)).unwrap();
            };
            run_job(Vec::new(), loopback(), &o, spawn, |job| drive_steps(job, rounds, n))
        })
    };
    let (victim, survivor) = rx.recv().unwrap();
    let mut reaper = Reaper(vec![victim, survivor]);
    let waited = Instant::now();
    while !marker.exists() {
        assert!(waited.elapsed() < Duration::from_secs(15), "the victim never hung in round 2");
        thread::sleep(Duration::from_millis(5));
    }
    reaper.0[0].kill().unwrap(); // SIGKILL, in the middle of round 2
    reaper.0[0].wait().unwrap();
    let (done, job) = coordinator.join().unwrap().unwrap();
    let done = done.unwrap();
    assert_eq!(results(&done), single_local(rounds, n), "not the fault-free results");
    let r2 = &done[1].summary;
    println!("round 2: lost {:?}, per worker {:?}", r2.lost, r2.per_worker);
    assert_eq!(r2.lost.len(), 1, "{:?}", r2.lost);
    let lost = &r2.lost[0];
    assert_eq!((lost.name.as_str(), lost.round), ("victim", Some(2)));
    assert!(!lost.requeued.is_empty(), "the victim's hung item was not re-queued");
    assert_eq!(r2.executed, vec![1; n as usize], "an item of round 2 was computed twice or never");
    let mut names: Vec<&str> = r2.per_worker.iter().map(|(w, _)| w.as_str()).collect();
    names.sort();
    assert_eq!(names, ["survivor", "victim"]);
    assert!(done[0].summary.lost.is_empty());
    for r in &done[2..] {
        assert_eq!(r.summary.per_worker, vec![("survivor".to_string(), n as usize)]);
        assert!(r.summary.lost.is_empty());
    }
    assert_eq!(job.lost, r2.lost);
    assert_eq!((job.rounds.len(), job.rounds_failed), (rounds as usize, 0));
    assert!(reaper.0[1].wait().unwrap().success(), "the survivor exited with an error");
}

/// A latch: closed until `open`.
#[derive(Default)]
struct Latch(Mutex<bool>, Condvar);

impl Latch {
    fn open(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }

    fn wait(&self) {
        let open = self.0.lock().unwrap();
        let (_open, timeout) =
            self.1.wait_timeout_while(open, Duration::from_secs(10), |open| !*open).unwrap();
        assert!(!timeout.timed_out(), "the latch never opened");
    }
}

/// A stepper with a script: the opener fails item 0 of round 1 and opens the latch on its
/// first item of round 2; the other holds its round-1 items until the latch opens. Both log
/// every (round, index) they run.
struct Scripted {
    inner: Stepper,
    opener: bool,
    latch: Arc<Latch>,
    log: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Executor for Scripted {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        let (round, _, index) = parse_step(item)?;
        self.log.lock().unwrap().push((round, index));
        match (self.opener, round) {
            (true, 1) if index == 0 => return Err("boom in round 1".into()),
            (true, 2) => self.latch.open(),
            (false, 1) => self.latch.wait(),
            _ => {}
        }
        self.inner.execute(item)
    }
}

/// Round 1 fails on one worker while the other is still running one of its items; round 2
/// starts at once with the same item indices. That item's late result arrives *during* round 2
/// (the latch sees to it) and is dropped by its round tag: round 2's results are round 2's.
#[test]
fn late_results_of_a_failed_round_never_reach_the_next_one() {
    let _watchdog = watchdog("late_results_of_a_failed_round", Duration::from_secs(20));
    let n = 4;
    let dir = tempfile::tempdir().unwrap();
    let latch = Arc::new(Latch::default());
    let logs = [Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new()))];
    let local: Vec<Box<dyn Executor>> = (0..2)
        .map(|i| {
            let inner = stepper(0);
            let (latch, log) = (latch.clone(), logs[i].clone());
            Box::new(Scripted { inner, opener: i == 0, latch, log }) as Box<dyn Executor>
        })
        .collect();
    let ((first, second), job) = run_job(
        local,
        None,
        &opts(dir.path()),
        |_| {},
        |job| {
            let first = job.round(step_items(1, STEP_STATE_0, n));
            (first, job.round(step_items(2, STEP_STATE_0, n)))
        },
    )
    .unwrap();
    let err = first.unwrap_err();
    assert!(
        matches!(err, ClusterError::ItemFailed { item: 0, ref worker, .. } if worker == LOCAL_WORKER_NAME),
        "{err:?}"
    );
    let second = second.unwrap();
    let model = step_model(2, STEP_STATE_0);
    assert_eq!(second.results, (0..n).map(|i| step_result(model, i)).collect::<Vec<_>>());
    assert_eq!(second.summary.round, 2);
    assert_eq!(second.summary.executed, vec![1; n as usize]);
    assert!(second.summary.stale >= 1, "the held round-1 result did not arrive in round 2");
    // Items go one per worker in turn: the opener holds 0 and 2, the other 1 and 3. Item 2 of
    // round 1 ran on the opener (it had started), item 1 on the other: both dropped.
    assert_eq!(job.stale, 2);
    let held: Vec<(u64, u64)> = logs[1].lock().unwrap().clone();
    assert!(held.contains(&(1, 1)), "{held:?}");
    assert!(!held.contains(&(1, 3)), "a queued item of the failed round still ran: {held:?}");
    assert_eq!((job.rounds.len(), job.rounds_failed), (1, 1));
}

/// `on_broadcast` stores a u64 state; an item (u64 index) gives `mix(state ^ index)`.
#[derive(Default)]
struct Broadcasted(Option<u64>);

impl Executor for Broadcasted {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        let index = u64::from_le_bytes(item.try_into().map_err(|_| "bad item")?);
        let state = self.0.ok_or("no state broadcast yet")?;
        Ok(mix(state ^ index).to_le_bytes().to_vec())
    }

    fn on_broadcast(&mut self, state: &[u8]) -> Result<(), String> {
        let bytes = state.try_into().map_err(|_| format!("bad state of {} bytes", state.len()))?;
        self.0 = Some(u64::from_le_bytes(bytes));
        Ok(())
    }
}

fn indices(n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| i.to_le_bytes().to_vec()).collect()
}

fn broadcast_results(state: u64, n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| mix(state ^ i).to_le_bytes().to_vec()).collect()
}

/// A worker joining between rounds gets the last broadcast state, then items of the next
/// round; a new state reaches every worker before the next round's items; a refused state
/// fails the next round; a state too large for a frame is refused up front.
#[test]
fn broadcasts_reach_every_worker_and_a_late_joiner_gets_the_last_one() {
    let _watchdog = watchdog("broadcasts_reach_every_worker", Duration::from_secs(20));
    let n = 8;
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let addr = Cell::new(None);
    let local: Vec<Box<dyn Executor>> = vec![Box::new(Broadcasted::default())];
    let join = |job: &mut Job| {
        let (addr, o): (SocketAddr, _) = (addr.get().unwrap(), o.clone());
        let late =
            thread::spawn(move || run_worker(addr, "late", Box::new(Broadcasted::default()), &o));
        let waited = Instant::now();
        while job.workers().len() < 2 {
            assert!(waited.elapsed() < Duration::from_secs(10), "the late worker never joined");
            thread::sleep(Duration::from_millis(5));
        }
        late
    };
    let (out, job) = run_job(
        local,
        loopback(),
        &o,
        |a| addr.set(Some(a)),
        |job| {
            let too_big = job.broadcast(vec![0; o.transport.max_frame_len]).unwrap_err();
            job.broadcast(7u64.to_le_bytes().to_vec()).unwrap();
            let r1 = job.round(indices(n)).unwrap();
            let late = join(job);
            let r2 = job.round(indices(n)).unwrap();
            job.broadcast(9u64.to_le_bytes().to_vec()).unwrap();
            let r3 = job.round(indices(n)).unwrap();
            job.broadcast(vec![1, 2, 3]).unwrap();
            let r4 = job.round(indices(n));
            (too_big, [r1, r2, r3], r4, late)
        },
    )
    .unwrap();
    let (too_big, [r1, r2, r3], r4, late) = out;
    assert!(matches!(too_big, ClusterError::Options(ref m) if m.contains("max_frame_len")));
    assert_eq!(r1.results, broadcast_results(7, n));
    assert_eq!(r1.summary.per_worker, vec![(LOCAL_WORKER_NAME.to_string(), n as usize)]);
    assert_eq!(r2.results, broadcast_results(7, n), "the late joiner missed the last state");
    let late_items = r2.summary.per_worker.iter().find(|(w, _)| w == "late").map(|(_, c)| *c);
    assert!(late_items > Some(0), "the late joiner got no item: {:?}", r2.summary.per_worker);
    assert_eq!(r3.results, broadcast_results(9, n));
    let err = r4.unwrap_err();
    assert!(matches!(err, ClusterError::ItemFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("refused the last broadcast state: bad state of 3"), "{err}");
    assert_eq!((job.rounds.len(), job.rounds_failed), (3, 1));
    assert!(late.join().unwrap().is_ok(), "the late worker was not released with Done");
}

#[test]
fn workers_are_aborted_when_the_driver_panics() {
    let _watchdog = watchdog("workers_are_aborted_when_the_driver_panics", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 1;
    let mut worker = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        run_job(
            Vec::new(),
            loopback(),
            &o,
            |addr| {
                let o = o.clone();
                worker =
                    Some(thread::spawn(move || run_worker(addr, "w-1", Box::new(stepper(0)), &o)));
            },
            |job| {
                drive_steps(job, 1, 4).unwrap();
                panic!("driver bug after round 1");
            },
        )
    }));
    let panic = outcome.expect_err("the driver's panic resumes after the workers are released");
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"driver bug after round 1"));
    let err = worker.unwrap().join().unwrap().unwrap_err();
    assert!(
        matches!(err, ClusterError::Aborted { ref reason } if reason.contains("panicked: driver bug")),
        "{err:?}"
    );
}

#[test]
fn a_driver_that_returns_early_releases_its_workers_with_done() {
    let _watchdog = watchdog("a_driver_that_returns_early", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 1;
    let mut worker = None;
    let (names, job) = run_job(
        Vec::new(),
        loopback(),
        &o,
        |addr| {
            let o = o.clone();
            worker = Some(thread::spawn(move || run_worker(addr, "w-1", Box::new(stepper(0)), &o)));
        },
        |job| job.workers(),
    )
    .unwrap();
    assert_eq!(names, ["w-1"]);
    assert!(job.rounds.is_empty() && job.lost.is_empty());
    let summary = worker.unwrap().join().unwrap().unwrap();
    assert_eq!(summary.executed, 0);
}

type Guest = thread::JoinHandle<Result<WorkerSummary, ClusterError>>;

/// The local executor of the next test: its first item starts a remote worker ("guest"), which
/// joins while the round runs, and waits until the guest has run an item of that round.
struct Host {
    inner: Stepper,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    opts: ClusterOptions,
    latch: Arc<Latch>,
    guest: Arc<Mutex<Option<Guest>>>,
}

impl Executor for Host {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        let mut guest = self.guest.lock().unwrap();
        if guest.is_none() {
            let addr = self.addr.lock().unwrap().expect("listening");
            let (opts, latch) = (self.opts.clone(), self.latch.clone());
            let exec = Box::new(Opener { inner: stepper(0), latch });
            *guest = Some(thread::spawn(move || run_worker(addr, "guest", exec, &opts)));
            drop(guest);
            self.latch.wait();
        }
        self.inner.execute(item)
    }
}

/// Opens the latch on every item it runs.
struct Opener {
    inner: Stepper,
    latch: Arc<Latch>,
}

impl Executor for Opener {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        self.latch.open();
        self.inner.execute(item)
    }
}

#[test]
fn a_worker_joining_during_a_round_gets_items_of_that_round() {
    let _watchdog = watchdog("a_worker_joining_during_a_round", Duration::from_secs(20));
    let n = 6;
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let addr = Arc::new(Mutex::new(None));
    let guest = Arc::new(Mutex::new(None));
    let host = Host {
        inner: stepper(0),
        addr: addr.clone(),
        opts: o.clone(),
        latch: Arc::new(Latch::default()),
        guest: guest.clone(),
    };
    let local: Vec<Box<dyn Executor>> = vec![Box::new(host)];
    let (done, job) = run_job(
        local,
        loopback(),
        &o,
        |a| *addr.lock().unwrap() = Some(a),
        |job| drive_steps(job, 1, n),
    )
    .unwrap();
    let done = done.unwrap();
    assert_eq!(results(&done), step_reference(1, n));
    let per_worker = &done[0].summary.per_worker;
    let guest_items = per_worker.iter().find(|(w, _)| w == "guest").map_or(0, |(_, c)| *c);
    assert!(guest_items > 0, "the guest got no item of the round it joined: {per_worker:?}");
    assert_eq!(job.per_worker.len(), 2);
    let guest = guest.lock().unwrap().take().expect("the guest was started");
    assert_eq!(guest.join().unwrap().unwrap().executed, guest_items);
}

#[test]
fn abort_releases_the_workers_and_refuses_later_rounds() {
    let _watchdog = watchdog("abort_releases_the_workers", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.min_workers = 1;
    let mut worker = None;
    let (after, job) = run_job(
        Vec::new(),
        loopback(),
        &o,
        |addr| {
            let o = o.clone();
            worker = Some(thread::spawn(move || run_worker(addr, "w-1", Box::new(stepper(0)), &o)));
        },
        |job| {
            drive_steps(job, 2, 3).unwrap();
            job.abort("the loss diverged");
            (job.round(step_items(3, 0, 3)), job.broadcast(vec![1]), job.workers())
        },
    )
    .unwrap();
    let (round, broadcast, workers) = after;
    for err in [round.unwrap_err(), broadcast.unwrap_err()] {
        assert!(
            matches!(err, ClusterError::Aborted { ref reason } if reason == "the loss diverged")
        );
    }
    assert!(workers.is_empty(), "{workers:?}");
    assert_eq!(job.rounds.len(), 2);
    let err = worker.unwrap().join().unwrap().unwrap_err();
    assert!(
        matches!(err, ClusterError::Aborted { ref reason } if reason == "the loss diverged"),
        "{err:?}"
    );
}

/// A stepper that takes up to `limit` queued items at once and logs each batch's item indices.
struct Batching {
    inner: Stepper,
    limit: usize,
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Executor for Batching {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        self.execute_batch(&[item]).pop().expect("one result")
    }

    fn batch_limit(&self) -> usize {
        self.limit
    }

    fn execute_batch(&mut self, items: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let indices = items.iter().map(|i| parse_step(i).map_or(u64::MAX, |(_, _, i)| i)).collect();
        self.batches.lock().unwrap().push(indices);
        items.iter().map(|i| self.inner.execute(i)).collect()
    }
}

/// Executors that batch get a worker's queued items of a round together, never more than they
/// asked for nor items of two rounds; the round's items spread one per worker in turn, and the
/// results are the one-by-one job's.
#[test]
fn batching_executors_get_their_queued_items_together_and_change_no_result() {
    let _watchdog = watchdog("batching_executors", Duration::from_secs(20));
    let (rounds, n) = (3, 10);
    let dir = tempfile::tempdir().unwrap();
    let logs = [Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new()))];
    let local: Vec<Box<dyn Executor>> = logs
        .iter()
        .map(|log| {
            Box::new(Batching { inner: stepper(0), limit: 3, batches: log.clone() })
                as Box<dyn Executor>
        })
        .collect();
    let mut o = opts(dir.path());
    o.in_flight_per_worker = 4;
    let (done, job) = run_job(local, None, &o, |_| {}, |job| drive_steps(job, rounds, n)).unwrap();
    assert_eq!(results(&done.unwrap()), step_reference(rounds, n));
    let batches: Vec<Vec<Vec<u64>>> = logs.iter().map(|l| l.lock().unwrap().clone()).collect();
    let all: Vec<&Vec<u64>> = batches.iter().flatten().collect();
    assert!(all.iter().all(|b| !b.is_empty() && b.len() <= 3), "{batches:?}");
    // The first dispatch of a round gives each worker 4 items in one message: a batch of 3.
    assert!(all.iter().any(|b| b.len() == 3), "no batch formed: {batches:?}");
    // One item per worker in turn: both workers compute, neither takes a whole round.
    for r in &job.rounds {
        assert!(r.per_worker.iter().all(|(_, k)| *k > 0), "{:?}", r.per_worker);
    }
    let ran: usize = all.iter().map(|b| b.len()).sum();
    assert_eq!(ran, (rounds * n) as usize);
}

/// Records every state it applies, slowly (so the job's `Done` arrives while it applies one).
struct Recording(Arc<Mutex<Vec<u64>>>);

impl Executor for Recording {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        Ok(item.to_vec())
    }

    fn on_broadcast(&mut self, state: &[u8]) -> Result<(), String> {
        thread::sleep(Duration::from_millis(300));
        let bytes = state.try_into().map_err(|_| "bad state")?;
        self.0.lock().unwrap().push(u64::from_le_bytes(bytes));
        Ok(())
    }
}

/// The driver's last broadcast, sent just before the job ends (trained weights a worker goes on
/// to evaluate with), is applied by every remote worker before its `run_worker` returns, even
/// when `Done` arrives while the states before it are still being applied.
#[test]
fn a_workers_last_broadcast_is_applied_before_done_releases_it() {
    let _watchdog = watchdog("last_broadcast_before_done", Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let addr = Cell::new(None);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let local: Vec<Box<dyn Executor>> = vec![Box::new(Broadcasted::default())];
    let (worker, _job) = run_job(
        local,
        loopback(),
        &o,
        |a| addr.set(Some(a)),
        |job| {
            let (a, o, s): (SocketAddr, _, _) = (addr.get().unwrap(), o.clone(), seen.clone());
            let worker = thread::spawn(move || run_worker(a, "w", Box::new(Recording(s)), &o));
            let waited = Instant::now();
            while job.workers().len() < 2 {
                assert!(waited.elapsed() < Duration::from_secs(10), "the worker never joined");
                thread::sleep(Duration::from_millis(5));
            }
            for state in [1u64, 2, 3] {
                job.broadcast(state.to_le_bytes().to_vec()).unwrap();
            }
            worker
        },
    )
    .unwrap();
    assert!(worker.join().unwrap().is_ok(), "the worker was not released with Done");
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3], "states applied before the worker stopped");
}

/// A coordinator's endpoint that is closing refuses new connections (QUIC's
/// `CONNECTION_REFUSED`): a worker waits that out as it waits for a coordinator not yet
/// listening, and joins the job that listens on the address next (a training's workers
/// rejoining for its evaluation).
#[test]
fn a_worker_waits_out_a_closing_endpoint_and_joins_the_next_job_on_its_address() {
    use fusion_cluster::transport::{Endpoint, JobCredentials};
    let _watchdog = watchdog("closing_endpoint", Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let node = JobCredentials::create_or_load(&o.job_dir).unwrap().issue_node("old", &[]).unwrap();
    let closing = rt
        .block_on(async {
            Endpoint::bind("127.0.0.1:0".parse().unwrap(), &node, &o.job_id, o.transport.clone())
        })
        .unwrap();
    let addr = closing.local_addr().unwrap();
    closing.close("job finished");
    let refused = Arc::new(Mutex::new(None));
    let worker = {
        let (o, refused) = (o.clone(), refused.clone());
        thread::spawn(move || {
            // What a worker without the retry would get: the refusal, at once.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let probe = rt.block_on(async {
                let ep = Endpoint::bind(
                    "127.0.0.1:0".parse().unwrap(),
                    &node,
                    &o.job_id,
                    o.transport.clone(),
                )?;
                ep.connect(addr, fusion_cluster::transport::MEMBER_SERVER_NAME).await.map(|_| ())
            });
            *refused.lock().unwrap() = Some(probe.map_err(|e| e.to_string()));
            run_worker(addr, "w", Box::new(Broadcasted::default()), &o)
        })
    };
    // The worker is refused while the closed endpoint lives, then it is gone.
    thread::sleep(Duration::from_millis(1000));
    drop(closing);
    rt.shutdown_timeout(Duration::from_secs(2));
    let probe = refused.lock().unwrap().clone();
    assert!(
        probe.as_ref().is_some_and(|p| p.as_ref().is_err_and(|e| e.contains("refused"))),
        "a closing endpoint refuses a connection: {probe:?}"
    );
    let mut o = o;
    o.min_workers = 1;
    let (results, _) = run_job(
        Vec::new(),
        Some(addr),
        &o,
        |_| {},
        |job| {
            job.broadcast(5u64.to_le_bytes().to_vec()).unwrap();
            job.round(indices(8)).unwrap().results
        },
    )
    .unwrap();
    assert_eq!(results, broadcast_results(5, 8));
    let summary = worker.join().unwrap().expect("the worker joined the next job");
    assert_eq!(summary.executed, 8, "the remote worker computed every item");
}

/// Answers each item with its own name and the item.
struct Named(String);

impl Executor for Named {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        Ok([self.0.as_bytes(), b":", item].concat())
    }
}

/// A pinned round runs each item on the worker named for it, whoever is free; one naming a
/// worker that is not joined fails at once with `PinnedWorkerLost`, and the job goes on.
#[test]
fn pinned_items_run_on_their_named_workers_only() {
    let _watchdog = watchdog("pinned_items", Duration::from_secs(20));
    let dir = tempfile::tempdir().unwrap();
    let local: Vec<Box<dyn Executor>> =
        (0..3).map(|i| Box::new(Named(local_worker_name(i))) as Box<dyn Executor>).collect();
    let (outcome, _) = run_job(
        local,
        None,
        &opts(dir.path()),
        |_| {},
        |job: &mut Job| {
            let owners = [2, 0, 1, 0, 0, 2];
            let items: Vec<(String, Vec<u8>)> = owners
                .iter()
                .enumerate()
                .map(|(i, &w)| (local_worker_name(w), vec![b'a' + i as u8]))
                .collect();
            let done = job.round_pinned(items).unwrap();
            let missing = job.round_pinned(vec![("nobody".into(), vec![b'z'])]);
            let after = job.round(vec![vec![b'q']]).unwrap();
            (done.results, missing, after.results.len())
        },
    )
    .unwrap();
    let (results, missing, after) = outcome;
    let want: Vec<Vec<u8>> = [2, 0, 1, 0, 0, 2]
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            format!("{}:{}", local_worker_name(w), (b'a' + i as u8) as char).into_bytes()
        })
        .collect();
    assert_eq!(results, want);
    match missing {
        Err(ClusterError::PinnedWorkerLost { worker, .. }) => assert_eq!(worker, "nobody"),
        other => panic!("{other:?}"),
    }
    assert_eq!(after, 1, "a later round runs");
}
