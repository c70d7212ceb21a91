//! The pre-LN transformer encoder both CLIP towers share (`CLIPEncoderLayer`):
//! `h += out_proj(MHA(LN1 h))`, then `h += mlp(LN2 h)`, where the MLP slot holds the dense
//! `fc2(act(fc1(·)))` or, for a WE-MoE model, a weight-ensembling block
//! ([`crate::models::we_moe`]), recognised by its state-dict names. A forward may carry a
//! [`LinearObserver`], shown the input of every Linear (RegMean's Gram matrices).

use super::config::{Activation, EncoderConfig};
use crate::models::we_moe::{Routing, WeMoeMlp};
use crate::weights::{Scope, WeightError};
use tch::Tensor;

/// Parameter names of one encoder layer, in `named_parameters()` order (k, v, q, out).
pub const LAYER_PARAMS: [&str; 16] = [
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "layer_norm1.weight",
    "layer_norm1.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
];

/// An input that Linear layers of an encoder layer read: q, k and v share the LN1 output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// The LN1 output, read by `self_attn.{k,v,q}_proj`.
    Attention,
    /// The attention heads' output, read by `self_attn.out_proj`.
    OutProj,
    /// The LN2 output, read by `mlp.fc1` (dense MLPs only).
    Fc1,
    /// The activation of `fc1`'s output, read by `mlp.fc2` (dense MLPs only).
    Fc2,
}

impl LinearInput {
    /// Every input, in the order a forward meets them.
    pub const ALL: [LinearInput; 4] =
        [LinearInput::Attention, LinearInput::OutProj, LinearInput::Fc1, LinearInput::Fc2];

    /// The Linear modules under a layer that read this input, in `named_modules()` order.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            LinearInput::Attention => &["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
            LinearInput::OutProj => &["self_attn.out_proj"],
            LinearInput::Fc1 => &["mlp.fc1"],
            LinearInput::Fc2 => &["mlp.fc2"],
        }
    }
}

/// Shown, during a forward, the input `x` (`[batch, tokens, width]`) of every Linear of every
/// encoder layer, once per distinct input (see [`LinearInput`]).
pub trait LinearObserver {
    /// Layer `layer`'s input `input` is `x`.
    fn observe(&self, layer: usize, input: LinearInput, x: &Tensor);
}

/// A linear layer's weight and bias.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Linear {
    fn load(s: &Scope, out: i64, inp: i64) -> Result<Self, WeightError> {
        Ok(Self { weight: s.get("weight", &[out, inp])?, bias: s.get("bias", &[out])? })
    }
    /// `x Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// A LayerNorm's affine parameters.
#[derive(Debug)]
pub struct LayerNorm {
    /// γ.
    pub weight: Tensor,
    /// β.
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim`.
    pub fn load(s: &Scope, dim: i64, eps: f64) -> Result<Self, WeightError> {
        Ok(Self { weight: s.get("weight", &[dim])?, bias: s.get("bias", &[dim])?, eps })
    }
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().unwrap_or(&1);
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// What fills a layer's MLP slot.
#[derive(Debug)]
pub enum Mlp {
    /// `fc2(act(fc1(x)))` (`mlp.fc{1,2}.*`).
    Dense {
        /// `hidden → intermediate`.
        fc1: Linear,
        /// `intermediate → hidden`.
        fc2: Linear,
    },
    /// A weight-ensembling MoE block (`mlp.gate.*`, `mlp.base_model.*`, `mlp.task_vectors.*`).
    WeightEnsembling(Box<WeMoeMlp>),
}

impl Mlp {
    /// Loads the slot under `s` (a layer's `mlp` scope): dense when `fc1.weight` is there, else a
    /// WE-MoE block.
    fn load(
        s: &Scope,
        c: &EncoderConfig,
        layer: usize,
        options: &LoadOptions,
    ) -> Result<Self, WeightError> {
        let (h, m) = (c.hidden_size, c.intermediate_size);
        if s.contains("fc1.weight") || !s.contains("base_model.fc1.weight") {
            return Ok(Mlp::Dense {
                fc1: Linear::load(&s.pp("fc1"), m, h)?,
                fc2: Linear::load(&s.pp("fc2"), h, m)?,
            });
        }
        Ok(Mlp::WeightEnsembling(Box::new(WeMoeMlp::load(s, h, m, layer, options.routing)?)))
    }

    /// The slot's output for `x` (the LN2 output).
    pub fn forward(&self, x: &Tensor, activation: Activation) -> Tensor {
        self.forward_observed(x, activation, None)
    }

    /// [`Mlp::forward`], showing a dense MLP's Linear inputs to `observer` as layer `.1`'s.
    fn forward_observed(
        &self,
        x: &Tensor,
        activation: Activation,
        observer: Option<(&dyn LinearObserver, usize)>,
    ) -> Tensor {
        match self {
            Mlp::Dense { fc1, fc2 } => {
                if let Some((o, layer)) = observer {
                    o.observe(layer, LinearInput::Fc1, x);
                }
                let a = activation.apply(&fc1.forward(x));
                if let Some((o, layer)) = observer {
                    o.observe(layer, LinearInput::Fc2, &a);
                }
                fc2.forward(&a)
            }
            Mlp::WeightEnsembling(b) => b.forward(x, activation),
        }
    }
}

/// Choices a loaded model makes that its weights do not say.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How WE-MoE blocks route (FusionBench's batch routing by default).
    pub routing: Routing,
}

/// One encoder layer.
#[derive(Debug)]
pub struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln1: LayerNorm,
    mlp: Mlp,
    ln2: LayerNorm,
}

impl EncoderLayer {
    fn load(
        s: &Scope,
        c: &EncoderConfig,
        layer: usize,
        options: &LoadOptions,
    ) -> Result<Self, WeightError> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let a = s.pp("self_attn");
        Ok(Self {
            k: Linear::load(&a.pp("k_proj"), h, h)?,
            v: Linear::load(&a.pp("v_proj"), h, h)?,
            q: Linear::load(&a.pp("q_proj"), h, h)?,
            out: Linear::load(&a.pp("out_proj"), h, h)?,
            ln1: LayerNorm::load(&s.pp("layer_norm1"), h, eps)?,
            mlp: Mlp::load(&s.pp("mlp"), c, layer, options)?,
            ln2: LayerNorm::load(&s.pp("layer_norm2"), h, eps)?,
        })
    }

    /// The layer's MLP slot.
    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    fn forward(
        &self,
        h: &Tensor,
        c: &EncoderConfig,
        mask: Option<&Tensor>,
        observer: Option<(&dyn LinearObserver, usize)>,
    ) -> Tensor {
        let (b, l, d) = h.size3().expect("encoder input is [batch, tokens, hidden]");
        let heads = c.num_attention_heads;
        let split = |t: Tensor| t.view([b, l, heads, d / heads]).transpose(1, 2);
        let x = self.ln1.forward(h);
        if let Some((o, layer)) = observer {
            o.observe(layer, LinearInput::Attention, &x);
        }
        let (q, k, v) =
            (split(self.q.forward(&x)), split(self.k.forward(&x)), split(self.v.forward(&x)));
        let scale = (c.head_dim() as f64).powf(-0.5);
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, false);
        let a = a.transpose(1, 2).contiguous().view([b, l, d]);
        if let Some((o, layer)) = observer {
            o.observe(layer, LinearInput::OutProj, &a);
        }
        let h = h + self.out.forward(&a);
        let x = self.ln2.forward(&h);
        h + self.mlp.forward_observed(&x, c.activation, observer)
    }
}

/// The stack of encoder layers (`encoder.layers.{i}`).
#[derive(Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    config: EncoderConfig,
}

impl Encoder {
    /// Loads `layers.{0..n}` under `s` (the `encoder` scope).
    pub fn load(s: &Scope, c: &EncoderConfig) -> Result<Self, WeightError> {
        Self::load_with(s, c, &LoadOptions::default())
    }

    /// [`Encoder::load`] with `options`.
    pub fn load_with(
        s: &Scope,
        c: &EncoderConfig,
        options: &LoadOptions,
    ) -> Result<Self, WeightError> {
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&s.pp("layers").pp(i), c, i as usize, options))
            .collect::<Result<_, _>>()?;
        Ok(Self { layers, config: c.clone() })
    }

    /// The layers.
    pub fn layers(&self) -> &[EncoderLayer] {
        &self.layers
    }

    /// Runs every layer; `mask` (bool, `[B, 1, L, L]`, true = may attend) is optional.
    pub fn forward(&self, h: &Tensor, mask: Option<&Tensor>) -> Tensor {
        self.forward_observed(h, mask, None)
    }

    /// [`Encoder::forward`], showing every Linear's input to `observer`.
    pub fn forward_observed(
        &self,
        h: &Tensor,
        mask: Option<&Tensor>,
        observer: Option<&dyn LinearObserver>,
    ) -> Tensor {
        let mut h = h.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &self.config, mask, observer.map(|o| (o, i)));
        }
        h
    }
}
