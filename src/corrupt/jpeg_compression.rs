//! JPEG compression: the image encoded as JPEG at quality `q` and decoded again, as Pillow's
//! `save(format="JPEG", quality=q)` then `Image.open` (Hendrycks' `jpeg_compression`).
//!
//! Encoder: libjpeg-turbo's defaults (the `mozjpeg` crate in its libjpeg-compatible profile,
//! `JCP_FASTEST`: no trellis quantisation, no scan optimisation, baseline Huffman tables), the
//! Annex K tables scaled by `jpeg_set_quality(q)`, 4:2:0 chroma subsampling, the accurate integer
//! DCT, as Pillow 13 encodes RGB. Decoder: the project's Pillow-exact
//! [`crate::data::decode_rgb`]. Bit for bit FusionBench's and `imagecorruptions`' (the file's bytes
//! too, checked for FusionBench's qualities).
//! Below quality 24 (ImageNet-C's severities 2-5) Pillow also clamps the tables to 8 bits
//! (`force_baseline`), which the crate's `set_quality` does not: there the tables are set
//! explicitly (see [`encode`]).

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{CorruptError, ParamSet};
use crate::data::{decode_rgb, RgbImage};

/// The JPEG quality `q` (1-100).
pub fn quality(set: ParamSet, severity: u8) -> u8 {
    let table = match set {
        ParamSet::Cifar10c => [80, 65, 58, 50, 40],
        ParamSet::Imagenetc => [25, 18, 15, 10, 7],
    };
    table[usize::from(severity - 1)]
}

/// `img` encoded as baseline JPEG at `quality` with Pillow's settings.
pub fn encode(img: &RgbImage, quality: u8) -> Result<Vec<u8>, CorruptError> {
    let result = catch_unwind(AssertUnwindSafe(|| -> std::io::Result<Vec<u8>> {
        let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        comp.set_fastest_defaults();
        comp.set_size(img.width, img.height);
        comp.set_quality(f32::from(quality));
        if quality < 24 {
            // libjpeg: scale = 5000 / q (integer), entry = (base · scale + 50) / 100, clamped to
            // 1..=255 with force_baseline (Pillow's). The crate's `jpeg_set_quality` does not
            // clamp; `QTable::scaled` does, computing round(base · 50/q') in f32: with
            // q' = 100 · 50 / scale the product is base · scale/100 within 3e-5, and no
            // (base, scale) of Annex K's tables lands within that of a .5 tie, so it rounds alike.
            let scale = f32::from(5000 / u16::from(quality.max(1)));
            let q = 5000.0 / scale;
            comp.set_luma_qtable(&mozjpeg::qtable::AnnexK_Luma.scaled(q, q));
            comp.set_chroma_qtable(&mozjpeg::qtable::AnnexK_Chroma.scaled(q, q));
        }
        comp.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
        let mut started = comp.start_compress(Vec::new())?;
        started.write_scanlines(&img.data)?;
        started.finish()
    }));
    match result {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(CorruptError::Encode(e.to_string())),
        Err(_) => Err(CorruptError::Encode("libjpeg failed while encoding".into())),
    }
}

/// `img` after a JPEG round trip at `quality`.
pub fn apply(img: &RgbImage, quality: u8) -> Result<RgbImage, CorruptError> {
    let bytes = encode(img, quality)?;
    decode_rgb(&bytes).map_err(|e| CorruptError::Encode(format!("decoding our JPEG: {e}")))
}
