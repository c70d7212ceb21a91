//! `method=ties_merging` (FusionBench's `TiesMergingAlgorithm`; Yadav et al. 2023, TIES-Merging,
//! <https://arxiv.org/abs/2306.01708>), streamed: the models × parameters matrix is never built.
//!
//! 1. Trim: per task vector τᵢ = θᵢ − θ₀, keep entries with |τᵢ| ≥ the k-th smallest |τᵢ| over the
//!    *whole* flattened model (k = D − ⌊D·K⌋, K = threshold/100 when threshold > 1). One pass per
//!    task, holding one model's worth of |τᵢ|.
//! 2. Elect: γ = sign(Σᵢ τ̂ᵢ) per coordinate; zeros take the sign of Σ γ over all coordinates
//!    (a second pass, which also counts that sum).
//! 3. Disjoint merge (FusionBench's default `merge_func: sum`, or `mean`/`max`) of the entries
//!    agreeing with γ, then θ = θ₀ + λ·τₘ (a third pass, one tensor name at a time).
//!
//! The float32 operations are FusionBench's, on the same values, so results match bit for bit.

use super::{Merged, Method, ModelPool};
use crate::config::MethodConfig;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// How the elected entries are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergeFunc {
    Sum,
    Mean,
    Max,
}

/// TIES-merging with FusionBench's hyperparameters.
pub struct TiesMerging {
    scaling_factor: f64,
    threshold: f64,
    merge_func: MergeFunc,
}

impl TiesMerging {
    /// Reads `scaling_factor` (0.3), `threshold` (20: a percentage when > 1, else a fraction),
    /// `remove_keys` (must stay empty for CLIP) and `merge_func` (`sum`).
    pub fn from_config(cfg: &MethodConfig) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(
            s,
            &["_target_", "scaling_factor", "threshold", "remove_keys", "merge_func"],
        );
        let scaling_factor =
            s.get::<f64>("scaling_factor").context("method.scaling_factor")?.unwrap_or(0.3);
        let threshold = s.get::<f64>("threshold").context("method.threshold")?.unwrap_or(20.0);
        if !(threshold > 0.0 && threshold <= 100.0) {
            bail!("method.threshold must be in (0, 1] (a fraction) or (1, 100] (a percentage), got {threshold}");
        }
        let remove: Vec<String> =
            s.get("remove_keys").context("method.remove_keys")?.unwrap_or_default();
        if !remove.is_empty() {
            bail!("method.remove_keys must be empty for CLIP models (FusionBench would fail to load the merged state dict), got {remove:?}");
        }
        let func: String =
            s.get("merge_func").context("method.merge_func")?.unwrap_or("sum".into());
        let merge_func = match func.rsplit('-').next().unwrap_or("") {
            "sum" => MergeFunc::Sum,
            "mean" => MergeFunc::Mean,
            "max" => MergeFunc::Max,
            other => bail!("method.merge_func: unknown `{other}` (expected sum, mean or max)"),
        };
        Ok(Self { scaling_factor, threshold, merge_func })
    }
}

impl Method for TiesMerging {
    fn run(&self, pool: &ModelPool) -> Result<Merged> {
        let _guard = tch::no_grad_guard();
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("ties_merging: the model pool has no fine-tuned models");
        }
        let names = pool.parameter_names();
        // Pass 1: each task's trim threshold over its whole flattened task vector.
        let k_frac = if self.threshold > 1.0 { self.threshold / 100.0 } else { self.threshold };
        let mut kth = Vec::with_capacity(models.len());
        for m in &models {
            let parts = names
                .iter()
                .map(|n| Ok((m.get(n)? - base.get(n)?).reshape([-1]).abs()))
                .collect::<Result<Vec<Tensor>>>()?;
            let flat = Tensor::cat(&parts, 0);
            let d = flat.size()[0];
            let k = d - (d as f64 * k_frac) as i64;
            kth.push(flat.kthvalue(k.max(1), 0, false).0.double_value(&[]));
        }
        let trimmed = |n: &str| -> Result<Tensor> {
            let theta0 = base.get(n)?;
            let rows = models
                .iter()
                .zip(&kth)
                .map(|(m, &t)| {
                    let tau = m.get(n)? - &theta0;
                    let mask = tau.abs().ge(t);
                    Ok(tau * mask)
                })
                .collect::<Result<Vec<Tensor>>>()?;
            Ok(Tensor::stack(&rows, 0))
        };
        let tails = tail_starts(pool);
        // Pass 2: the sum of all elected signs decides the sign of ties.
        let mut sign_total = 0f64;
        for n in names {
            let sign = column_sum(&trimmed(n)?.reshape([models.len() as i64, -1]), tails[n]).sign();
            sign_total += sign.sum(Kind::Float).double_value(&[]);
        }
        let majority = sign_total.signum() * f64::from(u8::from(sign_total != 0.0));
        // Pass 3: disjoint merge and θ₀ + λ·τₘ.
        let weights = pool.merge_per_tensor(|n, _| {
            let shape = base.get(n)?.size();
            let v = trimmed(n)?.reshape([models.len() as i64, -1]);
            let tail = tails[n];
            let mut gamma = column_sum(&v, tail).sign();
            let zeros = gamma.eq(0.0);
            gamma = gamma.masked_fill(&zeros, majority);
            let keep = v.gt(0.0).where_self(&gamma.unsqueeze(0).gt(0.0), &v.lt(0.0));
            let selected = &v * keep;
            let merged = match self.merge_func {
                MergeFunc::Sum => column_sum(&selected, tail),
                MergeFunc::Mean => {
                    let counts = selected
                        .ne(0.0)
                        .sum_dim_intlist(0, false, Kind::Int64)
                        .to_kind(Kind::Float);
                    column_sum(&selected, tail) / counts.clamp_min(1.0)
                }
                MergeFunc::Max => selected.abs().amax(0, false) * &gamma,
            };
            Ok(base.get(n)? + (merged * self.scaling_factor).reshape(shape.as_slice()))
        })?;
        Ok(Merged { weights, trainable: true })
    }
}

/// `v.sum(dim=0)` of FusionBench's `[T, D]` matrix, column by column, in libtorch's CPU order:
/// its vectorised outer-reduction kernel adds rows left to right, except the last `D mod 32`
/// columns of the flattened (sorted-key) model, which its scalar tail sums with four accumulators
/// (`acc[i % 4] += rᵢ`, then `((acc₀ + acc₁) + acc₂) + acc₃`). `v` is this tensor's `[T, n]`
/// slice; its columns from `tail_start` on lie in that tail.
fn column_sum(v: &Tensor, tail_start: i64) -> Tensor {
    let t = v.size()[0];
    let rows: Vec<Tensor> = (0..t).map(|i| v.get(i)).collect();
    let mut sum = rows[0].copy();
    for r in &rows[1..] {
        sum += r;
    }
    let n = v.size()[1];
    if tail_start < n {
        let len = n - tail_start;
        let tail: Vec<Tensor> = rows.iter().map(|r| r.narrow(0, tail_start, len)).collect();
        let mut acc: Vec<Tensor> = (0..4).map(|_| tail[0].zeros_like()).collect();
        for (i, r) in tail.iter().enumerate() {
            acc[i % 4] += r;
        }
        let total = ((&acc[0] + &acc[1]) + &acc[2]) + &acc[3];
        sum.narrow(0, tail_start, len).copy_(&total);
    }
    sum
}

/// For each tensor name, the local index where the flattened model's `D mod 32` tail starts
/// (its length when the tensor lies before the tail). FusionBench flattens in sorted-key order.
fn tail_starts(pool: &ModelPool) -> std::collections::HashMap<String, i64> {
    let names = pool.parameter_names();
    let numel: Vec<i64> = names.iter().map(|n| pool.shape(n).iter().product()).collect();
    let total: i64 = numel.iter().sum();
    let tail_from = total - total % 32;
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| names[a].cmp(&names[b]));
    let mut offset = 0;
    let mut out = std::collections::HashMap::new();
    for i in order {
        let start = (tail_from - offset).clamp(0, numel[i]);
        out.insert(names[i].clone(), start);
        offset += numel[i];
    }
    out
}
