//! Zero-shot classification heads (FusionBench's `HFCLIPClassifier.set_classification_task`):
//! for each class, encode every template's prompt (one padded batch per class), L2-normalise each
//! embedding, average over templates, normalise again; stack to `[classes, proj]`.

use super::TaskSpec;
use crate::models::clip::{l2_normalize, ClipModel, ClipTokenizer};
use crate::weights::{save_safetensors, SafetensorsFile, WeightMap, WeightSource};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The zero-shot head of `task` built with `clip`'s text tower, on `clip`'s device, on one
/// intra-op thread (its numbers would otherwise depend on the thread count; see
/// [`crate::device::single_threaded`]).
pub fn zeroshot_head(clip: &ClipModel, tokenizer: &ClipTokenizer, task: &TaskSpec) -> Tensor {
    crate::device::single_threaded(|| zeroshot_head_here(clip, tokenizer, task))
}

fn zeroshot_head_here(clip: &ClipModel, tokenizer: &ClipTokenizer, task: &TaskSpec) -> Tensor {
    let device = clip.logit_scale.device();
    let _guard = tch::no_grad_guard();
    let rows: Vec<Tensor> = (0..task.classnames.len())
        .map(|c| {
            let prompts = task.prompts(c);
            let (ids, mask, len) = tokenizer.encode_batch(&prompts);
            let shape = [prompts.len() as i64, len as i64];
            let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
            let mask = Tensor::from_slice(&mask).view(shape).to_device(device);
            let e = l2_normalize(&clip.text_features(&ids, Some(&mask)));
            l2_normalize(&e.mean_dim(0, false, Kind::Float))
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Logits of normalised image embeddings against a head, scaled by `logit_scale.exp()`:
/// `(scale · W fᵀ)ᵀ`, `[B, classes]`, as `HFCLIPClassifier.forward`.
pub fn logits(image_embeds: &Tensor, head: &Tensor, logit_scale: &Tensor) -> Tensor {
    let f = l2_normalize(image_embeds);
    (head.matmul(&f.tr()) * logit_scale.exp()).tr()
}

/// [`zeroshot_head`], cached on disk under `<cache_dir>/zeroshot_heads/`. The key covers the base
/// model's files (path, size, modification time, `config.json`), the task's class names and
/// templates and this program's version — so, unlike FusionBench's joblib cache, editing a
/// template or replacing the checkpoint never returns a stale head. A cache that cannot be read
/// or written is only a warning: the head is recomputed.
///
/// `clip` gives the base model only when a head must be computed (loading its text tower is
/// then the caller's cost, not every run's); a cached head is put on `device`.
pub fn cached_zeroshot_head<'m>(
    cache_dir: Option<&Path>,
    base_dir: &Path,
    device: Device,
    clip: impl FnOnce() -> anyhow::Result<&'m ClipModel>,
    tokenizer: &ClipTokenizer,
    task_name: &str,
    task: &TaskSpec,
) -> anyhow::Result<Tensor> {
    let Some(file) = cache_dir.and_then(|d| cache_file(d, base_dir, task_name, task)) else {
        return Ok(zeroshot_head(clip()?, tokenizer, task));
    };
    if let Ok(f) = SafetensorsFile::open(&file) {
        if let Ok(t) = f.tensor("head") {
            tracing::debug!(task = task_name, file = %file.display(), "zero-shot head from cache");
            return Ok(t.to_device(device));
        }
    }
    let head = zeroshot_head(clip()?, tokenizer, task);
    let mut map = WeightMap::new();
    map.insert("head", head.shallow_clone());
    let saved = file
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .map_err(|e| e.to_string())
        .and_then(|_| save_safetensors(&map, &file, None).map_err(|e| e.to_string()));
    if let Err(e) = saved {
        tracing::warn!(file = %file.display(), error = %e, "could not cache the zero-shot head");
    }
    Ok(head)
}

fn cache_file(
    cache_dir: &Path,
    base_dir: &Path,
    task_name: &str,
    task: &TaskSpec,
) -> Option<PathBuf> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // The numerics version: a change of how heads are computed never serves an old head.
    crate::version::code_version().hash(&mut h);
    std::fs::canonicalize(base_dir).ok()?.hash(&mut h);
    std::fs::read(base_dir.join("config.json")).ok()?.hash(&mut h);
    for entry in std::fs::read_dir(base_dir).ok()?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".safetensors") {
            let meta = std::fs::metadata(entry.path()).ok()?;
            (name, meta.len(), meta.modified().ok()).hash(&mut h);
        }
    }
    (&task.classnames, &task.templates).hash(&mut h);
    let safe: String = task_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    Some(cache_dir.join("zeroshot_heads").join(format!("{safe}-{:016x}.safetensors", h.finish())))
}
