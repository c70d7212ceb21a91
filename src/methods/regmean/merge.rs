//! RegMean's solve (FusionBench's `merging_with_regmean_weights`), accumulated model by model:
//! for each merged Linear weight `W` reading input slot `s`,
//! `W = (Σᵢ G'ᵢ)⁻¹ Σᵢ G'ᵢ Wᵢᵀ`, transposed back (`weight_transpose`), where
//! `G'ᵢ = Gᵢ ∘ (diag(1 − α) + α)` scales the off-diagonal entries by
//! `α = reduce_non_diagonal_ratio`. The two sums grow as each model's Grams arrive, in model
//! order (FusionBench's `sum` over its list), so only one model's Grams are held at a time
//! (FusionBench holds every model's). Every float32 operation is libtorch's, in FusionBench's
//! order; the inverse is `torch.inverse`'s LU.

use super::grams::slot;
use crate::methods::Checkpoint;
use crate::models::clip::encoder::LinearInput;
use crate::models::clip::VisionConfig;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// A condition number (1-norm, which can exceed the 2-norm one by up to the width `n`) above
/// `n` times this leaves no correct digit in float32 for sure: the solve is noise.
const NOISE_CONDITION: f64 = 1.0 / f32::EPSILON as f64;
/// A condition number (1-norm) above this is worth a warning (few of float32's 7 digits left).
const WARN_CONDITION: f64 = 1e5;

/// The two running sums of every merged Linear, and how to finish them.
pub(super) struct Accumulator {
    ratio: f64,
    transpose: bool,
    /// The merged Linear weights: name → its Gram slot.
    linears: HashMap<String, usize>,
    /// Per slot, `Σᵢ G'ᵢ` (`None` until a model arrives, or for slots no merged weight reads).
    sums: Vec<Option<Tensor>>,
    /// Per slot, the merged weights not yet solved that read it.
    users: Vec<usize>,
    /// Per merged weight, `Σᵢ G'ᵢ Wᵢᵀ`.
    products: HashMap<String, Tensor>,
    /// `diag(1 − α) + α` by width.
    masks: HashMap<i64, Tensor>,
    models: usize,
    /// Solves above [`WARN_CONDITION`]: how many, and the worst (module, condition number).
    ill: (usize, Option<(String, f64)>),
}

impl Accumulator {
    /// An accumulator for the Linear weights of `config`'s encoder that `merged(name)` keeps
    /// (the others are left to the caller: FusionBench excludes them before it merges).
    pub(super) fn new(
        config: &VisionConfig,
        ratio: f64,
        transpose: bool,
        merged: impl Fn(&str) -> bool,
    ) -> Self {
        let layers = config.encoder.num_hidden_layers as usize;
        let mut linears = HashMap::new();
        let mut users = vec![0; layers * LinearInput::ALL.len()];
        for l in 0..layers {
            for input in LinearInput::ALL {
                for module in input.modules() {
                    let name = format!("vision_model.encoder.layers.{l}.{module}.weight");
                    if merged(&name) {
                        users[slot(l, input)] += 1;
                        linears.insert(name, slot(l, input));
                    }
                }
            }
        }
        Self {
            ratio,
            transpose,
            linears,
            sums: (0..users.len()).map(|_| None).collect(),
            users,
            products: HashMap::new(),
            masks: HashMap::new(),
            models: 0,
            ill: (0, None),
        }
    }

    /// FusionBench's `reduce_non_diagonal_elements` factor for width `d`.
    fn mask(&mut self, d: i64) -> Tensor {
        let ratio = self.ratio;
        self.masks
            .entry(d)
            .or_insert_with(|| {
                let opts = (Kind::Float, tch::Device::Cpu);
                (Tensor::ones([d], opts) - ratio).diag(0) + Tensor::zeros([d, d], opts).fill_(ratio)
            })
            .shallow_clone()
    }

    /// Adds the next model (in pool order): its Grams, in [`super::grams::gram_names`] order.
    pub(super) fn add(&mut self, grams: &[Tensor], model: &Checkpoint) -> Result<()> {
        let _guard = tch::no_grad_guard();
        // Slot by slot, so that one reduced Gram is held at a time; the Linears in layer order.
        let mut linears: Vec<(usize, String)> =
            self.linears.iter().map(|(n, &s)| (s, n.clone())).collect();
        linears.sort();
        for (s, g) in grams.iter().enumerate() {
            if self.users.get(s).copied().unwrap_or(0) == 0 {
                continue;
            }
            let d = g.size()[0];
            let r = g * self.mask(d);
            for (_, name) in linears.iter().filter(|(slot, _)| *slot == s) {
                let w = model.get(name)?;
                let (rows, cols) = (r.size()[1], w.size()[usize::from(self.transpose)]);
                if rows != cols {
                    bail!(
                        "regmean: `{name}` of model `{}` is {:?} and its input's Gram {:?}: with method.weight_transpose={} they do not multiply (CLIP's Linear weights are [out, in]: weight_transpose=true)",
                        model.name(),
                        w.size(),
                        r.size(),
                        self.transpose
                    );
                }
                let p = if self.transpose { r.matmul(&w.tr()) } else { r.matmul(&w) };
                let sum = match self.products.remove(name) {
                    None => p,
                    Some(sum) => sum + p,
                };
                self.products.insert(name.clone(), sum);
            }
            self.sums[s] = Some(match self.sums[s].take() {
                None => r,
                Some(sum) => sum + r,
            });
        }
        self.models += 1;
        Ok(())
    }

    /// Warns once when some solves were ill-conditioned (which, how many, the worst).
    pub(super) fn warn_conditioning(&self) {
        if let (n, Some((module, condition))) = &self.ill {
            tracing::warn!(
                solved = self.linears.len(),
                ill_conditioned = n,
                worst = %module,
                condition,
                "regmean: some Gram sums are ill-conditioned (1-norm condition number above 1e5): those merged weights keep few correct digits in float32 (RUST_LOG=debug lists them; a smaller method.reduce_non_diagonal_ratio or more examples help)"
            );
        }
    }

    /// The merged value of `name` when RegMean solves it (`None` for every other tensor):
    /// `(Σ G')⁻¹ Σ G'Wᵀ`, transposed back. A singular or numerically singular `Σ G'` is an error
    /// naming the layer.
    pub(super) fn solve(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(&s) = self.linears.get(name) else { return Ok(None) };
        let _guard = tch::no_grad_guard();
        let module = name.trim_end_matches(".weight");
        let sum =
            self.sums[s].as_ref().with_context(|| format!("regmean: no Gram of `{module}`"))?;
        let product = self.products.remove(name).context("a Gram-weight product")?;
        let (inverse, info) = Tensor::linalg_inv_ex(sum, false);
        let info = info.int64_value(&[]);
        if info != 0 {
            bail!(
                "regmean: the Gram sum of `{module}`'s input ({}×{}, {} models) is singular (LU pivot {info} is zero): FusionBench's torch.inverse fails here. Use more examples (method.num_regmean_examples) or a smaller method.reduce_non_diagonal_ratio (it keeps {:.3} of the off-diagonal entries)",
                sum.size()[0],
                sum.size()[0],
                self.models,
                self.ratio
            );
        }
        let one_norm = |t: &Tensor| {
            t.abs().sum_dim_intlist([0i64].as_slice(), false, None::<Kind>).max().double_value(&[])
        };
        let condition = one_norm(sum) * one_norm(&inverse);
        let width = sum.size()[0] as f64;
        if !condition.is_finite() || condition > width * NOISE_CONDITION {
            bail!(
                "regmean: the Gram sum of `{module}`'s input is numerically singular (1-norm condition number {condition:.3e} > width × 1/ε of float32): its inverse, and FusionBench's, is noise. Use more examples (method.num_regmean_examples) or a smaller method.reduce_non_diagonal_ratio (now {})",
                self.ratio
            );
        }
        if condition > WARN_CONDITION {
            tracing::debug!(module, condition, "regmean: an ill-conditioned Gram sum");
            self.ill.0 += 1;
            if self.ill.1.as_ref().is_none_or(|(_, c)| condition > *c) {
                self.ill.1 = Some((module.to_string(), condition));
            }
        }
        let merged = inverse.matmul(&product);
        let merged = if self.transpose { merged.tr().contiguous() } else { merged };
        if merged.isfinite().all().int64_value(&[]) == 0 {
            bail!("regmean: `{name}` is not finite after the solve");
        }
        self.users[s] -= 1;
        if self.users[s] == 0 {
            self.sums[s] = None;
        }
        Ok(Some(merged))
    }
}
