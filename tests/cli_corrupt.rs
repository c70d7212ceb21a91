//! End to end: `fusion_bench corrupt` on a copy of the fixture hub cache (never the fixtures
//! themselves): it writes a split that `split: NAME` then evaluates, deterministically for any
//! thread count, and refuses bad input by name without leaving anything half-written.

use std::path::{Path, PathBuf};

mod common;
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the fixture hub cache (only the datasets, and the models when `models`).
fn hf_home(tmp: &Path, models: bool) -> PathBuf {
    let home = tmp.join("hf_home");
    let src = root().join("tests/fixtures/hf_home/hub");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("datasets--") || models {
            common::copy_dir(&p, &home.join("hub").join(name));
        }
    }
    home
}

fn run(hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn snapshot(hf_home: &Path, repo: &str) -> PathBuf {
    let dir = hf_home.join("hub").join(format!("datasets--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(dir.join("refs/main")).unwrap();
    dir.join("snapshots").join(rev.trim())
}

/// Every file under `dir` with its bytes, sorted: what a failed command must leave unchanged.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(tmp.path(), &["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("corrupt") && text.contains("--severity"),
        "{text}"
    );
    let out = run(tmp.path(), &["corrupt", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--dataset", "--split", "--corruption", "--params", "--seed", "--threads", "--grid"]
    {
        assert!(text.contains(flag), "corrupt --help lacks {flag}: {text}");
    }
}

fn dummy_eval(hf_home: &Path, split: &str, report: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args([
            "method=dummy",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
            "modelpool.models._pretrained_=tanganke/clip-vit-base-patch32_dtd",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
            &format!("taskpool.test_datasets.dtd.split={split}"),
            "fabric.accelerator=cpu",
            "print_config=false",
            &format!("report_save_path={}", report.display()),
        ])
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .env("FUSION_BENCH_IMAGE_CACHE_GB", "0")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "eval on split {split}: {}", stderr(&out));
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// DTD, which FusionBench never published corrupted: each of the seven corruptions becomes a
/// split the evaluation reads with `taskpool.test_datasets.dtd.split=NAME`, with the clean
/// split's labels and a different loss.
#[test]
fn corrupted_dtd_split_evaluates_and_differs_from_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), true);
    let clean = dummy_eval(&home, "test", &tmp.path().join("clean.json"));
    for (c, name) in [("gaussian_noise", "noisy5"), ("pixelate", "pixelate")] {
        let out = run(
            &home,
            &[
                "corrupt",
                "--dataset",
                "tanganke/dtd",
                "--split",
                "test",
                "--corruption",
                c,
                "--severity",
                "5",
                "--name",
                name,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rep = dummy_eval(&home, name, &tmp.path().join(format!("{name}.json")));
        let (a, b) = (&clean["dtd"], &rep["dtd"]);
        assert_ne!(a["loss"], b["loss"], "{c}: loss unchanged: {a} {b}");
        // The other tasks read their clean splits: unchanged.
        assert_eq!(clean["eurosat"], rep["eurosat"]);
    }
    let card = std::fs::read_to_string(snapshot(&home, "tanganke/dtd").join("README.md")).unwrap();
    assert!(card.contains("- split: noisy5\n    path: data/noisy5-*"), "{card}");
    assert!(card.contains("name: noisy5") && card.contains("num_examples: 64"), "{card}");
    // Labels are the clean split's, images all PNG.
    let data = snapshot(&home, "tanganke/dtd").join("data");
    let clean_rows =
        fusion_bench::data::parquet::read_rows(&data.join("test-00000-of-00001.parquet")).unwrap();
    let rows = fusion_bench::data::parquet::read_rows(&data.join("noisy5-00000-of-00001.parquet"))
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.label).collect::<Vec<_>>(),
        clean_rows.iter().map(|r| r.label).collect::<Vec<_>>()
    );
    assert!(rows.iter().all(|r| r.bytes.starts_with(b"\x89PNG")));
}

#[test]
fn same_seed_same_bytes_for_any_thread_count_and_a_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), false);
    let data = snapshot(&home, "tanganke/eurosat").join("data");
    let mut written = Vec::new();
    for (name, threads, seed) in [("n1", "1", "7"), ("n2", "2", "7"), ("n3", "2", "8")] {
        let out = run(
            &home,
            &[
                "corrupt",
                "--dataset",
                "tanganke/eurosat",
                "--corruption",
                "spatter",
                "--params",
                "imagenetc",
                "--seed",
                seed,
                "--threads",
                threads,
                "--name",
                name,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = fusion_bench::data::parquet::read_rows(
            &data.join(format!("{name}-00000-of-00001.parquet")),
        )
        .unwrap();
        written.push(rows.into_iter().map(|r| r.bytes).collect::<Vec<_>>());
    }
    assert_eq!(written[0], written[1], "--threads changed the bytes");
    assert_ne!(written[0], written[2], "--seed did not change the bytes");
    // Rewriting needs --overwrite; the source split cannot be the target.
    let args =
        ["corrupt", "--dataset", "tanganke/eurosat", "--corruption", "contrast", "--name", "n1"];
    let out = run(&home, &args);
    assert!(
        !out.status.success() && stderr(&out).contains("already has a split `n1`"),
        "{}",
        stderr(&out)
    );
    let out = run(&home, &[&args[..], &["--overwrite"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        &home,
        &["corrupt", "--dataset", "tanganke/eurosat", "--corruption", "contrast", "--name", "test"],
    );
    assert!(!out.status.success() && stderr(&out).contains("test"), "{}", stderr(&out));
    // The grid: a PNG of the clean image and 5 severities per corruption.
    let grid = tmp.path().join("grid.png");
    let out = run(
        &home,
        &["corrupt", "--dataset", "tanganke/dtd", "--grid", grid.to_str().unwrap(), "--index", "3"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let img = image::open(&grid).unwrap();
    assert!(img.width() > 6 * 96 && img.height() > 7 * 96, "{}x{}", img.width(), img.height());
}

/// Writes `rows` (bytes, label) as the only test file of `repo` in the copy.
fn replace_test_split(home: &Path, repo: &str, rows: &[(Vec<u8>, i64)]) {
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(fields.clone()), true),
        Field::new("label", DataType::Int64, true),
    ]));
    let bytes: ArrayRef =
        Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.0.as_slice())));
    let paths: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>; rows.len()]));
    let image: ArrayRef = Arc::new(StructArray::try_new(fields, vec![bytes, paths], None).unwrap());
    let label: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
    let batch = RecordBatch::try_new(schema.clone(), vec![image, label]).unwrap();
    let path = snapshot(home, repo).join("data/test-00000-of-00001.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn bad_input_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), false);
    let dtd = snapshot(&home, "tanganke/dtd");
    let good =
        fusion_bench::data::parquet::read_rows(&dtd.join("data/test-00000-of-00001.parquet"))
            .unwrap();
    // Row 2 of 4 is not an image.
    let rows: Vec<(Vec<u8>, i64)> = good
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, r)| (if i == 2 { b"not an image".to_vec() } else { r.bytes.clone() }, r.label))
        .collect();
    replace_test_split(&home, "tanganke/dtd", &rows);
    let before = tree(&home);
    let base = ["corrupt", "--dataset", "tanganke/dtd", "--split", "test"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--corruption", "fog"], vec!["unknown corruption `fog`", "gaussian_noise"]),
        (vec!["--corruption", "contrast", "--severity", "6"], vec!["severity", "`6`"]),
        (vec!["--corruption", "contrast", "--severity", "0"], vec!["severity", "`0`"]),
        (
            vec!["--corruption", "contrast", "--params", "cifar100"],
            vec!["unknown parameter set `cifar100`"],
        ),
        (
            vec!["--corruption", "contrast", "--name", "bad-name"],
            vec!["`bad-name` is not a valid split name"],
        ),
        (vec!["--corruption", "contrast", "--bogus"], vec!["unknown argument `--bogus`"]),
        (vec!["--severity", "2"], vec!["--corruption NAME is required"]),
        (
            vec!["--corruption", "contrast"],
            vec!["tanganke/dtd", "split `test`", "row 2", "does not decode"],
        ),
    ];
    for (extra, want) in cases {
        let args = [&base[..], &extra].concat();
        let out = run(&home, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
        }
    }
    // A dataset or split that is not in the cache.
    let out = run(&home, &["corrupt", "--dataset", "tanganke/nope", "--corruption", "contrast"]);
    assert!(!out.status.success() && stderr(&out).contains("tanganke/nope"), "{}", stderr(&out));
    let out = run(
        &home,
        &[
            "corrupt",
            "--dataset",
            "tanganke/dtd",
            "--split",
            "validation",
            "--corruption",
            "contrast",
        ],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("validation") && err.contains("tanganke/dtd"),
        "{err}"
    );
    assert!(tree(&home) == before, "a failed command changed the hub cache");
}
