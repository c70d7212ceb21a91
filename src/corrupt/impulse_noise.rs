//! Impulse (salt-and-pepper) noise: each channel value is, with probability `amount`, replaced
//! by 0 or 255 (even odds), as skimage's `random_noise(mode="s&p", amount=c)` in Hendrycks'
//! `impulse_noise`.

use super::rng::Rng;
use super::ParamSet;
use crate::data::RgbImage;

/// The flipped fraction `amount`.
pub fn amount(set: ParamSet, severity: u8) -> f64 {
    let table = match set {
        ParamSet::Cifar10c => [0.01, 0.02, 0.03, 0.05, 0.07],
        ParamSet::Imagenetc => [0.03, 0.06, 0.09, 0.17, 0.27],
    };
    table[usize::from(severity - 1)]
}

/// `img` with salt-and-pepper noise on a fraction `amount` of its values.
pub fn apply(img: &RgbImage, amount: f64, rng: &mut Rng) -> RgbImage {
    let data = img
        .data
        .iter()
        .map(|&v| {
            let flipped = rng.uniform() < amount;
            let salted = rng.uniform() < 0.5;
            match (flipped, salted) {
                (true, true) => 255,
                (true, false) => 0,
                // x / 255 · 255 is x again, exactly, for every u8.
                _ => v,
            }
        })
        .collect();
    RgbImage { width: img.width, height: img.height, data }
}
