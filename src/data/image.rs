//! Image bytes → RGB u8 pixels, exactly like Pillow's `Image.open(io.BytesIO(b)).convert("RGB")`.
//!
//! JPEG goes through libjpeg-turbo (the `mozjpeg` crate) with the settings Pillow uses: the
//! accurate integer IDCT (`JDCT_ISLOW`), fancy chroma upsampling, the colour space chosen from the
//! number of components in the frame header (1 → L, 3 → RGB, 4 → CMYK read as Adobe-inverted
//! "CMYK;I" and then Pillow's `cmyk2rgb`). A JPEG whose data ends before the last scanline is an
//! error, as in Pillow (`image file is truncated`). PNG goes through the `image` crate and is then
//! mapped to RGB the way Pillow's modes convert: L/LA replicate the grey level, alpha is dropped
//! (never blended), palettes are looked up, 16-bit RGB(A)/LA keep the high byte, and 16-bit grey
//! (Pillow's `I;16`) saturates at 255. The format is detected from the magic bytes.

use std::io::{self, BufRead, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An 8-bit RGB image, row-major, channels last (`HWC`), `data.len() == height * width * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Pixels, `[r, g, b]` per pixel, rows top to bottom.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image from HWC pixels; `None` when `data.len() != height * width * 3`.
    pub fn from_raw(width: usize, height: usize, data: Vec<u8>) -> Option<Self> {
        (width.checked_mul(height)?.checked_mul(3)? == data.len()).then_some(Self {
            width,
            height,
            data,
        })
    }
}

/// Why image bytes could not be turned into RGB pixels. The caller adds the file and row.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are neither JPEG (`FF D8 FF`) nor PNG (`89 50 4E 47 …`).
    #[error("unsupported or unrecognised image format (first bytes {magic}); only JPEG and PNG are supported")]
    UnknownFormat {
        /// The first bytes, in hex.
        magic: String,
    },
    /// libjpeg rejected the data.
    #[error("corrupt JPEG: {0}")]
    Jpeg(String),
    /// The JPEG data ends before the image is complete (Pillow: "image file is truncated").
    #[error("truncated JPEG: the data ends before the last scanline")]
    TruncatedJpeg,
    /// A JPEG with a number of components Pillow cannot open (it accepts 1, 3 and 4).
    #[error("JPEG with {0} components is not supported (Pillow reads 1, 3 or 4)")]
    JpegComponents(usize),
    /// The PNG decoder rejected the data.
    #[error("corrupt PNG: {0}")]
    Png(String),
    /// A PNG pixel layout that has no Pillow `convert("RGB")` equivalent here.
    #[error("unsupported PNG pixel layout {0}")]
    PngLayout(String),
    /// Decoded pixel data did not have the size the header promised.
    #[error("decoded {got} bytes, expected {expected} for a {width}x{height} image")]
    BadSize {
        /// Bytes decoded.
        got: usize,
        /// Bytes expected.
        expected: usize,
        /// Header width.
        width: usize,
        /// Header height.
        height: usize,
    },
}

/// Decode JPEG or PNG bytes to RGB, as Pillow's `Image.open(...).convert("RGB")` does.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else {
        let magic = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>();
        Err(DecodeError::UnknownFormat {
            magic: if magic.is_empty() { "<empty>".into() } else { magic.join(" ") },
        })
    }
}

/// A `BufRead` over a byte slice that records whether libjpeg asked for data past the end.
struct EofTracking<'a> {
    data: &'a [u8],
    hit_eof: Arc<AtomicBool>,
}

impl Read for EofTracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.store(true, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl BufRead for EofTracking<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.data.is_empty() {
            self.hit_eof.store(true, Ordering::Relaxed);
        }
        Ok(self.data)
    }
    fn consume(&mut self, amt: usize) {
        self.data = &self.data[amt.min(self.data.len())..];
    }
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let hit_eof = Arc::new(AtomicBool::new(false));
    let reader = EofTracking { data: bytes, hit_eof: hit_eof.clone() };
    // libjpeg errors unwind out of the C code (the mozjpeg crate's error manager); catch them.
    let result = catch_unwind(AssertUnwindSafe(
        || -> Result<(usize, usize, usize, Vec<u8>), DecodeError> {
            let io_err = |e: io::Error| DecodeError::Jpeg(e.to_string());
            let mut dec = mozjpeg::Decompress::new_reader(reader).map_err(io_err)?;
            dec.dct_method(mozjpeg::DctMethod::IntegerSlow);
            dec.do_fancy_upsampling(true);
            let ncomp = dec.components().len();
            let out = match ncomp {
                1 => mozjpeg::ColorSpace::JCS_GRAYSCALE,
                3 => mozjpeg::ColorSpace::JCS_RGB,
                4 => mozjpeg::ColorSpace::JCS_CMYK,
                n => return Err(DecodeError::JpegComponents(n)),
            };
            let mut started = dec.to_colorspace(out).map_err(io_err)?;
            let (w, h) = (started.width(), started.height());
            let pixels = started.read_scanlines::<u8>().map_err(io_err)?;
            // No jpeg_finish_decompress: Pillow accepts a missing EOI once all lines are read.
            Ok((w, h, ncomp, pixels))
        },
    ));
    let (width, height, ncomp, pixels) = match result {
        Ok(r) => r?,
        Err(payload) => {
            if hit_eof.load(Ordering::Relaxed) {
                return Err(DecodeError::TruncatedJpeg);
            }
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            return Err(DecodeError::Jpeg(msg));
        }
    };
    if hit_eof.load(Ordering::Relaxed) {
        return Err(DecodeError::TruncatedJpeg);
    }
    let expected = width * height * ncomp;
    if pixels.len() != expected {
        return Err(DecodeError::BadSize { got: pixels.len(), expected, width, height });
    }
    let data = match ncomp {
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        3 => pixels,
        _ => pixels
            .chunks_exact(4)
            .flat_map(|p| cmyk_inverted_to_rgb([p[0], p[1], p[2], p[3]]))
            .collect(),
    };
    Ok(RgbImage { width, height, data })
}

/// Pillow: JPEG CMYK is unpacked as "CMYK;I" (Adobe inverted), then `cmyk2rgb`.
fn cmyk_inverted_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8)
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    use image::DynamicImage as D;
    // IHDR follows the signature: length(4) "IHDR"(4) width(4) height(4) depth(1) colour type(1).
    let grey16 = bytes.get(24) == Some(&16) && bytes.get(25) == Some(&0);
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| DecodeError::Png(e.to_string()))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match &img {
        D::ImageRgb8(b) => b.as_raw().clone(),
        D::ImageRgba8(b) => b.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        D::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        D::ImageLumaA8(b) => b.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        // Pillow opens 16-bit grey as "I;16"; I;16 → RGB saturates: v < 256 ? v : 255.
        D::ImageLuma16(b) if grey16 => {
            b.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect()
        }
        D::ImageLumaA16(b) if grey16 => {
            b.as_raw().chunks_exact(2).flat_map(|p| [p[0].min(255) as u8; 3]).collect()
        }
        // 16-bit LA / RGB / RGBA: Pillow unpacks the high byte of each big-endian sample.
        D::ImageLumaA16(b) => {
            b.as_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect()
        }
        D::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
            .collect(),
        other => return Err(DecodeError::PngLayout(format!("{:?}", other.color()))),
    };
    let (got, expected) = (data.len(), width * height * 3);
    RgbImage::from_raw(width, height, data).ok_or(DecodeError::BadSize {
        got,
        expected,
        width,
        height,
    })
}
