//! `fusion_bench corrupt`: corrupted copies of any image-classification split in the hub cache,
//! written as a new split beside it, so that `split: <name>` evaluates on it unchanged.
//!
//! The seven corruptions of FusionBench's robustness experiments (Hendrycks & Dietterich,
//! "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019;
//! FusionBench's `fusion_bench/dataset/image_corruption/make_corruption.py`), one file each, at
//! severities 1-5 with two parameter tables: FusionBench's (CIFAR-10-C, `cifar10c`, the default)
//! and ImageNet-C's (`imagenetc`, as the `imagecorruptions` package). Contrast, pixelate and JPEG
//! compression are bit for bit the references' (FusionBench's functions for `cifar10c`,
//! `imagecorruptions`' for `imagenetc`; `tests/corrupt_parity.rs`); the random ones draw from a generator per image
//! ([`rng::Rng::for_image`]), so a split's bytes depend on the seed only, not on the threads.
//!
//! The new split: `data/<name>-00000-of-00001.parquet` in the dataset's snapshot folder, with the
//! source's schema (`image: struct<bytes, path>`, `label: int64`, the `huggingface` metadata),
//! every image PNG-encoded (lossless: the split holds exactly the corrupted pixels); the
//! dataset card's `configs` and `dataset_info.splits` list it when the card has them
//! ([`card`]). Nothing is visible before it is complete: the parquet file is written under a
//! hidden temporary name and renamed, then the card is replaced by rename.
//!
//! The split is corrupted chunk by chunk ([`chunks`]), by this process alone or, launched like
//! any job, across a cluster's processes ([`distributed`]): the same bytes either way.

pub mod card;
pub mod chunks;
mod command;
pub mod contrast;
pub mod distributed;
pub mod gaussian_noise;
pub mod grid;
pub mod impulse_noise;
pub mod jpeg_compression;
pub mod motion_blur;
pub mod pixelate;
pub mod rng;
pub mod spatter;

pub use command::{help, run, CorruptArgs, DEFAULT_CHUNK_ROWS, FLAGS};

use crate::data::RgbImage;

/// The corruptions, in FusionBench's configs' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// [`contrast`].
    Contrast,
    /// [`gaussian_noise`].
    GaussianNoise,
    /// [`impulse_noise`].
    ImpulseNoise,
    /// [`jpeg_compression`].
    JpegCompression,
    /// [`motion_blur`].
    MotionBlur,
    /// [`pixelate`].
    Pixelate,
    /// [`spatter`].
    Spatter,
}

/// Every corruption, in FusionBench's order.
pub const ALL: [Corruption; 7] = [
    Corruption::Contrast,
    Corruption::GaussianNoise,
    Corruption::ImpulseNoise,
    Corruption::JpegCompression,
    Corruption::MotionBlur,
    Corruption::Pixelate,
    Corruption::Spatter,
];

impl Corruption {
    /// The name, as FusionBench's split names it (`gaussian_noise`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Contrast => "contrast",
            Self::GaussianNoise => "gaussian_noise",
            Self::ImpulseNoise => "impulse_noise",
            Self::JpegCompression => "jpeg_compression",
            Self::MotionBlur => "motion_blur",
            Self::Pixelate => "pixelate",
            Self::Spatter => "spatter",
        }
    }

    /// The corruption named `name`.
    pub fn parse(name: &str) -> Result<Self, CorruptError> {
        ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| CorruptError::UnknownCorruption {
            name: name.to_string(),
            known: ALL.map(Corruption::name).join(", "),
        })
    }

    /// Whether it draws random numbers.
    pub fn is_random(self) -> bool {
        matches!(self, Self::GaussianNoise | Self::ImpulseNoise | Self::MotionBlur | Self::Spatter)
    }
}

/// Which parameter table the severities index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamSet {
    /// FusionBench's `make_corruption.py` (Hendrycks' CIFAR-10-C script).
    Cifar10c,
    /// Hendrycks' ImageNet-C, as the `imagecorruptions` package.
    Imagenetc,
}

impl ParamSet {
    /// The set named `name` (`cifar10c`, `imagenetc`).
    pub fn parse(name: &str) -> Result<Self, CorruptError> {
        match name {
            "cifar10c" => Ok(Self::Cifar10c),
            "imagenetc" => Ok(Self::Imagenetc),
            other => Err(CorruptError::UnknownParams(other.to_string())),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cifar10c => "cifar10c",
            Self::Imagenetc => "imagenetc",
        }
    }
}

/// Errors of the corruptions themselves; the command adds the dataset, split and row.
#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    /// A corruption name that is not one of [`ALL`].
    #[error("unknown corruption `{name}`; known: {known}")]
    UnknownCorruption {
        /// The name given.
        name: String,
        /// The known names.
        known: String,
    },
    /// A severity outside 1-5.
    #[error("severity must be an integer from 1 to 5, got `{0}`")]
    BadSeverity(String),
    /// A parameter table that does not exist.
    #[error(
        "unknown parameter set `{0}`; known: cifar10c (FusionBench's, the default), imagenetc"
    )]
    UnknownParams(String),
    /// libjpeg failed (JPEG compression).
    #[error("JPEG round trip: {0}")]
    Encode(String),
}

/// Parses a severity, `1` to `5`.
pub fn parse_severity(s: &str) -> Result<u8, CorruptError> {
    match s.parse::<u8>() {
        Ok(v @ 1..=5) => Ok(v),
        _ => Err(CorruptError::BadSeverity(s.to_string())),
    }
}

/// A value in `[0, 255]` as numpy's `np.uint8` casts it: truncated toward zero.
#[inline]
pub(crate) fn to_u8(v: f64) -> u8 {
    v as u8
}

/// `img` corrupted by `c` at `severity` (1-5) with the parameters of `set`; the random
/// corruptions draw from `rng`.
pub fn corrupt_image(
    c: Corruption,
    set: ParamSet,
    severity: u8,
    img: &RgbImage,
    rng: &mut rng::Rng,
) -> Result<RgbImage, CorruptError> {
    if !(1..=5).contains(&severity) {
        return Err(CorruptError::BadSeverity(severity.to_string()));
    }
    Ok(match c {
        Corruption::Contrast => contrast::apply(img, contrast::factor(set, severity)),
        Corruption::GaussianNoise => {
            gaussian_noise::apply(img, gaussian_noise::sigma(set, severity), rng)
        }
        Corruption::ImpulseNoise => {
            impulse_noise::apply(img, impulse_noise::amount(set, severity), rng)
        }
        Corruption::JpegCompression => {
            jpeg_compression::apply(img, jpeg_compression::quality(set, severity))?
        }
        Corruption::MotionBlur => {
            motion_blur::apply(img, set, motion_blur::radius_sigma(set, severity), rng)
        }
        Corruption::Pixelate => pixelate::apply(img, set, pixelate::scale(set, severity)),
        Corruption::Spatter => spatter::apply(img, &spatter::params(set, severity), rng),
    })
}

/// Helpers of the corruptions' statistical tests.
#[cfg(test)]
pub(crate) mod test_util {
    use crate::data::RgbImage;

    /// A `w × h` image of one grey level.
    pub fn flat(w: usize, h: usize, v: u8) -> RgbImage {
        RgbImage { width: w, height: h, data: vec![v; w * h * 3] }
    }

    /// P(Z ≥ z) for a standard normal Z (Abramowitz & Stegun 7.1.26, error < 1e-7).
    pub fn normal_sf(z: f64) -> f64 {
        let x = z.abs() / std::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736
                    + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        let erfc = poly * (-x * x).exp();
        if z >= 0.0 {
            erfc / 2.0
        } else {
            1.0 - erfc / 2.0
        }
    }

    #[test]
    fn normal_sf_is_right() {
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_sf(1.959_963_985) - 0.025).abs() < 1e-6);
        assert!((normal_sf(-1.0) - 0.841_344_746).abs() < 1e-6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_severities_and_tables_parse_or_are_named() {
        for c in ALL {
            assert_eq!(Corruption::parse(c.name()).unwrap(), c);
        }
        let e = Corruption::parse("fog").unwrap_err().to_string();
        assert!(e.contains("`fog`") && e.contains("spatter"), "{e}");
        for bad in ["0", "6", "-1", "x", "2.5"] {
            assert!(parse_severity(bad).unwrap_err().to_string().contains(bad));
        }
        assert_eq!(parse_severity("5").unwrap(), 5);
        assert!(ParamSet::parse("cifar10").unwrap_err().to_string().contains("imagenetc"));
        let img = test_util::flat(4, 4, 9);
        assert!(corrupt_image(
            Corruption::Contrast,
            ParamSet::Cifar10c,
            0,
            &img,
            &mut rng::Rng::new(0)
        )
        .is_err());
    }

    #[test]
    fn every_corruption_runs_at_every_severity_on_odd_sizes() {
        let mut r = rng::Rng::new(5);
        let data: Vec<u8> = (0..23 * 17 * 3).map(|_| (r.next_u64() % 256) as u8).collect();
        let img = RgbImage::from_raw(23, 17, data).unwrap();
        for set in [ParamSet::Cifar10c, ParamSet::Imagenetc] {
            for c in ALL {
                for s in 1..=5 {
                    let out = corrupt_image(c, set, s, &img, &mut rng::Rng::new(1)).unwrap();
                    let size = if c == Corruption::Pixelate && set == ParamSet::Cifar10c {
                        (32, 32) // FusionBench's pixelate always returns 32×32
                    } else {
                        (23, 17)
                    };
                    assert_eq!((out.width, out.height), size, "{} {s}", c.name());
                    assert_eq!(out.data.len(), out.width * out.height * 3);
                    let again = corrupt_image(c, set, s, &img, &mut rng::Rng::new(1)).unwrap();
                    assert_eq!(out, again, "{} {s} is not repeatable", c.name());
                }
            }
        }
    }
}
