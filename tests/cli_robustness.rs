//! End to end: the seed's robustness command lines on the bundled fixtures, whose four datasets
//! carry FusionBench's seven corrupted splits (`scripts/fixtures/gen_corrupted_splits.py`):
//! the clean pool (`modelpool=…_robustness_clean taskpool=clip-vit-base-patch32_robustness_clean`,
//! the v0.1 task pool) and `--config-name clip-vit-base-patch32_robustness_corrupted
//! corruption=<c>` give FusionBench 0.2.33's reports
//! (`tests/fixtures/golden/fusionbench_robustness/<method>/<split>.json`, made by
//! `scripts/fixtures/golden_fusionbench_robustness.sh`); Fisher merging and RegMean, which crash
//! on FusionBench's corrupted pool (it has no training sets), run there on the clean training
//! splits and merge what they merge on the clean pool.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const CORRUPTIONS: [&str; 7] = [
    "contrast",
    "gaussian_noise",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "spatter",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cwd: &Path, args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(args)
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env_remove("HF_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_BACKTRACE", "0")
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The seed's line for `split` (`clean` or a corruption) with `method`, writing `report`.
fn line(split: &str, method: &[&str], report: &Path) -> Vec<String> {
    let mut a = if split == "clean" {
        words(&[
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_clean",
            "taskpool=clip-vit-base-patch32_robustness_clean",
        ])
    } else {
        vec![
            "--config-name".into(),
            "clip-vit-base-patch32_robustness_corrupted".into(),
            format!("corruption={split}"),
        ]
    };
    a.extend(words(method));
    a.extend(words(&["fabric.accelerator=cpu", "print_config=false"]));
    a.push(format!("report_save_path={}", report.display()));
    a
}

fn read(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_seeds_robustness_lines_give_fusionbenchs_reports() {
    let golden = root().join("tests/fixtures/golden/fusionbench_robustness");
    let dir = tempfile::tempdir().unwrap();
    let methods: [(&str, &[&str]); 3] = [
        ("task_arithmetic", &["method=task_arithmetic", "method.scaling_factor=0.3"]),
        (
            "ties_merging",
            &["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"],
        ),
        ("simple_average", &["method=simple_average"]),
    ];
    let mut compared = 0;
    for (name, method) in methods {
        for split in std::iter::once("clean").chain(CORRUPTIONS) {
            let report = dir.path().join(format!("{name}-{split}.json"));
            let out = run(dir.path(), &line(split, method, &report));
            assert!(
                out.status.success(),
                "{name} {split}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (ours, theirs) =
                (read(&report), read(&golden.join(name).join(format!("{split}.json"))));
            let keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["model_info", "stanford_cars", "eurosat", "resisc45", "gtsrb", "average"],
                "{name} {split}: the v0.1 task pool's report keys"
            );
            common::assert_same_report(&ours, &theirs);
            compared += 1;
        }
    }
    assert_eq!(compared, 24);
}

/// The corrupted pool's splits are what its name says: a corrupted split's report differs from
/// the clean one (the images are not the test images), and an unknown corruption is refused
/// naming the dataset and the split.
#[test]
fn corruptions_change_the_images_and_a_missing_split_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ta = ["method=task_arithmetic", "method.scaling_factor=0.3"];
    let clean = dir.path().join("clean.json");
    assert!(run(dir.path(), &line("clean", &ta, &clean)).status.success());
    let pixelate = dir.path().join("pixelate.json");
    assert!(run(dir.path(), &line("pixelate", &ta, &pixelate)).status.success());
    assert_ne!(read(&clean)["gtsrb"], read(&pixelate)["gtsrb"]);
    let fog = dir.path().join("fog.json");
    let out = run(dir.path(), &line("fog", &ta, &fog));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tanganke/stanford_cars") && err.contains("fog"), "{err}");
    assert!(!fog.exists(), "no report after a failure");
}

/// Fisher merging and RegMean on the corrupted pool (no `train_datasets`) read the clean `train`
/// split of each dataset: the model they merge is the clean pool's, byte for byte, and its
/// clean-pool report is FusionBench's (which has training sets there).
#[test]
fn fisher_and_regmean_merge_on_the_clean_training_splits_of_the_corrupted_pool() {
    let golden = root().join("tests/fixtures/golden/fusionbench_robustness");
    let dir = tempfile::tempdir().unwrap();
    let methods: [(&str, &[&str]); 2] = [
        ("fisher_merging", &["method=fisher_merging/clip_fisher_merging"]),
        ("regmean", &["method=regmean/clip_regmean", "seed=42"]),
    ];
    for (name, method) in methods {
        let mut merged = Vec::new();
        for split in ["clean", "motion_blur"] {
            let report = dir.path().join(format!("{name}-{split}.json"));
            let save = dir.path().join(format!("{name}-{split}-model"));
            let mut a = line(split, method, &report);
            a.push(format!("merged_model_save_path={}", save.display()));
            let out = run(dir.path(), &a);
            assert!(
                out.status.success(),
                "{name} {split}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            merged.push(std::fs::read(save.join("model.safetensors")).unwrap());
            if split == "clean" {
                let theirs = read(&golden.join(name).join("clean.json"));
                common::assert_same_report(&read(&report), &theirs);
            }
        }
        assert!(merged[0] == merged[1], "{name}: the corrupted pool merged another model");
    }
}
