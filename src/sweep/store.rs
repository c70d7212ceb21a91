//! The sweep's folder: the manifest of its cells, each cell's report and error, the summary.

use super::summary::{summary_csv, Row};
use super::Cell;
use crate::report::robustness;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

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
    /// `summary.png`: average accuracy against it; when it sweeps `corruption`, the seed's
    /// robustness table (`robustness.{md,csv,png}`, [`robustness::Table`]).
    pub fn write_summary(&self, rows: &[Row]) -> Result<()> {
        crate::report::write_atomic(&self.dir.join("summary.csv"), summary_csv(rows).as_bytes())?;
        let entries: Vec<robustness::Entry<'_>> = rows
            .iter()
            .map(|r| robustness::Entry {
                swept: &r.cell.swept,
                args: &r.cell.args,
                report: r.report.as_ref(),
            })
            .collect();
        if let Some(table) = robustness::Table::of(&entries) {
            table.write(&self.dir)?;
            eprintln!("\n{}", table.markdown());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::expand;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
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
