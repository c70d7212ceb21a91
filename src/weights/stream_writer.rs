//! A safetensors file written one tensor at a time, so a merge that produces tensors in order
//! never holds the whole output in memory.
//!
//! The header (names, dtypes, shapes, offsets) is known before any data: the merged model's
//! architecture fixes it. Data follows in the order the tensors were announced. Everything goes
//! to a temporary file beside the target, which is flushed and renamed by
//! [`SafetensorsWriter::finish`]; a writer dropped before that (an error, a panic) deletes its
//! temporary file, so a failed merge leaves nothing under the target name.

use super::WeightError;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The bytes of a CPU, contiguous float32 tensor, borrowed without copying; `None` for any other
/// tensor.
pub(crate) fn f32_slice(t: &Tensor) -> Option<&[f32]> {
    if t.kind() != Kind::Float || t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(&[]);
    }
    // SAFETY: the tensor is a contiguous CPU float32 buffer of `n` elements that lives as long as
    // the borrow of `t`; nothing writes to it while the slice is alive (callers only read).
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) })
}

/// Writes a float32 safetensors file tensor by tensor, in a fixed announced order.
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    entries: Vec<(String, Vec<i64>)>,
    /// Byte offset in the file where each entry's data starts.
    starts: Vec<u64>,
    next: usize,
}

impl std::fmt::Debug for SafetensorsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWriter")
            .field("path", &self.path)
            .field("written", &self.next)
            .field("of", &self.entries.len())
            .finish()
    }
}

impl SafetensorsWriter {
    /// Starts `path` (through a temporary file beside it) for float32 tensors `entries`
    /// (name, shape), stored in that order, with `metadata` as the header's `__metadata__`.
    pub fn create(
        path: impl AsRef<Path>,
        entries: Vec<(String, Vec<i64>)>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self, WeightError> {
        let path = path.as_ref().to_path_buf();
        let io = |p: &Path, source| WeightError::Io { path: p.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut header = serde_json::Map::new();
        if let Some(meta) = metadata {
            let mut sorted: Vec<_> = meta.into_iter().collect();
            sorted.sort();
            let m: serde_json::Map<String, serde_json::Value> =
                sorted.into_iter().map(|(k, v)| (k, v.into())).collect();
            header.insert("__metadata__".into(), m.into());
        }
        let mut offset = 0u64;
        let mut starts = Vec::with_capacity(entries.len());
        for (name, shape) in &entries {
            if shape.iter().any(|&d| d < 0) {
                return Err(WeightError::Corrupt {
                    path: path.display().to_string(),
                    reason: format!("tensor `{name}` has a negative dimension in {shape:?}"),
                });
            }
            let bytes = 4 * shape.iter().product::<i64>() as u64;
            starts.push(offset);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut json = serde_json::to_string(&header).map_err(|e| WeightError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // safetensors pads the header with spaces so the data starts 8-byte aligned.
        while json.len() % 8 != 0 {
            json.push(' ');
        }
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}-s{call}.partial", std::process::id()));
        let tmp = PathBuf::from(tmp);
        // Readable too: [`Self::patch`] maps it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        let data_start = 8 + json.len() as u64;
        let starts = starts.into_iter().map(|s| s + data_start).collect();
        let mut w = Self {
            path,
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 22, file)),
            entries,
            starts,
            next: 0,
        };
        let header_len = (json.len() as u64).to_le_bytes();
        w.write_bytes(&header_len)?;
        w.write_bytes(json.as_bytes())?;
        Ok(w)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), WeightError> {
        let file = self.file.as_mut().expect("the file is open until finish");
        file.write_all(bytes)
            .map_err(|source| WeightError::Io { path: self.tmp.display().to_string(), source })
    }

    /// Appends tensor `name`, which must be the next announced one, with its announced shape.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<(), WeightError> {
        let Some((expected, shape)) = self.entries.get(self.next) else {
            return Err(WeightError::Corrupt {
                path: self.path.display().to_string(),
                reason: format!("tensor `{name}` was not announced (all tensors are written)"),
            });
        };
        if expected != name {
            return Err(WeightError::Corrupt {
                path: self.path.display().to_string(),
                reason: format!("tensor `{name}` written where `{expected}` comes next"),
            });
        }
        if &t.size() != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                origin: self.path.display().to_string(),
                found: t.size(),
                expected: shape.clone(),
            });
        }
        let t = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let data = f32_slice(&t).expect("a contiguous CPU float32 tensor");
        // safetensors stores little-endian values; this targets little-endian machines only.
        // SAFETY: reinterpreting initialised f32s as their bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
        };
        self.write_bytes(bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Overwrites elements (flat index, value) of the already written entry number `entry`.
    pub fn patch(&mut self, entry: usize, values: &[(usize, f32)]) -> Result<(), WeightError> {
        let err =
            |reason: String| WeightError::Corrupt { path: self.path.display().to_string(), reason };
        if entry >= self.next {
            return Err(err(format!("patch of entry {entry}, which is not written yet")));
        }
        let numel = self.entries[entry].1.iter().product::<i64>() as usize;
        let tmp = self.tmp.display().to_string();
        let file = self.file.as_mut().expect("the file is open until finish");
        file.flush().map_err(|source| WeightError::Io { path: tmp.clone(), source })?;
        if let Some(&(j, _)) = values.iter().find(|(j, _)| *j >= numel) {
            return Err(err(format!(
                "patch of element {j} of `{}`, which has {numel}",
                self.entries[entry].0
            )));
        }
        if values.is_empty() {
            return Ok(());
        }
        // Through a shared mapping of the tensor's bytes: one page fault per page touched
        // instead of a system call per value (a TIES merge patches tens of thousands).
        // SAFETY: the file is ours (a temporary name) and nothing else maps or resizes it while
        // the mapping lives.
        let mut map = unsafe {
            memmap2::MmapOptions::new()
                .offset(self.starts[entry])
                .len(numel * 4)
                .map_mut(file.get_ref())
        }
        .map_err(|source| WeightError::Io { path: tmp.clone(), source })?;
        for &(j, v) in values {
            map[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Checks every announced tensor was written, syncs the file and renames it into place.
    pub fn finish(mut self) -> Result<(), WeightError> {
        if self.next != self.entries.len() {
            return Err(WeightError::Missing {
                name: self.entries[self.next].0.clone(),
                origin: format!("{} (the merge stopped before it)", self.path.display()),
            });
        }
        let io = |p: &Path, source| WeightError::Io { path: p.display().to_string(), source };
        let file = self.file.take().expect("the file is open until finish");
        // Not fsynced: the rename already makes a process crash leave either the old file or
        // the whole new one, and syncing a model of 0.3-1.2 GB costs more than merging it. (Small
        // results that a resumed run relies on, such as reports, are synced.)
        file.into_inner().map_err(|e| io(&self.tmp, e.into_error()))?;
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(io(&self.path, e));
        }
        Ok(())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{save_safetensors, SafetensorsFile, WeightMap, WeightSource};

    fn map() -> WeightMap {
        let mut m = WeightMap::new();
        m.insert(
            "z.weight",
            Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0]).reshape([2, 3]),
        );
        m.insert("a.bias", Tensor::from_slice(&[7.0f32]));
        m.insert("m.scalar", Tensor::from_slice(&[0.25f32]).reshape(Vec::<i64>::new()));
        m
    }

    #[test]
    fn streamed_file_reads_back_like_a_saved_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = map();
        let entries = m.iter().map(|(n, t)| (n.to_string(), t.size())).collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.path().join("s.safetensors");
        let mut w = SafetensorsWriter::create(&path, entries, Some(meta.clone())).unwrap();
        for (n, t) in m.iter() {
            w.write(n, t).unwrap();
        }
        w.finish().unwrap();
        save_safetensors(&m, dir.path().join("b.safetensors"), Some(meta)).unwrap();
        for file in ["s.safetensors", "b.safetensors"] {
            let f = SafetensorsFile::open(dir.path().join(file)).unwrap();
            assert_eq!(f.user_metadata().unwrap()["format"], "pt");
            for (n, t) in m.iter() {
                assert!(f.tensor(n).unwrap().equal(t), "{file}: {n}");
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary file is left");
    }

    /// Patched values land exactly where asked, also in a tensor whose offset is not
    /// page-aligned; out-of-range or unwritten entries are refused.
    #[test]
    fn patches_land_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let first: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let second: Vec<f32> = (0..5000).map(|i| -(i as f32)).collect();
        let entries = vec![("a".to_string(), vec![3000]), ("b".to_string(), vec![50, 100])];
        let path = dir.path().join("p.safetensors");
        let mut w = SafetensorsWriter::create(&path, entries, None).unwrap();
        w.write("a", &Tensor::from_slice(&first)).unwrap();
        assert!(w.patch(1, &[(0, 1.0)]).unwrap_err().to_string().contains("not written yet"));
        w.write("b", &Tensor::from_slice(&second).reshape([50, 100])).unwrap();
        let ends = [(0, 0.5f32), (2999, 7.5)];
        let many: Vec<(usize, f32)> = (0..5000).step_by(37).map(|j| (j, 0.25 * j as f32)).collect();
        w.patch(0, &ends).unwrap();
        w.patch(1, &many).unwrap();
        assert!(w.patch(0, &[(3000, 1.0)]).unwrap_err().to_string().contains("which has 3000"));
        w.finish().unwrap();
        let (mut want_a, mut want_b) = (first, second);
        for (j, v) in ends {
            want_a[j] = v;
        }
        for &(j, v) in &many {
            want_b[j] = v;
        }
        let f = SafetensorsFile::open(&path).unwrap();
        assert!(f.tensor("a").unwrap().equal(&Tensor::from_slice(&want_a)));
        assert!(f.tensor("b").unwrap().equal(&Tensor::from_slice(&want_b).reshape([50, 100])));
    }

    #[test]
    fn out_of_order_wrong_shape_or_unfinished_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = map();
        let entries: Vec<_> = m.iter().map(|(n, t)| (n.to_string(), t.size())).collect();
        let path = dir.path().join("s.safetensors");
        let mut w = SafetensorsWriter::create(&path, entries.clone(), None).unwrap();
        let e = w.write("a.bias", m.get("a.bias").unwrap()).unwrap_err().to_string();
        assert!(e.contains("`a.bias`") && e.contains("`z.weight`"), "{e}");
        let e = w.write("z.weight", &Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu)));
        assert!(e.unwrap_err().to_string().contains("shape"));
        w.write("z.weight", m.get("z.weight").unwrap()).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("a.bias"), "{e}");
        let w = SafetensorsWriter::create(&path, entries, None).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written");
    }
}
