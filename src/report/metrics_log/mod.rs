//! Per-step training metrics where FusionBench's `fabric.loggers` would put them: a TensorBoard
//! event file and Lightning's `metrics.csv`, side by side in one log directory.
//!
//! The directory follows Lightning Fabric's loggers (`lightning_fabric/loggers/tensorboard.py`
//! and `csv_logs.py`, 2.6): `os.path.join(root_dir, name, version)`, where a `None`/`""` name adds
//! no component, a `None` version is `version_<N>` with `N` one more than the largest
//! `version_<digits>` directory under `root_dir/name` (0 if none), an int version is
//! `version_<n>`, and a string version is used as written — so FusionBench's own
//! `config/fabric/loggers/*.yaml` (`name: ""`, `version: ""`) log straight into `root_dir`, which
//! is `${path.log_dir}`.
//!
//! The CSV is `_ExperimentWriter`'s: `csv.DictWriter` (`\r\n` line ends, minimal quoting), the
//! header the sorted union of every key logged so far plus `step`, one row per `log` call, missing
//! cells empty, values as Python's `str(float)`. Rows are buffered and written every
//! `flush_logs_every_n_steps` (when `(step + 1) % n == 0`) and at the end; when new keys appear
//! the whole file is rewritten with the wider header (atomically, here), else rows are appended.
//! Keys get `prefix + "-"` when a prefix is set, as `_add_prefix` does.

use super::tensorboard::{EventWriter, EventWriterError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod csv;
#[cfg(test)]
mod tests;

use csv::{python_str_float, CsvLog};

/// Lightning's `metrics.csv` file name.
pub const METRICS_FILE: &str = "metrics.csv";

/// A logger's `version` setting, as the YAML gives it: `null` → [`LogVersion::Next`], an int →
/// [`LogVersion::Number`], a string → [`LogVersion::Named`] (FusionBench's `version: ""` is
/// `Named("")`, not `Next`: Lightning only numbers versions for `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogVersion {
    /// `null` (Lightning's `None`): the next free `version_<N>`.
    Next,
    /// An int: `version_<n>`.
    Number(i64),
    /// A string, used as the directory name as written (`""` adds no component).
    Named(String),
}

/// `TensorBoardLogger.log_dir` / `CSVLogger.log_dir` for these settings (without the
/// TensorBoard logger's `sub_dir`, `expandvars` and `expanduser`). Reads `root_dir/name` only
/// for [`LogVersion::Next`].
pub fn resolve_log_dir(root_dir: &Path, name: Option<&str>, version: &LogVersion) -> PathBuf {
    let mut dir = root_dir.to_path_buf();
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        dir.push(name);
    }
    let version = match version {
        LogVersion::Next => format!("version_{}", next_version(&dir)),
        LogVersion::Number(n) => format!("version_{n}"),
        LogVersion::Named(s) => s.clone(),
    };
    if !version.is_empty() {
        dir.push(version);
    }
    dir
}

/// `_get_next_version`: one more than the largest `N` of the directories (symlinks followed)
/// named `version_N...` in `versions_root`, where `N` is the ASCII digits between the first and
/// second `_`; 0 when there are none or the directory cannot be read.
pub fn next_version(versions_root: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(versions_root) else { return 0 };
    let dirs = entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir());
    next_version_of(dirs.map(|e| e.file_name().to_string_lossy().into_owned()))
}

/// The pure part of [`next_version`]: the next version given the directory names.
pub fn next_version_of<I: IntoIterator<Item = S>, S: AsRef<str>>(dir_names: I) -> u64 {
    let version = |name: &str| -> Option<u64> {
        let n = name.strip_prefix("version_")?.split('_').next()?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok()
    };
    dir_names.into_iter().filter_map(|n| version(n.as_ref())).max().map_or(0, |v| v + 1)
}

/// What failed while logging metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    /// The TensorBoard side.
    #[error(transparent)]
    Events(#[from] EventWriterError),
    /// Writing `metrics.csv` (or removing a stale one): check the directory is writable.
    #[error("writing {path}: {source}")]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Writes every [`log`](MetricsLogger::log) call to a TensorBoard event file and `metrics.csv` in
/// one directory. Dropping it without [`finish`](MetricsLogger::finish) still saves, best-effort.
#[derive(Debug)]
pub struct MetricsLogger {
    log_dir: PathBuf,
    events: EventWriter,
    csv: CsvLog,
    prefix: String,
    flush_every: i64,
    finished: bool,
}

impl MetricsLogger {
    /// Creates `log_dir` with a new event file in it and removes a `metrics.csv` left there by an
    /// earlier run (as Lightning's CSV logger does); rows are saved every 100 steps (FusionBench's
    /// `flush_logs_every_n_steps`) and no prefix is added.
    pub fn new(log_dir: &Path) -> Result<Self, MetricsLogError> {
        let events = EventWriter::create(log_dir)?;
        let path = log_dir.join(METRICS_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(MetricsLogError::Csv { path, source: e })
            }
            _ => {}
        }
        Ok(Self {
            log_dir: log_dir.to_path_buf(),
            events,
            csv: CsvLog { path, ..CsvLog::default() },
            prefix: String::new(),
            flush_every: 100,
            finished: false,
        })
    }

    /// Puts `prefix-` before every key (the loggers' `prefix`; `""` adds nothing).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Saves the CSV after steps where `(step + 1) % n == 0` (`flush_logs_every_n_steps`; `n` of
    /// 0 is taken as 1).
    pub fn with_csv_flush_every(mut self, n: u64) -> Self {
        self.flush_every = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
        self
    }

    /// The log directory.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The TensorBoard event file.
    pub fn events_path(&self) -> &Path {
        self.events.path()
    }

    /// `metrics.csv`.
    pub fn csv_path(&self) -> &Path {
        &self.csv.path
    }

    /// Logs `metrics` at `step`: one TensorBoard scalar per key (the value rounded to `f32`, as
    /// TensorBoard stores it) at once, and one CSV row. Pass `f64::from(x)` for an `f32` metric
    /// so the CSV shows what Python's `tensor.item()` would. Keys should be distinct; a key
    /// `step` is overwritten in the CSV by the step, as in Lightning.
    pub fn log<S: AsRef<str>>(
        &mut self,
        step: i64,
        metrics: &[(S, f64)],
    ) -> Result<(), MetricsLogError> {
        let key = |k: &str| {
            if self.prefix.is_empty() {
                k.to_string()
            } else {
                format!("{}-{k}", self.prefix)
            }
        };
        let keyed: Vec<(String, f64)> =
            metrics.iter().map(|(k, v)| (key(k.as_ref()), *v)).collect();
        let scalars: Vec<(&str, f32)> =
            keyed.iter().map(|(k, v)| (k.as_str(), *v as f32)).collect();
        self.events.add_scalars(step, &scalars)?;
        let mut row: BTreeMap<String, String> =
            keyed.into_iter().map(|(k, v)| (k, python_str_float(v))).collect();
        row.insert("step".into(), step.to_string());
        self.csv.pending.push(row);
        if (step.wrapping_add(1)) % self.flush_every == 0 {
            self.csv.save()?;
        }
        Ok(())
    }

    /// Writes the buffered CSV rows and `fsync`s the event file.
    pub fn save(&mut self) -> Result<(), MetricsLogError> {
        self.csv.save()?;
        self.events.flush()?;
        Ok(())
    }

    /// Saves everything (Lightning's `finalize`).
    pub fn finish(mut self) -> Result<(), MetricsLogError> {
        self.finished = true;
        self.save()
    }
}

impl Drop for MetricsLogger {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.save() {
                tracing::warn!("{e}");
            }
        }
    }
}
