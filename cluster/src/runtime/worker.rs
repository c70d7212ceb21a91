//! The worker actor: runs its executor's items one at a time on a blocking thread.
//!
//! The executor moves into `spawn_blocking` with the item and comes back with the result as a
//! message, so the actor's mailbox stays free while an item runs: assignments queue up, and the
//! heartbeat interval keeps ticking even when `execute` takes seconds.

use std::{collections::VecDeque, panic::AssertUnwindSafe, time::Duration};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{coordinator::CoordinatorMsg, peer::LinkMsg, Executor};
use crate::membership::MemberKey;

/// Where a worker's results and heartbeats go.
pub(crate) enum Sink {
    /// The coordinator of this process (local mode), tagged with the worker's key.
    Coordinator {
        /// The coordinator.
        coordinator: ActorRef<CoordinatorMsg>,
        /// This worker's key in the coordinator's membership and scheduler.
        key: MemberKey,
    },
    /// The link to a remote coordinator (worker process).
    Link(ActorRef<LinkMsg>),
}

impl Sink {
    fn result(&self, item: u64, result: Result<Vec<u8>, String>) {
        let sent = match self {
            Sink::Coordinator { coordinator, key } => {
                coordinator.send_message(CoordinatorMsg::Result { key: *key, item, result }).is_ok()
            }
            Sink::Link(link) => link.send_message(LinkMsg::WorkerResult { item, result }).is_ok(),
        };
        if !sent {
            debug!(item, "result dropped: its receiver is gone");
        }
    }

    fn heartbeat(&self) {
        let _ = match self {
            Sink::Coordinator { coordinator, key } => {
                coordinator.send_message(CoordinatorMsg::Heartbeat { key: *key }).is_ok()
            }
            Sink::Link(link) => link.send_message(LinkMsg::WorkerBeat).is_ok(),
        };
    }
}

/// Messages of the worker actor.
pub(crate) enum WorkerMsg {
    /// Run this item (queued behind the running one).
    Assign {
        /// Item index.
        item: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The blocking thread finished an item and hands the executor back.
    Executed {
        /// Item index.
        item: u64,
        /// The executor's outcome.
        result: Result<Vec<u8>, String>,
        /// The executor, for the next item.
        executor: Box<dyn Executor>,
    },
    /// Time to send a heartbeat.
    Beat,
    /// The run is over: stop.
    Done,
}

/// Start-up arguments of a worker actor.
pub(crate) struct WorkerArgs {
    pub(crate) name: String,
    pub(crate) executor: Box<dyn Executor>,
    pub(crate) sink: Sink,
    pub(crate) heartbeat: Duration,
}

/// State of a worker actor.
pub(crate) struct WorkerState {
    name: String,
    /// `None` while an item runs on the blocking thread.
    executor: Option<Box<dyn Executor>>,
    /// The executor's read-ahead hook, if it has one.
    prefetch: Option<super::Prefetcher>,
    queue: VecDeque<(u64, Vec<u8>)>,
    sink: Sink,
    beats: JoinHandle<()>,
}

/// The worker actor (stateless handler; state built in `pre_start`).
pub(crate) struct Worker;

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        let beats = myself.send_interval(args.heartbeat, || WorkerMsg::Beat);
        args.sink.heartbeat();
        Ok(WorkerState {
            name: args.name,
            prefetch: args.executor.prefetcher(),
            executor: Some(args.executor),
            queue: VecDeque::new(),
            sink: args.sink,
            beats,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WorkerMsg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        state.beats.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Assign { item, payload } => {
                debug!(worker = %state.name, item, "item queued");
                // Busy: let the executor start on this item's inputs while it waits.
                if state.executor.is_none() || !state.queue.is_empty() {
                    if let Some(prefetch) = &state.prefetch {
                        prefetch(&payload);
                    }
                }
                state.queue.push_back((item, payload));
            }
            WorkerMsg::Executed { item, result, executor } => {
                debug!(worker = %state.name, item, ok = result.is_ok(), "item executed");
                state.executor = Some(executor);
                state.sink.result(item, result);
            }
            WorkerMsg::Beat => state.sink.heartbeat(),
            WorkerMsg::Done => {
                myself.stop(Some("run finished".into()));
                return Ok(());
            }
        }
        start_next(&myself, state);
        Ok(())
    }
}

/// Starts the next queued item if the executor is free.
fn start_next(myself: &ActorRef<WorkerMsg>, state: &mut WorkerState) {
    if state.executor.is_none() {
        return;
    }
    let Some((item, payload)) = state.queue.pop_front() else {
        return;
    };
    let Some(mut executor) = state.executor.take() else {
        return;
    };
    let me = myself.clone();
    let blocking = tokio::task::spawn_blocking(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| executor.execute(&payload)))
            .unwrap_or_else(|panic| Err(format!("executor panicked: {}", panic_text(&*panic))));
        (result, executor)
    });
    tokio::spawn(async move {
        match blocking.await {
            Ok((result, executor)) => {
                let _ = me.send_message(WorkerMsg::Executed { item, result, executor });
            }
            // Only when the runtime shuts down (the panic itself is caught above).
            Err(e) => debug!(item, error = %e, "blocking task ended without a result"),
        }
    });
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic payload".into()
    }
}
