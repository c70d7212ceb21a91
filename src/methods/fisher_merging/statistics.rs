//! Each model's diagonal Fisher (FusionBench's `get_fisher_weights`) and its cache: the
//! statistics are an artefact of the model, its task's training data and the two settings that
//! choose the images (`dataloader_kwargs.batch_size`, `num_fisher_examples`), kept under
//! `path.cache_dir/fisher/` so that reruns and sweeps over the merge's settings reuse them, and so
//! that the processes of a cluster share them.

use super::super::Checkpoint;
use crate::methods::model_statistics::cached_or_computed;
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tasks::zeroshot;
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What a model's Fisher depends on besides the model and its data: which images, in which
/// batches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Statistics {
    /// `num_fisher_examples`.
    pub examples: usize,
    /// `dataloader_kwargs.batch_size`.
    pub batch_size: usize,
}

impl Statistics {
    /// Model `t`'s Fisher over every tensor of `all` (in that order; the excluded ones are
    /// left out of the merge, not of the statistics, so a cached Fisher serves any
    /// `exclude_param_names_regex`), and the images it saw.
    pub(super) fn fisher(
        &self,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
        all: &[String],
        config: &VisionConfig,
    ) -> Result<(Vec<Tensor>, usize)> {
        let mut leaves = WeightMap::new();
        for name in all {
            leaves.insert(name, model.get(name)?.copy().set_requires_grad(true));
        }
        let inputs: Vec<Tensor> = leaves.iter().map(|(_, t)| t.shallow_clone()).collect();
        let scope = Scope::new(&leaves, set.device, Kind::Float).pp("vision_model");
        let vision = ClipVision::load(&scope, config)?;
        let task = &set.tasks[t];
        let len = task.data.len();
        let bar = crate::progress::bar(
            &format!("fisher {}", task.name),
            self.examples.min(len).div_ceil(self.batch_size),
            "batches",
        );
        let mut sums: Option<Vec<Tensor>> = None;
        let (mut seen, mut start) = (0, 0);
        while seen < self.examples && start < len {
            let end = (start + self.batch_size).min(len);
            let indices: Vec<usize> = (start..end).collect();
            let x = set.pixels(t, &indices)?;
            let feats = set.base.image_features(&vision, &x);
            let logits = zeroshot::logits(&feats, &task.head, &set.base.logit_scale);
            let p = logits.softmax(-1, None::<Kind>).detach();
            let log_p = logits.log_softmax(-1, None::<Kind>);
            let s = (p.sqrt() * log_p)
                .sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)
                .sum_dim_intlist([0i64].as_slice(), false, None::<Kind>);
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let grads = Tensor::f_run_backward(&[&s], &refs, false, false).with_context(|| {
                format!("fisher_merging: backward through model `{}`", task.name)
            })?;
            let _guard = tch::no_grad_guard();
            let squares: Vec<Tensor> = grads.iter().map(|g| g.pow_tensor_scalar(2)).collect();
            sums = Some(match sums {
                None => squares,
                Some(mut acc) => {
                    for (a, sq) in acc.iter_mut().zip(&squares) {
                        *a += sq;
                    }
                    acc
                }
            });
            seen += end - start;
            start = end;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let _guard = tch::no_grad_guard();
        let sums = sums.context("no batch")?;
        Ok((sums.into_iter().map(|f| f / seen as f64).collect(), seen))
    }

    /// Model `t`'s Fisher: read from `file` when it is there, else computed (and written to
    /// `file` when given). Returns it over every tensor of `all`, and the images it saw (`None`
    /// when read from the cache).
    pub(super) fn fisher_of(
        &self,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
        all: &[String],
        config: &VisionConfig,
        file: Option<&Path>,
    ) -> Result<(Vec<Tensor>, Option<usize>)> {
        cached_or_computed(
            "Fisher",
            "num_fisher_examples",
            model.name(),
            all,
            self.examples,
            file,
            || self.fisher(set, t, model, all, config),
        )
    }

    /// Where model `t`'s Fisher is kept under `cache_dir`: `fisher/<model>-<key>.safetensors`,
    /// the key hashing what the statistics depend on: the checkpoint's content (each
    /// file's SHA-256), the dataset (fingerprint, length), the zero-shot head and the
    /// base model's projection (their values), the batch size, `num_fisher_examples` and this
    /// program's numerics version. Not the merge's settings: a sweep over
    /// `minimal_fisher_weight`, `normalize_fisher_weight` or `exclude_param_names_regex` reuses
    /// it. `None` (no caching) when the checkpoint's folder cannot be read.
    pub(super) fn cache_file(
        &self,
        cache_dir: &Path,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
    ) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "fisher|{}|{}|{}|",
            crate::version::code_version(),
            self.batch_size,
            self.examples
        ));
        crate::methods::model_statistics::hash_checkpoint(&mut h, model, cache_dir)?;
        let task = &set.tasks[t];
        h.update(format!("|{}|{:x}|", task.data.len(), task.data.fingerprint()));
        for tensor in [&task.head, &set.base.visual_projection, &set.base.logit_scale] {
            h.update(tensor_bytes(tensor));
        }
        Some(crate::methods::model_statistics::cache_path(
            &cache_dir.join("fisher"),
            model.name(),
            h,
        ))
    }
}

/// A tensor's float32 values as little-endian bytes.
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Float).contiguous().to_device(tch::Device::Cpu);
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
