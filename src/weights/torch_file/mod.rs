//! PyTorch `torch.save` files, read and written without libtorch, and NumPy `.npy` files, read.
//!
//! tch cannot do this: `Tensor::save` writes a TorchScript archive that Python's
//! `torch.load(weights_only=True)` refuses, and tch has no pickle API. FusionBench's AdaMerging
//! saves its merging weights with `torch.save` (a tensor, or an `nn.Parameter`), WE-MoE its
//! checkpoints with Lightning's `fabric.save` (`{"model": state_dict}`); this module reads and
//! writes both.
//!
//! ## The format (torch ≥ 1.6, `torch/serialization.py` `_save`/`_load`)
//! A zip archive, every entry STORED, all entries in one folder named after the file's stem
//! (`merging_weights.pt` → `merging_weights/`; `archive/` when torch wrote to a stream):
//! - `data.pkl`: the object, pickled with protocol 2. A tensor is
//!   `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
//!   backward_hooks)`, an `nn.Parameter` `torch._utils._rebuild_parameter(tensor, requires_grad,
//!   backward_hooks)`; a storage is the persistent id `('storage', torch.FloatStorage, '<key>',
//!   '<location>', numel)`. A state dict is a `collections.OrderedDict` whose `_metadata`
//!   attribute is set by a BUILD (ignored here).
//! - `data/<key>`: each storage's bytes, little-endian; `.format_version` (`1`),
//!   `.storage_alignment` (`64`), `byteorder` (`little`), `version` (`3\n`) and
//!   `.data/serialization_id` (40 digits).
//!
//! libtorch writes the archive (`caffe2/serialize/inline_container.cc`, through miniz) with
//! quirks mirrored by [`save`], so that its output matches `torch.save`'s byte for byte except the
//! first 20 digits of the serialization id (torch hashes the record names with libstdc++'s
//! `std::hash` in `unordered_set` order; here FNV-1a in write order; `torch.load` only logs the
//! id): zero DOS times, a data descriptor after every non-empty entry, each entry's data aligned
//! to 64 bytes by a padding extra field (`FB` + length + `Z`s) in its local header, ZIP64 end
//! records always, and a ZIP64 extra field (and 8-byte descriptor sizes) for an entry whose size
//! or offset reaches 4 GiB. Tensor bytes are streamed from borrowed slices ([`TensorRef`]), so a
//! multi-GB checkpoint is never built in memory, and the file is replaced atomically.
//!
//! Reading follows `torch/_weights_only_unpickler.py`: only the protocol-2 opcodes it accepts,
//! and globals from a small allowlist (tensor and parameter rebuilds, storage types,
//! `OrderedDict`, `torch.Size`); anything else is an error naming the global. Tensors are read
//! onto the CPU whatever their saved location (`cuda:0`...), views (offset, strides) are
//! materialised contiguously.
//!
//! ## `.npy` (NumPy `numpy/lib/format.py`)
//! `\x93NUMPY`, version byte pair, header length (u16 in v1, u32 in v2/v3), a Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, then the raw data.

mod npy;
mod pickle_write;
mod resolve;
mod save;
mod unpickle;
mod zip_read;
mod zip_write;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::path::Path;

use npy::parse_npy;
use resolve::resolve;
use save::save_with_zip64_threshold;
use unpickle::Unpickler;
use zip_read::ZipArchive;
use zip_write::ZIP64_LIMIT;

/// Errors of reading and writing torch and numpy files. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TorchFileError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `torch.save` file from before torch 1.6 (a bare pickle, not a zip archive).
    #[error(
        "{path} is in the legacy torch.save format (torch < 1.6: a bare pickle, not a zip \
         archive), which is not supported; re-save it with a recent torch: \
         `torch.save(torch.load(p, weights_only=False), p)`"
    )]
    Legacy {
        /// The file at fault.
        path: String,
    },
    /// Not a zip archive, a truncated one, or a zip that is not laid out as `torch.save` does.
    #[error("{path} is not a torch.save zip archive: {reason}")]
    NotZip {
        /// The file at fault.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// `data.pkl` names a pickle global this reader does not rebuild.
    #[error(
        "{path}: data.pkl uses the pickle global `{name}`, which this reader does not support \
         (it reads tensors, nn.Parameters, dicts, OrderedDicts, lists, tuples, numbers, \
         strings, booleans and None)"
    )]
    UnsupportedGlobal {
        /// The file at fault.
        path: String,
        /// The global, `module.name`.
        name: String,
    },
    /// `data.pkl` is malformed, or uses something a weights-only unpickler refuses.
    #[error("{path}: bad pickle data.pkl at byte {offset}: {reason}")]
    Pickle {
        /// The file at fault.
        path: String,
        /// Byte offset in `data.pkl` of the opcode at fault.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A record (`data.pkl`, a storage's `data/<key>`) is absent from the archive.
    #[error("{path}: record `{record}` is missing from the archive")]
    MissingRecord {
        /// The file at fault.
        path: String,
        /// The full entry name looked for.
        record: String,
    },
    /// Sizes disagree: a storage record's length, a view reaching past its storage, a `.npy`
    /// data length, tensor bytes passed to the writer.
    #[error("{path}: wrong sizes: {reason}")]
    Size {
        /// The file at fault.
        path: String,
        /// What disagrees with what.
        reason: String,
    },
    /// A valid file with something this module does not handle (dtype, byte order, Fortran
    /// order, compression, file extension).
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file at fault.
        path: String,
        /// What is not supported.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, TorchFileError>;

fn io_err(path: &str) -> impl FnOnce(std::io::Error) -> TorchFileError + '_ {
    move |source| TorchFileError::Io { path: path.to_string(), source }
}

/// An element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `torch.float32`, `<f4`.
    F32,
    /// `torch.float64`, `<f8`.
    F64,
    /// `torch.float16`, `<f2`.
    F16,
    /// `torch.bfloat16` (no numpy equivalent).
    BF16,
    /// `torch.int64`, `<i8`.
    I64,
    /// `torch.int32`, `<i4`.
    I32,
    /// `torch.int16`, `<i2`.
    I16,
    /// `torch.int8`, `|i1`.
    I8,
    /// `torch.uint8`, `|u1`.
    U8,
    /// `torch.bool`, `|b1` (one byte, 0 or 1).
    Bool,
}

/// (dtype, torch's legacy storage class, numpy descr) of every dtype.
const DTYPES: [(Dtype, &str, &str); 10] = [
    (Dtype::F32, "FloatStorage", "<f4"),
    (Dtype::F64, "DoubleStorage", "<f8"),
    (Dtype::F16, "HalfStorage", "<f2"),
    (Dtype::BF16, "BFloat16Storage", ""),
    (Dtype::I64, "LongStorage", "<i8"),
    (Dtype::I32, "IntStorage", "<i4"),
    (Dtype::I16, "ShortStorage", "<i2"),
    (Dtype::I8, "CharStorage", "|i1"),
    (Dtype::U8, "ByteStorage", "|u1"),
    (Dtype::Bool, "BoolStorage", "|b1"),
];

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
    }

    fn from_storage_class(name: &str) -> Option<Dtype> {
        match name {
            // An untyped storage holds bytes (torch saves `UntypedStorage` with dtype uint8).
            "UntypedStorage" => Some(Dtype::U8),
            _ => DTYPES.iter().find(|d| d.1 == name).map(|d| d.0),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::I16 => "int16",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::Bool => "bool",
        };
        f.write_str(name)
    }
}

/// An owned tensor: little-endian, contiguous, row-major bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorData {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a 0-d tensor.
    pub shape: Vec<usize>,
    /// `shape.iter().product() * dtype.size()` bytes.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// A float32 tensor of `shape` holding `data` (row-major). Panics when `data.len()` is not
    /// the product of `shape`.
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(numel, data.len(), "TensorData::from_f32: shape {shape:?} needs {numel} values");
        Self {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as float32 (F64, F16 and BF16 converted, F64 rounded to nearest); `None` when
    /// the dtype is not a float type.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let b = &self.bytes;
        Some(match self.dtype {
            Dtype::F32 => {
                b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            Dtype::F16 => {
                b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => return None,
        })
    }

    /// A borrowed view, for [`save`].
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef { dtype: self.dtype, shape: self.shape.clone(), bytes: &self.bytes }
    }
}

/// A tensor to save, borrowing its bytes (little-endian, contiguous, row-major), so a large
/// checkpoint is written straight from the caller's buffers.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a 0-d tensor.
    pub shape: Vec<usize>,
    /// `shape.iter().product() * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

/// An object read from a `torch.save` file.
#[derive(Debug, Clone, PartialEq)]
pub enum TorchValue {
    /// A tensor or `nn.Parameter`, read onto the CPU, contiguous.
    Tensor(TensorData),
    /// A `dict` or `collections.OrderedDict` (a state dict), in file order. Integer keys (an
    /// optimizer's state) are given as their decimal strings.
    Dict(Vec<(String, TorchValue)>),
    /// A `list`.
    List(Vec<TorchValue>),
    /// A `tuple` or `torch.Size`.
    Tuple(Vec<TorchValue>),
    /// An `int` that fits in 64 bits.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `bool`.
    Bool(bool),
    /// `None`.
    None,
}

impl TorchValue {
    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&TensorData> {
        match self {
            TorchValue::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The value under `key`, if this is a dict holding it.
    pub fn get(&self, key: &str) -> Option<&TorchValue> {
        match self {
            TorchValue::Dict(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A borrowed [`SaveValue`] of this value (dicts saved as plain `dict`s).
    pub fn to_save_value(&self) -> SaveValue<'_> {
        match self {
            TorchValue::Tensor(t) => SaveValue::Tensor(t.as_ref()),
            TorchValue::Dict(items) => SaveValue::Dict(
                items.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), v.to_save_value())).collect(),
            ),
            TorchValue::List(items) => {
                SaveValue::List(items.iter().map(Self::to_save_value).collect())
            }
            TorchValue::Tuple(items) => {
                SaveValue::Tuple(items.iter().map(Self::to_save_value).collect())
            }
            TorchValue::Int(i) => SaveValue::Int(*i),
            TorchValue::Float(x) => SaveValue::Float(*x),
            TorchValue::Str(s) => SaveValue::Str(Cow::Borrowed(s.as_str())),
            TorchValue::Bool(b) => SaveValue::Bool(*b),
            TorchValue::None => SaveValue::None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            TorchValue::Tensor(_) => "a tensor",
            TorchValue::Dict(_) => "a dict",
            TorchValue::List(_) => "a list",
            TorchValue::Tuple(_) => "a tuple",
            TorchValue::Int(_) => "an int",
            TorchValue::Float(_) => "a float",
            TorchValue::Str(_) => "a str",
            TorchValue::Bool(_) => "a bool",
            TorchValue::None => "None",
        }
    }
}

/// An object to save with [`save`]; tensors borrow their bytes.
#[derive(Debug, Clone)]
pub enum SaveValue<'a> {
    /// A tensor (saved as `torch.Tensor`, `requires_grad=False`, on the CPU).
    Tensor(TensorRef<'a>),
    /// A plain `dict`, in this order.
    Dict(Vec<(Cow<'a, str>, SaveValue<'a>)>),
    /// A `collections.OrderedDict` (a state dict, as `module.state_dict()` returns, without its
    /// `_metadata`), in this order.
    OrderedDict(Vec<(Cow<'a, str>, SaveValue<'a>)>),
    /// A `list`.
    List(Vec<SaveValue<'a>>),
    /// A `tuple`.
    Tuple(Vec<SaveValue<'a>>),
    /// An `int`.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(Cow<'a, str>),
    /// A `bool`.
    Bool(bool),
    /// `None`.
    None,
}

// ------------------------------------------------------------------------------------------------
// Public entry points

/// Reads a `torch.save` file (any prefix folder, any storage location), as
/// `torch.load(path, map_location="cpu", weights_only=True)` would.
pub fn load(path: impl AsRef<Path>) -> Result<TorchValue> {
    let path_str = path.as_ref().display().to_string();
    let mut archive = ZipArchive::open(path.as_ref(), &path_str)?;
    if let Some(order) = archive.find("byteorder") {
        let order = archive.read(&order, 0, order.size)?;
        if order != b"little" {
            return Err(TorchFileError::Unsupported {
                path: path_str,
                reason: format!(
                    "byteorder record is {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order)
                ),
            });
        }
    }
    let pkl = archive.find("data.pkl").ok_or_else(|| TorchFileError::MissingRecord {
        path: path_str.clone(),
        record: format!("{}/data.pkl", archive.prefix),
    })?;
    let pkl = archive.read(&pkl, 0, pkl.size)?;
    let value = Unpickler::new(&pkl, &path_str).run()?;
    resolve(&value, &mut archive, 0)
}

/// Writes `value` as `torch.save(value, path)` does (see the module docs), atomically: a
/// temporary file in the same folder, fsync'd, then renamed over `path`.
pub fn save(path: impl AsRef<Path>, value: &SaveValue<'_>) -> Result<()> {
    save_with_zip64_threshold(path.as_ref(), value, ZIP64_LIMIT)
}

/// Writes one float32 tensor of `shape` (e.g. AdaMerging's `[T]` or `[T, P]` merging weights)
/// with [`save`].
pub fn save_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path_str = path.as_ref().display().to_string();
    let numel: usize = shape.iter().product();
    if numel != data.len() {
        return Err(TorchFileError::Size {
            path: path_str,
            reason: format!("shape {shape:?} needs {numel} values, got {}", data.len()),
        });
    }
    let t = TensorData::from_f32(shape, data);
    save(path, &SaveValue::Tensor(t.as_ref()))
}

/// Reads one float tensor as float32, with its shape: a `torch.save` file (`.pt`, `.pth`:
/// a tensor or `nn.Parameter`) or a NumPy file (`.npy`, `.np`). Other dtypes, other contents
/// and other extensions are errors naming the file.
pub fn load_f32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = path.as_ref();
    let path_str = path.display().to_string();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let tensor = match ext.as_str() {
        "pt" | "pth" => match load(path)? {
            TorchValue::Tensor(t) => t,
            other => {
                return Err(TorchFileError::Unsupported {
                    path: path_str,
                    reason: format!("expected one tensor, found {}", other.kind()),
                })
            }
        },
        "npy" | "np" => load_npy(path)?,
        _ => {
            return Err(TorchFileError::Unsupported {
                path: path_str,
                reason: "unknown extension: expected .pt or .pth (torch.save) or .npy or .np \
                         (numpy.save)"
                    .to_string(),
            })
        }
    };
    match tensor.to_f32() {
        Some(v) => Ok((tensor.shape, v)),
        None => Err(TorchFileError::Unsupported {
            path: path_str,
            reason: format!("tensor has dtype {}, expected a float type", tensor.dtype),
        }),
    }
}

/// Reads a NumPy `.npy` file (format v1, v2 or v3; dtypes `<f4`, `<f8`, `<f2`, `<i8`, `<i4`,
/// `<i2`, `|i1`, `|u1`, `|b1`; C order).
pub fn load_npy(path: impl AsRef<Path>) -> Result<TensorData> {
    let path_str = path.as_ref().display().to_string();
    let bytes = std::fs::read(path.as_ref()).map_err(io_err(&path_str))?;
    parse_npy(&bytes).map_err(|reason| TorchFileError::Unsupported {
        path: path_str,
        reason: format!("not a supported .npy file: {reason}"),
    })
}
