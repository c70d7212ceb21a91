//! The model pool as methods see it: FusionBench's `CLIPVisionModelPool` (ordered names → hub ids
//! or directories; names like `_pretrained_` are special), opened lazily as mmap'd checkpoints.

use crate::config::ModelPoolConfig;
use crate::hub::{Hub, RepoType};
use crate::models::clip::{vision, CheckpointWeights, VisionConfig};
use crate::weights::{WeightMap, WeightSource};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// One opened checkpoint of the pool.
pub struct Checkpoint {
    name: String,
    weights: CheckpointWeights,
    shapes: HashMap<String, Vec<i64>>,
}

impl Checkpoint {
    /// The tensor `name` (`vision_model.…`) as float32, checked against the pool's architecture.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.weights.tensor(name).with_context(|| format!("model `{}`", self.name))?;
        if let Some(shape) = self.shapes.get(name) {
            if &t.size() != shape {
                bail!(
                    "model `{}`: tensor `{name}` has shape {:?}, but the pool's first model has {:?}",
                    self.name,
                    t.size(),
                    shape
                );
            }
        }
        Ok(if t.kind() == Kind::Float { t } else { t.to_kind(Kind::Float) })
    }
}

/// The pool: `(name, local directory)` in config order and the shared vision architecture.
pub struct ModelPool {
    models: Vec<(String, PathBuf)>,
    config: VisionConfig,
    names: Vec<String>,
    shapes: HashMap<String, Vec<i64>>,
}

fn is_special(name: &str) -> bool {
    name.len() > 1 && name.starts_with('_') && name.ends_with('_')
}

impl ModelPool {
    /// Resolves every model of the config through the hub cache (or local directories) and reads
    /// the architecture from the pretrained (else first) model's `config.json`.
    pub fn from_config(cfg: &ModelPoolConfig, hub: &Hub) -> Result<Self> {
        let mut models = Vec::new();
        for (name, spec) in &cfg.models {
            let dir = hub
                .resolve(&spec.path, RepoType::Model, None)
                .with_context(|| format!("modelpool.models.{name}"))?;
            models.push((name.clone(), dir));
        }
        let Some((_, first)) =
            models.iter().find(|(n, _)| n == "_pretrained_").or_else(|| models.first())
        else {
            bail!("modelpool.models is empty");
        };
        let config = VisionConfig::from_file(&first.join("config.json"))?;
        let names: Vec<String> =
            vision::parameter_names(&config).iter().map(|n| format!("vision_model.{n}")).collect();
        let shapes = names.iter().cloned().zip(vision::parameter_shapes(&config)).collect();
        Ok(Self { models, config, names, shapes })
    }

    /// The merged tensors' names (`vision_model.…`) in `named_parameters()` order.
    pub fn parameter_names(&self) -> &[String] {
        &self.names
    }

    /// The shape of tensor `name` in the pool's architecture.
    pub fn shape(&self, name: &str) -> &[i64] {
        &self.shapes[name]
    }

    /// The shared vision architecture.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn open(&self, name: &str, dir: &std::path::Path) -> Result<Checkpoint> {
        let weights = CheckpointWeights::open(dir).with_context(|| format!("model `{name}`"))?;
        for n in &self.names {
            if !weights.contains(n) {
                bail!("model `{name}` ({}) has no tensor `{n}`", dir.display());
            }
        }
        Ok(Checkpoint { name: name.to_string(), weights, shapes: self.shapes.clone() })
    }

    /// The `_pretrained_` model; an error naming the pool when there is none.
    pub fn pretrained(&self) -> Result<Checkpoint> {
        match self.models.iter().find(|(n, _)| n == "_pretrained_") {
            Some((n, d)) => self.open(n, d),
            None => bail!("this method needs modelpool.models._pretrained_, and the pool has none"),
        }
    }

    /// The fine-tuned models (names that are not special), in config order.
    pub fn task_models(&self) -> Result<Vec<Checkpoint>> {
        self.models.iter().filter(|(n, _)| !is_special(n)).map(|(n, d)| self.open(n, d)).collect()
    }

    /// `_pretrained_` if the pool has it, else its first model (`from_config` refuses an empty
    /// pool).
    fn pretrained_or_first(&self) -> &(String, PathBuf) {
        self.models
            .iter()
            .find(|(n, _)| n == "_pretrained_")
            .or_else(|| self.models.first())
            .expect("a pool is never empty")
    }

    /// The directory whose `config.json` describes the merged model (pretrained, else first).
    pub fn config_source(&self) -> PathBuf {
        self.pretrained_or_first().1.join("config.json")
    }

    /// FusionBench's `load_pretrained_or_first_model`, as ordered vision weights.
    pub fn load_pretrained_or_first(&self) -> Result<WeightMap> {
        let (name, dir) = self.pretrained_or_first();
        let ckpt = self.open(name, dir)?;
        self.merge_per_tensor(|n, _| ckpt.get(n))
    }

    /// Builds a map in `named_parameters()` order by calling `merge(name, shape)` once per
    /// tensor: inputs are read from the mmap when asked for and freed when `merge` returns.
    pub fn merge_per_tensor(
        &self,
        mut merge: impl FnMut(&str, &[i64]) -> Result<Tensor>,
    ) -> Result<WeightMap> {
        let _guard = tch::no_grad_guard();
        let mut out = WeightMap::new();
        for name in &self.names {
            let t = merge(name, &self.shapes[name])?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}
