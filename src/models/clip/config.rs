//! Hugging Face CLIP `config.json`: `CLIPConfig` (a `CLIPModel`) and `CLIPVisionConfig` (a
//! `CLIPVisionModel`), with transformers' defaults for every key the file may omit
//! (`save_pretrained` writes only the values that differ from them).

use serde::Deserialize;
use std::path::Path;

/// Errors reading a CLIP config; each names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The JSON is malformed or a key has the wrong type.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// serde_json's message (names the line and column).
        source: serde_json::Error,
    },
    /// A value is outside what the model supports.
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The key at fault.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// An MLP activation function, as named by transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    Silu,
}

impl Activation {
    /// Parses transformers' activation names; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Raw vision settings as they appear in JSON (defaults: `CLIPVisionConfig()`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: i64,
    intermediate_size: i64,
    projection_dim: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_channels: i64,
    image_size: i64,
    patch_size: i64,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawVision {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// Raw text settings as they appear in JSON (defaults: `CLIPTextConfig()`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    projection_dim: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    max_position_embeddings: i64,
    hidden_act: String,
    layer_norm_eps: f64,
    eos_token_id: i64,
}

impl Default for RawText {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawClip {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    text_config: Option<RawText>,
    #[serde(default)]
    vision_config: Option<RawVision>,
    #[serde(default = "default_projection_dim")]
    projection_dim: i64,
}

fn default_projection_dim() -> i64 {
    512
}

/// Settings shared by both towers' transformer encoders.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl EncoderConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// A `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// The encoder.
    pub encoder: EncoderConfig,
    /// Input channels (3).
    pub num_channels: i64,
    /// Input resolution (square).
    pub image_size: i64,
    /// Patch size (square, stride = size).
    pub patch_size: i64,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
    /// Tokens per image: patches + the class token.
    pub fn num_positions(&self) -> i64 {
        self.grid() * self.grid() + 1
    }
}

/// A `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// The encoder.
    pub encoder: EncoderConfig,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Context length (77).
    pub max_position_embeddings: i64,
    /// The config's `eos_token_id`. The value 2 (OpenAI's legacy configs) selects transformers'
    /// `argmax(input_ids)` pooling; any other value pools at the first occurrence of this id.
    pub eos_token_id: i64,
}

/// A `CLIPConfig`: both towers and the joint embedding width.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Text tower.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Joint embedding width (`visual_projection` / `text_projection` output).
    pub projection_dim: i64,
}

/// `[hidden_size, intermediate_size, num_hidden_layers, num_attention_heads]`.
type Sizes = [i64; 4];

fn check_encoder(
    path: &str,
    prefix: &str,
    sizes: Sizes,
    act: &str,
    eps: f64,
) -> Result<EncoderConfig, ConfigError> {
    let [hidden, inter, layers, heads] = sizes;
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        path: path.to_string(),
        key: format!("{prefix}{key}"),
        reason,
    };
    let activation = Activation::parse(act).ok_or_else(|| {
        invalid(
            "hidden_act",
            format!("unknown activation `{act}` (known: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu)"),
        )
    })?;
    for (key, v) in [
        ("hidden_size", hidden),
        ("intermediate_size", inter),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
    ] {
        if v <= 0 {
            return Err(invalid(key, format!("must be positive, got {v}")));
        }
    }
    if hidden % heads != 0 {
        return Err(invalid(
            "num_attention_heads",
            format!("{heads} does not divide hidden_size {hidden}"),
        ));
    }
    Ok(EncoderConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        activation,
        layer_norm_eps: eps,
    })
}

fn vision_from_raw(path: &str, prefix: &str, r: RawVision) -> Result<VisionConfig, ConfigError> {
    let encoder = check_encoder(
        path,
        prefix,
        [r.hidden_size, r.intermediate_size, r.num_hidden_layers, r.num_attention_heads],
        &r.hidden_act,
        r.layer_norm_eps,
    )?;
    if r.patch_size <= 0 || r.image_size <= 0 || r.image_size % r.patch_size != 0 {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            key: format!("{prefix}patch_size"),
            reason: format!("{} does not divide image_size {}", r.patch_size, r.image_size),
        });
    }
    Ok(VisionConfig {
        encoder,
        num_channels: r.num_channels,
        image_size: r.image_size,
        patch_size: r.patch_size,
    })
}

fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: p.clone(), source })?;
    Ok((p, text))
}

impl ClipConfig {
    /// Parses a `CLIPModel` `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        Self::from_json(&p, &text)
    }

    /// Parses `CLIPConfig` JSON; `path` is only used in errors.
    pub fn from_json(path: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: RawClip = serde_json::from_str(text)
            .map_err(|source| ConfigError::Json { path: path.to_string(), source })?;
        if raw.model_type.as_deref() == Some("clip_vision_model") {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                key: "model_type".into(),
                reason: "this is a CLIPVisionModel config (vision tower only); a CLIPModel with a text tower is needed here".into(),
            });
        }
        let t = raw.text_config.unwrap_or_default();
        let encoder = check_encoder(
            path,
            "text_config.",
            [t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads],
            &t.hidden_act,
            t.layer_norm_eps,
        )?;
        let text = TextConfig {
            encoder,
            vocab_size: t.vocab_size,
            max_position_embeddings: t.max_position_embeddings,
            eos_token_id: t.eos_token_id,
        };
        let vision =
            vision_from_raw(path, "vision_config.", raw.vision_config.unwrap_or_default())?;
        Ok(Self { text, vision, projection_dim: raw.projection_dim })
    }
}

impl VisionConfig {
    /// Parses the vision settings of a `config.json`: a `CLIPVisionConfig` at the top level (a
    /// `CLIPVisionModel` checkpoint) or the `vision_config` of a `CLIPConfig`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let (p, text) = read(path)?;
        Self::from_json(&p, &text)
    }

    /// As [`VisionConfig::from_file`], from JSON text; `path` is only used in errors.
    pub fn from_json(path: &str, text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|source| ConfigError::Json { path: path.to_string(), source })?;
        let (value, prefix) = match value.get("vision_config") {
            Some(v) => (v.clone(), "vision_config."),
            None => (value, ""),
        };
        let raw: RawVision = serde_json::from_value(value)
            .map_err(|source| ConfigError::Json { path: path.to_string(), source })?;
        vision_from_raw(path, prefix, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_omitted_keys_and_errors_name_the_key() {
        let c = ClipConfig::from_json(
            "c.json",
            r#"{"model_type":"clip","text_config":{},"vision_config":{"patch_size":16}}"#,
        )
        .unwrap();
        assert_eq!(c.vision.encoder.hidden_size, 768);
        assert_eq!(c.vision.num_positions(), 197);
        assert_eq!(c.text.encoder.activation, Activation::QuickGelu);
        assert_eq!(c.projection_dim, 512);
        let v = VisionConfig::from_json(
            "v.json",
            r#"{"hidden_size":1024,"num_attention_heads":16,"patch_size":14,"hidden_act":"gelu"}"#,
        )
        .unwrap();
        assert_eq!(v.num_positions(), 257);
        assert_eq!(v.encoder.activation, Activation::Gelu);
        let e = VisionConfig::from_json("v.json", r#"{"hidden_act":"swiglu9"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("v.json") && e.contains("hidden_act") && e.contains("swiglu9"), "{e}");
        let e = ClipConfig::from_json("c.json", r#"{"vision_config":{"num_attention_heads":5}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_config.num_attention_heads"), "{e}");
        let e = ClipConfig::from_json("c.json", r#"{"model_type":"clip_vision_model"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type"), "{e}");
    }
}
