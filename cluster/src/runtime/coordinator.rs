//! The coordinator actor: owns the [`Scheduler`] and the [`Membership`], supervises the workers
//! and the peer actors, hands out items and gathers results.
//!
//! Losses reach it three ways, all ending in `lose`: a child actor failed or stopped (its
//! supervision event: for a peer actor, its connection was lost), or the membership tick found a
//! worker silent past `lost_after`. A lost worker's in-flight items go back to the front of the
//! queue; items it finished stay finished.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::{sync::oneshot, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    local_worker_name,
    peer::{PeerArgs, PeerMsg, RemoteWorker},
    wire::Wire,
    worker::{Sink, Worker, WorkerArgs, WorkerMsg},
    ClusterError, ClusterOptions, Executor, LostWorker, RunSummary,
};
use crate::{
    membership::{Event, MemberId, MemberKey, Membership, MembershipConfig, Role},
    scheduler::{Completion, ItemId, Scheduler},
    transport::Peer,
};

/// How long the coordinator waits, once the run is over, for its children to deliver `Done` or
/// `Abort` and stop.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// How often the coordinator logs the run's progress at `info`.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Messages of the coordinator.
pub(crate) enum CoordinatorMsg {
    /// A worker connected and passed the handshake.
    PeerAccepted(Peer),
    /// A worker is alive.
    Heartbeat {
        /// The worker.
        key: MemberKey,
    },
    /// A worker's outcome for one item.
    Result {
        /// The worker.
        key: MemberKey,
        /// Item index.
        item: u64,
        /// The executor's output or error.
        result: Result<Vec<u8>, String>,
    },
    /// Heartbeat interval: judge silences, open the gate, check for an empty cluster.
    Tick,
    /// The children had their grace period to stop after the run ended.
    FinishTimeout,
}

/// Start-up arguments of the coordinator.
pub(crate) struct CoordinatorArgs {
    pub(crate) items: Vec<Vec<u8>>,
    pub(crate) local: Vec<Box<dyn Executor>>,
    /// Whether workers can join over the network.
    pub(crate) networked: bool,
    pub(crate) opts: ClusterOptions,
    pub(crate) started: Instant,
    pub(crate) reply: oneshot::Sender<Result<RunSummary, ClusterError>>,
}

/// How the coordinator reaches one worker.
enum Handle {
    Local(ActorRef<WorkerMsg>),
    Remote(ActorRef<PeerMsg>),
}

impl Handle {
    fn assign(&self, item: u64, payload: Vec<u8>) -> bool {
        match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Assign { item, payload }).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Assign { item, payload }).is_ok(),
        }
    }

    fn finish(&self, last: Wire) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Done).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Finish(last)).is_ok(),
        };
    }

    fn cell(&self) -> ActorCell {
        match self {
            Handle::Local(w) => w.get_cell(),
            Handle::Remote(p) => p.get_cell(),
        }
    }
}

/// State of the coordinator.
pub(crate) struct CoordinatorState {
    scheduler: Scheduler<Vec<u8>, Vec<u8>, MemberKey>,
    membership: Membership,
    opts: ClusterOptions,
    networked: bool,
    started: Instant,
    /// The local executors, until `post_start` spawns their workers.
    local: Vec<Box<dyn Executor>>,
    next_id: u64,
    /// Live workers (joined, not lost).
    workers: BTreeMap<MemberKey, Handle>,
    /// Live child actors and the worker each one serves.
    children: HashMap<ActorId, MemberKey>,
    /// Every worker that joined, in joining order, with the items it completed.
    roster: Vec<(MemberKey, String, usize)>,
    executed: Vec<u32>,
    lost: Vec<LostWorker>,
    /// Items are handed out only once the gate is open (`min_workers` joined, or waited enough).
    gate_open: bool,
    /// Since when no worker is live (while items are pending).
    empty_since: Option<Instant>,
    /// Whether the run is over (every item done, or failed).
    over: bool,
    /// The run's outcome once it is over, until delivered (when the children stopped).
    outcome: Option<Result<RunSummary, ClusterError>>,
    reply: Option<oneshot::Sender<Result<RunSummary, ClusterError>>>,
    ticks: Option<JoinHandle<()>>,
    last_progress: Instant,
}

/// The coordinator actor (stateless handler; state built in `pre_start`).
pub(crate) struct Coordinator;

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<CoordinatorMsg>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let opts = args.opts;
        let membership = Membership::new(MembershipConfig {
            heartbeat_interval: opts.heartbeat_interval,
            suspect_after: opts.heartbeat_interval,
            lost_after: opts.lost_after,
        })?;
        let n = args.items.len();
        let scheduler =
            Scheduler::new(args.items).with_in_flight_limit(opts.in_flight_per_worker)?;
        Ok(CoordinatorState {
            scheduler,
            membership,
            gate_open: opts.min_workers == 0,
            opts,
            networked: args.networked,
            started: args.started,
            local: args.local,
            next_id: 0,
            workers: BTreeMap::new(),
            children: HashMap::new(),
            roster: Vec::new(),
            executed: vec![0; n],
            lost: Vec::new(),
            empty_since: Some(args.started),
            over: false,
            outcome: None,
            reply: Some(args.reply),
            ticks: None,
            last_progress: args.started,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<CoordinatorMsg>,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticks =
            Some(myself.send_interval(state.opts.heartbeat_interval, || CoordinatorMsg::Tick));
        for (i, executor) in std::mem::take(&mut state.local).into_iter().enumerate() {
            let name = local_worker_name(i);
            let key = state.join(&name, "in-process");
            let args = WorkerArgs {
                name: name.clone(),
                executor,
                sink: Sink::Coordinator { coordinator: myself.clone(), key },
                heartbeat: state.opts.heartbeat_interval,
            };
            let (worker, _) = Actor::spawn_linked(None, Worker, args, myself.get_cell()).await?;
            state.add(key, Handle::Local(worker));
        }
        info!(items = state.executed.len(), networked = state.networked, "coordinator started");
        state.after_change(&myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<CoordinatorMsg>,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticks) = state.ticks.take() {
            ticks.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            CoordinatorMsg::PeerAccepted(peer) => {
                if state.over {
                    peer.close("the run is over");
                    return Ok(());
                }
                let name = peer.node_name().to_string();
                let addr = peer.remote_address();
                let key = state.join(&name, &addr.to_string());
                let args = PeerArgs {
                    peer,
                    key,
                    coordinator: myself.clone(),
                    heartbeat: state.opts.heartbeat_interval,
                };
                match Actor::spawn_linked(None, RemoteWorker, args, myself.get_cell()).await {
                    Ok((peer_actor, _)) => {
                        info!(worker = %name, peer = %addr, "worker joined");
                        state.add(key, Handle::Remote(peer_actor));
                    }
                    Err(e) => {
                        warn!(worker = %name, peer = %addr, error = %e, "cannot start a peer actor");
                        let _ = state.membership.leave(key, now);
                    }
                }
            }
            CoordinatorMsg::Heartbeat { key } => match state.membership.on_heartbeat(key, now) {
                Ok(Some(Event::Recovered { .. })) => debug!(worker = ?key, "worker recovered"),
                Ok(_) => {}
                Err(e) => debug!(worker = ?key, error = %e, "heartbeat ignored"),
            },
            CoordinatorMsg::Result { key, item, result } => {
                let _ = state.membership.on_heartbeat(key, now);
                state.on_result(&myself, key, item, result);
            }
            CoordinatorMsg::Tick => {
                if now.saturating_duration_since(state.last_progress) >= PROGRESS_EVERY {
                    state.last_progress = now;
                    let p = state.scheduler.progress();
                    let workers = state.workers.len();
                    info!(
                        done = p.done,
                        total = p.total,
                        in_flight = p.in_flight,
                        workers,
                        "progress"
                    );
                }
                for event in state.membership.tick(now) {
                    match event {
                        Event::Lost { key, .. } => {
                            let silent = state.opts.lost_after;
                            state.lose(
                                &myself,
                                key,
                                format!("no heartbeat for more than {silent:?}"),
                            );
                        }
                        Event::Suspect { key } => debug!(worker = ?key, "worker suspect"),
                        _ => {}
                    }
                }
            }
            CoordinatorMsg::FinishTimeout => {
                if !state.children.is_empty() {
                    warn!(
                        left = state.children.len(),
                        "workers did not stop in time; stopping anyway"
                    );
                }
                state.deliver(&myself);
                return Ok(());
            }
        }
        state.after_change(&myself);
        Ok(())
    }

    /// Overrides ractor's default (which stops the coordinator when a child stops or fails): a
    /// child that fails or stops before the run is over is a lost worker.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<CoordinatorMsg>,
        evt: SupervisionEvent,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("{err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped ({})", reason.as_deref().unwrap_or("no reason")))
            }
            _ => return Ok(()),
        };
        if let Some(key) = state.children.remove(&cell.get_id()) {
            if !state.over {
                state.lose(&myself, key, reason);
                state.after_change(&myself);
            } else if state.children.is_empty() {
                state.deliver(&myself);
            }
        }
        Ok(())
    }
}

impl CoordinatorState {
    /// A new worker joins the membership (a fresh member id per connection).
    fn join(&mut self, name: &str, address: &str) -> MemberKey {
        let id = MemberId(self.next_id);
        self.next_id += 1;
        let events = self.membership.join(id, address, Role::Worker, Instant::now());
        let key = match events.last() {
            Some(Event::Joined { key, .. }) => *key,
            _ => MemberKey { id, incarnation: 0 },
        };
        self.roster.push((key, name.to_string(), 0));
        key
    }

    fn add(&mut self, key: MemberKey, handle: Handle) {
        self.children.insert(handle.cell().get_id(), key);
        self.workers.insert(key, handle);
        self.empty_since = None;
    }

    fn name_of(&self, key: MemberKey) -> String {
        self.roster
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or_else(|| format!("{key:?}"), |(_, name, _)| name.clone())
    }

    fn on_result(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        key: MemberKey,
        item: u64,
        result: Result<Vec<u8>, String>,
    ) {
        if self.over {
            return;
        }
        let Some(idx) = usize::try_from(item).ok().filter(|&i| i < self.executed.len()) else {
            warn!(worker = %self.name_of(key), item, "result for an unknown item; ignored");
            return;
        };
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(error) => {
                let worker = self.name_of(key);
                warn!(worker = %worker, item = idx, error = %error, "item failed; failing the run");
                self.end(myself, Err(ClusterError::ItemFailed { item: idx, worker, error }));
                return;
            }
        };
        self.executed[idx] += 1;
        match self.scheduler.complete(&key, ItemId(idx), bytes) {
            Ok(Completion::Accepted { .. }) => {
                debug!(worker = %self.name_of(key), item = idx, "item done");
                if let Some(entry) = self.roster.iter_mut().find(|(k, _, _)| *k == key) {
                    entry.2 += 1;
                }
            }
            Ok(Completion::Ignored) => {
                debug!(worker = %self.name_of(key), item = idx, "item already done; result dropped")
            }
            Err(e) => warn!(error = %e, "result ignored"),
        }
    }

    /// Declares `key` lost (once): no more items for it, its in-flight items re-queued, its actor
    /// stopped.
    fn lose(&mut self, myself: &ActorRef<CoordinatorMsg>, key: MemberKey, reason: String) {
        let Some(handle) = self.workers.remove(&key) else {
            return;
        };
        let now = Instant::now();
        let _ = self.membership.leave(key, now);
        let requeued: Vec<usize> =
            self.scheduler.worker_lost(&key).into_iter().map(|i| i.0).collect();
        let name = self.name_of(key);
        info!(worker = %name, reason = %reason, requeued = ?requeued, "worker lost");
        handle.cell().stop(Some(format!("lost: {reason}")));
        self.lost.push(LostWorker { name, at: now, reason, requeued });
        if self.workers.is_empty() {
            self.empty_since = Some(now);
            if !self.networked && !self.scheduler.is_done() {
                let e = self.no_workers(Duration::ZERO);
                self.end(myself, Err(e));
            }
        }
    }

    fn no_workers(&self, waited: Duration) -> ClusterError {
        let p = self.scheduler.progress();
        ClusterError::NoWorkers { pending: p.total - p.done, total: p.total, waited }
    }

    /// After any change: finish when done, open the gate, fail when nobody is left, hand out items.
    fn after_change(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        if self.over {
            return;
        }
        if self.scheduler.is_done() {
            let summary = self.summary();
            self.end(myself, Ok(summary));
            return;
        }
        let now = Instant::now();
        let waited = now.saturating_duration_since(self.started);
        if !self.gate_open {
            let remote = self.workers.values().filter(|h| matches!(h, Handle::Remote(_))).count();
            if remote >= self.opts.min_workers || waited >= self.opts.wait_for_workers {
                info!(remote, wanted = self.opts.min_workers, ?waited, "handing out items");
                self.gate_open = true;
            }
        }
        if let Some(since) = self.empty_since {
            let empty_for = now.saturating_duration_since(since);
            if empty_for >= self.opts.wait_for_workers {
                let e = self.no_workers(empty_for);
                self.end(myself, Err(e));
                return;
            }
        }
        if !self.gate_open {
            return;
        }
        for (key, handle) in &self.workers {
            while let Some(a) = self.scheduler.next_for(key, now) {
                let item = a.id.0 as u64;
                debug!(worker = ?key, item, "item assigned");
                if !handle.assign(item, a.payload.clone()) {
                    break; // its actor is gone; the supervision event re-queues its items
                }
            }
        }
    }

    fn summary(&mut self) -> RunSummary {
        let n = self.executed.len();
        let scheduler = std::mem::replace(&mut self.scheduler, Scheduler::new(Vec::new()));
        let computed_twice = scheduler.progress().computed_twice;
        // Only called once every item is done.
        let results = scheduler.into_results().unwrap_or_else(|_| vec![Vec::new(); n]);
        let elapsed = self.started.elapsed();
        info!(items = n, ?elapsed, lost = self.lost.len(), computed_twice, "run finished");
        RunSummary {
            results,
            executed: self.executed.clone(),
            computed_twice,
            workers_lost: self.lost.len(),
            per_worker: self.roster.iter().map(|(_, name, n)| (name.clone(), *n)).collect(),
            lost: self.lost.clone(),
            refused: 0,
            elapsed,
        }
    }

    /// The run is over: tell every worker (`Done`, or `Abort` on failure), then deliver the
    /// outcome once every child stopped (or after a grace period).
    fn end(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        outcome: Result<RunSummary, ClusterError>,
    ) {
        if self.over {
            return;
        }
        self.over = true;
        let last = match &outcome {
            Ok(_) => Wire::Done,
            Err(e) => Wire::Abort { reason: e.to_string() },
        };
        self.outcome = Some(outcome);
        for handle in std::mem::take(&mut self.workers).into_values() {
            handle.finish(last.clone());
        }
        if self.children.is_empty() {
            self.deliver(myself);
        } else {
            // Detached timer: the coordinator delivers without it if every child stops sooner.
            myself.send_after(FINISH_GRACE, || CoordinatorMsg::FinishTimeout);
        }
    }

    fn deliver(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        if let (Some(reply), Some(outcome)) = (self.reply.take(), self.outcome.take()) {
            let _ = reply.send(outcome);
        }
        myself.stop(None);
    }
}
