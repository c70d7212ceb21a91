//! FusionBench's deterministic corruptions (contrast, pixelate, jpeg_compression; CIFAR-10-C
//! parameters), bit for bit: ours on the fixture images against the goldens of
//! `scripts/fixtures/golden_corruption.py` (FusionBench 0.2.33's own functions, Pillow 13,
//! libjpeg-turbo), every severity; for JPEG also the encoded file, byte for byte.

use std::path::{Path, PathBuf};

use fusion_bench::corrupt::rng::Rng;
use fusion_bench::corrupt::{corrupt_image, Corruption, ParamSet};
use fusion_bench::data::{decode_rgb, files, parquet, RgbImage};
use fusion_bench::hub::Hub;
use serde_json::Value;
use sha2::Digest;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn test_rows(dataset: &str) -> Vec<parquet::ImageRow> {
    let hub = Hub::new(root().join("tests/fixtures/hf_home/hub"));
    let snap = hub.resolve_dataset(dataset).unwrap();
    let files = files::find_split_files(&snap, None, "test").unwrap();
    files.iter().flat_map(|f| parquet::read_rows(f).unwrap()).collect()
}

fn golden(dir: &Path, rel: &str) -> RgbImage {
    decode_rgb(&std::fs::read(dir.join(rel)).unwrap()).unwrap()
}

#[test]
fn deterministic_corruptions_match_fusionbench_bit_for_bit() {
    let dir = root().join("tests/fixtures/golden/corruption");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let entries = manifest["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 240);
    let mut cache = std::collections::HashMap::new();
    let mut failures = Vec::new();
    for e in entries {
        let dataset = e["dataset"].as_str().unwrap();
        let rows = cache.entry(dataset.to_string()).or_insert_with(|| test_rows(dataset));
        let row = e["row"].as_u64().unwrap() as usize;
        let c = Corruption::parse(e["corruption"].as_str().unwrap()).unwrap();
        let severity = e["severity"].as_u64().unwrap() as u8;
        let img = decode_rgb(&rows[row].bytes).unwrap();
        let set = ParamSet::parse(e["params"].as_str().unwrap()).unwrap();
        let ours = corrupt_image(c, set, severity, &img, &mut Rng::new(0)).unwrap();
        let want = golden(&dir, e["file"].as_str().unwrap());
        assert_eq!(
            (want.height, want.width),
            (e["height"].as_u64().unwrap() as usize, e["width"].as_u64().unwrap() as usize)
        );
        if let Some(sha) = e.get("jpeg_sha256").and_then(Value::as_str) {
            // The encoder's bytes too: Pillow's JPEG file, byte for byte.
            let q = e["jpeg_quality"].as_u64().unwrap() as u8;
            let bytes = fusion_bench::corrupt::jpeg_compression::encode(&img, q).unwrap();
            let got = format!("{:x}", sha2::Sha256::digest(&bytes));
            if got != sha {
                failures.push(format!(
                    "{}: JPEG bytes differ ({} bytes, Pillow's {})",
                    e["file"].as_str().unwrap(),
                    bytes.len(),
                    e["jpeg_len"]
                ));
            }
        }
        if ours != want {
            let diff = if (ours.width, ours.height) == (want.width, want.height) {
                let n = ours.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
                let max = ours.data.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b)).max();
                format!("{n} values differ, max by {max:?}")
            } else {
                format!("size {}x{} vs {}x{}", ours.width, ours.height, want.width, want.height)
            };
            failures.push(format!("{}: {diff}", e["file"].as_str().unwrap()));
        }
    }
    assert!(failures.is_empty(), "{} of 240 differ:\n{}", failures.len(), failures.join("\n"));
}

/// The water texture of `spatter` (OpenCV's Canny → distance transform → blur → equalizeHist →
/// emboss → blur, re-implemented) on liquid layers made by the reference, against OpenCV's.
#[test]
fn spatter_water_texture_matches_opencv() {
    let dir = root().join("tests/fixtures/golden/corruption");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["spatter_textures"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let mut report = Vec::new();
    let (mut differ, mut total) = (0usize, 0usize);
    for c in cases {
        let layer = golden(&dir, c["layer"].as_str().unwrap());
        let want = golden(&dir, c["texture"].as_str().unwrap());
        let l8: Vec<u8> = layer.data.chunks_exact(3).map(|p| p[0]).collect();
        let ours = fusion_bench::corrupt::spatter::water_texture(&l8, layer.width, layer.height);
        let n = ours
            .iter()
            .zip(want.data.chunks_exact(3))
            .filter(|(o, w)| **o != f64::from(w[0]))
            .count();
        differ += n;
        total += ours.len();
        if n > 0 {
            report.push(format!("{}: {n} of {} differ", c["texture"], ours.len()));
        }
    }
    assert!(differ == 0, "{differ} of {total} texture values differ:\n{}", report.join("\n"));
}
