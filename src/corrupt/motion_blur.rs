//! Motion blur: a one-sided Gaussian line kernel at a random angle in `[-45°, 45°)`.
//!
//! FusionBench (Hendrycks' CIFAR-10-C) calls ImageMagick's `MotionBlurImage(radius, sigma,
//! angle)`, ImageNet-C (`imagecorruptions`) re-implements it in numpy; both compute the same
//! kernel, reproduced here: `width = 2⌈radius⌉ + 1` taps with weights `exp(−i²/2σ²)` normalised
//! to sum 1, tap `i` reading the pixel at offset `(⌈i·cos θ − ½⌉, ⌈i·sin θ − ½⌉)`, edge pixels
//! repeated past the border. ImageMagick (6.9, Q16) rounds the sum to a 16-bit quantum and
//! writes quantum / 257; `imagecorruptions` truncates it and drops the taps that would leave the
//! image. Given the angle (the only random draw; ours comes from our generator), the result is
//! FusionBench's bit for bit, and ImageNet-C's to within one level on 0.04 % of values (numpy's
//! vectorised `exp` differs from libm's in the last bit of a few kernel weights, CPU-dependent);
//! `tests/corrupt_parity.rs` checks both at fixed angles.

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

/// numpy's `np.sum` of a float64 vector (pairwise: below 8 values a plain loop, else eight
/// interleaved partial sums combined as `((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`, then the rest;
/// halves above 128 values).
pub fn numpy_sum(v: &[f64]) -> f64 {
    let n = v.len();
    if n < 8 {
        return v.iter().fold(0.0, |a, &x| a + x);
    }
    if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&v[..8]);
        let mut i = 8;
        while i + 8 <= n {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += v[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &v[i..] {
            res += x;
        }
        return res;
    }
    let half = (n / 2) / 8 * 8;
    numpy_sum(&v[..half]) + numpy_sum(&v[half..])
}

/// The kernel: `(weight, dx, dy)` per tap, weights summing to 1, for an angle in degrees.
pub fn kernel(radius: f64, sigma: f64, angle_deg: f64) -> Vec<(f64, i64, i64)> {
    kernel_for(ParamSet::Cifar10c, radius, sigma, angle_deg)
}

/// [`kernel`] with the normalising sum and angle arithmetic of the table's reference:
/// ImageMagick's running sum and `MagickPI·θ/180` (`cifar10c`), numpy's pairwise sum and
/// `np.deg2rad` (`imagenetc`).
pub fn kernel_for(set: ParamSet, radius: f64, sigma: f64, angle_deg: f64) -> Vec<(f64, i64, i64)> {
    let width = (2.0 * radius.ceil() + 1.0) as usize;
    let raw: Vec<f64> = (0..width)
        .map(|i| {
            let i = i as f64;
            (-(i * i) / (2.0 * sigma * sigma)).exp() / ((2.0 * std::f64::consts::PI).sqrt() * sigma)
        })
        .collect();
    let (norm, rad) = match set {
        ParamSet::Cifar10c => {
            (raw.iter().fold(0.0, |a, &x| a + x), std::f64::consts::PI * angle_deg / 180.0)
        }
        ParamSet::Imagenetc => (numpy_sum(&raw), angle_deg * (std::f64::consts::PI / 180.0)),
    };
    let (px, py) = (width as f64 * rad.sin(), width as f64 * rad.cos());
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
    let mut taps = kernel_for(set, radius, sigma, angle_deg);
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
                // (ImageMagick multiplies the 16-bit quantum v·257 by k; k·(v·257) and
                // (k·v)·257 may differ in the last bit, which the rounding to a quantum hides.)
            }
            data.extend(acc.map(|a| match set {
                ParamSet::Cifar10c => {
                    // ImageMagick 6.9 Q16: pixels are v·257, the sum rounded to a 16-bit quantum
                    // (`ClampToQuantum`); the 8-bit PNG it writes holds quantum / 257, floored
                    // (found against Wand's output: exact on all 50 golden cases).
                    let q = (a * 257.0).clamp(0.0, 65535.0);
                    let q = if q >= 65535.0 { 65535u32 } else { (q + 0.5) as u32 };
                    (q / 257) as u8
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_a_one_sided_gaussian_line_of_2_ceil_r_plus_1_taps() {
        for set in [ParamSet::Cifar10c, ParamSet::Imagenetc] {
            for s in 1..=5 {
                let (r, sigma) = radius_sigma(set, s);
                for angle in [-45.0, -10.0, 0.0, 30.0, 44.9] {
                    let k = kernel(r, sigma, angle);
                    assert_eq!(k.len(), 2 * r.ceil() as usize + 1);
                    assert!((k.iter().map(|t| t.0).sum::<f64>() - 1.0).abs() < 1e-12);
                    assert!(k.windows(2).all(|w| w[1].0 < w[0].0), "weights decrease");
                    // Ratio of neighbouring weights: exp(-(2i+1)/2σ²).
                    let ratio = k[1].0 / k[0].0;
                    assert!((ratio - (-1.0 / (2.0 * sigma * sigma)).exp()).abs() < 1e-12);
                    assert_eq!((k[0].1, k[0].2), (0, 0));
                    let t: f64 = angle;
                    for (i, &(_, dx, dy)) in k.iter().enumerate() {
                        // Each tap lies within half a pixel of the line at angle θ, i pixels out.
                        let (ex, ey) =
                            (i as f64 * t.to_radians().cos(), i as f64 * t.to_radians().sin());
                        assert!(
                            (dx as f64 - ex).abs() <= 0.5 + 1e-9
                                && (dy as f64 - ey).abs() <= 0.5 + 1e-9
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_point_is_smeared_into_the_kernels_line() {
        // A white pixel at (20, 20) on black, blurred along 0°: output (x, 20) reads (x + i, 20),
        // so the point shows at x = 20 - i with weight k_i.
        let (w, h) = (41, 41);
        let mut data = vec![0u8; w * h * 3];
        data[(20 * w + 20) * 3..(20 * w + 21) * 3].fill(255);
        let img = RgbImage { width: w, height: h, data };
        let (r, sigma) = radius_sigma(ParamSet::Cifar10c, 5);
        let out = apply_at(&img, ParamSet::Cifar10c, r, sigma, 0.0);
        let k = kernel(r, sigma, 0.0);
        // ImageMagick's 8-bit value of 255·k: the 16-bit quantum rounded, divided by 257.
        let level = |wt: f64| ((255.0 * 257.0 * wt + 0.5) as u32 / 257) as u8;
        for (i, &(wt, _, _)) in k.iter().enumerate() {
            assert_eq!(out.data[(20 * w + 20 - i) * 3], level(wt), "tap {i}");
        }
        let lit = out.data.chunks_exact(3).filter(|p| p[0] > 0).count();
        let want = k.iter().filter(|t| level(t.0) > 0).count();
        assert_eq!(lit, want);
        // A random angle is drawn from the generator, in [-45, 45).
        let mut a = Rng::new(3);
        let angle = a.clone().uniform_in(-45.0, 45.0);
        assert!((-45.0..45.0).contains(&angle));
        assert_eq!(
            apply(&img, ParamSet::Cifar10c, (r, sigma), &mut a),
            apply_at(&img, ParamSet::Cifar10c, r, sigma, angle)
        );
    }
}
