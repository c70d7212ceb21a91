//! The image-classification tasks: class names and prompt templates exactly as FusionBench's
//! `fusion_bench.tasks.clip_classification` (extracted into `tasks.json` by
//! `scripts/fixtures/extract_tasks.py`), zero-shot heads and evaluation metrics.

pub mod metrics;
pub mod set;
pub mod zeroshot;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// A task's class names (index = label id) and prompt templates (`{}` = the class name).
#[derive(Debug, Clone, Deserialize)]
pub struct TaskSpec {
    /// Class names, in label order.
    pub classnames: Vec<String>,
    /// Templates such as `a photo of a {}.`.
    pub templates: Vec<String>,
}

impl TaskSpec {
    /// The prompts of one class, one per template.
    pub fn prompts(&self, class: usize) -> Vec<String> {
        self.templates.iter().map(|t| t.replace("{}", &self.classnames[class])).collect()
    }
}

/// Errors looking up a task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No task has this name.
    #[error("unknown task `{name}`; known tasks: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The canonical names available.
        known: String,
    },
}

fn registry() -> &'static BTreeMap<String, TaskSpec> {
    static TASKS: OnceLock<BTreeMap<String, TaskSpec>> = OnceLock::new();
    TASKS.get_or_init(|| {
        serde_json::from_str(include_str!("tasks.json")).expect("tasks.json is valid (built in)")
    })
}

/// FusionBench's `CLIPTemplateFactory` aliases: the canonical task name of `name`.
pub fn canonical_name(name: &str) -> Option<&'static str> {
    let n = name.strip_prefix("tanganke/").unwrap_or(name);
    Some(match n {
        "sun397" => "sun397",
        "stanford-cars" | "stanford_cars" => "stanford-cars",
        "resisc45" => "resisc45",
        "eurosat" => "eurosat",
        "svhn" | "ufldl-stanford/svhn" => "svhn",
        "gtsrb" => "gtsrb",
        "mnist" | "ylecun/mnist" => "mnist",
        "dtd" => "dtd",
        _ => return None,
    })
}

/// The spec of task `name` (any FusionBench alias).
pub fn task(name: &str) -> Result<&'static TaskSpec, TaskError> {
    canonical_name(name).and_then(|c| registry().get(c)).ok_or_else(|| TaskError::Unknown {
        name: name.to_string(),
        known: registry().keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// The eight tasks of FusionBench's TA8 pools, in their config order.
pub const TA8: [&str; 8] =
    ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_eight_tasks_have_fusionbench_sizes() {
        let sizes = [397, 196, 45, 10, 10, 43, 10, 47];
        let templates = [2, 8, 18, 3, 1, 3, 1, 8];
        for ((name, n), t) in TA8.iter().zip(sizes).zip(templates) {
            let spec = task(name).unwrap();
            assert_eq!((spec.classnames.len(), spec.templates.len()), (n, t), "{name}");
        }
        assert_eq!(task("tanganke/stanford_cars").unwrap().classnames.len(), 196);
        assert_eq!(task("mnist").unwrap().prompts(3), vec!["a photo of the number: \"3\"."]);
        let e = task("cifar1000").unwrap_err().to_string();
        assert!(e.contains("cifar1000") && e.contains("sun397"), "{e}");
    }
}
