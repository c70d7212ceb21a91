//! One WE-MoE adaptation step as work items: for each task, its batch through the MoE model
//! under the routers of that step, the entropy, and the routers' gradient. An item carries its
//! step, task and dataset indices; the routers reach every worker as a broadcast state
//! ([`RouterState`]) after each step's Adam update (and at the start), so any worker computes the
//! same result for an item, and results fold in item order whoever computed them.

use crate::models::clip::encoder::LoadOptions;
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tasks::zeroshot;
use crate::tta::entropy::entropy_loss;
use crate::weights::{Scope, WeightMap};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// One task's batch of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepItem {
    /// The step (0-based); the routers must be those of this step.
    pub step: u64,
    /// The task, by index in the pool's order.
    pub task: u32,
    /// The batch's dataset indices.
    pub indices: Vec<u32>,
}

/// An item's loss and the routers' gradient (flattened, router tensors in state-dict order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The task's entropy on the batch.
    pub loss: f32,
    /// `∂loss/∂routers`, flattened (sent as raw little-endian bytes).
    #[serde(with = "f32_bytes")]
    pub grad: Vec<f32>,
    /// Seconds the item took where it ran (for the account of compute against exchange).
    pub seconds: f64,
}

/// The routers every worker computes with from step `step` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterState {
    /// The step these routers are for (updates applied so far).
    pub step: u64,
    /// Every router tensor, flattened, in state-dict order (sent as raw little-endian bytes).
    #[serde(with = "f32_bytes")]
    pub values: Vec<f32>,
}

/// Millions of floats travel per step: as one byte string (length, then the bytes), not as a
/// sequence of numbers each encoded on its own.
mod f32_bytes {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        struct Floats;
        impl<'de> de::Visitor<'de> for Floats {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("float32 values as little-endian bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<f32>, E> {
                if !b.len().is_multiple_of(4) {
                    return Err(E::custom(format!("{} bytes are not float32 values", b.len())));
                }
                Ok(b.chunks_exact(4)
                    .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                    .collect())
            }
        }
        d.deserialize_bytes(Floats)
    }
}

/// The router tensors of `map` as trainable leaves, put back into the map (a shared router once,
/// given to every layer), in state-dict order.
pub fn router_leaves(map: &mut WeightMap, shared: bool) -> Vec<Tensor> {
    let mut leaves: Vec<Tensor> = Vec::new();
    let mut by_suffix: std::collections::HashMap<String, Tensor> = Default::default();
    let names: Vec<String> = map.names().to_vec();
    for name in names {
        let Some((_, rest)) = name.split_once(".mlp.gate.") else { continue };
        if shared {
            if let Some(leaf) = by_suffix.get(rest) {
                let leaf = leaf.shallow_clone();
                map.insert(name, leaf);
                continue;
            }
        }
        let leaf = map.get(&name).expect("a listed name").detach().copy().set_requires_grad(true);
        if shared {
            by_suffix.insert(rest.to_string(), leaf.shallow_clone());
        }
        map.insert(name.clone(), leaf.shallow_clone());
        leaves.push(leaf);
    }
    leaves
}

/// Tensors flattened into one vector, in order.
pub fn flatten(tensors: &[Tensor]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| t.numel()).sum());
    for t in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let mut v = vec![0f32; t.numel()];
        t.copy_data(&mut v, t.numel());
        out.extend_from_slice(&v);
    }
    out
}

/// `values` split to the shapes of `like`, as CPU tensors.
pub fn unflatten(values: &[f32], like: &[Tensor]) -> Result<Vec<Tensor>> {
    let n: usize = like.iter().map(|t| t.numel()).sum();
    if values.len() != n {
        bail!("{} router values for routers of {n}", values.len());
    }
    let mut at = 0;
    Ok(like
        .iter()
        .map(|t| {
            let k = t.numel();
            let out = Tensor::from_slice(&values[at..at + k]).view(t.size().as_slice());
            at += k;
            out
        })
        .collect())
}

/// Computes step items on one device; holds the MoE model and the routers of one step.
pub struct RouterExecutor {
    set: TaskSet,
    _map: WeightMap,
    vision: ClipVision,
    leaves: Vec<Tensor>,
    step: Option<u64>,
    /// The step of the last routers taken ([`u64::MAX`] before any), readable from outside.
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    small: bool,
}

impl RouterExecutor {
    /// An executor over the MoE state dict `map` (its routers become this executor's leaves)
    /// on the task set's device.
    pub fn new(
        set: TaskSet,
        map: WeightMap,
        shared: bool,
        options: LoadOptions,
        config: &VisionConfig,
    ) -> Result<Self> {
        let mut map = map.to_device(set.device);
        let leaves = router_leaves(&mut map, shared);
        let vision = ClipVision::load_with(
            &Scope::new(&map, set.device, Kind::Float).pp("vision_model"),
            config,
            &options,
        )
        .context("the WE-MoE model")?;
        let small = map.numel() < crate::methods::adamerging::step::SMALL_MODEL
            && set.device == tch::Device::Cpu;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        Ok(Self { set, _map: map, vision, leaves, step: None, seen, small })
    }

    /// The router tensors (leaves), in state-dict order.
    pub fn leaves(&self) -> &[Tensor] {
        &self.leaves
    }

    /// The step of the last routers this executor took ([`u64::MAX`] before any), shared: it
    /// stays readable once the executor is handed to the runtime.
    pub fn step_seen(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.seen.clone()
    }

    /// Takes the routers of `state`.
    pub fn set_routers(&mut self, state: &RouterState) -> Result<()> {
        let values = unflatten(&state.values, &self.leaves)?;
        let _guard = tch::no_grad_guard();
        for (leaf, v) in self.leaves.iter_mut().zip(&values) {
            leaf.copy_(v);
        }
        self.step = Some(state.step);
        self.seen.store(state.step, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Runs one item: the task's batch, its entropy, the routers' gradient. A small model (under
    /// [`crate::methods::adamerging::step::SMALL_MODEL`] parameters) runs on one intra-op thread.
    pub fn run(&mut self, item: &StepItem) -> Result<StepResult> {
        if self.step != Some(item.step) {
            bail!("an item of step {} reached routers of step {:?}", item.step, self.step);
        }
        if self.small {
            crate::device::single_threaded(|| self.run_here(item))
        } else {
            self.run_here(item)
        }
    }

    fn run_here(&self, item: &StepItem) -> Result<StepResult> {
        let started = std::time::Instant::now();
        let t = item.task as usize;
        let task = self.set.tasks.get(t).with_context(|| format!("no task #{t}"))?;
        let indices: Vec<usize> = item.indices.iter().map(|&i| i as usize).collect();
        let x = self.set.pixels(t, &indices)?;
        let feats = self.set.base.image_features(&self.vision, &x);
        let logits = zeroshot::logits(&feats, &task.head, &self.set.base.logit_scale);
        let loss = entropy_loss(&logits);
        let grads = Tensor::f_run_backward(&[&loss], &self.leaves, false, false)
            .with_context(|| format!("step {}, task `{}`: backward", item.step, task.name))?;
        Ok(StepResult {
            loss: loss.double_value(&[]) as f32,
            grad: flatten(&grads),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

impl fusion_cluster::runtime::Executor for RouterExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: StepItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let result = self.run(&item).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&result).map_err(|e| e.to_string())
    }

    fn on_broadcast(&mut self, state: &[u8]) -> std::result::Result<(), String> {
        let state: RouterState = fusion_cluster::codec::decode(state).map_err(|e| e.to_string())?;
        self.set_routers(&state).map_err(|e| format!("{e:#}"))
    }
}

/// `Σ` of the items' gradients in item order (float32, as `backward` per task accumulates them).
pub fn fold(results: &[StepResult]) -> Vec<f32> {
    let mut total = match results.first() {
        Some(r) => r.grad.clone(),
        None => return Vec::new(),
    };
    for r in &results[1..] {
        for (a, g) in total.iter_mut().zip(&r.grad) {
            *a += g;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_fold_in_item_order_and_routers_round_trip() {
        let r = |g: &[f32]| StepResult { loss: 0.0, grad: g.to_vec(), seconds: 0.0 };
        assert_eq!(fold(&[r(&[1.0, 2.0]), r(&[0.5, -1.0]), r(&[0.25, 0.0])]), vec![1.75, 1.0]);
        // float32 and left to right: (1e8 + 1) - 1e8 is 0 in float32, not 1.
        assert_eq!(fold(&[r(&[1e8]), r(&[1.0]), r(&[-1e8])]), vec![0.0]);
        let like = [
            Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
        ];
        let v: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let back = unflatten(&v, &like).unwrap();
        assert_eq!(back[0].size(), vec![2, 2]);
        assert_eq!(flatten(&back), v);
        assert!(unflatten(&v[..6], &like).is_err());
        // Through the wire codec, bit for bit (a NaN's payload and -0.0 included).
        let odd = vec![1.5f32, -0.0, f32::from_bits(0x7fc0_1234), f32::MIN_POSITIVE];
        let state = RouterState { step: 3, values: odd.clone() };
        let back: RouterState =
            fusion_cluster::codec::decode(&fusion_cluster::codec::encode(&state).unwrap()).unwrap();
        assert_eq!(back.step, 3);
        assert_eq!(
            back.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            odd.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let bytes = fusion_cluster::codec::encode(&StepResult {
            loss: 0.5,
            grad: vec![0.0; 1000],
            seconds: 0.0,
        })
        .unwrap();
        assert!(bytes.len() < 4000 + 32, "raw bytes: {} for 1000 floats", bytes.len());
    }
}
