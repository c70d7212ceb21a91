//! The actor runtime: a coordinator that hands out work items, workers that run them, and one peer
//! actor per QUIC connection that bridges a remote worker (DESIGN.md §4), on ractor 0.16.
//!
//! # Jobs and rounds
//!
//! A *job* ([`run_job`]) starts the coordinator once; its workers (local executors, and remote
//! processes running [`run_worker`]) stay joined until the job ends. In between, the caller's
//! *driver* runs on the calling thread and runs any number of *rounds* ([`Job::round`]): a round
//! is a list of opaque items (one optimisation step of test-time adaptation, or one evaluation
//! pass), handed out to whichever workers are joined, and answered with one result per item in
//! item order ([`RoundResults`]). Then every worker is told `Done` (or `Abort`) and exits.
//! [`run_coordinator`] / [`run_coordinator_with`] are the one-round case.
//!
//! - Rounds are invisible to a worker, except that its [`Executor`] lives for the whole job: it
//!   may cache what it built for step `k` (a merged model) and rebuild when an item carries step
//!   `k + 1`'s state. [`Job::broadcast`] hands a state to every executor
//!   ([`Executor::on_broadcast`]), in order with the items, and to a later joiner before its
//!   first item.
//! - Workers may join at any time; one that joins during a round gets that round's items.
//!   [`ClusterOptions::min_workers`] and [`ClusterOptions::wait_for_workers`] hold the driver
//!   back at the start of the job only ([`Job::workers`] then lists who is there).
//! - Between rounds the coordinator keeps heartbeating and judging silences: a worker lost then
//!   is simply gone. One lost during a round has its in-flight items re-queued and the round
//!   completes on the others; with none left, the round waits `wait_for_workers` for one to join,
//!   then fails with [`ClusterError::NoWorkers`].
//! - Every assignment and result carries its round's number ([`wire::Wire::Assign`]), and a
//!   result of another round is dropped (counted in [`RoundSummary::stale`]): the running items
//!   of a failed round, which finish after the next round started with the same item indices,
//!   never mix into it.
//! - If the driver panics, every worker is told `Abort` before the panic resumes; if it returns
//!   early, `Done`. No worker process is left waiting (a worker whose coordinator vanished
//!   returns [`ClusterError::CoordinatorLost`] after `lost_after` anyway).
//!
//! # Actors and supervision
//!
//! In the coordinator's process ([`run_job`]):
//!
//! ```text
//! Coordinator ── owns the running Round (its Scheduler: items, in-flight credits, re-queueing)
//! │              and the Membership; lives for the whole job
//! ├── Worker "local"      (an in-process executor, if any; runs items on a blocking thread)
//! ├── Peer  "rank-1"      (one per accepted QUIC connection: owns the transport::Peer)
//! └── Peer  "rank-2"
//! ```
//!
//! The driver talks to the coordinator by message ([`Job`]'s methods block on the reply), on the
//! job's own multi-threaded tokio runtime, which runs the actors while the driver computes.
//!
//! In a worker's process ([`run_worker`]): a `Link` actor owns the connection to the coordinator
//! and supervises that process's Worker actor.
//!
//! A [`Shard`] actor (dataset shard: owns decoded batches, reads ahead, serves them) can run in
//! any process; an executor reaches it through a cloned handle ([`Shard::batch_blocking`]).
//!
//! The coordinator overrides ractor's default supervision handler (which would stop it when a
//! child fails): a failed or stopped child is a *lost worker*; during a round its items go back
//! to the front of the queue ([`Scheduler::worker_lost`](crate::scheduler::Scheduler::worker_lost))
//! and the round goes on with the others.
//!
//! # Failure detection
//!
//! Every worker actor sends a heartbeat every [`ClusterOptions::heartbeat_interval`] from a ractor
//! interval task (its mailbox stays free while the executor runs on a blocking thread); a remote
//! one's travel as [`wire::Wire::Heartbeat`]. The coordinator feeds them to its
//! [`Membership`](crate::membership::Membership) and ticks it every interval, in rounds and
//! between them: a worker silent for [`ClusterOptions::lost_after`] is lost. A killed process is
//! usually noticed sooner, when QUIC's idle timeout closes its connection and its peer actor
//! fails. The coordinator's peer actors heartbeat the other way, so a worker notices a lost
//! coordinator the same way and [`run_worker`] returns [`ClusterError::CoordinatorLost`].
//!
//! # Determinism
//!
//! [`RoundResults::results`] (and [`RunSummary::results`]) hold one result per item, in item
//! order, whichever worker computed it and whenever; the caller reduces them in that order, so a
//! round's outcome (and the next round's state) does not depend on the number of workers. Items a
//! lost worker had finished and returned are never recomputed; only its in-flight items are
//! re-queued.
//!
//! # Errors
//!
//! An item whose executor returns `Err` (or panics) fails its round with
//! [`ClusterError::ItemFailed`], naming the item and the worker: a deterministic error would
//! only fail again elsewhere. The workers drop that round's queued items ([`wire::Wire::Cancel`]);
//! the job goes on, and the driver may run another round or end the job ([`Job::abort`] tells
//! every worker [`wire::Wire::Abort`]; [`run_coordinator`] does so).

mod coordinator;
mod job;
mod peer;
pub mod ring_member;
mod round;
mod shard;
pub mod wire;
mod worker;

pub use job::{run_job, Job, JobSummary, RoundResults, RoundSummary};
pub use shard::{Shard, ShardLoader, ShardOptions, ShardStats};

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use ractor::Actor;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::transport::{
    CredentialsError, Endpoint, JobCredentials, Peer, TransportError, TransportOptions,
    MEMBER_SERVER_NAME,
};

/// Node name of the coordinator's process in its certificate and handshake.
pub const COORDINATOR_NODE_NAME: &str = "coordinator";

/// Name of the coordinator's (first) in-process worker in [`RunSummary::per_worker`].
pub const LOCAL_WORKER_NAME: &str = "local";

/// Name of the coordinator's in-process worker number `i`: [`LOCAL_WORKER_NAME`], then
/// `local-1`, `local-2`, ...
pub fn local_worker_name(i: usize) -> String {
    if i == 0 {
        LOCAL_WORKER_NAME.to_string()
    } else {
        format!("{LOCAL_WORKER_NAME}-{i}")
    }
}

/// The least a worker waits for the job CA to appear in [`ClusterOptions::job_dir`] (otherwise
/// as long as [`ClusterOptions::wait_for_workers`]).
const CA_WAIT_MIN: Duration = Duration::from_secs(1);

/// How long closing waits for the last packets (the final close frames) to leave.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// Runs one work item (opaque bytes the caller encodes).
///
/// Called on a blocking thread, one item (or one batch, [`Executor::execute_batch`]) at a time
/// per executor; may take seconds. A panic is
/// caught and treated as an `Err` of that item. One executor serves its worker for the whole
/// job, across rounds: it may keep state between items (e.g. the model it built for step `k`,
/// rebuilt when an item carries step `k + 1`'s parameters).
pub trait Executor: Send + 'static {
    /// Runs `item` and returns its encoded result, or an error in words (which fails the round).
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String>;

    /// Takes a state the driver sent every worker ([`Job::broadcast`]), on the same blocking
    /// thread as `execute`, after the items assigned before it and before the later ones. An
    /// `Err` (or a panic) makes every later item of this worker fail with it, until a later
    /// broadcast is accepted. The default ignores the state.
    fn on_broadcast(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Ok(())
    }

    /// How many queued items this executor takes at once ([`execute_batch`](Self::execute_batch)).
    /// The default, 1, runs items one by one.
    fn batch_limit(&self) -> usize {
        1
    }

    /// Runs items that were queued together (consecutive items of one round, at most
    /// [`batch_limit`](Self::batch_limit)), one result per item in their order: for work that is
    /// cheaper done for several items in one pass. Each item's result must be what `execute`
    /// gives it alone, so where and with whom an item ran changes nothing. The default runs
    /// `execute` on each.
    fn execute_batch(&mut self, items: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        items.iter().map(|item| self.execute(item)).collect()
    }

    /// A hook the worker calls, from its actor (inside the tokio runtime, never blocking), for
    /// each item assigned while another one runs: a chance to start loading that item's inputs
    /// (e.g. ask a dataset-shard actor to decode its batch). `None` (the default): no read-ahead.
    fn prefetcher(&self) -> Option<Prefetcher> {
        None
    }
}

/// See [`Executor::prefetcher`]: called with the queued item's payload; must return quickly.
pub type Prefetcher = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Settings of a run, for the coordinator and every worker alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// QUIC transport settings (idle timeout, keep-alive, frame limit, ...).
    pub transport: TransportOptions,
    /// How often every side sends a heartbeat. Default 500 ms.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker (or, seen from a worker, the coordinator) is lost. Default 3 s.
    pub lost_after: Duration,
    /// How many items one worker may hold at once (running or queued). Default 2. Items are
    /// handed out one per worker in turn, so a round of `n` items over `w` workers gives each
    /// about `n / w` while this allows; an executor that batches ([`Executor::batch_limit`])
    /// wants it at least its batch size.
    pub in_flight_per_worker: usize,
    /// The job's id: processes with another job id are refused at the handshake.
    pub job_id: String,
    /// Where [`JobCredentials::create_or_load`] puts the job CA; shared by all processes.
    pub job_dir: PathBuf,
    /// Remote workers to wait for before the job's driver starts (so before any item is handed
    /// out). Default 0.
    pub min_workers: usize,
    /// How long to wait for `min_workers` before going on with whoever is there; also how long
    /// the coordinator waits for a worker to (re)join when it has none left while items are
    /// pending in a round, and how long a worker retries connecting to a coordinator that does
    /// not answer. Default 60 s.
    pub wait_for_workers: Duration,
}

impl ClusterOptions {
    /// Default settings for job `job_id` with its CA in `job_dir`.
    pub fn new(job_id: impl Into<String>, job_dir: impl Into<PathBuf>) -> Self {
        Self {
            transport: TransportOptions::default(),
            heartbeat_interval: Duration::from_millis(500),
            lost_after: Duration::from_secs(3),
            in_flight_per_worker: 2,
            job_id: job_id.into(),
            job_dir: job_dir.into(),
            min_workers: 0,
            wait_for_workers: Duration::from_secs(60),
        }
    }

    /// Short timeouts for tests: QUIC idle 1 s and keep-alive 0.3 s
    /// ([`TransportOptions::fast`]), heartbeat 0.2 s, lost after 1.5 s.
    pub fn fast(self) -> Self {
        Self {
            transport: TransportOptions::fast(),
            heartbeat_interval: Duration::from_millis(200),
            lost_after: Duration::from_millis(1500),
            ..self
        }
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let bad = |reason: String| Err(ClusterError::Options(reason));
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must not be zero".into());
        }
        if self.lost_after <= self.heartbeat_interval {
            return bad(format!(
                "lost_after ({:?}) must exceed heartbeat_interval ({:?})",
                self.lost_after, self.heartbeat_interval
            ));
        }
        if self.in_flight_per_worker == 0 {
            return bad("in_flight_per_worker must be at least 1".into());
        }
        Ok(())
    }
}

/// A worker the coordinator declared lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostWorker {
    /// Its name (its node name; [`LOCAL_WORKER_NAME`] for the in-process worker).
    pub name: String,
    /// When the coordinator declared it lost.
    pub at: Instant,
    /// Why: silent past `lost_after`, connection lost, or its actor failed.
    pub reason: String,
    /// The items it held that went back to the queue (indices within `round`).
    pub requeued: Vec<usize>,
    /// The round running when it was lost, or `None` between rounds.
    pub round: Option<u64>,
}

/// What a finished one-round run ([`run_coordinator`]) produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// One result per item, in item order, whatever finished where and when.
    pub results: Vec<Vec<u8>>,
    /// How many times each item's result was computed and returned (1 normally).
    pub executed: Vec<u32>,
    /// Results that arrived for an item another worker had already finished.
    pub computed_twice: usize,
    /// Workers declared lost during the run (its one round).
    pub workers_lost: usize,
    /// Items completed by each worker that joined (name, count), in joining order.
    pub per_worker: Vec<(String, usize)>,
    /// The lost workers, in the order they were lost.
    pub lost: Vec<LostWorker>,
    /// Incoming connections refused (bad certificate, other job id, failed handshake).
    pub refused: u64,
    /// Wall time of the run, from start-up to the last result.
    pub elapsed: Duration,
}

/// What a worker process did before the coordinator said done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Items it executed and returned.
    pub executed: usize,
}

/// Why a run (or a worker's part of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Every worker is gone (or none joined) and none joined within
    /// [`ClusterOptions::wait_for_workers`] while items were still pending. Start workers
    /// (`--join`), or give the coordinator a local executor.
    #[error(
        "no worker left with {pending} of {total} items pending (waited {waited:?} for one to \
         join)"
    )]
    NoWorkers {
        /// Items without a result.
        pending: usize,
        /// Items in the run.
        total: usize,
        /// How long the coordinator waited for a worker.
        waited: Duration,
    },
    /// The worker lost its coordinator (killed, unreachable, or silent past `lost_after`).
    #[error("coordinator {addr} lost: {reason}")]
    CoordinatorLost {
        /// The coordinator's address.
        addr: SocketAddr,
        /// What was seen.
        reason: String,
    },
    /// An item's executor returned an error (or panicked); its round (the run) is failed.
    #[error("item {item} failed on worker {worker:?}: {error}")]
    ItemFailed {
        /// The item's index.
        item: usize,
        /// The worker that ran it.
        worker: String,
        /// The executor's error.
        error: String,
    },
    /// A pinned round's worker ([`Job::round_pinned`]) was lost, or was not joined when the
    /// round started, with items that only it may compute: the round failed, and the driver
    /// re-plans with the workers left ([`Job::workers`]).
    #[error("worker `{worker}` is gone with item(s) {items:?} of round {round}, pinned to it")]
    PinnedWorkerLost {
        /// The worker.
        worker: String,
        /// The round.
        round: u64,
        /// Its items without a result.
        items: Vec<usize>,
    },
    /// The coordinator failed the run (or its driver ended the job with [`Job::abort`], or
    /// panicked) and told this worker to stop. To a driver: a round or broadcast asked for after
    /// [`Job::abort`].
    #[error("the coordinator aborted the run: {reason}")]
    Aborted {
        /// The coordinator's reason (e.g. which item failed where).
        reason: String,
    },
    /// A dataset shard could not serve a batch: its loader failed, or the batch is out of range.
    #[error("shard batch {batch}: {error}")]
    Shard {
        /// The batch asked for.
        batch: usize,
        /// The loader's error, in words.
        error: String,
    },
    /// The job CA could not be created, loaded or used.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The transport failed: binding, connecting, or refused by the coordinator (another job id).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The options do not make sense.
    #[error("invalid cluster options: {0}")]
    Options(String),
    /// The actor runtime itself failed (an actor could not start or stopped unexpectedly).
    #[error("actor runtime: {0}")]
    Runtime(String),
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, ClusterError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fusion-cluster")
        .build()
        .map_err(|e| ClusterError::Runtime(format!("cannot build the tokio runtime: {e}")))
}

/// Runs `items` on `local` (if `Some`: the in-process worker) and on every worker that joins
/// `listen` (if `Some`: the bind address; port 0 picks a free port), and returns when every item
/// has a result.
///
/// Blocking: builds its own tokio runtime. `on_listening(addr)` is called with the bound address
/// once listening (before any item is handed out), so tests and launchers can start workers; it
/// should return quickly. With `listen == None` it is never called and the run is local: the same
/// actors, no network.
pub fn run_coordinator(
    items: Vec<Vec<u8>>,
    local: Option<Box<dyn Executor>>,
    listen: Option<SocketAddr>,
    opts: &ClusterOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<RunSummary, ClusterError> {
    run_coordinator_with(items, local.into_iter().collect(), listen, opts, on_listening)
}

/// [`run_coordinator`] with any number of in-process workers (one per local GPU, or CPU workers
/// sharing the cores), named by [`local_worker_name`]; each is a worker like a remote one.
///
/// A job ([`run_job`]) of one round: a failed round aborts the job, so every worker's
/// [`run_worker`] returns [`ClusterError::Aborted`] with the reason.
pub fn run_coordinator_with(
    items: Vec<Vec<u8>>,
    local: Vec<Box<dyn Executor>>,
    listen: Option<SocketAddr>,
    opts: &ClusterOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<RunSummary, ClusterError> {
    let started = Instant::now();
    let (round, job) = run_job(local, listen, opts, on_listening, |job| {
        let round = job.round(items);
        if let Err(e) = &round {
            job.abort(&e.to_string());
        }
        round.map(|r| (r, started.elapsed()))
    })?;
    let (round, elapsed) = round?;
    let s = round.summary;
    Ok(RunSummary {
        results: round.results,
        executed: s.executed,
        computed_twice: s.computed_twice,
        workers_lost: s.lost.len(),
        per_worker: job.per_worker,
        lost: s.lost,
        refused: job.refused,
        elapsed,
    })
}

/// Joins the coordinator at `coordinator` as worker `name` and executes items until the
/// coordinator says done (`Ok`), aborts the run ([`ClusterError::Aborted`]) or is lost
/// ([`ClusterError::CoordinatorLost`]).
///
/// Blocking: builds its own tokio runtime. Loads the job CA from [`ClusterOptions::job_dir`]
/// (waiting up to 30 s for the coordinator to create it), and retries connecting for up to
/// [`ClusterOptions::wait_for_workers`] while the coordinator does not answer. A coordinator of
/// another job refuses it: [`ClusterError::Transport`] with the reason.
pub fn run_worker(
    coordinator: SocketAddr,
    name: &str,
    executor: Box<dyn Executor>,
    opts: &ClusterOptions,
) -> Result<WorkerSummary, ClusterError> {
    opts.validate()?;
    let rt = tokio_runtime()?;
    let outcome = rt.block_on(work(coordinator, name, executor, opts));
    rt.shutdown_background();
    outcome
}

async fn work(
    coordinator: SocketAddr,
    name: &str,
    executor: Box<dyn Executor>,
    opts: &ClusterOptions,
) -> Result<WorkerSummary, ClusterError> {
    let ca = JobCredentials::wait_and_load(&opts.job_dir, opts.wait_for_workers.max(CA_WAIT_MIN))?;
    let node = ca.issue_node(name, &[])?;
    let bind: SocketAddr = if coordinator.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let endpoint = Endpoint::bind(bind, &node, &opts.job_id, opts.transport.clone())?;
    let peer = connect(&endpoint, coordinator, opts.wait_for_workers).await?;
    info!(coordinator = %coordinator, worker = name, "joined the coordinator");
    let (reply, result) = oneshot::channel();
    let args = peer::LinkArgs {
        peer,
        name: name.to_string(),
        executor,
        heartbeat: opts.heartbeat_interval,
        lost_after: opts.lost_after,
        reply,
    };
    let (_link, handle) = Actor::spawn(None, peer::Link, args)
        .await
        .map_err(|e| ClusterError::Runtime(format!("cannot start the worker's link: {e}")))?;
    let outcome = result.await.unwrap_or_else(|_| {
        Err(ClusterError::Runtime("the worker's link stopped without a result".into()))
    });
    let _ = handle.await;
    endpoint.close("worker done");
    let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
    outcome
}

/// Connects to the coordinator, retrying while it does not answer (not yet listening) or its
/// endpoint refuses new connections at the QUIC level (`CONNECTION_REFUSED`: a coordinator's
/// endpoint that is closing, such as a training job's before its evaluation listens on the same
/// address) for up to `patience`. A refusal by TLS or by the handshake (another job) is returned
/// at once.
async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    patience: Duration,
) -> Result<Peer, ClusterError> {
    let start = Instant::now();
    loop {
        match endpoint.connect(addr, MEMBER_SERVER_NAME).await {
            Ok(peer) => return Ok(peer),
            Err(
                e @ (TransportError::HandshakeTimeout { .. }
                | TransportError::ConnectionLost {
                    source: quinn::ConnectionError::TimedOut,
                    ..
                }),
            ) if start.elapsed() < patience => {
                warn!(coordinator = %addr, error = %e, "coordinator not answering; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(
                ref e @ TransportError::ConnectionLost {
                    source: quinn::ConnectionError::ConnectionClosed(ref close),
                    ..
                },
            ) if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                && start.elapsed() < patience =>
            {
                warn!(coordinator = %addr, error = %e, "coordinator not answering; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
