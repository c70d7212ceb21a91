//! A long-lived job ([`run_job`]): the coordinator starts once, its workers stay joined, and the
//! caller's driver runs any number of rounds ([`Job::round`]) on them; then every worker is told
//! `Done` (or `Abort`). [`super::run_coordinator_with`] is the one-round special case.

use std::{
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    sync::Arc,
    time::{Duration, Instant},
};

use ractor::{Actor, ActorRef};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{
    coordinator::{Coordinator, CoordinatorArgs, CoordinatorMsg},
    tokio_runtime,
    wire::Wire,
    worker::panic_text,
    ClusterError, ClusterOptions, Executor, LostWorker, CLOSE_LINGER, COORDINATOR_NODE_NAME,
};
use crate::transport::{Endpoint, JobCredentials};

/// Bytes a [`Wire::Broadcast`] frame adds to its state (variant tag and length prefix), with
/// room to spare.
const BROADCAST_OVERHEAD: usize = 16;

/// The results of one round, in item order, and what happened in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundResults {
    /// One result per item, in item order, whatever finished where and when.
    pub results: Vec<Vec<u8>>,
    /// Who computed what, who was lost.
    pub summary: RoundSummary,
}

/// What happened in one completed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundSummary {
    /// The round's number: 1 for the job's first round.
    pub round: u64,
    /// How many times each item's result was computed and returned this round (1 normally).
    pub executed: Vec<u32>,
    /// Results that arrived for an item another worker had already finished.
    pub computed_twice: usize,
    /// Items completed by each worker live during the round (name, count), in joining order;
    /// workers lost during the round are listed too.
    pub per_worker: Vec<(String, usize)>,
    /// Workers lost during the round, in the order they were lost, with the items re-queued.
    pub lost: Vec<LostWorker>,
    /// Results of earlier rounds that arrived during this one, dropped.
    pub stale: usize,
    /// From the round's start to its last result.
    pub elapsed: Duration,
}

/// What a finished job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// The completed rounds' summaries, in order (a failed round has none).
    pub rounds: Vec<RoundSummary>,
    /// Rounds that failed (an item error, no workers, or the job ended during the round).
    pub rounds_failed: usize,
    /// Items completed by each worker that joined (name, count) over the whole job, in joining
    /// order.
    pub per_worker: Vec<(String, usize)>,
    /// Every worker lost, during a round (`round: Some`) or between rounds (`None`), in order.
    pub lost: Vec<LostWorker>,
    /// Results dropped because they belonged to an earlier round than the running one (or
    /// arrived between rounds).
    pub stale: usize,
    /// Incoming connections refused (bad certificate, other job id, failed handshake).
    pub refused: u64,
    /// From the coordinator's start to the end of the job.
    pub elapsed: Duration,
}

/// A running job: the coordinator and its workers stay joined between rounds.
///
/// Only [`run_job`] makes one and hands it to its driver. Its methods block the calling thread
/// (the driver's, outside any tokio runtime) while the coordinator runs on the job's own
/// runtime, which goes on heartbeating and accepting workers between rounds.
pub struct Job {
    rt: tokio::runtime::Handle,
    coordinator: ActorRef<CoordinatorMsg>,
    names: watch::Receiver<Vec<String>>,
    max_frame_len: Option<usize>,
    /// Once [`Job::abort`] ended the job: why, and the summary it got.
    ended: Option<(String, JobSummary)>,
}

impl Job {
    /// Runs one round: hands `items` to the job's workers (local and remote, including any that
    /// join during the round), re-queues a lost worker's in-flight items, and returns one result
    /// per item, in item order, with the round's summary.
    ///
    /// Fails with [`ClusterError::ItemFailed`] when an executor fails on an item (the other
    /// workers drop the round's queued items; the job goes on, and the driver may start another
    /// round or end it), or [`ClusterError::NoWorkers`] when no worker is left and none joins
    /// within [`ClusterOptions::wait_for_workers`]. After [`Job::abort`]: `Aborted`.
    pub fn round(&mut self, items: Vec<Vec<u8>>) -> Result<RoundResults, ClusterError> {
        if let Some((reason, _)) = &self.ended {
            return Err(ClusterError::Aborted { reason: reason.clone() });
        }
        let (reply, outcome) = oneshot::channel();
        self.coordinator
            .send_message(CoordinatorMsg::Round { items, owners: None, reply })
            .map_err(|_| gone())?;
        self.rt.block_on(outcome).unwrap_or_else(|_| Err(gone()))
    }

    /// Runs one round whose items are pinned: each `(worker, item)` runs on the worker of that
    /// name ([`Job::workers`]) and nowhere else, for work that needs its worker (a rank of a
    /// collective among the workers). Results come in item order, as with [`Job::round`].
    ///
    /// Fails with [`ClusterError::PinnedWorkerLost`] when a named worker is not joined as the
    /// round starts or is lost before its item is done (its items are not re-queued
    /// elsewhere); otherwise as [`Job::round`].
    pub fn round_pinned(
        &mut self,
        items: Vec<(String, Vec<u8>)>,
    ) -> Result<RoundResults, ClusterError> {
        if let Some((reason, _)) = &self.ended {
            return Err(ClusterError::Aborted { reason: reason.clone() });
        }
        let (owners, items): (Vec<String>, Vec<Vec<u8>>) = items.into_iter().unzip();
        let (reply, outcome) = oneshot::channel();
        self.coordinator
            .send_message(CoordinatorMsg::Round { items, owners: Some(owners), reply })
            .map_err(|_| gone())?;
        self.rt.block_on(outcome).unwrap_or_else(|_| Err(gone()))
    }

    /// Names of the workers joined now (not lost), in joining order: the local ones
    /// ([`super::local_worker_name`]) and the remote ones' node names.
    pub fn workers(&self) -> Vec<String> {
        self.names.borrow().clone()
    }

    /// Hands `state` to every worker's executor ([`Executor::on_broadcast`]) after the items it
    /// was given before and before any item of a later round; a worker that joins later gets
    /// the last state before its first item. Does not wait for the workers to apply it: an
    /// executor that refuses it fails its next items, and so the next round.
    ///
    /// With remote workers the state travels in one frame, so it must fit
    /// [`crate::transport::TransportOptions::max_frame_len`] (less 16 bytes); a larger one is
    /// refused here ([`ClusterError::Options`]).
    pub fn broadcast(&mut self, state: Vec<u8>) -> Result<(), ClusterError> {
        if let Some((reason, _)) = &self.ended {
            return Err(ClusterError::Aborted { reason: reason.clone() });
        }
        if let Some(limit) = self.max_frame_len {
            if state.len() + BROADCAST_OVERHEAD > limit {
                return Err(ClusterError::Options(format!(
                    "a broadcast state of {} bytes does not fit a frame of {limit} bytes: raise \
                     transport.max_frame_len on every process",
                    state.len()
                )));
            }
        }
        self.coordinator
            .send_message(CoordinatorMsg::Broadcast(Arc::new(state)))
            .map_err(|_| gone())
    }

    /// Ends the job now: every worker is told [`Wire::Abort`] with `reason` (its
    /// [`super::run_worker`] returns [`ClusterError::Aborted`]); later rounds fail with
    /// `Aborted`. Without it, the job ends with `Done` when the driver returns.
    pub fn abort(&mut self, reason: &str) {
        if self.ended.is_some() {
            return;
        }
        let summary =
            self.rt.block_on(end(&self.coordinator, Wire::Abort { reason: reason.into() }));
        match summary {
            Ok(summary) => self.ended = Some((reason.to_string(), summary)),
            Err(e) => warn!(error = %e, "could not end the job"),
        }
    }
}

fn gone() -> ClusterError {
    ClusterError::Runtime("the coordinator stopped unexpectedly".into())
}

/// Sends `End` with `last` and waits for the job's summary (refused connections not yet
/// counted).
async fn end(
    coordinator: &ActorRef<CoordinatorMsg>,
    last: Wire,
) -> Result<JobSummary, ClusterError> {
    let (reply, summary) = oneshot::channel();
    coordinator.send_message(CoordinatorMsg::End { last, reply }).map_err(|_| gone())?;
    summary.await.map_err(|_| gone())
}

/// Starts the coordinator with `local` executors (named by [`super::local_worker_name`]) and,
/// if `listen` is `Some`, accepting remote workers there (port 0 picks a free port); waits for
/// [`ClusterOptions::min_workers`] remote workers (at most
/// [`ClusterOptions::wait_for_workers`]); calls `driver(&mut job)` on the calling thread; then
/// tells every worker `Done` (or `Abort`, after [`Job::abort`]) and returns the driver's value
/// and the job's summary.
///
/// Blocking: builds its own tokio runtime. `on_listening(addr)` is called with the bound address
/// once listening, before the coordinator starts, so tests and launchers can start workers; it
/// should return quickly. With `listen == None` it is never called and the job is local.
///
/// If the driver panics, every worker is told `Abort` (naming the panic) and released, then
/// the panic resumes: no worker process is left waiting.
pub fn run_job<R>(
    local: Vec<Box<dyn Executor>>,
    listen: Option<SocketAddr>,
    opts: &ClusterOptions,
    on_listening: impl FnOnce(SocketAddr),
    driver: impl FnOnce(&mut Job) -> R,
) -> Result<(R, JobSummary), ClusterError> {
    opts.validate()?;
    if local.is_empty() && listen.is_none() {
        return Err(ClusterError::Options(
            "neither a local executor nor a listen address: nobody could run the items".into(),
        ));
    }
    let rt = tokio_runtime()?;
    let started = rt.block_on(Running::start(local, listen, opts, on_listening));
    let (running, mut job) = match started {
        Ok((running, names)) => {
            let job = Job {
                rt: rt.handle().clone(),
                coordinator: running.coordinator.clone(),
                names,
                max_frame_len: running.endpoint.as_ref().map(|_| opts.transport.max_frame_len),
                ended: None,
            };
            (running, job)
        }
        Err(e) => {
            rt.shutdown_background();
            return Err(e);
        }
    };
    let value = panic::catch_unwind(AssertUnwindSafe(|| driver(&mut job)));
    let last = match &value {
        Ok(_) => Wire::Done,
        Err(panic) => {
            let reason = format!("the coordinator's driver panicked: {}", panic_text(&**panic));
            warn!(%reason, "aborting the job");
            Wire::Abort { reason }
        }
    };
    let summary = rt.block_on(running.stop(last, job.ended.take().map(|(_, s)| s)));
    rt.shutdown_background();
    match value {
        Ok(value) => summary.map(|s| (value, s)),
        Err(panic) => panic::resume_unwind(panic),
    }
}

/// The coordinator actor, its acceptor task and endpoint, while the job runs.
struct Running {
    coordinator: ActorRef<CoordinatorMsg>,
    handle: JoinHandle<()>,
    acceptor: Option<JoinHandle<()>>,
    endpoint: Option<Arc<Endpoint>>,
}

impl Running {
    async fn start(
        local: Vec<Box<dyn Executor>>,
        listen: Option<SocketAddr>,
        opts: &ClusterOptions,
        on_listening: impl FnOnce(SocketAddr),
    ) -> Result<(Self, watch::Receiver<Vec<String>>), ClusterError> {
        let started = Instant::now();
        let endpoint = match listen {
            Some(addr) => {
                let ca = JobCredentials::create_or_load(&opts.job_dir)?;
                let node = ca.issue_node(COORDINATOR_NODE_NAME, &[])?;
                let ep = Endpoint::bind(addr, &node, &opts.job_id, opts.transport.clone())?;
                let bound = ep.local_addr()?;
                info!(addr = %bound, job = %opts.job_id, "coordinator listening");
                on_listening(bound);
                Some(Arc::new(ep))
            }
            None => None,
        };
        let (gate, opened) = oneshot::channel();
        let (names, names_rx) = watch::channel(Vec::new());
        let args = CoordinatorArgs {
            local,
            networked: endpoint.is_some(),
            opts: opts.clone(),
            started,
            gate,
            names,
        };
        let (coordinator, handle) = Actor::spawn(None, Coordinator, args)
            .await
            .map_err(|e| ClusterError::Runtime(format!("cannot start the coordinator: {e}")))?;
        let acceptor = endpoint.clone().map(|ep| {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                while let Some(peer) = ep.accept().await {
                    if coordinator.send_message(CoordinatorMsg::PeerAccepted(peer)).is_err() {
                        break;
                    }
                }
            })
        });
        let running = Self { coordinator, handle, acceptor, endpoint };
        if opened.await.is_err() {
            let _ = running.stop(Wire::Done, None).await;
            return Err(gone());
        }
        Ok((running, names_rx))
    }

    /// Ends the job with `last` (unless `ended` already holds its summary), stops accepting,
    /// and closes the endpoint once the last frames left.
    async fn stop(self, last: Wire, ended: Option<JobSummary>) -> Result<JobSummary, ClusterError> {
        let summary = match ended {
            Some(summary) => Ok(summary),
            None => end(&self.coordinator, last).await,
        };
        if let Some(acceptor) = self.acceptor {
            acceptor.abort();
        }
        let _ = self.handle.await;
        let refused = self.endpoint.as_ref().map_or(0, |ep| ep.refused_count());
        if let Some(ep) = self.endpoint {
            ep.close("job finished");
            let _ = tokio::time::timeout(CLOSE_LINGER, ep.wait_idle()).await;
        }
        summary.map(|s| JobSummary { refused, ..s })
    }
}
