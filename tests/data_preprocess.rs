//! The dataset layer against Pillow 13 + transformers 4.57.6 (slow `CLIPImageProcessor`):
//! decoding (u8), Pillow bicubic resize + centre crop (u8), full preprocessing (f32, compared with
//! `==`), parquet reading and README-configs file discovery. Goldens come from
//! `scripts/fixtures/golden_preprocess.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fusion_bench::data::files::find_split_files;
use fusion_bench::data::glob::glob_match;
use fusion_bench::data::parquet::{num_rows, read_rows};
use fusion_bench::data::preprocess::{CropSize, ResizeTo};
use fusion_bench::data::resize::resize_bicubic;
use fusion_bench::data::{
    decode_rgb, preprocess, DataError, DecodeError, ImageDataset, ImageProcessorConfig, RgbImage,
};
use safetensors::{Dtype, SafeTensors};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

struct Golden {
    bytes: Vec<u8>,
    manifest: serde_json::Value,
}

impl Golden {
    fn load() -> Self {
        let bytes = std::fs::read(fixture("tests/fixtures/golden/preprocess.safetensors")).unwrap();
        let manifest =
            std::fs::read_to_string(fixture("tests/fixtures/golden/preprocess_manifest.json"))
                .unwrap();
        Self { bytes, manifest: serde_json::from_str(&manifest).unwrap() }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    /// `(name, file)` of every image.
    fn images(&self) -> Vec<(String, String)> {
        self.manifest["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["name"].as_str().unwrap().into(), i["file"].as_str().unwrap().into()))
            .collect()
    }
    fn u8s(&self, key: &str) -> Option<(Vec<usize>, Vec<u8>)> {
        let st = self.st();
        let t = st.tensor(key).ok()?;
        assert_eq!(t.dtype(), Dtype::U8, "{key}");
        Some((t.shape().to_vec(), t.data().to_vec()))
    }
    fn f32s(&self, key: &str) -> Option<Vec<f32>> {
        let st = self.st();
        let t = st.tensor(key).ok()?;
        assert_eq!(t.dtype(), Dtype::F32, "{key}");
        Some(
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }
    /// How many golden tensors are named `<prefix>/…` (what a loop over them must compare).
    fn count(&self, prefix: &str) -> usize {
        let p = format!("{prefix}/");
        self.st().names().iter().filter(|n| n.starts_with(&p)).count()
    }
    /// Pillow's `convert("RGB")` pixels of an image.
    fn rgb(&self, name: &str) -> RgbImage {
        let (shape, data) = self.u8s(&format!("rgb/{name}")).unwrap();
        RgbImage::from_raw(shape[1], shape[0], data).unwrap()
    }
}

fn image_bytes(file: &str) -> Vec<u8> {
    std::fs::read(fixture("tests/fixtures/preprocess/images").join(file)).unwrap()
}

fn config(shortest: usize, crop_h: usize, crop_w: usize) -> ImageProcessorConfig {
    ImageProcessorConfig {
        size: ResizeTo::ShortestEdge(shortest),
        crop_size: CropSize { height: crop_h, width: crop_w },
        ..ImageProcessorConfig::default()
    }
}

/// `None` when equal, else a description with the number of differing values and the max diff.
fn compare_f32(got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} vs {}", got.len(), want.len()));
    }
    let diff: Vec<f32> = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .map(|(a, b)| (a - b).abs())
        .collect();
    (!diff.is_empty()).then(|| {
        format!(
            "{} values differ, max |diff| {}",
            diff.len(),
            diff.iter().cloned().fold(0.0, f32::max)
        )
    })
}

fn compare_u8(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} vs {}", got.len(), want.len()));
    }
    let diff: Vec<i32> = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .collect();
    (!diff.is_empty())
        .then(|| format!("{} values differ, max |diff| {}", diff.len(), diff.iter().max().unwrap()))
}

#[test]
fn decode_matches_pillow_convert_rgb() {
    let g = Golden::load();
    let mut bad = Vec::new();
    let images = g.images();
    for (name, file) in &images {
        let want = g.rgb(name);
        match decode_rgb(&image_bytes(file)) {
            Err(e) => bad.push(format!("{name}: {e}")),
            Ok(got) if (got.width, got.height) != (want.width, want.height) => bad.push(format!(
                "{name}: size {}x{} vs {}x{}",
                got.width, got.height, want.width, want.height
            )),
            Ok(got) => {
                if let Some(d) = compare_u8(&got.data, &want.data) {
                    bad.push(format!("{name}: {d}"));
                }
            }
        }
    }
    println!("decode: {}/{} images bit-exact", images.len() - bad.len(), images.len());
    assert!(!images.is_empty());
    assert_eq!(images.len(), g.count("rgb"), "every golden image decoded");
    assert!(bad.is_empty(), "decode mismatches:\n{}", bad.join("\n"));
}

/// Resize + crop from Pillow's own RGB pixels, so resize is tested apart from decoding.
#[test]
fn resize_and_crop_match_pillow_at_224() {
    let g = Golden::load();
    let cfg = ImageProcessorConfig::default();
    let (mut checked, mut bad) = (0, Vec::new());
    for (name, _) in g.images() {
        let Some((_, want)) = g.u8s(&format!("crop224/{name}")) else { continue };
        let rgb = g.rgb(&name);
        let (h, w) = cfg.resized_size(rgb.height, rgb.width);
        let resized = resize_bicubic(&rgb, w, h);
        let (top, left) = ((h - 224) / 2, (w - 224) / 2);
        let crop: Vec<u8> = (top..top + 224)
            .flat_map(|y| resized.data[(y * w + left) * 3..(y * w + left + 224) * 3].to_vec())
            .collect();
        checked += 1;
        if let Some(d) = compare_u8(&crop, &want) {
            bad.push(format!("{name}: {d}"));
        }
    }
    println!("resize+crop 224: {}/{checked} images bit-exact", checked - bad.len());
    assert!(checked > 0);
    assert_eq!(checked, g.count("crop224"), "every golden crop compared");
    assert!(bad.is_empty(), "resize mismatches:\n{}", bad.join("\n"));
}

/// The full float output, from the image file bytes, for every stored config.
#[test]
fn preprocess_matches_clip_image_processor() {
    let g = Golden::load();
    let configs = [
        ("clip224", config(224, 224, 224)),
        ("clip32", config(32, 32, 32)),
        ("pad", config(20, 32, 24)),
    ];
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut bad = Vec::new();
    for (name, file) in g.images() {
        let img = decode_rgb(&image_bytes(&file)).unwrap();
        for (key, cfg) in &configs {
            let Some(want) = g.f32s(&format!("{key}/{name}")) else { continue };
            let got = preprocess(&img, cfg).unwrap();
            let c = counts.entry(key).or_default();
            c.1 += 1;
            match compare_f32(&got, &want) {
                None => c.0 += 1,
                Some(d) => bad.push(format!("{key}/{name}: {d}")),
            }
        }
        // Images stored as u8 crops at 224: normalising the golden crop must give our output.
        if let Some((_, crop)) = g.u8s(&format!("crop224/{name}")) {
            let got = preprocess(&img, &configs[0].1).unwrap();
            let cfg = &configs[0].1;
            let want: Vec<f32> = (0..3)
                .flat_map(|c| {
                    crop.chunks_exact(3).map(move |p| {
                        ((f64::from(p[c]) * cfg.rescale_factor) as f32 - cfg.image_mean[c])
                            / cfg.image_std[c]
                    })
                })
                .collect();
            let c = counts.entry("crop224->f32").or_default();
            c.1 += 1;
            match compare_f32(&got, &want) {
                None => c.0 += 1,
                Some(d) => bad.push(format!("crop224 {name}: {d}")),
            }
        }
    }
    let mut keys: Vec<_> = counts.iter().collect();
    keys.sort();
    for (k, (ok, n)) in &keys {
        println!("preprocess {k}: {ok}/{n} images bit-exact");
    }
    // Every golden tensor of each config was compared (none skipped for want of an image).
    let compared =
        [("clip224", "clip224"), ("clip32", "clip32"), ("pad", "pad"), ("crop224->f32", "crop224")];
    for (key, prefix) in compared {
        let n = counts.get(key).map_or(0, |c| c.1);
        assert!(n > 0, "no {key} image compared");
        assert_eq!(n, g.count(prefix), "{key}: images compared");
    }
    assert!(bad.is_empty(), "preprocess mismatches:\n{}", bad.join("\n"));
}

#[test]
fn processor_config_parsing() {
    let real = r#"{
      "crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
      "feature_extractor_type": "CLIPFeatureExtractor",
      "image_mean": [0.48145466, 0.4578275, 0.40821073],
      "image_std": [0.26862954, 0.26130258, 0.27577711],
      "resample": 3, "size": 224 }"#;
    let cfg = ImageProcessorConfig::from_json(real, "clip.json").unwrap();
    assert_eq!(cfg, ImageProcessorConfig::default());
    let new_style = r#"{"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 24},
        "rescale_factor": 0.00392156862745098, "do_convert_rgb": true}"#;
    let cfg = ImageProcessorConfig::from_json(new_style, "x").unwrap();
    assert_eq!(cfg.size, ResizeTo::ShortestEdge(32));
    assert_eq!(cfg.crop_size, CropSize { height: 32, width: 24 });
    let exact =
        ImageProcessorConfig::from_json(r#"{"size": {"height": 10, "width": 12}}"#, "x").unwrap();
    assert_eq!(exact.size, ResizeTo::Exact { height: 10, width: 12 });
    assert_eq!(exact.resized_size(100, 50), (10, 12));
    let err =
        ImageProcessorConfig::from_json(r#"{"resample": 2}"#, "p.json").unwrap_err().to_string();
    assert!(err.contains("p.json") && err.contains("resample"), "{err}");
    let err = ImageProcessorConfig::from_json(r#"{"size": {"longest": 3}}"#, "p.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`size`"), "{err}");
    let err = ImageProcessorConfig::from_json(r#"{"image_mean": [1, 2]}"#, "p.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("image_mean"), "{err}");
    let err = ImageProcessorConfig::from_json(r#"{"do_resize": "yes"}"#, "p.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("p.json"), "{err}");
    // Shortest-edge rule: int(size * long / short).
    let d = ImageProcessorConfig::default();
    assert_eq!(d.resized_size(375, 500), (224, 298));
    assert_eq!(d.resized_size(97, 33), (658, 224));
}

#[test]
fn corrupt_bytes_are_errors() {
    assert!(matches!(decode_rgb(b""), Err(DecodeError::UnknownFormat { .. })));
    assert!(matches!(decode_rgb(b"GIF89a...."), Err(DecodeError::UnknownFormat { .. })));
    let jpg = image_bytes("jpeg_q75_420_256x256.jpg");
    assert!(matches!(decode_rgb(&jpg[..jpg.len() / 2]), Err(DecodeError::TruncatedJpeg)));
    assert!(matches!(
        decode_rgb(&jpg[..40]),
        Err(DecodeError::TruncatedJpeg | DecodeError::Jpeg(_))
    ));
    let mut garbled = jpg.clone();
    for b in &mut garbled[2..200] {
        *b = 0x5a;
    }
    assert!(decode_rgb(&garbled).is_err());
    let png = image_bytes("png_rgb_64x64.png");
    assert!(matches!(decode_rgb(&png[..png.len() / 2]), Err(DecodeError::Png(_))));
}

fn pq(name: &str) -> PathBuf {
    fixture("tests/fixtures/preprocess/parquet").join(name)
}

#[test]
fn parquet_rows_and_labels() {
    let g = Golden::load();
    let names: Vec<String> = g.manifest["parquet_good"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    let labels: Vec<i64> = g.manifest["parquet_good"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let files: HashMap<String, String> = g.images().into_iter().collect();
    let rows = read_rows(&pq("good.parquet")).unwrap();
    assert_eq!(num_rows(&pq("good.parquet")).unwrap(), 7);
    assert_eq!(rows.len(), names.len());
    for (i, (row, name)) in rows.iter().zip(&names).enumerate() {
        assert_eq!(row.bytes, image_bytes(&files[name]), "row {i}");
        assert_eq!(row.label, labels[i]);
        assert_eq!(row.path.is_some(), i % 2 == 0);
    }
    let large = read_rows(&pq("large_binary.parquet")).unwrap();
    assert_eq!(large.iter().map(|r| r.label).collect::<Vec<_>>(), labels[..3]);
    assert_eq!(large[2].bytes, rows[2].bytes);
    let boolean = read_rows(&pq("bool_label.parquet")).unwrap();
    assert_eq!(boolean.iter().map(|r| r.label).collect::<Vec<_>>(), [1, 0]);

    let err = read_rows(&pq("no_label.parquet")).unwrap_err();
    assert!(matches!(err, DataError::MissingColumn { .. }), "{err}");
    assert!(
        err.to_string().contains("no_label.parquet") && err.to_string().contains("`label`"),
        "{err}"
    );
    let err = read_rows(&pq("null_label.parquet")).unwrap_err();
    assert!(matches!(err, DataError::NullLabel { row: 1, .. }), "{err}");
    let err = read_rows(&pq("null_bytes.parquet")).unwrap_err();
    assert!(matches!(err, DataError::NullImage { row: 1, .. }), "{err}");
    assert!(err.to_string().contains("somewhere/else.jpg"), "{err}");
    let err = read_rows(&fixture("tests/fixtures/preprocess/images/png_l_7x5.png")).unwrap_err();
    assert!(matches!(err, DataError::Parquet { .. }), "{err}");
}

#[test]
fn dataset_batches_in_order_and_row_errors() {
    let g = Golden::load();
    let names: Vec<String> = g.manifest["parquet_good"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    let ds = ImageDataset::from_files(
        vec![pq("good.parquet"), pq("large_binary.parquet")],
        config(32, 32, 32),
    )
    .unwrap();
    assert_eq!(ds.len(), 10);
    let (pixels, labels) = ds.decode_and_preprocess_batch(0..10).unwrap();
    assert_eq!(labels, ds.labels());
    assert_eq!(pixels.len(), 10 * 3 * 32 * 32);
    let order = names.iter().chain(&names[..3]);
    for (i, (chunk, name)) in pixels.chunks_exact(3 * 32 * 32).zip(order).enumerate() {
        let want = g.f32s(&format!("clip32/{name}")).unwrap();
        assert!(compare_f32(chunk, &want).is_none(), "batch item {i} ({name})");
    }
    assert_eq!(ds.origin(8).unwrap().1, 1);
    assert!(ds.decode_and_preprocess_batch(5..11).is_err());

    let bad = ImageDataset::from_files(vec![pq("corrupt.parquet")], config(32, 32, 32)).unwrap();
    assert!(bad.decode_and_preprocess_batch(0..2).is_ok());
    let err = bad.decode_and_preprocess_batch(0..4).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DataError::Decode { row: 2, source: DecodeError::TruncatedJpeg, .. }),
        "{msg}"
    );
    assert!(msg.contains("corrupt.parquet") && msg.contains("row 2"), "{msg}");
    let err = bad.decode(3).unwrap_err();
    assert!(matches!(err, DataError::Decode { row: 3, source: DecodeError::Png(_), .. }), "{err}");
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn rel(root: &Path, files: Vec<PathBuf>) -> Vec<String> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"))
        .collect()
}

#[test]
fn readme_configs_and_default_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for f in [
        "cropped_digits/test-00000-of-00001.parquet",
        "cropped_digits/train-00000-of-00002.parquet",
        "cropped_digits/train-00001-of-00002.parquet",
        "full_numbers/test-00000-of-00001.parquet",
        "extra/x.parquet",
    ] {
        write(root, f, b"");
    }
    write(
        root,
        "README.md",
        b"---\nlicense: cc\nconfigs:\n- config_name: cropped_digits\n  data_files:\n  - split: train\n    path: cropped_digits/train-*\n  - split: test\n    path: [cropped_digits/test-*]\n- config_name: full_numbers\n  data_files:\n    test: full_numbers/test-*\n- config_name: other\n  data_files: extra/*.parquet\n---\n# SVHN\n",
    );
    let train = find_split_files(root, Some("cropped_digits"), "train").unwrap();
    assert_eq!(
        rel(root, train),
        [
            "cropped_digits/train-00000-of-00002.parquet",
            "cropped_digits/train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(
        rel(root, find_split_files(root, Some("full_numbers"), "test").unwrap()),
        ["full_numbers/test-00000-of-00001.parquet"]
    );
    assert_eq!(
        rel(root, find_split_files(root, Some("other"), "train").unwrap()),
        ["extra/x.parquet"]
    );
    let err = find_split_files(root, None, "test").unwrap_err().to_string();
    assert!(err.contains("cropped_digits") && err.contains("full_numbers"), "{err}");
    let err = find_split_files(root, Some("cropped_digits"), "validation").unwrap_err().to_string();
    assert!(err.contains("validation") && err.contains("train") && err.contains("test"), "{err}");
    let err = find_split_files(root, Some("nope"), "test").unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("other"), "{err}");

    // A default config among several.
    let dir2 = tempfile::tempdir().unwrap();
    let r2 = dir2.path();
    write(r2, "data/test-00000-of-00001-abc.parquet", b"");
    write(r2, "data/train-00000-of-00001-abc.parquet", b"");
    write(r2, "README.md", b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n  - split: train\n    path: data/train-*\n- config_name: b\n  data_files: x/*\n---\n");
    assert_eq!(
        rel(r2, find_split_files(r2, None, "test").unwrap()),
        ["data/test-00000-of-00001-abc.parquet"]
    );

    // No README configs: default patterns.
    let dir3 = tempfile::tempdir().unwrap();
    let r3 = dir3.path();
    write(r3, "README.md", b"# no front matter\n");
    write(r3, "data/test-00001-of-00002.parquet", b"");
    write(r3, "data/test-00000-of-00002.parquet", b"");
    write(r3, "data/train-00000-of-00001.parquet", b"");
    write(r3, ".git/test-0.parquet", b"");
    assert_eq!(
        rel(r3, find_split_files(r3, None, "test").unwrap()),
        ["data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet"]
    );
    let err = find_split_files(r3, None, "validation").unwrap_err().to_string();
    assert!(
        err.contains("validation") && err.contains("data/train-00000-of-00001.parquet"),
        "{err}"
    );
    write(r3, "mnist/test-00000-of-00001.parquet", b"");
    assert_eq!(
        rel(r3, find_split_files(r3, Some("mnist"), "test").unwrap()),
        ["mnist/test-00000-of-00001.parquet"]
    );

    let err = {
        write(r3, "README.md", b"---\nconfigs: [1\n---\n");
        find_split_files(r3, None, "test").unwrap_err().to_string()
    };
    assert!(err.contains("README.md"), "{err}");

    assert!(glob_match("data/**/*.parquet", "data/a/b/c.parquet"));
    assert!(glob_match("data/**/*.parquet", "data/c.parquet"));
    assert!(!glob_match("data/*.parquet", "data/a/c.parquet"));
    assert!(glob_match("test-[0-9]?-*", "test-01-x"));
}

/// Single-thread throughput of 256×256 JPEG bytes → normalised 3×224×224 (not a timed assertion).
/// `cargo test --release --test data_preprocess -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput_256_jpeg_to_224() {
    let bytes = image_bytes("jpeg_q75_420_256x256.jpg");
    let cfg = ImageProcessorConfig::default();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        let n = 300;
        let t = std::time::Instant::now();
        let mut sink = 0f32;
        for _ in 0..n {
            let img = decode_rgb(&bytes).unwrap();
            sink += preprocess(&img, &cfg).unwrap()[0];
        }
        let total = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for _ in 0..n {
            sink += decode_rgb(&bytes).unwrap().data[0] as f32;
        }
        let decode = t.elapsed().as_secs_f64();
        println!(
            "single thread: {:.0} img/s (decode {:.2} ms, resize+crop+normalise {:.2} ms per image) [{sink}]",
            n as f64 / total,
            decode / n as f64 * 1e3,
            (total - decode) / n as f64 * 1e3
        );
    });
}
