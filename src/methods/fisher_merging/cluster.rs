//! The Fisher statistics on the cluster: one work item per model
//! ([`crate::methods::model_statistics`]), each computing that model's Fisher into the shared
//! cache (`path.cache_dir/fisher/`).

use super::statistics::Statistics;
use crate::methods::model_statistics::ModelStatistics;
use crate::methods::Checkpoint;
use crate::models::clip::VisionConfig;
use crate::tasks::set::TaskSet;
use anyhow::{Context, Result};
use std::path::PathBuf;

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
}

impl ModelStatistics for FisherExecutor {
    fn compute_cached(&self, t: usize) -> Result<Option<usize>> {
        let model = self.models.get(t).with_context(|| format!("no model #{t} in the pool"))?;
        let (_, seen) = self.statistics.fisher_of(
            &self.set,
            t,
            model,
            &self.all,
            &self.config,
            Some(&self.files[t]),
        )?;
        Ok(seen)
    }
}
