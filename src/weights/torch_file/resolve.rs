//! Resolving: the unpickled object turned into a [`TorchValue`], each tensor's bytes read from
//! its storage record and strided views materialised contiguously.

use super::unpickle::{LazyTensor, Value};
use super::zip_read::ZipArchive;
use super::{Result, TensorData, TorchFileError, TorchValue};

const MAX_DEPTH: usize = 256;

pub(super) fn resolve(v: &Value, archive: &mut ZipArchive, depth: usize) -> Result<TorchValue> {
    fn bad(archive: &ZipArchive, reason: String) -> TorchFileError {
        TorchFileError::Pickle { path: archive.path.clone(), offset: 0, reason }
    }
    if depth > MAX_DEPTH {
        return Err(bad(archive, format!("objects nested deeper than {MAX_DEPTH} (a cycle?)")));
    }
    Ok(match v {
        Value::None => TorchValue::None,
        Value::Bool(b) => TorchValue::Bool(*b),
        Value::Int(i) => TorchValue::Int(*i),
        Value::Float(x) => TorchValue::Float(*x),
        Value::Str(s) => TorchValue::Str(s.clone()),
        Value::Tuple(items) => TorchValue::Tuple(
            items.iter().map(|x| resolve(x, archive, depth + 1)).collect::<Result<_>>()?,
        ),
        Value::List(items) => {
            let items = items.borrow().clone();
            TorchValue::List(
                items.iter().map(|x| resolve(x, archive, depth + 1)).collect::<Result<_>>()?,
            )
        }
        Value::Dict(items) => {
            let items = items.borrow().clone();
            let mut out = Vec::with_capacity(items.len());
            for (k, x) in &items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(bad(archive, format!("dict key is a {}", other.kind()))),
                };
                out.push((key, resolve(x, archive, depth + 1)?));
            }
            TorchValue::Dict(out)
        }
        Value::Tensor(t) => TorchValue::Tensor(materialize(t, archive)?),
        Value::Global(g) => return Err(bad(archive, format!("a bare global {g:?} in the object"))),
        Value::Storage(_) => return Err(bad(archive, "a bare storage in the object".to_string())),
    })
}

/// Reads a tensor's elements from its storage record, contiguously.
fn materialize(t: &LazyTensor, archive: &mut ZipArchive) -> Result<TensorData> {
    let s = &t.storage;
    let es = s.dtype.size() as u64;
    let path = archive.path.clone();
    let size_err = |reason: String| TorchFileError::Size { path: path.clone(), reason };
    let record = format!("data/{}", s.key);
    let entry = archive.find(&record).ok_or_else(|| TorchFileError::MissingRecord {
        path: archive.path.clone(),
        record: format!("{}/{record}", archive.prefix),
    })?;
    let storage_bytes = s.numel.checked_mul(es);
    if storage_bytes != Some(entry.size) {
        return Err(size_err(format!(
            "record `{}` is {} bytes, its storage is {} {} elements",
            entry.name, entry.size, s.numel, s.dtype
        )));
    }
    let shape: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
    let numel = t.size.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let view = || format!("offset {}, size {:?}, stride {:?}", t.offset, t.size, t.stride);
    let numel = numel.ok_or_else(|| size_err(format!("tensor {} overflows", view())))?;
    if numel == 0 {
        return Ok(TensorData { dtype: s.dtype, shape, bytes: Vec::new() });
    }
    // The last element the view reaches.
    let last = t.size.iter().zip(&t.stride).try_fold(t.offset, |acc, (&d, &st)| {
        (d - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
    });
    match last {
        Some(last) if last < s.numel => {
            let span = archive.read(&entry, t.offset * es, (last + 1 - t.offset) * es)?;
            Ok(TensorData {
                dtype: s.dtype,
                shape,
                bytes: gather(&span, &t.size, &t.stride, es as usize),
            })
        }
        _ => Err(size_err(format!(
            "tensor view ({}) reaches past its storage `{}` of {} elements",
            view(),
            entry.name,
            s.numel
        ))),
    }
}

/// The elements of a strided view over `span` (which starts at the view's offset), row-major.
fn gather(span: &[u8], size: &[u64], stride: &[u64], es: usize) -> Vec<u8> {
    let contiguous = {
        let mut expected = 1u64;
        let mut ok = true;
        for (&d, &st) in size.iter().zip(stride).rev() {
            if d != 1 && st != expected {
                ok = false;
            }
            expected *= d;
        }
        ok
    };
    let numel: u64 = size.iter().product();
    if contiguous {
        return span[..numel as usize * es].to_vec();
    }
    let nd = size.len();
    let (inner, inner_stride) = (size[nd - 1] as usize, stride[nd - 1] as usize);
    let mut out = Vec::with_capacity(numel as usize * es);
    let mut index = vec![0u64; nd - 1];
    loop {
        let base: u64 = index.iter().zip(stride).map(|(&i, &st)| i * st).sum();
        let base = base as usize;
        if inner_stride == 1 {
            out.extend_from_slice(&span[base * es..(base + inner) * es]);
        } else {
            for j in 0..inner {
                let at = (base + j * inner_stride) * es;
                out.extend_from_slice(&span[at..at + es]);
            }
        }
        // Odometer over the outer dimensions.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < size[d] {
                break;
            }
            index[d] = 0;
        }
    }
}
