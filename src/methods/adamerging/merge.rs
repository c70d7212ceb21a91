//! θ(λ) and its gradient with respect to λ, reading the checkpoints in place from their mapped
//! files (no dense task-vector copies, as FusionBench's wrappers keep).
//!
//! FusionBench's `TaskWiseMergedModel` / `LayerWiseMergedModel.merge_weights` computes, per
//! parameter tensor `p` (index `j` in `named_parameters()` order), in float32 and model order:
//! `θ[p] = (((θ₀[p] + τ₁[p]·w₁) + τ₂[p]·w₂) + …)` with `τᵢ = θᵢ − θ₀` and `wᵢ = λᵢ` (task-wise) or
//! `λᵢⱼ` (layer-wise), `λ` clamped to `[0, 1]` first when `clamp_weights`. [`merge`] does the same
//! float32 operations element by element, so θ(λ) is bit-identical to FusionBench's.
//!
//! Since `∂θ[p]/∂λᵢⱼ = τᵢ[p]`, the gradient of a loss `L` is `∂L/∂λᵢⱼ = Σₖ gₖ τᵢ[p]ₖ` with
//! `g = ∂L/∂θ[p]` ([`project`], accumulated in float64; task-wise sums over `j`), and zero where
//! the clamp is inactive (`clamp`'s backward).

use crate::methods::{Checkpoint, ModelPool};
use crate::weights::WeightMap;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Task-wise (`[T]`) or layer-wise (`[T, P]`) merging coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// One λ per task (`clip_task_wise_adamerging`).
    TaskWise,
    /// One λ per task and parameter tensor (`clip_layer_wise_adamerging`).
    LayerWise,
}

impl Granularity {
    /// λ's shape for `tasks` models of `params` parameter tensors.
    pub fn shape(self, tasks: usize, params: usize) -> Vec<usize> {
        match self {
            Self::TaskWise => vec![tasks],
            Self::LayerWise => vec![tasks, params],
        }
    }
}

/// The inputs of a merge: θ₀ and the task models, opened (mapped) once.
pub struct Inputs {
    /// `_pretrained_`.
    pub base: Checkpoint,
    /// The fine-tuned models, in pool order.
    pub models: Vec<Checkpoint>,
    /// Parameter names in `named_parameters()` order.
    pub names: Vec<String>,
    /// Their shapes.
    pub shapes: Vec<Vec<i64>>,
}

impl Inputs {
    /// Opens the pool's pretrained and task models.
    pub fn open(pool: &ModelPool) -> Result<Self> {
        let base = pool.pretrained()?;
        let models = pool.task_models()?;
        if models.is_empty() {
            bail!("adamerging: the model pool has no fine-tuned models");
        }
        let names = pool.parameter_names().to_vec();
        let shapes = names.iter().map(|n| pool.shape(n).to_vec()).collect();
        Ok(Self { base, models, names, shapes })
    }

    /// Number of task models.
    pub fn tasks(&self) -> usize {
        self.models.len()
    }

    /// Number of parameter tensors.
    pub fn params(&self) -> usize {
        self.names.len()
    }
}

/// The coefficient each model `i` gets on tensor `j`, clamped if asked.
fn weight(lambda: &[f32], g: Granularity, params: usize, i: usize, j: usize, clamp: bool) -> f32 {
    let w = match g {
        Granularity::TaskWise => lambda[i],
        Granularity::LayerWise => lambda[i * params + j],
    };
    if clamp {
        w.clamp(0.0, 1.0)
    } else {
        w
    }
}

const CHUNK: usize = 1 << 14;

/// Tensors up to this many elements are merged and projected in the calling thread.
const PARALLEL_ABOVE: usize = 1 << 17;

/// θ(λ) in FusionBench's float32 order, as a map of fresh CPU tensors in `named_parameters()`
/// order.
pub fn merge(inputs: &Inputs, lambda: &[f32], g: Granularity, clamp: bool) -> Result<WeightMap> {
    let _guard = tch::no_grad_guard();
    let params = inputs.params();
    let mut out = WeightMap::new();
    for (j, (name, shape)) in inputs.names.iter().zip(&inputs.shapes).enumerate() {
        let base = inputs.base.values(name)?;
        let thetas = inputs.models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
        let ws: Vec<f32> =
            (0..inputs.tasks()).map(|i| weight(lambda, g, params, i, j, clamp)).collect();
        let mut t = crate::methods::pool::output_tensor(shape);
        let values = crate::methods::pool::output_values(&mut t);
        let fill = |(c, out): (usize, &mut [f32])| {
            let at = c * CHUNK;
            let b = &base[at..at + out.len()];
            out.copy_from_slice(b);
            for (theta, &w) in thetas.iter().zip(&ws) {
                let x = &theta[at..at + out.len()];
                for ((o, &x), &b) in out.iter_mut().zip(x).zip(b) {
                    // state_dict[name] + param * w, param = θᵢ − θ₀: three float32 roundings.
                    *o += (x - b) * w;
                }
            }
        };
        // Small tensors in this thread: a parallel pass would cost more than the work (and
        // would compete with libtorch's spinning intra-op threads).
        if values.len() <= PARALLEL_ABOVE {
            values.chunks_mut(CHUNK).enumerate().for_each(fill);
        } else {
            values.par_chunks_mut(CHUNK).enumerate().for_each(fill);
        }
        if let Some((at, _)) = crate::weights::non_finite(&t) {
            bail!("adamerging: merged tensor `{name}` is not finite at flat index {at} (λ too large?)");
        }
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// `Σₖ gₖ (xₖ − bₖ)` in float64, over eight interleaved partial sums (so the loop vectorises)
/// added in a fixed order: the same bits on every machine and thread count.
fn dot_delta(g: &[f32], x: &[f32], b: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let whole = g.len() - g.len() % LANES;
    for ((g8, x8), b8) in g[..whole]
        .chunks_exact(LANES)
        .zip(x[..whole].chunks_exact(LANES))
        .zip(b[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ((x8[l] - b8[l]) as f64) * g8[l] as f64;
        }
    }
    for (l, k) in (whole..g.len()).enumerate() {
        acc[l] += ((x[k] - b[k]) as f64) * g[k] as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `∂L/∂λ` (λ's shape, flattened) from `∂L/∂θ` (`grads[j]` for tensor `j`, flattened float32).
///
/// Each chunk of a tensor is read once for every model (θ₀ and the gradient stay in cache
/// while the models stream past), and per-chunk sums are added in chunk order whether the
/// chunks ran in parallel or not.
pub fn project(
    inputs: &Inputs,
    grads: &[&[f32]],
    lambda: &[f32],
    g: Granularity,
    clamp: bool,
) -> Result<Vec<f32>> {
    let (tasks, params) = (inputs.tasks(), inputs.params());
    if grads.len() != params {
        bail!("{} gradients for {params} parameter tensors", grads.len());
    }
    // dots[i][j] = Σₖ gₖ (θᵢ − θ₀)ₖ over tensor j, in float64.
    let mut dots = vec![vec![0f64; params]; tasks];
    for (j, name) in inputs.names.iter().enumerate() {
        let base = inputs.base.values(name)?;
        let grad = grads[j];
        if grad.len() != base.len() {
            bail!("gradient of `{name}` has {} values, the tensor {}", grad.len(), base.len());
        }
        let thetas = inputs.models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
        let chunk = |(c, gs): (usize, &[f32])| -> Vec<f64> {
            let at = c * CHUNK;
            let b = &base[at..at + gs.len()];
            thetas.iter().map(|theta| dot_delta(gs, &theta[at..at + gs.len()], b)).collect()
        };
        let sums: Vec<Vec<f64>> = if grad.len() <= PARALLEL_ABOVE {
            grad.chunks(CHUNK).enumerate().map(chunk).collect()
        } else {
            grad.par_chunks(CHUNK).enumerate().map(chunk).collect()
        };
        for (i, row) in dots.iter_mut().enumerate() {
            row[j] = sums.iter().map(|s| s[i]).sum();
        }
    }
    let active = |i: usize, j: usize| {
        let w = match g {
            Granularity::TaskWise => lambda[i],
            Granularity::LayerWise => lambda[i * params + j],
        };
        !clamp || (0.0..=1.0).contains(&w)
    };
    Ok(match g {
        Granularity::TaskWise => (0..tasks)
            .map(|i| if active(i, 0) { dots[i].iter().sum::<f64>() as f32 } else { 0.0 })
            .collect(),
        Granularity::LayerWise => (0..tasks)
            .flat_map(|i| (0..params).map(move |j| (i, j)))
            .map(|(i, j)| if active(i, j) { dots[i][j] as f32 } else { 0.0 })
            .collect(),
    })
}

/// The values of a contiguous CPU float32 tensor, borrowed.
pub fn values_view(t: &Tensor) -> &[f32] {
    assert!(t.kind() == tch::Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU float32 tensor of `n` elements; the slice borrows the handle, and
    // nothing writes the tensor while it is read (callers read gradients after `backward`).
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) }
}

/// The flattened float32 values of a CPU tensor.
pub fn values_of(t: &Tensor) -> Vec<f32> {
    let t = t.contiguous();
    let mut v = vec![0f32; t.numel()];
    if !v.is_empty() {
        let n = v.len();
        t.copy_data(&mut v, n);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_granularity_and_the_clamp() {
        let l = [0.5f32, 1.5, -0.2, 0.7, 0.1, 0.9];
        assert_eq!(weight(&l, Granularity::TaskWise, 3, 1, 2, false), 1.5);
        assert_eq!(weight(&l, Granularity::TaskWise, 3, 1, 2, true), 1.0);
        assert_eq!(weight(&l, Granularity::LayerWise, 3, 1, 2, false), 0.9);
        assert_eq!(weight(&l, Granularity::LayerWise, 3, 0, 2, true), 0.0);
        assert_eq!(Granularity::LayerWise.shape(8, 55), vec![8, 55]);
    }

    #[test]
    fn the_lane_dot_is_the_float64_dot_of_the_differences() {
        for n in [0usize, 1, 7, 8, 9, 100, 1003] {
            let g: Vec<f32> = (0..n).map(|k| ((k * 37 % 11) as f32 - 5.0) * 0.125).collect();
            let x: Vec<f32> = (0..n).map(|k| (k % 13) as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|k| (k % 5) as f32 * 0.25).collect();
            // Exactly representable products and sums: any order gives the same value.
            let want: f64 = (0..n).map(|k| ((x[k] - b[k]) as f64) * g[k] as f64).sum();
            assert_eq!(dot_delta(&g, &x, &b), want, "n = {n}");
        }
    }
}
