//! Golden parity of the CLIP forward against transformers 4.57.6 (fp32, CPU).
//!
//! The goldens in `tests/fixtures/golden/clip_{a,b}.safetensors` were written by
//! `scripts/fixtures/golden_clip.py` from the tiny fixture models in `tests/fixtures/hf_home`:
//! config A (quick_gelu, patch 8, legacy EOS pooling, with eight fine-tuned vision towers) and
//! config B (gelu, patch 7, other widths, EOS-id pooling). `clip_machine.json` beside them records
//! the machine that made them.
//!
//! Matrix products go through libtorch's BLAS, which picks kernels by CPU vendor and vector unit,
//! so the last bits of a golden depend on the machine that made it: on that machine ours are
//! bit-identical, elsewhere they differ by a few ulps. Each tensor is therefore compared within
//! [`MAX_ULPS`] fp32 ulps of its magnitude (its largest |value|; for logits, `exp(logit_scale)`,
//! the largest value a logit can take), and the difference is printed in ulps.

use fusion_bench::hub::{Hub, RepoType};
use fusion_bench::models::clip::{load_vision_weights, ClipModel, ClipVision};
use fusion_bench::tasks::TA8;
use fusion_bench::weights::{SafetensorsFile, Scope, WeightSource};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Tolerance in fp32 ulps of a tensor's magnitude. Measured (README, "Correctness anchors"): up to
/// 4 ulps between the goldens' machine and an AMD EPYC, up to 8.5 between this CPU's kernels and
/// ATen's or MKL's fallback kernels on one machine; a real bug (an activation, an epsilon, a
/// pooling position) is thousands.
const MAX_ULPS: f64 = 16.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn hub() -> Hub {
    Hub::new(fixtures().join("hf_home/hub"))
}

/// One fp32 ulp at magnitude `m`: the spacing of the floats in `[2^e, 2^(e+1))` holding `m`.
fn ulp(m: f64) -> f64 {
    assert!(m.is_finite() && m > 0.0, "magnitude {m}");
    2f64.powi(m.log2().floor() as i32 - 23)
}

/// Max |ours − golden| in fp32 ulps of `scale` (default: the golden's largest |value|); prints
/// it, asserts it is at most [`MAX_ULPS`], and returns it.
fn check_scaled(name: &str, ours: &Tensor, golden: &SafetensorsFile, scale: Option<f64>) -> f64 {
    let want = golden.tensor(name).unwrap().to_kind(Kind::Float);
    let ours = ours.to_kind(Kind::Float);
    assert_eq!(ours.size(), want.size(), "{name}: shape");
    assert!(want.numel() > 0, "{name}: the golden tensor is empty");
    let d = (&ours - &want).abs().max().double_value(&[]);
    let scale = scale.unwrap_or_else(|| want.abs().max().double_value(&[]));
    let ulps = d / ulp(scale);
    println!("{name}: max |diff| = {d:.3e} = {ulps:.2} ulps of {scale:.3}");
    assert!(
        ulps <= MAX_ULPS,
        "{name}: max |diff| {d:e} is {ulps:.2} ulps of {scale:.3} (> {MAX_ULPS}); golden made on \
         {}",
        golden_machine()
    );
    ulps
}

fn check(name: &str, ours: &Tensor, golden: &SafetensorsFile) -> f64 {
    check_scaled(name, ours, golden, None)
}

/// The machine that made the goldens, from `clip_machine.json`, in a few words.
fn golden_machine() -> String {
    let path = fixtures().join("golden/clip_machine.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    format!(
        "{} {} (ATen {}, torch {}, {})",
        m["cpu_vendor"].as_str().unwrap_or("?"),
        m["cpu_model"].as_str().unwrap_or("?"),
        m["torch_cpu_capability"].as_str().unwrap_or("?"),
        m["torch"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
    )
}

/// Runs config `model_id`'s forward on the golden inputs and compares every output; returns the
/// golden file and the names of the tensors compared.
fn run_config(model_id: &str, golden_file: &str) -> (SafetensorsFile, Vec<String>) {
    let _g = tch::no_grad_guard();
    let dir = hub().resolve(model_id, RepoType::Model, None).unwrap();
    let clip = ClipModel::load(&dir, Device::Cpu).unwrap();
    let golden = SafetensorsFile::open(fixtures().join("golden").join(golden_file)).unwrap();
    let pixels = golden.tensor("pixel_values").unwrap();
    let ids = golden.tensor("input_ids").unwrap();
    let mask = golden.tensor("attention_mask").unwrap();
    // A loaded parameter, no arithmetic: equal bit for bit.
    let logit_scale = golden.tensor("logit_scale").unwrap();
    assert!(clip.logit_scale.reshape([]).equal(&logit_scale.reshape([])), "logit_scale");
    check("vision_pooler_output", &clip.vision.forward(&pixels), &golden);
    check("image_embeds", &clip.image_features(&clip.vision, &pixels), &golden);
    check("text_pooler_output", &clip.text.forward(&ids, Some(&mask)), &golden);
    check("text_embeds", &clip.text_features(&ids, Some(&mask)), &golden);
    // A logit is exp(logit_scale) · cos, |cos| ≤ 1: its rounding is that of exp(logit_scale).
    let scale = logit_scale.exp().double_value(&[]);
    let logits = clip.logits_per_image(&pixels, &ids, Some(&mask));
    check_scaled("logits_per_image", &logits, &golden, Some(scale));
    println!("goldens made on {}", golden_machine());
    let compared = [
        "logit_scale",
        "vision_pooler_output",
        "image_embeds",
        "text_pooler_output",
        "text_embeds",
        "logits_per_image",
    ];
    (golden, compared.map(String::from).to_vec())
}

/// Every tensor of the golden file is an input or was compared: nothing in it goes unchecked.
fn assert_all_compared(golden: &SafetensorsFile, compared: &[String]) {
    let inputs = ["pixel_values", "input_ids", "attention_mask"];
    let mut outputs: Vec<String> =
        golden.names().into_iter().filter(|n| !inputs.contains(&n.as_str())).collect();
    outputs.sort();
    let mut compared = compared.to_vec();
    compared.sort();
    assert_eq!(outputs, compared, "golden outputs vs the tensors compared");
    println!("{} golden outputs compared", compared.len());
}

/// The sorted tensor names in a checkpoint's `model.safetensors` file.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names = SafetensorsFile::open(dir.join("model.safetensors")).unwrap().names();
    names.sort();
    names
}

#[test]
fn config_a_quick_gelu_matches_transformers() {
    let (golden, mut compared) = run_config("openai/clip-vit-base-patch32", "clip_a.safetensors");
    assert_eq!(compared.len(), 6);
    let _g = tch::no_grad_guard();
    let pixels = golden.tensor("pixel_values").unwrap();
    // The pretrained checkpoint loaded as a vision-only model, through an in-memory weight map.
    let dir = hub().resolve("openai/clip-vit-base-patch32", RepoType::Model, None).unwrap();
    let (cfg, map) = load_vision_weights(&dir).unwrap();
    let v = ClipVision::load(&Scope::new(&map, Device::Cpu, Kind::Float).pp("vision_model"), &cfg)
        .unwrap();
    let name = "vision_pooler_output_from_clipvisionmodel";
    check(name, &v.forward(&pixels), &golden);
    compared.push(name.into());
    // Each fine-tuned CLIPVisionModel checkpoint.
    for task in TA8 {
        let id = format!("tanganke/clip-vit-base-patch32_{task}");
        let dir = hub().resolve(&id, RepoType::Model, None).unwrap();
        let (cfg, map) = load_vision_weights(&dir).unwrap();
        // The tensors the vision tower loads are exactly those the checkpoint file holds.
        let mut loaded = map.names().to_vec();
        loaded.sort();
        assert_eq!(loaded, file_names(&dir), "{id}: loaded tensors vs the file's");
        let v =
            ClipVision::load(&Scope::new(&map, Device::Cpu, Kind::Float).pp("vision_model"), &cfg)
                .unwrap();
        let name = format!("finetuned_{task}_pooler_output");
        check(&name, &v.forward(&pixels), &golden);
        compared.push(name);
    }
    assert_eq!(compared.len(), 6 + 1 + 8);
    assert_all_compared(&golden, &compared);
}

#[test]
fn config_b_gelu_matches_transformers() {
    let (golden, compared) = run_config("openai/clip-vit-base-patch16", "clip_b.safetensors");
    assert_all_compared(&golden, &compared);
}

#[test]
fn zeroshot_heads_are_cached_and_keyed_by_templates() {
    use fusion_bench::models::clip::ClipTokenizer;
    use fusion_bench::tasks::{task, zeroshot};
    let dir = hub().resolve("openai/clip-vit-base-patch32", RepoType::Model, None).unwrap();
    let clip = ClipModel::load(&dir, Device::Cpu).unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let spec = task("mnist").unwrap().clone();
    let fresh = zeroshot::zeroshot_head(&clip, &tok, &spec);
    let head = |spec: &fusion_bench::tasks::TaskSpec, loads: &std::cell::Cell<u32>| {
        zeroshot::cached_zeroshot_head(
            Some(cache.path()),
            &dir,
            Device::Cpu,
            || {
                loads.set(loads.get() + 1);
                Ok(&clip)
            },
            &tok,
            "mnist",
            spec,
        )
        .unwrap()
    };
    let loads = std::cell::Cell::new(0);
    let first = head(&spec, &loads);
    let files = || std::fs::read_dir(cache.path().join("zeroshot_heads")).unwrap().count();
    assert_eq!(files(), 1);
    assert_eq!(loads.get(), 1, "a head not cached needs the model");
    let second = head(&spec, &loads);
    assert_eq!(loads.get(), 1, "a cached head must not load the base model");
    assert!(first.equal(&fresh) && second.equal(&fresh));
    let mut edited = spec.clone();
    edited.templates.push("a drawing of the digit {}.".into());
    let other = head(&edited, &loads);
    assert_eq!(files(), 2, "an edited template list must not reuse the cached head");
    assert_eq!(loads.get(), 2);
    assert!(!other.equal(&fresh));
}
