//! Merges refuse bad pools with an error naming the model and tensor, and write nothing: a
//! non-finite tensor, a tensor of another shape, a missing tensor, a threshold out of range.
//! Also: the cosine-similarity analysis writes FusionBench's CSV (seed and current forms): the
//! same text, except that values may differ from the golden's in their last bits (ATen's float64
//! reductions depend on the machine and thread count), within 1024 f64 ulps of 1.0.

use fusion_bench::models::clip::load_vision_weights;
use fusion_bench::program::save_vision_model;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn snapshot(repo: &str) -> PathBuf {
    let snaps = root().join("tests/fixtures/hf_home/hub").join(repo).join("snapshots");
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

/// The sun397 fixture model, changed by `edit`, saved under `dir`.
fn broken_sun397(dir: &Path, edit: impl FnOnce(&mut fusion_bench::weights::WeightMap)) -> PathBuf {
    let src = snapshot("models--tanganke--clip-vit-base-patch32_sun397");
    let (_, mut w) = load_vision_weights(&src).unwrap();
    edit(&mut w);
    let out = dir.join("sun397-broken");
    save_vision_model(&out, &src.join("config.json"), &w).unwrap();
    out
}

fn merge(args: &[String], out_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(args)
        .args([
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=dummy",
            "print_config=false",
            "report_save_path=null",
        ])
        .arg(format!("merged_model_save_path={}", out_dir.display()))
        .env("HF_HOME", root().join("tests/fixtures/hf_home"))
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .current_dir(root())
        .output()
        .unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Runs each method on the pool with sun397 replaced by `model`, expecting an error that
/// contains every string of `expect`, and no file written.
fn refused(model: &Path, expect: &[&str]) {
    for method in [
        vec!["method=simple_average"],
        vec!["method=task_arithmetic"],
        vec!["method=ties_merging", "method.threshold=20"],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out_dir = tmp.path().join("merged");
        let mut args: Vec<String> = method.iter().map(|s| s.to_string()).collect();
        args.push(format!("modelpool.models.sun397={}", model.display()));
        let out = merge(&args, &out_dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{method:?} accepted a broken model");
        for e in expect {
            assert!(err.contains(e), "{method:?}: `{e}` not in: {err}");
        }
        assert_eq!(files_under(&out_dir), Vec::<PathBuf>::new(), "{method:?} wrote files");
    }
}

#[test]
fn non_finite_tensor_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "vision_model.encoder.layers.1.mlp.fc1.weight";
    let model = broken_sun397(tmp.path(), |w| {
        let t = w.get(name).unwrap().copy();
        let _ = t.view([-1]).get(5).fill_(f64::NAN);
        let _ = t.view([-1]).get(7).fill_(f64::INFINITY);
        w.insert(name, t);
    });
    refused(&model, &["`sun397`", name, "2 non-finite", "index 5"]);
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "vision_model.post_layernorm.weight";
    let model = broken_sun397(tmp.path(), |w| {
        let t = w.get(name).unwrap();
        w.insert(name, Tensor::cat(&[t, t], 0));
    });
    refused(&model, &["`sun397`", name, "shape"]);

    let tmp = tempfile::tempdir().unwrap();
    let model = broken_sun397(tmp.path(), |w| {
        let mut kept = fusion_bench::weights::WeightMap::new();
        for (n, t) in w.iter().filter(|(n, _)| *n != name) {
            kept.insert(n, t.shallow_clone());
        }
        *w = kept;
    });
    refused(&model, &["`sun397`", name]);
}

#[test]
fn threshold_out_of_range_is_refused() {
    for bad in ["0", "101", "-3"] {
        let tmp = tempfile::tempdir().unwrap();
        let out_dir = tmp.path().join("merged");
        let args = vec!["method=ties_merging".to_string(), format!("method.threshold={bad}")];
        let out = merge(&args, &out_dir);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("method.threshold") && err.contains(bad), "{err}");
        assert!(!out_dir.exists());
    }
}

/// Tolerance on a cosine similarity (|value| ≤ 1): 1024 f64 ulps of 1.0. The values come from
/// float64 sums over the 67,152 parameters, which ATen splits by vector width and thread count:
/// the golden's last bits depend on the machine and threads that made it (one thread against two
/// moves them by 1 ulp here). A sum's rounding in another order moves it by about √n ≈ 260 ulps
/// at most in practice; 1024 leaves a margin of 4.
const COS_TOL: f64 = 1024.0 * f64::EPSILON;

/// Compares a cosine-similarity CSV with FusionBench's: the same header, row labels and shape;
/// each value within [`COS_TOL`], and written as FusionBench writes it (a value equal to the
/// golden's has the same text). Returns the largest difference in f64 ulps of 1.0.
fn compare_cos_csv(ours: &str, golden: &str, what: &str) -> f64 {
    let (ol, gl): (Vec<&str>, Vec<&str>) = (ours.lines().collect(), golden.lines().collect());
    assert_eq!(ol.len(), gl.len(), "{what}: lines");
    assert_eq!(ol[0], gl[0], "{what}: header");
    assert!(ours.ends_with('\n') && golden.ends_with('\n'), "{what}: final newline");
    let (mut compared, mut worst) = (0, 0f64);
    for (o, g) in ol[1..].iter().zip(&gl[1..]) {
        let (of, gf): (Vec<&str>, Vec<&str>) = (o.split(',').collect(), g.split(',').collect());
        assert_eq!(of.len(), gf.len(), "{what}: fields of `{g}`");
        assert_eq!(of[0], gf[0], "{what}: row label");
        for (a, b) in of[1..].iter().zip(&gf[1..]) {
            let (x, y): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            if x.to_bits() == y.to_bits() {
                assert_eq!(a, b, "{what}: {} is written as `{a}`, FusionBench `{b}`", gf[0]);
            }
            let d = (x - y).abs();
            assert!(d <= COS_TOL, "{what}: {}: {a} vs FusionBench {b}", gf[0]);
            worst = worst.max(d / f64::EPSILON);
            compared += 1;
        }
    }
    let tasks = gl[0].split(',').count() - 1;
    assert!(tasks > 0);
    assert_eq!(compared, tasks * tasks, "{what}: values compared");
    worst
}

#[test]
fn cos_similarity_csv_matches_fusionbench_in_both_forms() {
    let golden = std::fs::read_to_string(
        root().join("tests/fixtures/golden/fusionbench_merge/task_vector_cos_similarity/task_vector_cos_similarity.csv"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The seed's form: a stale method name and `save_to_csv` naming the file.
    let csv = tmp.path().join("outputs/clip-vit-base-patch32_cos.csv");
    let seed = vec![
        "method=task_vector_cos_similarity".to_string(),
        format!("method.save_to_csv={}", csv.display()),
    ];
    // FusionBench 0.2.33's form: `output_path` is a directory.
    let dir = tmp.path().join("cos");
    let current = vec![
        "method=analysis/task_vector_cos_similarity".to_string(),
        format!("method.output_path={}", dir.display()),
    ];
    for (args, file) in [(seed, csv.clone()), (current, dir.join("task_vector_cos_similarity.csv"))]
    {
        let out = merge(&args, &tmp.path().join("unused"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let ours = std::fs::read_to_string(&file).unwrap();
        let ulps = compare_cos_csv(&ours, &golden, &file.display().to_string());
        println!("{}: within {ulps} f64 ulps of 1.0 of FusionBench's", file.display());
        let png = image::open(file.with_extension("png")).unwrap();
        assert!(png.width() > 300 && png.height() > 300);
        // The table is printed too, as FusionBench prints its DataFrame.
        assert!(String::from_utf8_lossy(&out.stdout).contains("sun397,1.0000000000000"));
    }
    // It returns the pretrained model, which `merged_model_save_path` saves.
    let (_, saved) = load_vision_weights(&tmp.path().join("unused")).unwrap();
    let (_, pre) = load_vision_weights(&snapshot("models--openai--clip-vit-base-patch32")).unwrap();
    for (n, t) in pre.iter() {
        assert!(saved.get(n).unwrap().equal(t), "{n}");
    }
}
