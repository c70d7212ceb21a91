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

    /// Runs one item. A small model (under [`SMALL_MODEL`] parameters) runs on one intra-op
    /// thread, where libtorch's per-op threading costs more than it saves (measured on the
    /// fixtures: 2× faster steps); every worker applies the same rule, so results do not depend
    /// on where an item ran.
    pub fn run(&mut self, item: &StepItem) -> Result<StepResult> {
        let params: i64 = self.inputs.shapes.iter().map(|s| s.iter().product::<i64>()).sum();
        if params < SMALL_MODEL && self.tasks.device == tch::Device::Cpu {
            crate::device::single_threaded(|| self.run_here(item))
        } else {
            self.run_here(item)
        }
    }

    fn run_here(&mut self, item: &StepItem) -> Result<StepResult> {
        let began = std::time::Instant::now();
        let t = item.task as usize;
        if t >= self.tasks.tasks.len() {
            anyhow::bail!("step item for task #{t}, and there are {}", self.tasks.tasks.len());
        }
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
        let (_, _, leaves, vision) = self.merged.as_mut().context("merged model")?;
        for (_, t) in leaves.iter() {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
        let started = std::time::Instant::now();
        let indices: Vec<usize> = item.indices.iter().map(|&i| i as usize).collect();
        let x = self.tasks.pixels(t, &indices)?;
        let task = &self.tasks.tasks[t];
        let feats = self.tasks.base.image_features(vision, &x);
        let logits = zeroshot::logits(&feats, &task.head, &self.tasks.base.logit_scale);
        let loss = entropy_loss(&logits);
        let forward = started.elapsed();
        let rss_forward = crate::device::resident_mib();
        loss.backward();
        let backward = started.elapsed() - forward;
        let cpu = self.tasks.device == tch::Device::Cpu;
        let grads: Vec<Tensor> = leaves
            .iter()
            .map(|(name, t)| {
                let g = t.grad();
                if !g.defined() {
                    anyhow::bail!("no gradient reached `{name}`")
                }
                Ok(if cpu { g.contiguous() } else { g.to_device(tch::Device::Cpu).contiguous() })
            })
            .collect::<Result<_>>()?;
        let grads: Vec<&[f32]> = grads.iter().map(merge::values_view).collect();
        let copied = started.elapsed() - forward - backward;
        let grad =
            merge::project(&self.inputs, &grads, &item.lambda, self.granularity, self.clamp)?;
        tracing::debug!(
            step = item.step,
            task = t,
            ?forward,
            ?backward,
            ?copied,
            projected = ?(started.elapsed() - forward - backward - copied),
            ?rss_forward,
            rss = ?crate::device::resident_mib(),
            "step item"
        );
        let seconds = began.elapsed().as_secs_f64();
        Ok(StepResult { loss: loss.double_value(&[]) as f32, grad, seconds })
    }
}

impl fusion_cluster::runtime::Executor for StepExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: StepItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let result = self.run(&item).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&result).map_err(|e| e.to_string())
    }
}
