//! Zero-shot classification heads (FusionBench's `HFCLIPClassifier.set_classification_task`):
//! for each class, encode every template's prompt (one padded batch per class), L2-normalise each
//! embedding, average over templates, normalise again; stack to `[classes, proj]`.

use super::TaskSpec;
use crate::models::clip::{l2_normalize, ClipModel, ClipTokenizer};
use tch::{Kind, Tensor};

/// The zero-shot head of `task` built with `clip`'s text tower, on `clip`'s device.
pub fn zeroshot_head(clip: &ClipModel, tokenizer: &ClipTokenizer, task: &TaskSpec) -> Tensor {
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
