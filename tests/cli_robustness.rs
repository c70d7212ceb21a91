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

/// The seed's table from one sweep: `corruption=test` (the clean test set) and two corruptions
/// by two methods give `robustness.md` in the seed's layout with FusionBench's accuracies in
/// percent, `robustness.csv` with each cell's accuracies, and `robustness.png`; a rerun computes
/// nothing and writes the same table.
#[test]
fn a_sweep_over_corruptions_writes_the_seeds_table() {
    let golden = root().join("tests/fixtures/golden/fusionbench_robustness");
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep");
    let args = words(&[
        "--config-name",
        "clip-vit-base-patch32_robustness_corrupted",
        "-m",
        "corruption=test,pixelate,motion_blur",
        "method=task_arithmetic,ties_merging",
        "fabric.accelerator=cpu",
        "print_config=false",
    ])
    .into_iter()
    .chain([format!("sweep_dir={}", sweep.display())])
    .collect::<Vec<_>>();
    let out = run(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(sweep.join("robustness.md")).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        lines[0],
        "| Method | Cars | EuroSAT | RESISC45 | GTSRB | Avg. | Cars | EuroSAT | RESISC45 | GTSRB | Avg. |"
    );
    // Blocks in the seed's order: clean beside motion blur, then pixelate.
    assert_eq!(lines[2], "|  | Clean Test set |  |  |  |  | Motion Blur |  |  |  |  |");
    assert_eq!(lines[5], "|  | Pixelate |  |  |  |  |  |  |  |  |  |");
    let pct = |v: &serde_json::Value| format!("{:.1}", 100.0 * v["accuracy"].as_f64().unwrap());
    for (row, name, title) in
        [(3, "task_arithmetic", "Task Arithmetic"), (4, "ties_merging", "Ties-Merging")]
    {
        let mut want = vec![title.to_string()];
        for split in ["clean", "motion_blur"] {
            let g = read(&golden.join(name).join(format!("{split}.json")));
            for task in ["stanford_cars", "eurosat", "resisc45", "gtsrb", "average"] {
                want.push(pct(&g[task]));
            }
        }
        assert_eq!(lines[row], format!("| {} |", want.join(" | ")), "{name}");
    }
    let csv = std::fs::read_to_string(sweep.join("robustness.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 3, "{csv}");
    let png = std::fs::read(sweep.join("robustness.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let out = run(dir.path(), &args);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(sweep.join("robustness.md")).unwrap(),
        md,
        "a rerun's table"
    );
}

/// Layer-wise AdaMerging on the corrupted pool adapts on the corrupted test images: with
/// `seed=42` its λ after 20 steps is FusionBench's within 1e-6 (but the `k_proj.bias` entries,
/// whose true gradient is zero: `tests/adamerging_parity.rs`), and so is its report.
#[test]
fn adamerging_on_corrupted_test_images_is_fusionbenchs() {
    let golden = root().join("tests/fixtures/golden/fusionbench_robustness/adamerging");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut a = line(
        "motion_blur",
        &[
            "method=adamerging/clip",
            "method.name=clip_layer_wise_adamerging",
            "method.max_steps=20",
            "seed=42",
            "method.save_merging_weights=merging_weights.pt",
            "fabric.loggers.root_dir=outputs/logs",
            "fabric.loggers.name=adamerging",
        ],
        &report,
    );
    a.push(format!("path.cache_dir={}", dir.path().join("cache").display()));
    let out = run(dir.path(), &a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let load = |p: &Path| fusion_bench::weights::torch_file::load_f32(p).unwrap();
    let (shape, ours) = load(&dir.path().join("outputs/logs/adamerging/merging_weights.pt"));
    let (want_shape, theirs) = load(&golden.join("motion_blur.merging_weights.pt"));
    assert_eq!(shape, want_shape);
    let trace = root().join("tests/fixtures/golden/fusionbench_adamerging/layer_wise.trace.json");
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trace).unwrap()).unwrap();
    let names: Vec<String> = serde_json::from_value(trace["parameter_names"].clone()).unwrap();
    assert_eq!(shape, [4, names.len()], "four tasks, one λ per parameter tensor");
    let (lr, steps) = (1e-3, 20.0);
    for (k, (x, y)) in ours.iter().zip(&theirs).enumerate() {
        let (x, y) = (f64::from(*x), f64::from(*y));
        if names[k % names.len()].ends_with("k_proj.bias") {
            let bound = lr * steps * 1.0001;
            assert!((x - 0.3).abs() <= bound && (y - 0.3).abs() <= bound, "λ[{k}]");
        } else {
            assert!(
                (x - y).abs() <= 1e-6,
                "λ[{k}] ({}): {x} vs FusionBench's {y}",
                names[k % names.len()]
            );
        }
    }
    common::assert_same_report(&read(&report), &read(&golden.join("motion_blur.json")));
}

/// The state dict of a WE-MoE `.ckpt` (`{"model": state_dict}`): names and float32 values.
fn ckpt_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    use fusion_bench::weights::torch_file::{self, TorchValue};
    let v = torch_file::load(path).unwrap();
    let Some(TorchValue::Dict(items)) = v.get("model") else { panic!("{}", path.display()) };
    items.iter().map(|(k, v)| (k.clone(), v.as_tensor().unwrap().to_f32().unwrap())).collect()
}

/// Dense WE-MoE on the corrupted pool (the robustness scripts' lr 5e-5) trains its routers on
/// the corrupted test images: with `seed=42` they agree with FusionBench's after 20 steps within
/// 1e-5 relative per tensor on the goldens' CPU, 1e-4 on another (its checkpoint, made through
/// the compatibility shim its stock CLI needs), every other tensor of the checkpoint is
/// FusionBench's, and so is the report.
#[test]
fn we_moe_on_corrupted_test_images_is_fusionbenchs() {
    let golden = root().join("tests/fixtures/golden/fusionbench_robustness/wemoe");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut a = line(
        "motion_blur",
        &[
            "method=wemoe/weight_ensembling_moe",
            "method.name=clip_weight_ensembling_moe",
            "method.use_grad_accumulate=false",
            "method.lr=5e-5",
            "method.max_steps=20",
            "seed=42",
            "method.save_checkpoint=model.ckpt",
        ],
        &report,
    );
    a.push(format!("path.cache_dir={}", dir.path().join("cache").display()));
    let out = run(dir.path(), &a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = ckpt_tensors(&dir.path().join("model.ckpt"));
    let theirs = ckpt_tensors(&golden.join("motion_blur.ckpt"));
    assert_eq!(
        ours.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        theirs.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "FusionBench's keys in its order"
    );
    let mut routers = 0;
    for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
        let tol = if name.contains(".mlp.gate.") {
            routers += 1;
            // Off the goldens' CPU the 20 Adam steps amplify BLAS's last bits (as in
            // tests/we_moe_parity.rs: FusionBench's own routers move 2.9e-5 between CPUs).
            if common::on_goldens_cpu(golden.parent().unwrap()) {
                1e-5
            } else {
                1e-4
            }
        } else {
            1e-6
        };
        assert!(
            diff <= tol * scale,
            "{name}: max|ours - FusionBench| = {diff:e}, max|FusionBench| = {scale:e}"
        );
    }
    assert!(routers > 0, "no router in the checkpoint");
    common::assert_same_report(&read(&report), &read(&golden.join("motion_blur.json")));
}
