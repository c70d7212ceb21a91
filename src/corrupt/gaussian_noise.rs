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

#[cfg(test)]
mod tests {
    use super::super::test_util::{flat, normal_sf};
    use super::*;

    /// The noise's σ, measured on a mid-grey 256×256 image (196 608 values): where clipping is
    /// negligible (σ < 0.11: 4.5 σ to either bound) from the sample variance, which also holds
    /// the truncation's 1/12 (standard error 0.16 % of σ, bound 2 %); at every severity from the
    /// fraction within one σ of the grey level, about 2Φ(1) − 1 = 0.68 (clipping starts beyond
    /// 1.3 σ; standard error 0.001, bound 0.01).
    #[test]
    fn noise_has_the_tables_sigma() {
        let img = flat(256, 256, 128);
        for set in [ParamSet::Cifar10c, ParamSet::Imagenetc] {
            for s in 1..=5 {
                let sd = sigma(set, s);
                let out = apply(&img, sd, &mut Rng::new(u64::from(s)));
                let n = out.data.len() as f64;
                if sd < 0.11 {
                    let v: Vec<f64> = out.data.iter().map(|&v| f64::from(v)).collect();
                    let mean = v.iter().sum::<f64>() / n;
                    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                    let got = (var - 1.0 / 12.0).sqrt() / 255.0;
                    assert!((got / sd - 1.0).abs() < 0.02, "{set:?} {s}: σ {got} vs {sd}");
                }
                let band = 255.0 * sd;
                let within =
                    out.data.iter().filter(|&&v| (f64::from(v) - 127.5).abs() <= band).count();
                // Integers within the band come from 128 + 255σz in [lo, hi + 1) (truncation).
                let (lo, hi) = ((127.5 - band).ceil(), (127.5 + band).floor());
                let want = normal_sf((lo - 128.0) / band) - normal_sf((hi + 1.0 - 128.0) / band);
                let got = within as f64 / n;
                assert!((got - want).abs() < 0.01, "{set:?} {s}: {got} within 1σ vs {want}");
            }
        }
    }
}
