//! Golden parity of the CLIP forward against transformers 4.57.6 (fp32, CPU).
//!
//! The goldens in `tests/fixtures/golden/clip_{a,b}.safetensors` were written by
//! `scripts/fixtures/golden_clip.py` from the tiny fixture models in `tests/fixtures/hf_home`:
//! config A (quick_gelu, patch 8, legacy EOS pooling, with eight fine-tuned vision towers) and
//! config B (gelu, patch 7, other widths, EOS-id pooling).

use fusion_bench::hub::{Hub, RepoType};
use fusion_bench::models::clip::{load_vision_weights, ClipModel, ClipVision};
use fusion_bench::tasks::TA8;
use fusion_bench::weights::{SafetensorsFile, Scope, WeightSource};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn hub() -> Hub {
    Hub::new(fixtures().join("hf_home/hub"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn check(name: &str, ours: &Tensor, golden: &SafetensorsFile) -> f64 {
    let want = golden.tensor(name).unwrap();
    let d = max_abs_diff(&ours.to_kind(Kind::Float), &want.to_kind(Kind::Float));
    println!("{name}: max |diff| = {d:.3e}");
    assert!(d <= TOL, "{name}: max abs diff {d:e} > {TOL:e}");
    d
}

fn run_config(model_id: &str, golden_file: &str) -> SafetensorsFile {
    let _g = tch::no_grad_guard();
    let dir = hub().resolve(model_id, RepoType::Model, None).unwrap();
    let clip = ClipModel::load(&dir, Device::Cpu).unwrap();
    let golden = SafetensorsFile::open(fixtures().join("golden").join(golden_file)).unwrap();
    let pixels = golden.tensor("pixel_values").unwrap();
    let ids = golden.tensor("input_ids").unwrap();
    let mask = golden.tensor("attention_mask").unwrap();
    check("vision_pooler_output", &clip.vision.forward(&pixels), &golden);
    check("image_embeds", &clip.image_features(&clip.vision, &pixels), &golden);
    check("text_pooler_output", &clip.text.forward(&ids, Some(&mask)), &golden);
    check("text_embeds", &clip.text_features(&ids, Some(&mask)), &golden);
    check("logits_per_image", &clip.logits_per_image(&pixels, &ids, Some(&mask)), &golden);
    golden
}

#[test]
fn config_a_quick_gelu_matches_transformers() {
    let golden = run_config("openai/clip-vit-base-patch32", "clip_a.safetensors");
    let _g = tch::no_grad_guard();
    let pixels = golden.tensor("pixel_values").unwrap();
    // The pretrained checkpoint loaded as a vision-only model, through an in-memory weight map.
    let dir = hub().resolve("openai/clip-vit-base-patch32", RepoType::Model, None).unwrap();
    let (cfg, map) = load_vision_weights(&dir).unwrap();
    let v = ClipVision::load(&Scope::new(&map, Device::Cpu, Kind::Float).pp("vision_model"), &cfg)
        .unwrap();
    check("vision_pooler_output_from_clipvisionmodel", &v.forward(&pixels), &golden);
    // Each fine-tuned CLIPVisionModel checkpoint.
    for task in TA8 {
        let id = format!("tanganke/clip-vit-base-patch32_{task}");
        let dir = hub().resolve(&id, RepoType::Model, None).unwrap();
        let (cfg, map) = load_vision_weights(&dir).unwrap();
        assert_eq!(map.names()[0], "vision_model.embeddings.class_embedding");
        let v =
            ClipVision::load(&Scope::new(&map, Device::Cpu, Kind::Float).pp("vision_model"), &cfg)
                .unwrap();
        check(&format!("finetuned_{task}_pooler_output"), &v.forward(&pixels), &golden);
    }
}

#[test]
fn config_b_gelu_matches_transformers() {
    run_config("openai/clip-vit-base-patch16", "clip_b.safetensors");
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
    let first =
        zeroshot::cached_zeroshot_head(Some(cache.path()), &dir, &clip, &tok, "mnist", &spec);
    let files = || std::fs::read_dir(cache.path().join("zeroshot_heads")).unwrap().count();
    assert_eq!(files(), 1);
    let second =
        zeroshot::cached_zeroshot_head(Some(cache.path()), &dir, &clip, &tok, "mnist", &spec);
    assert!(first.equal(&fresh) && second.equal(&fresh));
    let mut edited = spec.clone();
    edited.templates.push("a drawing of the digit {}.".into());
    let other =
        zeroshot::cached_zeroshot_head(Some(cache.path()), &dir, &clip, &tok, "mnist", &edited);
    assert_eq!(files(), 2, "an edited template list must not reuse the cached head");
    assert!(!other.equal(&fresh));
}
