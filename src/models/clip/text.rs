//! The CLIP text tower (`CLIPTextTransformer`): token and position embeddings, causal (and
//! padding) masked encoder, final LayerNorm, pooling at the EOS token.

use super::config::TextConfig;
use super::encoder::{Encoder, LayerNorm};
use crate::weights::{Scope, WeightError};
use tch::{Kind, Tensor};

/// A loaded text tower (the `text_model` of a `CLIPModel`).
#[derive(Debug)]
pub struct ClipText {
    config: TextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
}

impl ClipText {
    /// Loads the tower from `s`, the `text_model` scope.
    pub fn load(s: &Scope, config: &TextConfig) -> Result<Self, WeightError> {
        let h = config.encoder.hidden_size;
        let e = s.pp("embeddings");
        Ok(Self {
            token_embedding: e.get("token_embedding.weight", &[config.vocab_size, h])?,
            position_embedding: e
                .get("position_embedding.weight", &[config.max_position_embeddings, h])?,
            encoder: Encoder::load(&s.pp("encoder"), &config.encoder)?,
            final_layer_norm: LayerNorm::load(
                &s.pp("final_layer_norm"),
                h,
                config.encoder.layer_norm_eps,
            )?,
            config: config.clone(),
        })
    }

    /// The tower's config.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// `pooler_output` `[B, hidden]` for `input_ids` `[B, L]` (int64) and an optional
    /// `attention_mask` `[B, L]` (1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        let (b, l) = input_ids.size2().expect("input_ids is [batch, length]");
        let device = input_ids.device();
        let x = Tensor::embedding(&self.token_embedding, input_ids, -1, false, false)
            + self.position_embedding.narrow(0, 0, l);
        let causal = Tensor::ones([l, l], (Kind::Bool, device)).tril(0);
        let mut mask = causal.view([1, 1, l, l]).expand([b, 1, l, l], false);
        if let Some(m) = attention_mask {
            mask = mask.logical_and(&m.to_kind(Kind::Bool).view([b, 1, 1, l]));
        }
        let h = self.encoder.forward(&x, Some(&mask));
        let h = self.final_layer_norm.forward(&h);
        // transformers: eos_token_id == 2 is OpenAI's legacy config → argmax of the ids (the
        // EOS id 49407 is the largest); otherwise the first position holding eos_token_id.
        let eos = if self.config.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids.eq(self.config.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        let rows = Tensor::arange(b, (Kind::Int64, device));
        h.index(&[Some(rows), Some(eos)])
    }
}
