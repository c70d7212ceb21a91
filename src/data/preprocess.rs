//! CLIP image preprocessing, exactly as transformers 4.57.6's slow `CLIPImageProcessor` (the
//! Pillow path behind FusionBench's published numbers, spec §3.2).
//!
//! Steps: resize the shortest edge to `size` (long side `int(size * long / short)`) with Pillow's
//! bicubic resampler ([`super::resize`]); centre crop with `top = (H - h) // 2`,
//! `left = (W - w) // 2`, zero-padding first where the image is smaller than the crop (as
//! `transformers.image_transforms.center_crop` does); `x = f32(f64(v) * rescale_factor)`;
//! `x = (x - mean) / std` in f32; channels first.

use std::path::Path;

use serde::Deserialize;

use super::image::RgbImage;
use super::resize::resize_bicubic;

/// OpenAI CLIP's normalisation mean (transformers' `OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation std (transformers' `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `PIL.Image.BICUBIC`, the only resampling filter implemented.
pub const RESAMPLE_BICUBIC: i64 = 3;

/// The `size` of a processor: resize the shortest edge, or to an exact height × width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"shortest_edge": n}` (or a plain int): shortest side → n, aspect ratio kept.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}` (or `[h, w]`): resize to exactly this size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// A crop size, height × width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropSize {
    /// Crop height.
    pub height: usize,
    /// Crop width.
    pub width: usize,
}

/// The fields of a `preprocessor_config.json` that `CLIPImageProcessor` uses, with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Convert to RGB first (images are always decoded to RGB here, so this is informational).
    pub do_convert_rgb: bool,
    /// Resize at all.
    pub do_resize: bool,
    /// Resize target.
    pub size: ResizeTo,
    /// Pillow resampling filter id; only 3 (bicubic) is supported.
    pub resample: i64,
    /// Centre crop at all.
    pub do_center_crop: bool,
    /// Centre crop size.
    pub crop_size: CropSize,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// The rescale factor (1/255).
    pub rescale_factor: f64,
    /// Subtract `image_mean`, divide by `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean, as f32 (numpy casts the list to the image's float32).
    pub image_mean: [f32; 3],
    /// Per-channel std, as f32.
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// transformers' `CLIPImageProcessor()` defaults (= openai/clip-vit-* configs).
    fn default() -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: RESAMPLE_BICUBIC,
            do_center_crop: true,
            crop_size: CropSize { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
        }
    }
}

/// A problem with a `preprocessor_config.json` or with preprocessing under it.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file could not be read.
    #[error("cannot read image processor config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The JSON is malformed or a field has the wrong type.
    #[error("image processor config {path}: {message}")]
    Json {
        /// The file (or `<string>`).
        path: String,
        /// serde_json's message (names the line and column).
        message: String,
    },
    /// A field has a value this implementation does not support.
    #[error("image processor config {path}: key `{key}`: {message}")]
    Invalid {
        /// The file (or `<string>`).
        path: String,
        /// The key at fault.
        key: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// An image with zero width or height.
    #[error("cannot preprocess an empty {width}x{height} image")]
    EmptyImage {
        /// Image width.
        width: usize,
        /// Image height.
        height: usize,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(usize),
    List(Vec<usize>),
    Map { shortest_edge: Option<usize>, height: Option<usize>, width: Option<usize> },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawFloats {
    One(f64),
    Many(Vec<f64>),
}

#[derive(Deserialize)]
struct RawConfig {
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<RawSize>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<RawSize>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<RawFloats>,
    image_std: Option<RawFloats>,
}

impl ImageProcessorConfig {
    /// Read and check a `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, PreprocessError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| PreprocessError::Io { path: shown.clone(), source })?;
        Self::from_json(&text, &shown)
    }

    /// Parse and check the JSON text of a processor config; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, PreprocessError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| PreprocessError::Json { path: origin.into(), message: e.to_string() })?;
        let invalid = |key: &'static str, message: String| PreprocessError::Invalid {
            path: origin.into(),
            key,
            message,
        };
        let d = Self::default();
        let size = match raw.size {
            None => d.size,
            Some(RawSize::Int(n)) => ResizeTo::ShortestEdge(n),
            Some(RawSize::List(v)) if v.len() == 2 => ResizeTo::Exact { height: v[0], width: v[1] },
            Some(RawSize::List(v)) if v.len() == 1 => ResizeTo::ShortestEdge(v[0]),
            Some(RawSize::Map { shortest_edge: Some(n), .. }) => ResizeTo::ShortestEdge(n),
            Some(RawSize::Map { height: Some(height), width: Some(width), .. }) => {
                ResizeTo::Exact { height, width }
            }
            Some(_) => {
                return Err(invalid(
                    "size",
                    "expected an int, [h, w], {shortest_edge} or {height, width}".into(),
                ))
            }
        };
        let crop_size = match raw.crop_size {
            None => d.crop_size,
            Some(RawSize::Int(n)) => CropSize { height: n, width: n },
            Some(RawSize::List(v)) if v.len() == 2 => CropSize { height: v[0], width: v[1] },
            Some(RawSize::Map { height: Some(height), width: Some(width), .. }) => {
                CropSize { height, width }
            }
            Some(_) => {
                return Err(invalid(
                    "crop_size",
                    "expected an int, [h, w] or {height, width}".into(),
                ))
            }
        };
        let three = |key: &'static str, v: Option<RawFloats>, default: [f32; 3]| match v {
            None => Ok(default),
            Some(RawFloats::One(x)) => Ok([x as f32; 3]),
            Some(RawFloats::Many(v)) if v.len() == 3 => Ok([v[0] as f32, v[1] as f32, v[2] as f32]),
            Some(RawFloats::Many(v)) => {
                Err(invalid(key, format!("expected 3 values (RGB), got {}", v.len())))
            }
        };
        let cfg = Self {
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample: raw.resample.unwrap_or(d.resample),
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: three("image_mean", raw.image_mean, d.image_mean)?,
            image_std: three("image_std", raw.image_std, d.image_std)?,
        };
        cfg.validate(origin)
    }

    /// Check that this config is one the implementation supports; `origin` names it in errors.
    pub fn validate(self, origin: &str) -> Result<Self, PreprocessError> {
        let invalid = |key: &'static str, message: String| PreprocessError::Invalid {
            path: origin.into(),
            key,
            message,
        };
        if self.do_resize && self.resample != RESAMPLE_BICUBIC {
            return Err(invalid(
                "resample",
                format!("only 3 (PIL BICUBIC) is implemented, got {}", self.resample),
            ));
        }
        let zero_size = match self.size {
            ResizeTo::ShortestEdge(n) => n == 0,
            ResizeTo::Exact { height, width } => height == 0 || width == 0,
        };
        if self.do_resize && zero_size {
            return Err(invalid("size", "sizes must be positive".into()));
        }
        if self.do_center_crop && (self.crop_size.height == 0 || self.crop_size.width == 0) {
            return Err(invalid("crop_size", "sizes must be positive".into()));
        }
        Ok(self)
    }

    /// The `(height, width)` the resize step produces for a `height × width` input.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        match self.size {
            ResizeTo::Exact { height, width } => (height, width),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python: int(size * long / short), a float division truncated.
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// The `(channels, height, width)` of [`preprocess`]'s output for a `height × width` input.
    pub fn output_shape(&self, height: usize, width: usize) -> (usize, usize, usize) {
        if self.do_center_crop {
            (3, self.crop_size.height, self.crop_size.width)
        } else {
            let (h, w) = self.resized_size(height, width);
            (3, h, w)
        }
    }
}

/// Preprocess one RGB image into `pixel_values` (`[3, H, W]` f32, channels first), bit for bit as
/// `CLIPImageProcessor(...)(images=[img])["pixel_values"][0]`: [`resize_and_crop`] then
/// [`normalize`].
pub fn preprocess(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<Vec<f32>, PreprocessError> {
    let crop = resize_and_crop(img, cfg)?;
    let mut out = vec![0f32; 3 * crop.height * crop.width];
    normalize_into(&crop.data, cfg, &mut out);
    Ok(out)
}

/// The u8 stages of preprocessing: shortest-edge bicubic resize and centre crop (zero padding
/// where the image is smaller than the crop, as transformers pads before rescaling). The result
/// is what the decoded-image cache stores.
pub fn resize_and_crop(
    img: &RgbImage,
    cfg: &ImageProcessorConfig,
) -> Result<RgbImage, PreprocessError> {
    if img.width == 0 || img.height == 0 {
        return Err(PreprocessError::EmptyImage { width: img.width, height: img.height });
    }
    if cfg.do_resize && cfg.resample != RESAMPLE_BICUBIC {
        return Err(PreprocessError::Invalid {
            path: "<in memory>".into(),
            key: "resample",
            message: format!("only 3 (PIL BICUBIC) is implemented, got {}", cfg.resample),
        });
    }
    let (rh, rw) = cfg.resized_size(img.height, img.width);
    let resized;
    let src = if (rh, rw) != (img.height, img.width) {
        resized = resize_bicubic(img, rw, rh);
        &resized
    } else {
        img
    };
    let (_, oh, ow) = cfg.output_shape(img.height, img.width);
    // Offsets of the crop window in the resized image (negative: zero padding, centred with the
    // padding's extra row/column on the top/left, as transformers' center_crop pads).
    let offset = |orig: usize, crop: usize| -> i64 {
        if !cfg.do_center_crop {
            0
        } else if orig >= crop {
            ((orig - crop) / 2) as i64
        } else {
            -(((crop - orig) as i64 + 1) / 2)
        }
    };
    let (top, left) = (offset(src.height, oh), offset(src.width, ow));
    let mut data = vec![0u8; oh * ow * 3];
    for (y, row) in data.chunks_exact_mut(ow * 3).enumerate() {
        let sy = y as i64 + top;
        if sy < 0 || sy >= src.height as i64 {
            continue;
        }
        let line = &src.data[sy as usize * src.width * 3..(sy as usize + 1) * src.width * 3];
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let sx = x as i64 + left;
            if sx >= 0 && sx < src.width as i64 {
                px.copy_from_slice(&line[sx as usize * 3..sx as usize * 3 + 3]);
            }
        }
    }
    Ok(RgbImage { width: ow, height: oh, data })
}

/// Rescale and normalise a u8 HWC crop into `out`, f32 CHW (`out.len() == crop.len()`), exactly
/// as transformers: `(v as f64 * rescale_factor) as f32`, then `(x - mean) / std` in f32.
pub fn normalize_into(crop: &[u8], cfg: &ImageProcessorConfig, out: &mut [f32]) {
    // Lookup table: the output value depends only on (channel, u8 value).
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, o) in table.iter_mut().enumerate() {
            let mut x =
                if cfg.do_rescale { (v as f64 * cfg.rescale_factor) as f32 } else { v as f32 };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            *o = x;
        }
    }
    let n = crop.len() / 3;
    for c in 0..3 {
        let plane = &mut out[c * n..(c + 1) * n];
        for (o, px) in plane.iter_mut().zip(crop.chunks_exact(3)) {
            *o = lut[c][usize::from(px[c])];
        }
    }
}

/// [`normalize_into`] over `n` concatenated crops of equal size: `[n, 3, H, W]` f32, flattened.
pub fn normalize_batch(crops: &[u8], n: usize, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let mut out = vec![0f32; crops.len()];
    if let Some(per_image) = crops.len().checked_div(n).filter(|&p| p > 0) {
        for (c, o) in crops.chunks_exact(per_image).zip(out.chunks_exact_mut(per_image)) {
            normalize_into(c, cfg, o);
        }
    }
    out
}
