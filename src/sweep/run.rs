//! Running a sweep: cell after cell in this process, or handed out across a cluster (every
//! launch of [`Launch`] works with `-m`).
//!
//! In a cluster the coordinator hands out whole cells, the unit of distribution: each process
//! merges and evaluates its cells itself and writes their reports into the sweep folder, which
//! must be on a filesystem the processes share. The last cells, which would leave workers idle,
//! are shared out in parts ([`super::plan`]): each process that takes a part merges that cell
//! itself, evaluates a contiguous range of its batches and returns the batch results, which the
//! coordinator folds and writes. SIGTERM or SIGUSR2 (Slurm preemption) end the sweep after the
//! cells that are running, with status 143.

use super::key::{keyed, Keyed};
use super::plan::{plan_sweep, SharedCell, SweepItem};
use super::store::SweepStore;
use super::summary::{table, Row};
use super::{default_dir, expand, sweep_id, take_sweep_dir};
use crate::hub::identity::HashCache;
use crate::hub::Hub;
use crate::launch::Launch;
use crate::methods::{self, ModelPool};
use crate::program::{self, eval_plan, run_config};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How one cell of a sweep ended in this process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum CellOutcome {
    /// It already had a result.
    Skipped,
    /// Computed; its report is in the store.
    Done,
    /// Failed with this error (recorded in the store; the next run retries it).
    Failed(String),
}

/// What a [`SweepItem`] gave back.
#[derive(serde::Serialize, serde::Deserialize)]
enum SweepOutcome {
    Cell(CellOutcome),
    Part(std::result::Result<program::PartResult, String>),
}

/// The content-hash cache of a sweep: `<path.cache_dir>/content_hashes` of its first cell.
fn hash_cache(first: &Keyed) -> HashCache {
    HashCache::new(
        first.cfg.path.cache_dir.as_ref().map(|d| PathBuf::from(d).join("content_hashes")),
    )
}

/// `-m`: every cell of the sweep over `args`, skipping those with a result in the sweep store.
pub fn run_sweep(args: Vec<String>, launch: &Launch) -> Result<()> {
    let (args, sweep_dir) = take_sweep_dir(args);
    let cells = expand(&args)?;
    let hub = Hub::default();
    let first = keyed(&cells[0], &hub, &HashCache::new(None))?;
    let hashes = hash_cache(&first);
    let keyed: Vec<Keyed> = cells.iter().map(|c| keyed(c, &hub, &hashes)).collect::<Result<_>>()?;
    let dir = sweep_dir.unwrap_or_else(|| default_dir(&first.cfg, &cells));
    let store = SweepStore::open(&dir, &cells)?;
    // Held for the whole sweep: a signal stops it between cells.
    let signals = crate::signals::StopSignals::install()?;
    let stop = signals.flag();
    tracing::info!(cells = cells.len(), dir = %dir.display(), "sweep");
    let stopped = |done: usize| -> ! {
        tracing::warn!(done, of = cells.len(), "signal received: stopping the sweep for requeue");
        std::process::exit(143);
    };
    let outcomes: Vec<CellOutcome> = if !launch.is_distributed() {
        let mut outcomes = Vec::new();
        for k in &keyed {
            if stop.load(Ordering::SeqCst) {
                write_sweep_summary(&keyed, &store)?;
                stopped(outcomes.len());
            }
            outcomes.push(run_cell(k, &store)?);
        }
        outcomes
    } else {
        let executor = CellExecutor {
            cells: keyed.clone(),
            store: store.clone(),
            hub: Hub::default(),
            stop: stop.clone(),
            merged: None,
        };
        let mut opts = launch.options_for(&first.cfg);
        opts.job_id = format!("sweep-{}", sweep_id(&cells));
        // A cell is long: one at a time per process, so every process gets cells.
        opts.in_flight_per_worker = 1;
        if launch.job_dir.is_none() {
            opts.job_dir = dir.join(".cluster");
        }
        if let Some(addr) = launch.join {
            let name = launch.worker_name();
            if keyed.iter().all(|k| store.result(&k.key).is_some()) {
                // The coordinator finds the same: it hands out nothing and ends at once.
                tracing::info!(cells = cells.len(), "sweep done (worker): every cell has a result");
                return Ok(());
            }
            match fusion_cluster::runtime::run_worker(addr, &name, Box::new(executor), &opts) {
                Ok(s) => {
                    tracing::info!(cells = cells.len(), ran = s.executed, "sweep done (worker)");
                    return Ok(());
                }
                Err(_) if stop.load(Ordering::SeqCst) => stopped(0),
                Err(e) => {
                    return Err(e).with_context(|| format!("sweep worker `{name}` of {addr}"))
                }
            }
        }
        let listen = launch.serve.context("a sweep coordinator needs an address")?;
        // This process evaluates too: the workers are the ones awaited plus itself.
        let (items, shared) = plan_sweep(&keyed, &store, opts.min_workers + 1)?;
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
                finish_shared_cells(&keyed, &store, &hub, &items, outcomes, &shared)?
            }
            Err(_) if stop.load(Ordering::SeqCst) => {
                write_sweep_summary(&keyed, &store)?;
                stopped(0)
            }
            Err(e) => return Err(e).context("distributed sweep"),
        }
    };
    let rows = write_sweep_summary(&keyed, &store)?;
    println!("{}", table(&rows));
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

/// Runs cell `k` in this process (evaluation local), unless the store has its result; writes its
/// report (or its error) into the store.
pub fn run_cell(k: &Keyed, store: &SweepStore) -> Result<CellOutcome> {
    let cell = &k.cell;
    if store.result(&k.key).is_some() {
        tracing::info!(cell = cell.index, settings = %cell.label(), "cell skipped: it has a result");
        return Ok(CellOutcome::Skipped);
    }
    let mut cfg = k.cfg.clone();
    cfg.report_save_path = Some(store.report_path(&k.key).display().to_string());
    let t0 = std::time::Instant::now();
    Ok(match run_config(&cfg, &Launch::local()) {
        Ok(_) => {
            tracing::info!(cell = cell.index, settings = %cell.label(), seconds = t0.elapsed().as_secs_f64(), "cell done");
            CellOutcome::Done
        }
        Err(e) => {
            tracing::error!(cell = cell.index, settings = %cell.label(), "cell failed: {e:#}");
            store.record_error(&k.key, &format!("{e:#}"))?;
            CellOutcome::Failed(format!("{e:#}"))
        }
    })
}

/// The cell whose parts this process evaluates, merged and ready to evaluate.
struct MergedCell {
    cell: usize,
    evaluator: program::PartEvaluator,
}

/// Runs a distributed sweep's items: whole cells, and parts of the cells that are shared out
/// when workers would otherwise sit idle.
struct CellExecutor {
    cells: Vec<Keyed>,
    store: SweepStore,
    hub: Hub,
    stop: Arc<AtomicBool>,
    merged: Option<MergedCell>,
}

impl CellExecutor {
    fn run_part(&mut self, index: usize, part: usize, parts: usize) -> Result<program::PartResult> {
        let k = self.cells.get(index).with_context(|| format!("no cell #{index}"))?;
        if self.merged.as_ref().map(|m| m.cell) != Some(index) {
            self.merged = None;
            let cfg = &k.cfg;
            let ctx = methods::Context {
                log_dir: cfg.path.log_dir.clone(),
                seed: cfg.seed,
                fast_dev_run: cfg.fast_dev_run,
            };
            let method = methods::build(&cfg.method, &ctx)?;
            let pool = ModelPool::from_config(&cfg.modelpool, &self.hub)?;
            let plan = eval_plan(cfg)?.context("a cell without a task pool is never shared out")?;
            let t0 = std::time::Instant::now();
            let alone = crate::launch::Launch::local();
            let ctx =
                methods::RunContext { pool: &pool, hub: &self.hub, program: cfg, launch: &alone };
            let merged = method.run(&ctx)?;
            tracing::info!(cell = index, seconds = t0.elapsed().as_secs_f64(), "method done");
            let evaluator = program::PartEvaluator::new(&plan, &self.hub, &pool, &merged)?;
            self.merged = Some(MergedCell { cell: index, evaluator });
        }
        let m = self.merged.as_mut().context("the cell's model is merged")?;
        let t0 = std::time::Instant::now();
        let result = m.evaluator.run(part, parts)?;
        tracing::info!(cell = index, settings = %k.cell.label(), part, of = parts, items = result.items.len(), seconds = t0.elapsed().as_secs_f64(), "cell part done");
        Ok(result)
    }
}

impl fusion_cluster::runtime::Executor for CellExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if self.stop.load(Ordering::SeqCst) {
            return Err("stopped by a signal: the cell is left for the next run".into());
        }
        let item: SweepItem = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let outcome = match item {
            SweepItem::Cell(index) => {
                let k = self.cells.get(index).ok_or_else(|| format!("no cell #{index}"))?;
                SweepOutcome::Cell(run_cell(k, &self.store).map_err(|e| format!("{e:#}"))?)
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

/// The outcome of every cell of a distributed sweep: whole cells as their workers reported them,
/// shared cells folded from their parts here (report written into the store, or the first
/// part's error recorded), and cells that already had a result as skipped.
fn finish_shared_cells(
    cells: &[Keyed],
    store: &SweepStore,
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
        let k = &cells[*cell];
        let label = k.cell.label();
        let results = parts.remove(cell).unwrap_or_default();
        let folded = results
            .into_iter()
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)
            .and_then(|parts| program::report_from_parts(plan, hub, parts));
        by_cell[*cell] = Some(match folded {
            Ok(_) => {
                tracing::info!(cell, settings = %label, "cell done (shared out in parts)");
                CellOutcome::Done
            }
            Err(e) => {
                tracing::error!(cell, settings = %label, "cell failed: {e:#}");
                store.record_error(&k.key, &format!("{e:#}"))?;
                CellOutcome::Failed(format!("{e:#}"))
            }
        });
    }
    Ok(by_cell.into_iter().map(|o| o.unwrap_or(CellOutcome::Skipped)).collect())
}

/// The summary of every cell from the store (its report, its error, or nothing yet), written
/// as `summary.csv` (and `summary.png`).
pub fn write_sweep_summary(cells: &[Keyed], store: &SweepStore) -> Result<Vec<Row>> {
    let rows: Vec<Row> = cells
        .iter()
        .map(|k| match (store.result(&k.key), store.error(&k.key)) {
            (Some(report), _) => Row::done(&k.cell, &k.key, report),
            (None, Some(e)) => Row::failed(&k.cell, &k.key, &e),
            (None, None) => Row::pending(&k.cell, &k.key),
        })
        .collect();
    store.write_summary(&rows)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing cell is recorded in the store, the summary says so, and a cell with a result is
    /// skipped without running.
    #[test]
    fn cells_are_skipped_recorded_and_summarised() {
        let t = tempfile::tempdir().unwrap();
        let args: Vec<String> = [
            "method=task_arithmetic",
            "method.scaling_factor=0.1,oops",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cells = expand(&args).unwrap();
        let dirs = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")];
        // The second cell's scaling factor is not a number: it fails when it runs. (An empty
        // hub: the keys do not need the models.)
        let hub = Hub::new(t.path().join("empty-hub"));
        let keyed: Vec<Keyed> = cells
            .iter()
            .map(|c| {
                let composed = crate::config::compose_from_args(&c.args, &dirs).unwrap();
                let cfg = composed.program_config().unwrap();
                let key =
                    super::super::cell_key(&composed, &cfg, &hub, &HashCache::new(None)).unwrap();
                Keyed { cell: c.clone(), cfg, key }
            })
            .collect();
        assert_ne!(keyed[0].key, keyed[1].key);
        let store = SweepStore::open(&t.path().join("sweep"), &cells).unwrap();
        let p = store.report_path(&keyed[0].key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "{\"average\": {\"accuracy\": 0.25}}").unwrap();
        assert!(matches!(run_cell(&keyed[0], &store).unwrap(), CellOutcome::Skipped));
        let failed = run_cell(&keyed[1], &store).unwrap();
        let CellOutcome::Failed(e) = failed else { panic!("{failed:?}") };
        assert!(e.contains("scaling_factor"), "{e}");
        assert_eq!(store.error(&keyed[1].key).as_deref(), Some(e.trim_end()));
        let rows = write_sweep_summary(&keyed, &store).unwrap();
        let csv = std::fs::read_to_string(t.path().join("sweep/summary.csv")).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(csv.contains(",done,0.25,") && csv.contains(",failed,"), "{csv}");
    }
}
