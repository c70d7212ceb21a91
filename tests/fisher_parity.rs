//! Fisher merging against FusionBench 0.2.33's own runs on the bundled fixtures
//! (`tests/fixtures/golden/fusionbench_fisher/`, made by
//! `scripts/fixtures/golden_fusionbench_fisher.sh` on the machine its `machine.json` names): the
//! seed's command line with the defaults, with a smaller batch and example count, and with the
//! merge's switches changed and parameters excluded. Each model's Fisher (cached by us under
//! `path.cache_dir/fisher/`, recorded from FusionBench by `fb_fisher_hooks.py`) agrees tensor by
//! tensor within 1e-5 relative, the merged model within 1e-5 relative, the report as FusionBench's
//! (accuracies equal, losses within 2⁻¹⁶). A rerun reuses the cached statistics, also for other
//! merge settings; bad settings are refused naming the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

/// Relative tolerance of a Fisher or merged tensor against FusionBench's: max|ours − theirs| over
/// max|theirs| (BLAS may differ in the last bits between CPUs).
const REL_TOL: f64 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> PathBuf {
    root().join("tests/fixtures/golden/fusionbench_fisher")
}

const TASKS: [&str; 8] =
    ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"];

/// Our run of the seed's Fisher line plus `extra`, in `dir` (cache, merged model, report).
fn run(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args([
            "method=fisher_merging/clip_fisher_merging",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
            "fabric.accelerator=cpu",
            "print_config=false",
        ])
        .args(extra)
        .arg(format!("path.cache_dir={}", dir.join("cache").display()))
        .arg(format!("merged_model_save_path={}", dir.join("merged").display()))
        .arg(format!("report_save_path={}", dir.join("report.json").display()))
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A Fisher tensor's scale is at least this much of its file's largest value: the Fisher of
/// `k_proj.bias` (a gradient the softmax cancels) is float32 rounding noise, about 1e-16 of the
/// largest Fisher value, whose bits change with the summation order (ours, FusionBench's, or
/// FusionBench's on another CPU: 1e-3 apart relative, measured between an Intel Xeon and an AMD
/// EPYC), so it must only stay at that noise level.
const NOISE_FLOOR: f64 = 1e-6;

/// Every tensor of `golden` (by name) against the same tensor of `ours`, within [`REL_TOL`]
/// ([`NOISE_FLOOR`] of the file's largest value at least).
fn assert_close(ours: &Path, golden: &Path) -> usize {
    common::assert_close_safetensors_floor(ours, golden, REL_TOL, NOISE_FLOOR, &|n| n.to_string())
}

/// Our cached Fisher of `model` in `dir`.
fn cached_fisher(dir: &Path, model: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir.join("cache/fisher"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with(&format!("{model}-")) && n.ends_with(".safetensors")
        })
        .collect();
    assert_eq!(found.len(), 1, "one cached Fisher of `{model}`: {found:?}");
    found[0].clone()
}

fn check(run_name: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), extra);
    assert!(out.status.success(), "{run_name}: {}", String::from_utf8_lossy(&out.stderr));
    let g = golden().join(run_name);
    for task in TASKS {
        let n = assert_close(
            &cached_fisher(dir.path(), task),
            &g.join(format!("fisher_{task}.safetensors")),
        );
        assert!(n > 0);
    }
    assert_close(&dir.path().join("merged/model.safetensors"), &g.join("model.safetensors"));
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    common::assert_same_report(
        &read(&dir.path().join("report.json")),
        &read(&golden().join(format!("{run_name}.report.json"))),
    );
    dir
}

#[test]
fn the_seeds_fisher_line_gives_fusionbenchs_fishers_model_and_report() {
    let dir = check("default", &[]);
    // A rerun and a run with other merge settings reuse every model's statistics.
    let first = std::fs::read(dir.path().join("merged/model.safetensors")).unwrap();
    for extra in [&[][..], &["method.minimal_fisher_weight=1e-4"][..]] {
        let out = run(dir.path(), extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(err.matches("Fisher reused from the cache").count(), 8, "{extra:?}: {err}");
        assert!(!err.contains("Fisher computed"), "{extra:?}: recomputed: {err}");
        let again = std::fs::read(dir.path().join("merged/model.safetensors")).unwrap();
        assert_eq!(
            extra.is_empty(),
            again == first,
            "{extra:?}: the merge changes with its settings only"
        );
    }
    // A NaN in a cached Fisher is refused, naming the model, the tensor and the file, before
    // anything is written.
    let file = cached_fisher(dir.path(), "svhn");
    common::poison_safetensors(&file, "vision_model.encoder.layers.0.mlp.fc1.weight");
    std::fs::remove_dir_all(dir.path().join("merged")).unwrap();
    std::fs::remove_file(dir.path().join("report.json")).unwrap();
    let out = run(dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a NaN Fisher was merged");
    for named in
        ["`svhn`", "`vision_model.encoder.layers.0.mlp.fc1.weight`", &file.display().to_string()]
    {
        assert!(err.contains(named), "the error names {named}:\n{err}");
    }
    assert!(!dir.path().join("merged").exists() && !dir.path().join("report.json").exists());
}

#[test]
fn smaller_batches_stop_where_fusionbench_stops() {
    // 40 examples in batches of 16: the stop test comes before each batch, so 48 images.
    let dir = check(
        "bs16_n40",
        &["method.dataloader_kwargs.batch_size=16", "method.num_fisher_examples=40"],
    );
    let file = cached_fisher(dir.path(), "dtd");
    let bytes = std::fs::read(&file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("images")).map(String::as_str),
        Some("48")
    );
}

#[test]
fn excluded_parameters_stay_pretrained_and_the_merge_switches_match() {
    check(
        "exclude",
        &[
            "method.normalize_fisher_weight=false",
            "method.minimal_fisher_weight=1e-4",
            "method.exclude_param_names_regex=['.*layer_norm.*','vision_model.embeddings.*']",
        ],
    );
}

#[test]
fn bad_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // Without train_datasets the test datasets' clean train splits serve (the corrupted
    // robustness pool: tests/cli_robustness.rs); without either, nothing does.
    let no_datasets = ["~modelpool.train_datasets", "~modelpool.test_datasets"];
    for (extra, named) in [
        (&["method.num_fisher_examples=0"][..], "method.num_fisher_examples"),
        (&["method.dataloader_kwargs.batch_size=0"][..], "method.dataloader_kwargs.batch_size"),
        (&["method.minimal_fisher_weight=-1"][..], "method.minimal_fisher_weight"),
        (
            &["method.exclude_param_names_regex=['(unclosed']"][..],
            "method.exclude_param_names_regex",
        ),
        (&no_datasets[..], "modelpool.train_datasets"),
    ] {
        let out = run(dir.path(), extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(named), "{extra:?}: the error names `{named}`:\n{err}");
        assert!(!err.contains("panicked"), "{extra:?}: a panic:\n{err}");
        assert!(!dir.path().join("report.json").exists());
    }
}

/// A coordinator and two workers (also with one worker killed once the first statistics are
/// in the cache): one model's Fisher per work item, written into the shared cache; every process
/// merges the same model and the workers join its evaluation. The merged model and the report
/// are the single process's, byte for byte.
#[test]
fn three_processes_share_out_the_models_and_give_the_single_process_result() {
    common::cluster::assert_statistics_job_gives_the_single_process_result(
        &["method=fisher_merging/clip_fisher_merging"],
        "fisher",
        common::cluster::FISHER,
    );
}

/// Without a cache (`path.cache_dir=null`) every model's Fisher is held for the merge instead of
/// read back tensor by tensor from the cache files: the same merged model, byte for byte.
#[test]
fn without_a_cache_the_fishers_stay_in_memory_and_merge_the_same() {
    let cached = tempfile::tempdir().unwrap();
    let out = run(cached.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args([
            "method=fisher_merging/clip_fisher_merging",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=dummy",
            "fabric.accelerator=cpu",
            "print_config=false",
            "path.cache_dir=null",
        ])
        .arg(format!("merged_model_save_path={}", dir.path().join("merged").display()))
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !dir.path().join("cache").exists() && !dir.path().join("outputs/cache/fisher").exists()
    );
    common::assert_same_safetensors(
        &dir.path().join("merged/model.safetensors"),
        &cached.path().join("merged/model.safetensors"),
    );
}
