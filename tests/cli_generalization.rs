//! The seed's generalization experiments on the fixtures: the
//! `clip-vit-base-patch32_generalization_exp1` and `_exp2` model pools (six seen tasks) merged by
//! every method of the seed's generalization tables (pre-trained, Fisher, RegMean, task
//! arithmetic λ=0.3, TIES λ=0.3 threshold 20, layer-wise AdaMerging, WE-MoE with FusionBench's
//! script's `method.lr=2e-3 method.use_grad_accumulate=false`; the training methods for a few
//! steps) and evaluated on all eight tasks. The report stays FusionBench's (eight tasks and their
//! mixed average); a table on stderr and a CSV beside the report add the seen and unseen averages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(experiment, seen tasks in the pool's order, unseen tasks)`.
const EXPERIMENTS: [(&str, [&str; 6], [&str; 2]); 2] = [
    ("exp1", ["sun397", "stanford-cars", "resisc45", "dtd", "svhn", "gtsrb"], ["eurosat", "mnist"]),
    ("exp2", ["sun397", "stanford-cars", "gtsrb", "eurosat", "dtd", "mnist"], ["resisc45", "svhn"]),
];

const METHODS: [&str; 7] = [
    "method=dummy",
    "method=fisher_merging/clip_fisher_merging",
    "method=regmean/clip_regmean",
    "method=task_arithmetic method.scaling_factor=0.3",
    "method=ties_merging method.scaling_factor=0.3 method.threshold=20",
    "method=adamerging method.name=clip_layer_wise_adamerging method.max_steps=2",
    "method=weight_ensembling_moe method.name=clip_weight_ensembling_moe method.lr=2e-3 \
     method.use_grad_accumulate=false method.max_steps=2",
];

fn run(dir: &Path, words: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(words)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("RUST_LOG", "warn")
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{words:?}:\n{err}");
    err
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn both_generalization_pools_run_with_every_method_and_split_seen_from_unseen() {
    let dir = tempfile::tempdir().unwrap();
    for (exp, seen, unseen) in EXPERIMENTS {
        for (i, method) in METHODS.iter().enumerate() {
            let report = dir.path().join(format!("{exp}_{i}.json"));
            let mut words: Vec<String> = method.split_whitespace().map(String::from).collect();
            words.extend([
                format!("modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_{exp}"),
                "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8".into(),
                "fabric.accelerator=cpu".into(),
                "print_config=false".into(),
                "seed=42".into(),
                format!("report_save_path={}", report.display()),
            ]);
            let err = run(dir.path(), &words);
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            // FusionBench's report: eight tasks, the average over all of them.
            let acc = |t: &str| r[t]["accuracy"].as_f64().unwrap_or_else(|| panic!("{t}: {r}"));
            let all: Vec<f64> = seen.iter().chain(&unseen).map(|t| acc(t)).collect();
            assert_eq!(all.len(), 8);
            let average = r["average"]["accuracy"].as_f64().unwrap();
            assert!((average - mean(&all)).abs() < 1e-12, "{exp} {method}: the mixed average");
            // The CSV beside it: each side's tasks and average, then the report's.
            let csv =
                std::fs::read_to_string(dir.path().join(format!("{exp}_{i}.seen_unseen.csv")))
                    .unwrap_or_else(|e| panic!("{exp} {method}: no CSV: {e}"));
            let lines: Vec<&str> = csv.lines().collect();
            assert_eq!(lines.len(), 2, "{csv}");
            let head: Vec<&str> = lines[0].split(',').collect();
            let mut want = vec!["method".to_string()];
            want.extend(seen.iter().map(|t| format!("seen:{t}")));
            want.push("seen_average".into());
            want.extend(unseen.iter().map(|t| format!("unseen:{t}")));
            want.extend(["unseen_average".to_string(), "average".into()]);
            assert_eq!(head, want, "{exp} {method}");
            let values: Vec<f64> =
                lines[1].split(',').skip(1).map(|v| v.parse().unwrap()).collect();
            let seen_acc: Vec<f64> = seen.iter().map(|t| acc(t)).collect();
            let unseen_acc: Vec<f64> = unseen.iter().map(|t| acc(t)).collect();
            assert_eq!(values[..6], seen_acc[..], "{exp} {method}");
            assert_eq!(values[6], mean(&seen_acc), "{exp} {method}: seen average");
            assert_eq!(values[7..9], unseen_acc[..], "{exp} {method}");
            assert_eq!(values[9], mean(&unseen_acc), "{exp} {method}: unseen average");
            assert_eq!(values[10], average, "{exp} {method}: the report's average");
            assert!(
                err.contains("seen avg.") && err.contains("unseen avg."),
                "{exp} {method}: the table:\n{err}"
            );
        }
    }
}

/// The TA8 pool has a model for every task: no split, no CSV.
#[test]
fn a_pool_covering_every_task_writes_no_split() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let words: Vec<String> = [
        "method=task_arithmetic",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "fabric.accelerator=cpu",
        "print_config=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("report_save_path={}", report.display())])
    .collect();
    let err = run(dir.path(), &words);
    assert!(report.exists());
    assert!(!dir.path().join("r.seen_unseen.csv").exists());
    assert!(!err.contains("unseen avg."), "{err}");
}
