//! Broken checkpoints give errors that name the file and the key, never a panic.

use fusion_bench::hub::{Hub, RepoType};
use fusion_bench::models::clip::{load_vision_weights, ClipModel};
use fusion_bench::weights::{save_safetensors, SafetensorsFile};
use std::path::{Path, PathBuf};
use tch::Device;

/// A scratch copy of the tiny fine-tuned SUN397 checkpoint.
fn scratch_model() -> (tempfile::TempDir, PathBuf) {
    let hub = Hub::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_home/hub"));
    let src = hub.resolve("tanganke/clip-vit-base-patch32_sun397", RepoType::Model, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    (tmp, dir)
}

fn error_of(dir: &Path) -> String {
    format!("{:#}", load_vision_weights(dir).expect_err("loading must fail"))
}

#[test]
fn truncated_and_corrupt_safetensors_name_the_file() {
    let (_tmp, dir) = scratch_model();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = error_of(&dir);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
    std::fs::write(&file, b"\xff\xff\xff\xff\xff\xff\xff\xffnot json").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = error_of(&dir);
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_and_wrong_shape_name_the_key() {
    let (_tmp, dir) = scratch_model();
    let file = dir.join("model.safetensors");
    let st = SafetensorsFile::open(&file).unwrap();
    let full = st.load_prefixed("").unwrap();
    drop(st);
    let victim = "vision_model.encoder.layers.1.mlp.fc1.bias";

    let mut missing = fusion_bench::weights::WeightMap::new();
    for (n, t) in full.iter().filter(|(n, _)| *n != victim) {
        missing.insert(n, t.shallow_clone());
    }
    save_safetensors(&missing, &file, None).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(victim) && e.contains("missing") && e.contains("model.safetensors"), "{e}");

    let mut reshaped = full.shallow_clone();
    let t = full.get(victim).unwrap();
    reshaped.insert(victim, t.narrow(0, 0, t.size()[0] - 1));
    save_safetensors(&reshaped, &file, None).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(victim) && e.contains("shape"), "{e}");
}

#[test]
fn unknown_activation_names_config_and_key() {
    let (_tmp, dir) = scratch_model();
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["hidden_act"] = "mystery_gelu".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = error_of(&dir);
    assert!(
        e.contains("config.json") && e.contains("hidden_act") && e.contains("mystery_gelu"),
        "{e}"
    );
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("config.json"), "{e}");
    // A CLIPModel loader pointed at a vision-only checkpoint explains itself.
    std::fs::write(&cfg, text).unwrap();
    let e = format!("{:#}", ClipModel::load(&dir, Device::Cpu).unwrap_err());
    assert!(e.contains("model_type") || e.contains("text_model"), "{e}");
}
