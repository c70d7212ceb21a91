//! The router training's checkpoint: routers, Adam's moments, the step, the loaders' state and
//! the losses, in one safetensors file written atomically, and reading it back to resume.

use super::WeMoeConfig;
use crate::tta::adam::{Adam, AdamConfig, AdamState};
use crate::tta::loaders::Loaders;
use crate::weights::{WeightMap, WeightSource};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// What a checkpoint holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) run: String,
    pub(super) step: u64,
    pub(super) loaders: Loaders,
    pub(super) seed: u64,
    pub(super) adam_steps: u64,
    pub(super) losses: Vec<f64>,
}

pub(super) fn save_state(
    path: &Path,
    meta: &Meta,
    params: &[Tensor],
    adams: &[Adam],
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut map = WeightMap::new();
    for (i, (p, a)) in params.iter().zip(adams).enumerate() {
        let s = a.state();
        let shape = p.size();
        map.insert(format!("router.{i}"), p.shallow_clone());
        map.insert(format!("exp_avg.{i}"), Tensor::from_slice(&s.exp_avg).view(shape.as_slice()));
        map.insert(
            format!("exp_avg_sq.{i}"),
            Tensor::from_slice(&s.exp_avg_sq).view(shape.as_slice()),
        );
    }
    let meta = HashMap::from([("state".to_string(), serde_json::to_string(meta)?)]);
    crate::weights::save_safetensors(&map, path, Some(meta))
        .with_context(|| format!("checkpointing the router training to {}", path.display()))
}

/// The loop's state at a step boundary: what a checkpoint of it says, the routers, their Adam
/// states.
pub(super) struct Boundary {
    /// What a checkpoint of it says.
    pub(super) meta: Meta,
    /// The routers.
    pub(super) params: Vec<Tensor>,
    /// Their Adam states.
    pub(super) adams: Vec<Adam>,
}

/// A checkpoint's state: what it says, the routers, their Adam states.
pub(super) type Resumed = (Meta, Vec<Tensor>, Vec<Adam>);

/// The checkpoint in `file`, if any: `None` when there is none, or when it is a longer-lived
/// state than this run's `max_steps` allows (then the run starts afresh, with a warning). One of
/// another configuration, or unreadable, is an error naming the file.
pub(super) fn resume(
    file: &Path,
    key: &str,
    c: &WeMoeConfig,
    like: &[Tensor],
) -> Result<Option<Resumed>> {
    if !file.exists() {
        return Ok(None);
    }
    let shown = file.display();
    let f = crate::weights::SafetensorsFile::open(file)
        .with_context(|| format!("reading the checkpoint {shown}"))?;
    let meta: Meta = f
        .user_metadata()
        .and_then(|m| m.get("state"))
        .map(|s| serde_json::from_str(s))
        .transpose()
        .with_context(|| format!("{shown}: its state"))?
        .with_context(|| format!("{shown}: not a router-training checkpoint (no state)"))?;
    if meta.run != key {
        bail!("{shown}: a checkpoint of another configuration (remove it to start afresh)");
    }
    if meta.step > c.max_steps {
        tracing::warn!(file = %shown, step = meta.step, max_steps = c.max_steps, "the checkpoint is past this run's max_steps: starting afresh");
        return Ok(None);
    }
    let cfg = AdamConfig::with_lr(c.lr);
    let mut params = Vec::new();
    let mut adams = Vec::new();
    for (i, l) in like.iter().enumerate() {
        let get = |name: String| -> Result<Tensor> {
            let t = f.tensor(&name).with_context(|| format!("{shown}: `{name}`"))?;
            if t.size() != l.size() {
                bail!(
                    "{shown}: `{name}` has shape {:?}, the routers need {:?}",
                    t.size(),
                    l.size()
                );
            }
            Ok(t.contiguous())
        };
        let p = get(format!("router.{i}"))?;
        let v = |t: Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap_or_default();
        let state = AdamState {
            step: meta.adam_steps,
            exp_avg: v(get(format!("exp_avg.{i}"))?),
            exp_avg_sq: v(get(format!("exp_avg_sq.{i}"))?),
        };
        adams.push(
            Adam::restore(cfg, &l.size(), &state)
                .with_context(|| format!("{shown}: Adam state #{i}"))?,
        );
        params.push(p);
    }
    if f.tensor(&format!("router.{}", like.len())).is_ok() {
        bail!("{shown}: more router tensors than this model has");
    }
    Ok(Some((meta, params, adams)))
}
