//! CLIP (Radford et al., 2021, <https://arxiv.org/abs/2103.00020>) with the keys and parameter
//! order of Hugging Face `transformers.CLIPModel` / `CLIPVisionModel`
//! (`src/transformers/models/clip/modeling_clip.py`), so hub checkpoints load unchanged.
//!
//! A fine-tuned `CLIPVisionModel` (FusionBench's merge unit) is a [`WeightMap`] of
//! `vision_model.*` tensors in `named_parameters()` order ([`load_vision_weights`]); any such map,
//! or any other [`WeightSource`], runs through the one forward in [`vision::ClipVision`].

pub mod config;
pub mod encoder;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use config::{Activation, ClipConfig, ConfigError, TextConfig, VisionConfig};
pub use text::ClipText;
pub use tokenizer::{ClipTokenizer, TokenizerError};
pub use vision::ClipVision;

use crate::weights::{SafetensorsFile, Scope, WeightError, WeightMap, WeightSource};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Errors loading a CLIP checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weight is missing, mis-shaped, or the file is corrupt.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The directory holds no safetensors weights.
    #[error("{dir} has no model.safetensors (nor model.safetensors.index.json); only safetensors checkpoints are supported — convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)")]
    NoWeights {
        /// The checkpoint directory.
        dir: String,
    },
    /// The shard index is unreadable.
    #[error("{path}: {reason}")]
    Index {
        /// The index file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The weights of a checkpoint directory: one safetensors file or an index of shards.
pub struct CheckpointWeights {
    files: Vec<SafetensorsFile>,
    dir: PathBuf,
}

impl CheckpointWeights {
    /// The F32 values and shape of `name`, in place in the mapped file (see
    /// [`SafetensorsFile::f32_slice`]).
    pub fn f32_slice(&self, name: &str) -> Option<(&[f32], Vec<i64>)> {
        self.files.iter().find(|f| f.contains(name)).and_then(|f| f.f32_slice(name))
    }

    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![SafetensorsFile::open(&single)?]
        } else if index.is_file() {
            let bad =
                |reason: String| ModelError::Index { path: index.display().to_string(), reason };
            let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            shards
                .into_iter()
                .map(|s| SafetensorsFile::open(dir.join(s)))
                .collect::<Result<_, _>>()?
        } else {
            return Err(ModelError::NoWeights { dir: dir.display().to_string() });
        };
        Ok(Self { files, dir: dir.to_path_buf() })
    }
}

impl WeightSource for CheckpointWeights {
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        match self.files.iter().find(|f| f.contains(name)) {
            Some(f) => f.tensor(name),
            None => Err(WeightError::Missing { name: name.to_string(), origin: self.origin() }),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.contains(name))
    }
    fn origin(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path().display().to_string(),
            _ => format!("the shards in {}", self.dir.display()),
        }
    }
}

/// Loads the vision tower of a checkpoint (`CLIPVisionModel` or `CLIPModel`) as an ordered map
/// `vision_model.<name>` → tensor in `named_parameters()` order, on the CPU in float32, with every
/// shape checked against its `config.json`.
pub fn load_vision_weights(dir: &Path) -> Result<(VisionConfig, WeightMap), ModelError> {
    let config = VisionConfig::from_file(&dir.join("config.json"))?;
    let weights = CheckpointWeights::open(dir)?;
    let scope = Scope::new(&weights, Device::Cpu, Kind::Float).pp("vision_model");
    let mut map = WeightMap::new();
    for (name, shape) in
        vision::parameter_names(&config).iter().zip(vision::parameter_shapes(&config))
    {
        map.insert(scope.path(name), scope.get(name, &shape)?);
    }
    Ok((config, map))
}

/// A full `CLIPModel`: both towers, both projections and the logit scale.
#[derive(Debug)]
pub struct ClipModel {
    /// The parsed config.
    pub config: ClipConfig,
    /// `text_model`.
    pub text: ClipText,
    /// `vision_model`.
    pub vision: ClipVision,
    /// `visual_projection.weight` `[proj, vision_hidden]`.
    pub visual_projection: Tensor,
    /// `text_projection.weight` `[proj, text_hidden]`.
    pub text_projection: Tensor,
    /// `logit_scale` (a scalar; logits use its exponential).
    pub logit_scale: Tensor,
}

impl ClipModel {
    /// Loads `config.json` + safetensors weights from a checkpoint directory onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let s = Scope::new(&weights, device, Kind::Float);
        let p = config.projection_dim;
        Ok(Self {
            text: ClipText::load(&s.pp("text_model"), &config.text)?,
            vision: ClipVision::load(&s.pp("vision_model"), &config.vision)?,
            visual_projection: s
                .get("visual_projection.weight", &[p, config.vision.encoder.hidden_size])?,
            text_projection: s
                .get("text_projection.weight", &[p, config.text.encoder.hidden_size])?,
            logit_scale: s.get("logit_scale", &[])?,
            config,
        })
    }

    /// `image_embeds` before normalisation: `visual_projection(pooler_output)`, `[B, proj]`.
    pub fn image_features(&self, vision: &ClipVision, pixel_values: &Tensor) -> Tensor {
        vision.forward(pixel_values).matmul(&self.visual_projection.tr())
    }

    /// `text_embeds` before normalisation: `text_projection(pooler_output)`, `[B, proj]`.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.text.forward(input_ids, attention_mask).matmul(&self.text_projection.tr())
    }

    /// `logits_per_image` `[B_img, B_text]` as `CLIPModel.forward` computes it.
    pub fn logits_per_image(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        let img = l2_normalize(&self.image_features(&self.vision, pixel_values));
        let txt = l2_normalize(&self.text_features(input_ids, attention_mask));
        txt.matmul(&img.tr()).g_mul(&self.logit_scale.exp()).tr()
    }
}

/// What classifying images needs of a CLIP beside its vision tower: `visual_projection` and
/// `logit_scale` (a few hundred kilobytes, where the whole model with its text tower is
/// hundreds of megabytes: evaluation and adaptation keep only this once the zero-shot heads
/// exist).
pub struct ClipImageHead {
    /// `visual_projection.weight` `[proj, vision_hidden]`.
    pub visual_projection: Tensor,
    /// `logit_scale` (a scalar; logits use its exponential).
    pub logit_scale: Tensor,
}

impl ClipImageHead {
    /// Reads the two tensors of the checkpoint in `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let s = Scope::new(&weights, device, Kind::Float);
        let shape = [config.projection_dim, config.vision.encoder.hidden_size];
        Ok(Self {
            visual_projection: s.get("visual_projection.weight", &shape)?,
            logit_scale: s.get("logit_scale", &[])?,
        })
    }

    /// The same tensors of a loaded model (shallow handles).
    pub fn of(clip: &ClipModel) -> Self {
        Self {
            visual_projection: clip.visual_projection.shallow_clone(),
            logit_scale: clip.logit_scale.shallow_clone(),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            visual_projection: self.visual_projection.to_device(device),
            logit_scale: self.logit_scale.to_device(device),
        }
    }

    /// The device the tensors are on.
    pub fn device(&self) -> Device {
        self.logit_scale.device()
    }

    /// `image_embeds` before normalisation: `visual_projection(pooler_output)`, `[B, proj]`.
    pub fn image_features(&self, vision: &ClipVision, pixel_values: &Tensor) -> Tensor {
        vision.forward(pixel_values).matmul(&self.visual_projection.tr())
    }
}

/// `x / ‖x‖₂` over the last dimension (as `x / x.norm(p=2, dim=-1, keepdim=True)`).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
}
