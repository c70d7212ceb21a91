//! Data-parallel router training over a ring of the job's processes.
//!
//! Each step's items (one batch per task, in pool order) are split into contiguous blocks, one
//! per process in rank order (the coordinator's own executor is rank 0, the remote workers follow
//! in joining order). Every process computes its block's router gradients, and the ring sums all
//! of them in item order ([`fusion_cluster::collectives::Ring::reduce_parts`]): the sequential
//! float32 fold of the items' gradients, the same bits for any number of processes and any
//! split. Every process then holds the step's gradient and, once the driver commits the step,
//! applies the same Adam update (on the CPU, so every process keeps the same bits whatever its
//! device). Per step, only a few bytes go to and from the coordinator; the gradients travel
//! between neighbours (each process sends about twice the router size).
//!
//! A step runs as one pinned round ([`fusion_cluster::runtime::Job::round_pinned`]). The ring of a
//! set of processes is one generation: the driver asks each process for its ring port
//! ([`RouterWork::Hello`]), hands every one the layout with its step item, and broadcasts the
//! routers and Adam's state ([`RouterBroadcast::Full`]) so every process starts the generation
//! from the driver's state. When a process is lost, or joins, the step fails or the membership
//! changed; the driver forms a new generation with the processes left and recomputes the step
//! from the last committed state (a rank that had already summed it drops that sum).
//!
//! Alone (no remote worker) the executor sums its items itself
//! ([`fusion_cluster::collectives::ring::sequential_sum`], the ring's own fold): no network.
//!
//! # Relay through the coordinator
//!
//! The ring needs every process to reach its neighbours; the job only needs each to reach the
//! coordinator. When the workers cannot reach each other (a firewall that opens only the
//! coordinator's port, a cut link between two nodes), every ring attempt fails while every
//! process stays joined. After [`RING_FAILURES_BEFORE_RELAY`] such attempts in a row
//! ([`RingFallback`]) the driver stops using the ring for the rest of the run and relays the
//! gradients through the coordinator instead ([`Exchange::Coordinator`], with a warning): each
//! process computes the same contiguous block, but as one item per task
//! ([`RouterWork::Relay`], answered with the item's own gradient); the driver folds all the
//! items' gradients in item order with the ring's fold ([`relay_sum`], the same bits as the
//! ring's and a single process's), applies Adam, and hands the sum to every process with the
//! commit ([`RouterBroadcast::CommitSum`]), so each applies the same update. A process that joins
//! or is lost still makes the driver hand out a [`RouterBroadcast::Full`] first (a new
//! generation, without ring ports). Per step each worker then sends its items' gradients to the
//! coordinator and receives the sum: the coordinator's link carries what the ring spread over
//! the neighbours. A resumed run starts on the ring again.

use super::step::{f32_bytes, StepItem, StepResult};
use crate::tta::adam::AdamState;
use anyhow::bail;
use fusion_cluster::runtime::ring_member::RingLayout;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// What an executor's error says when its ring failed (a rank was lost): the driver re-forms the
/// ring and recomputes the step instead of failing the run.
pub const RING_FAILED: &str = "worker ring failed: ";

/// An item of the router training's rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RouterWork {
    /// Bind this process's ring endpoint (once) and say where it is ([`Hello`]).
    Hello,
    /// Rank `rank` of `layout`: compute `mine` (a contiguous block of step `step`'s items, in
    /// item order), sum every rank's gradients over the ring, and hold the sum until the driver
    /// commits the step ([`RouterBroadcast::Commit`]). Answered with a [`BlockResult`].
    Step {
        /// The ring's processes (`None`: this process computes alone).
        layout: Option<RingLayout>,
        /// This process's rank.
        rank: u32,
        /// The step (the routers must be those of this step).
        step: u64,
        /// This rank's items.
        mine: Vec<StepItem>,
    },
    /// Relay mode ([`Exchange::Coordinator`]): compute this one item and answer with its loss
    /// and gradient ([`StepResult`]); the driver sums them.
    Relay(StepItem),
}

/// A process's answer to [`RouterWork::Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The ring endpoint's port (bound on every interface).
    pub port: u16,
    /// A remote worker: its address towards the coordinator, and the coordinator's address as
    /// it reaches it (where the other processes reach the coordinator's ring endpoint).
    pub remote: Option<(IpAddr, IpAddr)>,
}

/// A rank's answer to [`RouterWork::Step`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockResult {
    /// Each of its items' entropy, in item order.
    pub losses: Vec<f32>,
    /// Seconds computing the items.
    pub compute_seconds: f64,
    /// Seconds in the ring's reduction (including waiting for the ranks before it).
    pub reduce_seconds: f64,
}

/// What the driver broadcasts to every executor of the router training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RouterBroadcast {
    /// The routers and Adam's state at step `step`: every executor (re)starts from them and
    /// drops any sum it holds.
    Full {
        /// Updates applied so far.
        step: u64,
        /// Every router tensor, flattened, in state-dict order.
        #[serde(with = "f32_bytes")]
        values: Vec<f32>,
        /// Adam's steps taken.
        adam_steps: u64,
        /// Adam's first moments, flattened like `values`.
        #[serde(with = "f32_bytes")]
        exp_avg: Vec<f32>,
        /// Adam's second moments, flattened like `values`.
        #[serde(with = "f32_bytes")]
        exp_avg_sq: Vec<f32>,
    },
    /// Every rank holds the sum of step `step − 1`: apply Adam with it, reaching step `step`.
    Commit {
        /// The step reached.
        step: u64,
    },
    /// Relay mode: `sum` is the summed gradient of step `step − 1` (the driver's fold of every
    /// item's): apply Adam with it, reaching step `step`.
    CommitSum {
        /// The step reached.
        step: u64,
        /// The summed router gradient, flattened like the routers.
        #[serde(with = "f32_bytes")]
        sum: Vec<f32>,
    },
}

impl RouterBroadcast {
    /// [`RouterBroadcast::Full`] from per-tensor Adam states (flattened in tensor order).
    pub fn full(step: u64, values: Vec<f32>, adams: &[AdamState]) -> Self {
        let adam_steps = adams.first().map_or(0, |a| a.step);
        let exp_avg = adams.iter().flat_map(|a| a.exp_avg.iter().copied()).collect();
        let exp_avg_sq = adams.iter().flat_map(|a| a.exp_avg_sq.iter().copied()).collect();
        Self::Full { step, values, adam_steps, exp_avg, exp_avg_sq }
    }
}

/// Ring attempts in a row that fail ([`RING_FAILED`]) with every process of the generation still
/// joined before the driver relays the gradients through the coordinator for the rest of the run.
/// Two: a single failure may be a process lost that the coordinator has not noticed yet (the
/// next attempt's formation then fails on it, which is not counted); a second attempt failing
/// on the ring after every process answered the new generation's formation means the processes
/// are alive but some cannot reach each other.
pub const RING_FAILURES_BEFORE_RELAY: usize = 2;

/// How a step's gradients are summed across the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Over the ring between the processes ([`RouterWork::Step`]).
    Ring,
    /// Through the coordinator ([`RouterWork::Relay`], [`RouterBroadcast::CommitSum`]).
    Coordinator,
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exchange::Ring => "ring",
            Exchange::Coordinator => "coordinator",
        })
    }
}

/// Decides when the ring gives way to the coordinator relay (a pure state machine; the driver
/// feeds it each step attempt's outcome).
#[derive(Debug, Clone)]
pub struct RingFallback {
    exchange: Exchange,
    /// Ring failures in a row with every process still joined.
    isolated: usize,
}

impl Default for RingFallback {
    fn default() -> Self {
        Self { exchange: Exchange::Ring, isolated: 0 }
    }
}

impl RingFallback {
    /// The exchange to use now.
    pub fn exchange(&self) -> Exchange {
        self.exchange
    }

    /// A step attempt on the ring failed with [`RING_FAILED`] and every process of its generation
    /// is still joined. `true` when this switches to [`Exchange::Coordinator`] (the
    /// [`RING_FAILURES_BEFORE_RELAY`]th in a row); from then on the exchange stays there.
    pub fn ring_failed_all_joined(&mut self) -> bool {
        if self.exchange == Exchange::Coordinator {
            return false;
        }
        self.isolated += 1;
        if self.isolated >= RING_FAILURES_BEFORE_RELAY {
            self.exchange = Exchange::Coordinator;
            return true;
        }
        false
    }

    /// Anything else: a step done, a process lost or joined, a formation failed. The count of
    /// ring failures in a row starts over (the exchange does not change back).
    pub fn reset(&mut self) {
        self.isolated = 0;
    }
}

/// Relay mode: the step's gradient, the ring's fold
/// ([`fusion_cluster::collectives::ring::sequential_sum`]) of every item's gradient in item order
/// (`results` are the items' answers in item order), so the same bits as the ring's sum.
/// `floats` is the routers' size; an item's gradient of another size is an error.
pub fn relay_sum(results: &[StepResult], floats: usize) -> anyhow::Result<Vec<f32>> {
    if let Some((i, r)) = results.iter().enumerate().find(|(_, r)| r.grad.len() != floats) {
        bail!("item {i}'s gradient has {} values for routers of {floats}", r.grad.len());
    }
    let parts: Vec<&[f32]> = results.iter().map(|r| r.grad.as_slice()).collect();
    Ok(fusion_cluster::collectives::ring::sequential_sum(&parts, floats))
}

/// `n` items split into `ranks` contiguous blocks in order, the first `n mod ranks` one item
/// longer: each rank's range of item indices.
pub fn blocks(n: usize, ranks: usize) -> Vec<std::ops::Range<usize>> {
    let ranks = ranks.max(1);
    let (base, rem) = (n / ranks, n % ranks);
    let mut at = 0;
    (0..ranks)
        .map(|r| {
            let len = base + usize::from(r < rem);
            let range = at..at + len;
            at += len;
            range
        })
        .collect()
}

/// The ring addresses of the processes from their [`Hello`]s, in rank order (the coordinator's
/// own executor first, at the address the first remote worker reaches the coordinator by).
/// `None` for a process alone.
pub fn layout(generation: u64, hellos: &[Hello]) -> anyhow::Result<Option<RingLayout>> {
    if hellos.len() < 2 {
        return Ok(None);
    }
    let coordinator_ip = hellos[1..]
        .iter()
        .find_map(|h| h.remote.map(|(_, c)| c))
        .ok_or_else(|| anyhow::anyhow!("no remote worker said where it reaches the coordinator"))?;
    let addrs = hellos
        .iter()
        .enumerate()
        .map(|(rank, h)| match (rank, h.remote) {
            (0, _) => Ok(SocketAddr::new(coordinator_ip, h.port)),
            (_, Some((ip, _))) => Ok(SocketAddr::new(ip, h.port)),
            (_, None) => Err(anyhow::anyhow!("rank {rank} is not a remote worker")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(RingLayout { generation, addrs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion_cluster::collectives::ring::sequential_sum;

    #[test]
    fn blocks_are_contiguous_and_balanced() {
        assert_eq!(blocks(8, 3), vec![0..3, 3..6, 6..8]);
        assert_eq!(blocks(2, 3), vec![0..1, 1..2, 2..2]);
        assert_eq!(blocks(5, 1), vec![0..5]);
        assert_eq!(blocks(0, 2), vec![0..0, 0..0]);
    }

    #[test]
    fn the_layout_puts_the_coordinator_where_workers_reach_it() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let hellos = [
            Hello { port: 5000, remote: None },
            Hello { port: 6000, remote: Some((ip("10.0.0.2"), ip("10.0.0.1"))) },
            Hello { port: 7000, remote: Some((ip("10.0.0.3"), ip("10.0.0.1"))) },
        ];
        let l = layout(4, &hellos).unwrap().unwrap();
        assert_eq!(l.generation, 4);
        let want: Vec<SocketAddr> = ["10.0.0.1:5000", "10.0.0.2:6000", "10.0.0.3:7000"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(l.addrs, want);
        assert!(layout(1, &hellos[..1]).unwrap().is_none());
        let bad = [hellos[0], Hello { port: 1, remote: None }];
        assert!(layout(1, &bad).is_err());
    }

    #[test]
    fn two_ring_failures_in_a_row_switch_to_the_coordinator_for_good() {
        let mut f = RingFallback::default();
        assert_eq!(f.exchange(), Exchange::Ring);
        // A failure, then anything else (a lost process, a step done): the count starts over.
        assert!(!f.ring_failed_all_joined());
        f.reset();
        assert!(!f.ring_failed_all_joined());
        assert_eq!(f.exchange(), Exchange::Ring);
        // The second in a row switches, once; nothing switches back.
        assert!(f.ring_failed_all_joined());
        assert_eq!(f.exchange(), Exchange::Coordinator);
        assert!(!f.ring_failed_all_joined());
        f.reset();
        assert_eq!(f.exchange(), Exchange::Coordinator);
        assert_eq!(
            (Exchange::Ring.to_string(), Exchange::Coordinator.to_string()),
            ("ring".into(), "coordinator".into())
        );
    }

    /// The relay's sum is the ring's: for items spread over 1 to 4 ranks in contiguous blocks
    /// (ranks without items included), `Ring::reduce_parts` over an in-memory ring gives the bits
    /// of [`relay_sum`] over the items in order.
    #[test]
    fn the_relay_sum_has_the_ring_sum_bits() {
        use fusion_cluster::collectives::{memory_ring, Ring, RingConfig};
        let len = 300;
        let mut x = 0x2545_f491_u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 10f32.powi((x % 9) as i32 - 4)
        };
        let items: Vec<StepResult> = (0..5)
            .map(|_| StepResult {
                loss: 0.0,
                grad: (0..len).map(|_| next()).collect(),
                seconds: 0.0,
            })
            .collect();
        let relayed = relay_sum(&items, len).unwrap();
        let reversed: Vec<f32> =
            (0..len).map(|i| items.iter().rev().map(|r| r.grad[i]).sum()).collect();
        assert_ne!(
            reversed, relayed,
            "the inputs must be order-sensitive for the test to mean anything"
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let config = RingConfig { chunk_floats: 64, timeout: None };
        for ranks in 1..=4 {
            let sums = rt.block_on(async {
                let handles: Vec<_> = memory_ring(ranks, 2)
                    .into_iter()
                    .zip(blocks(items.len(), ranks))
                    .enumerate()
                    .map(|(rank, ((send, recv), range))| {
                        let mine: Vec<Vec<f32>> =
                            items[range].iter().map(|r| r.grad.clone()).collect();
                        tokio::spawn(async move {
                            let parts: Vec<&[f32]> = mine.iter().map(Vec::as_slice).collect();
                            let mut ring = Ring::new(rank, ranks, send, recv, config).unwrap();
                            let mut out = vec![0f32; len];
                            ring.reduce_parts(&parts, &mut out).await.unwrap();
                            out
                        })
                    })
                    .collect();
                let mut sums = Vec::new();
                for h in handles {
                    sums.push(h.await.unwrap());
                }
                sums
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for sum in sums {
                assert_eq!(bits(&sum), bits(&relayed), "{ranks} ranks");
            }
        }
        let short = [StepResult { loss: 0.0, grad: vec![1.0], seconds: 0.0 }];
        assert!(relay_sum(&short, 2).unwrap_err().to_string().contains("item 0"));
    }

    #[test]
    fn folding_parts_is_left_to_right_in_float32() {
        assert_eq!(sequential_sum(&[&[1e8], &[1.0], &[-1e8]], 1), vec![0.0]);
        assert_eq!(sequential_sum(&[], 2), vec![0.0, 0.0]);
        let full = RouterBroadcast::full(
            3,
            vec![1.0, 2.0, 3.0],
            &[
                AdamState { step: 3, exp_avg: vec![0.5], exp_avg_sq: vec![0.25] },
                AdamState { step: 3, exp_avg: vec![1.5, 2.5], exp_avg_sq: vec![3.5, 4.5] },
            ],
        );
        let back: RouterBroadcast =
            fusion_cluster::codec::decode(&fusion_cluster::codec::encode(&full).unwrap()).unwrap();
        assert_eq!(back, full);
        match back {
            RouterBroadcast::Full { adam_steps, exp_avg, exp_avg_sq, .. } => {
                assert_eq!(
                    (adam_steps, exp_avg, exp_avg_sq),
                    (3, vec![0.5, 1.5, 2.5], vec![0.25, 3.5, 4.5])
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
