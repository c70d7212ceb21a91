//! FusionBench's evaluation metrics (`CLIPVisionModelTaskPool._evaluate`, torchmetrics):
//! accuracy is `float32(correct) / float32(total)` (multiclass, micro); loss is the unweighted
//! mean of per-batch mean cross-entropies, accumulated in float32 (`MeanMetric`).

use serde::{Deserialize, Serialize};

/// Sums over the batches of one task. Adding two of them (in batch order) is exact for the
/// counts; the float32 loss sum follows batch order, as a single FusionBench process does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// Correct top-1 predictions.
    pub correct: u64,
    /// Examples seen.
    pub total: u64,
    /// Sum of per-batch mean losses (float32, as torchmetrics' state).
    pub loss_sum: f32,
    /// Number of batches.
    pub batches: u64,
}

impl TaskMetrics {
    /// Adds one batch: its number of correct predictions, its size and its mean loss.
    pub fn add_batch(&mut self, correct: u64, size: u64, mean_loss: f32) {
        self.correct += correct;
        self.total += size;
        self.loss_sum += mean_loss;
        self.batches += 1;
    }

    /// Accuracy as FusionBench reports it (a float32 widened to f64).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (self.correct as f32 / self.total as f32) as f64
    }

    /// Mean of per-batch losses (float32 division, widened to f64).
    pub fn loss(&self) -> f64 {
        if self.batches == 0 {
            return f64::NAN;
        }
        (self.loss_sum / self.batches as f32) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_is_float32_and_loss_weighs_batches_equally() {
        let mut m = TaskMetrics::default();
        for _ in 0..14 {
            m.add_batch(64, 128, 1.0);
        }
        m.add_batch(61, 88, 4.0);
        assert_eq!(m.correct, 957);
        assert_eq!(m.total, 1880);
        // FusionBench's DTD figure: 957/1880 in float32.
        assert_eq!(m.accuracy(), 0.5090425610542297);
        assert_ne!(m.accuracy(), 957.0 / 1880.0);
        assert_eq!(m.loss(), (18.0f32 / 15.0f32) as f64);
    }
}
