//! `method=task_arithmetic` (FusionBench's `TaskArithmeticAlgorithm`, Ilharco et al. 2023,
//! <https://arxiv.org/abs/2212.04089>): θ = θ₀ + λ Σᵢ (θᵢ − θ₀), with FusionBench's order of
//! float32 operations: τ = (θ₁ − θ₀) + (θ₂ − θ₀) + …, then λ·τ, then θ₀ + λτ. Every tensor is
//! merged (embeddings and LayerNorms included). Streams one tensor name at a time.

use super::{Merged, Method, ModelPool};
use crate::config::MethodConfig;
use anyhow::{bail, Context, Result};

/// Task arithmetic with `scaling_factor` λ (default 0.3).
pub struct TaskArithmetic {
    scaling_factor: f64,
}

impl TaskArithmetic {
    /// Reads `method.scaling_factor`.
    pub fn from_config(cfg: &MethodConfig) -> Result<Self> {
        crate::config::warn_unknown_keys(&cfg.section, &["_target_", "scaling_factor"]);
        let scaling_factor = cfg
            .section
            .get::<f64>("scaling_factor")
            .context("method.scaling_factor")?
            .unwrap_or(0.3);
        if !scaling_factor.is_finite() {
            bail!("method.scaling_factor must be a finite number, got {scaling_factor}");
        }
        Ok(Self { scaling_factor })
    }
}

impl Method for TaskArithmetic {
    fn run(&self, pool: &ModelPool) -> Result<Merged> {
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("task_arithmetic: the model pool has no fine-tuned models");
        }
        let weights = pool.merge_per_tensor(|name, _| {
            let theta0 = base.get(name)?;
            let mut tau = models[0].get(name)? - &theta0;
            for m in &models[1..] {
                tau += m.get(name)? - &theta0;
            }
            Ok(&theta0 + tau * self.scaling_factor)
        })?;
        Ok(Merged { weights, trainable: true })
    }
}
