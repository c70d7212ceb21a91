//! Sweeps (`fusion_bench -m …`): FusionBench/Hydra comma lists expanded into cells, each cell's
//! result kept in a content-addressed, crash-safe store, so an interrupted or requeued sweep
//! re-runs only the cells without a result.
//!
//! - Expansion ([`expand`]): every override whose value has top-level commas
//!   (`method.scaling_factor=0.1,0.2`, `method=task_arithmetic,ties_merging`) is a dimension;
//!   cells are their cartesian product in Hydra's order (the first dimension outermost, the last
//!   varying fastest).
//! - Store ([`store`]): `sweep_dir=DIR`, else `${path.output_dir}/sweeps/<hash of the expanded
//!   cells>`, so a requeued job (whose `${now:…}` differs) finds the same folder. `sweep.json`
//!   lists the cells; a folder written by another sweep is refused. Each cell's result is
//!   `cells/<key>/report.json`, written atomically (temporary file, fsync, rename); a
//!   half-written file is never taken as a result (a result must parse as a JSON object).
//! - Keys ([`key`]): a cell's key hashes its composed configuration (without the paths and
//!   switches that do not change results), the content identity of every model and dataset it
//!   reads (never their paths) and the numerics version, so every process of a cluster, with its
//!   own cache, finds the same cells, and changed inputs or numerics give new cells.
//! - Running ([`run`]): cell after cell in this process, or handed out across a cluster; the
//!   [`plan`] says which cells go out whole and which are shared out in parts.
//! - A cell that fails records `cells/<key>/error.txt`; the sweep goes on and the next run
//!   retries it. [`summary`]: `summary.csv` (and a printed table) lists every cell.

pub mod key;
pub mod plan;
pub mod run;
pub mod store;
pub mod summary;

pub use key::{cell_key, code_version, NUMERICS_VERSION};
pub use run::run_sweep;
pub use store::SweepStore;
pub use summary::{summary_csv, table, Row};

use crate::config::ProgramConfig;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

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
}
