//! The worker actor: runs its executor's items one at a time (or, when the executor batches,
//! [`Executor::batch_limit`], a run of consecutive queued items of one round at a time) on a
//! blocking thread.
//!
//! The executor moves into `spawn_blocking` with the item and comes back with the result as a
//! message, so the actor's mailbox stays free while an item runs: assignments queue up, and the
//! heartbeat interval keeps ticking even when `execute` takes seconds.
//!
//! Rounds are nearly invisible here: an item carries its round number, which goes back with its
//! result; `Cancel` drops the queued items of a failed round. A broadcast state is queued like an
//! item, so the executor applies it after the items assigned before it and before later ones.
//! The executor (and whatever it caches) lives as long as the worker: across rounds.

use std::{collections::VecDeque, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

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
    fn result(&self, round: u64, item: u64, result: Result<Vec<u8>, String>) {
        let sent = match self {
            Sink::Coordinator { coordinator, key } => coordinator
                .send_message(CoordinatorMsg::Result { key: *key, round, item, result })
                .is_ok(),
            Sink::Link(link) => {
                link.send_message(LinkMsg::WorkerResult { round, item, result }).is_ok()
            }
        };
        if !sent {
            debug!(round, item, "result dropped: its receiver is gone");
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

/// One queued piece of work.
enum Task {
    /// An item of round `round`.
    Item { round: u64, item: u64, payload: Vec<u8> },
    /// A state blob for [`Executor::on_broadcast`].
    Broadcast(Arc<Vec<u8>>),
}

/// What the blocking thread did.
pub(crate) enum Outcome {
    /// The results of a run of items of one round, in their order.
    Items { round: u64, results: Vec<(u64, Result<Vec<u8>, String>)> },
    /// [`Executor::on_broadcast`]'s verdict.
    Broadcast(Result<(), String>),
}

/// Messages of the worker actor.
pub(crate) enum WorkerMsg {
    /// Run these items of one round, in this order (queued behind the running ones).
    Assign {
        /// The items' round.
        round: u64,
        /// Item indices within their round, with their payloads.
        items: Vec<(u64, Vec<u8>)>,
    },
    /// Hand this state to the executor, in order with the items.
    Broadcast(Arc<Vec<u8>>),
    /// Drop the queued items of rounds up to this one.
    Cancel {
        /// The last cancelled round.
        round: u64,
    },
    /// The blocking thread finished a task and hands the executor back.
    Executed {
        /// What it did.
        outcome: Outcome,
        /// The executor, for the next task.
        executor: Box<dyn Executor>,
    },
    /// Time to send a heartbeat.
    Beat,
    /// The job is over: apply the broadcast states queued before this (a driver's last state,
    /// such as trained weights, reaches every worker), drop the queued items, stop.
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
    /// `None` while a task runs on the blocking thread.
    executor: Option<Box<dyn Executor>>,
    /// The executor's read-ahead hook, if it has one.
    prefetch: Option<super::Prefetcher>,
    /// [`Executor::batch_limit`], at least 1.
    batch: usize,
    queue: VecDeque<Task>,
    /// Why the executor refused the last broadcast state, if it did: every item fails with it
    /// until a later broadcast is accepted (it would compute on a stale state).
    refused_state: Option<String>,
    sink: Sink,
    beats: JoinHandle<()>,
    /// `Done` arrived while broadcast states were still queued or being applied: stop once
    /// they are.
    done: bool,
    /// A broadcast state is being applied on the blocking thread.
    applying: bool,
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
            batch: args.executor.batch_limit().max(1),
            executor: Some(args.executor),
            queue: VecDeque::new(),
            refused_state: None,
            sink: args.sink,
            beats,
            done: false,
            applying: false,
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
            WorkerMsg::Assign { round, items } => {
                for (item, payload) in items {
                    debug!(worker = %state.name, round, item, "item queued");
                    // Waiting behind another one (that is not batched with it): let the
                    // executor start on this item's inputs meanwhile.
                    let waits = state.executor.is_none() || state.queue.len() >= state.batch;
                    if waits {
                        if let Some(prefetch) = &state.prefetch {
                            prefetch(&payload);
                        }
                    }
                    state.queue.push_back(Task::Item { round, item, payload });
                }
            }
            WorkerMsg::Broadcast(blob) => {
                debug!(worker = %state.name, bytes = blob.len(), "broadcast state queued");
                state.queue.push_back(Task::Broadcast(blob));
            }
            WorkerMsg::Cancel { round: last } => {
                let before = state.queue.len();
                state.queue.retain(|t| !matches!(t, Task::Item { round, .. } if *round <= last));
                let dropped = before - state.queue.len();
                debug!(worker = %state.name, round = last, dropped, "round cancelled");
            }
            WorkerMsg::Executed { outcome, executor } => {
                state.executor = Some(executor);
                state.applying = false;
                match outcome {
                    Outcome::Items { round, results } => {
                        for (item, result) in results {
                            debug!(worker = %state.name, round, item, ok = result.is_ok(), "item executed");
                            state.sink.result(round, item, result);
                        }
                    }
                    Outcome::Broadcast(Ok(())) => {
                        debug!(worker = %state.name, "broadcast state applied");
                        state.refused_state = None;
                    }
                    Outcome::Broadcast(Err(e)) => {
                        warn!(worker = %state.name, error = %e, "the executor refused the broadcast state; its items will fail");
                        state.refused_state = Some(e);
                    }
                }
            }
            WorkerMsg::Beat => state.sink.heartbeat(),
            WorkerMsg::Done => {
                state.queue.retain(|t| matches!(t, Task::Broadcast(_)));
                state.done = true;
            }
        }
        // A running item is not waited for (its round is over); a broadcast being applied is.
        if state.done && state.queue.is_empty() && !state.applying {
            debug!(worker = %state.name, "job finished");
            myself.stop(Some("job finished".into()));
            return Ok(());
        }
        start_next(&myself, state);
        Ok(())
    }
}

/// Starts the next queued task if the executor is free.
fn start_next(myself: &ActorRef<WorkerMsg>, state: &mut WorkerState) {
    while state.executor.is_some() {
        let Some(task) = state.queue.pop_front() else {
            return;
        };
        if let (Task::Item { round, item, .. }, Some(refused)) = (&task, &state.refused_state) {
            let error = format!("the executor refused the last broadcast state: {refused}");
            state.sink.result(*round, *item, Err(error));
            continue;
        }
        let Some(mut executor) = state.executor.take() else {
            return;
        };
        // A run of consecutive items of the same round, up to the executor's batch.
        let task = match task {
            Task::Item { round, item, payload } => {
                let mut run = vec![(item, payload)];
                while run.len() < state.batch {
                    match state.queue.front() {
                        Some(Task::Item { round: r, .. }) if *r == round => {}
                        _ => break,
                    }
                    if let Some(Task::Item { item, payload, .. }) = state.queue.pop_front() {
                        run.push((item, payload));
                    }
                }
                Run::Items { round, run }
            }
            Task::Broadcast(blob) => {
                state.applying = true;
                Run::Broadcast(blob)
            }
        };
        let me = myself.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let outcome = match task {
                Run::Items { round, run } => {
                    Outcome::Items { round, results: execute(&mut *executor, run) }
                }
                Run::Broadcast(blob) => Outcome::Broadcast(caught(|| executor.on_broadcast(&blob))),
            };
            (outcome, executor)
        });
        tokio::spawn(async move {
            match blocking.await {
                Ok((outcome, executor)) => {
                    let _ = me.send_message(WorkerMsg::Executed { outcome, executor });
                }
                // Only when the runtime shuts down (the panic itself is caught above).
                Err(e) => debug!(error = %e, "blocking task ended without a result"),
            }
        });
    }
}

/// What one trip to the blocking thread runs.
enum Run {
    /// Items of one round, in order.
    Items { round: u64, run: Vec<(u64, Vec<u8>)> },
    /// A broadcast state.
    Broadcast(Arc<Vec<u8>>),
}

/// Runs a run of items: one alone through [`Executor::execute`], several through
/// [`Executor::execute_batch`]. A panic fails every item of the run; a wrong number of results
/// too.
fn execute(
    executor: &mut dyn Executor,
    run: Vec<(u64, Vec<u8>)>,
) -> Vec<(u64, Result<Vec<u8>, String>)> {
    if let [(item, payload)] = run.as_slice() {
        return vec![(*item, caught(|| executor.execute(payload)))];
    }
    let payloads: Vec<&[u8]> = run.iter().map(|(_, p)| p.as_slice()).collect();
    let results = std::panic::catch_unwind(AssertUnwindSafe(|| executor.execute_batch(&payloads)))
        .map_err(|panic| format!("executor panicked: {}", panic_text(&*panic)))
        .and_then(|results| {
            if results.len() == run.len() {
                Ok(results)
            } else {
                Err(format!("the executor gave {} results for {} items", results.len(), run.len()))
            }
        });
    match results {
        Ok(results) => run.iter().map(|(item, _)| *item).zip(results).collect(),
        Err(e) => run.iter().map(|(item, _)| (*item, Err(e.clone()))).collect(),
    }
}

/// Runs `f`, turning a panic into an `Err` naming it.
fn caught<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(format!("executor panicked: {}", panic_text(&*panic))))
}

pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic payload".into()
    }
}
