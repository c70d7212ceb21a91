//! The Fisher statistics on the cluster (`--serve`/`--join`, `srun`): one work item per model,
//! handed out by the runtime like any other; the worker that computes a model's Fisher writes it
//! into the shared cache (`path.cache_dir/fisher/`, atomically) and returns only how many images
//! it saw. A lost worker costs only the model it was computing (re-queued; the statistics are
//! deterministic, so whoever computes them writes the same bytes). Every process then reads the
//! statistics from the cache and merges the same model, and the workers join its evaluation.

use super::statistics::Statistics;
use crate::methods::{Checkpoint, RunContext};
use crate::models::clip::VisionConfig;
use crate::tasks::set::TaskSet;
use anyhow::{bail, Context, Result};
use fusion_cluster::runtime::Executor;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One model's statistics to compute (its index in the pool's fine-tuned models).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    model: u32,
}

/// What computing an item gave: the images seen (`None`: the cache already held it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    images: Option<u64>,
}

/// Computes models' Fishers into their cache files.
pub(super) struct FisherExecutor {
    statistics: Statistics,
    set: TaskSet,
    models: Vec<Checkpoint>,
    all: Vec<String>,
    config: VisionConfig,
    files: Vec<PathBuf>,
}

impl FisherExecutor {
    /// An executor over `models` (their tasks in `set`, in the same order), writing model `i`'s
    /// Fisher to `files[i]`.
    pub(super) fn new(
        statistics: Statistics,
        set: TaskSet,
        models: Vec<Checkpoint>,
        all: Vec<String>,
        config: VisionConfig,
        files: Vec<PathBuf>,
    ) -> Self {
        Self { statistics, set, models, all, config, files }
    }

    fn run(&self, item: &Item) -> Result<Done> {
        let t = item.model as usize;
        let model = self.models.get(t).with_context(|| format!("no model #{t} in the pool"))?;
        let (_, seen) = self.statistics.fisher_of(
            &self.set,
            t,
            model,
            &self.all,
            &self.config,
            Some(&self.files[t]),
        )?;
        Ok(Done { images: seen.map(|n| n as u64) })
    }
}

impl Executor for FisherExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: Item = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let done = self.run(&item).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&done).map_err(|e| e.to_string())
    }
}

/// Runs the statistics job: as the coordinator (computing too) when this process serves, as a
/// worker when it joins. Returns, on the coordinator, how many remote workers were joined at the
/// end (they go on to evaluate the merged model).
pub(super) fn compute(ctx: &RunContext<'_>, executor: FisherExecutor) -> Result<usize> {
    let n = executor.models.len();
    if let Some(addr) = ctx.launch.join {
        let name = ctx.launch.worker_name();
        let summary = fusion_cluster::runtime::run_worker(
            addr,
            &name,
            Box::new(executor),
            &ctx.launch.options_for(ctx.program),
        )
        .with_context(|| {
            format!("Fisher statistics: worker `{name}` of the coordinator at {addr}")
        })?;
        tracing::info!(items = summary.executed, "Fisher statistics: worker done");
        return Ok(0);
    }
    let Some(listen) = ctx.launch.serve_addr() else {
        bail!("the Fisher statistics job runs only with --serve or --join");
    };
    let options = ctx.launch.options_for(ctx.program);
    let job_name = options.job_id.clone();
    let bar = crate::progress::bar("fisher", n, "models");
    let (outcome, summary) = fusion_cluster::runtime::run_job(
        vec![Box::new(executor)],
        Some(listen),
        &options,
        |addr| {
            crate::launch::Launch::remember_bound(addr);
            tracing::info!(%addr, job = %job_name, "coordinator listening: workers join with --join")
        },
        |job| -> Result<usize> {
            let items = (0..n as u32)
                .map(|model| fusion_cluster::codec::encode(&Item { model }))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let round = job.round(items).context("the Fisher statistics")?;
            for r in &round.results {
                let _: Done = fusion_cluster::codec::decode(r)?;
                bar.inc(1);
            }
            Ok(job.workers().len().saturating_sub(1))
        },
    )
    .context("the Fisher statistics")?;
    bar.finish_and_clear();
    let remote = outcome?;
    tracing::info!(workers = ?summary.per_worker, lost = summary.lost.len(), "Fisher statistics done");
    Ok(remote)
}
