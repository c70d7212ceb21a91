//! The test-time objective of AdaMerging, WE-MoE and Concrete: the mean Shannon entropy of the
//! predictions, as FusionBench's `fusion_bench/method/adamerging/entropy_loss.py`:
//! `-(softmax(z) · log(softmax(z) + 1e-8)).sum(-1).mean()`.

use tch::{Kind, Tensor};

/// FusionBench's `eps` inside the logarithm.
pub const EPS: f64 = 1e-8;

/// Mean entropy of `logits` `[B, classes]` (a 0-d float32 tensor, differentiable).
pub fn entropy_loss(logits: &Tensor) -> Tensor {
    let probs = logits.softmax(-1, Kind::Float);
    let plogp = &probs * (&probs + EPS).log();
    -plogp.sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_predictions_have_log_classes_entropy_and_confident_ones_almost_none() {
        let uniform = Tensor::zeros([4, 10], (Kind::Float, tch::Device::Cpu));
        let h = entropy_loss(&uniform).double_value(&[]);
        assert!((h - (10f64).ln()).abs() < 1e-5, "{h}");
        let sharp = Tensor::from_slice(&[100f32, 0.0, 0.0, 0.0, 100.0, 0.0]).view([2, 3]);
        assert!(entropy_loss(&sharp).double_value(&[]) < 1e-6);
    }

    #[test]
    fn its_gradient_pushes_towards_confidence() {
        let z = Tensor::from_slice(&[1f32, 0.5, 0.0]).view([1, 3]).set_requires_grad(true);
        entropy_loss(&z).backward();
        let g = Vec::<f32>::try_from(z.grad().view([-1])).unwrap();
        assert!(g[0] < 0.0 && g[2] > 0.0, "descending the entropy raises the top logit: {g:?}");
    }
}
