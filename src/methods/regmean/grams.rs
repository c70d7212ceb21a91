//! Each model's RegMean statistics (FusionBench's `RegMeanAlgorithmForCLIP.get_regmean_weights`):
//! for every Linear of the vision encoder, the running mean of `XᵀX` over all token rows of its
//! input, from its task's training split in FusionBench's shuffled batches; and their cache.
//!
//! FusionBench's loader is `DataLoader(train split, shuffle=True, **dataloader_kwargs)`, batches
//! taken until the images seen reach `num_regmean_examples` (checked before each batch). Per
//! batch and Linear, with `X` the input reshaped to `[rows, width]` and `n` the rows so far:
//! `G = XᵀX / rows` first, then `G = (G·n + XᵀX) / (n + rows)`, in float32. q, k and v read the
//! same input, so their Grams are equal: one is computed and kept for the three.
//!
//! The shuffles are torch's, replayed ([`crate::tta::torch_rng`]): after `torch.manual_seed(seed)`
//! the zero-shot heads' `CLIPModel` and each fine-tuned model, loaded in turn, take one
//! `randn(hidden_size)` each (the class embedding `no_init_weights` does not skip), and each
//! model's loader then draws its workers' base seed and its sampler's seed; the order is
//! `randperm(n)` from a generator seeded with the latter. Without `seed=`, FusionBench's torch
//! starts from OS entropy: a random subset each run; ours then draws a fresh seed, and its cache
//! key says "unseeded", so a rerun reuses the subset the first run drew.

use crate::methods::model_statistics::{cache_path, cached_or_computed, hash_checkpoint};
use crate::methods::Checkpoint;
use crate::models::clip::encoder::{LinearInput, LinearObserver};
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tta::torch_rng::TorchGenerator;
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What a model's Grams depend on besides the model and its data: which images, in which batches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Statistics {
    /// `num_regmean_examples`.
    pub examples: usize,
    /// `dataloader_kwargs.batch_size`.
    pub batch_size: usize,
    /// The program's `seed`, else a fresh one.
    pub seed: u64,
    /// Whether `seed` is the program's (else the cache key does not name it).
    pub seeded: bool,
}

/// The names the Grams are kept under, per layer in [`LinearInput::ALL`] order: the first module
/// reading each input (`…layers.{l}.self_attn.k_proj` holds q's, k's and v's).
pub(super) fn gram_names(config: &VisionConfig) -> Vec<String> {
    (0..config.encoder.num_hidden_layers)
        .flat_map(|l| {
            LinearInput::ALL
                .iter()
                .map(move |i| format!("vision_model.encoder.layers.{l}.{}", i.modules()[0]))
        })
        .collect()
}

/// The index of `input` of layer `layer` in [`gram_names`].
pub(super) fn slot(layer: usize, input: LinearInput) -> usize {
    let i = LinearInput::ALL.iter().position(|&x| x == input).unwrap_or(0);
    layer * LinearInput::ALL.len() + i
}

/// The running means, filled by a forward's observed Linear inputs.
struct Running {
    slots: RefCell<Vec<Option<(Tensor, i64)>>>,
}

impl LinearObserver for Running {
    fn observe(&self, layer: usize, input: LinearInput, x: &Tensor) {
        let width = *x.size().last().unwrap_or(&1);
        let x = x.reshape([-1, width]);
        let rows = x.size()[0];
        let xtx = x.tr().matmul(&x);
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot(layer, input)];
        *s = Some(match s.take() {
            None => (xtx / rows as f64, rows),
            Some((g, n)) => ((g * n as f64 + xtx) / (n + rows) as f64, n + rows),
        });
    }
}

impl Statistics {
    /// The seed of model `t`'s sampler (the second of its loader's two draws), `t` counting the
    /// fine-tuned models in pool order.
    pub(super) fn sampler_seed(&self, hidden_size: usize, t: usize) -> i64 {
        let d = TorchGenerator::randn_draws(hidden_size as u64).unwrap_or(0);
        let mut g = TorchGenerator::seeded(self.seed);
        g.advance(d); // the zero-shot heads' CLIPModel
        let mut seed = 0;
        for _ in 0..=t {
            g.advance(d); // the model, loaded
            let _base_seed = g.random_int64();
            seed = g.random_int64();
        }
        seed
    }

    /// Model `t`'s batches: consecutive slices of its shuffled split, until the images reach
    /// `num_regmean_examples` (checked before each batch) or the split ends.
    pub(super) fn batches(&self, len: usize, hidden_size: usize, t: usize) -> Vec<Vec<usize>> {
        let order = TorchGenerator::seeded(self.sampler_seed(hidden_size, t) as u64).randperm(len);
        let mut out = Vec::new();
        let mut seen = 0;
        for chunk in order.chunks(self.batch_size.max(1)) {
            if seen >= self.examples {
                break;
            }
            seen += chunk.len();
            out.push(chunk.to_vec());
        }
        out
    }

    /// Model `t`'s Grams (in [`gram_names`] order) and the images they saw.
    pub(super) fn grams(
        &self,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
        config: &VisionConfig,
    ) -> Result<(Vec<Tensor>, usize)> {
        let _guard = tch::no_grad_guard();
        let mut weights = WeightMap::new();
        for name in crate::models::clip::vision::parameter_names(config) {
            let full = format!("vision_model.{name}");
            weights.insert(&full, model.get(&full)?);
        }
        let scope = Scope::new(&weights, set.device, Kind::Float).pp("vision_model");
        let vision = ClipVision::load(&scope, config)?;
        let task = &set.tasks[t];
        let batches = self.batches(task.data.len(), config.encoder.hidden_size as usize, t);
        let names = gram_names(config);
        let running = Running { slots: RefCell::new((0..names.len()).map(|_| None).collect()) };
        let bar = crate::progress::bar(&format!("regmean {}", task.name), batches.len(), "batches");
        let mut seen = 0;
        for indices in &batches {
            let x = set.pixels(t, indices)?;
            let _ = vision.last_hidden_state_observed(&x, Some(&running));
            seen += indices.len();
            bar.inc(1);
        }
        bar.finish_and_clear();
        let grams = running
            .slots
            .into_inner()
            .into_iter()
            .zip(&names)
            .map(|(s, n)| {
                s.map(|(g, _)| g).with_context(|| {
                    format!(
                        "regmean: model `{}` saw no input of `{n}` (no training image?)",
                        model.name()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((grams, seen))
    }

    /// Model `t`'s Grams: read from `file` when it is there, else computed (and written to
    /// `file` when given). Returns them and the images they saw (`None` when read).
    pub(super) fn grams_of(
        &self,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
        config: &VisionConfig,
        file: Option<&Path>,
    ) -> Result<(Vec<Tensor>, Option<usize>)> {
        let names = gram_names(config);
        cached_or_computed(
            "RegMean Grams",
            "num_regmean_examples",
            model.name(),
            &names,
            self.examples,
            file,
            || self.grams(set, t, model, config),
        )
    }

    /// Where model `t`'s Grams are kept under `cache_dir`: `regmean/<model>-<key>.safetensors`,
    /// the key hashing what they depend on: the checkpoint's content (each file's SHA-256), the dataset (fingerprint,
    /// length), the batch size, `num_regmean_examples`, the shuffle (its sampler's seed, or
    /// "unseeded") and this program's numerics version. Not the merge's settings: a sweep over
    /// `reduce_non_diagonal_ratio` or `exclude_param_names_regex` reuses them. `None` (no
    /// caching) when the checkpoint's folder cannot be read.
    pub(super) fn cache_file(
        &self,
        cache_dir: &Path,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
        hidden_size: usize,
    ) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "regmean|{}|{}|{}|{}|",
            crate::version::code_version(),
            self.batch_size,
            self.examples,
            if self.seeded {
                self.sampler_seed(hidden_size, t).to_string()
            } else {
                "unseeded".to_string()
            }
        ));
        hash_checkpoint(&mut h, model, cache_dir)?;
        let task = &set.tasks[t];
        h.update(format!("|{}|{:x}|", task.data.len(), task.data.fingerprint()));
        Some(cache_path(&cache_dir.join("regmean"), model.name(), h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stop_once_the_examples_are_reached_and_cover_a_permutation() {
        let s = Statistics { examples: 40, batch_size: 16, seed: 42, seeded: true };
        let b = s.batches(100, 48, 0);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 16, 16]);
        let all =
            Statistics { examples: 256, batch_size: 32, seed: 42, seeded: true }.batches(70, 48, 2);
        assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), vec![32, 32, 6]);
        let mut flat: Vec<usize> = all.concat();
        flat.sort_unstable();
        assert_eq!(flat, (0..70).collect::<Vec<_>>());
        // Each model draws its own shuffle; the seed changes them.
        assert_ne!(s.batches(100, 48, 0), s.batches(100, 48, 1));
        assert_ne!(s.batches(100, 48, 0), Statistics { seed: 43, ..s }.batches(100, 48, 0));
    }

    /// The sampler seeds follow the draws of torch's own generator: one `randn(hidden)` for the
    /// heads' model, then per model one `randn(hidden)` and two int64 draws.
    #[test]
    fn sampler_seeds_follow_torchs_default_generator() {
        let _lock =
            crate::tta::torch_rng::GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        let s = Statistics { examples: 1, batch_size: 1, seed: 42, seeded: true };
        tch::manual_seed(42);
        let int64 = || {
            let mut t = Tensor::empty([0i64; 0], (Kind::Int64, tch::Device::Cpu));
            t.random_().int64_value(&[])
        };
        let _ = Tensor::randn([48], (Kind::Float, tch::Device::Cpu));
        for t in 0..3 {
            let _ = Tensor::randn([48], (Kind::Float, tch::Device::Cpu));
            let _base = int64();
            assert_eq!(int64(), s.sampler_seed(48, t), "model {t}");
        }
    }

    #[test]
    fn the_running_mean_is_fusionbenchs() {
        let _guard = tch::no_grad_guard();
        let r = Running { slots: RefCell::new((0..4).map(|_| None).collect()) };
        // Not drawn from torch's global generator, which another test seeds.
        let opts = (Kind::Float, tch::Device::Cpu);
        let a = (Tensor::arange(24, opts).view([2, 3, 4]) * 0.37).sin();
        let b = (Tensor::arange(12, opts).view([1, 3, 4]) * 1.3).cos();
        r.observe(0, LinearInput::Fc1, &a);
        r.observe(0, LinearInput::Fc1, &b);
        let (g, n) = r.slots.borrow_mut()[slot(0, LinearInput::Fc1)].take().unwrap();
        assert_eq!(n, 9);
        let x = Tensor::cat(&[a.reshape([-1, 4]), b.reshape([-1, 4])], 0);
        let want = x.tr().matmul(&x) / 9.0;
        assert!(g.allclose(&want, 1e-5, 1e-6, false));
    }
}
