//! The seed's robustness table from a sweep over `corruption=` (and methods): blocks of two
//! splits side by side (clean and motion blur; impulse and Gaussian noise; pixelate and spatter;
//! contrast and JPEG compression), each with its tasks' accuracies and their average, one row per
//! method, in percent: `robustness.md`, `robustness.csv` (every cell's accuracies as its report
//! has them) and `robustness.png` (each method's average accuracy per split) beside the sweep's
//! `summary.csv`.
//!
//! The clean test set is `corruption=test` on the corrupted config (its splits are then the
//! `test` splits, as the clean pool's), or a cell without a corruption.

use super::canvas::{text_width, Canvas, LINE};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// One cell of a sweep: its swept `(key, value)`s, its arguments and its report (if done).
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// The swept keys and this cell's values.
    pub swept: &'a [(String, String)],
    /// The cell's full argument list.
    pub args: &'a [String],
    /// Its report, once done.
    pub report: Option<&'a Value>,
}

/// The seed's blocks, in its order: each pair of splits shares a row of blocks.
const SEED_ORDER: [&str; 8] = [
    "clean",
    "motion_blur",
    "impulse_noise",
    "gaussian_noise",
    "pixelate",
    "spatter",
    "contrast",
    "jpeg_compression",
];

/// The seed's title of a split.
fn split_title(split: &str) -> String {
    match split {
        "clean" => "Clean Test set".into(),
        "motion_blur" => "Motion Blur".into(),
        "impulse_noise" => "Impulse Noise".into(),
        "gaussian_noise" => "Gaussian Noise".into(),
        "pixelate" => "Pixelate".into(),
        "spatter" => "Spatter".into(),
        "contrast" => "Contrast".into(),
        "jpeg_compression" => "JPEG Compression".into(),
        other => other.replace('_', " "),
    }
}

/// The seed's name of a method (`method=` override), or the override itself.
fn method_title(method: &str) -> String {
    let last = method.rsplit('/').next().unwrap_or(method);
    match last {
        "dummy" => "Pre-trained".into(),
        "simple_average" => "Simple Average".into(),
        "fisher_merging" | "clip_fisher_merging" => "Fisher Merging".into(),
        "regmean" | "clip_regmean" => "RegMean".into(),
        "task_arithmetic" => "Task Arithmetic".into(),
        "ties_merging" => "Ties-Merging".into(),
        "adamerging" | "clip" | "clip_layer_wise_adamerging" => "AdaMerging".into(),
        "weight_ensembling_moe" => "Weight-Ensembling MoE".into(),
        "sparse_weight_ensembling_moe" => "Sparse WE-MoE".into(),
        other => other.into(),
    }
}

/// The seed's column title of a task.
fn task_title(task: &str) -> String {
    match crate::tasks::canonical_name(task) {
        Some("stanford-cars") => "Cars".into(),
        Some("eurosat") => "EuroSAT".into(),
        Some("resisc45") => "RESISC45".into(),
        Some("gtsrb") => "GTSRB".into(),
        Some("sun397") => "SUN397".into(),
        Some("svhn") => "SVHN".into(),
        Some("mnist") => "MNIST".into(),
        Some("dtd") => "DTD".into(),
        _ => task.into(),
    }
}

/// The robustness table of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The splits, in the seed's block order, then any others in sweep order.
    pub splits: Vec<String>,
    /// Row labels, in sweep order.
    pub methods: Vec<String>,
    /// The tasks (report keys), in report order.
    pub tasks: Vec<String>,
    /// `cells[m][s]`: method `m`'s report on split `s`, when done.
    pub cells: Vec<Vec<Option<Value>>>,
}

fn override_value<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter().rev().find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

impl Table {
    /// The table of `entries` when the sweep sweeps `corruption`; `None` otherwise.
    pub fn of(entries: &[Entry<'_>]) -> Option<Self> {
        if !entries.iter().any(|e| e.swept.iter().any(|(k, _)| k == "corruption")) {
            return None;
        }
        let mut splits: Vec<String> = Vec::new();
        let mut methods: Vec<String> = Vec::new();
        let mut tasks: Vec<String> = Vec::new();
        let mut placed: Vec<(String, String, Option<Value>)> = Vec::new();
        for e in entries {
            let split = match override_value(e.args, "corruption") {
                None | Some("test") | Some("clean") => "clean".to_string(),
                Some(c) => c.to_string(),
            };
            let mut label = method_title(override_value(e.args, "method").unwrap_or("method"));
            let others: Vec<String> = e
                .swept
                .iter()
                .filter(|(k, _)| k != "corruption" && k != "method")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !others.is_empty() {
                label = format!("{label} ({})", others.join(" "));
            }
            if !splits.contains(&split) {
                splits.push(split.clone());
            }
            if !methods.contains(&label) {
                methods.push(label.clone());
            }
            if let Some(Value::Object(m)) = e.report {
                for k in m.keys() {
                    if k != "model_info" && k != "average" && !tasks.contains(k) {
                        tasks.push(k.clone());
                    }
                }
            }
            placed.push((label, split, e.report.cloned()));
        }
        let rank = |s: &String| SEED_ORDER.iter().position(|o| o == s).unwrap_or(SEED_ORDER.len());
        splits.sort_by_key(rank); // stable: other splits keep their sweep order
        let mut cells = vec![vec![None; splits.len()]; methods.len()];
        for (label, split, report) in placed {
            let m = methods.iter().position(|x| *x == label).expect("listed");
            let s = splits.iter().position(|x| *x == split).expect("listed");
            if report.is_some() {
                cells[m][s] = report;
            }
        }
        Some(Self { splits, methods, tasks, cells })
    }

    fn accuracy(&self, m: usize, s: usize, task: &str) -> Option<f64> {
        self.cells[m][s].as_ref()?.get(task)?.get("accuracy")?.as_f64()
    }

    /// The seed's layout in Markdown: two splits per row of blocks, tasks then `Avg.` per
    /// split, accuracies in percent to one decimal (`–` where a cell has no report).
    pub fn markdown(&self) -> String {
        let cols: Vec<String> =
            self.tasks.iter().map(|t| task_title(t)).chain(["Avg.".to_string()]).collect();
        let per = cols.len();
        let pairs: Vec<&[String]> = self.splits.chunks(2).collect();
        let width = pairs.iter().map(|p| p.len()).max().unwrap_or(1);
        let mut header = vec!["Method".to_string()];
        for _ in 0..width {
            header.extend(cols.iter().cloned());
        }
        let mut out = format!("| {} |\n", header.join(" | "));
        out.push_str(&format!("|{}\n", " --- |".repeat(header.len())));
        for (p, pair) in pairs.iter().enumerate() {
            let mut title = vec![String::new()];
            for s in pair.iter() {
                title.push(split_title(s));
                title.extend(std::iter::repeat_n(String::new(), per - 1));
            }
            title.resize(header.len(), String::new());
            out.push_str(&format!("| {} |\n", title.join(" | ")));
            for (m, method) in self.methods.iter().enumerate() {
                let mut row = vec![method.clone()];
                for (i, _) in pair.iter().enumerate() {
                    let s = 2 * p + i;
                    for t in self.tasks.iter().map(String::as_str).chain(["average"]) {
                        row.push(
                            self.accuracy(m, s, t)
                                .map_or_else(|| "–".to_string(), |a| format!("{:.1}", 100.0 * a)),
                        );
                    }
                }
                row.resize(header.len(), String::new());
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
        }
        out
    }

    /// One line per method and split: the split, each task's accuracy and the average, as the
    /// cell's report has them (fractions; empty where a cell has no report).
    pub fn csv(&self) -> String {
        let mut out = String::from("method,split");
        for t in self.tasks.iter().map(String::as_str).chain(["average"]) {
            out.push(',');
            out.push_str(&super::csv_field(t));
        }
        out.push('\n');
        for (m, method) in self.methods.iter().enumerate() {
            for (s, split) in self.splits.iter().enumerate() {
                out.push_str(&format!("{},{}", super::csv_field(method), super::csv_field(split)));
                for t in self.tasks.iter().map(String::as_str).chain(["average"]) {
                    out.push(',');
                    if let Some(a) = self.accuracy(m, s, t) {
                        out.push_str(&super::python_float_repr(a));
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// Writes `robustness.md`, `robustness.csv` and `robustness.png` into `dir`, atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        super::write_atomic(&dir.join("robustness.md"), self.markdown().as_bytes())?;
        super::write_atomic(&dir.join("robustness.csv"), self.csv().as_bytes())?;
        let series: Vec<(String, Vec<Option<f64>>)> = self
            .methods
            .iter()
            .enumerate()
            .map(|(m, name)| {
                let v = (0..self.splits.len())
                    .map(|s| self.accuracy(m, s, "average").map(|a| 100.0 * a))
                    .collect();
                (name.clone(), v)
            })
            .collect();
        let groups: Vec<String> = self.splits.iter().map(|s| split_title(s)).collect();
        save_grouped_bars_png(&dir.join("robustness.png"), &groups, &series, "average accuracy (%)")
    }
}

/// Colours of the series, in order (then repeated).
const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// A grouped bar chart: one group per `groups` entry, one bar per series in it (a missing value
/// leaves a gap), y from 0 to 100, a legend of the series; written to `path` atomically.
pub fn save_grouped_bars_png(
    path: &Path,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
    y_label: &str,
) -> Result<()> {
    let bar = 10u32;
    let group_w = (bar * series.len().max(1) as u32 + 16)
        .max(groups.iter().map(|g| text_width(g) / 2 + 8).max().unwrap_or(0));
    let (left, right, top) = (60u32, 20u32, 40u32);
    let legend_h = (LINE + 6) * series.len() as u32 + 10;
    let plot_h = 260u32;
    let bottom = 2 * LINE + 20 + legend_h;
    let last_label = groups
        .last()
        .map_or(0, |g| left + (groups.len() as u32 - 1) * group_w + 8 + text_width(g) + 10);
    let w = (left + right + group_w * groups.len().max(1) as u32).max(last_label);
    let h = top + plot_h + bottom;
    let mut c = Canvas::new(w.max(360), h);
    let black = [0, 0, 0];
    let grey = [200, 200, 200];
    let y = |v: f64| f64::from(top) + (1.0 - v.clamp(0.0, 100.0) / 100.0) * f64::from(plot_h);
    for tick in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let ty = y(tick);
        c.line((f64::from(left), ty), (f64::from(w - right), ty), 1, grey);
        let label = format!("{tick}");
        c.text(
            left.saturating_sub(text_width(&label) + 6),
            (ty as u32).saturating_sub(LINE / 2),
            &label,
            black,
            false,
        );
    }
    c.line((f64::from(left), f64::from(top)), (f64::from(left), y(0.0)), 2, black);
    c.line((f64::from(left), y(0.0)), (f64::from(w - right), y(0.0)), 2, black);
    for (g, name) in groups.iter().enumerate() {
        let x0 = left + g as u32 * group_w + 8;
        for (i, (_, values)) in series.iter().enumerate() {
            if let Some(Some(v)) = values.get(g) {
                let top_y = y(*v) as u32;
                let base = y(0.0) as u32;
                c.fill(
                    x0 + i as u32 * bar,
                    top_y,
                    bar - 2,
                    base.saturating_sub(top_y),
                    PALETTE[i % PALETTE.len()],
                );
            }
        }
        // Group labels alternate between two lines so that long ones do not overlap.
        let ly = y(0.0) as u32 + 6 + (g as u32 % 2) * (LINE + 2);
        c.text(x0, ly, name, black, false);
    }
    c.text(8, 10, y_label, black, false);
    let mut ly = top + plot_h + 2 * LINE + 24;
    for (i, (name, _)) in series.iter().enumerate() {
        c.fill(left, ly, 12, LINE, PALETTE[i % PALETTE.len()]);
        c.text(left + 18, ly, name, black, false);
        ly += LINE + 6;
    }
    let bytes = c.png().context("encoding the robustness chart")?;
    super::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(acc: [f64; 4]) -> Value {
        let avg = acc.iter().sum::<f64>() / 4.0;
        serde_json::json!({
            "model_info": {}, "stanford_cars": {"accuracy": acc[0]}, "eurosat": {"accuracy": acc[1]},
            "resisc45": {"accuracy": acc[2]}, "gtsrb": {"accuracy": acc[3]}, "average": {"accuracy": avg}
        })
    }

    struct Cell {
        swept: Vec<(String, String)>,
        args: Vec<String>,
        report: Option<Value>,
    }

    fn cell(method: &str, corruption: &str, acc: Option<[f64; 4]>) -> Cell {
        Cell {
            swept: vec![("corruption".into(), corruption.into()), ("method".into(), method.into())],
            args: vec![
                "--config-name".into(),
                "clip-vit-base-patch32_robustness_corrupted".into(),
                format!("corruption={corruption}"),
                format!("method={method}"),
            ],
            report: acc.map(report),
        }
    }

    fn entries(cells: &[Cell]) -> Vec<Entry<'_>> {
        cells
            .iter()
            .map(|c| Entry { swept: &c.swept, args: &c.args, report: c.report.as_ref() })
            .collect()
    }

    #[test]
    fn the_seeds_layout_with_blocks_in_its_order() {
        let cells = vec![
            cell("task_arithmetic", "contrast", Some([0.5, 0.25, 0.75, 1.0])),
            cell("task_arithmetic", "test", Some([0.625, 0.5, 0.5, 0.5])),
            cell("task_arithmetic", "motion_blur", Some([0.125, 0.25, 0.25, 0.25])),
            cell("ties_merging", "contrast", None),
            cell("ties_merging", "test", Some([0.5, 0.5, 0.5, 0.5])),
            cell("ties_merging", "motion_blur", Some([0.0, 0.0, 0.0, 1.0])),
        ];
        let t = Table::of(&entries(&cells)).unwrap();
        assert_eq!(t.splits, ["clean", "motion_blur", "contrast"]);
        assert_eq!(t.methods, ["Task Arithmetic", "Ties-Merging"]);
        let md = t.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| Method | Cars | EuroSAT | RESISC45 | GTSRB | Avg. | Cars | EuroSAT | RESISC45 | GTSRB | Avg. |"
        );
        assert_eq!(lines[2], "|  | Clean Test set |  |  |  |  | Motion Blur |  |  |  |  |");
        assert_eq!(
            lines[3],
            "| Task Arithmetic | 62.5 | 50.0 | 50.0 | 50.0 | 53.1 | 12.5 | 25.0 | 25.0 | 25.0 | 21.9 |"
        );
        assert_eq!(lines[5], "|  | Contrast |  |  |  |  |  |  |  |  |  |");
        assert_eq!(lines[7], "| Ties-Merging | – | – | – | – | – |  |  |  |  |  |");
        let csv = t.csv();
        assert!(
            csv.starts_with("method,split,stanford_cars,eurosat,resisc45,gtsrb,average\n"),
            "{csv}"
        );
        assert!(csv.contains("Task Arithmetic,contrast,0.5,0.25,0.75,1.0,0.625\n"), "{csv}");
        assert!(csv.contains("Ties-Merging,contrast,,,,,\n"), "{csv}");
        let dir = tempfile::tempdir().unwrap();
        t.write(dir.path()).unwrap();
        let png = std::fs::read(dir.path().join("robustness.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        // Both series' colours are drawn.
        for colour in &PALETTE[..2] {
            assert!(img.pixels().any(|p| p.0 == *colour), "{colour:?} not drawn");
        }
    }

    #[test]
    fn no_table_without_a_swept_corruption_and_other_keys_label_the_rows() {
        let mut c = cell("task_arithmetic", "pixelate", Some([0.5; 4]));
        c.swept.retain(|(k, _)| k != "corruption");
        assert!(Table::of(&entries(&[c])).is_none());
        let mut c = cell("task_arithmetic", "pixelate", Some([0.5; 4]));
        c.swept.push(("method.scaling_factor".into(), "0.7".into()));
        let t = Table::of(&entries(&[c])).unwrap();
        assert_eq!(t.methods, ["Task Arithmetic (method.scaling_factor=0.7)"]);
    }
}
