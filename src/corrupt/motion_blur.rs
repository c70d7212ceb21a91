//! Motion blur: a one-sided Gaussian line kernel at a random angle in `[-45°, 45°)`.
//!
//! FusionBench (Hendrycks' CIFAR-10-C) calls ImageMagick's `MotionBlurImage(radius, sigma,
//! angle)`, ImageNet-C (`imagecorruptions`) re-implements it in numpy; both compute the same
//! kernel, reproduced here: `width = 2⌈radius⌉ + 1` taps with weights `exp(−i²/2σ²)` normalised
//! to sum 1, tap `i` reading the pixel at offset `(⌈i·cos θ − ½⌉, ⌈i·sin θ − ½⌉)`, edge pixels
//! repeated past the border. ImageMagick rounds the result; `imagecorruptions` truncates it and
//! drops the taps that would leave the image. Not bit for bit the reference (its angle comes
//! from numpy's generator and ImageMagick computes in 16-bit quanta).

use super::rng::Rng;
use super::ParamSet;
use crate::data::RgbImage;

/// `(radius, sigma)` of the kernel.
pub fn radius_sigma(set: ParamSet, severity: u8) -> (f64, f64) {
    let table = match set {
        ParamSet::Cifar10c => [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)],
        ParamSet::Imagenetc => [(10.0, 3.0), (15.0, 5.0), (15.0, 8.0), (15.0, 12.0), (20.0, 15.0)],
    };
    table[usize::from(severity - 1)]
}

/// The kernel: `(weight, dx, dy)` per tap, weights summing to 1, for an angle in degrees.
pub fn kernel(radius: f64, sigma: f64, angle_deg: f64) -> Vec<(f64, i64, i64)> {
    let width = (2.0 * radius.ceil() + 1.0) as usize;
    let raw: Vec<f64> = (0..width)
        .map(|i| {
            let i = i as f64;
            (-(i * i) / (2.0 * sigma * sigma)).exp() / ((2.0 * std::f64::consts::PI).sqrt() * sigma)
        })
        .collect();
    let norm: f64 = raw.iter().sum();
    let (px, py) =
        (width as f64 * angle_deg.to_radians().sin(), width as f64 * angle_deg.to_radians().cos());
    let h = px.hypot(py);
    raw.iter()
        .enumerate()
        .map(|(i, &w)| {
            let i = i as f64;
            (w / norm, (i * py / h - 0.5).ceil() as i64, (i * px / h - 0.5).ceil() as i64)
        })
        .collect()
}

/// `img` blurred along `angle_deg` with [`kernel`].
pub fn apply_at(
    img: &RgbImage,
    set: ParamSet,
    radius: f64,
    sigma: f64,
    angle_deg: f64,
) -> RgbImage {
    let (w, h) = (img.width as i64, img.height as i64);
    let mut taps = kernel(radius, sigma, angle_deg);
    if set == ParamSet::Imagenetc {
        // imagecorruptions stops at the first tap whose shift reaches the image size.
        if let Some(stop) = taps.iter().position(|&(_, dx, dy)| dx.abs() >= w || dy.abs() >= h) {
            taps.truncate(stop);
        }
    }
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0f64; 3];
            for &(k, dx, dy) in &taps {
                let sx = (x + dx).clamp(0, w - 1);
                let sy = (y + dy).clamp(0, h - 1);
                let i = ((sy * w + sx) * 3) as usize;
                for (a, &v) in acc.iter_mut().zip(&img.data[i..i + 3]) {
                    *a += k * f64::from(v);
                }
            }
            data.extend(acc.map(|a| match set {
                ParamSet::Cifar10c => a.round().clamp(0.0, 255.0) as u8,
                ParamSet::Imagenetc => super::to_u8(a.clamp(0.0, 255.0)),
            }));
        }
    }
    RgbImage { width: img.width, height: img.height, data }
}

/// `img` blurred at a random angle drawn from `rng`.
pub fn apply(
    img: &RgbImage,
    set: ParamSet,
    (radius, sigma): (f64, f64),
    rng: &mut Rng,
) -> RgbImage {
    let angle = rng.uniform_in(-45.0, 45.0);
    apply_at(img, set, radius, sigma, angle)
}
