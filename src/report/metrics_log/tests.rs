//! The logger against Lightning's directory rules, its CSV writer and TensorBoard's reader.

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
    assert_eq!(resolve_log_dir(&root.join("absent"), None, &next), root.join("absent/version_0"));
    assert_eq!(resolve_log_dir(root, Some(""), &next), root.join("version_0"));
    assert_eq!(resolve_log_dir(root, Some("exp"), &next), root.join("exp/version_0"));
    // The next free number: one past the largest, gaps and non-numeric names ignored, files
    // ignored, `version_<n>_<anything>` counted as n.
    mkdirs(root, &["exp/version_0", "exp/version_3", "exp/version_x", "exp/version_", "exp/v9"]);
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
        let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        let events_file = files.iter().find(|p| p.to_string_lossy().contains("tfevents")).unwrap();
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
