//! The evaluation program: load the model to evaluate and the task pool's base CLIP, build each
//! task's zero-shot head, run the test split in FusionBench's batches, and produce the report.
//!
//! FusionBench's `CLIPVisionModelTaskPool.evaluate`, for whatever a method returns. The work is
//! cut into batch-aligned items ([`work`]) that the cluster runtime runs in this process or
//! across workers; results are reduced in batch order, so the report never depends on where
//! a batch ran.

mod from_config;
pub mod work;

pub use from_config::{crop_cache, eval_plan, prefetch, run_config};

use crate::data::cache::CropCache;
use crate::device::{Accelerator, Devices};
use crate::hub::Hub;
use crate::methods::{Merged, ModelPool};
use crate::models::clip::ClipVision;
use crate::tasks::metrics::TaskMetrics;
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
pub use fusion_cluster::runtime::ClusterOptions;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};
use work::{BatchResult, Evaluator};

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
    /// The model pool's models, `(name, id)`, whose identities the provenance file records.
    pub models: Vec<(String, String)>,
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
    /// `fabric.devices`: how many workers this process runs, one per device.
    pub devices: Devices,
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

/// Where evaluation runs: this process alone (the default), or this process as a cluster's
/// coordinator that also lets workers join (`--serve`).
pub enum Distribution {
    /// Every item in this process (still through the coordinator and a local worker actor).
    Local,
    /// Coordinator listening on `listen`; workers join with `--join`.
    Serve {
        /// Address to listen on (port 0: any).
        listen: std::net::SocketAddr,
        /// Job id, credentials folder, timeouts.
        options: Box<ClusterOptions>,
    },
}

/// Evaluates merged vision weights as planned: save the model if asked, evaluate every task
/// (in this process or across the cluster), write the report and its provenance.
pub fn run(
    plan: &EvalPlan,
    hub: &Hub,
    pool: &ModelPool,
    merged: &Merged,
    distribution: Distribution,
) -> Result<Value> {
    let weights = &merged.weights;
    if let Some(dir) = &plan.merged_model_save_path {
        save_vision_model(dir, &pool.config_source(), weights)?;
    }
    let evaluators = evaluators(plan, hub, pool, merged)?;
    let devices: Vec<String> = evaluators.iter().map(|e| format!("{:?}", e.device())).collect();
    let names = evaluators[0].task_names();
    let items = evaluators[0].items();
    let writers = evaluators[0].cache_writers();
    let encoded = items
        .iter()
        .map(fusion_cluster::codec::encode)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let (listen, options) = match distribution {
        Distribution::Local => (None, ClusterOptions::new("local", std::env::temp_dir())),
        Distribution::Serve { listen, options } => (Some(listen), *options),
    };
    let t0 = Instant::now();
    let job = options.job_id.clone();
    let local: Vec<Box<dyn fusion_cluster::runtime::Executor>> = evaluators
        .into_iter()
        .map(|e| Box::new(e) as Box<dyn fusion_cluster::runtime::Executor>)
        .collect();
    let summary = fusion_cluster::runtime::run_coordinator_with(
        encoded,
        local,
        listen,
        &options,
        |addr| tracing::info!(%addr, %job, "coordinator listening: workers join with --join"),
    )
    .context("evaluation")?;
    let results = summary
        .results
        .iter()
        .map(|r| fusion_cluster::codec::decode::<Vec<BatchResult>>(r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    work::finish_caches(&writers)?;
    let tasks = work::fold_metrics(&names, &items, &results);
    for (name, m) in &tasks {
        tracing::info!(task = %name, accuracy = m.accuracy(), loss = m.loss(), examples = m.total, "task evaluated");
    }
    tracing::info!(
        seconds = t0.elapsed().as_secs_f64(),
        items = items.len(),
        workers = ?summary.per_worker,
        lost = summary.workers_lost,
        computed_twice = summary.computed_twice,
        "evaluation done"
    );
    let (all, trainable) = merged.params.unwrap_or_else(|| {
        let all = weights.numel();
        (all, if merged.trainable { all } else { 0 })
    });
    let result = EvalResult { tasks, all_params: all, trainable_params: trainable };
    let report = result.report();
    if let Some(path) = &plan.report_save_path {
        save_report(&report, path)?;
        let cluster = json!({
            "items": summary.results.len(),
            "per_worker": summary.per_worker,
            "workers_lost": summary.workers_lost,
            "computed_twice": summary.computed_twice,
        });
        save_provenance(plan, hub, &devices, path, cluster)?;
    }
    Ok(report)
}

/// One evaluator per device of `plan` ([`crate::device::select_all`]), sharing the tasks' data,
/// decoded-image caches and dataset shards; CPU workers share the intra-op threads.
pub fn evaluators(
    plan: &EvalPlan,
    hub: &Hub,
    pool: &ModelPool,
    merged: &Merged,
) -> Result<Vec<Evaluator>> {
    let devices = crate::device::select_all(plan.accelerator, &plan.devices)?;
    let first = evaluator(plan, hub, pool, merged, devices[0])?;
    let mut out = Vec::with_capacity(devices.len());
    for &d in &devices[1..] {
        out.push(first.replicate(load_vision(pool, merged, d)?, d)?);
    }
    out.insert(0, first);
    let cpu_workers = devices.iter().filter(|d| **d == Device::Cpu).count();
    if cpu_workers > 1 {
        let threads = tch::get_num_threads().max(1) as usize;
        let shares = crate::device::cpu_thread_shares(threads, cpu_workers);
        tracing::info!(
            workers = cpu_workers,
            threads,
            ?shares,
            "CPU workers share the intra-op threads"
        );
        for (e, n) in out.iter_mut().filter(|e| e.device() == Device::Cpu).zip(shares) {
            e.set_threads(n);
        }
    }
    Ok(out)
}

fn load_vision(pool: &ModelPool, merged: &Merged, device: Device) -> Result<ClipVision> {
    Ok(ClipVision::load_with(
        &Scope::new(&merged.weights, device, Kind::Float).pp("vision_model"),
        pool.config(),
        &merged.options,
    )?)
}

/// The evaluator of `plan` for the merged model (vision tower in the pool's architecture).
pub fn evaluator(
    plan: &EvalPlan,
    hub: &Hub,
    pool: &ModelPool,
    merged: &Merged,
    device: Device,
) -> Result<Evaluator> {
    Evaluator::new(plan, hub, load_vision(pool, merged, device)?, device)
}

/// One part of an evaluation, computed apart from the others (a sweep shares a cell's
/// evaluation out this way when workers would otherwise sit idle): the results of its items and
/// what the report needs besides them. Every part of a cell derives the same item list, so the
/// parts fold into exactly the report of a whole run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartResult {
    /// Which part, of how many.
    pub part: usize,
    /// Parts in all.
    pub parts: usize,
    /// Items of the whole evaluation.
    pub total_items: usize,
    /// `(item index, item, its batches' results)` for this part's items.
    pub items: Vec<(usize, work::EvalItem, Vec<BatchResult>)>,
    /// Task names in plan order.
    pub names: Vec<String>,
    /// Parameters of the evaluated vision model.
    pub all_params: i64,
    /// Trainable parameters.
    pub trainable_params: i64,
    /// The device that computed this part.
    pub device: String,
}

/// Item range of part `part` of `parts` (contiguous, sizes differing by at most one).
pub fn part_range(total: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    (part * total / parts)..((part + 1) * total / parts)
}

/// One evaluation, ready to run any of its parts in this process (the evaluator is built once,
/// however many parts of it this process is given).
pub struct PartEvaluator {
    evaluator: Evaluator,
    all_params: i64,
    trainable_params: i64,
    device: Device,
}

impl PartEvaluator {
    /// The evaluator of `plan` for merged weights.
    pub fn new(plan: &EvalPlan, hub: &Hub, pool: &ModelPool, merged: &Merged) -> Result<Self> {
        let device = *crate::device::select_all(plan.accelerator, &plan.devices)?
            .first()
            .context("no device")?;
        let evaluator = evaluator(plan, hub, pool, merged, device)?;
        let (all_params, trainable_params) = merged.params.unwrap_or_else(|| {
            let all = merged.weights.numel();
            (all, if merged.trainable { all } else { 0 })
        });
        Ok(Self { evaluator, all_params, trainable_params, device })
    }

    /// Evaluates part `part` of `parts` of the items.
    pub fn run(&mut self, part: usize, parts: usize) -> Result<PartResult> {
        let all = self.evaluator.items();
        let range = part_range(all.len(), part, parts);
        let mut items = Vec::with_capacity(range.len());
        for i in range {
            items.push((i, all[i], self.evaluator.run(&all[i])?));
        }
        work::finish_caches(&self.evaluator.cache_writers())?;
        Ok(PartResult {
            part,
            parts,
            total_items: all.len(),
            items,
            names: self.evaluator.task_names(),
            all_params: self.all_params,
            trainable_params: self.trainable_params,
            device: format!("{:?}", self.device),
        })
    }
}

/// Folds every part of an evaluation into its report, exactly as [`run`] folds its items, and
/// writes the report and its provenance where `plan` says. Fails unless the parts cover every
/// item once and agree on the tasks and the model.
pub fn report_from_parts(plan: &EvalPlan, hub: &Hub, mut parts: Vec<PartResult>) -> Result<Value> {
    parts.sort_by_key(|p| p.part);
    let first = parts.first().context("no part of the evaluation")?;
    let (names, total) = (first.names.clone(), first.total_items);
    let (all_params, trainable_params) = (first.all_params, first.trainable_params);
    let mut items = Vec::with_capacity(total);
    let mut results = Vec::with_capacity(total);
    for p in &parts {
        if p.names != names || p.total_items != total || p.all_params != all_params {
            anyhow::bail!(
                "part {} of {} disagrees with part 0 on the tasks or the model; were they computed from the same config?",
                p.part, p.parts
            );
        }
        for (i, item, batches) in &p.items {
            if *i != items.len() {
                anyhow::bail!(
                    "parts of the evaluation do not cover item {} exactly once",
                    items.len()
                );
            }
            items.push(*item);
            results.push(batches.clone());
        }
    }
    if items.len() != total {
        anyhow::bail!("the parts cover {} of {total} items", items.len());
    }
    let tasks = work::fold_metrics(&names, &items, &results);
    let report = EvalResult { tasks, all_params, trainable_params }.report();
    if let Some(path) = &plan.report_save_path {
        save_report(&report, path)?;
        let cluster = json!({
            "items": total,
            "parts": parts.iter().map(|p| json!({"part": p.part, "items": p.items.len(), "device": p.device})).collect::<Vec<_>>(),
        });
        save_provenance(plan, hub, std::slice::from_ref(&first.device), path, cluster)?;
    }
    Ok(report)
}

/// A worker of a distributed evaluation (`--join`): evaluates the items the coordinator at
/// `coordinator` hands out until it says the run is done.
pub fn run_worker(
    plan: &EvalPlan,
    hub: &Hub,
    pool: &ModelPool,
    merged: &Merged,
    coordinator: std::net::SocketAddr,
    name: &str,
    options: &ClusterOptions,
) -> Result<()> {
    let evaluators = evaluators(plan, hub, pool, merged)?;
    if evaluators.len() == 1 {
        let e = evaluators.into_iter().next().context("one evaluator")?;
        let summary = fusion_cluster::runtime::run_worker(coordinator, name, Box::new(e), options)
            .with_context(|| format!("worker `{name}` of the coordinator at {coordinator}"))?;
        tracing::info!(items = summary.executed, "worker done");
        return Ok(());
    }
    // One worker per device, each its own member of the cluster (`<name>.<i>`).
    let n = evaluators.len();
    let handles: Vec<_> = evaluators
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (name, options) = (format!("{name}.{i}"), options.clone());
            std::thread::spawn(move || {
                fusion_cluster::runtime::run_worker(coordinator, &name, Box::new(e), &options)
                    .with_context(|| format!("worker `{name}` of the coordinator at {coordinator}"))
            })
        })
        .collect();
    let mut executed = 0;
    for h in handles {
        executed += h.join().map_err(|_| anyhow::anyhow!("a device's worker panicked"))??.executed;
    }
    tracing::info!(items = executed, devices = n, "worker done");
    Ok(())
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

/// Writes `<report>.meta.json`: what produced the report (seed, versions, threads, devices, the
/// identity and revision of every model and dataset), kept apart so the report itself stays
/// byte-compatible with FusionBench's.
fn save_provenance(
    plan: &EvalPlan,
    hub: &Hub,
    devices: &[String],
    report: &Path,
    cluster: Value,
) -> Result<()> {
    let hashes = crate::hub::identity::HashCache::new(
        plan.cache_dir.as_ref().map(|d| d.join("content_hashes")),
    );
    let identity = |id: &str, model: bool| -> Value {
        let found =
            if model { hub.model_identity(id, &hashes) } else { hub.dataset_identity(id, &hashes) };
        match found {
            Ok(i) => {
                json!({"id": i.id, "origin": i.origin, "revision": i.revision, "sha256": i.digest, "files": i.files})
            }
            Err(e) => json!({"id": id, "error": e.to_string()}),
        }
    };
    let models: Map<String, Value> =
        plan.models.iter().map(|(name, id)| (name.clone(), identity(id, true))).collect();
    let datasets: Map<String, Value> = plan
        .tasks
        .iter()
        .map(|(name, d)| {
            let mut v = identity(&d.id, false);
            v["split"] = json!(d.split);
            (name.clone(), v)
        })
        .collect();
    let meta = json!({
        "fusion_bench": env!("CARGO_PKG_VERSION"),
        "numerics_version": crate::version::NUMERICS_VERSION,
        "libtorch": "2.11.0 (PyPI torch wheel), tch 0.24.0",
        "model": plan.model,
        "models": models,
        "base_model": identity(&plan.base_model, true),
        "datasets": datasets,
        "seed": plan.seed,
        "devices": devices,
        "torch_threads": tch::get_num_threads(),
        "decode_threads": rayon::current_num_threads(),
        "batch_size": plan.batch_size,
        "fast_dev_run": plan.fast_dev_run,
        "deterministic": "evaluation is deterministic on CPU: fixed batch order, no sampling; results are reduced in batch order whichever worker computed them",
        "cluster": cluster,
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
