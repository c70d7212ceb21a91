//! Merging methods: one file per method behind [`Method`], picked by name from the config's
//! `method` group through [`build`].
//!
//! A method reads the model pool tensor by tensor (mmap'd safetensors) and returns the merged
//! vision weights as an ordered [`WeightMap`]; the program evaluates and saves them. Parallelism
//! and placement stay out of method files.

mod aten_sum;
mod dummy;
mod pool;
mod simd;
mod simple_average;
mod task_arithmetic;
mod task_vector_cos_similarity;
mod ties_merging;

pub use pool::{Checkpoint, ModelPool};

use crate::config::MethodConfig;
use crate::weights::WeightMap;
use anyhow::{bail, Result};

/// The result of a method: vision weights in `named_parameters()` order.
pub struct Merged {
    /// `vision_model.*` tensors.
    pub weights: WeightMap,
    /// Whether its parameters count as trainable in the report's `model_info` (FusionBench's
    /// merged `nn.Module`s keep `requires_grad=True`).
    pub trainable: bool,
}

/// A model-merging method.
pub trait Method {
    /// Runs the method on the pool.
    fn run(&self, pool: &ModelPool) -> Result<Merged>;
}

/// What a method may need from the program besides its own config section.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// `path.log_dir`: where analyses write their files when not told otherwise.
    pub log_dir: Option<String>,
    /// The program's `seed`.
    pub seed: Option<u64>,
}

/// The method a composed `method` config names (by its config option, e.g. `task_arithmetic`,
/// or its `_target_`), with its hyperparameters read from the config.
pub fn build(cfg: &MethodConfig, ctx: &Context) -> Result<Box<dyn Method>> {
    let target = cfg.target.as_deref().unwrap_or("");
    let name = target.rsplit('.').next().unwrap_or("");
    Ok(match name {
        "DummyAlgorithm" => Box::new(dummy::Dummy),
        "SimpleAverageAlgorithm" => Box::new(simple_average::SimpleAverage),
        "TaskArithmeticAlgorithm" => Box::new(task_arithmetic::TaskArithmetic::from_config(cfg)?),
        "TiesMergingAlgorithm" => Box::new(ties_merging::TiesMerging::from_config(cfg)?),
        "TaskVectorCosSimilarity" => Box::new(
            task_vector_cos_similarity::TaskVectorCosSimilarity::from_config(cfg, ctx)?,
        ),
        _ => bail!(
            "method `{}` (_target_: {target}) is not available in this build (available: dummy, simple_average, task_arithmetic, ties_merging, analysis/task_vector_cos_similarity)",
            cfg.option.as_deref().unwrap_or("?")
        ),
    })
}
