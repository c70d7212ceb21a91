//! The generalization experiments' view of a report (FusionBench's
//! `clip-vit-base-patch32_generalization_exp{1,2}` model pools evaluated on all eight tasks):
//! *seen* tasks are those a merged model was fine-tuned on (the model pool's models), *unseen*
//! ones are only evaluated. The report JSON stays FusionBench's, whose `average` mixes both; this
//! adds the seed's tables' two averages: a printed table and a CSV beside the report
//! (`<report>.seen_unseen.csv`).

use serde_json::Value;
use std::path::{Path, PathBuf};

/// A report's task accuracies split into seen tasks (in the model pool's order) and unseen ones
/// (in report order).
#[derive(Debug, Clone, PartialEq)]
pub struct SeenUnseen {
    /// `(task, accuracy)` of the tasks the model pool has a model for.
    pub seen: Vec<(String, f64)>,
    /// `(task, accuracy)` of the others.
    pub unseen: Vec<(String, f64)>,
    /// The report's own `average` accuracy (over both).
    pub average: f64,
}

/// Whether a model's name and a report's task name are the same task: equal, or FusionBench
/// aliases of one task (the v0.1 robustness task pool reports `stanford_cars` for the model
/// `stanford-cars`).
fn same_task(model: &str, task: &str) -> bool {
    model == task
        || crate::tasks::canonical_name(model)
            .is_some_and(|m| crate::tasks::canonical_name(task) == Some(m))
}

fn mean(v: &[(String, f64)]) -> f64 {
    v.iter().map(|(_, a)| a).sum::<f64>() / v.len() as f64
}

impl SeenUnseen {
    /// The split of `report` by `models` (the model pool's model names): `None` unless the report
    /// has both seen and unseen tasks (a plain multi-task run has no unseen task).
    pub fn of(report: &Value, models: &[String]) -> Option<Self> {
        let (mut seen, mut unseen) = (Vec::new(), Vec::new());
        for (task, v) in report.as_object()? {
            let Some(acc) = v.get("accuracy").and_then(Value::as_f64) else { continue };
            if task == "average" {
                continue;
            }
            if models.iter().any(|m| same_task(m, task)) {
                seen.push((task.clone(), acc));
            } else {
                unseen.push((task.clone(), acc));
            }
        }
        // Seen tasks in the pool's order, as the seed's tables list them.
        seen.sort_by_key(|(t, _)| models.iter().position(|m| same_task(m, t)));
        let average = report.get("average")?.get("accuracy")?.as_f64()?;
        (!seen.is_empty() && !unseen.is_empty()).then_some(Self { seen, unseen, average })
    }

    /// The seen tasks' mean accuracy.
    pub fn seen_average(&self) -> f64 {
        mean(&self.seen)
    }

    /// The unseen tasks' mean accuracy.
    pub fn unseen_average(&self) -> f64 {
        mean(&self.unseen)
    }

    /// The seed's table layout, accuracies in percent: seen tasks, their average, unseen tasks,
    /// their average; one row for `method`.
    pub fn table(&self, method: &str) -> String {
        let mut head = vec!["method".to_string()];
        let mut row = vec![method.to_string()];
        for (group, tasks, avg) in [
            ("seen", &self.seen, self.seen_average()),
            ("unseen", &self.unseen, self.unseen_average()),
        ] {
            for (t, a) in tasks {
                head.push(t.clone());
                row.push(format!("{:.1}", a * 100.0));
            }
            head.push(format!("{group} avg."));
            row.push(format!("{:.1}", avg * 100.0));
        }
        let widths: Vec<usize> =
            head.iter().zip(&row).map(|(h, r)| h.chars().count().max(r.len())).collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> =
                cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            format!("| {} |", padded.join(" | "))
        };
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        format!("{}\n{}\n{}\n", line(&head), line(&rule), line(&row))
    }

    /// A CSV of one row for `method`: each task's accuracy (as the report has it), the seen and
    /// unseen averages, and the report's overall average.
    pub fn csv(&self, method: &str) -> String {
        let mut head = vec!["method".to_string()];
        let mut row = vec![super::csv_field(method)];
        for (group, tasks, avg) in [
            ("seen", &self.seen, self.seen_average()),
            ("unseen", &self.unseen, self.unseen_average()),
        ] {
            for (t, a) in tasks {
                head.push(super::csv_field(&format!("{group}:{t}")));
                row.push(super::python_float_repr(*a));
            }
            head.push(format!("{group}_average"));
            row.push(super::python_float_repr(avg));
        }
        head.push("average".into());
        row.push(super::python_float_repr(self.average));
        format!("{}\n{}\n", head.join(","), row.join(","))
    }
}

/// Where the CSV of the report at `report` goes: beside it, `<stem>.seen_unseen.csv`.
pub fn csv_path(report: &Path) -> PathBuf {
    let stem = report.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    report.with_file_name(format!("{stem}.seen_unseen.csv"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        serde_json::json!({
            "model_info": {"all_params": 1},
            "sun397": {"accuracy": 0.5, "loss": 1.0},
            "mnist": {"accuracy": 0.25, "loss": 1.0},
            "dtd": {"accuracy": 0.75, "loss": 1.0},
            "eurosat": {"accuracy": 0.15, "loss": 1.0},
            "average": {"accuracy": 0.4125, "loss": 1.0},
        })
    }

    #[test]
    fn aliases_of_a_models_task_are_seen() {
        let report = serde_json::json!({
            "stanford_cars": {"accuracy": 0.5}, "eurosat": {"accuracy": 0.25},
            "mnist": {"accuracy": 0.75}, "average": {"accuracy": 0.5}
        });
        let models = ["stanford-cars".to_string(), "eurosat".to_string()];
        let s = SeenUnseen::of(&report, &models).unwrap();
        assert_eq!(s.seen, vec![("stanford_cars".into(), 0.5), ("eurosat".into(), 0.25)]);
        assert_eq!(s.unseen, vec![("mnist".into(), 0.75)]);
        let all =
            serde_json::json!({"stanford_cars": {"accuracy": 0.5}, "average": {"accuracy": 0.5}});
        assert!(SeenUnseen::of(&all, &models).is_none(), "no unseen task: no table");
    }

    #[test]
    fn splits_by_the_pools_models_and_averages_each_side() {
        // Seen tasks come in the pool's order.
        let models = ["_pretrained_".to_string(), "dtd".into(), "sun397".into()];
        let s = SeenUnseen::of(&report(), &models).unwrap();
        assert_eq!(s.seen, vec![("dtd".into(), 0.75), ("sun397".into(), 0.5)]);
        assert_eq!(s.unseen, vec![("mnist".into(), 0.25), ("eurosat".into(), 0.15)]);
        assert_eq!((s.seen_average(), s.unseen_average()), (0.625, (0.25 + 0.15) / 2.0));
        assert_eq!(
            s.csv("ties_merging"),
            "method,seen:dtd,seen:sun397,seen_average,unseen:mnist,unseen:eurosat,unseen_average,average\n\
             ties_merging,0.75,0.5,0.625,0.25,0.15,0.2,0.4125\n"
        );
        let table = s.table("ties_merging");
        assert!(
            table.contains("| dtd  | sun397 | seen avg. | mnist | eurosat | unseen avg. |"),
            "{table}"
        );
        assert!(
            table.contains("| 75.0 | 50.0   | 62.5      | 25.0  | 15.0    | 20.0        |"),
            "{table}"
        );
    }

    #[test]
    fn a_run_without_unseen_tasks_has_no_split() {
        let all: Vec<String> =
            ["sun397", "mnist", "dtd", "eurosat"].iter().map(|s| s.to_string()).collect();
        assert_eq!(SeenUnseen::of(&report(), &all), None);
        assert_eq!(SeenUnseen::of(&report(), &[]), None);
        assert_eq!(csv_path(Path::new("out/r.json")), PathBuf::from("out/r.seen_unseen.csv"));
    }
}
