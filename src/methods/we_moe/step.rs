//! One WE-MoE adaptation step as work: for each task, its batch through the MoE model under the
//! routers of that step, the entropy, and the routers' gradient ([`StepItem`], run by
//! [`RouterExecutor::run`]). A process computes a block of a step's items and the ring sums them
//! across processes in item order (or, relayed through the coordinator, the driver sums the
//! items' gradients), then every process applies the same Adam update when the driver commits
//! the step (see [`super::data_parallel`]), so any process computes the same result for an item,
//! and the sum does not depend on who computed what.

use super::data_parallel::{BlockResult, Hello, RouterBroadcast, RouterWork, RING_FAILED};
use crate::models::clip::encoder::LoadOptions;
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tasks::zeroshot;
use crate::tta::adam::{Adam, AdamConfig, AdamState};
use crate::tta::entropy::entropy_loss;
use crate::weights::{Scope, WeightMap};
use anyhow::{bail, Context, Result};
use fusion_cluster::runtime::ring_member::{outbound_ip, RingLayout, RingMember};
use fusion_cluster::runtime::ClusterOptions;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
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

/// Millions of floats travel per step: as one byte string (length, then the bytes), not as a
/// sequence of numbers each encoded on its own.
pub(crate) mod f32_bytes {
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

/// The sum of a step's gradients a process holds until the step is committed: `(step, sum)`.
pub type PendingSum = Arc<Mutex<Option<(u64, Vec<f32>)>>>;

/// How a remote or networked executor joins the workers' ring.
struct RingSetup {
    name: String,
    opts: ClusterOptions,
    /// A remote worker's coordinator; `None` for the coordinator's own executor.
    coordinator: Option<SocketAddr>,
    member: Option<RingMember>,
}

/// Computes a process's block of each step on one device; holds the MoE model, the routers of
/// one step and (on the CPU, the copy Adam updates) their Adam state.
pub struct RouterExecutor {
    set: TaskSet,
    _map: WeightMap,
    vision: ClipVision,
    leaves: Vec<Tensor>,
    step: Option<u64>,
    /// The step of the last routers taken ([`u64::MAX`] before any), readable from outside.
    seen: Arc<AtomicU64>,
    small: bool,
    /// The routers on the CPU, and their Adam states.
    params: Vec<Tensor>,
    adams: Vec<Adam>,
    adam: AdamConfig,
    pending: PendingSum,
    ring: Option<RingSetup>,
}

impl RouterExecutor {
    /// An executor over the MoE state dict `map` (its routers become this executor's leaves)
    /// on the task set's device, updating the routers with Adam of `adam`.
    pub fn new(
        set: TaskSet,
        map: WeightMap,
        shared: bool,
        options: LoadOptions,
        config: &VisionConfig,
        adam: AdamConfig,
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
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let params: Vec<Tensor> =
            leaves.iter().map(|t| t.detach().to_device(tch::Device::Cpu).copy()).collect();
        let adams = params.iter().map(|p| Adam::new(adam, &p.size())).collect();
        let pending = Arc::new(Mutex::new(None));
        Ok(Self {
            set,
            _map: map,
            vision,
            leaves,
            step: None,
            seen,
            small,
            params,
            adams,
            adam,
            pending,
            ring: None,
        })
    }

    /// This executor joins the workers' ring as `name` of the job of `opts`: a remote worker
    /// of the coordinator at `coordinator`, or (`None`) the coordinator's own executor. Without
    /// it the executor computes alone.
    pub fn with_ring(
        mut self,
        name: &str,
        opts: ClusterOptions,
        coordinator: Option<SocketAddr>,
    ) -> Self {
        self.ring = Some(RingSetup { name: name.to_string(), opts, coordinator, member: None });
        self
    }

    /// The router tensors (leaves), in state-dict order.
    pub fn leaves(&self) -> &[Tensor] {
        &self.leaves
    }

    /// The step of the last routers this executor took ([`u64::MAX`] before any), shared: it
    /// stays readable once the executor is handed to the runtime.
    pub fn step_seen(&self) -> Arc<AtomicU64> {
        self.seen.clone()
    }

    /// The sum this executor holds between a step and its commit, shared (the driver reads it
    /// from the coordinator's own executor for its copy of the update).
    pub fn pending_sum(&self) -> PendingSum {
        self.pending.clone()
    }

    fn take_routers(&mut self, step: u64) {
        let _guard = tch::no_grad_guard();
        for (leaf, p) in self.leaves.iter_mut().zip(&self.params) {
            leaf.copy_(p);
        }
        self.step = Some(step);
        self.seen.store(step, Ordering::SeqCst);
    }

    /// Starts again from the routers and Adam's state of a [`RouterBroadcast::Full`], dropping
    /// any sum held.
    fn restart(&mut self, full: RouterBroadcast) -> Result<()> {
        let RouterBroadcast::Full { step, values, adam_steps, exp_avg, exp_avg_sq } = full else {
            bail!("not a full state");
        };
        let n: usize = self.params.iter().map(|t| t.numel()).sum();
        if exp_avg.len() != n || exp_avg_sq.len() != n {
            bail!(
                "Adam's state has {} and {} values for routers of {n}",
                exp_avg.len(),
                exp_avg_sq.len()
            );
        }
        let params = unflatten(&values, &self.params)?;
        let mut at = 0;
        let mut adams = Vec::with_capacity(params.len());
        for p in &params {
            let k = p.numel();
            let state = AdamState {
                step: adam_steps,
                exp_avg: exp_avg[at..at + k].to_vec(),
                exp_avg_sq: exp_avg_sq[at..at + k].to_vec(),
            };
            at += k;
            adams.push(Adam::restore(self.adam, &p.size(), &state).context("Adam's state")?);
        }
        self.params = params;
        self.adams = adams;
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.take_routers(step);
        Ok(())
    }

    /// Applies the held sum of step `step − 1` with Adam (`given`: the driver's sum instead, in
    /// relay mode): the routers of step `step`. An executor that never had routers (a process
    /// that joined during the training, handed the job's last state, a commit, before anything
    /// else) ignores it: the driver hands it the full state before its first step.
    fn commit(&mut self, step: u64, given: Option<Vec<f32>>) -> Result<()> {
        let held = self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(at) = self.step else {
            tracing::debug!(step, "a commit before any routers (a joining process): ignored");
            return Ok(());
        };
        let sum = match (given, held) {
            (Some(sum), _) if at + 1 == step => sum,
            (None, Some((s, sum))) if s == at && s + 1 == step => sum,
            (given, held) => bail!(
                "step {step} committed, but this process holds {} with the routers of step {at}",
                match (given.is_some(), held) {
                    (true, _) => "the driver's sum".to_string(),
                    (false, Some((s, _))) => format!("the sum of step {s}"),
                    (false, None) => "no sum".to_string(),
                }
            ),
        };
        let grads = unflatten(&sum, &self.params)?;
        for ((p, a), g) in self.params.iter_mut().zip(&mut self.adams).zip(&grads) {
            a.step(p, g);
        }
        self.take_routers(step);
        Ok(())
    }

    /// Binds this process's ring endpoint (once) and says where it is.
    fn hello(&mut self) -> Result<Hello> {
        let setup = self.ring.as_mut().context("this executor has no ring (it computes alone)")?;
        let v4 = setup.coordinator.is_none_or(|c| c.is_ipv4());
        let any: IpAddr =
            if v4 { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        if setup.member.is_none() {
            let member = RingMember::bind(any, &setup.name, &setup.opts)
                .with_context(|| format!("worker `{}`: the ring endpoint", setup.name))?;
            setup.member = Some(member);
        }
        let port = setup.member.as_ref().map_or(0, |m| m.addr().port());
        let remote = match setup.coordinator {
            Some(c) => Some((
                outbound_ip(c).with_context(|| format!("the local address towards {c}"))?,
                c.ip(),
            )),
            None => None,
        };
        Ok(Hello { port, remote })
    }

    /// Rank `rank`'s block of step `step`: its items' gradients, summed with every other rank's
    /// in item order (over the ring of `layout`; alone without one), held until the commit.
    fn block(
        &mut self,
        layout: Option<&RingLayout>,
        rank: usize,
        step: u64,
        mine: &[StepItem],
    ) -> Result<BlockResult> {
        if self.step != Some(step) {
            bail!("step {step}'s items reached the routers of step {:?}", self.step);
        }
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let started = Instant::now();
        let results = mine.iter().map(|item| self.run(item)).collect::<Result<Vec<_>>>()?;
        let compute_seconds = started.elapsed().as_secs_f64();
        let parts: Vec<&[f32]> = results.iter().map(|r| r.grad.as_slice()).collect();
        let n: usize = self.params.iter().map(|t| t.numel()).sum();
        let started = Instant::now();
        let sum = match layout {
            None => fusion_cluster::collectives::ring::sequential_sum(&parts, n),
            Some(layout) => {
                let member =
                    self.ring.as_mut().and_then(|r| r.member.as_mut()).context(
                        "a ring step before this process said where its ring endpoint is",
                    )?;
                let mut out = vec![0f32; n];
                member
                    .reduce_parts(layout, rank, &parts, &mut out)
                    .map_err(|e| anyhow::anyhow!("{RING_FAILED}{e}"))?;
                out
            }
        };
        let reduce_seconds = started.elapsed().as_secs_f64();
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((step, sum));
        Ok(BlockResult {
            losses: results.iter().map(|r| r.loss).collect(),
            compute_seconds,
            reduce_seconds,
        })
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
        let work: RouterWork = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let encoded = match work {
            RouterWork::Hello => {
                let hello = self.hello().map_err(|e| format!("{e:#}"))?;
                fusion_cluster::codec::encode(&hello)
            }
            RouterWork::Step { layout, rank, step, mine } => {
                let result = self
                    .block(layout.as_ref(), rank as usize, step, &mine)
                    .map_err(|e| format!("{e:#}"))?;
                fusion_cluster::codec::encode(&result)
            }
            RouterWork::Relay(item) => {
                // A sum held from a ring attempt of this step is the driver's to make now.
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let result = self.run(&item).map_err(|e| format!("{e:#}"))?;
                fusion_cluster::codec::encode(&result)
            }
        };
        encoded.map_err(|e| e.to_string())
    }

    fn on_broadcast(&mut self, state: &[u8]) -> std::result::Result<(), String> {
        let state: RouterBroadcast =
            fusion_cluster::codec::decode(state).map_err(|e| e.to_string())?;
        match state {
            RouterBroadcast::Commit { step } => self.commit(step, None),
            RouterBroadcast::CommitSum { step, sum } => self.commit(step, Some(sum)),
            full => self.restart(full),
        }
        .map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_flatten_and_travel_bit_for_bit() {
        let like = [
            Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
        ];
        let v: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let back = unflatten(&v, &like).unwrap();
        assert_eq!(back[0].size(), vec![2, 2]);
        assert_eq!(flatten(&back), v);
        assert!(unflatten(&v[..6], &like).is_err());
        // Through the wire codec, bit for bit (a NaN's payload and -0.0 included), as raw bytes.
        let odd = vec![1.5f32, -0.0, f32::from_bits(0x7fc0_1234), f32::MIN_POSITIVE];
        let state = RouterBroadcast::Full {
            step: 3,
            values: odd.clone(),
            adam_steps: 3,
            exp_avg: odd.clone(),
            exp_avg_sq: vec![0.0; 4],
        };
        let back: RouterBroadcast =
            fusion_cluster::codec::decode(&fusion_cluster::codec::encode(&state).unwrap()).unwrap();
        let RouterBroadcast::Full { step: 3, values, .. } = back else { panic!("{back:?}") };
        assert_eq!(
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
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
