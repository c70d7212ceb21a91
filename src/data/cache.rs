//! The decoded-image cache: resized and centre-cropped u8 images of a whole split, one file per
//! (dataset files, preprocessing) fingerprint, so a sweep that evaluates many models on the same
//! tasks decodes each image once. Normalisation (cheap, exact) runs on every read.
//!
//! Layout: `<dir>/<fingerprint>.crops` = `n × h × w × 3` bytes, written to a temporary name while
//! the first evaluation goes through the split (batches in any order, each at its place) and
//! renamed when every example is in (a crash leaves no partial entry). The directory is capped in size: the least recently used entries go first.

use super::{preprocess::normalize_into, DataError, ImageDataset, ImageProcessorConfig};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A size-capped directory of crop files.
#[derive(Debug, Clone)]
pub struct CropCache {
    dir: PathBuf,
    cap_bytes: u64,
}

/// A complete cached split, memory-mapped.
pub struct CachedCrops {
    mmap: memmap2::Mmap,
    per_image: usize,
}

/// Writes the crops of a split into the cache during a first full pass, batch by batch in any
/// order.
pub struct CropWriter {
    file: std::fs::File,
    tmp: PathBuf,
    dest: PathBuf,
    per_image: usize,
    /// Which examples are in.
    written: Vec<bool>,
}

fn io_err(path: &Path, e: std::io::Error) -> DataError {
    DataError::Io { path: path.display().to_string(), source: e }
}

impl CropCache {
    /// A cache in `dir` holding at most `cap_bytes`.
    pub fn new(dir: impl Into<PathBuf>, cap_bytes: u64) -> Self {
        Self { dir: dir.into(), cap_bytes }
    }

    fn entry(&self, data: &ImageDataset) -> PathBuf {
        self.dir.join(format!("{:016x}.crops", data.fingerprint()))
    }

    fn bytes_needed(data: &ImageDataset) -> Option<(usize, u64)> {
        let cfg = data.processor();
        if !cfg.do_center_crop {
            return None; // crops of one size only
        }
        let per_image = cfg.crop_size.height * cfg.crop_size.width * 3;
        Some((per_image, per_image as u64 * data.len() as u64))
    }

    /// The cached crops of `data`, if a complete entry exists.
    pub fn open(&self, data: &ImageDataset) -> Option<CachedCrops> {
        let (per_image, total) = Self::bytes_needed(data)?;
        let path = self.entry(data);
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() != total {
            return None;
        }
        // SAFETY: entries are immutable once renamed into place.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let _ = file.set_modified(std::time::SystemTime::now()); // LRU order
        tracing::debug!(path = %path.display(), "decoded images from cache");
        Some(CachedCrops { mmap, per_image })
    }

    /// A writer for `data`'s crops, after evicting old entries to make room; `None` when the
    /// split alone exceeds the cap or the directory cannot be written.
    pub fn writer(&self, data: &ImageDataset) -> Option<CropWriter> {
        let (per_image, total) = Self::bytes_needed(data)?;
        if total > self.cap_bytes || std::fs::create_dir_all(&self.dir).is_err() {
            return None;
        }
        self.evict(self.cap_bytes - total);
        let dest = self.entry(data);
        let tmp = dest.with_extension(format!("{}.partial", std::process::id()));
        let file = std::fs::File::create(&tmp).ok()?;
        Some(CropWriter { file, tmp, dest, per_image, written: vec![false; data.len()] })
    }

    /// Removes least recently used entries until at most `keep` bytes remain.
    fn evict(&self, keep: u64) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return };
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "crops"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        entries.sort();
        let mut used: u64 = entries.iter().map(|e| e.1).sum();
        for (_, len, path) in entries {
            if used <= keep {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                used -= len;
            }
        }
    }
}

impl CachedCrops {
    /// Normalised `pixel_values` (`[n, 3, H, W]` f32, flattened) of examples `range`.
    pub fn batch(&self, range: Range<usize>, cfg: &ImageProcessorConfig) -> Vec<f32> {
        let mut out = vec![0f32; range.len() * self.per_image];
        for (i, chunk) in range.zip(out.chunks_exact_mut(self.per_image)) {
            normalize_into(&self.mmap[i * self.per_image..(i + 1) * self.per_image], cfg, chunk);
        }
        out
    }

    /// Normalised `pixel_values` (`[n, 3, H, W]` f32, flattened) of examples `indices`, in
    /// that order.
    pub fn batch_indices(&self, indices: &[usize], cfg: &ImageProcessorConfig) -> Vec<f32> {
        let mut out = vec![0f32; indices.len() * self.per_image];
        for (&i, chunk) in indices.iter().zip(out.chunks_exact_mut(self.per_image)) {
            normalize_into(&self.mmap[i * self.per_image..(i + 1) * self.per_image], cfg, chunk);
        }
        out
    }
}

impl CropWriter {
    /// Writes the crops of examples `first..` (as many as `crops` holds) at their place.
    pub fn write_at(&mut self, first: usize, crops: &[u8]) -> Result<(), DataError> {
        let n = crops.len() / self.per_image;
        if first + n > self.written.len() || !crops.len().is_multiple_of(self.per_image) {
            return Err(DataError::Io {
                path: self.tmp.display().to_string(),
                source: std::io::Error::other(format!(
                    "crops of examples {first}..{} do not fit a split of {}",
                    first + n,
                    self.written.len()
                )),
            });
        }
        self.file
            .write_all_at(crops, (first * self.per_image) as u64)
            .map_err(|e| io_err(&self.tmp, e))?;
        self.written[first..first + n].iter_mut().for_each(|w| *w = true);
        Ok(())
    }

    /// Publishes the entry if every example was written; otherwise discards it.
    pub fn finish(self) -> Result<(), DataError> {
        if !self.written.iter().all(|&w| w) {
            let _ = std::fs::remove_file(&self.tmp);
            return Ok(());
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| io_err(&self.dest, e))
    }
}

impl Drop for CropWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp); // no-op after a successful rename
    }
}
