//! `metrics.csv` as Lightning's `_ExperimentWriter` writes it (see the module above).

use super::MetricsLogError;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Python's `str(x)` of a float: `repr`, with `nan`, `inf` and `-inf`.
pub(super) fn python_str_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        super::super::python_float_repr(x)
    }
}

/// `_ExperimentWriter`'s state: the header so far, the rows on disk and those not yet saved.
#[derive(Debug, Default)]
pub(super) struct CsvLog {
    pub(super) path: PathBuf,
    pub(super) keys: Vec<String>,
    pub(super) saved: Vec<BTreeMap<String, String>>,
    pub(super) pending: Vec<BTreeMap<String, String>>,
}

impl CsvLog {
    pub(super) fn save(&mut self) -> Result<(), MetricsLogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let seen: BTreeSet<&String> = self.keys.iter().collect();
        let new: BTreeSet<String> = self
            .pending
            .iter()
            .flat_map(|r| r.keys())
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        self.keys.extend(new.iter().cloned());
        self.keys.sort();
        let exists = self.path.is_file();
        if !exists {
            // A fresh file (Lightning's "w" mode): the header and the new rows only.
            self.saved.clear();
        }
        let rewrite = exists && !new.is_empty();
        let mut text = String::new();
        if !exists || rewrite {
            text.push_str(&self.line(None));
        }
        if rewrite {
            for row in &self.saved {
                text.push_str(&self.line(Some(row)));
            }
        }
        for row in &self.pending {
            text.push_str(&self.line(Some(row)));
        }
        let err = |source| MetricsLogError::Csv { path: self.path.clone(), source };
        if rewrite {
            replace_file(&self.path, text.as_bytes()).map_err(err)?;
        } else {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&self.path)
                .map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
        }
        self.saved.append(&mut self.pending);
        Ok(())
    }

    /// The header (`None`) or a row, as `csv.DictWriter` writes it (`restval=""`).
    fn line(&self, row: Option<&BTreeMap<String, String>>) -> String {
        let cells: Vec<String> = self
            .keys
            .iter()
            .map(|k| match row {
                None => super::super::csv_field(k),
                Some(r) => r.get(k).map(|v| super::super::csv_field(v)).unwrap_or_default(),
            })
            .collect();
        cells.join(",") + "\r\n"
    }
}

/// Replaces `path` with `bytes` through a temporary file beside it, so a crash leaves the old or
/// the new file, never a partial one.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.partial", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
