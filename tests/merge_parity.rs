//! Data-free merges equal FusionBench 0.2.33's bit for bit on the bundled fixtures: the seed's
//! command lines with `taskpool=dummy merged_model_save_path=…`, against the merged models
//! FusionBench saved (`scripts/fixtures/golden_fusionbench_merge.sh`; `machine.json` there
//! says on which machine and under which ATen CPU capability): the same tensor names as the
//! golden file's header, and the same bytes for each.

use fusion_bench::models::clip::load_vision_weights;
use std::path::PathBuf;
use std::process::Command;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn merge_and_compare(golden: &str, method_args: &[&str]) {
    merge_and_compare_with(golden, method_args, &["taskpool=dummy"]);
}

/// With `taskpool=dummy` the merge streams to disk; with a task pool it is kept in memory for
/// the evaluation and saved from there: both paths must give FusionBench's tensors.
fn merge_and_compare_with(golden: &str, method_args: &[&str], taskpool: &[&str]) {
    merge_and_compare_in(golden, method_args, taskpool, None);
}

/// The same, with `ATEN_CPU_CAPABILITY` set to `capability` in our binary's environment (else
/// this process's, whatever it is).
fn merge_and_compare_in(
    golden: &str,
    method_args: &[&str],
    taskpool: &[&str],
    capability: Option<&str>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    if let Some(c) = capability {
        cmd.env("ATEN_CPU_CAPABILITY", c);
    }
    let out = cmd
        .args(method_args)
        .args(["modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8", "print_config=false"])
        .args(taskpool)
        .arg(format!("report_save_path={}", tmp.path().join("report.json").display()))
        .arg(format!("merged_model_save_path={}", out_dir.display()))
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("RUST_LOG", "warn")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // By the names in the golden file's header, every tensor's bytes.
    let want = root().join("tests/fixtures/golden/fusionbench_merge").join(golden);
    let n = common::assert_same_safetensors(
        &out_dir.join("model.safetensors"),
        &want.join("model.safetensors"),
    );
    // All of them are the vision tower's parameters, loadable as a model.
    let (cfg, _) = load_vision_weights(&out_dir).unwrap();
    let expected = fusion_bench::models::clip::vision::parameter_names(&cfg).len();
    assert_eq!(n, expected, "{golden}: tensors compared");
}

#[test]
fn simple_average_matches_fusionbench_bitwise() {
    merge_and_compare("simple_average", &["method=simple_average"]);
}

#[test]
fn task_arithmetic_matches_fusionbench_bitwise() {
    merge_and_compare("task_arithmetic", &["method=task_arithmetic", "method.scaling_factor=0.3"]);
    merge_and_compare(
        "task_arithmetic_0.7",
        &["method=task_arithmetic", "method.scaling_factor=0.7"],
    );
}

#[test]
fn ties_merging_matches_fusionbench_bitwise() {
    let seed = ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"];
    merge_and_compare("ties_merging", &seed);
    let mean = [
        "method=ties_merging",
        "method.scaling_factor=0.5",
        "method.threshold=0.3",
        "method.merge_func=mean",
    ];
    merge_and_compare("ties_merging_mean_0.5", &mean);
    let max = [
        "method=ties_merging",
        "method.scaling_factor=0.7",
        "method.threshold=50",
        "method.merge_func=max",
    ];
    merge_and_compare("ties_merging_max_0.7", &max);
}

const TIES: [&str; 3] = ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"];

/// The pool without mnist and dtd: T = 6 task vectors, not a multiple of 4, so the reduction
/// tail's lanes take leftover rows.
const T6: [&str; 3] = ["taskpool=dummy", "~modelpool.models.mnist", "~modelpool.models.dtd"];

/// The pool with twelve more copies of its models: T = 20, so libtorch adds the rows in a group
/// of 16 and the last four before it, not left to right.
fn t20() -> Vec<String> {
    let tasks = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"];
    let copies = (1..=12).map(|i| {
        format!("+modelpool.models.copy{i}=tanganke/clip-vit-base-patch32_{}", tasks[(i - 1) % 8])
    });
    std::iter::once("taskpool=dummy".to_string()).chain(copies).collect()
}

#[test]
fn ties_merging_matches_fusionbench_for_6_and_20_tasks() {
    merge_and_compare_with("ties_merging_T6", &TIES, &T6);
    let t20 = t20();
    merge_and_compare_with(
        "ties_merging_T20",
        &TIES,
        &t20.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// FusionBench's merges made under `ATEN_CPU_CAPABILITY=default`, against ours with the same
/// variable: our binary must follow the capability libtorch dispatches to.
#[test]
fn ties_merging_matches_fusionbench_under_the_default_capability() {
    let dummy = ["taskpool=dummy"];
    let default = Some("default");
    merge_and_compare_in("cpu_default/ties_merging", &TIES, &dummy, default);
    let mean = [
        "method=ties_merging",
        "method.scaling_factor=0.5",
        "method.threshold=0.3",
        "method.merge_func=mean",
    ];
    merge_and_compare_in("cpu_default/ties_merging_mean_0.5", &mean, &dummy, default);
    let max = [
        "method=ties_merging",
        "method.scaling_factor=0.7",
        "method.threshold=50",
        "method.merge_func=max",
    ];
    merge_and_compare_in("cpu_default/ties_merging_max_0.7", &max, &dummy, default);
    merge_and_compare_in("cpu_default/ties_merging_T6", &TIES, &T6, default);
    let t20 = t20();
    let t20: Vec<&str> = t20.iter().map(String::as_str).collect();
    merge_and_compare_in("cpu_default/ties_merging_T20", &TIES, &t20, default);
}

#[test]
fn merges_kept_in_memory_for_evaluation_match_too() {
    let eval = [
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "~taskpool.test_datasets.sun397",
        "~taskpool.test_datasets.stanford-cars",
        "~taskpool.test_datasets.resisc45",
        "~taskpool.test_datasets.svhn",
        "~taskpool.test_datasets.gtsrb",
        "~taskpool.test_datasets.mnist",
        "~taskpool.test_datasets.dtd",
        "fast_dev_run=true",
    ];
    merge_and_compare_with(
        "ties_merging",
        &["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"],
        &eval,
    );
    merge_and_compare_with(
        "task_arithmetic",
        &["method=task_arithmetic", "method.scaling_factor=0.3"],
        &eval,
    );
}
