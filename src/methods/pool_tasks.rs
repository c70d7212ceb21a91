//! The task set a data-dependent method works on: one task per fine-tuned model, its data from
//! the model pool's `test_datasets` (test-time adaptation: AdaMerging, WE-MoE) or
//! `train_datasets` (statistics: Fisher merging, RegMean; without them, the `train` split of each
//! test dataset's repository), its zero-shot head from `_pretrained_`, as
//! FusionBench's `CLIPClassificationMixin` builds it; decoded images cached.

use super::RunContext;
use crate::config::DatasetSpec;
use crate::program::DatasetRef;
use crate::tasks::set::{TaskSet, TaskSetSpec};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Which of the model pool's dataset lists a method reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSplit {
    /// `modelpool.train_datasets`.
    Train,
    /// `modelpool.test_datasets`.
    Test,
}

impl PoolSplit {
    fn key(self) -> &'static str {
        match self {
            PoolSplit::Train => "train_datasets",
            PoolSplit::Test => "test_datasets",
        }
    }

    fn word(self) -> &'static str {
        match self {
            PoolSplit::Train => "train",
            PoolSplit::Test => "test",
        }
    }
}

/// The tasks of `models` (in that order), each on its `split` dataset of the model pool, on the
/// CPU, with their zero-shot heads when `heads`. `method` names the method in errors; a missing
/// dataset or an empty one is an error naming the model and the config key.
pub(crate) fn pool_tasks(
    ctx: &RunContext<'_>,
    models: &[&str],
    split: PoolSplit,
    method: &str,
    heads: bool,
) -> Result<TaskSet> {
    let mp = &ctx.program.modelpool;
    let base = mp
        .models
        .iter()
        .find(|(n, _)| n == "_pretrained_")
        .map(|(_, m)| m.path.clone())
        .with_context(|| format!("{method} needs modelpool.models._pretrained_"))?;
    let processor = mp.processor.as_ref().map(|p| p.path.clone()).unwrap_or_else(|| base.clone());
    // FusionBench's corrupted robustness pool has test datasets only, so its Fisher merging and
    // RegMean crash there; ours then read the clean `train` split of each test dataset's
    // repository (training data: never the test images, corrupted or not).
    let clean_train: Option<Vec<(String, DatasetSpec)>> = match (
        split,
        &mp.train_datasets,
        &mp.test_datasets,
    ) {
        (PoolSplit::Train, None, Some(test)) => {
            let train: Vec<(String, DatasetSpec)> = test
                .iter()
                .map(|(n, d)| (n.clone(), DatasetSpec { split: "train".into(), ..d.clone() }))
                .collect();
            tracing::info!(
                method,
                datasets = ?train.iter().map(|(_, d)| d.path.as_str()).collect::<Vec<_>>(),
                "modelpool.train_datasets is not set: the clean `train` split of each test dataset's repository"
            );
            Some(train)
        }
        _ => None,
    };
    let lists = match split {
        PoolSplit::Train => clean_train.as_deref().or(mp.train_datasets.as_deref()),
        PoolSplit::Test => mp.test_datasets.as_deref(),
    };
    let datasets = lists.unwrap_or(&[]);
    let mut tasks = Vec::new();
    for &m in models {
        let (_, d) = datasets.iter().find(|(n, _)| n == m).with_context(|| {
            format!(
                "{method} reads each model's {} split, and modelpool.{} has no `{}` (it has: {})",
                split.word(),
                split.key(),
                m,
                datasets.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?;
        tasks.push((
            m.to_string(),
            DatasetRef { id: d.path.clone(), config: d.name.clone(), split: d.split.clone() },
        ));
    }
    let cache_dir = ctx.program.path.cache_dir.as_ref().map(PathBuf::from);
    let crop_cache = crate::program::crop_cache(ctx.program)?;
    let spec = TaskSetSpec {
        base_model: &base,
        processor: &processor,
        tasks: &tasks,
        cache_dir: cache_dir.as_deref(),
        crop_cache: crop_cache.as_ref(),
        heads,
    };
    let mut set = TaskSet::load(&spec, ctx.hub, tch::Device::Cpu)?;
    for t in &set.tasks {
        if t.data.is_empty() {
            bail!("task `{}`: its {} split is empty, and {method} reads it", t.name, split.word());
        }
    }
    if let Some(cache) = &crop_cache {
        set.fill_crop_cache(cache)?;
    }
    Ok(set)
}
