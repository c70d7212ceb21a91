//! Evaluation as work items, so one plan runs the same way in one process or across a cluster.
//!
//! An item is a batch-aligned range of one task's test split: the batches FusionBench would form
//! (`batch_size` examples, in dataset order), never split or merged. Its result is each batch's
//! (correct, size, mean loss). The coordinator gathers results in item order, and
//! [`fold_metrics`] adds them batch by batch in that order, so the float32 loss sum — and the
//! report — are the same as one process computing every batch in sequence, whichever worker
//! computed what, and whatever was recomputed after a worker was lost.

use super::EvalPlan;
use crate::data::cache::CropWriter;
use crate::data::preprocess::normalize_batch;
use crate::data::ImageDataset;
use crate::hub::Hub;
use crate::models::clip::ClipVision;
use crate::tasks::set::{TaskSet, TaskSetSpec};
use crate::tasks::{metrics::TaskMetrics, zeroshot};
use anyhow::{Context, Result};
use fusion_cluster::runtime::{Prefetcher, Shard, ShardLoader, ShardOptions};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Batches `[first_batch, first_batch + batches)` of task number `task` (in the plan's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalItem {
    /// Index of the task in [`EvalPlan::tasks`].
    pub task: u32,
    /// First batch.
    pub first_batch: u64,
    /// Number of batches.
    pub batches: u64,
}

/// One batch's outcome: correct predictions, examples, mean cross-entropy (float32).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    /// Correct top-1 predictions.
    pub correct: u64,
    /// Examples in the batch.
    pub size: u64,
    /// Mean loss over the batch.
    pub loss: f32,
}

/// A task's batches as a dataset-shard actor loads them: decoded, resized, cropped u8 images.
struct TaskLoader {
    name: String,
    data: Arc<ImageDataset>,
    batch_size: usize,
}

impl ShardLoader for TaskLoader {
    fn batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    fn load(&mut self, batch: usize) -> std::result::Result<Vec<u8>, String> {
        let start = batch * self.batch_size;
        let end = (start + self.batch_size).min(self.data.len());
        let (crops, _) = self
            .data
            .decode_crop_batch(start..end)
            .map_err(|e| format!("task `{}`: {e}", self.name))?;
        Ok(crops)
    }
}

/// The dataset-shard actors of the tasks without a complete decoded-image cache, started on the
/// first batch a task is asked for inside the cluster runtime. While a worker computes one
/// batch, the shard of the next assigned batch decodes it ([`Evaluator::prefetcher`]).
struct Shards {
    batch_size: usize,
    /// Per task, in plan order.
    tasks: Vec<ShardSlot>,
}

/// One task's shard: its name, its loader's dataset (`None` when served from the decoded-image
/// cache) and the shard once started.
struct ShardSlot {
    name: String,
    data: Option<Arc<ImageDataset>>,
    shard: Mutex<Option<Shard>>,
}

impl Shards {
    /// Task `t`'s shard, started now if needed; `None` outside a tokio runtime or for a cached
    /// task (the caller then decodes itself).
    fn get(&self, t: usize) -> Option<Shard> {
        let task = self.tasks.get(t)?;
        let data = task.data.as_ref()?;
        let mut slot = task.shard.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let handle = tokio::runtime::Handle::try_current().ok()?;
            let loader = TaskLoader {
                name: task.name.clone(),
                data: data.clone(),
                batch_size: self.batch_size,
            };
            let opts = ShardOptions { cache_batches: 4, prefetch: 0 };
            *slot = handle.block_on(Shard::spawn(Box::new(loader), opts)).ok();
            tracing::debug!(task = %task.name, started = slot.is_some(), "dataset shard");
        }
        slot.clone()
    }

    /// The running shard of task `t`, without starting one.
    fn running(&self, t: usize) -> Option<Shard> {
        let task = self.tasks.get(t)?;
        task.shard.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Crop-cache entries being filled, shared with the caller so it can publish them after the run.
pub type CacheWriters = Arc<Mutex<Vec<Option<CropWriter>>>>;

/// Everything needed to evaluate any item of a plan: the model, the base CLIP, the tasks.
pub struct Evaluator {
    /// The tasks, their data, heads and caches, and the base model's image head.
    set: TaskSet,
    vision: ClipVision,
    /// Intra-op threads of this worker, set before each item (libtorch's setting is per OS
    /// thread, and items may run on any of the runtime's threads).
    threads: usize,
    batch_size: usize,
    fast_dev_run: bool,
    writers: CacheWriters,
    shards: Arc<Shards>,
    bar: indicatif::ProgressBar,
}

impl Evaluator {
    /// Loads the base model, tokenizer, processor, every task's dataset (labels checked) and its
    /// zero-shot head, for evaluating `vision` on `device`.
    pub fn new(plan: &EvalPlan, hub: &Hub, vision: ClipVision, device: Device) -> Result<Self> {
        let spec = TaskSetSpec {
            base_model: &plan.base_model,
            processor: &plan.processor,
            tasks: &plan.tasks,
            cache_dir: plan.cache_dir.as_deref(),
            crop_cache: plan.crop_cache.as_ref(),
            heads: true,
        };
        let set = TaskSet::load(&spec, hub, device)?;
        let writers = set
            .tasks
            .iter()
            .map(|t| match (&t.cached, plan.fast_dev_run) {
                (None, false) => plan.crop_cache.as_ref().and_then(|c| c.writer(&t.data)),
                _ => None,
            })
            .collect();
        let shards = Arc::new(Shards {
            batch_size: plan.batch_size.max(1),
            tasks: set
                .tasks
                .iter()
                .map(|t| ShardSlot {
                    name: t.name.clone(),
                    data: if t.cached.is_some() { None } else { Some(t.data.clone()) },
                    shard: Mutex::new(None),
                })
                .collect(),
        });
        let mut ev = Self {
            set,
            vision,
            threads: tch::get_num_threads().max(1) as usize,
            batch_size: plan.batch_size.max(1),
            fast_dev_run: plan.fast_dev_run,
            writers: Arc::new(Mutex::new(writers)),
            shards,
            bar: indicatif::ProgressBar::hidden(),
        };
        let total: usize = ev.items().iter().map(|i| ev.examples(i)).sum();
        ev.bar = crate::progress::bar("evaluating", total, "images");
        Ok(ev)
    }

    /// Another worker of the same evaluation on `device` with `vision` (the model evaluated,
    /// loaded on that device): the tasks' data, decoded-image caches, crop-cache writers,
    /// dataset shards and progress bar are shared; the base model and heads live on `device`.
    pub fn replicate(&self, vision: ClipVision, device: Device) -> Result<Self> {
        Ok(Self {
            set: self.set.replicate(device)?,
            vision,
            threads: self.threads,
            batch_size: self.batch_size,
            fast_dev_run: self.fast_dev_run,
            writers: self.writers.clone(),
            shards: self.shards.clone(),
            bar: self.bar.clone(),
        })
    }

    /// The device this evaluator computes on.
    pub fn device(&self) -> Device {
        self.set.device
    }

    /// Makes this worker use `n` intra-op threads.
    pub fn set_threads(&mut self, n: usize) {
        self.threads = n.max(1);
    }

    /// The task names in plan order.
    pub fn task_names(&self) -> Vec<String> {
        self.set.names()
    }

    /// The crop-cache writers, to publish with [`finish_caches`] after the run.
    pub fn cache_writers(&self) -> CacheWriters {
        self.writers.clone()
    }

    /// The plan's items: every batch of every task (only the first with `fast_dev_run`), one
    /// batch per item, in task then batch order.
    pub fn items(&self) -> Vec<EvalItem> {
        let mut items = Vec::new();
        for (t, task) in self.set.tasks.iter().enumerate() {
            let n = task.data.len();
            let batches = n.div_ceil(self.batch_size) as u64;
            let batches = if self.fast_dev_run { batches.min(1) } else { batches };
            for b in 0..batches {
                items.push(EvalItem { task: t as u32, first_batch: b, batches: 1 });
            }
        }
        items
    }

    fn examples(&self, item: &EvalItem) -> usize {
        let n = self.set.tasks[item.task as usize].data.len();
        let start = (item.first_batch as usize * self.batch_size).min(n);
        let end = ((item.first_batch + item.batches) as usize * self.batch_size).min(n);
        end - start
    }

    /// Evaluates one item.
    pub fn run(&mut self, item: &EvalItem) -> Result<Vec<BatchResult>> {
        let _guard = tch::no_grad_guard();
        let device = self.set.device;
        if device == Device::Cpu {
            tch::set_num_threads(self.threads as i32);
        }
        let processor = &self.set.processor;
        let t = item.task as usize;
        let task =
            self.set.tasks.get(t).with_context(|| {
                format!("work item for task #{t}, which the plan does not have")
            })?;
        let n = task.data.len();
        let size = (processor.crop_size.height as i64, processor.crop_size.width as i64);
        let mut out = Vec::with_capacity(item.batches as usize);
        for b in item.first_batch..item.first_batch + item.batches {
            let start = b as usize * self.batch_size;
            let end = (start + self.batch_size).min(n);
            if start >= end {
                break;
            }
            let (pixels, labels) = match &task.cached {
                Some(c) => {
                    (c.batch(start..end, processor), task.data.labels()[start..end].to_vec())
                }
                None => {
                    let labels = task.data.labels()[start..end].to_vec();
                    let crops = match self.shards.get(t) {
                        Some(shard) => shard
                            .batch_blocking(b as usize)
                            .map_err(|e| anyhow::anyhow!("{e}"))?
                            .to_vec(),
                        None => {
                            task.data
                                .decode_crop_batch(start..end)
                                .with_context(|| format!("task `{}`", task.name))?
                                .0
                        }
                    };
                    let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(w) = writers[t].as_mut() {
                        w.write_at(start, &crops)?;
                    }
                    (normalize_batch(&crops, end - start, processor), labels)
                }
            };
            let bsz = (end - start) as i64;
            let x = Tensor::from_slice(&pixels).view([bsz, 3, size.0, size.1]).to_device(device);
            let y = Tensor::from_slice(&labels).to_device(device);
            let feats = self.set.base.image_features(&self.vision, &x);
            // Logits and loss on one thread: their float32 results depend on the thread count.
            let (loss, correct) = crate::device::single_threaded(|| {
                let logits = zeroshot::logits(&feats, &task.head, &self.set.base.logit_scale);
                let loss = logits.cross_entropy_for_logits(&y).double_value(&[]) as f32;
                let correct =
                    logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
                (loss, correct)
            });
            out.push(BatchResult { correct: correct as u64, size: bsz as u64, loss });
            self.bar.inc(bsz as u64);
            tracing::debug!(task = %task.name, done = end, of = n, "batch");
        }
        Ok(out)
    }
}

impl fusion_cluster::runtime::Executor for Evaluator {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: EvalItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let result = self.run(&item).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&result).map_err(|e| e.to_string())
    }

    /// Asks the item's dataset shard to decode its batches while the current item runs.
    fn prefetcher(&self) -> Option<Prefetcher> {
        let shards = self.shards.clone();
        Some(Arc::new(move |payload: &[u8]| {
            let Ok(item) = fusion_cluster::codec::decode::<EvalItem>(payload) else { return };
            let Some(shard) = shards.running(item.task as usize) else { return };
            for b in item.first_batch..item.first_batch + item.batches {
                let shard = shard.clone();
                tokio::spawn(async move {
                    let _ = shard.batch(b as usize).await;
                });
            }
        }))
    }
}

/// Publishes every crop-cache entry that the run filled completely.
pub fn finish_caches(writers: &CacheWriters) -> Result<()> {
    let mut writers = writers.lock().unwrap_or_else(|e| e.into_inner());
    for w in writers.iter_mut() {
        if let Some(w) = w.take() {
            w.finish()?;
        }
    }
    Ok(())
}

/// Per-task metrics from the items' results, added batch by batch in item order.
pub fn fold_metrics(
    names: &[String],
    items: &[EvalItem],
    results: &[Vec<BatchResult>],
) -> Vec<(String, TaskMetrics)> {
    let mut metrics: Vec<(String, TaskMetrics)> =
        names.iter().map(|n| (n.clone(), TaskMetrics::default())).collect();
    for (item, batches) in items.iter().zip(results) {
        for b in batches {
            metrics[item.task as usize].1.add_batch(b.correct, b.size, b.loss);
        }
    }
    metrics
}
