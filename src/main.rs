//! `fusion_bench`: FusionBench's command line, on libtorch.
//!
//! The arguments are FusionBench's (Hydra's) overrides, composed over the YAML tree in `config/`
//! exactly as FusionBench composes its own (`fusion_bench --cfg job …` prints the result). The
//! program then runs the method on the model pool and evaluates the result with the task pool.
//! Methods available in this build: `dummy`, `simple_average`, `task_arithmetic`,
//! `ties_merging`, `task_vector_cos_similarity`.
//!
//! `fusion_bench --prefetch <overrides>` composes the same config and downloads every model and
//! dataset it names into the hub cache instead of running (feature `download`).
//!
//! Distributed evaluation: every process runs the same command line (so each merges the same
//! model from its own files). One adds `--serve HOST:PORT` and becomes the coordinator (it also
//! evaluates, and writes the report); the others add `--join HOST:PORT` and become workers.
//! `--min-workers N` makes the coordinator wait (up to a minute, or `--wait SECONDS`) for N
//! workers before starting; a worker waits as long for its coordinator;
//! `--job-dir DIR` is the folder, shared by the job's processes, that holds the job's CA
//! (default `<path.output_dir>/.cluster/<job id>`); `--node-name` names a worker in logs. The
//! job id is a hash of the method, model pool and task pool configs: a worker started with
//! another config is refused. `--hosts h1:PORT,h2,h3 --rank R` sets the roles for a launch by
//! hand on a few hosts (rank 0 serves on h1). Under `srun` with several tasks the roles come
//! from Slurm: rank 0
//! serves on the first node of the job at port `20000 + SLURM_JOB_ID % 40000`, and the other
//! ranks join it.

use anyhow::{bail, Context, Result};
use fusion_bench::config::{compose_from_args, default_config_dirs, ProgramConfig, TaskPoolKind};
use fusion_bench::data::cache::CropCache;
use fusion_bench::hub::Hub;
use fusion_bench::methods::{self, ModelPool};
use fusion_bench::program::{self, DatasetRef, EvalPlan};
use fusion_bench::sweep;
use std::path::PathBuf;

fn plan(cfg: &ProgramConfig) -> Result<Option<EvalPlan>> {
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
        TaskPoolKind::ClipVision => {}
        TaskPoolKind::Dummy => return Ok(None),
        _ => bail!("this task pool type is not available in this build (available: CLIPVisionModelTaskPool, dummy)"),
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
        base_model,
        processor,
        tasks,
        batch_size: tp.batch_size,
        fast_dev_run: tp.fast_dev_run.unwrap_or(cfg.fast_dev_run),
        accelerator: cfg.fabric.accelerator.parse()?,
        report_save_path: cfg.report_path().map(PathBuf::from),
        merged_model_save_path: cfg.merged_model_path().map(PathBuf::from),
        seed: cfg.seed,
        cache_dir: cfg.path.cache_dir.as_ref().map(PathBuf::from),
        crop_cache: crop_cache(cfg)?,
    }))
}

/// The decoded-image cache under `path.cache_dir/images`, capped at
/// `FUSION_BENCH_IMAGE_CACHE_GB` GiB (default 4; 0 disables it).
fn crop_cache(cfg: &ProgramConfig) -> Result<Option<CropCache>> {
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

/// `--prefetch`: download what `cfg` reads into the hub cache.
#[cfg(feature = "download")]
fn prefetch(cfg: &ProgramConfig) -> Result<()> {
    use fusion_bench::hub::{cache_dir, download};
    let (models, datasets) = download::config_repos(cfg);
    download::prefetch(&models, &datasets, &cache_dir(), None)
}

#[cfg(not(feature = "download"))]
fn prefetch(_: &ProgramConfig) -> Result<()> {
    bail!("`--prefetch` needs network access, and this binary was built without the `download` feature (rebuild with default features)")
}

impl ClusterArgs {
    /// This process alone.
    fn local() -> Self {
        Self::default()
    }
}

/// Removes `--flag VALUE` or `--flag=VALUE` from `args` and returns the value.
fn take_flag(args: &mut Vec<String>, flag: &str) -> Result<Option<String>> {
    let prefix = format!("{flag}=");
    if let Some(i) = args.iter().position(|a| a == flag) {
        if i + 1 >= args.len() {
            bail!("{flag} needs a value");
        }
        let v = args.remove(i + 1);
        args.remove(i);
        return Ok(Some(v));
    }
    if let Some(i) = args.iter().position(|a| a.starts_with(&prefix)) {
        let v = args.remove(i)[prefix.len()..].to_string();
        return Ok(Some(v));
    }
    Ok(None)
}

/// `--serve`, `--join` and their options.
#[derive(Default)]
struct ClusterArgs {
    serve: Option<std::net::SocketAddr>,
    join: Option<std::net::SocketAddr>,
    min_workers: usize,
    job_dir: Option<PathBuf>,
    node_name: Option<String>,
    /// `--wait SECONDS`: how long a coordinator waits for `--min-workers`, and a worker for its
    /// coordinator.
    wait: Option<std::time::Duration>,
}

fn socket_addr(flag: &str, v: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = v
        .to_socket_addrs()
        .with_context(|| format!("{flag} {v}: not a HOST:PORT address"))?
        .collect();
    // IPv4 first: a coordinator serves on 0.0.0.0.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("{flag} {v}: the host name resolves to no address"))
}

fn cluster_args(args: &mut Vec<String>) -> Result<ClusterArgs> {
    let serve = take_flag(args, "--serve")?.map(|v| socket_addr("--serve", &v)).transpose()?;
    let join = take_flag(args, "--join")?.map(|v| socket_addr("--join", &v)).transpose()?;
    if serve.is_some() && join.is_some() {
        bail!("--serve (coordinator) and --join (worker) exclude each other");
    }
    let min_workers = match take_flag(args, "--min-workers")? {
        Some(v) => v.parse().with_context(|| format!("--min-workers {v}: not a number"))?,
        None => 0,
    };
    let job_dir = take_flag(args, "--job-dir")?.map(PathBuf::from);
    let node_name = take_flag(args, "--node-name")?;
    let wait = match take_flag(args, "--wait")? {
        Some(v) => Some(std::time::Duration::from_secs_f64(
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .with_context(|| format!("--wait {v}: not a number of seconds"))?,
        )),
        None => None,
    };
    let hosts = take_flag(args, "--hosts")?;
    let rank = take_flag(args, "--rank")?;
    let mut c = ClusterArgs { serve, join, min_workers, job_dir, node_name, wait };
    match (hosts, rank) {
        (Some(hosts), Some(rank)) => {
            if c.serve.is_some() || c.join.is_some() {
                bail!("--hosts/--rank choose the role: leave out --serve and --join");
            }
            host_roles(&mut c, &hosts, &rank)?;
        }
        (None, None) => {
            if c.serve.is_none() && c.join.is_none() {
                slurm_roles(&mut c)?;
            }
        }
        _ => bail!("--hosts and --rank go together (--hosts h1:7000,h2,h3 --rank 0 on h1, --rank 1 on h2, ...)"),
    }
    Ok(c)
}

/// `--hosts h1:PORT,h2,h3 --rank R` (a launch by hand on a few hosts): rank 0 serves on the
/// first host's port and waits for the others, which join it.
fn host_roles(c: &mut ClusterArgs, hosts: &str, rank: &str) -> Result<()> {
    let list: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if list.iter().any(|h| h.is_empty()) {
        bail!("--hosts {hosts}: an empty host in the list");
    }
    let rank: usize = rank.parse().with_context(|| format!("--rank {rank}: not a number"))?;
    if rank >= list.len() {
        bail!("--rank {rank}: the list --hosts {hosts} has {} hosts", list.len());
    }
    let first = list[0];
    let (host, port) = first
        .rsplit_once(':')
        .with_context(|| format!("--hosts {hosts}: the first host needs a port (host:PORT)"))?;
    let port: u16 =
        port.parse().with_context(|| format!("--hosts {hosts}: `{port}` is not a port"))?;
    if rank == 0 {
        c.serve = Some(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
        if c.min_workers == 0 {
            c.min_workers = list.len() - 1;
        }
    } else {
        c.join = Some(socket_addr("--hosts", &format!("{host}:{port}"))?);
    }
    if c.node_name.is_none() {
        c.node_name = Some(format!("rank-{rank}"));
    }
    Ok(())
}

/// Under `srun` with several tasks: rank 0 serves on the first node at a port derived from the
/// job id and waits for the other ranks, which join it.
fn slurm_roles(c: &mut ClusterArgs) -> Result<()> {
    let Some(task) = fusion_cluster::slurm::SlurmTask::from_env()? else { return Ok(()) };
    if task.world_size < 2 {
        return Ok(());
    }
    let port = task.coordinator_port();
    if task.is_coordinator() {
        c.serve = Some(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
        if c.min_workers == 0 {
            c.min_workers = task.world_size - 1;
        }
    } else {
        let host = format!("{}:{port}", task.coordinator_host());
        c.join = Some(socket_addr("the Slurm coordinator", &host)?);
    }
    if c.node_name.is_none() {
        c.node_name = Some(format!("rank-{}", task.rank));
    }
    tracing::info!(
        rank = task.rank,
        of = task.world_size,
        job = task.job_id,
        coordinator = %format!("{}:{port}", task.coordinator_host()),
        "Slurm task"
    );
    Ok(())
}

/// A stable hash of what a cluster's processes must agree on.
fn job_id(cfg: &ProgramConfig) -> String {
    let key = format!("{:?}", (&cfg.method, &cfg.modelpool, &cfg.taskpool, cfg.fast_dev_run));
    fusion_bench::report::stable_hash(key.as_bytes())
}

fn cluster_options(cfg: &ProgramConfig, c: &ClusterArgs) -> program::ClusterOptions {
    let id = job_id(cfg);
    let dir = c.job_dir.clone().unwrap_or_else(|| {
        PathBuf::from(cfg.path.output_dir.as_deref().unwrap_or("outputs"))
            .join(".cluster")
            .join(&id)
    });
    let mut o = program::ClusterOptions::new(id, dir);
    if std::env::var_os("FUSION_BENCH_FAST_TIMEOUTS").is_some() {
        o = o.fast(); // tests: idle 1 s, keep-alive 0.3 s
    }
    o.min_workers = c.min_workers;
    if let Some(w) = c.wait {
        o.wait_for_workers = w;
    }
    o
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let len = args.len();
    args.retain(|a| a != "--prefetch");
    let want_prefetch = args.len() != len;
    let multirun = take_multirun(&mut args);
    let cluster = cluster_args(&mut args)?;
    if multirun {
        if want_prefetch {
            bail!("--prefetch with -m: prefetch one setting of the sweep (without -m)");
        }
        return run_sweep(args, &cluster);
    }
    let composed = compose_from_args(&args, &default_config_dirs())?;
    if composed.cfg().is_some() {
        print!("{}", composed.to_yaml()?);
        return Ok(());
    }
    let cfg = composed.program_config()?;
    if want_prefetch {
        return prefetch(&cfg);
    }
    if cfg.print_config || cfg.dry_run {
        eprint!("{}", composed.to_yaml()?);
    }
    if cfg.dry_run {
        return Ok(());
    }
    run_config(&cfg, &cluster).map(|_| ())
}

/// Removes `-m`/`--multirun` from `args`; whether it was there.
fn take_multirun(args: &mut Vec<String>) -> bool {
    let len = args.len();
    args.retain(|a| a != "-m" && a != "--multirun");
    args.len() != len
}

/// Runs one composed configuration: the method, then the evaluation (here, or as a worker or
/// coordinator of a cluster). Returns the report when this process wrote one.
fn run_config(cfg: &ProgramConfig, cluster: &ClusterArgs) -> Result<Option<serde_json::Value>> {
    let hub = Hub::default();
    let ctx = methods::Context { log_dir: cfg.path.log_dir.clone(), seed: cfg.seed };
    let method = methods::build(&cfg.method, &ctx)?;
    let mut pool = ModelPool::from_config(&cfg.modelpool, &hub)?;
    let Some(plan) = plan(cfg)? else {
        // Nothing to evaluate: the merged model goes straight to disk, tensor by tensor.
        let save_to = cfg.merged_model_path().map(PathBuf::from);
        if let Some(dir) = &save_to {
            pool.stream_merged_to(&dir.join("model.safetensors"));
        }
        let t0 = std::time::Instant::now();
        method.run(&pool)?;
        tracing::info!(seconds = t0.elapsed().as_secs_f64(), "method done");
        match &save_to {
            Some(dir) => {
                program::save_vision_config(dir, &pool.config_source())?;
                tracing::info!(path = %dir.display(), "model saved");
            }
            None => tracing::info!("no task pool to evaluate with: nothing to report"),
        }
        return Ok(None);
    };
    let t0 = std::time::Instant::now();
    let merged = method.run(&pool)?;
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), "method done");
    tracing::info!(cache = %hub.cache().display(), model = %plan.model, base = %plan.base_model, "evaluating");
    if let Some(addr) = cluster.join {
        let name =
            cluster.node_name.clone().unwrap_or_else(|| format!("worker-{}", std::process::id()));
        program::run_worker(
            &plan,
            &hub,
            &pool,
            &merged,
            addr,
            &name,
            &cluster_options(cfg, cluster),
        )?;
        return Ok(None);
    }
    let distribution = match cluster.serve {
        Some(listen) => program::Distribution::Serve {
            listen,
            options: Box::new(cluster_options(cfg, cluster)),
        },
        None => program::Distribution::Local,
    };
    let report = program::run(&plan, &hub, &pool, &merged, distribution)?;
    println!("{}", fusion_bench::report::to_python_json(&report));
    Ok(Some(report))
}

/// How one cell of a sweep ended in this process.
#[derive(serde::Serialize, serde::Deserialize)]
enum CellOutcome {
    /// It already had a result.
    Skipped,
    /// Computed; its report is in the store.
    Done,
    /// Failed with this error (recorded in the store; the next run retries it).
    Failed(String),
}

/// Runs `cell` in this process (evaluation local), unless the store has its result; writes its
/// report (or its error) into the store.
fn run_cell(cell: &sweep::Cell, store: &sweep::SweepStore, hub: &Hub) -> Result<CellOutcome> {
    let composed = compose_from_args(&cell.args, &default_config_dirs())?;
    let mut cfg = composed.program_config()?;
    let key = sweep::cell_key(&composed, &cfg, hub)?;
    if store.result(&key).is_some() {
        tracing::info!(cell = cell.index, settings = %cell.label(), "cell skipped: it has a result");
        return Ok(CellOutcome::Skipped);
    }
    cfg.report_save_path = Some(store.report_path(&key).display().to_string());
    let t0 = std::time::Instant::now();
    Ok(match run_config(&cfg, &ClusterArgs::local()) {
        Ok(_) => {
            tracing::info!(cell = cell.index, settings = %cell.label(), seconds = t0.elapsed().as_secs_f64(), "cell done");
            CellOutcome::Done
        }
        Err(e) => {
            tracing::error!(cell = cell.index, settings = %cell.label(), "cell failed: {e:#}");
            store.record_error(&key, &format!("{e:#}"))?;
            CellOutcome::Failed(format!("{e:#}"))
        }
    })
}

/// A work item of a distributed sweep.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum SweepItem {
    /// A whole cell: merge, evaluate, write its report into the store.
    Cell(usize),
    /// Part `part` of `parts` of a cell's evaluation (the worker merges the cell's model itself);
    /// the coordinator folds the parts and writes the report.
    Part { cell: usize, part: usize, parts: usize },
}

/// What a [`SweepItem`] gave back.
#[derive(serde::Serialize, serde::Deserialize)]
enum SweepOutcome {
    Cell(CellOutcome),
    Part(std::result::Result<program::PartResult, String>),
}

/// The cell whose parts this process evaluates, merged and ready to evaluate.
struct MergedCell {
    cell: usize,
    evaluator: program::PartEvaluator,
}

/// Runs a distributed sweep's items: whole cells, and parts of the cells that are shared out
/// when workers would otherwise sit idle.
struct CellExecutor {
    cells: Vec<sweep::Cell>,
    store: sweep::SweepStore,
    hub: Hub,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    merged: Option<MergedCell>,
}

impl CellExecutor {
    fn run_part(&mut self, index: usize, part: usize, parts: usize) -> Result<program::PartResult> {
        let cell = self.cells.get(index).with_context(|| format!("no cell #{index}"))?;
        if self.merged.as_ref().map(|m| m.cell) != Some(index) {
            self.merged = None;
            let cfg = compose_from_args(&cell.args, &default_config_dirs())?.program_config()?;
            let ctx = methods::Context { log_dir: cfg.path.log_dir.clone(), seed: cfg.seed };
            let method = methods::build(&cfg.method, &ctx)?;
            let pool = ModelPool::from_config(&cfg.modelpool, &self.hub)?;
            let plan = plan(&cfg)?.context("a cell without a task pool is never shared out")?;
            let t0 = std::time::Instant::now();
            let merged = method.run(&pool)?;
            tracing::info!(cell = index, seconds = t0.elapsed().as_secs_f64(), "method done");
            let evaluator = program::PartEvaluator::new(&plan, &self.hub, &pool, &merged)?;
            self.merged = Some(MergedCell { cell: index, evaluator });
        }
        let m = self.merged.as_mut().expect("just merged");
        let t0 = std::time::Instant::now();
        let result = m.evaluator.run(part, parts)?;
        tracing::info!(cell = index, settings = %cell.label(), part, of = parts, items = result.items.len(), seconds = t0.elapsed().as_secs_f64(), "cell part done");
        Ok(result)
    }
}

impl fusion_cluster::runtime::Executor for CellExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("stopped by a signal: the cell is left for the next run".into());
        }
        let item: SweepItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let outcome = match item {
            SweepItem::Cell(index) => {
                let cell = self.cells.get(index).ok_or_else(|| format!("no cell #{index}"))?;
                let outcome =
                    run_cell(cell, &self.store, &self.hub).map_err(|e| format!("{e:#}"))?;
                SweepOutcome::Cell(outcome)
            }
            SweepItem::Part { cell, part, parts } => {
                let result = self.run_part(cell, part, parts).map_err(|e| {
                    tracing::error!(cell, part, "cell part failed: {e:#}");
                    format!("{e:#}")
                });
                SweepOutcome::Part(result)
            }
        };
        fusion_cluster::codec::encode(&outcome).map_err(|e| e.to_string())
    }
}

/// A cell whose evaluation is shared out in parts.
struct SharedCell {
    /// Its index in the sweep.
    cell: usize,
    /// Its evaluation plan, reporting into the sweep store.
    plan: EvalPlan,
    /// How many parts.
    parts: usize,
}

/// The plan of a distributed sweep: which cells go out whole, and which are shared out in parts
/// because whole cells would leave workers idle. Of the `todo` cells (those without a result),
/// the last `todo mod workers` (all of them when fewer than the workers) are shared, each in
/// `⌈workers / shared⌉` parts, unless a cell saves its merged model or evaluates nothing.
/// Returns the items in order (whole cells first, so every worker starts on one) and the shared
/// cells.
fn plan_sweep(
    cells: &[sweep::Cell],
    store: &sweep::SweepStore,
    hub: &Hub,
    workers: usize,
) -> Result<(Vec<SweepItem>, Vec<SharedCell>)> {
    let mut todo = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        let composed = compose_from_args(&cell.args, &default_config_dirs())?;
        let mut cfg = composed.program_config()?;
        let key = sweep::cell_key(&composed, &cfg, hub)?;
        if store.result(&key).is_some() {
            continue;
        }
        cfg.report_save_path = Some(store.report_path(&key).display().to_string());
        let shareable = cfg.merged_model_path().is_none();
        todo.push((i, shareable.then(|| plan(&cfg)).transpose()?.flatten()));
    }
    let (first_shared, parts) = share_out(todo.len(), workers);
    let mut items = Vec::new();
    let mut shared = Vec::new();
    for (n, (i, plan)) in todo.into_iter().enumerate() {
        match plan {
            Some(plan) if parts > 1 && n >= first_shared => {
                shared.push(SharedCell { cell: i, plan, parts })
            }
            _ => items.push(SweepItem::Cell(i)),
        }
    }
    for s in &shared {
        let (cell, parts) = (s.cell, s.parts);
        items.extend((0..parts).map(|part| SweepItem::Part { cell, part, parts }));
    }
    Ok((items, shared))
}

/// `-m`: every cell of the sweep, skipping those with a result in the sweep store; SIGTERM or
/// SIGUSR2 (Slurm preemption) ends the sweep after the cells that are running, with status 143.
/// In a cluster (`--serve`/`--join`, `--hosts`, or Slurm) the coordinator hands out whole
/// cells: each process merges and evaluates its cells itself and writes their reports into the
/// sweep folder, which must be on a filesystem they share. The last cells, which would leave
/// workers idle, are shared out in parts ([`plan_sweep`]) and their reports written here.
fn run_sweep(args: Vec<String>, cluster: &ClusterArgs) -> Result<()> {
    let (args, sweep_dir) = sweep::take_sweep_dir(args);
    let cells = sweep::expand(&args)?;
    let first = compose_from_args(&cells[0].args, &default_config_dirs())?.program_config()?;
    let dir = sweep_dir.unwrap_or_else(|| sweep::default_dir(&first, &cells));
    let store = sweep::SweepStore::open(&dir, &cells)?;
    let stop = sweep::stop_on_signals()?;
    let hub = Hub::default();
    tracing::info!(cells = cells.len(), dir = %dir.display(), "sweep");
    let stopped = |done: usize| -> ! {
        tracing::warn!(done, of = cells.len(), "signal received: stopping the sweep for requeue");
        std::process::exit(143);
    };
    let outcomes: Vec<CellOutcome> = if cluster.serve.is_none() && cluster.join.is_none() {
        let mut outcomes = Vec::new();
        for cell in &cells {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                write_sweep_summary(&cells, &store, &hub)?;
                stopped(outcomes.len());
            }
            outcomes.push(run_cell(cell, &store, &hub)?);
        }
        outcomes
    } else {
        let executor = CellExecutor {
            cells: cells.clone(),
            store: store.clone(),
            hub: Hub::default(),
            stop: stop.clone(),
            merged: None,
        };
        let mut opts = cluster_options(&first, cluster);
        opts.job_id = format!("sweep-{}", sweep::sweep_id(&cells));
        // A cell is long: one at a time per process, so every process gets cells.
        opts.in_flight_per_worker = 1;
        if cluster.job_dir.is_none() {
            opts.job_dir = dir.join(".cluster");
        }
        if let Some(addr) = cluster.join {
            let name = cluster
                .node_name
                .clone()
                .unwrap_or_else(|| format!("worker-{}", std::process::id()));
            match fusion_cluster::runtime::run_worker(addr, &name, Box::new(executor), &opts) {
                Ok(s) => {
                    tracing::info!(cells = cells.len(), ran = s.executed, "sweep done (worker)");
                    return Ok(());
                }
                Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => stopped(0),
                Err(e) => {
                    return Err(e).with_context(|| format!("sweep worker `{name}` of {addr}"))
                }
            }
        }
        let listen = cluster.serve.context("a sweep coordinator needs an address")?;
        // This process evaluates too: the workers are the ones awaited plus itself.
        let (items, shared) = plan_sweep(&cells, &store, &hub, opts.min_workers + 1)?;
        let whole = items.iter().filter(|i| matches!(i, SweepItem::Cell(_))).count();
        tracing::info!(
            whole,
            shared = shared.len(),
            parts = shared.first().map_or(0, |s| s.parts),
            skipped = cells.len() - whole - shared.len(),
            "sweep plan: whole cells first, then the last ones shared out so no worker idles"
        );
        let encoded = items
            .iter()
            .map(fusion_cluster::codec::encode)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let id = opts.job_id.clone();
        let run = fusion_cluster::runtime::run_coordinator(
            encoded,
            Some(Box::new(executor)),
            Some(listen),
            &opts,
            |addr| tracing::info!(%addr, job = %id, "coordinator listening: workers join with --join"),
        );
        match run {
            Ok(summary) => {
                tracing::info!(workers = ?summary.per_worker, lost = summary.workers_lost, computed_twice = summary.computed_twice, "cells distributed");
                let outcomes = summary
                    .results
                    .iter()
                    .map(|r| fusion_cluster::codec::decode::<SweepOutcome>(r))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                finish_shared_cells(&cells, &store, &hub, &items, outcomes, &shared)?
            }
            Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => {
                write_sweep_summary(&cells, &store, &hub)?;
                stopped(0)
            }
            Err(e) => return Err(e).context("distributed sweep"),
        }
    };
    let rows = write_sweep_summary(&cells, &store, &hub)?;
    println!("{}", sweep::table(&rows));
    let count = |f: fn(&CellOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let computed = count(|o| matches!(o, CellOutcome::Done));
    let skipped = count(|o| matches!(o, CellOutcome::Skipped));
    let failed = count(|o| matches!(o, CellOutcome::Failed(_)));
    tracing::info!(cells = cells.len(), computed, skipped, failed, dir = %dir.display(), "sweep done");
    if failed > 0 {
        bail!("{failed} of {} cells failed (their errors are in {}); rerun the same command to retry them", cells.len(), dir.display());
    }
    Ok(())
}

/// For `todo` cells and `workers` processes: the index (among the `todo`) of the first cell to
/// share out, and in how many parts. Whole cells keep every worker busy until fewer cells than
/// workers are left; those last `todo mod workers` (all, when `todo < workers`) are shared,
/// each in `⌈workers / shared⌉` parts. One part means nothing is shared.
fn share_out(todo: usize, workers: usize) -> (usize, usize) {
    let workers = workers.max(1);
    let tail = if todo < workers { todo } else { todo % workers };
    let parts = if tail == 0 { 1 } else { workers.div_ceil(tail) };
    (todo - tail, parts)
}

/// The outcome of every cell of a distributed sweep: whole cells as their workers reported them,
/// shared cells folded from their parts here (report written into the store, or the first
/// part's error recorded), and cells that already had a result as skipped.
fn finish_shared_cells(
    cells: &[sweep::Cell],
    store: &sweep::SweepStore,
    hub: &Hub,
    items: &[SweepItem],
    outcomes: Vec<SweepOutcome>,
    shared: &[SharedCell],
) -> Result<Vec<CellOutcome>> {
    let mut by_cell: Vec<Option<CellOutcome>> = cells.iter().map(|_| None).collect();
    let mut parts: std::collections::HashMap<usize, Vec<_>> = Default::default();
    for (item, outcome) in items.iter().zip(outcomes) {
        match (item, outcome) {
            (SweepItem::Cell(i), SweepOutcome::Cell(o)) => by_cell[*i] = Some(o),
            (SweepItem::Part { cell, .. }, SweepOutcome::Part(r)) => {
                parts.entry(*cell).or_default().push(r)
            }
            (item, _) => bail!("the result of {item:?} is of another kind"),
        }
    }
    for SharedCell { cell, plan, .. } in shared {
        let label = cells[*cell].label();
        let results = parts.remove(cell).unwrap_or_default();
        let composed = compose_from_args(&cells[*cell].args, &default_config_dirs())?;
        let key = sweep::cell_key(&composed, &composed.program_config()?, hub)?;
        let folded = results
            .into_iter()
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)
            .and_then(|parts| program::report_from_parts(plan, parts));
        by_cell[*cell] = Some(match folded {
            Ok(_) => {
                tracing::info!(cell, settings = %label, "cell done (shared out in parts)");
                CellOutcome::Done
            }
            Err(e) => {
                tracing::error!(cell, settings = %label, "cell failed: {e:#}");
                store.record_error(&key, &format!("{e:#}"))?;
                CellOutcome::Failed(format!("{e:#}"))
            }
        });
    }
    Ok(by_cell.into_iter().map(|o| o.unwrap_or(CellOutcome::Skipped)).collect())
}

/// The summary of every cell from the store: its report, its error, or nothing yet.
fn write_sweep_summary(
    cells: &[sweep::Cell],
    store: &sweep::SweepStore,
    hub: &Hub,
) -> Result<Vec<sweep::Row>> {
    let mut rows = Vec::with_capacity(cells.len());
    for cell in cells {
        let composed = compose_from_args(&cell.args, &default_config_dirs())?;
        let cfg = composed.program_config()?;
        let key = sweep::cell_key(&composed, &cfg, hub)?;
        rows.push(match (store.result(&key), store.error(&key)) {
            (Some(report), _) => sweep::Row::done(cell, &key, report),
            (None, Some(e)) => sweep::Row::failed(cell, &key, &e),
            (None, None) => sweep::Row::pending(cell, &key),
        });
    }
    store.write_summary(&rows)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::share_out;

    #[test]
    fn only_cells_that_would_leave_workers_idle_are_shared() {
        // (todo, workers) -> (first shared, parts); parts == 1: nothing shared.
        assert_eq!(share_out(6, 3), (6, 1), "two rounds of whole cells, no one idles");
        assert_eq!(share_out(4, 3), (3, 3), "the fourth cell in three parts");
        assert_eq!(share_out(5, 3), (3, 2), "the last two cells in two parts each");
        assert_eq!(share_out(1, 3), (0, 3), "one cell, three workers");
        assert_eq!(share_out(2, 3), (0, 2));
        assert_eq!(share_out(7, 1), (7, 1), "a lone process never shares");
        assert_eq!(share_out(0, 4), (0, 1));
        assert_eq!(share_out(3, 0), (3, 1), "zero workers count as one");
    }
}
