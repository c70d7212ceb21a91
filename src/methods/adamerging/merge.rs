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
/// added in a fixed order: the same bits on every machine and thread count. The reference of
/// [`dot_delta_many`], which computes it for several gradients at once.
#[cfg(test)]
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

/// `Σₙ g⁽ᵏ⁾ₙ (xₙ − bₙ)` in float64 for several gradients `g⁽ᵏ⁾` in one pass, each over eight
/// interleaved partial sums (so the loop vectorises) added in a fixed order: the same bits on
/// every machine and thread count, and for a gradient whichever others share its pass (the
/// difference is formed once per element; each gradient's sums see the same operations).
fn dot_delta_many(gs: &[&[f32]], x: &[f32], b: &[f32], out: &mut [f64]) {
    const LANES: usize = 8;
    let n = x.len();
    let mut acc = vec![[0f64; LANES]; gs.len()];
    let whole = n - n % LANES;
    let mut at = 0;
    while at < whole {
        let mut d = [0f64; LANES];
        for l in 0..LANES {
            d[l] = (x[at + l] - b[at + l]) as f64;
        }
        for (acc, g) in acc.iter_mut().zip(gs) {
            let g8 = &g[at..at + LANES];
            for l in 0..LANES {
                acc[l] += d[l] * g8[l] as f64;
            }
        }
        at += LANES;
    }
    for (acc, g) in acc.iter_mut().zip(gs) {
        for (l, k) in (whole..n).enumerate() {
            acc[l] += ((x[k] - b[k]) as f64) * g[k] as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
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
    let mut out = project_many(inputs, &[grads], lambda, g, clamp)?;
    Ok(out.pop().unwrap_or_default())
}

/// [`project`] for several gradients under the same λ (a worker's items of one step) in one
/// pass over the checkpoints: each chunk of every model is read from memory once for all of
/// them instead of once per gradient. Every result has the bits [`project`] gives it alone
/// (the same float64 lanes, chunks and order of additions per gradient).
pub fn project_many(
    inputs: &Inputs,
    grads: &[&[&[f32]]],
    lambda: &[f32],
    g: Granularity,
    clamp: bool,
) -> Result<Vec<Vec<f32>>> {
    let (tasks, params) = (inputs.tasks(), inputs.params());
    for set in grads {
        if set.len() != params {
            bail!("{} gradients for {params} parameter tensors", set.len());
        }
    }
    // dots[k][i][j] = Σₙ g⁽ᵏ⁾ₙ (θᵢ − θ₀)ₙ over tensor j, in float64.
    let mut dots = vec![vec![vec![0f64; params]; tasks]; grads.len()];
    for (j, name) in inputs.names.iter().enumerate() {
        let base = inputs.base.values(name)?;
        for set in grads {
            if set[j].len() != base.len() {
                bail!(
                    "gradient of `{name}` has {} values, the tensor {}",
                    set[j].len(),
                    base.len()
                );
            }
        }
        let thetas = inputs.models.iter().map(|m| m.values(name)).collect::<Result<Vec<_>>>()?;
        // sums[c][i * K + k]: chunk c's dot of gradient k (of K) with model i.
        let chunk = |c: usize| -> Vec<f64> {
            let at = c * CHUNK;
            let end = (at + CHUNK).min(base.len());
            let b = &base[at..end];
            let gs: Vec<&[f32]> = grads.iter().map(|set| &set[j][at..end]).collect();
            // out[i * K + k]: model i, gradient k.
            let mut out = vec![0f64; grads.len() * tasks];
            for (theta, out) in thetas.iter().zip(out.chunks_mut(grads.len().max(1))) {
                dot_delta_many(&gs, &theta[at..end], b, out);
            }
            out
        };
        let chunks = base.len().div_ceil(CHUNK);
        let sums: Vec<Vec<f64>> = if base.len() <= PARALLEL_ABOVE {
            (0..chunks).map(chunk).collect()
        } else {
            (0..chunks).into_par_iter().map(chunk).collect()
        };
        for (k, item) in dots.iter_mut().enumerate() {
            for (i, row) in item.iter_mut().enumerate() {
                row[j] = sums.iter().map(|s| s[i * grads.len() + k]).sum();
            }
        }
    }
    let active = |i: usize, j: usize| {
        let w = match g {
            Granularity::TaskWise => lambda[i],
            Granularity::LayerWise => lambda[i * params + j],
        };
        !clamp || (0.0..=1.0).contains(&w)
    };
    Ok(dots
        .into_iter()
        .map(|dots| match g {
            Granularity::TaskWise => (0..tasks)
                .map(|i| if active(i, 0) { dots[i].iter().sum::<f64>() as f32 } else { 0.0 })
                .collect(),
            Granularity::LayerWise => (0..tasks)
                .flat_map(|i| (0..params).map(move |j| (i, j)))
                .map(|(i, j)| if active(i, j) { dots[i][j] as f32 } else { 0.0 })
                .collect(),
        })
        .collect())
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

    fn fixture_inputs() -> Inputs {
        use std::path::{Path, PathBuf};
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let args = ["modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8".to_string()];
        let dirs = [PathBuf::from(root).join("config")];
        let composed = crate::config::compose_from_args(&args, &dirs).unwrap();
        let cfg = composed.program_config().unwrap();
        let hub = crate::hub::Hub::new(root.join("tests/fixtures/hf_home/hub"));
        let pool = ModelPool::from_config(&cfg.modelpool, &hub).unwrap();
        Inputs::open(&pool).unwrap()
    }

    #[test]
    fn projecting_several_gradients_at_once_gives_each_its_own_bits() {
        let inputs = fixture_inputs();
        let sizes: Vec<usize> =
            inputs.shapes.iter().map(|s| s.iter().product::<i64>() as usize).collect();
        let grads: Vec<Vec<Vec<f32>>> = (0..3u64)
            .map(|k| {
                // xorshift64: values in [-1, 1), a different stream per gradient.
                let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (k + 1);
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                };
                sizes.iter().map(|&n| (0..n).map(|_| next()).collect()).collect()
            })
            .collect();
        let views: Vec<Vec<&[f32]>> =
            grads.iter().map(|set| set.iter().map(Vec::as_slice).collect()).collect();
        let sets: Vec<&[&[f32]]> = views.iter().map(Vec::as_slice).collect();
        let (t, p) = (inputs.tasks(), inputs.params());
        for g in [Granularity::TaskWise, Granularity::LayerWise] {
            let lambda = vec![0.3f32; g.shape(t, p).iter().product()];
            let many = project_many(&inputs, &sets, &lambda, g, false).unwrap();
            assert_eq!(many.len(), 3);
            for (k, set) in sets.iter().enumerate() {
                let alone = project(&inputs, set, &lambda, g, false).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&many[k]), bits(&alone), "{g:?}, gradient {k}");
            }
            // And the projection is the dot with the task vectors (naive float64 sums).
            let want: Vec<f64> = (0..t)
                .flat_map(|i| (0..p).map(move |j| (i, j)))
                .map(|(i, j)| {
                    let name = &inputs.names[j];
                    let (b, x) =
                        (inputs.base.values(name).unwrap(), inputs.models[i].values(name).unwrap());
                    (0..b.len()).map(|n| ((x[n] - b[n]) as f64) * grads[1][j][n] as f64).sum()
                })
                .collect();
            let got = &many[1];
            match g {
                Granularity::LayerWise => {
                    for (w, &v) in want.iter().zip(got) {
                        assert!((w - v as f64).abs() <= 1e-6 * w.abs().max(1e-6), "{w} vs {v}");
                    }
                }
                Granularity::TaskWise => {
                    for i in 0..t {
                        let w: f64 = want[i * p..(i + 1) * p].iter().sum();
                        assert!(
                            (w - got[i] as f64).abs() <= 1e-6 * w.abs().max(1e-6),
                            "{w} vs {}",
                            got[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_fused_lane_dots_have_the_bits_of_one_dot_each() {
        for n in [0usize, 5, 8, 37, 1003] {
            let x: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|k| (k as f32 * 0.11).cos() * 0.5).collect();
            let gs: Vec<Vec<f32>> = (0..3)
                .map(|s| (0..n).map(|k| ((k + s) as f32 * 1.7).sin() * 1e-3).collect())
                .collect();
            let views: Vec<&[f32]> = gs.iter().map(Vec::as_slice).collect();
            let mut out = vec![0f64; 3];
            dot_delta_many(&views, &x, &b, &mut out);
            for (k, g) in gs.iter().enumerate() {
                assert_eq!(out[k].to_bits(), dot_delta(g, &x, &b).to_bits(), "n = {n}, k = {k}");
            }
        }
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
