//! FusionBench's test-time batches under DDP (`fabric.devices = N > 1`), replayed.
//!
//! There Lightning Fabric's `setup_dataloaders` replaces each shuffled loader's sampler by a
//! `DistributedSampler(dataset, num_replicas=N, rank=r, shuffle=True, seed=PL_GLOBAL_SEED)`
//! (`PL_GLOBAL_SEED` is the program's `seed`, 0 without one), and every `iter()` of the Fabric
//! loader calls `sampler.set_epoch(k)`, `k` counting the passes begun before. That happens in
//! the body of `_FabricDataLoader.__iter__`, a generator, so only when an iterator yields its
//! first batch: the iterator that `InfiniteDataLoader.__init__` makes and drops never counts,
//! the first pass is epoch 0, and each reshuffle after an exhausted pass takes the next epoch
//! (checked against FusionBench's own `fabric.devices=2` CPU run, whose recorded batches are
//! those of epochs 0, 1, 2).
//!
//! A pass of epoch `e` (torch 2.11 `torch/utils/data/distributed.py`): the permutation
//! `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`, padded with its own
//! first indices to `N·⌈n/N⌉`, and rank `r` takes every `N`-th index from `r`; its DataLoader
//! slices that shard into batches of `batch_size`, the last one shorter. Every rank's shard has
//! the same length, so the ranks' passes end together. None of this draws from torch's default
//! generator.

use super::torch_rng::TorchGenerator;
use serde::{Deserialize, Serialize};

/// One task's loaders on every rank: the split size, the current epoch and the position within
/// each rank's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ShardedTask {
    len: usize,
    /// The epoch of the current pass (`None` before the first batch).
    epoch: Option<u64>,
    /// Position within each rank's shard of the current pass.
    position: usize,
    /// Each rank's shard of the current pass: kept for speed, recomputed after a restore.
    #[serde(skip)]
    shards: Vec<Vec<usize>>,
}

/// Every task's loaders on `replicas` ranks, as FusionBench's DDP run draws them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedLoaders {
    seed: u64,
    replicas: usize,
    batch_size: usize,
    tasks: Vec<ShardedTask>,
}

/// Rank `r`'s shard of a `DistributedSampler` pass over `len` examples with `replicas` ranks.
pub fn distributed_shard(
    seed: u64,
    epoch: u64,
    len: usize,
    replicas: usize,
    rank: usize,
) -> Vec<usize> {
    let mut order = TorchGenerator::seeded(seed.wrapping_add(epoch)).randperm(len);
    let total = len.div_ceil(replicas) * replicas;
    let mut i = 0;
    while order.len() < total {
        let next = order[i];
        order.push(next);
        i += 1;
    }
    order.into_iter().skip(rank).step_by(replicas).collect()
}

impl ShardedLoaders {
    /// Loaders over splits of `lens` examples on `replicas` ranks, `batch_size` per rank and
    /// batch, shuffled with `seed` (FusionBench's `PL_GLOBAL_SEED`).
    pub fn new(seed: u64, replicas: usize, lens: &[usize], batch_size: usize) -> Self {
        let tasks = lens
            .iter()
            .map(|&len| ShardedTask { len, epoch: None, position: 0, shards: Vec::new() })
            .collect();
        Self { seed, replicas: replicas.max(1), batch_size: batch_size.max(1), tasks }
    }

    /// The number of ranks.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next batch of task `task` on every rank, in rank order. Panics on an empty split or
    /// a task index out of range (callers check both first).
    pub fn next_batches(&mut self, task: usize) -> Vec<Vec<usize>> {
        let (seed, replicas, batch_size) = (self.seed, self.replicas, self.batch_size);
        let t = &mut self.tasks[task];
        assert!(t.len > 0, "a shuffled loader over an empty split");
        let shard_len = t.len.div_ceil(replicas);
        let epoch = match t.epoch {
            // The first pass is epoch 0 (see the module docs); an exhausted one moves on.
            None => 0,
            Some(e) if t.position >= shard_len => e + 1,
            Some(e) => e,
        };
        if t.epoch != Some(epoch) {
            t.epoch = Some(epoch);
            t.position = 0;
            t.shards.clear();
        }
        if t.shards.len() != replicas {
            t.shards =
                (0..replicas).map(|r| distributed_shard(seed, epoch, t.len, replicas, r)).collect();
        }
        let end = (t.position + batch_size).min(shard_len);
        let out = t.shards.iter().map(|s| s[t.position..end].to_vec()).collect();
        t.position = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's own `DistributedSampler` (no process group needed) against the replay: every
    /// rank's batches over three passes, through `set_epoch` as Fabric calls it.
    #[test]
    fn batches_are_torchs_distributed_sampler() {
        let (seed, replicas, batch, lens) = (42u64, 3usize, 4usize, [10usize, 7, 1]);
        let script = format!(
            r#"
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
out = []
for n in {lens:?}:
    per_rank = []
    for r in range({replicas}):
        s = DistributedSampler(list(range(n)), num_replicas={replicas}, rank=r, shuffle=True, seed={seed})
        batches = []
        for epoch in (0, 1, 2):
            s.set_epoch(epoch)
            batches += [b.tolist() for b in DataLoader(list(range(n)), batch_size={batch}, sampler=s)]
        per_rank.append(batches)
    out.append(per_rank)
print(out)
"#
        );
        let out = std::process::Command::new("python")
            .args(["-c", &script])
            .output()
            .expect("`python` with torch must be on PATH: `source scripts/env.sh` first");
        assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
        let want: Vec<Vec<Vec<Vec<usize>>>> =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        let mut l = ShardedLoaders::new(seed, replicas, &lens, batch);
        for (t, per_rank) in want.iter().enumerate() {
            let steps = per_rank[0].len();
            for step in 0..steps {
                let got = l.next_batches(t);
                let expected: Vec<Vec<usize>> = per_rank.iter().map(|b| b[step].clone()).collect();
                assert_eq!(got, expected, "task {t} (n = {}), batch {step}", lens[t]);
            }
        }
    }

    #[test]
    fn a_restored_state_continues_the_same_sequence() {
        let mut a = ShardedLoaders::new(7, 2, &[9, 5], 4);
        for t in [0, 1, 0, 0, 1] {
            a.next_batches(t);
        }
        let mut b: ShardedLoaders =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        for t in [0, 1, 1, 0, 0, 1] {
            assert_eq!(a.next_batches(t), b.next_batches(t));
        }
    }
}
