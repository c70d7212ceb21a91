//! TensorBoard event files for scalar metrics, written without TensorFlow or a protobuf crate.
//!
//! An event file is a sequence of TFRecords (`tensorflow/core/lib/io/record_writer.cc`, mirrored
//! by `tensorboard/summary/writer/record_writer.py`), each
//!
//! ```text
//! u64 length (little-endian) | u32 masked_crc32c(length bytes) | data[length] | u32 masked_crc32c(data)
//! ```
//!
//! where `masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8` of the CRC-32C (Castagnoli) `c`.
//! Each record holds one `Event` (`tensorflow/core/util/event.proto`, `tensorboard.Event`):
//! `double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//! SourceMetadata source_metadata = 10`, with `Summary` (`tensorflow/core/framework/summary.proto`)
//! `repeated Value value = 1` and `Value { string tag = 1; float simple_value = 2; }`.
//!
//! The file is named and started as `tensorboard/summary/writer/event_file_writer.py` does
//! (the writer behind `torch.utils.tensorboard.SummaryWriter` and so Lightning's
//! `TensorBoardLogger`): `events.out.tfevents.<%010d unix secs>.<hostname>.<pid>.<counter>`, first
//! event `file_version: "brain.Event:2"`. One event per scalar, as `SummaryWriter.add_scalar`.
//!
//! Crash tolerance: the file is opened append-only and every call writes its complete records with
//! one `write_all` and no user-space buffer, so a killed process leaves whole records followed by
//! at most one partial record, which TensorBoard's reader drops. [`EventWriter::flush`] also
//! `fsync`s, for power loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod record;
#[cfg(test)]
pub(crate) mod tests;

use record::{event, put_bytes, record, scalar_event};

/// The `file_version` of the first event, as every TensorBoard writer since TF 1.0 writes it.
pub const FILE_VERSION: &str = "brain.Event:2";

/// What failed while writing an event file, and where.
#[derive(Debug, thiserror::Error)]
pub enum EventWriterError {
    /// The log directory could not be created: check the path and its permissions.
    #[error("creating the TensorBoard log directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event file could not be created (it already exists, or the directory is not writable).
    #[error("creating the TensorBoard event file {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Appending or syncing failed (disk full, file system gone): the records before it are intact.
    #[error("writing the TensorBoard event file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Appends scalar events to one TensorBoard event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

/// The per-process file counter, as `event_file_writer._global_uid`.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it, and writes the
    /// `file_version` event.
    pub fn create(dir: &Path) -> Result<Self, EventWriterError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| EventWriterError::CreateDir { path: dir.to_path_buf(), source })?;
        let now = wall_time();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now as u64,
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| EventWriterError::Create { path: path.clone(), source })?;
        let mut w = Self { path, file };
        let mut body = Vec::new();
        put_bytes(&mut body, 3, FILE_VERSION.as_bytes());
        let mut source_metadata = Vec::new();
        put_bytes(&mut source_metadata, 1, b"fusion_bench.report.tensorboard");
        put_bytes(&mut body, 10, &source_metadata);
        w.append(&record(&event(now, 0, &body)))?;
        w.flush()?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar event stamped with the current time.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<(), EventWriterError> {
        self.add_scalar_at(tag, value, step, wall_time())
    }

    /// Appends one scalar event with an explicit `wall_time` (seconds since the Unix epoch), as
    /// `SummaryWriter.add_scalar(..., walltime=)`.
    pub fn add_scalar_at(
        &mut self,
        tag: &str,
        value: f32,
        step: i64,
        wall_time: f64,
    ) -> Result<(), EventWriterError> {
        self.append(&record(&scalar_event(tag, value, step, wall_time)))
    }

    /// Appends one event per `(tag, value)`, all at `step` and the current time, with a single
    /// write (Lightning's `log_metrics` is one `add_scalar` per key).
    pub fn add_scalars<S: AsRef<str>>(
        &mut self,
        step: i64,
        scalars: &[(S, f32)],
    ) -> Result<(), EventWriterError> {
        let now = wall_time();
        let mut bytes = Vec::new();
        for (tag, value) in scalars {
            bytes.extend(record(&scalar_event(tag.as_ref(), *value, step, now)));
        }
        self.append(&bytes)
    }

    /// Makes everything written so far durable (`fsync`). Records reach the OS on every call
    /// anyway; this guards against power loss, not process death.
    pub fn flush(&mut self) -> Result<(), EventWriterError> {
        self.file
            .sync_data()
            .map_err(|source| EventWriterError::Write { path: self.path.clone(), source })
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), EventWriterError> {
        self.file
            .write_all(bytes)
            .map_err(|source| EventWriterError::Write { path: self.path.clone(), source })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("{e}");
        }
    }
}

/// Seconds since the Unix epoch, as Python's `time.time()`.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `socket.gethostname()`: the kernel's node name, else `$HOSTNAME`, else `localhost`.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}
