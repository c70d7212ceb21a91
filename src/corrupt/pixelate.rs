//! Pixelate: down-sampled with Pillow's `BOX` filter and up-sampled again.
//!
//! FusionBench's (Hendrycks' CIFAR-10-C) `pixelate` is written for 32×32 images: it resizes to
//! `int(32c) × int(32c)` and back to **32×32** whatever the input size, so with `cifar10c`
//! parameters every output is 32×32 (bit for bit FusionBench's). ImageNet-C's
//! (`imagecorruptions`) resizes to `int(w·c) × int(h·c)` with `BOX` and back to `w × h` with
//! `NEAREST`, keeping the size (both bit for bit Pillow's).

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

/// Pillow's `resize(size, NEAREST)` (`ImagingScaleAffine`): output column `x` reads input
/// column `(int)xo`, where `xo` starts at `½·w_in/w_out` and grows by `w_in/w_out` per column
/// (accumulated in double, as Pillow does), rows likewise; positions past the input stay black.
pub fn resize_nearest(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    let table = |n_out: usize, n_in: usize| -> Vec<Option<usize>> {
        let step = n_in as f64 / n_out as f64;
        let mut pos = step * 0.5;
        (0..n_out)
            .map(|_| {
                let i = (pos >= 0.0 && (pos as usize) < n_in).then_some(pos as usize);
                pos += step;
                i
            })
            .collect()
    };
    let (xs, ys) = (table(width, src.width), table(height, src.height));
    let mut data = vec![0u8; width * height * 3];
    for (y, sy) in ys.iter().enumerate() {
        let Some(sy) = sy else { continue };
        for (x, sx) in xs.iter().enumerate() {
            if let Some(sx) = sx {
                let i = (sy * src.width + sx) * 3;
                data[(y * width + x) * 3..(y * width + x + 1) * 3]
                    .copy_from_slice(&src.data[i..i + 3]);
            }
        }
    }
    RgbImage { width, height, data }
}
