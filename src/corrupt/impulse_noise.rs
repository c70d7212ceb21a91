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

#[cfg(test)]
mod tests {
    use super::super::test_util::flat;
    use super::*;

    /// On a mid-grey 256×256 image, the flipped fraction is `amount` and half the flips are
    /// salt, within 6 standard errors (< 0.0036 and < 0.02 of the flips).
    #[test]
    fn flips_the_tables_fraction_half_salt() {
        let img = flat(256, 256, 128);
        for set in [ParamSet::Cifar10c, ParamSet::Imagenetc] {
            for s in 1..=5 {
                let p = amount(set, s);
                let out = apply(&img, p, &mut Rng::new(40 + u64::from(s)));
                let n = out.data.len() as f64;
                let salt = out.data.iter().filter(|&&v| v == 255).count() as f64;
                let pepper = out.data.iter().filter(|&&v| v == 0).count() as f64;
                assert!(out.data.iter().all(|&v| v == 0 || v == 128 || v == 255));
                let f = (salt + pepper) / n;
                let se = (p * (1.0 - p) / n).sqrt();
                assert!((f - p).abs() < 6.0 * se, "{set:?} {s}: flipped {f} vs {p}");
                let half_se = (0.25 / (salt + pepper)).sqrt();
                assert!((salt / (salt + pepper) - 0.5).abs() < 6.0 * half_se, "{set:?} {s}");
            }
        }
    }
}
