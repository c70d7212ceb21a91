//! The coordinator actor: owns the [`Membership`] and the running [`Round`], supervises the
//! workers and the peer actors, hands out items and gathers results, for as long as the job runs.
//!
//! The driver ([`super::Job`]) starts a round with `Round` and waits for its reply; between
//! rounds the coordinator goes on accepting workers, heartbeating and judging silences. Losses
//! reach it three ways, all ending in `lose`: a child actor failed or stopped (its supervision
//! event: for a peer actor, its connection was lost), or the membership tick found a worker
//! silent past `lost_after`. A worker lost during a round has its in-flight items put back at the
//! front of that round's queue; items it finished stay finished. One lost between rounds is gone.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    local_worker_name,
    peer::{PeerArgs, PeerMsg, RemoteWorker},
    round::{Received, Round},
    wire::Wire,
    worker::{Sink, Worker, WorkerArgs, WorkerMsg},
    ClusterError, ClusterOptions, Executor, JobSummary, LostWorker, RoundResults, RoundSummary,
};
use crate::{
    membership::{Event, MemberId, MemberKey, Membership, MembershipConfig, Role},
    transport::Peer,
};

/// How long the coordinator waits, once the job is over, for its children to deliver `Done` or
/// `Abort` and stop.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// How often the coordinator logs a round's progress at `info`.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The reply to a round: its results, or why it failed.
pub(crate) type RoundReply = oneshot::Sender<Result<RoundResults, ClusterError>>;

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
        /// The round the item belongs to.
        round: u64,
        /// Item index within its round.
        item: u64,
        /// The executor's output or error.
        result: Result<Vec<u8>, String>,
    },
    /// Heartbeat interval: judge silences, open the gate, check for an empty cluster.
    Tick,
    /// The driver starts the next round.
    Round {
        /// The round's items, in result order.
        items: Vec<Vec<u8>>,
        /// Where the round's outcome goes.
        reply: RoundReply,
    },
    /// The driver hands every worker (present and future) this state.
    Broadcast(Arc<Vec<u8>>),
    /// The driver ends the job: tell every worker `last` (`Done` or `Abort`), wait for them to
    /// stop, then reply with the job's summary and stop.
    End {
        /// The last message to every worker.
        last: Wire,
        /// Where the summary goes.
        reply: oneshot::Sender<JobSummary>,
    },
    /// The children had their grace period to stop after the job ended.
    FinishTimeout,
}

/// Start-up arguments of the coordinator.
pub(crate) struct CoordinatorArgs {
    pub(crate) local: Vec<Box<dyn Executor>>,
    /// Whether workers can join over the network.
    pub(crate) networked: bool,
    pub(crate) opts: ClusterOptions,
    pub(crate) started: Instant,
    /// Fired once `min_workers` joined or `wait_for_workers` passed: the driver may start.
    pub(crate) gate: oneshot::Sender<()>,
    /// Names of the live workers, for [`super::Job::workers`].
    pub(crate) names: watch::Sender<Vec<String>>,
}

/// How the coordinator reaches one worker.
enum Handle {
    Local(ActorRef<WorkerMsg>),
    Remote(ActorRef<PeerMsg>),
}

impl Handle {
    fn assign(&self, round: u64, items: Vec<(u64, Vec<u8>)>) -> bool {
        match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Assign { round, items }).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Assign { round, items }).is_ok(),
        }
    }

    fn cancel(&self, round: u64) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Cancel { round }).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Cancel { round }).is_ok(),
        };
    }

    fn broadcast(&self, blob: &Arc<Vec<u8>>) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Broadcast(blob.clone())).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Broadcast(blob.clone())).is_ok(),
        };
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

/// The running round and where its outcome goes.
struct Active {
    round: Round,
    reply: RoundReply,
}

/// State of the coordinator.
pub(crate) struct CoordinatorState {
    membership: Membership,
    opts: ClusterOptions,
    networked: bool,
    started: Instant,
    /// The local executors, until `post_start` spawns their workers.
    local: Vec<Box<dyn Executor>>,
    next_id: u64,
    /// Live workers (joined, not lost), in joining order.
    workers: BTreeMap<MemberKey, Handle>,
    /// Live child actors and the worker each one serves.
    children: HashMap<ActorId, MemberKey>,
    /// Every worker that joined, in joining order, with the items it completed in the job.
    roster: Vec<(MemberKey, String, usize)>,
    lost: Vec<LostWorker>,
    /// Until the gate opens (`min_workers` joined, or waited enough): the driver waits on it.
    gate: Option<oneshot::Sender<()>>,
    names: watch::Sender<Vec<String>>,
    /// Since when no worker is live.
    empty_since: Option<Instant>,
    round: Option<Active>,
    /// Rounds started so far (the last round's number).
    rounds_started: u64,
    rounds_failed: usize,
    summaries: Vec<RoundSummary>,
    /// Results of another round than the running one (or of none), dropped.
    stale: usize,
    /// The last broadcast state, for workers that join later.
    broadcast: Option<Arc<Vec<u8>>>,
    /// Whether the job is over (the driver ended it).
    over: bool,
    end_reply: Option<oneshot::Sender<JobSummary>>,
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
        Ok(CoordinatorState {
            membership,
            opts,
            networked: args.networked,
            started: args.started,
            local: args.local,
            next_id: 0,
            workers: BTreeMap::new(),
            children: HashMap::new(),
            roster: Vec::new(),
            lost: Vec::new(),
            gate: Some(args.gate),
            names: args.names,
            empty_since: Some(args.started),
            round: None,
            rounds_started: 0,
            rounds_failed: 0,
            summaries: Vec::new(),
            stale: 0,
            broadcast: None,
            over: false,
            end_reply: None,
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
        info!(networked = state.networked, "coordinator started");
        state.after_change();
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
                    peer.close("the job is over");
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
                        let round = state.round.as_ref().map(|a| a.round.number());
                        info!(worker = %name, peer = %addr, ?round, "worker joined");
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
            CoordinatorMsg::Result { key, round, item, result } => {
                let _ = state.membership.on_heartbeat(key, now);
                state.on_result(key, round, item, result);
            }
            CoordinatorMsg::Tick => {
                state.log_progress(now);
                for event in state.membership.tick(now) {
                    match event {
                        Event::Lost { key, .. } => {
                            let silent = state.opts.lost_after;
                            state.lose(key, format!("no heartbeat for more than {silent:?}"));
                        }
                        Event::Suspect { key } => debug!(worker = ?key, "worker suspect"),
                        _ => {}
                    }
                }
            }
            CoordinatorMsg::Round { items, reply } => state.start_round(items, reply, now),
            CoordinatorMsg::Broadcast(blob) => {
                if !state.over {
                    debug!(bytes = blob.len(), workers = state.workers.len(), "broadcast");
                    for handle in state.workers.values() {
                        handle.broadcast(&blob);
                    }
                    state.broadcast = Some(blob);
                }
            }
            CoordinatorMsg::End { last, reply } => {
                state.end(&myself, last, reply);
                return Ok(());
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
        state.after_change();
        Ok(())
    }

    /// Overrides ractor's default (which stops the coordinator when a child stops or fails): a
    /// child that fails or stops before the job is over is a lost worker.
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
                state.lose(key, reason);
                state.after_change();
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

    /// A joined worker's actor runs: it gets the last broadcast state, then items.
    fn add(&mut self, key: MemberKey, handle: Handle) {
        if let Some(blob) = &self.broadcast {
            handle.broadcast(blob);
        }
        self.children.insert(handle.cell().get_id(), key);
        self.workers.insert(key, handle);
        self.empty_since = None;
        let name = self.name_of(key);
        if let Some(active) = &mut self.round {
            active.round.joined(key, &name);
        }
        self.publish_names();
    }

    fn publish_names(&self) {
        let names = self.workers.keys().map(|k| self.name_of(*k)).collect();
        self.names.send_replace(names);
    }

    fn name_of(&self, key: MemberKey) -> String {
        self.roster
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or_else(|| format!("{key:?}"), |(_, name, _)| name.clone())
    }

    fn start_round(&mut self, items: Vec<Vec<u8>>, reply: RoundReply, now: Instant) {
        if self.over || self.round.is_some() {
            let why = if self.over { "the job is over" } else { "a round is already running" };
            let _ = reply.send(Err(ClusterError::Runtime(format!("cannot start a round: {why}"))));
            return;
        }
        self.rounds_started += 1;
        let number = self.rounds_started;
        // The first round's wait for a worker counts from the job's start, as the gate's did.
        let wait_from = if number == 1 { self.started } else { now };
        let n = items.len();
        match Round::new(number, items, self.opts.in_flight_per_worker, now, wait_from) {
            Ok(mut round) => {
                for key in self.workers.keys() {
                    round.joined(*key, &self.name_of(*key));
                }
                info!(round = number, items = n, workers = self.workers.len(), "round started");
                self.last_progress = now;
                self.round = Some(Active { round, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(ClusterError::Options(e.to_string())));
            }
        }
    }

    fn on_result(
        &mut self,
        key: MemberKey,
        round: u64,
        item: u64,
        result: Result<Vec<u8>, String>,
    ) {
        if self.over {
            return;
        }
        let Some(active) = &mut self.round else {
            self.stale += 1;
            debug!(worker = %self.name_of(key), round, item, "result between rounds; dropped");
            return;
        };
        match active.round.receive(key, round, item, result) {
            Received::Stored => {
                debug!(worker = ?key, round, item, "item done");
                if let Some(entry) = self.roster.iter_mut().find(|(k, _, _)| *k == key) {
                    entry.2 += 1;
                }
            }
            Received::AlreadyDone => debug!(worker = ?key, item, "item already done; dropped"),
            Received::Stale => {
                self.stale += 1;
                let current = active.round.number();
                debug!(worker = ?key, round, current, item, "result of another round; dropped");
            }
            Received::Unknown => {
                warn!(worker = %self.name_of(key), round, item, "result for an unknown item; ignored")
            }
            Received::Failed(e) => {
                warn!(error = %e, "item failed; failing the round");
                self.fail_round(e);
            }
        }
    }

    /// Declares `key` lost (once): no more items for it, its in-flight items re-queued, its actor
    /// stopped.
    fn lose(&mut self, key: MemberKey, reason: String) {
        let Some(handle) = self.workers.remove(&key) else {
            return;
        };
        let now = Instant::now();
        let _ = self.membership.leave(key, now);
        let record = match &mut self.round {
            Some(active) => active.round.worker_lost(&key, now, &reason),
            None => LostWorker {
                name: self.name_of(key),
                at: now,
                reason: reason.clone(),
                requeued: Vec::new(),
                round: None,
            },
        };
        info!(worker = %record.name, reason = %reason, round = ?record.round, requeued = ?record.requeued, "worker lost");
        handle.cell().stop(Some(format!("lost: {reason}")));
        self.lost.push(record);
        if self.workers.is_empty() {
            self.empty_since = Some(now);
        }
        self.publish_names();
    }

    fn log_progress(&mut self, now: Instant) {
        let Some(active) = &self.round else {
            return;
        };
        if now.saturating_duration_since(self.last_progress) >= PROGRESS_EVERY {
            self.last_progress = now;
            let p = active.round.progress();
            let (round, workers) = (active.round.number(), self.workers.len());
            info!(
                round,
                done = p.done,
                total = p.total,
                in_flight = p.in_flight,
                workers,
                "progress"
            );
        }
    }

    /// After any change: open the gate; finish the round when done, fail it when nobody is
    /// left for too long, or hand out its items.
    fn after_change(&mut self) {
        if self.over {
            return;
        }
        let now = Instant::now();
        if self.gate.is_some() {
            let waited = now.saturating_duration_since(self.started);
            let remote = self.workers.values().filter(|h| matches!(h, Handle::Remote(_))).count();
            if remote >= self.opts.min_workers || waited >= self.opts.wait_for_workers {
                info!(remote, wanted = self.opts.min_workers, ?waited, "the job starts");
                if let Some(gate) = self.gate.take() {
                    let _ = gate.send(());
                }
            }
        }
        let Some(active) = &mut self.round else {
            return;
        };
        if active.round.is_done() {
            self.complete_round(now);
            return;
        }
        if self.workers.is_empty() {
            let since = self.empty_since.unwrap_or(now).max(active.round.wait_from());
            let empty_for = now.saturating_duration_since(since);
            if !self.networked || empty_for >= self.opts.wait_for_workers {
                let waited = if self.networked { empty_for } else { Duration::ZERO };
                let e = active.round.no_workers(waited);
                self.fail_round(e);
            }
            return;
        }
        // One item per worker in turn while any takes one (so a round spreads evenly however
        // many items a worker may hold), then each worker's items in one message.
        let number = active.round.number();
        let mut given: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); self.workers.len()];
        loop {
            let mut any = false;
            for ((key, _), mine) in self.workers.iter().zip(given.iter_mut()) {
                if let Some((item, payload)) = active.round.next_for(key, now) {
                    debug!(worker = ?key, round = number, item, "item assigned");
                    mine.push((item, payload));
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        for ((_, handle), mine) in self.workers.iter().zip(given) {
            // A gone actor: the supervision event re-queues its items.
            if !mine.is_empty() && !handle.assign(number, mine) {
                debug!(round = number, "items not delivered: the worker's actor is gone");
            }
        }
    }

    fn complete_round(&mut self, now: Instant) {
        let Some(Active { round, reply }) = self.round.take() else {
            return;
        };
        let number = round.number();
        match round.finish(now) {
            Ok(done) => {
                let s = &done.summary;
                info!(round = number, items = s.executed.len(), elapsed = ?s.elapsed, lost = s.lost.len(), stale = s.stale, "round finished");
                self.summaries.push(done.summary.clone());
                let _ = reply.send(Ok(done));
            }
            Err(e) => {
                self.rounds_failed += 1;
                let _ = reply.send(Err(ClusterError::Runtime(format!("round {number}: {e}"))));
            }
        }
    }

    /// The running round failed: its queued items are dropped on every worker (the running ones
    /// finish, and their results are dropped as stale), and the driver gets `error`.
    fn fail_round(&mut self, error: ClusterError) {
        let Some(Active { round, reply }) = self.round.take() else {
            return;
        };
        let number = round.number();
        self.rounds_failed += 1;
        for handle in self.workers.values() {
            handle.cancel(number);
        }
        info!(round = number, error = %error, "round failed");
        let _ = reply.send(Err(error));
    }

    /// The job is over: tell every worker `last` (`Done`, or `Abort`), then deliver the summary
    /// once every child stopped (or after a grace period).
    fn end(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        last: Wire,
        reply: oneshot::Sender<JobSummary>,
    ) {
        if self.over {
            return; // the first End's reply gets the summary; this one's sender just drops
        }
        if self.round.is_some() {
            let reason = match &last {
                Wire::Abort { reason } => reason.clone(),
                _ => "the job ended".into(),
            };
            self.fail_round(ClusterError::Aborted { reason });
        }
        self.over = true;
        self.end_reply = Some(reply);
        for handle in std::mem::take(&mut self.workers).into_values() {
            handle.finish(last.clone());
        }
        self.publish_names();
        if self.children.is_empty() {
            self.deliver(myself);
        } else {
            // Detached timer: the coordinator delivers without it if every child stops sooner.
            myself.send_after(FINISH_GRACE, || CoordinatorMsg::FinishTimeout);
        }
    }

    fn deliver(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        if let Some(reply) = self.end_reply.take() {
            let summary = JobSummary {
                rounds: std::mem::take(&mut self.summaries),
                rounds_failed: self.rounds_failed,
                per_worker: self.roster.iter().map(|(_, name, n)| (name.clone(), *n)).collect(),
                lost: std::mem::take(&mut self.lost),
                stale: self.stale,
                refused: 0,
                elapsed: self.started.elapsed(),
            };
            info!(
                rounds = summary.rounds.len(),
                failed = summary.rounds_failed,
                lost = summary.lost.len(),
                "job finished"
            );
            let _ = reply.send(summary);
        }
        myself.stop(None);
    }
}
