//! Image-classification datasets: parquet files of a hub dataset, image decoding and CLIP
//! preprocessing.
//!
//! [`files`] finds a split's parquet files, [`parquet`] reads `(image bytes, label)` rows,
//! [`image`] decodes them like Pillow, [`resize`] and [`preprocess`] reproduce transformers'
//! `CLIPImageProcessor` bit for bit, and [`ImageDataset`] ties them together with parallel batch
//! preprocessing. Nothing here depends on libtorch: batches are plain `Vec<f32>`.

pub mod cache;
pub mod files;
pub mod glob;
pub mod image;
pub mod parquet;
pub mod preprocess;
pub mod resize;

use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use self::image::{decode_rgb, DecodeError, RgbImage};
pub use self::parquet::ImageRow;
pub use self::preprocess::{preprocess, ImageProcessorConfig, PreprocessError};

/// Errors of the dataset layer; each names the file (and row, column or key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The parquet reader failed (not a parquet file, unsupported encoding, corrupt page).
    #[error("parquet file {path}: {message}")]
    Parquet {
        /// The file.
        path: String,
        /// The reader's message.
        message: String,
    },
    /// A required column is absent.
    #[error("parquet file {path} has no `{column}` column (columns: {available:?})")]
    MissingColumn {
        /// The file.
        path: String,
        /// The missing column.
        column: String,
        /// The columns it has.
        available: Vec<String>,
    },
    /// A column has a type this reader does not accept.
    #[error("parquet file {path}: column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        /// The file.
        path: String,
        /// The column.
        column: String,
        /// Its arrow type.
        found: String,
        /// What is accepted.
        expected: String,
    },
    /// A null label.
    #[error("parquet file {path}, row {row}: column `label` is null")]
    NullLabel {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
    },
    /// A label that cannot be used.
    #[error("parquet file {path}, row {row}: column `label`: {message}")]
    BadLabel {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
        /// What is wrong.
        message: String,
    },
    /// No image bytes (a null struct, or only an external `path`, which is not followed).
    #[error("parquet file {path}, row {row}: column `image` has no bytes{}", .image_path.as_ref().map(|p| format!(" (only a path: {p}; external image files are not supported)")).unwrap_or_default())]
    NullImage {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
        /// The `image.path` value, if any.
        image_path: Option<String>,
    },
    /// The image bytes of a row could not be decoded.
    #[error("parquet file {path}, row {row}: column `image`: {source}")]
    Decode {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
        /// The decoder's error.
        source: DecodeError,
    },
    /// A row's image could not be preprocessed.
    #[error("parquet file {path}, row {row}: preprocessing: {source}")]
    Preprocess {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
        /// The cause.
        source: PreprocessError,
    },
    /// Rows of one batch preprocess to different shapes (`do_center_crop: false`).
    #[error("parquet file {path}, row {row}: preprocessed to {got} values, the batch's first image to {expected}; batches need a fixed size (set do_center_crop)")]
    RaggedBatch {
        /// The file.
        path: String,
        /// Row index within the file.
        row: usize,
        /// Values of this row.
        got: usize,
        /// Values of the first row.
        expected: usize,
    },
    /// A batch range outside the dataset.
    #[error("batch range {start}..{end} is outside the dataset ({len} rows)")]
    Range {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Dataset length.
        len: usize,
    },
    /// The README.md front matter cannot be used.
    #[error("{path}: {message}")]
    Readme {
        /// The README file.
        path: String,
        /// What is wrong (names the key).
        message: String,
    },
    /// No data files for the requested config/split.
    #[error("dataset at {root}: found no {what}; {available}")]
    NoDataFiles {
        /// The dataset snapshot directory.
        root: String,
        /// What was looked for.
        what: String,
        /// What exists instead.
        available: String,
    },
}

/// Where one example came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    file: u32,
    row: u32,
}

/// A split of an image-classification dataset held as encoded bytes, decoded and preprocessed
/// on demand, in batches.
#[derive(Debug)]
pub struct ImageDataset {
    files: Vec<PathBuf>,
    images: Vec<Vec<u8>>,
    labels: Vec<i64>,
    origins: Vec<Origin>,
    processor: ImageProcessorConfig,
}

impl ImageDataset {
    /// Load `split` of the dataset snapshot at `root` (config `config`, or the default one).
    pub fn load(
        root: &Path,
        config: Option<&str>,
        split: &str,
        processor: ImageProcessorConfig,
    ) -> Result<Self, DataError> {
        let files = files::find_split_files(root, config, split)?;
        Self::from_files(files, processor)
    }

    /// Load the rows of these parquet files, in order.
    pub fn from_files(
        files: Vec<PathBuf>,
        processor: ImageProcessorConfig,
    ) -> Result<Self, DataError> {
        let (mut images, mut labels, mut origins) = (Vec::new(), Vec::new(), Vec::new());
        for (fi, path) in files.iter().enumerate() {
            let mut row = 0u32;
            for batch in parquet::RowBatches::open(path)? {
                for r in batch? {
                    images.push(r.bytes);
                    labels.push(r.label);
                    origins.push(Origin { file: fi as u32, row });
                    row += 1;
                }
            }
        }
        Ok(Self { files, images, labels, origins, processor })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All labels, in order.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The parquet files, in the order their rows appear.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The preprocessing applied by [`Self::decode_and_preprocess_batch`].
    pub fn processor(&self) -> &ImageProcessorConfig {
        &self.processor
    }

    /// The `(file, row within file)` example `index` came from.
    pub fn origin(&self, index: usize) -> Option<(&Path, usize)> {
        let o = self.origins.get(index)?;
        Some((self.files[o.file as usize].as_path(), o.row as usize))
    }

    fn where_(&self, index: usize) -> (String, usize) {
        let o = self.origins[index];
        (self.files[o.file as usize].display().to_string(), o.row as usize)
    }

    /// Decode example `index` to RGB (as Pillow's `convert("RGB")`).
    pub fn decode(&self, index: usize) -> Result<RgbImage, DataError> {
        self.check_range(index..index + 1)?;
        decode_rgb(&self.images[index]).map_err(|source| {
            let (path, row) = self.where_(index);
            DataError::Decode { path, row, source }
        })
    }

    fn check_range(&self, range: Range<usize>) -> Result<(), DataError> {
        if range.start > range.end || range.end > self.len() {
            return Err(DataError::Range { start: range.start, end: range.end, len: self.len() });
        }
        Ok(())
    }

    /// Decode and preprocess examples `range` in parallel (rayon), keeping their order:
    /// returns `pixel_values` as `[n, 3, H, W]` f32, flattened, and the `n` labels.
    pub fn decode_and_preprocess_batch(
        &self,
        range: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<i64>), DataError> {
        let n = range.len();
        let (crops, labels) = self.decode_crop_batch(range)?;
        Ok((preprocess::normalize_batch(&crops, n, &self.processor), labels))
    }

    /// Decode, resize and centre-crop examples `range` in parallel (rayon), keeping their order:
    /// the u8 HWC crops concatenated (what [`cache::CropCache`] stores), and the labels.
    pub fn decode_crop_batch(&self, range: Range<usize>) -> Result<(Vec<u8>, Vec<i64>), DataError> {
        self.check_range(range.clone())?;
        let crops: Vec<Vec<u8>> = range
            .clone()
            .into_par_iter()
            .map(|i| {
                let img = self.decode(i)?;
                preprocess::resize_and_crop(&img, &self.processor).map(|c| c.data).map_err(
                    |source| {
                        let (path, row) = self.where_(i);
                        DataError::Preprocess { path, row, source }
                    },
                )
            })
            .collect::<Vec<Result<Vec<u8>, DataError>>>()
            .into_iter()
            // In row order, so the error reported is always the first bad row's (rayon's own
            // `collect::<Result<..>>` returns whichever failing row a thread reached first).
            .collect::<Result<_, _>>()?;
        let expected = crops.first().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(expected * crops.len());
        for (i, c) in range.clone().zip(&crops) {
            if c.len() != expected {
                let (path, row) = self.where_(i);
                return Err(DataError::RaggedBatch { path, row, got: c.len(), expected });
            }
            out.extend_from_slice(c);
        }
        Ok((out, self.labels[range].to_vec()))
    }

    /// Decode, resize and centre-crop examples `indices` (any order) in parallel: the u8 HWC
    /// crops concatenated in that order.
    pub fn decode_crop_indices(&self, indices: &[usize]) -> Result<Vec<u8>, DataError> {
        let mut out = Vec::new();
        let mut expected = None;
        let crops: Vec<Result<Vec<u8>, DataError>> = indices
            .par_iter()
            .map(|&i| {
                let img = self.decode(i)?;
                preprocess::resize_and_crop(&img, &self.processor).map(|c| c.data).map_err(
                    |source| {
                        let (path, row) = self.where_(i);
                        DataError::Preprocess { path, row, source }
                    },
                )
            })
            .collect();
        for (&i, c) in indices.iter().zip(crops) {
            let c = c?;
            let want = *expected.get_or_insert(c.len());
            if c.len() != want {
                let (path, row) = self.where_(i);
                return Err(DataError::RaggedBatch { path, row, got: c.len(), expected: want });
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// A fingerprint of the split's files (path, size, modification time) and of the
    /// preprocessing settings that shape the crops: the decoded-image cache's key.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut h);
        for f in &self.files {
            f.hash(&mut h);
            if let Ok(m) = std::fs::metadata(f) {
                (m.len(), m.modified().ok()).hash(&mut h);
            }
        }
        self.len().hash(&mut h);
        let p = &self.processor;
        format!("{:?}", (&p.size, &p.crop_size, p.do_resize, p.resample, p.do_center_crop))
            .hash(&mut h);
        h.finish()
    }
}
