//! `method=task_arithmetic` (FusionBench's `TaskArithmeticAlgorithm`, Ilharco et al. 2023,
//! <https://arxiv.org/abs/2212.04089>): θ = θ₀ + λ Σᵢ (θᵢ − θ₀), with FusionBench's order of
//! float32 operations: τ = (θ₁ − θ₀) + (θ₂ − θ₀) + …, then λ·τ, then θ₀ + λτ. Every tensor is
//! merged (embeddings and LayerNorms included). Streams one tensor name at a time, reading the
//! checkpoints in place from their mapped files, with the whole formula fused into one pass over
//! cache-sized chunks on all cores. Each float32 operation is the one libtorch does, element by
//! element, so the result is bit-identical to FusionBench's.

use super::pool::{non_finite_error, output_tensor, output_values};
use super::simd::{prefetch, widest_simd, PREFETCH_AHEAD};
use super::{Merged, Method, RunContext};
use crate::config::MethodConfig;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// Elements per work unit: small enough to stay in a core's cache with the inputs streaming by.
const CHUNK: usize = 1 << 14;

/// Task arithmetic with `scaling_factor` λ (default 0.3).
pub struct TaskArithmetic {
    scaling_factor: f64,
}

impl TaskArithmetic {
    /// Task arithmetic at `scaling_factor` (WE-MoE builds its non-MLP weights this way).
    pub fn with_scaling_factor(scaling_factor: f64) -> Self {
        Self { scaling_factor }
    }

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
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("task_arithmetic: the model pool has no fine-tuned models");
        }
        // libtorch multiplies a float32 tensor by a Python float in float32.
        let lambda = self.scaling_factor as f32;
        let weights = pool.merge_per_tensor(|name, shape| {
            let theta0 = base.values(name)?;
            let thetas = models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
            let mut out = output_tensor(shape);
            let values = output_values(&mut out);
            let finite = values
                .par_chunks_mut(CHUNK)
                .enumerate()
                .map(|(c, out)| merge_chunk(out, &thetas, &theta0, c * CHUNK, lambda))
                .all(|ok| ok);
            if !finite {
                let mut inputs = vec![&base];
                inputs.extend(models.iter());
                return Err(non_finite_error(name, &inputs));
            }
            Ok(out)
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

widest_simd! {
    /// θ₀ + λ·Σᵢ(θᵢ − θ₀) on elements `at..at + out.len()`, in libtorch's order; false if a result
    /// is not finite.
    fn merge_chunk(
        out: &mut [f32],
        thetas: &[Cow<'_, [f32]>],
        theta0: &[f32],
        at: usize,
        lambda: f32,
    ) -> bool {
        let n = out.len();
        let b = &theta0[at..at + n];
        // τ = (θ₁ − θ₀) + (θ₂ − θ₀) + …, accumulated in `out`, 16 lanes at a time with the next
        // pages of the row asked for ahead.
        for (ti, t) in thetas.iter().enumerate() {
            let x = &t[at..at + n];
            for start in (0..n).step_by(16) {
                prefetch(t, at + start + PREFETCH_AHEAD);
                let end = (start + 16).min(n);
                let lanes = out[start..end].iter_mut().zip(&x[start..end]).zip(&b[start..end]);
                if ti == 0 {
                    for ((o, &x), &b) in lanes {
                        *o = x - b;
                    }
                } else {
                    for ((o, &x), &b) in lanes {
                        *o += x - b;
                    }
                }
            }
        }
        let mut bad = false;
        for (o, &b) in out.iter_mut().zip(b) {
            *o = b + *o * lambda;
            bad |= !o.is_finite();
        }
        !bad
    }
}
