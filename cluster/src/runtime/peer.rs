//! Peer actors: one per QUIC connection, bridging [`Wire`] messages and local actor messages.
//!
//! - [`RemoteWorker`] runs in the coordinator's process, one per accepted worker connection: it
//!   forwards assignments, turns the worker's results and heartbeats into coordinator messages,
//!   heartbeats towards the worker, and *fails* when the connection is lost, so its supervisor
//!   (the coordinator) sees the loss as a supervision event.
//! - [`Link`] runs in a worker's process: it owns the connection to the coordinator, supervises
//!   the process's [`Worker`] actor, and ends the worker's run on `Done` (once the worker has
//!   applied the states broadcast before it), `Abort`, or the coordinator's loss (connection
//!   closed, or silent past `lost_after`).
//!
//! Each owns the sending half of the control stream; a reader task owns the receiving half and
//! forwards every frame to the actor's mailbox (or the loss, once).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ractor::{Actor, ActorProcessingErr, ActorRef, Message, SupervisionEvent};
use tokio::{sync::oneshot, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    coordinator::CoordinatorMsg,
    wire::Wire,
    worker::{Sink, Worker, WorkerArgs, WorkerMsg},
    ClusterError, Executor, WorkerSummary,
};
use crate::{
    membership::MemberKey,
    transport::{Peer, PeerReceiver, PeerSender, TransportError},
};

/// How long a peer actor waits for the other side to acknowledge its last message (`Done` or
/// `Abort`) before closing anyway.
const FINISH_WAIT: Duration = Duration::from_secs(1);

/// Forwards every message received on `rx` to `to` (wrapped by `wrap`), then the loss (wrapped by
/// `lost`) once receiving fails. Ends when `to` is gone.
fn spawn_reader<M: Message>(
    mut rx: PeerReceiver,
    to: ActorRef<M>,
    wrap: fn(Wire) -> M,
    lost: fn(String) -> M,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match rx.recv::<Wire>().await {
                Ok(msg) => {
                    if to.send_message(wrap(msg)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = to.send_message(lost(e.to_string()));
                    return;
                }
            }
        }
    })
}

/// Marks the close reason of a connection closed because the run was aborted.
const ABORT_PREFIX: &str = "run aborted: ";

/// The close reason of a connection closed because the job is done: a worker that sees the
/// close before it read the `Done` (QUIC drops a stream's unread data when its connection
/// closes, and `finish` only waits for the transport's acknowledgement) still ends normally.
const DONE_REASON: &str = "job done";

/// Messages of a [`RemoteWorker`].
pub(crate) enum PeerMsg {
    /// Coordinator → worker: run these items of one round, in order.
    Assign {
        /// The items' round.
        round: u64,
        /// `(index within the round, payload)` per item.
        items: Vec<(u64, Vec<u8>)>,
    },
    /// Coordinator → worker: drop the queued items of rounds up to this one.
    Cancel {
        /// The last cancelled round.
        round: u64,
    },
    /// Coordinator → worker: a state for the executor.
    Broadcast(Arc<Vec<u8>>),
    /// Send this last message (`Done` or `Abort`), wait for it to be acknowledged, then stop.
    Finish(Wire),
    /// Time to send a heartbeat to the worker.
    Beat,
    /// A message from the worker.
    Remote(Wire),
    /// The connection is lost (the reader's error, in words).
    Lost(String),
}

/// Start-up arguments of a [`RemoteWorker`].
pub(crate) struct PeerArgs {
    pub(crate) peer: Peer,
    pub(crate) key: MemberKey,
    pub(crate) coordinator: ActorRef<CoordinatorMsg>,
    pub(crate) heartbeat: Duration,
}

/// State of a [`RemoteWorker`].
pub(crate) struct PeerState {
    sender: PeerSender,
    name: String,
    addr: SocketAddr,
    key: MemberKey,
    coordinator: ActorRef<CoordinatorMsg>,
    reader: JoinHandle<()>,
    beats: JoinHandle<()>,
}

/// The coordinator's end of one worker connection.
pub(crate) struct RemoteWorker;

impl Actor for RemoteWorker {
    type Msg = PeerMsg;
    type State = PeerState;
    type Arguments = PeerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PeerMsg>,
        args: PeerArgs,
    ) -> Result<PeerState, ActorProcessingErr> {
        let name = args.peer.node_name().to_string();
        let addr = args.peer.remote_address();
        let (sender, receiver) = args.peer.split();
        let reader = spawn_reader(receiver, myself.clone(), PeerMsg::Remote, PeerMsg::Lost);
        let beats = myself.send_interval(args.heartbeat, || PeerMsg::Beat);
        Ok(PeerState {
            sender,
            name,
            addr,
            key: args.key,
            coordinator: args.coordinator,
            reader,
            beats,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<PeerMsg>,
        state: &mut PeerState,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        state.beats.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<PeerMsg>,
        msg: PeerMsg,
        state: &mut PeerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PeerMsg::Assign { round, items } => {
                // Together in one frame; if that is too large, one by one, so that only an item
                // too large for a frame by itself fails: no worker could take it (the connection
                // stays usable).
                let one_by_one = if items.len() > 1 {
                    let wire = Wire::Assign { round, items };
                    match state.sender.send(&wire).await {
                        Ok(()) => None,
                        Err(TransportError::Send { .. }) => match wire {
                            Wire::Assign { items, .. } => Some(items),
                            _ => None,
                        },
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    Some(items)
                };
                for one in one_by_one.unwrap_or_default() {
                    let item = one.0;
                    match state.sender.send(&Wire::Assign { round, items: vec![one] }).await {
                        Ok(()) => {}
                        Err(e @ TransportError::Send { .. }) => {
                            let key = state.key;
                            let result = Err(format!("the item cannot be sent to the worker: {e}"));
                            let msg = CoordinatorMsg::Result { key, round, item, result };
                            let _ = state.coordinator.send_message(msg);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            PeerMsg::Cancel { round } => state.sender.send(&Wire::Cancel { round }).await?,
            // `Job::broadcast` checked the size against the frame limit: any error here is the
            // connection's, and fails this actor (the worker is lost).
            PeerMsg::Broadcast(blob) => {
                state.sender.send(&Wire::Broadcast { state: blob.as_ref().clone() }).await?
            }
            PeerMsg::Beat => state.sender.send(&Wire::Heartbeat).await?,
            PeerMsg::Finish(last) => {
                if state.sender.send(&last).await.is_ok() {
                    let _ = tokio::time::timeout(FINISH_WAIT, state.sender.finish()).await;
                }
                // Should the `Abort` not have arrived before the close (a loaded machine), its
                // reason still does, in the close frame.
                match &last {
                    Wire::Abort { reason } => {
                        state.sender.close(&format!("{ABORT_PREFIX}{reason}"))
                    }
                    Wire::Done => state.sender.close(DONE_REASON),
                    _ => {}
                }
                myself.stop(Some("run finished".into()));
            }
            PeerMsg::Remote(Wire::Result { round, item, result }) => {
                let key = state.key;
                let msg = CoordinatorMsg::Result { key, round, item, result };
                let _ = state.coordinator.send_message(msg);
            }
            PeerMsg::Remote(Wire::Heartbeat) => {
                let _ =
                    state.coordinator.send_message(CoordinatorMsg::Heartbeat { key: state.key });
            }
            PeerMsg::Remote(other) => {
                warn!(worker = %state.name, peer = %state.addr, msg = ?other, "unexpected message from a worker; ignored");
            }
            PeerMsg::Lost(reason) => {
                return Err(format!(
                    "connection to worker {:?} ({}) lost: {reason}",
                    state.name, state.addr
                )
                .into());
            }
        }
        Ok(())
    }
}

/// Messages of a worker process's [`Link`].
pub(crate) enum LinkMsg {
    /// The local worker finished an item.
    WorkerResult {
        /// The item's round.
        round: u64,
        /// Item index.
        item: u64,
        /// The executor's outcome.
        result: Result<Vec<u8>, String>,
    },
    /// The local worker is alive: heartbeat the coordinator.
    WorkerBeat,
    /// Time to check whether the coordinator is still heard from.
    Check,
    /// A message from the coordinator.
    Remote(Wire),
    /// The connection is lost (the reader's error, in words).
    Lost(String),
}

/// Start-up arguments of a [`Link`].
pub(crate) struct LinkArgs {
    pub(crate) peer: Peer,
    pub(crate) name: String,
    pub(crate) executor: Box<dyn Executor>,
    pub(crate) heartbeat: Duration,
    pub(crate) lost_after: Duration,
    pub(crate) reply: oneshot::Sender<Result<WorkerSummary, ClusterError>>,
}

/// State of a [`Link`].
pub(crate) struct LinkState {
    sender: PeerSender,
    addr: SocketAddr,
    /// Start-up arguments of the worker, until `post_start` spawns it.
    pending: Option<WorkerArgs>,
    worker: Option<ActorRef<WorkerMsg>>,
    heartbeat: Duration,
    lost_after: Duration,
    last_heard: Instant,
    executed: usize,
    /// The coordinator said `Done`: the worker applies the states broadcast before it, then
    /// stops, and its stop ends the run normally (the coordinator's close meanwhile is expected).
    done: bool,
    reply: Option<oneshot::Sender<Result<WorkerSummary, ClusterError>>>,
    reader: JoinHandle<()>,
    checks: JoinHandle<()>,
}

impl LinkState {
    /// Ends the worker's run with `outcome` (once) and stops the link, and with it the worker.
    fn finish(&mut self, myself: &ActorRef<LinkMsg>, outcome: Result<WorkerSummary, ClusterError>) {
        if let Some(reply) = self.reply.take() {
            match &outcome {
                Ok(s) => info!(coordinator = %self.addr, executed = s.executed, "run finished"),
                Err(e) => warn!(coordinator = %self.addr, error = %e, "worker stops"),
            }
            let _ = reply.send(outcome);
        }
        myself.stop(None);
    }

    fn lost(&mut self, myself: &ActorRef<LinkMsg>, reason: String) {
        if self.done {
            // The job is over; the worker finishes what `Done` left it and then stops.
            debug!(coordinator = %self.addr, %reason, "connection closed after Done");
            return;
        }
        let addr = self.addr;
        // A coordinator that aborted the run says so in its close frame.
        if let Some(at) = reason.find(ABORT_PREFIX) {
            let why = reason[at + ABORT_PREFIX.len()..].to_string();
            self.finish(myself, Err(ClusterError::Aborted { reason: why }));
            return;
        }
        // A coordinator done with the job says so too (the close beat the `Done` frame).
        if reason.contains(DONE_REASON) {
            let executed = self.executed;
            self.finish(myself, Ok(WorkerSummary { executed }));
            return;
        }
        self.finish(myself, Err(ClusterError::CoordinatorLost { addr, reason }));
    }
}

/// A worker process's end of its connection to the coordinator.
pub(crate) struct Link;

impl Actor for Link {
    type Msg = LinkMsg;
    type State = LinkState;
    type Arguments = LinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LinkMsg>,
        args: LinkArgs,
    ) -> Result<LinkState, ActorProcessingErr> {
        let addr = args.peer.remote_address();
        let (sender, receiver) = args.peer.split();
        let reader = spawn_reader(receiver, myself.clone(), LinkMsg::Remote, LinkMsg::Lost);
        let checks = myself.send_interval(args.heartbeat, || LinkMsg::Check);
        let pending = WorkerArgs {
            name: args.name,
            executor: args.executor,
            sink: Sink::Link(myself.clone()),
            heartbeat: args.heartbeat,
        };
        Ok(LinkState {
            sender,
            addr,
            pending: Some(pending),
            worker: None,
            heartbeat: args.heartbeat,
            lost_after: args.lost_after,
            last_heard: Instant::now(),
            executed: 0,
            done: false,
            reply: Some(args.reply),
            reader,
            checks,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<LinkMsg>,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.pending.take() {
            let (worker, _) = Actor::spawn_linked(None, Worker, args, myself.get_cell()).await?;
            state.worker = Some(worker);
        }
        debug!(heartbeat = ?state.heartbeat, "worker link started");
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<LinkMsg>,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        state.checks.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<LinkMsg>,
        msg: LinkMsg,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LinkMsg::Remote(wire) => {
                state.last_heard = Instant::now();
                match wire {
                    Wire::Assign { round, items } => {
                        debug!(round, items = items.len(), "assignment received");
                        if let Some(worker) = &state.worker {
                            let _ = worker.send_message(WorkerMsg::Assign { round, items });
                        }
                    }
                    Wire::Cancel { round } => {
                        if let Some(worker) = &state.worker {
                            let _ = worker.send_message(WorkerMsg::Cancel { round });
                        }
                    }
                    Wire::Broadcast { state: blob } => {
                        debug!(bytes = blob.len(), "broadcast state received");
                        if let Some(worker) = &state.worker {
                            let _ = worker.send_message(WorkerMsg::Broadcast(Arc::new(blob)));
                        }
                    }
                    Wire::Heartbeat => {}
                    Wire::Done => match &state.worker {
                        // The states broadcast before `Done` (a training's last: the trained
                        // weights a worker goes on to evaluate with) are applied before the
                        // worker stops, and with it the run.
                        Some(worker) if worker.send_message(WorkerMsg::Done).is_ok() => {
                            state.done = true;
                        }
                        _ => {
                            let executed = state.executed;
                            state.finish(&myself, Ok(WorkerSummary { executed }));
                        }
                    },
                    Wire::Abort { reason } => {
                        state.finish(&myself, Err(ClusterError::Aborted { reason }));
                    }
                    Wire::Result { round, item, .. } => {
                        warn!(round, item, "unexpected result from the coordinator; ignored");
                    }
                }
            }
            LinkMsg::WorkerResult { round, item, result } => {
                state.executed += 1;
                let sent = match state.sender.send(&Wire::Result { round, item, result }).await {
                    // Too large for a frame: report that as the item's error instead.
                    Err(e @ TransportError::Send { .. }) => {
                        let result = Err(format!("the result cannot be sent back: {e}"));
                        state.sender.send(&Wire::Result { round, item, result }).await
                    }
                    other => other,
                };
                if let Err(e) = sent {
                    state.lost(&myself, e.to_string());
                }
            }
            LinkMsg::WorkerBeat => {
                if let Err(e) = state.sender.send(&Wire::Heartbeat).await {
                    state.lost(&myself, e.to_string());
                }
            }
            LinkMsg::Check => {
                let silent = state.last_heard.elapsed();
                if silent > state.lost_after {
                    state.lost(&myself, format!("no message for {silent:?}"));
                }
            }
            LinkMsg::Lost(reason) => state.lost(&myself, reason),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<LinkMsg>,
        evt: SupervisionEvent,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(_, err) => {
                let e = ClusterError::Runtime(format!("the worker actor failed: {err}"));
                state.finish(&myself, Err(e));
            }
            SupervisionEvent::ActorTerminated(..) if state.done => {
                let executed = state.executed;
                state.finish(&myself, Ok(WorkerSummary { executed }));
            }
            SupervisionEvent::ActorTerminated(_, _, reason) if state.reply.is_some() => {
                let e = ClusterError::Runtime(format!("the worker actor stopped: {reason:?}"));
                state.finish(&myself, Err(e));
            }
            _ => {}
        }
        Ok(())
    }
}
