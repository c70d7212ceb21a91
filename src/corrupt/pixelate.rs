//! Pixelate: down-sampled with Pillow's `BOX` filter and up-sampled again.
//!
//! FusionBench's (Hendrycks' CIFAR-10-C) `pixelate` is written for 32×32 images: it resizes to
//! `int(32c) × int(32c)` and back to **32×32** whatever the input size, so with `cifar10c`
//! parameters every output is 32×32 (bit for bit FusionBench's). ImageNet-C's
//! (`imagecorruptions`) resizes to `int(w·c) × int(h·c)` with `BOX` and back to `w × h` with
//! `NEAREST`, keeping the size.

use super::ParamSet;
use crate::data::resize::resize_box;
use crate::data::RgbImage;

/// The scale `c` of the intermediate image.
pub fn scale(set: ParamSet, severity: u8) -> f64 {
    let table = match set {
        ParamSet::Cifar10c => [0.95, 0.9, 0.85, 0.75, 0.65],
        ParamSet::Imagenetc => [0.6, 0.5, 0.4, 0.3, 0.25],
    };
    table[usize::from(severity - 1)]
}

/// The pixelated image.
pub fn apply(img: &RgbImage, set: ParamSet, c: f64) -> RgbImage {
    match set {
        ParamSet::Cifar10c => {
            let s = ((32.0 * c) as usize).max(1);
            resize_box(&resize_box(img, s, s), 32, 32)
        }
        ParamSet::Imagenetc => {
            let w = ((img.width as f64 * c) as usize).max(1);
            let h = ((img.height as f64 * c) as usize).max(1);
            resize_nearest(&resize_box(img, w, h), img.width, img.height)
        }
    }
}

/// Nearest-neighbour resize: output pixel `(x, y)` takes input pixel
/// `(⌊(x + ½)·w_in/w_out⌋, ⌊(y + ½)·h_in/h_out⌋)`.
pub fn resize_nearest(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    let pick = |o: usize, n_out: usize, n_in: usize| {
        (((o as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in.saturating_sub(1))
    };
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let sy = pick(y, height, src.height);
        for x in 0..width {
            let sx = pick(x, width, src.width);
            let i = (sy * src.width + sx) * 3;
            data.extend_from_slice(&src.data[i..i + 3]);
        }
    }
    RgbImage { width, height, data }
}
