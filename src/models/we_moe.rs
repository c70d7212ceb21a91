//! Weight-Ensembling MoE blocks (Tang et al., ICML 2024, <http://arxiv.org/abs/2402.00433>), the
//! MLP that WE-MoE and sparse WE-MoE put in every encoder layer's MLP slot, with FusionBench
//! 0.2.33's state-dict names and arithmetic (`fusion_bench/models/{we_moe,sparse_we_moe}.py`).
//!
//! A block holds the pretrained MLP (`base_model.fc{1,2}.{weight,bias}`), one task vector per
//! expert (`task_vectors.{i}.…`: the fine-tuned MLP minus the pretrained one, magnitude-pruned in
//! the sparse variant) and a router (`gate.…`). For input `x` (the layer's LN2 output,
//! `[B, N, hidden]`) the router's raw outputs (no softmax) are averaged over all tokens, then
//! (FusionBench's routing, also at evaluation) over the batch, giving one coefficient per expert
//! `r`; the MLP runs with `W = W₀ + Σᵢ rᵢ τᵢ`, accumulated expert by expert in float32 as
//! FusionBench's `merge_weights` does, so the result has its bits. A depth-0 router is a free
//! vector (`gate.weight`), used as it is.
//!
//! The sparse variant's shared router appears under every layer's `gate.` (the same tensors);
//! with position encoding its input is `[sinusoid(layer); x]`, which a loaded block recognises by
//! the router's input width (`hidden + d`).

use super::clip::encoder::Linear;
use super::clip::Activation;
use crate::weights::{Scope, WeightError};
use tch::{Kind, Tensor};

/// The four MLP tensors, in `named_parameters()` order.
pub const MLP_PARAMS: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// How a block turns the router's per-token outputs into expert coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Averaged over tokens, then over the batch: one merged MLP per batch. FusionBench's
    /// behaviour in training and, since its `moe_model.batch_reduce = False` is a no-op, also at
    /// evaluation (its accuracies depend on the evaluation batch size and order).
    #[default]
    Batch,
    /// Averaged over tokens only: one merged MLP per sample (what the paper describes).
    PerSample,
}

/// A router: FusionBench's `Depth_{0,1,2}_Gate`.
#[derive(Debug)]
pub enum Router {
    /// Depth 0: a free vector of coefficients, `gate.weight` `[T]`.
    Free {
        /// `[T]`.
        weight: Tensor,
    },
    /// Depth 1: `r(h) = W h + b`, `gate.fc`.
    Linear {
        /// `hidden(+d) → T`.
        fc: Linear,
    },
    /// Depth 2: `r(h) = W₂ ReLU(W₁ h + b₁) + b₂`, `gate.fc1`, `gate.fc2`.
    Mlp {
        /// `hidden(+d) → hidden(+d)`.
        fc1: Linear,
        /// `hidden(+d) → T`.
        fc2: Linear,
    },
}

impl Router {
    /// Loads the router under `s` (a block's `gate` scope), of whichever depth is there.
    pub fn load(s: &Scope) -> Result<Self, WeightError> {
        let linear = |name: &str| -> Result<Linear, WeightError> {
            let l = s.pp(name);
            let w = l.shape("weight")?;
            let (out, inp) = match w.as_slice() {
                [o, i] => (*o, *i),
                _ => {
                    return Err(WeightError::Shape {
                        name: l.path("weight"),
                        origin: "a WE-MoE router".into(),
                        found: w,
                        expected: vec![-1, -1],
                    })
                }
            };
            Ok(Linear { weight: l.get("weight", &[out, inp])?, bias: l.get("bias", &[out])? })
        };
        if s.contains("fc1.weight") {
            Ok(Router::Mlp { fc1: linear("fc1")?, fc2: linear("fc2")? })
        } else if s.contains("fc.weight") {
            Ok(Router::Linear { fc: linear("fc")? })
        } else {
            let n = s.shape("weight")?;
            Ok(Router::Free { weight: s.get("weight", &n)? })
        }
    }

    /// Hidden layers: 0, 1 or 2 (`router_hidden_layers`).
    pub fn depth(&self) -> usize {
        match self {
            Router::Free { .. } => 0,
            Router::Linear { .. } => 1,
            Router::Mlp { .. } => 2,
        }
    }

    /// Experts routed over.
    pub fn experts(&self) -> i64 {
        match self {
            Router::Free { weight } => weight.size()[0],
            Router::Linear { fc } => fc.weight.size()[0],
            Router::Mlp { fc2, .. } => fc2.weight.size()[0],
        }
    }

    /// The router's input width, `None` for a free vector.
    pub fn input_size(&self) -> Option<i64> {
        match self {
            Router::Free { .. } => None,
            Router::Linear { fc } => Some(fc.weight.size()[1]),
            Router::Mlp { fc1, .. } => Some(fc1.weight.size()[1]),
        }
    }

    /// The parameters, with their names under `gate.` in `named_parameters()` order.
    pub fn parameters(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Router::Free { weight } => vec![("weight", weight)],
            Router::Linear { fc } => vec![("fc.weight", &fc.weight), ("fc.bias", &fc.bias)],
            Router::Mlp { fc1, fc2 } => vec![
                ("fc1.weight", &fc1.weight),
                ("fc1.bias", &fc1.bias),
                ("fc2.weight", &fc2.weight),
                ("fc2.bias", &fc2.bias),
            ],
        }
    }

    /// Raw per-token outputs `[B, N, T]` of a depth-1 or depth-2 router.
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Router::Free { weight } => weight.shallow_clone(),
            Router::Linear { fc } => fc.forward(x),
            Router::Mlp { fc1, fc2 } => fc2.forward(&fc1.forward(x).relu()),
        }
    }
}

/// FusionBench's layer-index encoding (`sparse_we_moe.positional_encoding`): for `k < d/2`,
/// `ω_k = 1 / 10000^(2k/d)`, then `[sin(l ω_k)]_k ++ [cos(l ω_k)]_k`, computed in float64 (NumPy)
/// and cast to float32.
pub fn position_encoding(layer: usize, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let rates: Vec<f64> =
        (0..half).map(|k| 1.0 / 10000f64.powf((2 * k) as f64 / dim as f64)).collect();
    let pos = layer as f64;
    let mut out: Vec<f32> = rates.iter().map(|w| (pos * w).sin() as f32).collect();
    out.extend(rates.iter().map(|w| (pos * w).cos() as f32));
    out
}

/// One encoder layer's weight-ensembling MLP.
#[derive(Debug)]
pub struct WeMoeMlp {
    router: Router,
    base: Vec<Tensor>,
    task_vectors: Vec<Vec<Tensor>>,
    position: Option<Tensor>,
    routing: Routing,
}

impl WeMoeMlp {
    /// Loads a block under `s` (a layer's `mlp` scope): `base_model.*`, `task_vectors.{i}.*`
    /// (as many experts as the router has) and `gate.*`; `hidden`/`intermediate` are the
    /// encoder's sizes; `layer` is the layer's index (for a router whose input is
    /// position-encoded).
    pub fn load(
        s: &Scope,
        hidden: i64,
        intermediate: i64,
        layer: usize,
        routing: Routing,
    ) -> Result<Self, WeightError> {
        let router = Router::load(&s.pp("gate"))?;
        let shapes = [
            vec![intermediate, hidden],
            vec![intermediate],
            vec![hidden, intermediate],
            vec![hidden],
        ];
        let mlp = |scope: Scope| -> Result<Vec<Tensor>, WeightError> {
            MLP_PARAMS.iter().zip(&shapes).map(|(n, shape)| scope.get(n, shape)).collect()
        };
        let base = mlp(s.pp("base_model"))?;
        let task_vectors = (0..router.experts())
            .map(|i| mlp(s.pp("task_vectors").pp(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let position = match router.input_size() {
            Some(n) if n > hidden => {
                let pe = position_encoding(layer, (n - hidden) as usize);
                Some(Tensor::from_slice(&pe).to_device(s.device()))
            }
            Some(n) if n < hidden => {
                return Err(WeightError::Shape {
                    name: s.pp("gate").path("…weight"),
                    origin: "a WE-MoE router".into(),
                    found: vec![n],
                    expected: vec![hidden],
                })
            }
            _ => None,
        };
        Ok(Self { router, base, task_vectors, position, routing })
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Expert coefficients of a batch: `[T]` for batch routing (or a free vector), `[B, T]`
    /// per sample.
    pub fn coefficients(&self, x: &Tensor) -> Tensor {
        if let Router::Free { weight } = &self.router {
            return weight.shallow_clone();
        }
        let input = match &self.position {
            Some(pe) => {
                let (b, n, _) =
                    x.size3().expect("a WE-MoE block's input is [batch, tokens, hidden]");
                let d = pe.size()[0];
                let pe = pe.view([1, 1, d]).expand([b, n, d], false);
                Tensor::cat(&[pe, x.shallow_clone()], -1)
            }
            None => x.shallow_clone(),
        };
        let r = self.router.forward(&input).mean_dim(1, false, None::<Kind>);
        match self.routing {
            Routing::Batch => r.mean_dim(0, false, None::<Kind>),
            Routing::PerSample => r,
        }
    }

    /// `fc2(act(fc1(x)))` under the mixed weights: one mix per batch, or per sample.
    pub fn forward(&self, x: &Tensor, activation: Activation) -> Tensor {
        let r = self.coefficients(x);
        if r.dim() == 1 {
            return self.mixed_forward(&r, x, activation);
        }
        let b = r.size()[0];
        let outs: Vec<Tensor> =
            (0..b).map(|i| self.mixed_forward(&r.get(i), &x.narrow(0, i, 1), activation)).collect();
        Tensor::cat(&outs, 0)
    }

    /// W₀ + Σᵢ rᵢ τᵢ, expert by expert (FusionBench's `merge_weights`), then the MLP.
    fn mixed_forward(&self, r: &Tensor, x: &Tensor, activation: Activation) -> Tensor {
        let mut w: Vec<Tensor> = self.base.iter().map(Tensor::shallow_clone).collect();
        for (i, tv) in self.task_vectors.iter().enumerate() {
            let ri = r.get(i as i64);
            for (acc, t) in w.iter_mut().zip(tv) {
                *acc = &*acc + &ri * t;
            }
        }
        let h = activation.apply(&x.linear(&w[0], Some(&w[1])));
        h.linear(&w[2], Some(&w[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightMap;
    use tch::Device;

    /// These tests draw from libtorch's global generator: they take turns with the others.
    fn held() -> std::sync::MutexGuard<'static, ()> {
        crate::tta::torch_rng::GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn block(depth: usize, pe: usize, routing: Routing) -> (WeightMap, WeMoeMlp) {
        let (h, m, t) = (6i64, 10i64, 3i64);
        tch::manual_seed(3);
        let mut map = WeightMap::new();
        let shapes = [vec![m, h], vec![m], vec![h, m], vec![h]];
        for (n, s) in MLP_PARAMS.iter().zip(&shapes) {
            map.insert(
                format!("mlp.base_model.{n}"),
                Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)),
            );
            for i in 0..t {
                map.insert(
                    format!("mlp.task_vectors.{i}.{n}"),
                    Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.1,
                );
            }
        }
        let randn = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu)) * 0.3;
        match depth {
            0 => map.insert("mlp.gate.weight", randn(&[t])),
            1 => {
                map.insert("mlp.gate.fc.weight", randn(&[t, h + pe as i64]));
                map.insert("mlp.gate.fc.bias", randn(&[t]));
            }
            _ => {
                let g = h + pe as i64;
                map.insert("mlp.gate.fc1.weight", randn(&[g, g]));
                map.insert("mlp.gate.fc1.bias", randn(&[g]));
                map.insert("mlp.gate.fc2.weight", randn(&[t, g]));
                map.insert("mlp.gate.fc2.bias", randn(&[t]));
            }
        }
        let s = Scope::new(&map, Device::Cpu, Kind::Float).pp("mlp");
        let b = WeMoeMlp::load(&s, h, m, 2, routing).unwrap();
        (map, b)
    }

    /// The block against the formula written out in float64 from its own tensors.
    fn reference(map: &WeightMap, x: &Tensor, depth: usize, pe: usize, per_sample: bool) -> Tensor {
        let g = |n: &str| map.get(n).unwrap().to_kind(Kind::Double);
        let (b, n, _) = x.size3().unwrap();
        let x = x.to_kind(Kind::Double);
        let input = if pe > 0 {
            let enc: Vec<f64> = position_encoding(2, pe).iter().map(|&v| v as f64).collect();
            let enc =
                Tensor::from_slice(&enc).view([1, 1, pe as i64]).expand([b, n, pe as i64], false);
            Tensor::cat(&[enc, x.shallow_clone()], -1)
        } else {
            x.shallow_clone()
        };
        let r = match depth {
            0 => g("mlp.gate.weight").view([1, -1]).expand([b, -1], false),
            1 => input.linear(&g("mlp.gate.fc.weight"), Some(g("mlp.gate.fc.bias"))).mean_dim(
                1,
                false,
                Kind::Double,
            ),
            _ => input
                .linear(&g("mlp.gate.fc1.weight"), Some(g("mlp.gate.fc1.bias")))
                .relu()
                .linear(&g("mlp.gate.fc2.weight"), Some(g("mlp.gate.fc2.bias")))
                .mean_dim(1, false, Kind::Double),
        };
        let r = if per_sample && depth > 0 {
            r
        } else {
            r.mean_dim(0, true, Kind::Double).expand([b, -1], false)
        };
        let outs: Vec<Tensor> = (0..b)
            .map(|s| {
                let w: Vec<Tensor> = MLP_PARAMS
                    .iter()
                    .map(|p| {
                        let mut acc = g(&format!("mlp.base_model.{p}"));
                        for i in 0..3 {
                            acc += g(&format!("mlp.task_vectors.{i}.{p}")) * r.get(s).get(i);
                        }
                        acc
                    })
                    .collect();
                let h = Activation::QuickGelu.apply(&x.narrow(0, s, 1).linear(&w[0], Some(&w[1])));
                h.linear(&w[2], Some(&w[3]))
            })
            .collect();
        Tensor::cat(&outs, 0)
    }

    #[test]
    fn every_depth_routing_and_position_encoding_computes_the_mixture() {
        let _held = held();
        for (depth, pe, routing) in [
            (2, 0, Routing::Batch),
            (2, 4, Routing::Batch),
            (1, 0, Routing::Batch),
            (0, 0, Routing::Batch),
            (2, 0, Routing::PerSample),
            (1, 4, Routing::PerSample),
        ] {
            let (map, b) = block(depth, pe, routing);
            assert_eq!(b.router().depth(), depth);
            assert_eq!(b.router().experts(), 3);
            let x = Tensor::randn([4, 5, 6], (Kind::Float, Device::Cpu));
            let got = b.forward(&x, Activation::QuickGelu).to_kind(Kind::Double);
            let want = reference(&map, &x, depth, pe, routing == Routing::PerSample);
            let err = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "depth {depth} pe {pe} {routing:?}: {err} of {scale}"
            );
        }
    }

    #[test]
    fn batch_routing_mixes_once_per_batch_and_per_sample_routing_does_not() {
        let _held = held();
        let (_, batch) = block(2, 0, Routing::Batch);
        let (_, sample) = block(2, 0, Routing::PerSample);
        let x = Tensor::randn([3, 5, 6], (Kind::Float, Device::Cpu));
        assert_eq!(batch.coefficients(&x).size(), vec![3]);
        assert_eq!(sample.coefficients(&x).size(), vec![3, 3]);
        // Batch routing: a sample's output depends on the others in its batch.
        let alone = batch.forward(&x.narrow(0, 0, 1), Activation::QuickGelu);
        let together = batch.forward(&x, Activation::QuickGelu).narrow(0, 0, 1);
        assert!((&alone - &together).abs().max().double_value(&[]) > 1e-7);
        // Per sample it does not (up to BLAS blocking, which a batch's size changes).
        let alone = sample.forward(&x.narrow(0, 0, 1), Activation::QuickGelu);
        let together = sample.forward(&x, Activation::QuickGelu).narrow(0, 0, 1);
        let scale = alone.abs().max().double_value(&[]);
        assert!((&alone - &together).abs().max().double_value(&[]) <= 1e-6 * scale.max(1.0));
    }

    #[test]
    fn the_position_encoding_is_fusionbenchs_sinusoid() {
        let pe = position_encoding(3, 8);
        assert_eq!(pe.len(), 8);
        for k in 0..4 {
            let w = 1.0 / 10000f64.powf(2.0 * k as f64 / 8.0);
            assert_eq!(pe[k], (3.0 * w).sin() as f32);
            assert_eq!(pe[k + 4], (3.0 * w).cos() as f32);
        }
        assert_eq!(position_encoding(0, 8)[..4], [0.0; 4]);
    }
}
