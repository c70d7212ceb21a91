//! Saving: the checks on the tensors passed, the archive's folder name, the records in
//! `torch.save`'s order, and the atomic replace of the file.

use super::pickle_write::Pickler;
use super::zip_write::{ZipWriter, ALIGNMENT};
use super::{Result, SaveValue, TorchFileError};
use std::fs::File;
use std::path::Path;

/// The folder name torch gives the archive: the file name without its last extension (libtorch's
/// `basename`); `archive` for a non-ASCII path (torch then writes through a Python stream) or an
/// empty stem (torch refuses those).
pub(super) fn archive_name(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !path.to_str().is_some_and(|p| p.is_ascii()) {
        return "archive".to_string();
    }
    let stem = match name.rfind('.') {
        Some(i) => &name[..i],
        None => name,
    };
    if stem.is_empty() {
        "archive".to_string()
    } else {
        stem.to_string()
    }
}

fn check_tensors(v: &SaveValue<'_>, path: &str) -> Result<()> {
    match v {
        SaveValue::Tensor(t) => {
            let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let want = numel.and_then(|n| n.checked_mul(t.dtype.size()));
            if want != Some(t.bytes.len()) {
                return Err(TorchFileError::Size {
                    path: path.to_string(),
                    reason: format!(
                        "a {} tensor of shape {:?} needs {} bytes, got {}",
                        t.dtype,
                        t.shape,
                        want.map_or("too many".to_string(), |w| w.to_string()),
                        t.bytes.len()
                    ),
                });
            }
            Ok(())
        }
        SaveValue::Dict(items) | SaveValue::OrderedDict(items) => {
            items.iter().try_for_each(|(_, x)| check_tensors(x, path))
        }
        SaveValue::List(items) | SaveValue::Tuple(items) => {
            items.iter().try_for_each(|x| check_tensors(x, path))
        }
        _ => Ok(()),
    }
}

pub(super) fn save_with_zip64_threshold(
    path: &Path,
    value: &SaveValue<'_>,
    zip64_at: u64,
) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path_str = path.display().to_string();
    check_tensors(value, &path_str)?;
    let mut pickler = Pickler::new();
    pickler.value(value);
    pickler.out.push(b'.');

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name =
        path.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| {
            TorchFileError::Unsupported {
                path: path_str.clone(),
                reason: "no file name".to_string(),
            }
        })?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()));
    let tmp_str = tmp.display().to_string();
    let write = || -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut zip = ZipWriter::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            &archive_name(path),
            zip64_at,
        );
        zip.record("data.pkl", &pickler.out)?;
        zip.record(".format_version", b"1")?;
        zip.record(".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
        zip.record("byteorder", b"little")?;
        for (key, t) in pickler.storages.iter().enumerate() {
            zip.record(&format!("data/{key}"), t.bytes)?;
        }
        zip.record("version", b"3\n")?;
        let file = zip.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(TorchFileError::Io {
            path: format!("{path_str} (writing {tmp_str})"),
            source: e,
        });
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TorchFileError::Io { path: path_str, source: e });
    }
    // The rename is durable once the folder is synced (best effort: not every system allows it).
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
