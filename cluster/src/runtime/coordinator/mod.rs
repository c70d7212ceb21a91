//! The coordinator actor: owns the [`Membership`] and the running [`Round`], supervises the
//! workers and the peer actors, hands out items and gathers results, for as long as the job runs.
//!
//! The driver ([`super::Job`]) starts a round with `Round` and waits for its reply; between
//! rounds the coordinator goes on accepting workers, heartbeating and judging silences. Losses
//! reach it three ways, all ending in `lose`: a child actor failed or stopped (its supervision
//! event: for a peer actor, its connection was lost), or the membership tick found a worker
//! silent past `lost_after`. A worker lost during a round has its in-flight items put back at the
//! front of that round's queue; items it finished stay finished. One lost between rounds is gone.
//!
//! Here the actor and its state; [`handle`] is how it reaches a local or remote worker, and
//! [`state`] what it does on each event (joins, rounds, results, losses, the end).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

mod handle;
mod state;

use handle::Handle;

use super::{
    local_worker_name,
    peer::{PeerArgs, RemoteWorker},
    round::{Received, Round},
    wire::Wire,
    worker::{Sink, Worker, WorkerArgs},
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
        /// For a pinned round: the worker (by name) each item must run on.
        owners: Option<Vec<String>>,
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
            CoordinatorMsg::Round { items, owners, reply } => {
                state.start_round(items, owners, reply, now)
            }
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
