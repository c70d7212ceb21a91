//! NumPy `.npy` parsing (`numpy/lib/format.py`): the magic, the v1/v2/v3 header and its dict
//! literal, then the raw little-endian, C-ordered data.

use super::zip_read::{le16, le32};
use super::{TensorData, DTYPES};

pub(super) fn parse_npy(bytes: &[u8]) -> std::result::Result<TensorData, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("no \\x93NUMPY magic".to_string());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_at) = match major {
        1 => (le16(bytes, 8) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (le32(bytes, 8) as usize, 12),
        _ => return Err(format!("format version {major}.{minor} (known: 1.0, 2.0, 3.0)")),
    };
    let data_at = header_at + header_len;
    let header = bytes.get(header_at..data_at).ok_or("the header runs past the end of the file")?;
    let header = String::from_utf8_lossy(header);
    let descr = dict_field(&header, "descr")
        .and_then(|v| v.strip_prefix('\'').and_then(|v| v.split('\'').next()).map(str::to_string))
        .ok_or_else(|| format!("no 'descr' string in the header {header:?} (structured dtype?)"))?;
    let fortran = dict_field(&header, "fortran_order").ok_or("no 'fortran_order' in the header")?;
    if fortran.starts_with("True") {
        return Err(
            "fortran_order is True; save a C-ordered array (np.ascontiguousarray)".to_string()
        );
    }
    let shape = dict_field(&header, "shape")
        .and_then(|v| v.strip_prefix('(').and_then(|v| v.split(')').next()))
        .ok_or("no 'shape' tuple in the header")?;
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().map_err(|_| format!("bad dimension {s:?}")))
        .collect::<std::result::Result<_, _>>()?;
    if descr.starts_with('>') {
        return Err(format!("dtype {descr} is big-endian; save a little-endian array"));
    }
    // `=` is native order, little-endian here; numpy writes `|` for one-byte types.
    let native = descr.replacen('=', "<", 1);
    let dtype =
        DTYPES.iter().find(|d| !d.2.is_empty() && d.2 == native).map(|d| d.0).ok_or_else(|| {
            format!("dtype {descr} is not supported (<f4, <f8, <f2, <i8, <i4, <i2, |i1, |u1, |b1)")
        })?;
    let want = shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d));
    let data = &bytes[data_at..];
    if want != Some(data.len()) {
        return Err(format!(
            "wrong sizes: shape {shape:?} of {dtype} needs {} bytes of data, the file has {}",
            want.map_or("too many".to_string(), |w| w.to_string()),
            data.len()
        ));
    }
    Ok(TensorData { dtype, shape, bytes: data.to_vec() })
}

/// The text after `'key':` in a Python dict literal, leading spaces removed.
fn dict_field<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
}
