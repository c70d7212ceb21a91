//! `method=fisher_merging/clip_fisher_merging` (FusionBench's `FisherMergingForCLIPVisionModel`,
//! Matena & Raffel 2022, <https://arxiv.org/abs/2111.09832>): each parameter is the average of
//! the fine-tuned models' values weighted by their diagonal Fisher information.
//!
//! The Fisher of model `i` (FusionBench's `get_fisher_weights`): its task's training split in
//! dataset order, in batches of `dataloader_kwargs.batch_size`, until `num_fisher_examples`
//! images were seen (checked before each batch); per batch, the gradient of
//! `Σ_b Σ_c √p[b,c]·log p[b,c]` (`p` the zero-shot softmax, detached) with respect to every
//! parameter, squared; the batches' squares summed in batch order and divided by the images
//! seen. The merge (`merging_with_fisher_weights`), per parameter `k`:
//! `θ[k] = Σᵢ cᵢ (Fᵢ[k] + ε) θᵢ[k] / Σᵢ cᵢ (Fᵢ[k] + ε)` with `cᵢ = 1/T`, times, with
//! `normalize_fisher_weight`, `(1/(‖Fᵢ‖ + ε)) / Σⱼ 1/(‖Fⱼ‖ + ε)` (`‖Fᵢ‖` the L2 norm over all of
//! model `i`'s Fisher values, `ε = minimal_fisher_weight`). Parameters matched by
//! `exclude_param_names_regex` (Python's `re.match`: anchored at the start) keep the pretrained
//! values. Every float32 operation is libtorch's, in FusionBench's order.

use super::pool_tasks::{pool_tasks, PoolSplit};
use super::{Checkpoint, Merged, Method, RunContext};
use crate::config::MethodConfig;
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tasks::zeroshot;
use crate::weights::{Scope, WeightMap, WeightSource};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Fisher merging, configured.
pub struct FisherMerging {
    exclude: Vec<fancy_regex::Regex>,
    normalize: bool,
    minimal: f64,
    examples: usize,
    batch_size: usize,
}

impl FisherMerging {
    /// Reads `method.*` (FusionBench 0.2.33's `clip_fisher_merging.yaml`, every key).
    pub fn from_config(cfg: &MethodConfig) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(
            s,
            &[
                "_target_",
                "name",
                "exclude_param_names_regex",
                "normalize_fisher_weight",
                "minimal_fisher_weight",
                "num_fisher_examples",
                "dataloader_kwargs",
            ],
        );
        let patterns = s.get::<Vec<String>>("exclude_param_names_regex")?.unwrap_or_default();
        let exclude = patterns
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(&format!("^(?:{p})")).with_context(|| {
                    format!("method.exclude_param_names_regex: `{p}` is not a regular expression")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let minimal = s.get::<f64>("minimal_fisher_weight")?.unwrap_or(1e-6);
        if !(minimal.is_finite() && minimal >= 0.0) {
            bail!("method.minimal_fisher_weight must be a finite number ≥ 0, got {minimal}");
        }
        let examples = match s.get::<i64>("num_fisher_examples")?.unwrap_or(256) {
            n if n >= 1 => n as usize,
            n => bail!("method.num_fisher_examples must be at least 1, got {n}"),
        };
        let batch_size = match s.get::<i64>("dataloader_kwargs.batch_size")?.unwrap_or(32) {
            n if n >= 1 => n as usize,
            n => bail!("method.dataloader_kwargs.batch_size must be at least 1, got {n}"),
        };
        // `dataloader_kwargs.num_workers` is accepted: the images come from the decoded cache.
        Ok(Self {
            exclude,
            normalize: s.get::<bool>("normalize_fisher_weight")?.unwrap_or(true),
            minimal,
            examples,
            batch_size,
        })
    }

    fn excluded(&self, name: &str) -> bool {
        self.exclude.iter().any(|r| r.is_match(name).unwrap_or(false))
    }

    /// Model `t`'s Fisher over every tensor of `all` (in that order; the excluded ones are
    /// left out of the merge, not of the statistics, so a cached Fisher serves any
    /// `exclude_param_names_regex`), and the images it saw.
    fn fisher(
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
}

impl Method for FisherMerging {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("fisher_merging: the model pool has no fine-tuned models");
        }
        let all = pool.parameter_names().to_vec();
        let names: Vec<&str> =
            all.iter().map(String::as_str).filter(|n| !self.excluded(n)).collect();
        let model_names: Vec<&str> = models.iter().map(Checkpoint::name).collect();
        let set = pool_tasks(ctx, &model_names, PoolSplit::Train, "fisher_merging")?;
        let cache_dir = ctx.program.path.cache_dir.as_ref().map(std::path::PathBuf::from);
        let mut fishers = Vec::with_capacity(models.len());
        for (t, m) in models.iter().enumerate() {
            let file = cache_dir.as_deref().and_then(|d| self.cache_file(d, &set, t, m));
            let all_tensors = match file.as_deref().map(|f| read_cached(f, &all)).transpose()? {
                Some(Some(f)) => {
                    tracing::info!(model = m.name(), file = %file.as_deref().map_or(String::new(), |f| f.display().to_string()), "Fisher reused from the cache");
                    f
                }
                _ => {
                    let started = std::time::Instant::now();
                    let (f, seen) = self.fisher(&set, t, m, &all, pool.config())?;
                    if seen < self.examples {
                        tracing::warn!(
                            model = m.name(),
                            used = seen,
                            asked = self.examples,
                            "fewer training images than method.num_fisher_examples: the Fisher uses all of them"
                        );
                    }
                    tracing::info!(
                        model = m.name(),
                        images = seen,
                        seconds = started.elapsed().as_secs_f64(),
                        "Fisher computed"
                    );
                    if let Some(file) = &file {
                        write_cached(file, &all, &f, seen)?;
                    }
                    f
                }
            };
            // Only the tensors to merge enter the merge (and the norms that weight it).
            let mut by_name: HashMap<&str, Tensor> =
                all.iter().map(String::as_str).zip(all_tensors).collect();
            fishers.push(
                names
                    .iter()
                    .map(|n| by_name.remove(n).context("a Fisher tensor"))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let _guard = tch::no_grad_guard();
        let coefficients = self.coefficients(&fishers)?;
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let weights = pool.merge_per_tensor(|name, _| match index.get(name) {
            None => base.get(name),
            Some(&k) => {
                let values =
                    models.iter().map(|m| m.get(name)).collect::<Result<Vec<_>>>()?;
                let shaped = coefficients.reshape(broadcast_shape(values[0].dim()));
                let f = Tensor::stack(&fishers.iter().map(|f| &f[k]).collect::<Vec<_>>(), 0)
                    + self.minimal;
                let p = Tensor::stack(&values, 0);
                let numerator = (&shaped * &f * &p).sum_dim_intlist([0i64].as_slice(), false, None::<Kind>);
                let denominator = (&shaped * &f).sum_dim_intlist([0i64].as_slice(), false, None::<Kind>);
                let merged = numerator / denominator;
                if merged.isfinite().all().int64_value(&[]) == 0 {
                    bail!("fisher_merging: `{name}` is not finite after merging (a Fisher of 0 with minimal_fisher_weight=0?)");
                }
                Ok(merged)
            }
        })?;
        Ok(Merged {
            weights,
            trainable: true,
            workers_done: false,
            params: None,
            options: Default::default(),
            rejoin: None,
        })
    }
}

impl FisherMerging {
    /// `[T]`: `1/T`, times each model's normalised inverse Fisher norm when
    /// `normalize_fisher_weight`.
    fn coefficients(&self, fishers: &[Vec<Tensor>]) -> Result<Tensor> {
        let t = fishers.len() as i64;
        let uniform = Tensor::ones([t], (Kind::Float, tch::Device::Cpu)) / t;
        if !self.normalize {
            return Ok(uniform);
        }
        // FusionBench's `get_models_fisher_norm`: per tensor the [T] norms over its elements,
        // stacked [T, P], then the norm over tensors (`torch.linalg.vector_norm` and
        // `torch.norm(dim=1)`; ATen's `norm` is `linalg_vector_norm`).
        let per_tensor: Vec<Tensor> = (0..fishers[0].len())
            .map(|k| {
                let stacked = Tensor::stack(&fishers.iter().map(|f| &f[k]).collect::<Vec<_>>(), 0);
                let dims: Vec<i64> = (1..stacked.dim() as i64).collect();
                stacked.norm_scalaropt_dim(2.0, dims.as_slice(), false)
            })
            .collect();
        let norms = Tensor::stack(&per_tensor, 1).norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        // `1.0 / (norm + ε)` is torch's `reciprocal() * 1.0`.
        let inverse = (norms + self.minimal).reciprocal();
        let normalised = &inverse / inverse.sum(None::<Kind>);
        Ok(uniform * normalised)
    }
}

impl FisherMerging {
    /// Where model `t`'s Fisher is kept under `cache_dir`: `fisher/<model>-<key>.safetensors`,
    /// the key hashing what the statistics depend on: the checkpoint's files (folder, names,
    /// sizes, modification times), the dataset (fingerprint, length), the zero-shot head and the
    /// base model's projection (their values), the batch size, `num_fisher_examples` and this
    /// program's numerics version. Not the merge's settings: a sweep over
    /// `minimal_fisher_weight`, `normalize_fisher_weight` or `exclude_param_names_regex` reuses
    /// it. `None` (no caching) when the checkpoint's folder cannot be read.
    fn cache_file(
        &self,
        cache_dir: &std::path::Path,
        set: &TaskSet,
        t: usize,
        model: &Checkpoint,
    ) -> Option<std::path::PathBuf> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "fisher|{}|{}|{}|",
            crate::version::code_version(),
            self.batch_size,
            self.examples
        ));
        h.update(std::fs::canonicalize(model.dir()).ok()?.to_string_lossy().as_bytes());
        let mut files: Vec<_> = std::fs::read_dir(model.dir())
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .collect();
        files.sort_by_key(|e| e.file_name());
        for e in files {
            let meta = std::fs::metadata(e.path()).ok()?;
            let when = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
            h.update(format!(
                "|{}|{}|{}",
                e.file_name().to_string_lossy(),
                meta.len(),
                when.as_nanos()
            ));
        }
        let task = &set.tasks[t];
        h.update(format!("|{}|{:x}|", task.data.len(), task.data.fingerprint()));
        for tensor in [&task.head, &set.base.visual_projection, &set.base.logit_scale] {
            h.update(tensor_bytes(tensor));
        }
        let key: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        let safe: String = model
            .name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .collect();
        Some(cache_dir.join("fisher").join(format!("{safe}-{key}.safetensors")))
    }
}

/// A tensor's float32 values as little-endian bytes.
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Float).contiguous().to_device(tch::Device::Cpu);
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A cached Fisher of the tensors `all`: `None` when the file is missing; an error naming the
/// file when it is unreadable or lacks a tensor (remove it to recompute).
fn read_cached(file: &std::path::Path, all: &[String]) -> Result<Option<Vec<Tensor>>> {
    if !file.exists() {
        return Ok(None);
    }
    let shown = file.display();
    let f = crate::weights::SafetensorsFile::open(file)
        .with_context(|| format!("reading the cached Fisher {shown} (remove it to recompute)"))?;
    all.iter()
        .map(|n| {
            f.tensor(n).with_context(|| {
                format!("the cached Fisher {shown} has no tensor `{n}` (remove it to recompute)")
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Writes a model's Fisher to `file` (atomically), with the images it saw in its metadata.
fn write_cached(
    file: &std::path::Path,
    all: &[String],
    fisher: &[Tensor],
    seen: usize,
) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut map = WeightMap::new();
    for (n, f) in all.iter().zip(fisher) {
        map.insert(n, f.shallow_clone());
    }
    let meta = HashMap::from([("images".to_string(), seen.to_string())]);
    crate::weights::save_safetensors(&map, file, Some(meta))
        .with_context(|| format!("caching the Fisher in {}", file.display()))
}

/// `[-1, 1, …, 1]` with `dim` entries: the `[T]` coefficients against stacked `[T, …]` tensors.
fn broadcast_shape(dim: usize) -> Vec<i64> {
    let mut shape = vec![1i64; dim + 1];
    shape[0] = -1;
    shape
}
