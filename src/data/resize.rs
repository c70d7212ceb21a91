//! Pillow's `Image.resize(size, Image.BICUBIC)` (and `Image.BOX`, for the pixelate corruption)
//! for 8-bit RGB, bit for bit.
//!
//! A port of the algorithm of Pillow's `libImaging/Resample.c` (`ImagingResample`), written from
//! its description: a separable convolution, the horizontal pass first (only when the width
//! changes) and then the vertical pass (only when the height changes), each rounding and clipping
//! to u8. Per output sample the filter (cubic convolution, a = −0.5, support 2) is stretched by
//! `max(in/out, 1)`, evaluated in double at `(x − center + 0.5) / filterscale` over the input
//! samples `[(int)(center − support + 0.5), (int)(center + support + 0.5))`, normalised to sum 1,
//! and turned into fixed point with 22 fractional bits (`(int)(w·2²² ± 0.5)`); the accumulator
//! starts at `2²¹` (rounding) and the result is `clamp(acc >> 22, 0, 255)`.

use super::image::RgbImage;

/// Fractional bits of the fixed-point filter weights (Pillow: `32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Cubic convolution kernel with a = −0.5 (Pillow's `bicubic_filter`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: output sample `i` reads `count[i]` input samples from
/// `start[i]` with weights `weights[i * ksize ..][.. count[i]]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `box_filter`: 1 on `(-0.5, 0.5]`, else 0 (support 0.5).
fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

/// A resampling filter: the function and its support (Pillow's `struct filter`).
#[derive(Clone, Copy)]
struct Filter {
    f: fn(f64) -> f64,
    support: f64,
}

const BICUBIC: Filter = Filter { f: bicubic, support: 2.0 };
const BOX: Filter = Filter { f: box_filter, support: 0.5 };

fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = (filter.f)(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + n];
        for (dst, &w) in row.iter_mut().zip(&k[..n]) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *dst = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        start.push(xmin);
        count.push(n);
    }
    Taps { ksize, start, count, weights }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize an RGB image to `out_width × out_height` with Pillow's bicubic filter (exact).
///
/// Same size → a copy, as in Pillow. Zero output sizes give an empty image.
pub fn resize_bicubic(src: &RgbImage, out_width: usize, out_height: usize) -> RgbImage {
    resize_with(src, out_width, out_height, BICUBIC)
}

/// Resize an RGB image to `out_width × out_height` with Pillow's `Image.BOX` filter (exact):
/// each output pixel is the fixed-point average of the input pixels its box covers.
pub fn resize_box(src: &RgbImage, out_width: usize, out_height: usize) -> RgbImage {
    resize_with(src, out_width, out_height, BOX)
}

fn resize_with(src: &RgbImage, out_width: usize, out_height: usize, filter: Filter) -> RgbImage {
    if out_width == 0 || out_height == 0 || src.width == 0 || src.height == 0 {
        return RgbImage {
            width: out_width,
            height: out_height,
            data: vec![0; out_width * out_height * 3],
        };
    }
    let need_h = out_width != src.width;
    let need_v = out_height != src.height;
    // Pillow 13 (`ImagingResampleInner`): when the height shrinks more than twice as much as the
    // width (in pixels), the vertical pass runs first; otherwise horizontal first.
    let (dh, dw) = (src.height as i64 - out_height as i64, src.width as i64 - out_width as i64);
    let vertical_first = dh > 0 && dh > dw * 2;
    let mut img = std::borrow::Cow::Borrowed(src);
    if vertical_first && need_v {
        img = std::borrow::Cow::Owned(vertical_pass(&img, out_height, filter));
    }
    if need_h {
        img = std::borrow::Cow::Owned(horizontal_pass(&img, out_width, filter));
    }
    if !vertical_first && need_v {
        img = std::borrow::Cow::Owned(vertical_pass(&img, out_height, filter));
    }
    img.into_owned()
}

fn horizontal_pass(src: &RgbImage, out_width: usize, filter: Filter) -> RgbImage {
    let htaps = taps(src.width, out_width, filter);
    let mut out = vec![0u8; src.height * out_width * 3];
    for (y, out_row) in out.chunks_exact_mut(out_width * 3).enumerate() {
        let line = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        horizontal_row(line, out_row, &htaps);
    }
    RgbImage { width: out_width, height: src.height, data: out }
}

fn vertical_pass(src: &RgbImage, out_height: usize, filter: Filter) -> RgbImage {
    let vtaps = taps(src.height, out_height, filter);
    let stride = src.width * 3;
    let mut out = vec![0u8; out_height * stride];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        acc.fill(HALF);
        let k = &vtaps.weights[yy * vtaps.ksize..yy * vtaps.ksize + vtaps.count[yy]];
        let y0 = vtaps.start[yy];
        for (dy, &w) in k.iter().enumerate() {
            let line = &src.data[(y0 + dy) * stride..(y0 + dy + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(w));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage { width: src.width, height: out_height, data: out }
}

fn horizontal_row(line: &[u8], out_row: &mut [u8], t: &Taps) {
    for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
        let k = &t.weights[xx * t.ksize..xx * t.ksize + t.count[xx]];
        let src = &line[t.start[xx] * 3..(t.start[xx] + k.len()) * 3];
        let (mut r, mut g, mut b) = (HALF, HALF, HALF);
        for (p, &w) in src.chunks_exact(3).zip(k) {
            r = r.wrapping_add(i32::from(p[0]).wrapping_mul(w));
            g = g.wrapping_add(i32::from(p[1]).wrapping_mul(w));
            b = b.wrapping_add(i32::from(p[2]).wrapping_mul(w));
        }
        px[0] = clip8(r);
        px[1] = clip8(g);
        px[2] = clip8(b);
    }
}
