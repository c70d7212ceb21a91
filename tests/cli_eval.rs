//! End to end: the `fusion_bench` binary, given FusionBench's own `method=dummy` command lines,
//! reproduces FusionBench 0.2.33's reports on the bundled fixtures
//! (`tests/fixtures/golden/fusionbench_dummy/*.json`, made by
//! `scripts/fixtures/golden_fusionbench_dummy.sh` on the machine its `machine.json` names).
//!
//! Accuracies are counts, so they are equal; losses come from logits computed through BLAS,
//! whose last bits depend on the CPU, so they are compared within [`LOSS_REL_TOL`]. Everything
//! else in the file (keys and their order, accuracies, `model_info`, separators, float format)
//! is compared byte for byte, with only the loss numbers masked.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

/// Relative tolerance on a loss, 2⁻¹⁶ (128 fp32 ulps of the loss). A worst-case bound follows
/// from the CLIP forward's tolerance (`tests/clip_parity.rs`: 16 fp32 ulps of exp(logit_scale) =
/// 100): cross-entropy moves by at most 2 (1 − p) ≤ 2 · CE times the largest logit error, so its
/// relative error is at most 2 · 16 · 2⁻¹⁷ = 2⁻¹². Per-image errors have both signs and mostly
/// cancel in the mean over a split (≥ 64 images): measured 5.6e-7 (about 5 ulps) on an AMD EPYC
/// against goldens made on another CPU (README), so 2⁻¹⁶ keeps a margin of 27.
const LOSS_REL_TOL: f64 = 1.0 / 65536.0;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(hf_home: &Path, args: &[String]) -> std::process::Output {
    run_with_env(hf_home, args, &[])
}

/// Runs the binary from the repository root on the hub cache `hf_home`; `env` may override
/// `RUST_LOG` (default `warn`) or add variables.
fn run_with_env(hf_home: &Path, args: &[String], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn dummy_args(model: &str, report: &Path) -> Vec<String> {
    vec![
        "method=dummy".into(),
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual".into(),
        format!("modelpool.models._pretrained_={model}"),
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8".into(),
        "fabric.accelerator=cpu".into(),
        "print_config=false".into(),
        format!("report_save_path={}", report.display()),
    ]
}

/// `text` with every `"loss": <number>` replaced by `"loss": _`, and the numbers in order.
fn mask_losses(text: &str) -> (String, Vec<f64>) {
    const KEY: &str = "\"loss\": ";
    let (mut masked, mut losses, mut rest) = (String::new(), Vec::new(), text);
    while let Some(i) = rest.find(KEY) {
        let (head, tail) = rest.split_at(i + KEY.len());
        let end = tail.find([',', '}']).unwrap_or(tail.len());
        losses.push(tail[..end].parse().unwrap_or_else(|e| panic!("loss `{}`: {e}", &tail[..end])));
        masked.push_str(head);
        masked.push('_');
        rest = &tail[end..];
    }
    masked.push_str(rest);
    (masked, losses)
}

/// Returns the largest relative loss difference.
fn compare(ours: &str, theirs: &str, what: &str) -> f64 {
    let (o, t): (Value, Value) =
        (serde_json::from_str(ours).unwrap(), serde_json::from_str(theirs).unwrap());
    let (o, t) = (o.as_object().unwrap(), t.as_object().unwrap());
    let ok: Vec<_> = o.keys().collect();
    let tk: Vec<_> = t.keys().collect();
    assert_eq!(ok, tk, "{what}: report keys or their order differ");
    assert_eq!(o["model_info"], t["model_info"], "{what}: model_info");
    let tasks: Vec<_> = tk.iter().filter(|k| **k != "model_info").collect();
    assert_eq!(tasks.len(), 9, "{what}: eight tasks and the average");
    for key in &tasks {
        assert_eq!(o[**key]["accuracy"], t[**key]["accuracy"], "{what}: {key} accuracy");
    }
    let (masked_o, lo) = mask_losses(ours);
    let (masked_t, lt) = mask_losses(theirs);
    assert_eq!(masked_o, masked_t, "{what}: the reports differ outside the loss values");
    assert_eq!((lo.len(), lt.len()), (tasks.len(), tasks.len()), "{what}: one loss per entry");
    let mut worst = 0f64;
    for ((key, a), b) in tasks.iter().zip(&lo).zip(&lt) {
        let rel = (a - b).abs() / b.abs();
        assert!(
            rel <= LOSS_REL_TOL,
            "{what}: {key} loss {a} vs FusionBench {b} (relative {rel:e})"
        );
        worst = worst.max(rel);
    }
    worst
}

/// The pretrained model and the eight fine-tuned ones, as FusionBench's goldens name them.
fn golden_models() -> Vec<(String, String)> {
    let mut v = vec![("clip-vit-base-patch32".to_string(), "openai/clip-vit-base-patch32".into())];
    for task in fusion_bench::tasks::TA8 {
        let stem = format!("clip-vit-base-patch32_{task}");
        v.push((stem.clone(), format!("tanganke/{stem}")));
    }
    v
}

#[test]
fn dummy_reports_match_fusionbench() {
    let golden = root().join("tests/fixtures/golden/fusionbench_dummy");
    let hf_home = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    // The golden folder holds exactly these reports (and its versions and machine records).
    let mut files: Vec<String> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let models = golden_models();
    let mut want: Vec<String> = models.iter().map(|(stem, _)| format!("{stem}.json")).collect();
    want.extend(["machine.json".into(), "versions.json".into()]);
    want.sort();
    assert_eq!(files, want, "the golden reports in {}", golden.display());
    let mut n = 0;
    let mut worst = 0f64;
    for (stem, model) in &models {
        let report = tmp.path().join(format!("{stem}.json"));
        let out = run(&hf_home, &dummy_args(model, &report));
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        let ours = std::fs::read_to_string(&report).unwrap();
        let theirs = std::fs::read_to_string(golden.join(format!("{stem}.json"))).unwrap();
        worst = worst.max(compare(&ours, &theirs, model));
        n += 1;
    }
    assert_eq!(n, 9, "the pretrained and eight fine-tuned goldens");
    println!(
        "{n} reports: accuracies equal, losses within {worst:.2e} relative = {:.1} fp32 ulps \
         (tolerance {LOSS_REL_TOL:.2e})",
        worst / f64::from(f32::EPSILON)
    );
}

/// The byte comparison of saved models tells -0.0 from 0.0 and a renamed tensor from the golden's.
#[test]
fn safetensors_comparison_is_by_bytes_and_golden_names() {
    use safetensors::{serialize_to_file, tensor::TensorView, Dtype};
    let tmp = tempfile::tempdir().unwrap();
    let write = |file: &str, name: &str, values: &[f32]| {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![values.len()], &bytes).unwrap();
        let path = tmp.path().join(file);
        serialize_to_file([(name, view)], None, &path).unwrap();
        path
    };
    let golden = write("golden.safetensors", "w", &[1.5, 0.0]);
    assert_eq!(common::assert_same_safetensors(&write("same", "w", &[1.5, 0.0]), &golden), 1);
    for ours in [write("negzero", "w", &[1.5, -0.0]), write("renamed", "v", &[1.5, 0.0])] {
        let r = std::panic::catch_unwind(|| common::assert_same_safetensors(&ours, &golden));
        assert!(r.is_err(), "{} passed", ours.display());
    }
}

#[test]
fn loss_masking_keeps_everything_else() {
    let (m, l) = mask_losses(r#"{"a": {"accuracy": 0.5, "loss": 1.25}, "b": {"loss": 3e-05}}"#);
    assert_eq!(m, r#"{"a": {"accuracy": 0.5, "loss": _}, "b": {"loss": _}}"#);
    assert_eq!(l, [1.25, 3e-5]);
}

#[test]
fn broken_dataset_names_dataset_and_file_and_writes_no_report() {
    let src = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf_home");
    common::copy_dir(&src, &hf_home);
    // Corrupt every parquet file of DTD (the last task) so that earlier tasks succeed first.
    let dtd = hf_home.join("hub/datasets--tanganke--dtd");
    let mut corrupted = 0;
    for f in common::walk(&dtd).into_iter().filter(|p| p.to_string_lossy().contains("test-")) {
        std::fs::write(&f, b"PAR1 this is not parquet PAR1").unwrap();
        corrupted += 1;
    }
    assert!(corrupted > 0);
    let report = tmp.path().join("out/report.json");
    let out = run(&hf_home, &dummy_args("openai/clip-vit-base-patch32", &report));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tanganke/dtd") && err.contains("test-"), "{err}");
    assert!(!report.exists(), "a failed run must not leave a report");

    // A model missing from the cache is named, with the cache searched.
    let out = run(&hf_home, &dummy_args("tanganke/not-a-model", &report));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tanganke/not-a-model") && err.contains("hub"), "{err}");
}

#[test]
fn dummy_saves_the_model_and_provenance_beside_the_report() {
    let hf_home = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r/report.json");
    let saved = tmp.path().join("merged");
    let model = "tanganke/clip-vit-base-patch32_mnist";
    let mut args = dummy_args(model, &report);
    args.push("fast_dev_run=true".into());
    args.push(format!("merged_model_save_path={}", saved.display()));
    args.push("seed=42".into());
    let out = run(&hf_home, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("r/report.json.meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["seed"], 42);
    assert!(meta["model"].as_str().unwrap().contains(model), "{meta}");
    // Provenance names every input by revision and content; the bundled ones are fixtures.
    let (models, datasets) =
        (meta["models"].as_object().unwrap(), meta["datasets"].as_object().unwrap());
    assert_eq!((models.len(), datasets.len()), (1, 8), "{meta}");
    for input in models.values().chain(datasets.values()).chain([&meta["base_model"]]) {
        assert_eq!(input["origin"], "hub", "{input}");
        assert!(input["revision"].as_str().unwrap().starts_with("fixture-"), "{input}");
        let sha = input["sha256"].as_str().unwrap();
        assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()), "{input}");
    }
    assert_eq!(models.values().next().unwrap()["id"], model);
    // `dummy` returns the model unchanged: the saved file holds the checkpoint's tensors (by the
    // names in the checkpoint file), byte for byte.
    let hub = fusion_bench::hub::Hub::new(hf_home.join("hub"));
    let src = hub.resolve(model, fusion_bench::hub::RepoType::Model, None).unwrap();
    let n = common::assert_same_safetensors(
        &saved.join("model.safetensors"),
        &src.join("model.safetensors"),
    );
    println!("{n} tensors saved byte for byte");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "CLIPVisionModel");
}

#[test]
fn label_out_of_range_is_named_with_file_and_row() {
    use arrow_array::{Array, Int64Array, RecordBatch};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf_home");
    common::copy_dir(&root().join("tests/fixtures/hf_home"), &hf_home);
    let file = common::walk(&hf_home.join("hub/datasets--ylecun--mnist"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains("test-"))
        .unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let schema = batches[0].schema();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&file).unwrap(), schema.clone(), None).unwrap();
    for (bi, batch) in batches.iter().enumerate() {
        let idx = schema.index_of("label").unwrap();
        let labels = batch.column(idx).as_any().downcast_ref::<Int64Array>().unwrap();
        let mut values: Vec<i64> = labels.values().to_vec();
        if bi == 0 {
            values[5] = 10; // MNIST has classes 0..=9
        }
        let mut cols: Vec<Arc<dyn Array>> = batch.columns().to_vec();
        cols[idx] = Arc::new(Int64Array::from(values));
        writer.write(&RecordBatch::try_new(schema.clone(), cols).unwrap()).unwrap();
    }
    writer.close().unwrap();
    let report = tmp.path().join("out/report.json");
    let out = run(&hf_home, &dummy_args("openai/clip-vit-base-patch32", &report));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("label 10 at row 5") && err.contains("test-00000-of-00001.parquet"),
        "{err}"
    );
    assert!(!report.exists());
}

#[test]
fn decoded_image_cache_is_filled_once_and_gives_the_same_report() {
    let hf_home = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let entries = || -> Vec<PathBuf> {
        std::fs::read_dir(cache.join("images"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let mut reports = Vec::new();
    for i in 0..2 {
        let report = tmp.path().join(format!("report{i}.json"));
        let mut args = dummy_args("tanganke/clip-vit-base-patch32_gtsrb", &report);
        args.push(format!("path.cache_dir={}", cache.display()));
        let out = run_with_env(&hf_home, &args, &[("RUST_LOG", "fusion_bench=debug")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(
            err.matches("decoded images from cache").count(),
            if i == 0 { 0 } else { 8 },
            "{err}"
        );
        reports.push(std::fs::read_to_string(&report).unwrap());
        let crops: Vec<_> =
            entries().into_iter().filter(|p| p.extension().is_some_and(|e| e == "crops")).collect();
        assert_eq!(crops.len(), 8, "one complete entry per task, no leftovers: {:?}", entries());
    }
    assert_eq!(reports[0], reports[1]);
    // The cache is optional: disabled, nothing is written and the report is unchanged.
    let off = tmp.path().join("off");
    let report = tmp.path().join("report_off.json");
    let mut args = dummy_args("tanganke/clip-vit-base-patch32_gtsrb", &report);
    args.push(format!("path.cache_dir={}", off.display()));
    let out = run_with_env(&hf_home, &args, &[("FUSION_BENCH_IMAGE_CACHE_GB", "0")]);
    assert!(out.status.success());
    assert!(!off.join("images").exists());
    assert_eq!(std::fs::read_to_string(&report).unwrap(), reports[0]);
}
