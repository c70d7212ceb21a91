//! The sweep's summary: one row per cell (`summary.csv`) and a printed table.

use super::Cell;
use serde_json::Value;

/// A cell's line in the summary.
#[derive(Debug, Clone)]
pub struct Row {
    pub(super) cell: Cell,
    key: String,
    status: &'static str,
    pub(super) report: Option<Value>,
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

    pub(super) fn accuracy(&self, task: &str) -> Option<f64> {
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
