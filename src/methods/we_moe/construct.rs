//! The WE-MoE model FusionBench's `construct_moe_model` builds, as a state dict with its names
//! and order: every non-MLP tensor is task arithmetic at `init_lambda` (θ₀ + λ Σᵢ τᵢ), and every
//! encoder layer's MLP becomes a block over the **pretrained** MLP, the task vectors
//! `mlpᵢ − mlp₀` (magnitude-pruned per tensor in the sparse variant) and a router.

use super::init::RouterInit;
use crate::methods::{Method, RunContext};
use crate::models::clip::vision::parameter_names;
use crate::models::we_moe::MLP_PARAMS;
use crate::weights::WeightMap;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// The sizes a WE-MoE state dict is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Encoder layers.
    pub layers: usize,
    /// Hidden width.
    pub hidden: i64,
    /// MLP width.
    pub intermediate: i64,
    /// Experts (fine-tuned models), in pool order.
    pub experts: usize,
    /// Router hidden layers (0, 1, 2).
    pub depth: usize,
    /// Extra router inputs (the sparse variant's position encoding), 0 without.
    pub position_dim: usize,
}

impl Layout {
    /// The router's tensors under `gate.` with their shapes, in `named_parameters()` order.
    pub fn router_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        // FusionBench widens the whole router by the position encoding (its hidden layer too).
        let (g, t) = (self.hidden + self.position_dim as i64, self.experts as i64);
        match self.depth {
            0 => vec![("weight", vec![t])],
            1 => vec![("fc.weight", vec![t, g]), ("fc.bias", vec![t])],
            _ => vec![
                ("fc1.weight", vec![g, g]),
                ("fc1.bias", vec![g]),
                ("fc2.weight", vec![t, g]),
                ("fc2.bias", vec![t]),
            ],
        }
    }

    /// Every key of the state dict with its shape, in FusionBench's order: the vision model's
    /// parameters with each layer's `mlp.fc*` replaced by `mlp.gate.*`, `mlp.base_model.*`,
    /// `mlp.task_vectors.{i}.*`.
    pub fn keys(&self, dense: &[(String, Vec<i64>)]) -> Vec<(String, Vec<i64>)> {
        let mut out = Vec::new();
        for (name, shape) in dense {
            let Some((layer, rest)) = mlp_key(name) else {
                out.push((name.clone(), shape.clone()));
                continue;
            };
            // The block's keys go where the layer's first MLP tensor was.
            if rest != MLP_PARAMS[0] {
                continue;
            }
            let p = format!("vision_model.encoder.layers.{layer}.mlp");
            for (n, s) in self.router_shapes() {
                out.push((format!("{p}.gate.{n}"), s));
            }
            let shapes = self.mlp_shapes();
            for (n, s) in MLP_PARAMS.iter().zip(&shapes) {
                out.push((format!("{p}.base_model.{n}"), s.clone()));
            }
            for i in 0..self.experts {
                for (n, s) in MLP_PARAMS.iter().zip(&shapes) {
                    out.push((format!("{p}.task_vectors.{i}.{n}"), s.clone()));
                }
            }
        }
        out
    }

    fn mlp_shapes(&self) -> [Vec<i64>; 4] {
        let (h, m) = (self.hidden, self.intermediate);
        [vec![m, h], vec![m], vec![h, m], vec![h]]
    }
}

/// `(layer, "fc1.weight")` for `vision_model.encoder.layers.{layer}.mlp.fc1.weight`.
pub fn mlp_key(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("vision_model.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.")?;
    Some((layer.parse().ok()?, rest))
}

/// The dense vision model's `vision_model.*` names and shapes.
pub fn dense_keys(ctx: &RunContext<'_>) -> Vec<(String, Vec<i64>)> {
    let c = ctx.pool.config();
    let shapes = crate::models::clip::vision::parameter_shapes(c);
    parameter_names(c).into_iter().map(|n| format!("vision_model.{n}")).zip(shapes).collect()
}

/// How the task vectors are sparsified.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pruning {
    /// Dense task vectors (WE-MoE).
    None,
    /// Keep `|τ| > quantile(|τ|, ratio)` per tensor (sparse WE-MoE's `tv_prune_ratio`).
    Magnitude(f64),
}

/// Builds the MoE state dict: task arithmetic at `init_lambda`, then per layer the block, its
/// router drawn by `routers` (FusionBench's initialisation replayed, see [`RouterInit`]).
pub fn construct(
    ctx: &RunContext<'_>,
    layout: &Layout,
    init_lambda: f64,
    pruning: Pruning,
    routers: &mut RouterInit,
) -> Result<WeightMap> {
    let ta = crate::methods::task_arithmetic::TaskArithmetic::with_scaling_factor(init_lambda)
        .run(ctx)
        .context("the MoE model's non-MLP weights (task arithmetic at init_lambda)")?
        .weights;
    let base = ctx.pool.pretrained()?;
    let models = ctx.pool.task_models()?;
    if models.len() != layout.experts {
        bail!("{} fine-tuned models, {} experts", models.len(), layout.experts);
    }
    let _guard = tch::no_grad_guard();
    let mut out = WeightMap::new();
    let bar = crate::progress::bar("upscaling to WE-MoE", layout.layers, "layers");
    for (name, tensor) in ta.iter() {
        let Some((layer, rest)) = mlp_key(name) else {
            out.insert(name, tensor.shallow_clone());
            continue;
        };
        if rest != MLP_PARAMS[0] {
            continue;
        }
        let p = format!("vision_model.encoder.layers.{layer}.mlp");
        for (n, t) in routers.layer(layer, layout)? {
            out.insert(format!("{p}.gate.{n}"), t);
        }
        let names: Vec<String> = MLP_PARAMS.iter().map(|n| format!("{p}.{n}")).collect();
        let w0: Vec<Tensor> = names.iter().map(|n| base.get(n)).collect::<Result<_>>()?;
        for (n, t) in MLP_PARAMS.iter().zip(&w0) {
            out.insert(format!("{p}.base_model.{n}"), t.shallow_clone());
        }
        for (i, m) in models.iter().enumerate() {
            for ((n, full), t0) in MLP_PARAMS.iter().zip(&names).zip(&w0) {
                let tv = m.get(full)? - t0;
                let tv = match pruning {
                    Pruning::None => tv,
                    Pruning::Magnitude(ratio) => {
                        magnitude_prune(&tv, ratio).with_context(|| {
                            format!("pruning the task vector of `{}` at {full}", m.name())
                        })?
                    }
                };
                out.insert(format!("{p}.task_vectors.{i}.{n}"), tv);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// `τ * (|τ| > quantile(|τ|, ratio))`: `torch.quantile`'s linear interpolation over the
/// tensor's elements, a strict `>` (FusionBench's `_magnitude_prune`). Computed with libtorch's
/// own `quantile`, so the threshold has its bits.
pub fn magnitude_prune(tv: &Tensor, ratio: f64) -> Result<Tensor> {
    let a = tv.abs();
    // torch.quantile takes at most 2^24 elements; FusionBench would fail the same way.
    let q = a.f_quantile_scalar(ratio, None::<i64>, false, "linear")?;
    let mask = a.gt_tensor(&q);
    Ok(tv * mask.to_kind(Kind::Bool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_keys_are_recognised() {
        assert_eq!(mlp_key("vision_model.encoder.layers.11.mlp.fc2.bias"), Some((11, "fc2.bias")));
        assert_eq!(mlp_key("vision_model.encoder.layers.1.self_attn.q_proj.bias"), None);
        assert_eq!(mlp_key("vision_model.post_layernorm.weight"), None);
    }

    #[test]
    fn the_state_dict_layout_is_fusionbenchs() {
        let l =
            Layout { layers: 1, hidden: 4, intermediate: 6, experts: 2, depth: 2, position_dim: 0 };
        let dense: Vec<(String, Vec<i64>)> = [
            ("vision_model.encoder.layers.0.layer_norm1.weight", vec![4]),
            ("vision_model.encoder.layers.0.mlp.fc1.weight", vec![6, 4]),
            ("vision_model.encoder.layers.0.mlp.fc1.bias", vec![6]),
            ("vision_model.encoder.layers.0.mlp.fc2.weight", vec![4, 6]),
            ("vision_model.encoder.layers.0.mlp.fc2.bias", vec![4]),
            ("vision_model.encoder.layers.0.layer_norm2.weight", vec![4]),
        ]
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
        let keys: Vec<String> = l.keys(&dense).into_iter().map(|(n, _)| n).collect();
        let p = "vision_model.encoder.layers.0";
        let mut want = vec![format!("{p}.layer_norm1.weight")];
        for n in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            want.push(format!("{p}.mlp.gate.{n}"));
        }
        for m in ["base_model", "task_vectors.0", "task_vectors.1"] {
            for n in MLP_PARAMS {
                want.push(format!("{p}.mlp.{m}.{n}"));
            }
        }
        want.push(format!("{p}.layer_norm2.weight"));
        assert_eq!(keys, want);
        let l0 = Layout { depth: 0, ..l.clone() };
        assert_eq!(l0.router_shapes(), vec![("weight", vec![2])]);
        let l1 = Layout { depth: 1, position_dim: 8, ..l.clone() };
        assert_eq!(l1.router_shapes()[0], ("fc.weight", vec![2, 12]));
        let l2 = Layout { position_dim: 8, ..l };
        assert_eq!(l2.router_shapes()[0], ("fc1.weight", vec![12, 12]));
        assert_eq!(l2.router_shapes()[2], ("fc2.weight", vec![2, 12]));
    }

    #[test]
    fn pruning_keeps_what_is_strictly_above_the_interpolated_quantile() {
        let t = Tensor::from_slice(&[0.5f32, -4.0, 1.0, -2.0, 3.0]);
        // |t| sorted: 0.5 1 2 3 4; quantile 0.5 = 2 → keep 3, 4 (strict).
        let p = magnitude_prune(&t, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), vec![0.0, -4.0, 0.0, 0.0, 3.0]);
        // 0.9: between 3 and 4 at 0.6 → 3.6: keep only 4.
        let p = magnitude_prune(&t, 0.9).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), vec![0.0, -4.0, 0.0, 0.0, 0.0]);
        // Ratio 0: the minimum itself is pruned.
        let p = magnitude_prune(&t, 0.0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), vec![0.0, -4.0, 1.0, -2.0, 3.0]);
    }
}
