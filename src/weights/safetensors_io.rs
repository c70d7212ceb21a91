//! safetensors read (mmap, one tensor at a time) and write.
//!
//! `tch::Tensor::read_safetensors` reads the whole file into RAM; here the file is mapped and each
//! tensor is copied out on request, so loading a model never holds the file twice.

use super::{WeightError, WeightMap, WeightSource};
use safetensors::tensor::{Dtype, Metadata};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// An mmap'd safetensors file whose header has been validated.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).finish()
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (offsets, sizes, dtypes); a truncated or corrupt file
    /// fails here, naming the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us is the user's race, as with
        // every mmap-based loader (safetensors, transformers).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            WeightError::Corrupt { path: path.display().to_string(), reason: e.to_string() }
        })?;
        Ok(Self { path, mmap, data_start: 8 + n, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file (offset) order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The `__metadata__` string map of the header, if any.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Shape of `name` without reading it.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.metadata.info(name).map(|i| i.shape.iter().map(|&d| d as i64).collect())
    }

    /// The values of an F32 tensor `name` read in place from the mapped file (no copy), with its
    /// shape; `None` when the tensor is absent, not F32, or not 4-byte aligned in the map.
    pub fn f32_slice(&self, name: &str) -> Option<(&[f32], Vec<i64>)> {
        let info = self.metadata.info(name)?;
        if info.dtype != Dtype::F32 {
            return None;
        }
        let (start, end) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned middle.
        let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
        if !head.is_empty() || !tail.is_empty() || cfg!(target_endian = "big") {
            return None;
        }
        Some((values, info.shape.iter().map(|&d| d as i64).collect()))
    }

    /// Reads every tensor whose name starts with `prefix`, in file order.
    pub fn load_prefixed(&self, prefix: &str) -> Result<WeightMap, WeightError> {
        let mut map = WeightMap::new();
        for name in self.names().into_iter().filter(|n| n.starts_with(prefix)) {
            let t = self.tensor(&name)?;
            map.insert(name, t);
        }
        Ok(map)
    }
}

impl WeightSource for SafetensorsFile {
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        let origin = || self.path.display().to_string();
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string(), origin: origin() })?;
        let kind = kind_of(info.dtype).ok_or_else(|| WeightError::Dtype {
            name: name.to_string(),
            origin: origin(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        // read_metadata validated that the offsets lie inside the file.
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        Tensor::f_from_data_size(bytes, &shape, kind)
            .map_err(|source| WeightError::Torch { name: name.to_string(), source })
    }

    fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}

/// A CPU-contiguous copy of one tensor, as safetensors' `View`.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `map` to `path` as safetensors (with `metadata` as the header's `__metadata__`, e.g.
/// `{"format": "pt"}` as transformers writes). The file is written to a temporary name and
/// renamed, so a crash never leaves a half-written file under `path`.
pub fn save_safetensors(
    map: &WeightMap,
    path: impl AsRef<Path>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WeightError> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(map.len());
    for (name, t) in map.iter() {
        let dtype = dtype_of(t.kind()).ok_or_else(|| WeightError::Dtype {
            name: name.to_string(),
            origin: path.display().to_string(),
            dtype: format!("{:?}", t.kind()),
        })?;
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())
            .map_err(|source| WeightError::Torch { name: name.to_string(), source })?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.to_string(), Bytes { dtype, shape, data }));
    }
    // A name unique to this process and call, so concurrent writers never share a temp file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{call}.partial", std::process::id()));
    let tmp = PathBuf::from(tmp);
    safetensors::serialize_to_file(views.iter().map(|(n, b)| (n.as_str(), b)), metadata, &tmp)
        .map_err(|e| WeightError::Corrupt {
            path: tmp.display().to_string(),
            reason: e.to_string(),
        })?;
    std::fs::rename(&tmp, path)
        .map_err(|source| WeightError::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_dtypes_and_detects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut map = WeightMap::new();
        map.insert("b.weight", Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0]).reshape([2, 2]));
        map.insert("a.ids", Tensor::from_slice(&[7i64, 8, 9]));
        map.insert("c.half", Tensor::from_slice(&[0.5f32, 1.0]).to_kind(Kind::BFloat16));
        save_safetensors(&map, &path, Some(HashMap::from([("format".into(), "pt".into())])))
            .unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.user_metadata().unwrap()["format"], "pt");
        for (name, t) in map.iter() {
            let back = f.tensor(name).unwrap();
            assert_eq!(back.kind(), t.kind(), "{name}");
            assert_eq!(back.size(), t.size(), "{name}");
            assert!(back.equal(t), "{name}");
        }
        let e = f.tensor("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("m.safetensors"), "{e}");

        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let e = SafetensorsFile::open(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors"), "{e}");
        std::fs::write(&cut, b"garbage!garbage!").unwrap();
        assert!(matches!(SafetensorsFile::open(&cut), Err(WeightError::Corrupt { .. })));
    }
}
