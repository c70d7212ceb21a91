//! Contrast: every channel pulled towards its mean over the image,
//! `clip((x − mean) · c + mean, 0, 1) · 255` on `x = pixel / 255`, truncated to u8 (Hendrycks'
//! `contrast`; deterministic, bit for bit FusionBench's on its parameters).

use super::ParamSet;
use crate::data::RgbImage;

/// The factor `c` kept of each pixel's deviation from its channel mean.
pub fn factor(set: ParamSet, severity: u8) -> f64 {
    let table = match set {
        ParamSet::Cifar10c => [0.75, 0.5, 0.4, 0.3, 0.15],
        ParamSet::Imagenetc => [0.4, 0.3, 0.2, 0.1, 0.05],
    };
    table[usize::from(severity - 1)]
}

/// Contrast-reduced copy of `img` with factor `c`.
pub fn apply(img: &RgbImage, c: f64) -> RgbImage {
    let n = (img.width * img.height) as f64;
    // numpy's mean over axes (0, 1) of an HxWx3 array: one running sum per channel, in pixel
    // order, then a division by the count.
    let mut sums = [0f64; 3];
    for px in img.data.chunks_exact(3) {
        for (s, &v) in sums.iter_mut().zip(px) {
            *s += f64::from(v) / 255.0;
        }
    }
    let means = sums.map(|s| s / n);
    let data = img
        .data
        .chunks_exact(3)
        .flat_map(|px| {
            [0, 1, 2].map(|ch| {
                let x = f64::from(px[ch]) / 255.0;
                let m = means[ch];
                super::to_u8(((x - m) * c + m).clamp(0.0, 1.0) * 255.0)
            })
        })
        .collect();
    RgbImage { width: img.width, height: img.height, data }
}
