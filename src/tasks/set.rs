//! A task set: the tasks a program evaluates or adapts on, loaded once — the base CLIP's image
//! head (`visual_projection`, `logit_scale`), its preprocessing, and per task its dataset split,
//! zero-shot head and, when the decoded-image cache holds it, its decoded crops. The base
//! model's text tower is loaded only while a zero-shot head that is not cached is computed.
//!
//! Evaluation builds one from the task pool (`taskpool.base_model`, `test_datasets`);
//! test-time adaptation from the model pool (`_pretrained_`, the pool's `test_datasets` in model
//! order), as FusionBench's `CLIPClassificationMixin` does.

use super::zeroshot;
use crate::data::cache::{CachedCrops, CropCache};
use crate::data::preprocess::normalize_batch;
use crate::data::{ImageDataset, ImageProcessorConfig};
use crate::hub::{Hub, RepoType};
use crate::models::clip::{ClipImageHead, ClipModel, ClipTokenizer};
use crate::program::DatasetRef;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Tensor};

/// One loaded task.
pub struct Task {
    /// Its name (the config key: `sun397`, `stanford-cars`, ...).
    pub name: String,
    /// Its split.
    pub data: Arc<ImageDataset>,
    /// Its zero-shot head `[classes, proj]`, on the set's device.
    pub head: Tensor,
    /// Its decoded crops, when the image cache has them.
    pub cached: Option<Arc<CachedCrops>>,
}

/// What [`TaskSet::load`] needs.
pub struct TaskSetSpec<'a> {
    /// The base CLIP's id (text tower, projections, logit scale, tokenizer).
    pub base_model: &'a str,
    /// The preprocessing config's id.
    pub processor: &'a str,
    /// `(task name, dataset)` in order.
    pub tasks: &'a [(String, DatasetRef)],
    /// Where zero-shot heads are cached (`path.cache_dir`).
    pub cache_dir: Option<&'a Path>,
    /// The decoded-image cache.
    pub crop_cache: Option<&'a CropCache>,
    /// Whether the tasks need zero-shot heads (RegMean's statistics do not: its heads are then
    /// empty `[0, projection]` tensors).
    pub heads: bool,
}

/// Tasks, loaded.
pub struct TaskSet {
    /// The base CLIP's image head on [`Self::device`].
    pub base: ClipImageHead,
    /// Its checkpoint directory.
    pub base_dir: PathBuf,
    /// The preprocessing.
    pub processor: ImageProcessorConfig,
    /// The tasks, in order.
    pub tasks: Vec<Task>,
    /// Where the base model and heads live.
    pub device: Device,
}

impl TaskSet {
    /// Loads the base model, tokenizer, processor, every task's split (labels checked against
    /// its classes) and zero-shot head, on `device`.
    pub fn load(spec: &TaskSetSpec<'_>, hub: &Hub, device: Device) -> Result<Self> {
        let base_dir = hub.resolve(spec.base_model, RepoType::Model, None)?;
        let base = ClipImageHead::load(&base_dir, device)
            .with_context(|| format!("loading the base CLIP model `{}`", spec.base_model))?;
        // The whole model, text tower included, only if a head has to be computed.
        let whole = std::cell::OnceCell::new();
        let clip = || -> Result<&ClipModel> {
            if whole.get().is_none() {
                let m = ClipModel::load(&base_dir, device).with_context(|| {
                    format!("loading the base CLIP model `{}`", spec.base_model)
                })?;
                let _ = whole.set(m);
            }
            whole.get().context("the base CLIP model")
        };
        let tokenizer = ClipTokenizer::from_dir(&base_dir)
            .with_context(|| format!("loading the tokenizer of {}", spec.base_model))?;
        let proc_dir = hub.resolve(spec.processor, RepoType::Model, None)?;
        let processor =
            ImageProcessorConfig::from_file(&proc_dir.join("preprocessor_config.json"))?;
        if !processor.do_center_crop {
            anyhow::bail!(
                "the processor of {} has do_center_crop=false; batches need one image size",
                spec.processor
            );
        }
        let mut tasks = Vec::new();
        for (name, ds) in spec.tasks {
            let task = super::task(name)?;
            let head = if spec.heads {
                zeroshot::cached_zeroshot_head(
                    spec.cache_dir,
                    &base_dir,
                    device,
                    clip,
                    &tokenizer,
                    name,
                    task,
                )
                .with_context(|| format!("task `{name}`: its zero-shot head"))?
            } else {
                let width = base.visual_projection.size()[0];
                Tensor::zeros([0, width], (tch::Kind::Float, device))
            };
            let dir = hub.resolve_dataset(&ds.id)?;
            let data = ImageDataset::load(&dir, ds.config.as_deref(), &ds.split, processor.clone())
                .with_context(|| {
                    format!("task `{name}`: opening dataset {} split {}", ds.id, ds.split)
                })?;
            check_labels(name, &data, task.classnames.len())?;
            let cached = spec.crop_cache.and_then(|c| c.open(&data)).map(Arc::new);
            tasks.push(Task { name: name.clone(), data: Arc::new(data), head, cached });
        }
        drop(whole);
        Ok(Self { base, base_dir, processor, tasks, device })
    }

    /// The same tasks with the base model and heads on `device` (data and caches shared).
    pub fn replicate(&self, device: Device) -> Result<Self> {
        let base = self.base.to_device(device);
        let tasks = self
            .tasks
            .iter()
            .map(|t| Task {
                name: t.name.clone(),
                data: t.data.clone(),
                head: t.head.to_device(device),
                cached: t.cached.clone(),
            })
            .collect();
        Ok(Self {
            base,
            base_dir: self.base_dir.clone(),
            processor: self.processor.clone(),
            tasks,
            device,
        })
    }

    /// Decodes every task's split that the image cache does not hold yet into it (once, with a
    /// progress bar), so that random batches cost no JPEG decoding; a split the cache cannot
    /// take stays decoded on demand.
    pub fn fill_crop_cache(&mut self, cache: &CropCache) -> Result<()> {
        const CHUNK: usize = 256;
        for t in self.tasks.iter_mut().filter(|t| t.cached.is_none()) {
            let Some(mut writer) = cache.writer(&t.data) else { continue };
            let bar = crate::progress::bar(&format!("decoding {}", t.name), t.data.len(), "images");
            for start in (0..t.data.len()).step_by(CHUNK) {
                let end = (start + CHUNK).min(t.data.len());
                let (crops, _) = t
                    .data
                    .decode_crop_batch(start..end)
                    .with_context(|| format!("task `{}`", t.name))?;
                writer.write_at(start, &crops)?;
                bar.inc((end - start) as u64);
            }
            writer.finish()?;
            bar.finish_and_clear();
            t.cached = cache.open(&t.data).map(Arc::new);
        }
        Ok(())
    }

    /// The task names in order.
    pub fn names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }

    /// `pixel_values` `[n, 3, H, W]` of task `t`'s examples `indices` (any order), from the
    /// decoded-image cache when present, else decoded now (in parallel).
    pub fn pixels(&self, t: usize, indices: &[usize]) -> Result<Tensor> {
        let task = &self.tasks[t];
        let (h, w) =
            (self.processor.crop_size.height as i64, self.processor.crop_size.width as i64);
        let values = match &task.cached {
            Some(c) => c.batch_indices(indices, &self.processor),
            None => {
                let crops = task
                    .data
                    .decode_crop_indices(indices)
                    .with_context(|| format!("task `{}`", task.name))?;
                normalize_batch(&crops, indices.len(), &self.processor)
            }
        };
        Ok(Tensor::from_slice(&values).view([indices.len() as i64, 3, h, w]).to_device(self.device))
    }
}

/// Every label must index a class of the task, or accuracy would silently be wrong.
pub fn check_labels(task: &str, data: &ImageDataset, classes: usize) -> Result<()> {
    if let Some(i) = data.labels().iter().position(|&l| l < 0 || l as usize >= classes) {
        let (file, row) =
            data.origin(i).map(|(f, r)| (f.display().to_string(), r)).unwrap_or_default();
        anyhow::bail!(
            "task `{task}`: label {} at row {row} of {file} is out of range (the task has {classes} classes)",
            data.labels()[i]
        );
    }
    Ok(())
}
