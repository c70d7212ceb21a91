//! `method=simple_average` (FusionBench's `SimpleAverageAlgorithm`): θ = (Σᵢ θᵢ) / T over the
//! pool's fine-tuned models in config order, summed left to right in float32, then divided by T.
//! The pretrained model is not used. Streams one tensor name at a time.

use super::{Merged, Method, RunContext};
use anyhow::{bail, Result};

/// Element-wise mean of the fine-tuned models.
pub struct SimpleAverage;

impl Method for SimpleAverage {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("simple_average: the model pool has no models besides `_pretrained_`");
        }
        let t = models.len() as f64;
        let weights = pool.merge_per_tensor(|name, _| {
            let mut sum = models[0].get(name)?;
            for m in &models[1..] {
                sum += m.get(name)?;
            }
            Ok(sum / t)
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
