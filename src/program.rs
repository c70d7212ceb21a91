//! The evaluation program: load the model to evaluate and the task pool's base CLIP, build each
//! task's zero-shot head, run the test split in FusionBench's batches, and produce the report.
//!
//! This is FusionBench's `method=dummy` path (`CLIPVisionModelTaskPool.evaluate`); merging
//! methods will hand their merged vision weights to the same [`evaluate`].

use crate::data::cache::CropCache;
use crate::data::preprocess::normalize_batch;
use crate::data::{ImageDataset, ImageProcessorConfig};
use crate::device::Accelerator;
use crate::hub::{Hub, RepoType};
use crate::methods::{Merged, ModelPool};
use crate::models::clip::{ClipModel, ClipTokenizer, ClipVision};
use crate::tasks::{self, metrics::TaskMetrics, zeroshot};
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A test dataset on the hub: id, optional config name, split.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRef {
    /// Hub id (`tanganke/sun397`) or local directory.
    pub id: String,
    /// Config name (`cropped_digits` for SVHN), if any.
    pub config: Option<String>,
    /// Split (`test`).
    pub split: String,
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    /// What is evaluated, for the provenance file (the method and the pool's models).
    pub model: String,
    /// The task pool's `base_model`: text tower, projections and logit scale.
    pub base_model: String,
    /// The processor (preprocessing config) id; FusionBench's task pool default is the base model.
    pub processor: String,
    /// (report key, dataset) in config order.
    pub tasks: Vec<(String, DatasetRef)>,
    /// Evaluation batch size (FusionBench: 128).
    pub batch_size: usize,
    /// Only the first batch of each task.
    pub fast_dev_run: bool,
    /// CPU or GPU.
    pub accelerator: Accelerator,
    /// Where to write the report JSON (FusionBench's `report_save_path`).
    pub report_save_path: Option<PathBuf>,
    /// Where to save the resulting vision model as `save_pretrained` would
    /// (FusionBench's `merged_model_save_path`).
    pub merged_model_save_path: Option<PathBuf>,
    /// The program's `seed`, recorded in the provenance file.
    pub seed: Option<u64>,
    /// Where zero-shot heads are cached (FusionBench's `path.cache_dir`); `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// The decoded-image cache (`<cache_dir>/images`), if enabled.
    pub crop_cache: Option<CropCache>,
}

/// Per-task results in config order.
#[derive(Debug, Clone)]
pub struct EvalResult {
    /// `(report key, metrics)`.
    pub tasks: Vec<(String, TaskMetrics)>,
    /// Parameters of the evaluated vision model.
    pub all_params: i64,
    /// Trainable parameters (all of them for a plain model).
    pub trainable_params: i64,
}

impl EvalResult {
    /// The report FusionBench writes: `model_info`, each task, then `average`.
    pub fn report(&self) -> Value {
        let mut m = Map::new();
        let pct = if self.all_params > 0 {
            self.trainable_params as f64 / self.all_params as f64
        } else {
            0.0
        };
        m.insert(
            "model_info".into(),
            json!({"trainable_params": self.trainable_params, "all_params": self.all_params, "trainable_percentage": pct}),
        );
        for (name, t) in &self.tasks {
            m.insert(name.clone(), json!({"accuracy": t.accuracy(), "loss": t.loss()}));
        }
        if !self.tasks.is_empty() {
            let n = self.tasks.len() as f64;
            let acc = self.tasks.iter().map(|(_, t)| t.accuracy()).sum::<f64>() / n;
            let loss = self.tasks.iter().map(|(_, t)| t.loss()).sum::<f64>() / n;
            m.insert("average".into(), json!({"accuracy": acc, "loss": loss}));
        }
        Value::Object(m)
    }
}

/// Evaluates `vision` on each task of `plan` with the base model's heads.
pub fn evaluate(
    plan: &EvalPlan,
    hub: &Hub,
    vision: &ClipVision,
    base: &ClipModel,
    device: Device,
) -> Result<Vec<(String, TaskMetrics)>> {
    let base_dir = hub.resolve(&plan.base_model, RepoType::Model, None)?;
    let tokenizer = ClipTokenizer::from_dir(&base_dir)
        .with_context(|| format!("loading the tokenizer of {}", plan.base_model))?;
    let proc_dir = hub.resolve(&plan.processor, RepoType::Model, None)?;
    let processor = ImageProcessorConfig::from_file(&proc_dir.join("preprocessor_config.json"))?;
    let mut out = Vec::new();
    for (name, ds) in &plan.tasks {
        let spec = tasks::task(name)?;
        let t0 = Instant::now();
        let head = zeroshot::cached_zeroshot_head(
            plan.cache_dir.as_deref(),
            &base_dir,
            base,
            &tokenizer,
            name,
            spec,
        );
        let dir = hub.resolve_dataset(&ds.id)?;
        let data = ImageDataset::load(&dir, ds.config.as_deref(), &ds.split, processor.clone())
            .with_context(|| {
                format!("task `{name}`: opening dataset {} split {}", ds.id, ds.split)
            })?;
        check_labels(name, &data, spec.classnames.len())?;
        let metrics = evaluate_task(name, &data, &processor, vision, base, &head, plan, device)?;
        tracing::info!(
            task = %name,
            accuracy = metrics.accuracy(),
            loss = metrics.loss(),
            examples = metrics.total,
            seconds = t0.elapsed().as_secs_f64(),
            "task evaluated"
        );
        out.push((name.clone(), metrics));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn evaluate_task(
    name: &str,
    data: &ImageDataset,
    processor: &ImageProcessorConfig,
    vision: &ClipVision,
    base: &ClipModel,
    head: &Tensor,
    plan: &EvalPlan,
    device: Device,
) -> Result<TaskMetrics> {
    let _guard = tch::no_grad_guard();
    let n = data.len();
    if !processor.do_center_crop {
        anyhow::bail!(
            "task `{name}`: the processor has do_center_crop=false; batches need one image size"
        );
    }
    let size = (processor.crop_size.height, processor.crop_size.width);
    let mut metrics = TaskMetrics::default();
    let bar = crate::progress::bar(
        name,
        if plan.fast_dev_run { n.min(plan.batch_size) } else { n },
        "images",
    );
    let cached = plan.crop_cache.as_ref().and_then(|c| c.open(data));
    let mut writer = match (&cached, plan.fast_dev_run) {
        (None, false) => plan.crop_cache.as_ref().and_then(|c| c.writer(data)),
        _ => None,
    };
    let mut start = 0;
    while start < n {
        let end = (start + plan.batch_size).min(n);
        let (pixels, labels) = match &cached {
            Some(c) => (c.batch(start..end, processor), data.labels()[start..end].to_vec()),
            None => {
                let (crops, labels) =
                    data.decode_crop_batch(start..end).with_context(|| format!("task `{name}`"))?;
                if let Some(w) = writer.as_mut() {
                    w.write(&crops)?;
                }
                (normalize_batch(&crops, end - start, processor), labels)
            }
        };
        let b = (end - start) as i64;
        let x = Tensor::from_slice(&pixels)
            .view([b, 3, size.0 as i64, size.1 as i64])
            .to_device(device);
        let y = Tensor::from_slice(&labels).to_device(device);
        let logits = zeroshot::logits(&base.image_features(vision, &x), head, &base.logit_scale);
        let loss = logits.cross_entropy_for_logits(&y).double_value(&[]) as f32;
        let correct = logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        metrics.add_batch(correct as u64, b as u64, loss);
        bar.inc(b as u64);
        tracing::debug!(task = %name, done = end, of = n, "batch");
        start = end;
        if plan.fast_dev_run {
            break;
        }
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    bar.finish_and_clear();
    Ok(metrics)
}

/// Every label must index a class of the task, or accuracy would silently be wrong.
fn check_labels(task: &str, data: &ImageDataset, classes: usize) -> Result<()> {
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

/// Evaluates merged vision weights as planned: save the model if asked, evaluate every task,
/// write the report and its provenance.
pub fn run(plan: &EvalPlan, hub: &Hub, pool: &ModelPool, merged: &Merged) -> Result<Value> {
    let device = crate::device::select(plan.accelerator)?;
    let weights = &merged.weights;
    if let Some(dir) = &plan.merged_model_save_path {
        save_vision_model(dir, &pool.config_source(), weights)?;
    }
    let vision = ClipVision::load(
        &Scope::new(weights, device, Kind::Float).pp("vision_model"),
        pool.config(),
    )?;
    let base_dir = hub.resolve(&plan.base_model, RepoType::Model, None)?;
    let base = ClipModel::load(&base_dir, device)
        .with_context(|| format!("loading the task pool's base model `{}`", plan.base_model))?;
    let tasks = evaluate(plan, hub, &vision, &base, device)?;
    let all = weights.numel();
    let trainable = if merged.trainable { all } else { 0 };
    let result = EvalResult { tasks, all_params: all, trainable_params: trainable };
    let report = result.report();
    if let Some(path) = &plan.report_save_path {
        save_report(&report, path)?;
        save_provenance(plan, device, path)?;
    }
    Ok(report)
}

/// Saves vision weights as `CLIPVisionModel.save_pretrained` does: `config.json` (a
/// `CLIPVisionConfig`, taken from the source checkpoint's config) and `model.safetensors`.
pub fn save_vision_model(dir: &Path, source_config: &Path, weights: &WeightMap) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::weights::save_safetensors(weights, dir.join("model.safetensors"), Some(meta))
        .with_context(|| format!("saving the model to {}", dir.display()))?;
    save_vision_config(dir, source_config)?;
    tracing::info!(path = %dir.display(), "model saved");
    Ok(())
}

/// Writes the `config.json` of a saved `CLIPVisionModel` (see [`save_vision_model`]) from the
/// source checkpoint's config.
pub fn save_vision_config(dir: &Path, source_config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(source_config)
        .with_context(|| format!("reading {}", source_config.display()))?;
    let root: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", source_config.display()))?;
    let mut vision = match root.get("vision_config") {
        Some(v) => v.clone(),
        None => root,
    };
    if let Some(m) = vision.as_object_mut() {
        m.insert("architectures".into(), json!(["CLIPVisionModel"]));
        m.insert("model_type".into(), json!("clip_vision_model"));
        m.insert("torch_dtype".into(), json!("float32"));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&vision)? + "\n")
        .with_context(|| format!("writing {}", dir.join("config.json").display()))?;
    Ok(())
}

/// Writes `<report>.meta.json`: what produced the report (seed, versions, threads, device,
/// determinism), kept apart so the report itself stays byte-compatible with FusionBench's.
fn save_provenance(plan: &EvalPlan, device: Device, report: &Path) -> Result<()> {
    let meta = json!({
        "fusion_bench": env!("CARGO_PKG_VERSION"),
        "libtorch": "2.11.0 (PyPI torch wheel), tch 0.24.0",
        "model": plan.model,
        "base_model": plan.base_model,
        "seed": plan.seed,
        "device": format!("{device:?}"),
        "torch_threads": tch::get_num_threads(),
        "decode_threads": rayon::current_num_threads(),
        "batch_size": plan.batch_size,
        "fast_dev_run": plan.fast_dev_run,
        "deterministic": "evaluation is deterministic on CPU: fixed batch order, no sampling",
    });
    let mut name = report.as_os_str().to_owned();
    name.push(".meta.json");
    let path = PathBuf::from(name);
    std::fs::write(&path, serde_json::to_string_pretty(&meta)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the report atomically (temp file, fsync, rename): a crash never leaves a partial report
/// under the final name.
pub fn save_report(report: &Value, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::report::write_atomic(path, crate::report::to_python_json(report).as_bytes())?;
    tracing::info!(path = %path.display(), "report saved");
    Ok(())
}
