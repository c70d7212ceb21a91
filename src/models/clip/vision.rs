//! The CLIP vision tower (`CLIPVisionTransformer`): patch embedding, class token, positions,
//! pre-LN, encoder, post-LN on the class token.

use super::config::VisionConfig;
use super::encoder::{Encoder, LayerNorm, LinearObserver, LoadOptions, LAYER_PARAMS};
use crate::weights::{Scope, WeightError};
use tch::Tensor;

/// Names of a `CLIPVisionModel`'s parameters (without the `vision_model.` prefix) in
/// `named_parameters()` order — the column order of layer-wise AdaMerging weights.
pub fn parameter_names(c: &VisionConfig) -> Vec<String> {
    let mut names: Vec<String> = [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "pre_layrnorm.bias",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for l in 0..c.encoder.num_hidden_layers {
        names.extend(LAYER_PARAMS.iter().map(|p| format!("encoder.layers.{l}.{p}")));
    }
    names.push("post_layernorm.weight".into());
    names.push("post_layernorm.bias".into());
    names
}

/// The shape of each parameter named by [`parameter_names`], in the same order.
pub fn parameter_shapes(c: &VisionConfig) -> Vec<Vec<i64>> {
    let (h, m) = (c.encoder.hidden_size, c.encoder.intermediate_size);
    let mut shapes = vec![
        vec![h],
        vec![h, c.num_channels, c.patch_size, c.patch_size],
        vec![c.num_positions(), h],
        vec![h],
        vec![h],
    ];
    let layer = [
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h],
        vec![h],
        vec![m, h],
        vec![m],
        vec![h, m],
        vec![h],
        vec![h],
        vec![h],
    ];
    for _ in 0..c.encoder.num_hidden_layers {
        shapes.extend(layer.iter().cloned());
    }
    shapes.push(vec![h]);
    shapes.push(vec![h]);
    shapes
}

/// A loaded vision tower (the `vision_model` of a `CLIPVisionModel` or `CLIPModel`).
#[derive(Debug)]
pub struct ClipVision {
    config: VisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl ClipVision {
    /// Loads the tower from `s`, the `vision_model` scope, checking every shape against `config`.
    /// A layer whose MLP is a WE-MoE block (FusionBench's state-dict names) loads as one.
    pub fn load(s: &Scope, config: &VisionConfig) -> Result<Self, WeightError> {
        Self::load_with(s, config, &LoadOptions::default())
    }

    /// [`ClipVision::load`] with `options` (how WE-MoE blocks route).
    pub fn load_with(
        s: &Scope,
        config: &VisionConfig,
        options: &LoadOptions,
    ) -> Result<Self, WeightError> {
        let c = config;
        let h = c.encoder.hidden_size;
        let eps = c.encoder.layer_norm_eps;
        let e = s.pp("embeddings");
        Ok(Self {
            class_embedding: e.get("class_embedding", &[h])?,
            patch_embedding: e
                .get("patch_embedding.weight", &[h, c.num_channels, c.patch_size, c.patch_size])?,
            position_embedding: e.get("position_embedding.weight", &[c.num_positions(), h])?,
            pre_layrnorm: LayerNorm::load(&s.pp("pre_layrnorm"), h, eps)?,
            encoder: Encoder::load_with(&s.pp("encoder"), &c.encoder, options)?,
            post_layernorm: LayerNorm::load(&s.pp("post_layernorm"), h, eps)?,
            config: c.clone(),
        })
    }

    /// The tower's config.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The final hidden states `[B, tokens, hidden]` (`last_hidden_state`).
    pub fn last_hidden_state(&self, pixel_values: &Tensor) -> Tensor {
        self.last_hidden_state_observed(pixel_values, None)
    }

    /// [`ClipVision::last_hidden_state`], showing every encoder Linear's input to `observer`.
    pub fn last_hidden_state_observed(
        &self,
        pixel_values: &Tensor,
        observer: Option<&dyn LinearObserver>,
    ) -> Tensor {
        let p = self.config.patch_size;
        let patches = pixel_values
            .conv2d(&self.patch_embedding, None::<Tensor>, [p, p], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let b = patches.size()[0];
        let h = self.config.encoder.hidden_size;
        let cls = self.class_embedding.view([1, 1, h]).expand([b, 1, h], false);
        let x = Tensor::cat(&[cls, patches], 1) + &self.position_embedding;
        let x = self.pre_layrnorm.forward(&x);
        self.encoder.forward_observed(&x, None, observer)
    }

    /// `pooler_output`: post-LN of the class token, `[B, hidden]`. This is what FusionBench
    /// takes from a (merged) vision model.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let h = self.last_hidden_state(pixel_values);
        self.post_layernorm.forward(&h.select(1, 0))
    }
}
