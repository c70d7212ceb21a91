//! `method=regmean/clip_regmean` (FusionBench's `RegMeanAlgorithmForCLIP`, Jin et al. 2023,
//! "Dataless Knowledge Fusion by Merging Weights of Language Models",
//! <https://arxiv.org/abs/2212.09849>): each Linear weight of the vision encoder is the
//! least-squares merge `(Σᵢ G'ᵢ)⁻¹ Σᵢ G'ᵢ Wᵢᵀ` of the fine-tuned models' weights, `Gᵢ` the Gram
//! matrix of that Linear's inputs on model `i`'s training data ([`grams`]) with its off-diagonal
//! entries scaled by `reduce_non_diagonal_ratio` ([`merge`]); every other tensor is the plain
//! mean of the models' values (`torch.stack(...).mean(0)`), and tensors matched by
//! `exclude_param_names_regex` keep the pretrained values.
//!
//! The Grams are cached per model under `path.cache_dir/regmean/`; on a cluster they are
//! computed one model per work item ([`crate::methods::model_statistics`]).

mod grams;
mod merge;

use super::model_statistics::{
    check_finite, compute_on_cluster, read_cached, ModelStatistics, StatisticsConfig,
};
use super::pool_tasks::{pool_tasks, PoolSplit};
use super::{Checkpoint, Merged, Method, RunContext};
use crate::config::MethodConfig;
use crate::models::clip::VisionConfig;
use crate::tasks::set::TaskSet;
use anyhow::{bail, Context, Result};
use grams::Statistics;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// RegMean, configured.
pub struct RegMean {
    exclude: Vec<fancy_regex::Regex>,
    ratio: f64,
    transpose: bool,
    examples: usize,
    batch_size: usize,
}

impl RegMean {
    /// Reads `method.*` (FusionBench 0.2.33's `clip_regmean.yaml`, every key).
    pub fn from_config(cfg: &MethodConfig) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(
            s,
            &[
                "_target_",
                "name",
                "exclude_param_names_regex",
                "num_regmean_examples",
                "weight_transpose",
                "reduce_non_diagonal_ratio",
                "dataloader_kwargs",
            ],
        );
        let shared = StatisticsConfig::read(s, "num_regmean_examples")?;
        let ratio = s.get::<f64>("reduce_non_diagonal_ratio")?.unwrap_or(0.95);
        if !ratio.is_finite() {
            bail!("method.reduce_non_diagonal_ratio must be a finite number, got {ratio}");
        }
        Ok(Self {
            exclude: shared.exclude,
            ratio,
            transpose: s.get::<bool>("weight_transpose")?.unwrap_or(true),
            examples: shared.examples,
            batch_size: shared.batch_size,
        })
    }

    fn excluded(&self, name: &str) -> bool {
        StatisticsConfig::excluded(&self.exclude, name)
    }
}

/// Computes models' Grams into their cache files (a cluster's work items).
struct GramExecutor {
    statistics: Statistics,
    set: TaskSet,
    models: Vec<Checkpoint>,
    config: VisionConfig,
    files: Vec<PathBuf>,
}

impl ModelStatistics for GramExecutor {
    fn compute_cached(&self, t: usize) -> Result<Option<usize>> {
        let model = self.models.get(t).with_context(|| format!("no model #{t} in the pool"))?;
        let file = self.files.get(t).map(PathBuf::as_path);
        Ok(self.statistics.grams_of(&self.set, t, model, &self.config, file)?.1)
    }
}

impl Method for RegMean {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("regmean: the model pool has no fine-tuned models");
        }
        let config = pool.config().clone();
        let hidden = config.encoder.hidden_size as usize;
        let model_names: Vec<&str> = models.iter().map(Checkpoint::name).collect();
        // FusionBench builds the zero-shot heads here too, then never reads them: the Grams only
        // need the vision tower's forward.
        let set = pool_tasks(ctx, &model_names, PoolSplit::Train, "regmean", false)?;
        if hidden < 16 {
            tracing::warn!(
                hidden,
                "hidden size below 16: the shuffles do not replay FusionBench's"
            );
        }
        // Without `seed=` FusionBench draws a random subset each run; so does this one (a
        // cached unseeded subset is reused).
        let statistics = Statistics {
            examples: self.examples,
            batch_size: self.batch_size,
            seed: crate::methods::adamerging::tta::seed_of(ctx.program),
            seeded: ctx.program.seed.is_some(),
        };
        let cache_dir = ctx.program.path.cache_dir.as_ref().map(PathBuf::from);
        let files: Vec<Option<PathBuf>> = models
            .iter()
            .enumerate()
            .map(|(t, m)| {
                cache_dir.as_deref().and_then(|d| statistics.cache_file(d, &set, t, m, hidden))
            })
            .collect();
        let distributed = ctx.launch.serve.is_some() || ctx.launch.join.is_some();
        let rejoin = if distributed {
            let files = files.iter().cloned().collect::<Option<Vec<_>>>().context(
                "the RegMean Grams on a cluster go through path.cache_dir (on a filesystem every process shares), and it is not set or a checkpoint folder is unreadable",
            )?;
            let executor = GramExecutor {
                statistics,
                set: set.replicate(tch::Device::Cpu)?,
                models: pool.task_models()?,
                config: config.clone(),
                files,
            };
            let remote = compute_on_cluster(ctx, "RegMean Grams", models.len(), executor)?;
            Some(if ctx.launch.join.is_some() { 0 } else { remote })
        } else {
            None
        };
        let names = grams::gram_names(&config);
        let mut sums =
            merge::Accumulator::new(&config, self.ratio, self.transpose, |n| !self.excluded(n));
        // Each model's Grams join the sums as soon as they are there (read back from the
        // cache when the cluster computed them), in model order.
        for (t, m) in models.iter().enumerate() {
            let file = files[t].as_deref();
            let (grams, cached) = if distributed {
                let file = file.context("a cache file")?;
                let grams = read_cached(file, &names, "RegMean Grams")?.with_context(|| {
                    format!(
                        "model `{}`: its Grams, computed on the cluster, are not in {} (is path.cache_dir on a filesystem every process shares?)",
                        m.name(),
                        file.display()
                    )
                })?;
                (grams, Some(file))
            } else {
                let (grams, seen) = statistics.grams_of(&set, t, m, &config, file)?;
                (grams, if seen.is_none() { file } else { None })
            };
            check_finite("RegMean Grams", m.name(), &names, &grams, cached)?;
            sums.add(&grams, m)?;
        }
        let weights = pool.merge_per_tensor(|name, _| {
            if self.excluded(name) {
                return base.get(name);
            }
            if let Some(w) = sums.solve(name)? {
                return Ok(w);
            }
            let values = models.iter().map(|m| m.get(name)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&values, 0).mean_dim([0i64].as_slice(), false, None::<Kind>))
        })?;
        sums.warn_conditioning();
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
