//! End to end: the `fusion_bench` binary, given FusionBench's own `method=dummy` command lines,
//! reproduces FusionBench 0.2.33's reports on the bundled fixtures
//! (`tests/fixtures/golden/fusionbench_dummy/*.json`, made by
//! `scripts/fixtures/golden_fusionbench_dummy.sh`): same correct counts (accuracies equal), losses
//! within 1e-5, same keys in the same order.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn compare(ours: &Value, theirs: &Value, what: &str) {
    let (o, t) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    let ok: Vec<_> = o.keys().collect();
    let tk: Vec<_> = t.keys().collect();
    assert_eq!(ok, tk, "{what}: report keys or their order differ");
    assert_eq!(o["model_info"], t["model_info"], "{what}: model_info");
    for key in tk.iter().filter(|k| **k != "model_info") {
        let (a, b) = (&o[*key], &t[*key]);
        assert_eq!(a["accuracy"], b["accuracy"], "{what}: {key} accuracy");
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= 1e-5, "{what}: {key} loss {la} vs FusionBench {lb}");
    }
}

#[test]
fn dummy_reports_match_fusionbench() {
    let golden = root().join("tests/fixtures/golden/fusionbench_dummy");
    let hf_home = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut entries: Vec<_> =
        std::fs::read_dir(&golden).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        if stem == "versions" {
            continue;
        }
        let model = if stem == "clip-vit-base-patch32" {
            "openai/clip-vit-base-patch32".to_string()
        } else {
            format!("tanganke/{stem}")
        };
        let report = tmp.path().join(format!("{stem}.json"));
        let out = run(&hf_home, &dummy_args(&model, &report));
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        let ours: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let theirs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        compare(&ours, &theirs, &model);
        n += 1;
    }
    assert!(n >= 9, "expected the pretrained and eight fine-tuned goldens, found {n}");
}

#[test]
fn broken_dataset_names_dataset_and_file_and_writes_no_report() {
    let src = root().join("tests/fixtures/hf_home");
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf_home");
    copy_dir(&src, &hf_home);
    // Corrupt every parquet file of DTD (the last task) so that earlier tasks succeed first.
    let dtd = hf_home.join("hub/datasets--tanganke--dtd");
    let mut corrupted = 0;
    for f in walk(&dtd).into_iter().filter(|p| p.to_string_lossy().contains("test-")) {
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

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
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
    let (_, ours) = fusion_bench::models::clip::load_vision_weights(&saved).unwrap();
    let hub = fusion_bench::hub::Hub::new(hf_home.join("hub"));
    let src = hub.resolve(model, fusion_bench::hub::RepoType::Model, None).unwrap();
    let (_, theirs) = fusion_bench::models::clip::load_vision_weights(&src).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for (n, t) in theirs.iter() {
        assert!(ours.get(n).unwrap().equal(t), "{n}");
    }
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
    copy_dir(&root().join("tests/fixtures/hf_home"), &hf_home);
    let file = walk(&hf_home.join("hub/datasets--ylecun--mnist"))
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
