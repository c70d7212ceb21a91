//! Spatter: a random "liquid layer" (Gaussian noise, smoothed, thresholded) laid over the image
//! as water (pale turquoise, severities with `mud = false`) or mud (brown), after Hendrycks'
//! `spatter` (FusionBench's and ImageNet-C's share the code, with different parameters).
//!
//! Every step follows the reference (skimage's `gaussian` is scipy's `gaussian_filter`,
//! `mode="nearest"`, `truncate=4`; the water's texture is OpenCV's chain, re-implemented from
//! its documented algorithms: `Canny(50, 150)`, `distanceTransform(DIST_L2, 5)` (the 5×5
//! chamfer), `threshold(TRUNC, 20)`, `blur(3×3)`, `equalizeHist`, `filter2D`, `blur`). Its
//! noise comes from our generator, so whole outputs are compared by their statistics (coverage);
//! the texture chain alone equals OpenCV's bit for bit on liquid layers made by the reference
//! (`tests/corrupt_parity.rs`).

use super::rng::Rng;
use super::ParamSet;
use crate::data::RgbImage;

/// One severity's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Mean of the liquid layer's noise.
    pub loc: f64,
    /// Standard deviation of the liquid layer's noise.
    pub scale: f64,
    /// σ of the Gaussian smoothing of the layer.
    pub sigma: f64,
    /// Values of the smoothed layer below this are dry.
    pub threshold: f64,
    /// Water: the overlay's strength; mud: σ of the mask's smoothing.
    pub intensity: f64,
    /// Mud (true) or water (false).
    pub mud: bool,
}

/// The parameters of `severity`.
pub fn params(set: ParamSet, severity: u8) -> Params {
    let p = |loc, scale, sigma, threshold, intensity, mud| Params {
        loc,
        scale,
        sigma,
        threshold,
        intensity,
        mud,
    };
    let table = match set {
        ParamSet::Cifar10c => [
            p(0.62, 0.1, 0.7, 0.7, 0.5, false),
            p(0.65, 0.1, 0.8, 0.7, 0.5, false),
            p(0.65, 0.3, 1.0, 0.69, 0.5, false),
            p(0.65, 0.1, 0.7, 0.69, 0.6, true),
            p(0.65, 0.1, 0.5, 0.68, 0.6, true),
        ],
        ParamSet::Imagenetc => [
            p(0.65, 0.3, 4.0, 0.69, 0.6, false),
            p(0.65, 0.3, 3.0, 0.68, 0.6, false),
            p(0.65, 0.3, 2.0, 0.68, 0.5, false),
            p(0.65, 0.3, 1.0, 0.65, 1.5, true),
            p(0.67, 0.4, 1.0, 0.65, 1.5, true),
        ],
    };
    table[usize::from(severity - 1)]
}

/// The 1-D kernel of scipy's `gaussian_filter` (`truncate=4`).
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let r = (4.0 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-r..=r).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// Separable Gaussian smoothing of a `w × h` plane, edges repeated (`mode="nearest"`).
pub fn gaussian_2d(plane: &[f64], w: usize, h: usize, sigma: f64) -> Vec<f64> {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let at = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let mut tmp = vec![0f64; plane.len()];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, &kj)| kj * plane[at(y as i64 + j as i64 - r, h) * w + x])
                .sum();
        }
    }
    let mut out = vec![0f64; plane.len()];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, &kj)| kj * tmp[y * w + at(x as i64 + j as i64 - r, w)])
                .sum();
        }
    }
    out
}

/// The liquid layer of a `w × h` image: smoothed noise, zero where below the threshold.
pub fn liquid_layer(w: usize, h: usize, p: &Params, rng: &mut Rng) -> Vec<f64> {
    let noise: Vec<f64> = (0..w * h).map(|_| p.loc + p.scale * rng.normal()).collect();
    let mut layer = gaussian_2d(&noise, w, h, p.sigma);
    for v in &mut layer {
        if *v < p.threshold {
            *v = 0.0;
        }
    }
    layer
}

/// `img` with spatter drawn from `rng`.
pub fn apply(img: &RgbImage, p: &Params, rng: &mut Rng) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let layer = liquid_layer(w, h, p, rng);
    let (overlay, keep): (Vec<[f64; 3]>, Vec<f64>) = if p.mud {
        let mask: Vec<f64> = layer.iter().map(|&v| f64::from(u8::from(v > p.threshold))).collect();
        let m: Vec<f64> = gaussian_2d(&mask, w, h, p.intensity)
            .into_iter()
            .map(|v| if v < 0.8 { 0.0 } else { v })
            .collect();
        let brown = [63.0 / 255.0, 42.0 / 255.0, 20.0 / 255.0];
        (m.iter().map(|&m| brown.map(|c| c * m)).collect(), m.iter().map(|&m| 1.0 - m).collect())
    } else {
        let l8: Vec<u8> = layer.iter().map(|&v| (v * 255.0) as u8).collect();
        let dist = water_texture(&l8, w, h);
        let m: Vec<f64> = l8.iter().zip(&dist).map(|(&l, d)| f64::from(l) * d).collect();
        let max = m.iter().copied().fold(0.0, f64::max);
        let scale = if max > 0.0 { p.intensity / max } else { 0.0 };
        let turquoise = [175.0 / 255.0, 238.0 / 255.0, 238.0 / 255.0];
        (m.iter().map(|&m| turquoise.map(|c| c * m * scale)).collect(), vec![1.0; w * h])
    };
    let mut data = Vec::with_capacity(img.data.len());
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            let x = f64::from(px[ch]) / 255.0 * keep[i] + overlay[i][ch];
            data.push(super::to_u8(x.clamp(0.0, 1.0) * 255.0));
        }
    }
    RgbImage { width: w, height: h, data }
}

/// OpenCV's `BORDER_REFLECT_101` index.
fn reflect101(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let i = if i < 0 { -i } else { i };
    (if i >= n { 2 * n - 2 - i } else { i }).clamp(0, n - 1) as usize
}

/// A 3×3 correlation of a `w × h` plane with `k` (row-major), edges `BORDER_REFLECT_101`.
fn filter3(src: &[f64], w: usize, h: usize, k: [f64; 9]) -> Vec<f64> {
    let (wi, hi) = (w as i64, h as i64);
    let mut out = vec![0f64; w * h];
    for y in 0..hi {
        for x in 0..wi {
            let mut s = 0.0;
            for (j, kv) in k.iter().enumerate() {
                let (dx, dy) = (j as i64 % 3 - 1, j as i64 / 3 - 1);
                s += kv * src[reflect101(y + dy, hi) * w + reflect101(x + dx, wi)];
            }
            out[(y * wi + x) as usize] = s;
        }
    }
    out
}

/// OpenCV's `saturate_cast<uchar>` of a float: rounded to nearest (ties to even), clamped.
fn sat_u8(v: f64) -> f64 {
    v.round_ties_even().clamp(0.0, 255.0)
}

/// OpenCV's `Canny(img, 50, 150)` (3×3 Sobel with replicated edges, L1 magnitude, non-maximum
/// suppression by the 22.5°/67.5° sectors, hysteresis over 8-neighbours): true on edges.
pub fn canny(img: &[u8], w: usize, h: usize, low: i32, high: i32) -> Vec<bool> {
    let (wi, hi) = (w as i64, h as i64);
    let px =
        |x: i64, y: i64| i32::from(img[(y.clamp(0, hi - 1) * wi + x.clamp(0, wi - 1)) as usize]);
    let (mut dx, mut dy, mut mag) = (vec![0i32; w * h], vec![0i32; w * h], vec![0i32; w * h]);
    for y in 0..hi {
        for x in 0..wi {
            let gx = px(x + 1, y - 1) + 2 * px(x + 1, y) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x - 1, y)
                - px(x - 1, y + 1);
            let gy = px(x - 1, y + 1) + 2 * px(x, y + 1) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x, y - 1)
                - px(x + 1, y - 1);
            let i = (y * wi + x) as usize;
            (dx[i], dy[i], mag[i]) = (gx, gy, gx.abs() + gy.abs());
        }
    }
    let m = |x: i64, y: i64| {
        if x < 0 || y < 0 || x >= wi || y >= hi {
            0
        } else {
            mag[(y * wi + x) as usize]
        }
    };
    // 0: candidate, 1: not an edge, 2: strong edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    const TG22: i64 = 13573;
    for y in 0..hi {
        for x in 0..wi {
            let i = (y * wi + x) as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (ax, ay) = (i64::from(dx[i].abs()), i64::from(dy[i].abs()) << 15);
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                v > m(x - 1, y) && v >= m(x + 1, y)
            } else if ay > tg22x + (ax << 16) {
                v > m(x, y - 1) && v >= m(x, y + 1)
            } else {
                let s = if (dx[i] ^ dy[i]) < 0 { -1 } else { 1 };
                v > m(x - s, y - 1) && v > m(x + s, y + 1)
            };
            if is_max {
                if v > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as i64, (i / w) as i64);
        for (ddx, ddy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
            let (nx, ny) = (x + ddx, y + ddy);
            if nx >= 0 && ny >= 0 && nx < wi && ny < hi {
                let j = (ny * wi + nx) as usize;
                if map[j] == 0 {
                    map[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    map.into_iter().map(|v| v == 2).collect()
}

/// OpenCV's `distanceTransform(src, DIST_L2, 5)` of the non-edge pixels: the 5×5 chamfer
/// distance (1, 1.4, 2.1969, in 16.16 fixed point) to the nearest edge pixel.
fn chamfer_distance(edges: &[bool], w: usize, h: usize) -> Vec<f64> {
    const FAR: i64 = 1 << 40;
    let (a, b, c) = (65536i64, 91750i64, 143977i64); // round(v · 2¹⁶)
    let mut d: Vec<i64> = edges.iter().map(|&e| if e { 0 } else { FAR }).collect();
    let (wi, hi) = (w as i64, h as i64);
    let mask: [(i64, i64, i64); 8] = [
        (-1, 0, a),
        (0, -1, a),
        (-1, -1, b),
        (1, -1, b),
        (-2, -1, c),
        (-1, -2, c),
        (1, -2, c),
        (2, -1, c),
    ];
    for sign in [1i64, -1] {
        for yy in 0..hi {
            for xx in 0..wi {
                let (x, y) = if sign == 1 { (xx, yy) } else { (wi - 1 - xx, hi - 1 - yy) };
                let mut best = d[(y * wi + x) as usize];
                for &(mx, my, cost) in &mask {
                    let (nx, ny) = (x + sign * mx, y + sign * my);
                    if nx >= 0 && ny >= 0 && nx < wi && ny < hi {
                        best = best.min(d[(ny * wi + nx) as usize] + cost);
                    }
                }
                d[(y * wi + x) as usize] = best;
            }
        }
    }
    d.into_iter().map(|v| f64::from(v as f32 / 65536.0)).collect()
}

/// The water's texture, the reference's OpenCV chain on the liquid layer as u8: Canny edges →
/// distance to them (truncated at 20) → 3×3 blur → u8 → histogram equalisation → emboss
/// (`filter2D` with `[[-2,-1,0],[-1,1,1],[0,1,2]]`) → 3×3 blur.
pub fn water_texture(l8: &[u8], w: usize, h: usize) -> Vec<f64> {
    let edges = canny(l8, w, h, 50, 150);
    // float32 distances, truncated at 20.
    let dist: Vec<f64> = chamfer_distance(&edges, w, h).into_iter().map(|v| v.min(20.0)).collect();
    // OpenCV's box filter: the 3×3 sum (exact in double), times 1/9 in double, then the output
    // type: float32 here (then `astype(uint8)` truncates), u8 (rounded) in the last blur.
    let boxk = [1.0; 9];
    let dist: Vec<u8> =
        filter3(&dist, w, h, boxk).into_iter().map(|v| (v * (1.0 / 9.0)) as f32 as u8).collect();
    // equalizeHist
    let mut hist = [0usize; 256];
    for &v in &dist {
        hist[usize::from(v)] += 1;
    }
    let first = hist.iter().position(|&c| c > 0).unwrap_or(0);
    let eq: Vec<f64> = if hist[first] == dist.len() {
        vec![first as f64; dist.len()]
    } else {
        let scale = 255.0f32 / (dist.len() - hist[first]) as f32;
        let mut lut = [0f64; 256];
        let mut sum = 0usize;
        for (i, l) in lut.iter_mut().enumerate().skip(first + 1) {
            sum += hist[i];
            *l = sat_u8(f64::from(sum as f32 * scale));
        }
        dist.iter().map(|&v| lut[usize::from(v)]).collect()
    };
    let emboss = [-2.0, -1.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0, 2.0];
    let embossed: Vec<f64> = filter3(&eq, w, h, emboss).into_iter().map(sat_u8).collect();
    filter3(&embossed, w, h, boxk).into_iter().map(|v| sat_u8(v * (1.0 / 9.0))).collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{flat, normal_sf};
    use super::*;

    /// The liquid covers the fraction `P(N(loc, σ_L²) ≥ threshold)` of the interior, where the
    /// smoothed noise's σ_L is `scale · Σ kᵢ²` (the separable kernel's 2-D L2 norm). Measured on
    /// 4 layers of 192×192 (the border, where `mode="nearest"` repeats samples, left out), the
    /// standard error is below 0.004 (smoothing correlates ~2πσ² pixels); the bound is 10 %
    /// relative plus 0.01.
    #[test]
    fn liquid_covers_the_expected_fraction_and_only_it_changes() {
        for set in [ParamSet::Cifar10c, ParamSet::Imagenetc] {
            for s in 1..=5 {
                let p = params(set, s);
                let k = gaussian_kernel(p.sigma);
                let sd = p.scale * k.iter().map(|v| v * v).sum::<f64>();
                let want = normal_sf((p.threshold - p.loc) / sd);
                let (n, border) = (192usize, k.len() / 2);
                let (mut covered, mut total) = (0usize, 0usize);
                for seed in 0..4 {
                    let layer = liquid_layer(n, n, &p, &mut Rng::new(seed));
                    for y in border..n - border {
                        for x in border..n - border {
                            covered += usize::from(layer[y * n + x] > 0.0);
                            total += 1;
                        }
                    }
                }
                let got = covered as f64 / total as f64;
                assert!((got - want).abs() < 0.1 * want + 0.01, "{set:?} {s}: {got} vs {want}");
                // Only wet pixels change (water adds colour where the layer is non-zero; mud
                // paints where the smoothed mask reaches 0.8, inside the smoothing's reach).
                let img = flat(64, 64, 100);
                let out = apply(&img, &p, &mut Rng::new(9));
                let layer = liquid_layer(64, 64, &p, &mut Rng::new(9));
                let changed: Vec<bool> =
                    out.data.chunks_exact(3).map(|px| px != [100, 100, 100]).collect();
                let wet = layer.iter().filter(|&&v| v > 0.0).count();
                let n_changed = changed.iter().filter(|&&c| c).count();
                if p.mud {
                    assert!(n_changed <= wet + 1, "{set:?} {s}: {n_changed} > {wet}");
                    assert!(out.data.chunks_exact(3).all(|px| px[0] >= px[1] && px[1] >= px[2]));
                } else {
                    assert!(
                        changed.iter().zip(&layer).all(|(&c, &l)| !c || l > 0.0),
                        "{set:?} {s}"
                    );
                }
            }
        }
    }
}
