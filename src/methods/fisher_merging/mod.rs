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
//!
//! The statistics ([`statistics`]) are cached per model under `path.cache_dir/fisher/`; on a
//! cluster they are computed one model per work item ([`cluster`]).

mod cluster;
mod statistics;

use super::pool_tasks::{pool_tasks, PoolSplit};
use super::{Checkpoint, Merged, Method, RunContext};
use crate::config::MethodConfig;
use crate::methods::model_statistics::StatisticsConfig;
use anyhow::{bail, Context, Result};
use statistics::Statistics;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Fisher merging, configured.
pub struct FisherMerging {
    exclude: Vec<fancy_regex::Regex>,
    normalize: bool,
    minimal: f64,
    statistics: Statistics,
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
        let shared = StatisticsConfig::read(s, "num_fisher_examples")?;
        let minimal = s.get::<f64>("minimal_fisher_weight")?.unwrap_or(1e-6);
        if !(minimal.is_finite() && minimal >= 0.0) {
            bail!("method.minimal_fisher_weight must be a finite number ≥ 0, got {minimal}");
        }
        Ok(Self {
            exclude: shared.exclude,
            normalize: s.get::<bool>("normalize_fisher_weight")?.unwrap_or(true),
            minimal,
            statistics: Statistics { examples: shared.examples, batch_size: shared.batch_size },
        })
    }

    fn excluded(&self, name: &str) -> bool {
        StatisticsConfig::excluded(&self.exclude, name)
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
        let set = pool_tasks(ctx, &model_names, PoolSplit::Train, "fisher_merging", true)?;
        let cache_dir = ctx.program.path.cache_dir.as_ref().map(std::path::PathBuf::from);
        let files: Vec<Option<std::path::PathBuf>> = models
            .iter()
            .enumerate()
            .map(|(t, m)| {
                cache_dir.as_deref().and_then(|d| self.statistics.cache_file(d, &set, t, m))
            })
            .collect();
        // On a cluster the statistics are a job of one item per model, computed into the
        // shared cache; every process then reads them from there.
        let distributed = ctx.launch.serve.is_some() || ctx.launch.join.is_some();
        let rejoin = if distributed {
            let files = files.iter().cloned().collect::<Option<Vec<_>>>().context(
                "the Fisher statistics on a cluster go through path.cache_dir (on a filesystem every process shares), and it is not set or a checkpoint folder is unreadable",
            )?;
            let executor = cluster::FisherExecutor::new(
                self.statistics,
                set.replicate(tch::Device::Cpu)?,
                pool.task_models()?,
                all.clone(),
                pool.config().clone(),
                files,
            );
            let remote = crate::methods::model_statistics::compute_on_cluster(
                ctx,
                "Fisher statistics",
                models.len(),
                executor,
            )?;
            Some(if ctx.launch.join.is_some() { 0 } else { remote })
        } else {
            None
        };
        // With a cache every model's Fisher is on disk: the merge reads it tensor by tensor from
        // there instead of holding every model's (a model's size each).
        let streamed = files.iter().all(Option::is_some);
        let mut fishers = Vec::with_capacity(models.len());
        for (t, m) in models.iter().enumerate() {
            let file = files[t].as_deref();
            let (all_tensors, cached) = if distributed {
                let file = file.context("a cache file")?;
                let tensors = crate::methods::model_statistics::read_cached(file, &all, "Fisher")?.with_context(|| {
                    format!(
                        "model `{}`: its Fisher, computed on the cluster, is not in {} (is path.cache_dir on a filesystem every process shares?)",
                        m.name(),
                        file.display()
                    )
                })?;
                (tensors, Some(file))
            } else {
                let (tensors, seen) =
                    self.statistics.fisher_of(&set, t, m, &all, pool.config(), file)?;
                (tensors, if seen.is_none() { file } else { None })
            };
            crate::methods::model_statistics::check_finite(
                "Fisher",
                m.name(),
                &all,
                &all_tensors,
                cached,
            )?;
            if streamed {
                continue;
            }
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
        let fishers = if streamed {
            Fishers::Files(
                files
                    .iter()
                    .flatten()
                    .map(|f| {
                        crate::weights::SafetensorsFile::open(f).with_context(|| {
                            format!(
                                "reading the cached Fisher {} (remove it to recompute)",
                                f.display()
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            Fishers::Memory(fishers)
        };
        let _guard = tch::no_grad_guard();
        let coefficients = self.coefficients(&fishers, &names)?;
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let weights = pool.merge_per_tensor(|name, _| match index.get(name) {
            None => base.get(name),
            Some(&k) => {
                let values =
                    models.iter().map(|m| m.get(name)).collect::<Result<Vec<_>>>()?;
                let shaped = coefficients.reshape(broadcast_shape(values[0].dim()));
                let f = fishers.stacked(k, name)? + self.minimal;
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
            rejoin,
        })
    }
}

impl FisherMerging {
    /// `[T]`: `1/T`, times each model's normalised inverse Fisher norm when
    /// `normalize_fisher_weight`.
    fn coefficients(&self, fishers: &Fishers, names: &[&str]) -> Result<Tensor> {
        let t = fishers.models() as i64;
        let uniform = Tensor::ones([t], (Kind::Float, tch::Device::Cpu)) / t;
        if !self.normalize {
            return Ok(uniform);
        }
        // FusionBench's `get_models_fisher_norm`: per tensor the [T] norms over its elements,
        // stacked [T, P], then the norm over tensors (`torch.linalg.vector_norm` and
        // `torch.norm(dim=1)`; ATen's `norm` is `linalg_vector_norm`).
        let per_tensor: Vec<Tensor> = names
            .iter()
            .enumerate()
            .map(|(k, name)| -> Result<Tensor> {
                let stacked = fishers.stacked(k, name)?;
                let dims: Vec<i64> = (1..stacked.dim() as i64).collect();
                Ok(stacked.norm_scalaropt_dim(2.0, dims.as_slice(), false))
            })
            .collect::<Result<_>>()?;
        let norms = Tensor::stack(&per_tensor, 1).norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        // `1.0 / (norm + ε)` is torch's `reciprocal() * 1.0`.
        let inverse = (norms + self.minimal).reciprocal();
        let normalised = &inverse / inverse.sum(None::<Kind>);
        Ok(uniform * normalised)
    }
}

/// Every model's Fisher of the merged tensors: held in memory (`[model][tensor]`), or read tensor
/// by tensor from the cache files, so that the merge holds one tensor's Fishers at a time.
enum Fishers {
    Memory(Vec<Vec<Tensor>>),
    Files(Vec<crate::weights::SafetensorsFile>),
}

impl Fishers {
    fn models(&self) -> usize {
        match self {
            Fishers::Memory(m) => m.len(),
            Fishers::Files(f) => f.len(),
        }
    }

    /// `[T, …]`: every model's Fisher of the `k`-th merged tensor, `name`.
    fn stacked(&self, k: usize, name: &str) -> Result<Tensor> {
        use crate::weights::WeightSource;
        match self {
            Fishers::Memory(m) => {
                Ok(Tensor::stack(&m.iter().map(|f| &f[k]).collect::<Vec<_>>(), 0))
            }
            Fishers::Files(files) => {
                let each = files
                    .iter()
                    .map(|f| f.tensor(name).with_context(|| format!("a cached Fisher has no `{name}` (remove path.cache_dir/fisher to recompute)")))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&each, 0))
            }
        }
    }
}

/// `[-1, 1, …, 1]` with `dim` entries: the `[T]` coefficients against stacked `[T, …]` tensors.
fn broadcast_shape(dim: usize) -> Vec<i64> {
    let mut shape = vec![1i64; dim + 1];
    shape[0] = -1;
    shape
}
