//! Sweeps (`fusion_bench -m …`): FusionBench/Hydra comma lists expanded into cells, each cell's
//! result kept in a content-addressed, crash-safe store, so an interrupted or requeued sweep
//! re-runs only the cells without a result.
//!
//! - Expansion: every override whose value has top-level commas (`method.scaling_factor=0.1,0.2`,
//!   `method=task_arithmetic,ties_merging`) is a dimension; cells are their cartesian product in
//!   Hydra's order (the first dimension outermost, the last varying fastest).
//! - Store: `sweep_dir=DIR`, else `${path.output_dir}/sweeps/<hash of the expanded cells>`, so a
//!   requeued job (whose `${now:…}` differs) finds the same folder. `sweep.json` lists the cells;
//!   a folder written by another sweep is refused. Each cell's result is
//!   `cells/<key>/report.json`, written atomically (temporary file, fsync, rename); a half-written
//!   file is never taken as a result (a result must parse as a JSON object).
//! - A cell's key hashes its composed configuration (without the paths and switches that do not
//!   change results), cheap fingerprints of every model and dataset it reads (resolved snapshot
//!   folder, file names, sizes and modification times) and the program's version, so changed
//!   inputs or code give new cells instead of stale results.
//! - A cell that fails records `cells/<key>/error.txt`; the sweep goes on and the next run
//!   retries it. `summary.csv` (and a printed table) lists every cell.

use crate::config::{Composed, ProgramConfig};
use crate::hub::{Hub, RepoType};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The program's version as it enters cell keys: the package version and the git commit it was
/// built from.
pub const CODE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("FUSION_BENCH_GIT"));

/// One setting of a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Position in the sweep (0-based).
    pub index: usize,
    /// The full argument list of this cell (no comma lists left).
    pub args: Vec<String>,
    /// The swept keys and this cell's values, in dimension order.
    pub swept: Vec<(String, String)>,
}

impl Cell {
    /// `key=value` of the swept keys, space-separated (the whole command when nothing is swept).
    pub fn label(&self) -> String {
        if self.swept.is_empty() {
            return "(single setting)".into();
        }
        self.swept.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }
}

/// Removes `sweep_dir=DIR` from the overrides; returns the rest and the folder.
pub fn take_sweep_dir(args: Vec<String>) -> (Vec<String>, Option<PathBuf>) {
    let mut dir = None;
    let rest = args
        .into_iter()
        .filter(|a| match a.strip_prefix("sweep_dir=").or_else(|| a.strip_prefix("+sweep_dir=")) {
            Some(d) => {
                dir = Some(PathBuf::from(d));
                false
            }
            None => true,
        })
        .collect();
    (rest, dir)
}

/// The cells of a sweep over `args` (overrides and flags as given on the command line).
pub fn expand(args: &[String]) -> Result<Vec<Cell>> {
    // Each argument becomes the list of its alternatives (one for a plain argument).
    let mut options: Vec<(Option<String>, Vec<String>)> = Vec::new();
    for a in args {
        let sweepable = !a.starts_with('-') && !a.starts_with('~');
        match a.split_once('=').filter(|_| sweepable) {
            Some((key, value)) => {
                let parts = crate::config::overrides::split_top(value)
                    .map_err(|e| anyhow::anyhow!("sweep override `{a}`: {e}"))?;
                if parts.len() > 1 {
                    if parts.iter().any(|p| p.trim().is_empty()) {
                        bail!("sweep override `{a}` has an empty value in its comma list");
                    }
                    let values = parts.iter().map(|p| format!("{key}={}", p.trim())).collect();
                    options.push((Some(key.trim_start_matches('+').to_string()), values));
                } else {
                    options.push((None, vec![a.clone()]));
                }
            }
            None => options.push((None, vec![a.clone()])),
        }
    }
    // (arguments so far, swept settings so far) per partial cell.
    type Partial = (Vec<String>, Vec<(String, String)>);
    let mut cells: Vec<Partial> = vec![(Vec::new(), Vec::new())];
    for (key, values) in &options {
        let mut next = Vec::with_capacity(cells.len() * values.len());
        for (args, swept) in &cells {
            for v in values {
                let mut args = args.clone();
                args.push(v.clone());
                let mut swept = swept.clone();
                if let Some(k) = key {
                    let value = v.split_once('=').map_or("", |(_, x)| x).to_string();
                    swept.push((k.clone(), value));
                }
                next.push((args, swept));
            }
        }
        cells = next;
    }
    Ok(cells
        .into_iter()
        .enumerate()
        .map(|(index, (args, swept))| Cell { index, args, swept })
        .collect())
}

/// A hash of the cells' arguments: names the sweep (its default folder, its cluster job).
pub fn sweep_id(cells: &[Cell]) -> String {
    let all: Vec<&Vec<String>> = cells.iter().map(|c| &c.args).collect();
    crate::report::stable_hash(format!("{all:?}").as_bytes())
}

/// `${path.output_dir}/sweeps/<sweep id>`.
pub fn default_dir(first: &ProgramConfig, cells: &[Cell]) -> PathBuf {
    let out = first.path.output_dir.as_deref().unwrap_or("outputs");
    Path::new(out).join("sweeps").join(sweep_id(cells))
}

/// Keys of the composed configuration that do not change a cell's result.
const VOLATILE: &[&str] =
    &["path", "report_save_path", "merged_model_save_path", "print_config", "dry_run", "hydra"];

/// The content address of a cell: its composed configuration (without [`VOLATILE`] keys), the
/// fingerprints of the models and datasets it reads, and [`CODE_VERSION`].
pub fn cell_key(composed: &Composed, cfg: &ProgramConfig, hub: &Hub) -> Result<String> {
    let yaml = composed.to_yaml()?;
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&yaml).context("re-reading the composed configuration")?;
    if let Some(m) = doc.as_mapping_mut() {
        for k in VOLATILE {
            m.remove(*k);
        }
    }
    let mut text = serde_yaml_ng::to_string(&doc).context("writing the configuration")?;
    text.push_str(CODE_VERSION);
    for (name, m) in &cfg.modelpool.models {
        text.push_str(&format!("\nmodel {name} {}", folder_fingerprint(hub, &m.path, false)));
    }
    if let Some(tp) = &cfg.taskpool {
        for (name, d) in &tp.test_datasets {
            text.push_str(&format!("\ndataset {name} {}", folder_fingerprint(hub, &d.path, true)));
        }
    }
    Ok(crate::report::stable_hash(text.as_bytes()))
}

/// Resolved folder, then every file's relative name, size and modification time (a missing
/// model or dataset fingerprints as such; the run itself reports it).
fn folder_fingerprint(hub: &Hub, id: &str, dataset: bool) -> String {
    let dir =
        if dataset { hub.resolve_dataset(id) } else { hub.resolve(id, RepoType::Model, None) };
    let Ok(dir) = dir else { return format!("{id}: unresolved") };
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            // Follow the hub cache's symlinks to the blobs for sizes and times.
            let Ok(meta) = std::fs::metadata(&p) else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                let rel = p.strip_prefix(&dir).unwrap_or(&p).display().to_string();
                files.push(format!("{rel}:{}:{mtime}", meta.len()));
            }
        }
    }
    files.sort();
    format!("{} [{}]", dir.display(), files.join(" "))
}

/// The sweep's folder.
#[derive(Debug, Clone)]
pub struct SweepStore {
    dir: PathBuf,
}

impl SweepStore {
    /// Opens (or starts) the store in `dir` for `cells`; a folder holding another sweep's
    /// `sweep.json` is refused.
    pub fn open(dir: &Path, cells: &[Cell]) -> Result<Self> {
        let manifest = serde_json::json!({
            "cells": cells.iter().map(|c| &c.args).collect::<Vec<_>>(),
        });
        let path = dir.join("sweep.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let old: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a sweep manifest", path.display()))?;
                if old != manifest {
                    bail!(
                        "{} was written by a different sweep (its cells differ from this command's); \
                         give another sweep_dir= or remove the folder",
                        dir.display()
                    );
                }
            }
            Err(_) => {
                std::fs::create_dir_all(dir.join("cells"))
                    .with_context(|| format!("creating {}", dir.display()))?;
                let text = serde_json::to_string_pretty(&manifest)? + "\n";
                crate::report::write_atomic(&path, text.as_bytes())?;
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Where the report of cell `key` goes.
    pub fn report_path(&self, key: &str) -> PathBuf {
        self.dir.join("cells").join(key).join("report.json")
    }

    /// The finished result of cell `key`, if there is one (a complete JSON object).
    pub fn result(&self, key: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.report_path(key)).ok()?;
        serde_json::from_str::<Value>(&text).ok().filter(Value::is_object)
    }

    /// The recorded error of cell `key`, if it failed last time and has no result since.
    pub fn error(&self, key: &str) -> Option<String> {
        let text =
            std::fs::read_to_string(self.dir.join("cells").join(key).join("error.txt")).ok()?;
        Some(text.trim_end().to_string())
    }

    /// Records why cell `key` failed (the next run retries it).
    pub fn record_error(&self, key: &str, error: &str) -> Result<()> {
        let dir = self.dir.join("cells").join(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::report::write_atomic(&dir.join("error.txt"), format!("{error}\n").as_bytes())
    }

    /// Writes `summary.csv` (one row per cell) and, when the sweep has one numeric swept key,
    /// `summary.png`: average accuracy against it.
    pub fn write_summary(&self, rows: &[Row]) -> Result<()> {
        crate::report::write_atomic(&self.dir.join("summary.csv"), summary_csv(rows).as_bytes())?;
        let one_key = rows.first().is_some_and(|r| r.cell.swept.len() == 1);
        let points: Option<Vec<(f64, f64)>> = rows
            .iter()
            .filter(|r| r.report.is_some())
            .map(|r| Some((r.cell.swept.first()?.1.parse::<f64>().ok()?, r.accuracy("average")?)))
            .collect();
        if let (true, Some(points)) = (one_key, points) {
            if points.len() >= 2 {
                let key = &rows[0].cell.swept[0].0;
                crate::report::plot::save_line_png(
                    &self.dir.join("summary.png"),
                    &points,
                    key,
                    "average accuracy",
                )?;
            }
        }
        Ok(())
    }
}

/// A cell's line in the summary.
#[derive(Debug, Clone)]
pub struct Row {
    cell: Cell,
    key: String,
    status: &'static str,
    report: Option<Value>,
    error: Option<String>,
}

impl Row {
    /// A cell with its report.
    pub fn done(cell: &Cell, key: &str, report: Value) -> Self {
        Self {
            cell: cell.clone(),
            key: key.into(),
            status: "done",
            report: Some(report),
            error: None,
        }
    }
    /// A cell without a result (not run yet).
    pub fn pending(cell: &Cell, key: &str) -> Self {
        Self { cell: cell.clone(), key: key.into(), status: "todo", report: None, error: None }
    }
    /// A cell that failed.
    pub fn failed(cell: &Cell, key: &str, error: &str) -> Self {
        Self {
            cell: cell.clone(),
            key: key.into(),
            status: "failed",
            report: None,
            error: Some(error.lines().next().unwrap_or("").to_string()),
        }
    }

    fn accuracy(&self, task: &str) -> Option<f64> {
        self.report.as_ref()?.get(task)?.get("accuracy")?.as_f64()
    }
}

fn tasks_of(rows: &[Row]) -> Vec<String> {
    let mut tasks: Vec<String> = Vec::new();
    for r in rows {
        if let Some(Value::Object(m)) = &r.report {
            for k in m.keys() {
                if k != "model_info" && k != "average" && !tasks.contains(k) {
                    tasks.push(k.clone());
                }
            }
        }
    }
    tasks
}

/// `cell,<swept keys…>,status,average_accuracy,<task>_accuracy…,key,error`.
pub fn summary_csv(rows: &[Row]) -> String {
    let keys: Vec<String> = rows
        .first()
        .map(|r| r.cell.swept.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let tasks = tasks_of(rows);
    let mut out = String::from("cell");
    for k in &keys {
        out.push(',');
        out.push_str(&crate::report::csv_field(k));
    }
    out.push_str(",status,average_accuracy");
    for t in &tasks {
        out.push_str(&format!(",{}_accuracy", crate::report::csv_field(t)));
    }
    out.push_str(",key,error\n");
    let num = |v: Option<f64>| v.map(crate::report::python_float_repr).unwrap_or_default();
    for r in rows {
        out.push_str(&r.cell.index.to_string());
        for (_, v) in &r.cell.swept {
            out.push(',');
            out.push_str(&crate::report::csv_field(v));
        }
        out.push_str(&format!(",{},{}", r.status, num(r.accuracy("average"))));
        for t in &tasks {
            out.push(',');
            out.push_str(&num(r.accuracy(t)));
        }
        out.push_str(&format!(
            ",{},{}\n",
            r.key,
            crate::report::csv_field(r.error.as_deref().unwrap_or(""))
        ));
    }
    out
}

/// A plain-text table of the cells: settings, status, average accuracy.
pub fn table(rows: &[Row]) -> String {
    let lines: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            let acc =
                r.accuracy("average").map(|a| format!("{a:.4}")).unwrap_or_else(|| "-".into());
            (r.cell.label(), r.status.to_string(), acc)
        })
        .collect();
    let w = lines.iter().map(|l| l.0.len()).max().unwrap_or(0).max(8);
    let mut out = format!("{:<w$}  {:<6}  {}\n", "settings", "status", "average accuracy");
    for (label, status, acc) in lines {
        out.push_str(&format!("{label:<w$}  {status:<6}  {acc}\n"));
    }
    out
}

/// A flag raised by SIGTERM or SIGUSR2 (Slurm's preemption signals; NCCL owns SIGUSR1). The
/// sweep checks it between cells, so the current cell finishes and nothing is lost.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR2] {
        signal_hook::flag::register(sig, flag.clone())
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn expands_comma_lists_in_hydra_order() {
        let cells = expand(&s(&[
            "method=task_arithmetic,ties_merging",
            "method.scaling_factor=0.1,0.3",
            "modelpool=X",
            "method.remove_keys=[a,b]",
            "--serve",
        ]))
        .unwrap();
        assert_eq!(cells.len(), 4);
        assert_eq!(cells[1].args[0], "method=task_arithmetic");
        assert_eq!(cells[1].args[1], "method.scaling_factor=0.3");
        assert_eq!(cells[2].args[0], "method=ties_merging");
        assert_eq!(cells[3].label(), "method=ties_merging method.scaling_factor=0.3");
        assert!(cells.iter().all(|c| c.args[3] == "method.remove_keys=[a,b]"));
        assert_eq!(expand(&s(&["a=1"])).unwrap()[0].label(), "(single setting)");
        assert!(expand(&s(&["a=1,,2"])).is_err());
    }

    #[test]
    fn store_refuses_another_sweep_and_ignores_half_written_results() {
        let dir = tempfile::tempdir().unwrap();
        let cells = expand(&s(&["a=1,2"])).unwrap();
        let store = SweepStore::open(dir.path(), &cells).unwrap();
        SweepStore::open(dir.path(), &cells).unwrap();
        let other = expand(&s(&["a=1,3"])).unwrap();
        let e = SweepStore::open(dir.path(), &other).unwrap_err().to_string();
        assert!(e.contains("different sweep"), "{e}");
        let p = store.report_path("k");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "{\"average\": {\"accur").unwrap();
        assert!(store.result("k").is_none());
        std::fs::write(&p, "{\"average\": {\"accuracy\": 0.5}}").unwrap();
        assert_eq!(store.result("k").unwrap()["average"]["accuracy"], 0.5);
        let rows = vec![Row::done(&cells[0], "k", store.result("k").unwrap())];
        let csv = summary_csv(&rows);
        assert_eq!(csv, "cell,a,status,average_accuracy,key,error\n0,1,done,0.5,k,\n");
    }
}
