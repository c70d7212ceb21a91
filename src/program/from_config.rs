//! One composed configuration, run: the method on the model pool, then the evaluation with the
//! task pool, in this process or as a cluster's coordinator or worker ([`Launch`]).

use super::{DatasetRef, Distribution, EvalPlan};
use crate::config::{ProgramConfig, TaskPoolKind};
use crate::data::cache::CropCache;
use crate::hub::Hub;
use crate::launch::Launch;
use crate::methods::{self, ModelPool};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// The evaluation `cfg` asks for; `None` when its task pool evaluates nothing (`dummy`, none).
pub fn eval_plan(cfg: &ProgramConfig) -> Result<Option<EvalPlan>> {
    let model = format!(
        "method={} on {}",
        cfg.method.option.as_deref().unwrap_or("?"),
        cfg.modelpool
            .models
            .iter()
            .map(|(n, m)| format!("{n}={}", m.path))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let Some(tp) = &cfg.taskpool else { return Ok(None) };
    match tp.kind {
        // FusionBench's v0.1 `type: clip_vit_classification` pool (the robustness configs)
        // evaluates as the CLIP vision task pool does: the same heads, metrics and report, its
        // tasks under the names it lists (`stanford_cars`, ...), each from `dataset.name`'s
        // `dataset.split`.
        TaskPoolKind::ClipVision | TaskPoolKind::LegacyClipVit => {}
        TaskPoolKind::Dummy => return Ok(None),
        _ => bail!("this task pool type is not available in this build (available: CLIPVisionModelTaskPool, clip_vit_classification, dummy)"),
    }
    let base_model = tp
        .clip_model
        .as_ref()
        .map(|m| m.path.clone())
        .or_else(|| tp.base_model.clone())
        .context("taskpool.base_model is not set")?;
    let processor =
        tp.processor.as_ref().map(|p| p.path.clone()).unwrap_or_else(|| base_model.clone());
    let tasks = tp
        .test_datasets
        .iter()
        .map(|(name, d)| {
            (
                name.clone(),
                DatasetRef { id: d.path.clone(), config: d.name.clone(), split: d.split.clone() },
            )
        })
        .collect();
    Ok(Some(EvalPlan {
        model,
        models: cfg.modelpool.models.iter().map(|(n, m)| (n.clone(), m.path.clone())).collect(),
        base_model,
        processor,
        tasks,
        batch_size: tp.batch_size,
        fast_dev_run: tp.fast_dev_run.unwrap_or(cfg.fast_dev_run),
        accelerator: cfg.fabric.accelerator.parse()?,
        devices: crate::device::Devices::from_node(&cfg.fabric.devices)?,
        report_save_path: cfg.report_path().map(PathBuf::from),
        merged_model_save_path: cfg.merged_model_path().map(PathBuf::from),
        seed: cfg.seed,
        cache_dir: cfg.path.cache_dir.as_ref().map(PathBuf::from),
        crop_cache: crop_cache(cfg)?,
    }))
}

/// The decoded-image cache under `path.cache_dir/images`, capped at
/// `FUSION_BENCH_IMAGE_CACHE_GB` GiB (default 4; 0 disables it).
pub fn crop_cache(cfg: &ProgramConfig) -> Result<Option<CropCache>> {
    let gb: f64 = match std::env::var("FUSION_BENCH_IMAGE_CACHE_GB") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("FUSION_BENCH_IMAGE_CACHE_GB=`{v}` is not a number"))?,
        Err(_) => 4.0,
    };
    Ok(match (&cfg.path.cache_dir, gb > 0.0) {
        (Some(dir), true) => Some(CropCache::new(
            PathBuf::from(dir).join("images"),
            (gb * (1u64 << 30) as f64) as u64,
        )),
        _ => None,
    })
}

/// `--prefetch`: downloads what `cfg` reads into the hub cache.
#[cfg(feature = "download")]
pub fn prefetch(cfg: &ProgramConfig) -> Result<()> {
    use crate::hub::{cache_dir, download};
    let (models, datasets) = download::config_repos(cfg);
    download::prefetch(&models, &datasets, &cache_dir(), None)
}

/// `--prefetch` in a build without network access.
#[cfg(not(feature = "download"))]
pub fn prefetch(_: &ProgramConfig) -> Result<()> {
    bail!("`--prefetch` needs network access, and this binary was built without the `download` feature (rebuild with default features)")
}

/// How long a worker waits after a training before it joins the evaluation: more than the
/// training coordinator's endpoint lingers once it released its workers (0.5 s).
const REJOIN_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// How long a worker keeps trying to join the evaluation after a training, at least.
const REJOIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(900);

/// Runs one composed configuration: the method, then the evaluation (here, or as a worker or
/// coordinator of a cluster). Returns the report when this process wrote one.
pub fn run_config(cfg: &ProgramConfig, launch: &Launch) -> Result<Option<serde_json::Value>> {
    let hub = Hub::default();
    let ctx = methods::Context {
        log_dir: cfg.path.log_dir.clone(),
        seed: cfg.seed,
        fast_dev_run: cfg.fast_dev_run,
    };
    let method = methods::build(&cfg.method, &ctx)?;
    let mut pool = ModelPool::from_config(&cfg.modelpool, &hub)?;
    let Some(plan) = eval_plan(cfg)? else {
        // Nothing to evaluate: the merged model goes straight to disk, tensor by tensor.
        let save_to = cfg.merged_model_path().map(PathBuf::from);
        if let Some(dir) = &save_to {
            pool.stream_merged_to(&dir.join("model.safetensors"));
        }
        let t0 = std::time::Instant::now();
        method.run(&methods::RunContext { pool: &pool, hub: &hub, program: cfg, launch })?;
        tracing::info!(seconds = t0.elapsed().as_secs_f64(), "method done");
        match &save_to {
            Some(dir) => {
                super::save_vision_config(dir, &pool.config_source())?;
                tracing::info!(path = %dir.display(), "model saved");
            }
            None => tracing::info!("no task pool to evaluate with: nothing to report"),
        }
        return Ok(None);
    };
    let t0 = std::time::Instant::now();
    let merged =
        method.run(&methods::RunContext { pool: &pool, hub: &hub, program: cfg, launch })?;
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), "method done");
    if merged.workers_done && launch.join.is_some() {
        tracing::info!("the coordinator evaluates the trained model: this worker is done");
        return Ok(None);
    }
    tracing::info!(cache = %hub.cache().display(), model = %plan.model, base = %plan.base_model, "evaluating");
    if let Some(addr) = launch.join {
        let name = launch.worker_name();
        let mut options = launch.options_for(cfg);
        if merged.rejoin.is_some() {
            // After a training the coordinator saves its results and builds its evaluation
            // before it listens again (minutes for a large checkpoint); its training endpoint
            // lingers a moment after releasing the workers: wait that out, then be patient.
            std::thread::sleep(REJOIN_GRACE);
            options.wait_for_workers = options.wait_for_workers.max(REJOIN_PATIENCE);
            tracing::info!(coordinator = %addr, "joining the evaluation of the trained model");
        }
        super::run_worker(&plan, &hub, &pool, &merged, addr, &name, &options)?;
        return Ok(None);
    }
    let distribution = match launch.serve_addr().filter(|_| !merged.workers_done) {
        Some(listen) => {
            let mut options = launch.options_for(cfg);
            if let Some(n) = merged.rejoin {
                // The training's workers come back to evaluate: wait for them (not for the
                // ones lost during the training).
                options.min_workers = n;
            }
            Distribution::Serve { listen, options: Box::new(options) }
        }
        None => Distribution::Local,
    };
    let report = super::run(&plan, &hub, &pool, &merged, distribution)?;
    println!("{}", crate::report::to_python_json(&report));
    seen_and_unseen(cfg, &report, plan.report_save_path.as_deref())?;
    Ok(Some(report))
}

/// The generalization experiments' seen and unseen averages, when the report has tasks the model
/// pool has no model for: a table on stderr and `<report>.seen_unseen.csv` beside the report.
fn seen_and_unseen(
    cfg: &ProgramConfig,
    report: &serde_json::Value,
    report_path: Option<&std::path::Path>,
) -> Result<()> {
    use crate::report::seen_unseen::{csv_path, SeenUnseen};
    let models: Vec<String> = cfg.modelpool.models.iter().map(|(n, _)| n.clone()).collect();
    let Some(split) = SeenUnseen::of(report, &models) else { return Ok(()) };
    let method = cfg
        .method
        .name
        .clone()
        .or_else(|| cfg.method.option.clone())
        .unwrap_or_else(|| "method".into());
    eprint!("{}", split.table(&method));
    if let Some(path) = report_path {
        let csv = csv_path(path);
        crate::report::write_atomic(&csv, split.csv(&method).as_bytes())?;
        tracing::info!(path = %csv.display(), seen = split.seen_average(), unseen = split.unseen_average(), "seen and unseen averages saved");
    }
    Ok(())
}
