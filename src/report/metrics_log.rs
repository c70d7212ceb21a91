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
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Python's `str(x)` of a float: `repr`, with `nan`, `inf` and `-inf`.
fn python_str_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        super::python_float_repr(x)
    }
}

/// `_ExperimentWriter`'s state: the header so far, the rows on disk and those not yet saved.
#[derive(Debug, Default)]
struct CsvLog {
    path: PathBuf,
    keys: Vec<String>,
    saved: Vec<BTreeMap<String, String>>,
    pending: Vec<BTreeMap<String, String>>,
}

impl CsvLog {
    fn save(&mut self) -> Result<(), MetricsLogError> {
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
                None => super::csv_field(k),
                Some(r) => r.get(k).map(|v| super::csv_field(v)).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::super::tensorboard::tests::{read_dir_events, read_records};
    use super::super::tensorboard::EventWriter;
    use super::*;

    /// Expected scalars of one tag: (step, value, exact wall time if known).
    type Points = Vec<(i64, f32, Option<f64>)>;

    fn mkdirs(root: &Path, names: &[&str]) {
        for n in names {
            std::fs::create_dir_all(root.join(n)).unwrap();
        }
    }

    #[test]
    fn log_dir_follows_lightning() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let next = LogVersion::Next;
        // Nothing there yet (not even root): version_0; `None` and "" names add nothing.
        assert_eq!(
            resolve_log_dir(&root.join("absent"), None, &next),
            root.join("absent/version_0")
        );
        assert_eq!(resolve_log_dir(root, Some(""), &next), root.join("version_0"));
        assert_eq!(resolve_log_dir(root, Some("exp"), &next), root.join("exp/version_0"));
        // The next free number: one past the largest, gaps and non-numeric names ignored, files
        // ignored, `version_<n>_<anything>` counted as n.
        mkdirs(
            root,
            &["exp/version_0", "exp/version_3", "exp/version_x", "exp/version_", "exp/v9"],
        );
        std::fs::write(root.join("exp/version_9"), b"a file").unwrap();
        assert_eq!(resolve_log_dir(root, Some("exp"), &next), root.join("exp/version_4"));
        mkdirs(root, &["exp/version_7_old", "exp/version_005"]);
        assert_eq!(resolve_log_dir(root, Some("exp"), &next), root.join("exp/version_8"));
        // Explicit versions: an int is `version_<n>`, a string is used as is, "" adds nothing
        // (FusionBench's YAML: `name: ""`, `version: ""` → root_dir itself).
        assert_eq!(
            resolve_log_dir(root, Some("exp"), &LogVersion::Number(2)),
            root.join("exp/version_2")
        );
        let named = |s: &str| LogVersion::Named(s.to_string());
        assert_eq!(resolve_log_dir(root, Some("exp"), &named("run_a")), root.join("exp/run_a"));
        assert_eq!(resolve_log_dir(root, Some("exp"), &named("5")), root.join("exp/5"));
        assert_eq!(resolve_log_dir(root, Some(""), &named("")), root.to_path_buf());
        assert_eq!(resolve_log_dir(root, Some("exp"), &named("")), root.join("exp"));
    }

    #[test]
    fn next_version_reads_only_version_digits() {
        assert_eq!(next_version_of(Vec::<String>::new()), 0);
        assert_eq!(next_version_of(["version_0"]), 1);
        assert_eq!(next_version_of(["version_10", "version_9", "version_2"]), 11);
        assert_eq!(next_version_of(["version_-1", "version_1.5", "version_", "Version_4"]), 0);
        assert_eq!(next_version_of(["version_3_x", "version_03"]), 4);
    }

    fn csv(logger: &MetricsLogger) -> String {
        std::fs::read_to_string(logger.csv_path()).unwrap_or_default()
    }

    #[test]
    fn csv_rows_and_header_follow_lightnings_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(METRICS_FILE), b"stale").unwrap();
        let mut log = MetricsLogger::new(&dir).unwrap().with_csv_flush_every(2);
        assert!(!log.csv_path().exists(), "a stale metrics.csv is removed");
        log.log(0, &[("train/loss", 0.5), ("lr", 1e-5)]).unwrap();
        assert_eq!(csv(&log), "", "buffered until (step + 1) % 2 == 0");
        log.log(1, &[("train/loss", 0.25), ("lr", 1e-5)]).unwrap();
        assert_eq!(csv(&log), "lr,step,train/loss\r\n1e-05,0,0.5\r\n1e-05,1,0.25\r\n");
        // A new key rewrites the file with the wider header; missing cells are empty.
        log.log(2, &[("a,b", f64::NAN), ("step", 99.0)]).unwrap();
        log.log(3, &[("train/loss", f64::from(0.1f32)), ("lr", f64::INFINITY)]).unwrap();
        let want = "\"a,b\",lr,step,train/loss\r\n,1e-05,0,0.5\r\n,1e-05,1,0.25\r\nnan,,2,\r\n\
                    ,inf,3,0.10000000149011612\r\n";
        assert_eq!(csv(&log), want);
        // No new key: appended at the end.
        log.log(4, &[("lr", 1e16)]).unwrap();
        log.finish().unwrap();
        let text = std::fs::read_to_string(tmp.path().join("v").join(METRICS_FILE)).unwrap();
        assert_eq!(text, format!("{want},1e+16,4,\r\n"));
    }

    #[test]
    fn both_files_hold_every_step_and_drop_saves() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLogger::new(tmp.path()).unwrap().with_prefix("tta");
        for step in 0..3 {
            log.log(step, &[("loss", 1.0 / (step as f64 + 3.0))]).unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(tmp.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text, "step,tta-loss\r\n0,0.3333333333333333\r\n1,0.25\r\n2,0.2\r\n",
            "saved on drop"
        );
        let events = read_dir_events(tmp.path());
        let got: Vec<(i64, String, f32)> =
            events[1..].iter().map(|e| (e.step, e.values[0].0.clone(), e.values[0].1)).collect();
        let want: Vec<(i64, String, f32)> =
            (0..3).map(|s| (s, "tta-loss".into(), (1.0 / (s as f64 + 3.0)) as f32)).collect();
        assert_eq!(got, want);
    }

    /// Writes the log directories `scripts/check_tensorboard_events.py` reads, each with the
    /// `expected.json` it checks against: into `$FUSION_BENCH_TB_CHECK_DIR` when set (kept),
    /// else a temporary directory (checked here with the Rust reader only).
    #[test]
    fn writes_the_python_check_fixture() {
        let tmp = tempfile::tempdir().unwrap();
        let out = std::env::var_os("FUSION_BENCH_TB_CHECK_DIR")
            .map_or_else(|| tmp.path().to_path_buf(), PathBuf::from);
        let mut expected: Vec<(PathBuf, f64, f64, BTreeMap<String, Points>)> = Vec::new();

        // 1. An AdaMerging-like run through MetricsLogger, in `logs/version_<N>`.
        let dir = resolve_log_dir(&out.join("logs"), Some(""), &LogVersion::Next);
        let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let mut log = MetricsLogger::new(&dir).unwrap();
        let mut scalars: BTreeMap<String, Points> = BTreeMap::new();
        for step in 0..40i64 {
            let s = step as f64;
            let m = [
                ("train/loss", 2.0 / (1.0 + 0.1 * s)),
                ("train/weight_max", 0.3 + 0.01 * s),
                ("train/weight_min", 0.3 - 0.003 * s),
                ("train/weight_mean", 0.3 + 1e-7 * s * s),
            ];
            log.log(step, &m).unwrap();
            for (k, v) in m {
                scalars.entry(k.into()).or_default().push((step, v as f32, None));
            }
        }
        log.finish().unwrap();
        let t1 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        expected.push((dir, t0.as_secs_f64(), t1.as_secs_f64(), scalars));

        // 2. Exact wall times and edge values (steps increase: TensorBoard purges on a step
        // going back).
        let dir = out.join("exact");
        let mut w = EventWriter::create(&dir).unwrap();
        let first = t1.as_secs_f64();
        let values = [
            (-5, "edge/value", 0.1f32),
            (0, "edge/value", f32::MIN_POSITIVE / 4.0),
            (1, "edge/value", f32::MAX),
            (2, "edge/value", -0.0),
            (3, "edge/value", f32::INFINITY),
            (4, "edge/value", f32::NEG_INFINITY),
            (5, "edge/value", f32::NAN),
            (1 << 40, "edge/value", 1.0 + f32::EPSILON),
            (i64::MAX, "edge/other", 3.25),
        ];
        let mut scalars: BTreeMap<String, Points> = BTreeMap::new();
        for (i, (step, tag, v)) in values.into_iter().enumerate() {
            let wall = 1.7e9 + i as f64 * 0.123_456_789;
            w.add_scalar_at(tag, v, step, wall).unwrap();
            scalars.entry(tag.into()).or_default().push((step, v, Some(wall)));
        }
        drop(w);
        expected.push((dir, first, first, scalars));

        // 3. A writer killed mid-record: the file cut inside its fifth scalar record.
        let dir = out.join("truncated");
        let mut w = EventWriter::create(&dir).unwrap();
        let mut scalars: BTreeMap<String, Points> = BTreeMap::new();
        for step in 0..5 {
            w.add_scalar_at("loss", step as f32 * 0.5, step, 1.7e9 + step as f64).unwrap();
            if step < 4 {
                scalars.entry("loss".into()).or_default().push((
                    step,
                    step as f32 * 0.5,
                    Some(1.7e9 + step as f64),
                ));
            }
        }
        let path = w.path().to_path_buf();
        drop(w);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 9).unwrap();
        expected.push((dir, first, first, scalars));

        for (dir, lo, hi, scalars) in &expected {
            // The Rust reader agrees with the expectation.
            let files: Vec<_> =
                std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
            let events_file =
                files.iter().find(|p| p.to_string_lossy().contains("tfevents")).unwrap();
            let (records, _) = read_records(&std::fs::read(events_file).unwrap());
            let events: Vec<_> =
                records.iter().map(|r| super::super::tensorboard::tests::decode_event(r)).collect();
            let mut got: BTreeMap<String, Points> = BTreeMap::new();
            for e in &events[1..] {
                for (tag, v) in &e.values {
                    got.entry(tag.clone()).or_default().push((e.step, *v, None));
                }
            }
            let strip = |m: &BTreeMap<String, Points>| -> Vec<(String, i64, u32)> {
                m.iter()
                    .flat_map(|(k, p)| p.iter().map(move |(s, v, _)| (k.clone(), *s, v.to_bits())))
                    .collect()
            };
            assert_eq!(strip(&got), strip(scalars), "{}", dir.display());
            std::fs::write(dir.join("expected.json"), expectation_json(*lo, *hi, scalars)).unwrap();
        }
    }

    /// `{"file_version": …, "wall_time_min": …, "wall_time_max": …, "scalars": {tag: [[step,
    /// value, wall_time or null], …]}}`, floats as Python's `repr` (`NaN`, `Infinity` included,
    /// which Python's `json` reads).
    fn expectation_json(lo: f64, hi: f64, scalars: &BTreeMap<String, Points>) -> String {
        use super::super::{python_float_repr as f, to_python_json};
        let tags: Vec<String> = scalars
            .iter()
            .map(|(tag, points)| {
                let pts: Vec<String> = points
                    .iter()
                    .map(|(s, v, w)| {
                        format!("[{s}, {}, {}]", f(f64::from(*v)), w.map_or("null".into(), f))
                    })
                    .collect();
                format!(
                    "{}: [{}]",
                    to_python_json(&serde_json::Value::from(tag.as_str())),
                    pts.join(", ")
                )
            })
            .collect();
        format!(
            "{{\"file_version\": \"{}\", \"wall_time_min\": {}, \"wall_time_max\": {}, \"scalars\": {{{}}}}}\n",
            super::super::tensorboard::FILE_VERSION,
            f(lo),
            f(hi),
            tags.join(", ")
        )
    }
}
