//! FusionBench's test-time batches, replayed: per task a `DataLoader(test split, batch_size,
//! shuffle=True)` in an `InfiniteDataLoader` (a new iterator, reshuffled, whenever one is
//! exhausted), created the first time the task is visited, every one drawing from torch's default
//! CPU generator, which `seed` seeds.
//!
//! Each iterator that torch creates draws, in this order, from the default generator
//! (torch 2.11 `torch/utils/data/dataloader.py`, `sampler.py`):
//! 1. `_BaseDataLoaderIter.__init__`: `_base_seed = torch.empty((), dtype=torch.int64).random_()`
//!    (the worker processes' seed; it changes no index);
//! 2. the first batch: `RandomSampler.__iter__` draws `seed` the same way and shuffles with
//!    `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`.
//!
//! Batches are consecutive slices of that permutation, the last one shorter (`drop_last=False`).
//! The whole state ([`Loaders`]) is small and serialisable: a checkpoint holds it, and a
//! resumed run continues the same sequence.

use super::torch_rng::TorchGenerator;
use serde::{Deserialize, Serialize};

/// The default generator's 32-bit draws that FusionBench 0.2.33 (with transformers 4.57.6)
/// takes before AdaMerging's first loader: each `from_pretrained` of a CLIP vision tower runs
/// `CLIPVisionEmbeddings.__init__`, whose `torch.randn(hidden_size)` class embedding
/// transformers' `no_init_weights` does not skip — the pretrained model, each of the `models`
/// fine-tuned ones, and the `CLIPModel` the zero-shot heads come from
/// (`scripts/fixtures/check_adamerging_rng.py` checks this on FusionBench's recorded runs).
/// `None` when the hidden size is below 16 (torch's serial path, not modelled).
pub fn fusionbench_draws_before_tta(models: usize, hidden_size: usize) -> Option<u64> {
    TorchGenerator::randn_draws(hidden_size as u64).map(|d| (models as u64 + 2) * d)
}

/// One task's loader: its split size, its batch size and its current pass, if started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TaskLoader {
    len: usize,
    batch_size: usize,
    /// The permutation seed of the current pass and the position within it.
    pass: Option<Pass>,
    /// Passes started so far.
    passes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pass {
    seed: i64,
    position: usize,
    /// Kept for speed; recomputed from `seed` after a restore.
    #[serde(skip)]
    order: Vec<usize>,
}

/// Every task's shuffled, endless loader, sharing torch's default generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaders {
    generator: TorchGenerator,
    tasks: Vec<TaskLoader>,
}

/// A task's next batch: the dataset indices, and whether it began a new pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Dataset indices, in batch order.
    pub indices: Vec<usize>,
    /// The pass (epoch) of the task's loader this batch belongs to, from 0.
    pub pass: u64,
}

impl Loaders {
    /// Loaders over splits of `lens` examples, `batch_size` per batch, after
    /// `torch.manual_seed(seed)` and `skip` 32-bit draws taken by what ran before the first
    /// loader (see [`fusionbench_draws_before_tta`]).
    pub fn new(seed: u64, skip: u64, lens: &[usize], batch_size: usize) -> Self {
        let tasks = lens
            .iter()
            .map(|&len| TaskLoader { len, batch_size: batch_size.max(1), pass: None, passes: 0 })
            .collect();
        let mut generator = TorchGenerator::seeded(seed);
        generator.advance(skip);
        Self { generator, tasks }
    }

    /// The next batch of task `task` (its loader started, or restarted when exhausted, as torch
    /// would). Panics on an empty split or a task index out of range (callers check both first).
    pub fn next_batch(&mut self, task: usize) -> Batch {
        let t = &mut self.tasks[task];
        assert!(t.len > 0, "a shuffled loader over an empty split");
        let exhausted = t.pass.as_ref().is_none_or(|p| p.position >= t.len);
        if exhausted {
            let _base_seed = self.generator.random_int64();
            let seed = self.generator.random_int64();
            let order = TorchGenerator::seeded(seed as u64).randperm(t.len);
            t.pass = Some(Pass { seed, position: 0, order });
            t.passes += 1;
        }
        let len = t.len;
        let pass = t.pass.as_mut().expect("a pass was just started");
        if pass.order.len() != len {
            pass.order = TorchGenerator::seeded(pass.seed as u64).randperm(len);
        }
        let end = (pass.position + t.batch_size).min(len);
        let indices = pass.order[pass.position..end].to_vec();
        pass.position = end;
        Batch { indices, pass: t.passes - 1 }
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_pass_once_and_reshuffle() {
        let mut l = Loaders::new(42, 0, &[10, 3], 4);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(l.next_batch(0).indices);
        }
        assert_eq!(seen.len(), 10, "4 + 4 + 2");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let b = l.next_batch(0);
        assert_eq!((b.indices.len(), b.pass), (4, 1));
        assert_ne!(b.indices, seen[..4].to_vec(), "a new pass is reshuffled");
        assert_eq!(l.next_batch(1).indices.len(), 3);
    }

    #[test]
    fn a_restored_state_continues_the_same_sequence() {
        let mut a = Loaders::new(7, 5, &[9, 5, 12], 4);
        for s in 0..5 {
            for t in 0..3 {
                a.next_batch((t + s) % 3);
            }
        }
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: Loaders = serde_json::from_str(&saved).unwrap();
        for t in [0, 1, 2, 2, 1, 0, 0] {
            assert_eq!(a.next_batch(t), b.next_batch(t));
        }
    }

    /// The draw order of the module docs, from libtorch's own default generator.
    #[test]
    fn draws_follow_torchs_default_generator() {
        let mut l = Loaders::new(42, 0, &[6, 6], 6);
        let mut g = TorchGenerator::seeded(42);
        let first = l.next_batch(0).indices;
        let second = l.next_batch(1).indices;
        let _ = g.random_int64();
        let s0 = g.random_int64();
        let _ = g.random_int64();
        let s1 = g.random_int64();
        assert_eq!(first, TorchGenerator::seeded(s0 as u64).randperm(6));
        assert_eq!(second, TorchGenerator::seeded(s1 as u64).randperm(6));
    }
}
