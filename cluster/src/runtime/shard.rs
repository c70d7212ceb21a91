//! The dataset-shard actor (DESIGN.md §4): owns one shard's loader, keeps its most recently
//! used decoded batches in memory, reads ahead, and serves batches to any number of clients.
//!
//! The loader (decode + preprocess, model-agnostic bytes here) runs on a blocking thread, one
//! batch at a time; concurrent requests for the same batch share one load. After serving batch
//! `i`, the actor loads `i + 1 ..= i + prefetch` in the background, so a client walking the shard
//! in order mostly finds its next batch ready.
//!
//! ```no_run
//! # use fusion_cluster::runtime::{Shard, ShardLoader, ShardOptions};
//! struct Numbers;
//! impl ShardLoader for Numbers {
//!     fn batches(&self) -> usize { 100 }
//!     fn load(&mut self, batch: usize) -> Result<Vec<u8>, String> { Ok(vec![batch as u8; 4]) }
//! }
//! # async fn demo() -> Result<(), fusion_cluster::runtime::ClusterError> {
//! let shard = Shard::spawn(Box::new(Numbers), ShardOptions::default()).await?;
//! let batch = shard.batch(3).await?; // an Arc<Vec<u8>>
//! shard.stop();
//! # let _ = batch; Ok(()) }
//! ```

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    sync::Arc,
};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tracing::debug;

use super::ClusterError;

/// Loads one batch of a shard (decode + preprocess). Called on a blocking thread, one batch at
/// a time; a panic is caught and reported as that batch's error.
pub trait ShardLoader: Send + 'static {
    /// Number of batches in the shard; batches are numbered `0..batches()`.
    fn batches(&self) -> usize;
    /// Loads batch `batch` (below [`ShardLoader::batches`]).
    fn load(&mut self, batch: usize) -> Result<Vec<u8>, String>;
}

/// Cache and read-ahead settings of a [`Shard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOptions {
    /// Decoded batches kept in memory (least recently used evicted first). Default 8.
    pub cache_batches: usize,
    /// Batches loaded ahead after each request. Default 2; 0 turns read-ahead off.
    pub prefetch: usize,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self { cache_batches: 8, prefetch: 2 }
    }
}

/// Counts of a shard's work, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardStats {
    /// Batches loaded (read-ahead included).
    pub loads: usize,
    /// Requests answered from memory without waiting for a load.
    pub hits: usize,
    /// Requests in all.
    pub requests: usize,
}

type Reply = oneshot::Sender<Result<Arc<Vec<u8>>, String>>;

/// Messages of the shard actor.
pub(crate) enum ShardMsg {
    Get { batch: usize, reply: Reply },
    Loaded { batch: usize, result: Result<Vec<u8>, String>, loader: Box<dyn ShardLoader> },
    Stats(oneshot::Sender<ShardStats>),
}

/// State of the shard actor.
pub(crate) struct ShardState {
    /// `None` while a batch loads on the blocking thread.
    loader: Option<Box<dyn ShardLoader>>,
    batches: usize,
    opts: ShardOptions,
    cache: HashMap<usize, Arc<Vec<u8>>>,
    /// Cached batches, least recently used first.
    recency: VecDeque<usize>,
    /// Requests waiting for a batch being (or to be) loaded.
    waiting: HashMap<usize, Vec<Reply>>,
    /// Batches to load, in order; the one loading is not in it.
    todo: VecDeque<usize>,
    loading: Option<usize>,
    stats: ShardStats,
}

/// The shard actor (stateless handler).
pub(crate) struct ShardActor;

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = (Box<dyn ShardLoader>, ShardOptions);

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        (loader, opts): (Box<dyn ShardLoader>, ShardOptions),
    ) -> Result<ShardState, ActorProcessingErr> {
        Ok(ShardState {
            batches: loader.batches(),
            loader: Some(loader),
            opts: ShardOptions { cache_batches: opts.cache_batches.max(1), ..opts },
            cache: HashMap::new(),
            recency: VecDeque::new(),
            waiting: HashMap::new(),
            todo: VecDeque::new(),
            loading: None,
            stats: ShardStats::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Get { batch, reply } => {
                state.stats.requests += 1;
                if batch >= state.batches {
                    let n = state.batches;
                    let _ = reply.send(Err(format!("batch {batch} out of range: {n} batches")));
                    return Ok(());
                }
                if let Some(data) = state.cache.get(&batch).cloned() {
                    state.stats.hits += 1;
                    state.touch(batch);
                    let _ = reply.send(Ok(data));
                } else {
                    state.waiting.entry(batch).or_default().push(reply);
                    state.want(batch, true);
                }
                for next in batch + 1..=batch + state.opts.prefetch {
                    if next < state.batches {
                        state.want(next, false);
                    }
                }
            }
            ShardMsg::Loaded { batch, result, loader } => {
                debug!(batch, ok = result.is_ok(), "shard batch loaded");
                state.loader = Some(loader);
                state.loading = None;
                state.stats.loads += 1;
                let answer = result.map(Arc::new);
                if let Ok(data) = &answer {
                    state.cache.insert(batch, data.clone());
                    state.touch(batch);
                    while state.recency.len() > state.opts.cache_batches {
                        if let Some(old) = state.recency.pop_front() {
                            state.cache.remove(&old);
                        }
                    }
                }
                for reply in state.waiting.remove(&batch).unwrap_or_default() {
                    let _ = reply.send(answer.clone());
                }
            }
            ShardMsg::Stats(reply) => {
                let _ = reply.send(state.stats);
            }
        }
        state.start_next(&myself);
        Ok(())
    }
}

impl ShardState {
    fn touch(&mut self, batch: usize) {
        self.recency.retain(|&b| b != batch);
        self.recency.push_back(batch);
    }

    /// Queues a load of `batch` unless it is cached, loading or queued; `urgent` goes first.
    fn want(&mut self, batch: usize, urgent: bool) {
        if self.cache.contains_key(&batch) || self.loading == Some(batch) {
            return;
        }
        if let Some(pos) = self.todo.iter().position(|&b| b == batch) {
            if urgent {
                self.todo.remove(pos);
                self.todo.push_front(batch);
            }
            return;
        }
        if urgent {
            self.todo.push_front(batch);
        } else {
            self.todo.push_back(batch);
        }
    }

    fn start_next(&mut self, myself: &ActorRef<ShardMsg>) {
        if self.loader.is_none() {
            return;
        }
        let Some(batch) = self.todo.pop_front() else {
            return;
        };
        let Some(mut loader) = self.loader.take() else {
            return;
        };
        self.loading = Some(batch);
        let me = myself.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| loader.load(batch)))
                .unwrap_or_else(|_| Err(format!("the shard loader panicked on batch {batch}")));
            (result, loader)
        });
        tokio::spawn(async move {
            if let Ok((result, loader)) = blocking.await {
                let _ = me.send_message(ShardMsg::Loaded { batch, result, loader });
            }
        });
    }
}

/// A handle to a running shard actor; clone it freely (every clone talks to the same actor).
#[derive(Clone)]
pub struct Shard {
    actor: ActorRef<ShardMsg>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("actor", &self.actor.get_id()).finish()
    }
}

fn gone() -> ClusterError {
    ClusterError::Runtime("the shard actor is gone".into())
}

impl Shard {
    /// Starts a shard actor over `loader`. Must be called inside a tokio runtime.
    pub async fn spawn(
        loader: Box<dyn ShardLoader>,
        opts: ShardOptions,
    ) -> Result<Self, ClusterError> {
        let (actor, _) = Actor::spawn(None, ShardActor, (loader, opts))
            .await
            .map_err(|e| ClusterError::Runtime(format!("cannot start a shard actor: {e}")))?;
        Ok(Self { actor, runtime: tokio::runtime::Handle::current() })
    }

    /// Batch `batch`, from memory or once loaded. A loader error (or an out-of-range batch) is
    /// [`ClusterError::Shard`].
    pub async fn batch(&self, batch: usize) -> Result<Arc<Vec<u8>>, ClusterError> {
        let (reply, answer) = oneshot::channel();
        self.actor.send_message(ShardMsg::Get { batch, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(|error| ClusterError::Shard { batch, error })
    }

    /// [`Shard::batch`] for synchronous code on a blocking thread (e.g. inside
    /// [`Executor::execute`](super::Executor::execute)). Panics if called on an async worker
    /// thread of the runtime.
    pub fn batch_blocking(&self, batch: usize) -> Result<Arc<Vec<u8>>, ClusterError> {
        self.runtime.block_on(self.batch(batch))
    }

    /// The shard's counters so far.
    pub async fn stats(&self) -> Result<ShardStats, ClusterError> {
        let (reply, answer) = oneshot::channel();
        self.actor.send_message(ShardMsg::Stats(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    /// Stops the actor; later requests fail with [`ClusterError::Runtime`].
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
