//! Gaussian noise: `clip(x + N(0, σ²), 0, 1) · 255` on `x = pixel / 255`, independently per
//! channel value, truncated to u8 (Hendrycks' `gaussian_noise`).

use super::rng::Rng;
use super::ParamSet;
use crate::data::RgbImage;

/// The noise's standard deviation σ, in units of the full range.
pub fn sigma(set: ParamSet, severity: u8) -> f64 {
    let table = match set {
        ParamSet::Cifar10c => [0.04, 0.06, 0.08, 0.09, 0.10],
        ParamSet::Imagenetc => [0.08, 0.12, 0.18, 0.26, 0.38],
    };
    table[usize::from(severity - 1)]
}

/// `img` with Gaussian noise of standard deviation `sigma` added.
pub fn apply(img: &RgbImage, sigma: f64, rng: &mut Rng) -> RgbImage {
    let data = img
        .data
        .iter()
        .map(|&v| {
            let x = f64::from(v) / 255.0 + sigma * rng.normal();
            super::to_u8(x.clamp(0.0, 1.0) * 255.0)
        })
        .collect();
    RgbImage { width: img.width, height: img.height, data }
}
