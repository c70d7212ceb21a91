//! One AdaMerging step as work items: for each task, its batch under θ(λ) of this step: forward
//! through the one CLIP forward, entropy, backward to θ, projected onto λ ([`merge::project`]).
//!
//! An item carries everything that defines it (step, task, dataset indices, λ), so any worker
//! computes the same result for it, and results fold in item order into the step's gradient
//! whoever computed them: the same λ trajectory on one worker or many.

use super::merge::{self, Granularity, Inputs};
use crate::models::clip::{ClipVision, VisionConfig};
use crate::tasks::set::TaskSet;
use crate::tasks::zeroshot;
use crate::tta::entropy::entropy_loss;
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Models below this many parameters adapt on one intra-op thread ([`StepExecutor::run`]).
pub const SMALL_MODEL: i64 = 1 << 20;

/// One task's batch of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepItem {
    /// The step (0-based).
    pub step: u64,
    /// The task, by index in the pool's order.
    pub task: u32,
    /// The batch's dataset indices.
    pub indices: Vec<u32>,
    /// λ of this step (flattened).
    pub lambda: Vec<f32>,
}

/// What an item gives back: its loss and its share of `∂L/∂λ`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The task's entropy on the batch.
    pub loss: f32,
    /// `∂loss/∂λ`, flattened.
    pub grad: Vec<f32>,
    /// Seconds the item took where it ran (merge included when it came first): for the
    /// coordinator's account of compute against exchange; never part of the result's numbers.
    #[serde(default)]
    pub seconds: f64,
}

/// Computes step items; keeps the merged model of the last λ it saw.
pub struct StepExecutor {
    inputs: Arc<Inputs>,
    tasks: TaskSet,
    config: VisionConfig,
    granularity: Granularity,
    clamp: bool,
    merged: Option<(u64, Vec<f32>, WeightMap, ClipVision)>,
}

impl StepExecutor {
    /// An executor over the pool's opened checkpoints and the task set.
    pub fn new(
        inputs: Arc<Inputs>,
        tasks: TaskSet,
        config: VisionConfig,
        granularity: Granularity,
        clamp: bool,
    ) -> Self {
        Self { inputs, tasks, config, granularity, clamp, merged: None }
    }

    /// The task set.
    pub fn tasks(&self) -> &TaskSet {
        &self.tasks
    }

    /// Parameters of the model.
    fn parameters(&self) -> i64 {
        self.inputs.shapes.iter().map(|s| s.iter().product::<i64>()).sum()
    }

    /// How many items of one step [`run_batch`](Self::run_batch) takes at once: as many
    /// gradients as fit in [`GRADIENT_BUDGET`] floats (ViT-B/32: 2, ViT-L/14: 1), at most 8.
    pub fn batch_limit(&self) -> usize {
        (GRADIENT_BUDGET / self.parameters().max(1)).clamp(1, 8) as usize
    }

    /// Runs one item. A small model (under [`SMALL_MODEL`] parameters) runs on one intra-op
    /// thread, where libtorch's per-op threading costs more than it saves (measured on the
    /// fixtures: 2× faster steps); every worker applies the same rule, so results do not depend
    /// on where an item ran.
    pub fn run(&mut self, item: &StepItem) -> Result<StepResult> {
        let mut out = self.run_batch(std::slice::from_ref(item));
        out.pop().unwrap_or_else(|| Err(anyhow::anyhow!("no result")))
    }

    /// Runs items (a worker's items of a step, queued together): each through forward and
    /// backward, then all their gradients projected onto λ in one pass over the checkpoints
    /// ([`merge::project_many`]). Each result is the one [`run`](Self::run) gives the item alone.
    pub fn run_batch(&mut self, items: &[StepItem]) -> Vec<Result<StepResult>> {
        if self.parameters() < SMALL_MODEL && self.tasks.device == tch::Device::Cpu {
            crate::device::single_threaded(|| self.run_here(items))
        } else {
            self.run_here(items)
        }
    }

    fn run_here(&mut self, items: &[StepItem]) -> Vec<Result<StepResult>> {
        let mut out: Vec<Result<StepResult>> = Vec::with_capacity(items.len());
        // Runs of items under the same λ share one merge and one projection pass.
        let mut at = 0;
        while at < items.len() {
            let same = |i: &StepItem| i.step == items[at].step && i.lambda == items[at].lambda;
            let end = at + items[at..].iter().take_while(|i| same(i)).count();
            out.extend(self.run_same_lambda(&items[at..end]));
            at = end;
        }
        out
    }

    /// θ(λ) of `item`'s step as leaves and the model over them, merged unless cached.
    fn ensure_merged(&mut self, item: &StepItem) -> Result<()> {
        let stale = match &self.merged {
            Some((step, lambda, ..)) => *step != item.step || *lambda != item.lambda,
            None => true,
        };
        if stale {
            self.merged = None;
            let started = std::time::Instant::now();
            let map = merge::merge(&self.inputs, &item.lambda, self.granularity, self.clamp)?;
            tracing::debug!(
                step = item.step,
                elapsed = ?started.elapsed(),
                rss = ?crate::device::resident_mib(),
                "θ(λ) merged"
            );
            let mut leaves = WeightMap::new();
            for (name, t) in map.iter() {
                leaves.insert(name, t.shallow_clone().set_requires_grad(true));
            }
            let scope = Scope::new(&leaves, self.tasks.device, Kind::Float).pp("vision_model");
            let vision = ClipVision::load(&scope, &self.config)?;
            self.merged = Some((item.step, item.lambda.clone(), leaves, vision));
        }
        Ok(())
    }

    fn run_same_lambda(&mut self, items: &[StepItem]) -> Vec<Result<StepResult>> {
        let began = std::time::Instant::now();
        if let Err(e) = self.ensure_merged(&items[0]) {
            let e = format!("{e:#}");
            return items.iter().map(|_| Err(anyhow::anyhow!("{e}"))).collect();
        }
        let merged = began.elapsed().as_secs_f64();
        // Forward and backward per item; the gradients wait for the one projection.
        let passes: Vec<Result<(f32, Vec<Tensor>, f64)>> =
            items.iter().map(|item| self.gradient(item)).collect();
        let started = std::time::Instant::now();
        let views: Vec<Vec<&[f32]>> = passes
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .map(|(_, grads, _)| grads.iter().map(merge::values_view).collect())
            .collect();
        let sets: Vec<&[&[f32]]> = views.iter().map(Vec::as_slice).collect();
        let lambda = &items[0].lambda;
        let projected =
            merge::project_many(&self.inputs, &sets, lambda, self.granularity, self.clamp);
        let projection = started.elapsed().as_secs_f64();
        tracing::debug!(
            step = items[0].step,
            items = items.len(),
            projected = ?started.elapsed(),
            rss = ?crate::device::resident_mib(),
            "step items projected"
        );
        let mut projected = match projected {
            Ok(grads) => grads.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                let e = format!("{e:#}");
                sets.iter().map(|_| Err(anyhow::anyhow!("{e}"))).collect()
            }
        }
        .into_iter();
        let share = (merged + projection) / items.len() as f64;
        passes
            .into_iter()
            .map(|pass| {
                let (loss, _, seconds) = pass?;
                let grad = projected.next().context("projected gradient")??;
                Ok(StepResult { loss, grad, seconds: seconds + share })
            })
            .collect()
    }

    /// One item's loss, `∂loss/∂θ` per parameter tensor (contiguous CPU float32, in
    /// `named_parameters()` order) and the seconds it took.
    fn gradient(&mut self, item: &StepItem) -> Result<(f32, Vec<Tensor>, f64)> {
        let t = item.task as usize;
        if t >= self.tasks.tasks.len() {
            anyhow::bail!("step item for task #{t}, and there are {}", self.tasks.tasks.len());
        }
        let (_, _, leaves, vision) = self.merged.as_ref().context("merged model")?;
        let started = std::time::Instant::now();
        let indices: Vec<usize> = item.indices.iter().map(|&i| i as usize).collect();
        let x = self.tasks.pixels(t, &indices)?;
        let task = &self.tasks.tasks[t];
        let feats = self.tasks.base.image_features(vision, &x);
        let logits = zeroshot::logits(&feats, &task.head, &self.tasks.base.logit_scale);
        let loss = entropy_loss(&logits);
        let forward = started.elapsed();
        let rss_forward = crate::device::resident_mib();
        // `torch.autograd.grad`: each gradient is autograd's fresh tensor, not added into a
        // zeroed `.grad` (0 + g is g, bit for bit: the same values without two passes over θ).
        let names: Vec<&str> = leaves.iter().map(|(name, _)| name).collect();
        let inputs: Vec<&Tensor> = leaves.iter().map(|(_, t)| t).collect();
        let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)
            .context("adamerging: backward through the merged model")?;
        let backward = started.elapsed() - forward;
        let cpu = self.tasks.device == tch::Device::Cpu;
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&names)
            .map(|(g, name)| {
                if !g.defined() {
                    anyhow::bail!("no gradient reached `{name}`")
                }
                Ok(if cpu { g.contiguous() } else { g.to_device(tch::Device::Cpu).contiguous() })
            })
            .collect::<Result<_>>()?;
        tracing::debug!(
            step = item.step,
            task = t,
            ?forward,
            ?backward,
            copied = ?(started.elapsed() - forward - backward),
            ?rss_forward,
            rss = ?crate::device::resident_mib(),
            "step item"
        );
        let loss = loss.double_value(&[]) as f32;
        Ok((loss, grads, started.elapsed().as_secs_f64()))
    }
}

/// Gradient floats a batch of items may hold at once ([`StepExecutor::batch_limit`]): 768 MiB.
/// Measured at B/32 (six tasks, batch 16, 2-core CPU): a step takes 11.7 s one item at a time,
/// 10.5 s two at a time, 10.5 s four at a time, and peak anonymous memory 2.7, 3.5 and 5.1 GiB.
pub const GRADIENT_BUDGET: i64 = 3 << 26;

impl fusion_cluster::runtime::Executor for StepExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: StepItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let result = self.run(&item).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&result).map_err(|e| e.to_string())
    }

    fn batch_limit(&self) -> usize {
        StepExecutor::batch_limit(self)
    }

    fn execute_batch(&mut self, items: &[&[u8]]) -> Vec<std::result::Result<Vec<u8>, String>> {
        let decoded: Vec<std::result::Result<StepItem, String>> = items
            .iter()
            .map(|i| fusion_cluster::codec::decode(i).map_err(|e| e.to_string()))
            .collect();
        let good: Vec<StepItem> = decoded.iter().filter_map(|d| d.as_ref().ok().cloned()).collect();
        let mut results = self.run_batch(&good).into_iter();
        decoded
            .into_iter()
            .map(|d| {
                d?;
                let result = results.next().ok_or("no result")?.map_err(|e| format!("{e:#}"))?;
                fusion_cluster::codec::encode(&result).map_err(|e| e.to_string())
            })
            .collect()
    }
}
