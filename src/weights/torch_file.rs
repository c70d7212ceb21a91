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

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;

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

// ------------------------------------------------------------------------------------------------
// Zip reading

/// The entry of a zip archive's central directory.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    size: u64,
    header_offset: u64,
    method: u16,
}

/// An open zip archive: its central directory, and the folder all entries are in.
struct ZipArchive {
    path: String,
    file: File,
    len: u64,
    entries: Vec<Entry>,
    prefix: String,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_EOCD64: u32 = 0x0606_4b50;
const SIG_LOCATOR64: u32 = 0x0706_4b50;
const SIG_DESCRIPTOR: u32 = 0x0807_4b50;

impl ZipArchive {
    fn open(path: &Path, path_str: &str) -> Result<Self> {
        let mut file = File::open(path).map_err(io_err(path_str))?;
        let len = file.metadata().map_err(io_err(path_str))?.len();
        let not_zip =
            |reason: String| TorchFileError::NotZip { path: path_str.to_string(), reason };
        let mut head = [0u8; 4];
        let n = read_up_to(&mut file, &mut head).map_err(io_err(path_str))?;
        if n >= 1 && head[0] == 0x80 {
            return Err(TorchFileError::Legacy { path: path_str.to_string() });
        }
        if n < 4 || le32(&head, 0) != SIG_LOCAL {
            return Err(not_zip(format!("it does not start with a zip header ({n} bytes read)")));
        }
        // End of central directory: the last 22 bytes plus a comment of up to 64 KiB.
        let tail_len = len.min(22 + 65535);
        let tail =
            read_at(&mut file, len - tail_len, tail_len as usize).map_err(io_err(path_str))?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| le32(&tail, i) == SIG_EOCD)
            .ok_or_else(|| {
            not_zip("no end-of-central-directory record: the file is truncated".to_string())
        })?;
        let mut count = le16(&tail, eocd + 10) as u64;
        let mut cd_size = le32(&tail, eocd + 12) as u64;
        let mut cd_offset = le32(&tail, eocd + 16) as u64;
        if eocd >= 20 && le32(&tail, eocd - 20) == SIG_LOCATOR64 {
            let at = le64(&tail, eocd - 20 + 8);
            if at.checked_add(56).is_none_or(|end| end > len) {
                return Err(not_zip(format!("ZIP64 end record offset {at} is past the end")));
            }
            let rec = read_at(&mut file, at, 56).map_err(io_err(path_str))?;
            if le32(&rec, 0) != SIG_EOCD64 {
                return Err(not_zip(format!("no ZIP64 end record at offset {at}")));
            }
            count = le64(&rec, 32);
            cd_size = le64(&rec, 40);
            cd_offset = le64(&rec, 48);
        }
        if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
            return Err(not_zip(format!(
                "central directory ({cd_size} bytes at {cd_offset}) is past the end of the \
                 {len}-byte file: truncated"
            )));
        }
        let cd = read_at(&mut file, cd_offset, cd_size as usize).map_err(io_err(path_str))?;
        let entries = parse_central_directory(&cd, count).map_err(not_zip)?;
        let first = entries.first().ok_or_else(|| not_zip("the archive is empty".to_string()))?;
        let prefix = match first.name.find('/') {
            Some(i) => first.name[..i].to_string(),
            None => return Err(not_zip(format!("entry `{}` is not in a folder", first.name))),
        };
        Ok(Self { path: path_str.to_string(), file, len, entries, prefix })
    }

    /// The entry `<prefix>/<record>`.
    fn find(&self, record: &str) -> Option<Entry> {
        let full = format!("{}/{record}", self.prefix);
        self.entries.iter().find(|e| e.name == full).cloned()
    }

    /// `len` bytes of `entry`'s data from byte `start`.
    fn read(&mut self, entry: &Entry, start: u64, len: u64) -> Result<Vec<u8>> {
        let corrupt = |reason: String| TorchFileError::NotZip { path: self.path.clone(), reason };
        if entry.method != 0 {
            return Err(TorchFileError::Unsupported {
                path: self.path.clone(),
                reason: format!(
                    "entry `{}` is compressed (method {}); torch.save stores entries uncompressed",
                    entry.name, entry.method
                ),
            });
        }
        if entry.header_offset.checked_add(30).is_none_or(|end| end > self.len) {
            return Err(corrupt(format!("entry `{}`'s header is past the end", entry.name)));
        }
        let header =
            read_at(&mut self.file, entry.header_offset, 30).map_err(io_err(&self.path))?;
        if le32(&header, 0) != SIG_LOCAL {
            return Err(corrupt(format!("entry `{}` has no local header", entry.name)));
        }
        let data_start =
            entry.header_offset + 30 + le16(&header, 26) as u64 + le16(&header, 28) as u64;
        if data_start.checked_add(entry.size).is_none_or(|end| end > self.len) {
            return Err(corrupt(format!(
                "entry `{}` ({} bytes at {data_start}) runs past the end of the {}-byte file: \
                 truncated",
                entry.name, entry.size, self.len
            )));
        }
        debug_assert!(start + len <= entry.size);
        read_at(&mut self.file, data_start + start, len as usize).map_err(io_err(&self.path))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn parse_central_directory(cd: &[u8], count: u64) -> std::result::Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        if at + 46 > cd.len() || le32(cd, at) != SIG_CENTRAL {
            return Err(format!("central directory entry {i} of {count} is malformed"));
        }
        let method = le16(cd, at + 10);
        let mut size = le32(cd, at + 24) as u64;
        let comp_size = le32(cd, at + 20) as u64;
        let mut header_offset = le32(cd, at + 42) as u64;
        let (name_len, extra_len, comment_len) =
            (le16(cd, at + 28) as usize, le16(cd, at + 30) as usize, le16(cd, at + 32) as usize);
        let name_at = at + 46;
        let end = name_at + name_len + extra_len + comment_len;
        if end > cd.len() {
            return Err(format!("central directory entry {i} runs past the directory"));
        }
        let name = String::from_utf8_lossy(&cd[name_at..name_at + name_len]).into_owned();
        // ZIP64 extended information: the saturated fields, in order, as u64s.
        let mut extra = &cd[name_at + name_len..name_at + name_len + extra_len];
        while extra.len() >= 4 {
            let (id, len) = (le16(extra, 0), le16(extra, 2) as usize);
            let body = extra.get(4..4 + len).ok_or_else(|| format!("`{name}`: bad extra field"))?;
            if id == 1 {
                let mut fields = body.chunks_exact(8).map(|c| le64(c, 0));
                let mut next = |what: &str| {
                    fields.next().ok_or_else(|| format!("`{name}`: ZIP64 field lacks the {what}"))
                };
                if size == 0xFFFF_FFFF {
                    size = next("size")?;
                }
                if comp_size == 0xFFFF_FFFF {
                    next("compressed size")?;
                }
                if header_offset == 0xFFFF_FFFF {
                    header_offset = next("header offset")?;
                }
            }
            extra = &extra[4 + len..];
        }
        entries.push(Entry { name, size, header_offset, method });
        at = end;
    }
    Ok(entries)
}

// ------------------------------------------------------------------------------------------------
// Unpickling (the subset `torch/_weights_only_unpickler.py` accepts)

/// A global this reader rebuilds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    Size,
    Parameter,
    Storage(Dtype),
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch", "Size") => Global::Size,
            ("torch.nn.parameter", "Parameter") => Global::Parameter,
            ("torch" | "torch.storage", class) => {
                Global::Storage(Dtype::from_storage_class(class)?)
            }
            _ => return None,
        })
    }
}

/// A storage's persistent id.
#[derive(Debug)]
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: u64,
}

/// A tensor whose bytes are still in the archive.
#[derive(Debug)]
struct LazyTensor {
    storage: Rc<StorageRef>,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

/// An unpickled object. Lists and dicts are shared (the memo refers to them, SETITEMS mutates).
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<LazyTensor>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    path: &'a str,
    pos: usize,
    /// Start of the opcode being run, for errors.
    op_at: usize,
    stack: Vec<Value>,
    metastack: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], path: &'a str) -> Self {
        Self {
            data,
            path,
            pos: 0,
            op_at: 0,
            stack: Vec::new(),
            metastack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn err(&self, reason: impl Into<String>) -> TorchFileError {
        TorchFileError::Pickle {
            path: self.path.to_string(),
            offset: self.op_at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err("data.pkl ends in the middle of an opcode")),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(le32(self.take(4)?, 0))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        if self.stack.is_empty() {
            return Err(self.err("stack underflow"));
        }
        let n = self.stack.len();
        Ok(&mut self.stack[n - 1])
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let below = self.metastack.pop().ok_or_else(|| self.err("no MARK to pop to"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO: torch.save writes 2; weights_only accepts others with a warning.
                    self.u8()?;
                }
                b'.' => return self.pop(),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = Global::lookup(&module, &name).ok_or_else(|| {
                        TorchFileError::UnsupportedGlobal {
                            path: self.path.to_string(),
                            name: format!("{module}.{name}"),
                        }
                    })?;
                    self.stack.push(Value::Global(global));
                }
                b'q' | b'r' => {
                    let i = if op == b'q' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned();
                    let v = v.ok_or_else(|| self.err(format!("memo entry {i} is not set")))?;
                    self.stack.push(v);
                }
                b'(' => self.metastack.push(std::mem::take(&mut self.stack)),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(le16(b, 0) as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v =
                        decode_long(b).ok_or_else(|| self.err("integer does not fit 64 bits"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.err("string is not UTF-8"))?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'U' => {
                    // SHORT_BINSTRING (pickles from Python 2): decoded as text, as torch.load does.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Str(String::from_utf8_lossy(b).into_owned()));
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.top()? {
                        Value::List(list) => list.borrow_mut().extend(items),
                        other => {
                            let kind = other.kind();
                            return Err(self.err(format!("can only append to a list, not {kind}")));
                        }
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let dict = match self.top()? {
                        Value::Dict(d) => d.clone(),
                        other => {
                            let kind = other.kind();
                            return Err(
                                self.err(format!("can only set items of a dict, not {kind}"))
                            );
                        }
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        dict_set(&mut dict.borrow_mut(), k, v);
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let result = self.reduce(func, args)?;
                    self.stack.push(result);
                }
                0x81 => {
                    // NEWOBJ: only `nn.Parameter(tensor, ...)`, as weights_only allows.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (&cls, &args) {
                        (Value::Global(Global::Parameter), Value::Tuple(a))
                            if matches!(a.first(), Some(Value::Tensor(_))) =>
                        {
                            self.stack.push(a[0].clone())
                        }
                        _ => return Err(self.err(format!("NEWOBJ of a {}", cls.kind()))),
                    }
                }
                b'b' => {
                    // BUILD: a state dict's `_metadata`, a Parameter's state: not needed.
                    self.pop()?;
                    let kind = self.top()?.kind();
                    if !matches!(kind, "dict" | "tensor") {
                        return Err(self.err(format!("BUILD of a {kind}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(&pid)?;
                    self.stack.push(Value::Storage(Rc::new(storage)));
                }
                _ => {
                    return Err(self.err(format!(
                        "opcode 0x{op:02x} ({}) is not one a weights_only unpickler accepts",
                        opcode_name(op)
                    )))
                }
            }
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`; the location is ignored, every
    /// storage is read onto the CPU.
    fn persistent_load(&self, pid: &Value) -> Result<StorageRef> {
        let bad = || self.err(format!("persistent id is not a storage id: {pid:?}"));
        let Value::Tuple(t) = pid else { return Err(bad()) };
        let [Value::Str(tag), class, Value::Str(key), Value::Str(_), Value::Int(numel)] =
            t.as_slice()
        else {
            return Err(bad());
        };
        match class {
            Value::Global(Global::Storage(dtype)) if tag == "storage" && *numel >= 0 => {
                Ok(StorageRef { dtype: *dtype, key: key.clone(), numel: *numel as u64 })
            }
            _ => Err(bad()),
        }
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = args else {
            return Err(self.err(format!("REDUCE arguments are a {}, not a tuple", args.kind())));
        };
        let Value::Global(global) = func else {
            return Err(self.err(format!("REDUCE of a {}", func.kind())));
        };
        let ints = |v: &Value, what: &str| -> Result<Vec<u64>> {
            let Value::Tuple(t) = v else {
                return Err(self.err(format!("tensor {what} is not a tuple")));
            };
            t.iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 => Ok(*i as u64),
                    _ => Err(self.err(format!("tensor {what} holds {x:?}"))),
                })
                .collect()
        };
        match (global, args.as_slice()) {
            (
                Global::RebuildTensorV2,
                [Value::Storage(s), Value::Int(offset), size, stride, _, _, ..],
            ) if args.len() <= 7 && *offset >= 0 => {
                let (size, stride) = (ints(size, "size")?, ints(stride, "stride")?);
                if size.len() != stride.len() {
                    return Err(self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in length"
                    )));
                }
                Ok(Value::Tensor(Rc::new(LazyTensor {
                    storage: s.clone(),
                    offset: *offset as u64,
                    size,
                    stride,
                })))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), _, _])
            | (Global::RebuildParameterWithState, [t @ Value::Tensor(_), _, _, _]) => Ok(t.clone()),
            (Global::OrderedDict, []) => Ok(Value::Dict(Rc::default())),
            (Global::OrderedDict, [Value::List(pairs)]) => {
                let mut items = Vec::new();
                for pair in pairs.borrow().iter() {
                    let kv = match pair {
                        Value::Tuple(t) if t.len() == 2 => (t[0].clone(), t[1].clone()),
                        Value::List(l) if l.borrow().len() == 2 => {
                            let l = l.borrow();
                            (l[0].clone(), l[1].clone())
                        }
                        _ => return Err(self.err("OrderedDict() of something other than pairs")),
                    };
                    dict_set(&mut items, kv.0, kv.1);
                }
                Ok(Value::Dict(Rc::new(RefCell::new(items))))
            }
            (Global::Size, [t @ Value::Tuple(_)]) => Ok(t.clone()),
            (g, a) => Err(self.err(format!("cannot rebuild {g:?} from {} arguments", a.len()))),
        }
    }
}

/// Python's `dict[k] = v`: replaces in place, or appends.
fn dict_set(items: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    let same = |a: &Value| match (a, &k) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        _ => false,
    };
    match items.iter_mut().find(|(a, _)| same(a)) {
        Some(slot) => slot.1 = v,
        None => items.push((k, v)),
    }
}

fn decode_long(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    if b.len() > 8 {
        // Wider encodings are fine when the extra bytes are only sign extension.
        let sign = if b[7] & 0x80 != 0 { 0xFF } else { 0 };
        if b[8..].iter().any(|&x| x != sign) {
            return None;
        }
        return decode_long(&b[..8]);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xFF } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(a))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        b'B' | b'C' | 0x8e | 0x96 => "bytes",
        b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'i' | b'o' | b'p' | b'g' | b'd' | b'l' => {
            "protocol 0/1"
        }
        _ => "unknown",
    }
}

// ------------------------------------------------------------------------------------------------
// Resolving: the unpickled object with each tensor's bytes read

const MAX_DEPTH: usize = 256;

fn resolve(v: &Value, archive: &mut ZipArchive, depth: usize) -> Result<TorchValue> {
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

// ------------------------------------------------------------------------------------------------
// Pickling (what CPython's pickle protocol 2 writes for these objects, memo included)

struct Pickler<'v, 'a> {
    out: Vec<u8>,
    memo_len: u32,
    /// Memo slots of globals and of the constant strings torch's `persistent_id` reuses.
    shared: HashMap<&'static str, u32>,
    /// The tensors in storage-key order.
    storages: Vec<&'v TensorRef<'a>>,
}

impl<'v, 'a> Pickler<'v, 'a> {
    fn new() -> Self {
        Self { out: vec![0x80, 2], memo_len: 0, shared: HashMap::new(), storages: Vec::new() }
    }

    fn memoize(&mut self) -> u32 {
        let i = self.memo_len;
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        self.memo_len += 1;
        i
    }

    /// A global or a constant string, written once and then fetched from the memo.
    fn shared(&mut self, key: &'static str, write: impl FnOnce(&mut Vec<u8>)) {
        match self.shared.get(key) {
            Some(&i) if i < 256 => self.out.extend_from_slice(&[b'h', i as u8]),
            Some(&i) => {
                self.out.push(b'j');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
            None => {
                write(&mut self.out);
                let i = self.memoize();
                self.shared.insert(key, i);
            }
        }
    }

    fn global(&mut self, key: &'static str) {
        // key is "module\nname\n".
        self.shared(key, |out| {
            out.push(b'c');
            out.extend_from_slice(key.as_bytes());
        });
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.memoize();
    }

    fn const_str(&mut self, s: &'static str) {
        self.shared(s, |out| {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        });
    }

    fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's complement (CPython's `encode_long`).
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (top, next) = (bytes[n - 1], bytes[n - 2]);
                if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    /// A tuple of already-written items: TUPLE1-3, or MARK … TUPLE; EMPTY_TUPLE is not memoized.
    fn tuple(&mut self, items: impl FnOnce(&mut Self), n: usize) {
        if n == 0 {
            self.out.push(b')');
            return;
        }
        if n > 3 {
            self.out.push(b'(');
        }
        items(self);
        self.out.push(match n {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.memoize();
    }

    fn ints_tuple(&mut self, v: &[u64]) {
        self.tuple(
            |p| {
                for &x in v {
                    p.int(x as i64);
                }
            },
            v.len(),
        );
    }

    /// An empty `collections.OrderedDict()`: GLOBAL, EMPTY_TUPLE, REDUCE.
    fn ordered_dict_head(&mut self) {
        self.global("collections\nOrderedDict\n");
        self.out.extend_from_slice(b")R");
        self.memoize();
    }

    /// `_batch_setitems`: SETITEM for one, MARK … SETITEMS per batch of up to 1000.
    fn items(&mut self, items: &'v [(Cow<'a, str>, SaveValue<'a>)]) {
        for batch in items.chunks(1000) {
            if batch.len() > 1 {
                self.out.push(b'(');
            }
            for (k, v) in batch {
                self.str(k);
                self.value(v);
            }
            self.out.push(if batch.len() > 1 { b'u' } else { b's' });
        }
    }

    fn value(&mut self, v: &'v SaveValue<'a>) {
        match v {
            SaveValue::Tensor(t) => self.tensor(t),
            SaveValue::Dict(items) => {
                self.out.push(b'}');
                self.memoize();
                self.items(items);
            }
            SaveValue::OrderedDict(items) => {
                self.ordered_dict_head();
                self.items(items);
            }
            SaveValue::List(items) => {
                self.out.push(b']');
                self.memoize();
                for batch in items.chunks(1000) {
                    if batch.len() > 1 {
                        self.out.push(b'(');
                    }
                    for x in batch {
                        self.value(x);
                    }
                    self.out.push(if batch.len() > 1 { b'e' } else { b'a' });
                }
            }
            SaveValue::Tuple(items) => self.tuple(
                |p| {
                    for x in items {
                        p.value(x);
                    }
                },
                items.len(),
            ),
            SaveValue::Int(i) => self.int(*i),
            SaveValue::Float(x) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&x.to_be_bytes());
            }
            SaveValue::Str(s) => self.str(s),
            SaveValue::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            SaveValue::None => self.out.push(b'N'),
        }
    }

    /// `_rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), 0, size, stride,
    /// False, OrderedDict())`, with one storage per tensor.
    fn tensor(&mut self, t: &'v TensorRef<'a>) {
        let key = self.storages.len().to_string();
        self.storages.push(t);
        let size: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        let mut stride = vec![0u64; size.len()];
        let mut acc = 1u64;
        for (s, &d) in stride.iter_mut().zip(&size).rev() {
            *s = acc;
            acc *= d.max(1);
        }
        let numel: u64 = size.iter().product();
        self.global("torch._utils\n_rebuild_tensor_v2\n");
        self.tuple(
            |p| {
                p.tuple(
                    |p| {
                        p.const_str("storage");
                        p.global(storage_global(t.dtype));
                        p.str(&key);
                        p.const_str("cpu");
                        p.int(numel as i64);
                    },
                    5,
                );
                p.out.push(b'Q');
                p.int(0);
                p.ints_tuple(&size);
                p.ints_tuple(&stride);
                p.out.push(0x89);
                p.ordered_dict_head();
            },
            6,
        );
        self.out.push(b'R');
        self.memoize();
    }
}

fn storage_global(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "torch\nFloatStorage\n",
        Dtype::F64 => "torch\nDoubleStorage\n",
        Dtype::F16 => "torch\nHalfStorage\n",
        Dtype::BF16 => "torch\nBFloat16Storage\n",
        Dtype::I64 => "torch\nLongStorage\n",
        Dtype::I32 => "torch\nIntStorage\n",
        Dtype::I16 => "torch\nShortStorage\n",
        Dtype::I8 => "torch\nCharStorage\n",
        Dtype::U8 => "torch\nByteStorage\n",
        Dtype::Bool => "torch\nBoolStorage\n",
    }
}

// ------------------------------------------------------------------------------------------------
// Zip writing (libtorch's PyTorchStreamWriter over miniz)

/// Sizes and offsets from which miniz writes ZIP64 fields (`MZ_UINT32_MAX`).
const ZIP64_LIMIT: u64 = 0xFFFF_FFFF;
/// `torch.utils.serialization.config.save.storage_alignment`'s default.
const ALIGNMENT: u64 = 64;

/// An entry written, for the central directory.
struct Written {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    prefix: String,
    entries: Vec<Written>,
    /// ZIP64 fields for sizes and offsets at or above this (miniz: 2^32 - 1; lower in tests).
    zip64_at: u64,
    /// `c10::hash_combine` of the CRC-32s of the non-empty records, in write order (torch's).
    crc_hash: u64,
    /// `c10::hash_combine` of FNV-1a hashes of the record names, in write order.
    name_hash: u64,
}

fn hash_combine(seed: u64, value: u64) -> u64 {
    seed ^ value.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl<W: Write> ZipWriter<W> {
    fn new(out: W, prefix: &str, zip64_at: u64) -> Self {
        Self {
            out,
            pos: 0,
            prefix: prefix.to_string(),
            entries: Vec::new(),
            zip64_at,
            crc_hash: 0,
            name_hash: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// One STORED record `<prefix>/<name>`, its data streamed in 8 MiB pieces.
    fn record(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let full = format!("{}/{name}", self.prefix);
        let (offset, size) = (self.pos, data.len() as u64);
        let (big_size, big_offset) = (size >= self.zip64_at, offset >= self.zip64_at);
        // miniz's local ZIP64 field: the size, a compressed size of 0 (not known yet when miniz
        // writes it), and the offset; each only when it reaches the limit.
        let mut zip64 = Vec::new();
        if big_size || big_offset {
            let n = 8 * (2 * big_size as u16 + big_offset as u16);
            zip64.extend_from_slice(&1u16.to_le_bytes());
            zip64.extend_from_slice(&n.to_le_bytes());
            if big_size {
                zip64.extend_from_slice(&size.to_le_bytes());
                zip64.extend_from_slice(&0u64.to_le_bytes());
            }
            if big_offset {
                zip64.extend_from_slice(&offset.to_le_bytes());
            }
        }
        // torch's `getPadding`: an `FB` extra field that puts the data on a 64-byte boundary.
        let start = offset + 30 + full.len() as u64 + zip64.len() as u64 + 4;
        let pad = ((ALIGNMENT - start % ALIGNMENT) % ALIGNMENT) as usize;
        let flags: u16 = 0x0800 | if size > 0 { 0x0008 } else { 0 };
        let mut header = Vec::with_capacity(30 + full.len() + zip64.len() + 4 + pad);
        header.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes()); // version needed
        header.extend_from_slice(&flags.to_le_bytes());
        header.extend_from_slice(&[0u8; 2 + 2 + 2 + 4 + 4 + 4]); // method, time, date, crc, sizes
        header.extend_from_slice(&(full.len() as u16).to_le_bytes());
        header.extend_from_slice(&((zip64.len() + 4 + pad) as u16).to_le_bytes());
        header.extend_from_slice(full.as_bytes());
        header.extend_from_slice(&zip64);
        header.extend_from_slice(b"FB");
        header.extend_from_slice(&(pad as u16).to_le_bytes());
        header.resize(header.len() + pad, b'Z');
        self.put(&header)?;
        let mut crc = 0u32;
        for piece in data.chunks(8 << 20) {
            crc = crc32_update(crc, piece);
            self.put(piece)?;
        }
        if size > 0 {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&SIG_DESCRIPTOR.to_le_bytes());
            d.extend_from_slice(&crc.to_le_bytes());
            if zip64.is_empty() {
                d.extend_from_slice(&(size as u32).to_le_bytes());
                d.extend_from_slice(&(size as u32).to_le_bytes());
            } else {
                d.extend_from_slice(&size.to_le_bytes());
                d.extend_from_slice(&size.to_le_bytes());
            }
            self.put(&d)?;
            self.crc_hash = hash_combine(self.crc_hash, crc as u64);
        }
        self.name_hash = hash_combine(self.name_hash, fnv1a(name));
        self.entries.push(Written { name: full, crc, size, offset });
        Ok(())
    }

    /// `.data/serialization_id`, the central directory and the (ZIP64) end records.
    fn finish(mut self) -> std::io::Result<W> {
        let id = format!("{:020}{:020}", self.name_hash, self.crc_hash);
        self.record(".data/serialization_id", id.as_bytes())?;
        let sat = |v: u64, big: bool| if big { 0xFFFF_FFFFu32 } else { v as u32 };
        let cd_offset = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let (big_size, big_offset) = (e.size >= self.zip64_at, e.offset >= self.zip64_at);
            let mut zip64 = Vec::new();
            if big_size || big_offset {
                let n = 8 * (2 * big_size as u16 + big_offset as u16);
                zip64.extend_from_slice(&1u16.to_le_bytes());
                zip64.extend_from_slice(&n.to_le_bytes());
                if big_size {
                    zip64.extend_from_slice(&e.size.to_le_bytes());
                    zip64.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_offset {
                    zip64.extend_from_slice(&e.offset.to_le_bytes());
                }
            }
            let flags: u16 = 0x0800 | if e.size > 0 { 0x0008 } else { 0 };
            cd.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            cd.extend_from_slice(&[0u8; 4]); // version made by, version needed
            cd.extend_from_slice(&flags.to_le_bytes());
            cd.extend_from_slice(&[0u8; 6]); // method, time, date
            cd.extend_from_slice(&e.crc.to_le_bytes());
            cd.extend_from_slice(&sat(e.size, big_size).to_le_bytes());
            cd.extend_from_slice(&sat(e.size, big_size).to_le_bytes());
            cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0u8; 2 + 2 + 2 + 4]); // comment, disk, attributes
            cd.extend_from_slice(&sat(e.offset, big_offset).to_le_bytes());
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&zip64);
        }
        self.put(&cd)?;
        let (count, cd_size) = (self.entries.len() as u64, cd.len() as u64);
        let eocd64_offset = self.pos;
        let mut end = Vec::with_capacity(56 + 20 + 22);
        end.extend_from_slice(&SIG_EOCD64.to_le_bytes());
        end.extend_from_slice(&44u64.to_le_bytes());
        end.extend_from_slice(&0x031Eu16.to_le_bytes()); // made by: Unix, 3.0 (miniz)
        end.extend_from_slice(&0x002Du16.to_le_bytes()); // needed: 4.5
        end.extend_from_slice(&[0u8; 8]); // disk numbers
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&cd_size.to_le_bytes());
        end.extend_from_slice(&cd_offset.to_le_bytes());
        end.extend_from_slice(&SIG_LOCATOR64.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&eocd64_offset.to_le_bytes());
        end.extend_from_slice(&1u32.to_le_bytes());
        end.extend_from_slice(&SIG_EOCD.to_le_bytes());
        end.extend_from_slice(&[0u8; 4]); // disk numbers
        let count16 = count.min(0xFFFF) as u16;
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&sat(cd_size, cd_size >= self.zip64_at).to_le_bytes());
        end.extend_from_slice(&sat(cd_offset, cd_offset >= self.zip64_at).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes()); // comment length
        self.put(&end)?;
        Ok(self.out)
    }
}

/// The folder name torch gives the archive: the file name without its last extension (libtorch's
/// `basename`); `archive` for a non-ASCII path (torch then writes through a Python stream) or an
/// empty stem (torch refuses those).
fn archive_name(path: &Path) -> String {
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

fn save_with_zip64_threshold(path: &Path, value: &SaveValue<'_>, zip64_at: u64) -> Result<()> {
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

// ------------------------------------------------------------------------------------------------
// CRC-32 (zip's: reflected 0xEDB88320), slice-by-8

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            t[s][i] = (t[s - 1][i] >> 8) ^ t[0][(t[s - 1][i] & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// The CRC-32 of everything so far (`crc`, 0 to start) followed by `data`.
fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = le32(ch, 0) ^ c;
        let hi = le32(ch, 4);
        c = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

// ------------------------------------------------------------------------------------------------
// .npy

fn parse_npy(bytes: &[u8]) -> std::result::Result<TensorData, String> {
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

#[cfg(test)]
mod tests {
    //! Round trips in Rust; cross-checks against Python's `torch.save`/`torch.load` (the torch
    //! venv of `scripts/env.sh` first on PATH: a missing `python` with torch fails the test);
    //! committed fixtures (tests/fixtures/torch_files/, made by scripts/fixtures/torch_files.py)
    //! for what that venv cannot make: `np.save` files and a storage saved at `cuda:0`.
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    const PYTHON_MISSING: &str = "the torch_file tests need `python` with torch 2.11 first on \
                                  PATH: run `source scripts/env.sh` first (scripts/test.sh does)";

    /// Runs `script` with `python -c`, arguments `args`; its stdout.
    fn python(script: &str, args: &[&Path]) -> String {
        let out = Command::new("python")
            .arg("-c")
            .arg(format!("import torch\n{script}"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `python` ({e}): {PYTHON_MISSING}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named 'torch'") {
            panic!("{PYTHON_MISSING}");
        }
        assert!(out.status.success(), "python failed:\n{stderr}\nscript:\n{script}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Python's side of [`show`]: one line per file, the object torch.load(weights_only=True)
    /// gives, after `zipfile.testzip()` (every CRC) passed.
    const PY_SHOW: &str = r#"
import struct, sys, zipfile
from collections import OrderedDict
def show(x):
    if isinstance(x, torch.Tensor):
        b = bytes(x.detach().reshape(-1).contiguous().view(torch.uint8).tolist())
        return "T(%s,%s,%s)" % (str(x.dtype).replace("torch.", ""), list(x.shape), b.hex())
    if isinstance(x, dict):
        tag = "OD" if type(x) is OrderedDict else "D"
        return tag + "{" + ",".join("%s:%s" % (k, show(v)) for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "[" + ",".join(map(show, x)) + "]"
    if isinstance(x, tuple):
        return "(" + ",".join(map(show, x)) + ")"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return "I%d" % x
    if isinstance(x, float):
        return "F%d" % struct.unpack("<q", struct.pack("<d", x))[0]
    if isinstance(x, str):
        return "S" + x
    if x is None:
        return "None"
    raise TypeError(type(x))
for p in sys.argv[1:]:
    assert zipfile.ZipFile(p).testzip() is None, p
    print(show(torch.load(p, weights_only=True)))
"#;

    fn show(v: &SaveValue<'_>) -> String {
        let join = |items: &[SaveValue<'_>]| items.iter().map(show).collect::<Vec<_>>().join(",");
        let dict = |tag: &str, items: &[(Cow<'_, str>, SaveValue<'_>)]| {
            let body: Vec<String> = items.iter().map(|(k, v)| format!("{k}:{}", show(v))).collect();
            format!("{tag}{{{}}}", body.join(","))
        };
        match v {
            SaveValue::Tensor(t) => {
                let hex: String = t.bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!("T({},{:?},{hex})", t.dtype, t.shape)
            }
            SaveValue::Dict(items) => dict("D", items),
            SaveValue::OrderedDict(items) => dict("OD", items),
            SaveValue::List(items) => format!("[{}]", join(items)),
            SaveValue::Tuple(items) => format!("({})", join(items)),
            SaveValue::Int(i) => format!("I{i}"),
            SaveValue::Float(x) => format!("F{}", x.to_bits() as i64),
            SaveValue::Str(s) => format!("S{s}"),
            SaveValue::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            SaveValue::None => "None".to_string(),
        }
    }

    /// (i - 5) / 4 for i in 0..n, as Python's `(torch.arange(n, dtype=torch.float32) - 5) / 4`.
    fn v(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 - 5.0) / 4.0).collect()
    }

    fn f32s(shape: &[usize], data: &[f32]) -> TensorData {
        TensorData::from_f32(shape, data)
    }

    fn typed(dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> TensorData {
        TensorData { dtype, shape: shape.to_vec(), bytes }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_files").join(name)
    }

    fn key(k: &str) -> Cow<'_, str> {
        Cow::Borrowed(k)
    }

    /// The tensors the Python cross-checks also build: [T], [T, P], 0-d, empty, other dtypes.
    struct Tensors {
        task_wise: TensorData,
        layer_wise: TensorData,
        scalar: TensorData,
        empty: TensorData,
        f64: TensorData,
        i64: TensorData,
        bf16: TensorData,
        f16: TensorData,
        bool: TensorData,
        many: Vec<(String, TensorData)>,
    }

    fn tensors() -> Tensors {
        let v3 = v(3);
        Tensors {
            task_wise: f32s(&[8], &v(8)),
            layer_wise: f32s(&[4, 5], &v(20)),
            scalar: f32s(&[], &[2.5]),
            empty: f32s(&[0, 3], &[]),
            f64: typed(
                Dtype::F64,
                &[3],
                v3.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            ),
            i64: typed(Dtype::I64, &[3], (0..3i64).flat_map(|x| x.to_le_bytes()).collect()),
            bf16: typed(
                Dtype::BF16,
                &[3],
                v3.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            ),
            f16: typed(
                Dtype::F16,
                &[3],
                v3.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            ),
            bool: typed(Dtype::Bool, &[3], vec![1, 0, 1]),
            many: (0..1200).map(|i| (format!("p{i}"), f32s(&[], &[i as f32]))).collect(),
        }
    }

    /// `{"model": OrderedDict(...)}` as fabric.save writes, plus plain values.
    fn checkpoint(t: &Tensors) -> SaveValue<'_> {
        SaveValue::Dict(vec![(
            key("model"),
            SaveValue::OrderedDict(vec![
                (key("a.weight"), SaveValue::Tensor(t.layer_wise.as_ref())),
                (key("a.bias"), SaveValue::Tensor(t.task_wise.as_ref())),
                (key("x"), SaveValue::Tensor(t.f64.as_ref())),
                (key("y"), SaveValue::Tensor(t.i64.as_ref())),
                (key("z"), SaveValue::Tensor(t.bf16.as_ref())),
            ]),
        )])
    }

    fn misc(t: &Tensors) -> SaveValue<'_> {
        SaveValue::Dict(vec![
            (key("step"), SaveValue::Int(3)),
            (key("lr"), SaveValue::Float(0.5)),
            (key("name"), SaveValue::Str(key("clip"))),
            (
                key("ints"),
                SaveValue::List(vec![
                    SaveValue::Int(-5),
                    SaveValue::Int(300),
                    SaveValue::Int(70000),
                    SaveValue::Int(1 << 40),
                    SaveValue::Int(-(1 << 40)),
                    SaveValue::Int(1 << 39),
                    SaveValue::Int(i64::MIN),
                    SaveValue::Int(i64::MAX),
                ]),
            ),
            (key("one"), SaveValue::List(vec![SaveValue::Bool(true)])),
            (key("none"), SaveValue::None),
            (key("flag"), SaveValue::Bool(false)),
            (key("empty"), SaveValue::OrderedDict(vec![])),
            (key("shape"), SaveValue::Tuple(vec![SaveValue::Int(4), SaveValue::Int(5)])),
            (key("t4"), SaveValue::Tuple((1..=4).map(SaveValue::Int).collect())),
            (key("f16"), SaveValue::Tensor(t.f16.as_ref())),
            (key("bool"), SaveValue::Tensor(t.bool.as_ref())),
            (key("scalar"), SaveValue::Tensor(t.scalar.as_ref())),
        ])
    }

    fn many(t: &Tensors) -> SaveValue<'_> {
        SaveValue::OrderedDict(
            t.many.iter().map(|(k, x)| (key(k.as_str()), SaveValue::Tensor(x.as_ref()))).collect(),
        )
    }

    /// What [`load`] gives for a saved value: OrderedDicts become dicts.
    fn expected(v: &SaveValue<'_>) -> TorchValue {
        let dict = |items: &[(Cow<'_, str>, SaveValue<'_>)]| {
            TorchValue::Dict(items.iter().map(|(k, v)| (k.to_string(), expected(v))).collect())
        };
        match v {
            SaveValue::Tensor(t) => TorchValue::Tensor(TensorData {
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.bytes.to_vec(),
            }),
            SaveValue::Dict(items) | SaveValue::OrderedDict(items) => dict(items),
            SaveValue::List(items) => TorchValue::List(items.iter().map(expected).collect()),
            SaveValue::Tuple(items) => TorchValue::Tuple(items.iter().map(expected).collect()),
            SaveValue::Int(i) => TorchValue::Int(*i),
            SaveValue::Float(x) => TorchValue::Float(*x),
            SaveValue::Str(s) => TorchValue::Str(s.to_string()),
            SaveValue::Bool(b) => TorchValue::Bool(*b),
            SaveValue::None => TorchValue::None,
        }
    }

    /// (file name, value) of every file the cross-checks write.
    fn cases(t: &Tensors) -> Vec<(&'static str, SaveValue<'_>)> {
        vec![
            ("task_wise.pt", SaveValue::Tensor(t.task_wise.as_ref())),
            ("merging_weights.pt", SaveValue::Tensor(t.layer_wise.as_ref())),
            ("scalar.pt", SaveValue::Tensor(t.scalar.as_ref())),
            ("empty.pt", SaveValue::Tensor(t.empty.as_ref())),
            ("checkpoint.pth", checkpoint(t)),
            ("many.pt", many(t)),
        ]
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let split = crc32_update(crc32_update(0, &data[..333]), &data[333..]);
        assert_eq!(split, crc32_update(0, &data));
    }

    #[test]
    fn archive_name_is_the_stem() {
        assert_eq!(archive_name(Path::new("/x/merging_weights.pt")), "merging_weights");
        assert_eq!(archive_name(Path::new("a.b.pth")), "a.b");
        assert_eq!(archive_name(Path::new("noext")), "noext");
        assert_eq!(archive_name(Path::new(".pt")), "archive");
        assert_eq!(archive_name(Path::new("poids_é.pt")), "archive");
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let t = tensors();
        let mut all = cases(&t);
        all.push(("misc.pt", misc(&t)));
        for (name, value) in &all {
            let p = dir.path().join(name);
            save(&p, value).unwrap();
            assert_eq!(load(&p).unwrap(), expected(value), "{name}");
        }
        // A loaded value saves back to the same object.
        let p = dir.path().join("checkpoint.pth");
        let back = load(&p).unwrap();
        save(&p, &back.to_save_value()).unwrap();
        assert_eq!(load(&p).unwrap(), back);
        assert_eq!(
            back.get("model").and_then(|m| m.get("a.bias")).and_then(TorchValue::as_tensor),
            Some(&t.task_wise)
        );
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn save_f32_and_load_f32() {
        let dir = tempfile::tempdir().unwrap();
        for (shape, data) in [(vec![4], v(4)), (vec![4, 5], v(20)), (vec![], vec![1.5])] {
            let p = dir.path().join("w.pt");
            save_f32(&p, &shape, &data).unwrap();
            assert_eq!(load_f32(&p).unwrap(), (shape, data));
        }
        let p = dir.path().join("w.pth");
        let t = tensors();
        save(&p, &SaveValue::Tensor(t.f64.as_ref())).unwrap();
        assert_eq!(load_f32(&p).unwrap(), (vec![3], v(3)));
        save(&p, &SaveValue::Tensor(t.bf16.as_ref())).unwrap();
        assert_eq!(load_f32(&p).unwrap(), (vec![3], v(3)));
        let msg = |e: TorchFileError| e.to_string();
        save(&p, &SaveValue::Tensor(t.i64.as_ref())).unwrap();
        let e = msg(load_f32(&p).unwrap_err());
        assert!(e.contains(&p.display().to_string()) && e.contains("int64"), "{e}");
        save(&p, &checkpoint(&t)).unwrap();
        let e = msg(load_f32(&p).unwrap_err());
        assert!(e.contains("w.pth") && e.contains("found a dict"), "{e}");
        let other = dir.path().join("w.safetensors");
        std::fs::write(&other, b"x").unwrap();
        let e = msg(load_f32(&other).unwrap_err());
        assert!(e.contains("w.safetensors") && e.contains("extension"), "{e}");
        let e = msg(save_f32(dir.path().join("bad.pt"), &[2, 2], &[1.0]).unwrap_err());
        assert!(e.contains("bad.pt") && e.contains("needs 4 values"), "{e}");
        let short = TensorRef { dtype: Dtype::F32, shape: vec![3], bytes: &[0u8; 8] };
        let e = msg(save(dir.path().join("short.pt"), &SaveValue::Tensor(short)).unwrap_err());
        assert!(e.contains("short.pt") && e.contains("needs 12 bytes, got 8"), "{e}");
        // .npy through load_f32 (float64 converted, int64 refused).
        assert_eq!(load_f32(fixture("f4_v1.npy")).unwrap(), (vec![3, 4], v(12)));
        let thirds: Vec<f32> = (0..5).map(|i| (i as f64 / 3.0) as f32).collect();
        assert_eq!(load_f32(fixture("f8.npy")).unwrap(), (vec![5], thirds));
        let e = msg(load_f32(fixture("i8.npy")).unwrap_err());
        assert!(e.contains("i8.npy") && e.contains("int64"), "{e}");
    }

    #[test]
    fn torch_load_reads_what_we_save() {
        let dir = tempfile::tempdir().unwrap();
        let t = tensors();
        let mut all = cases(&t);
        all.push(("misc.pt", misc(&t)));
        let paths: Vec<PathBuf> = all.iter().map(|(n, _)| dir.path().join(n)).collect();
        for ((_, value), p) in all.iter().zip(&paths) {
            save(p, value).unwrap();
        }
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let out = python(PY_SHOW, &refs);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), all.len(), "{out}");
        for ((name, value), line) in all.iter().zip(lines) {
            assert_eq!(line, show(value), "{name}");
        }
    }

    /// The serialization id's first 20 digits (and so its CRC) are the one part that differs
    /// from torch's (module docs): masked out; the second 20 digits (torch's combined CRC) kept.
    fn masked(path: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(path).unwrap();
        let archive = ZipArchive::open(path, "test").unwrap();
        let id = archive.find(".data/serialization_id").unwrap();
        let h = id.header_offset as usize;
        let data = h + 30 + le16(&bytes, h + 26) as usize + le16(&bytes, h + 28) as usize;
        bytes[data..data + 20].fill(b'0');
        bytes[data + 44..data + 48].fill(0); // the descriptor's CRC
        let cd = bytes.windows(4).rposition(|w| w == SIG_CENTRAL.to_le_bytes()).unwrap();
        bytes[cd + 16..cd + 20].fill(0);
        bytes
    }

    #[test]
    fn save_matches_torch_save_byte_for_byte() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let t = tensors();
        python(
            r#"
import sys
from collections import OrderedDict
d = sys.argv[1]
v = lambda n: (torch.arange(n, dtype=torch.float32) - 5) / 4
torch.save(v(8), d + "/task_wise.pt")
torch.save(v(20).reshape(4, 5), d + "/merging_weights.pt")
torch.save(torch.tensor(2.5), d + "/scalar.pt")
torch.save(torch.zeros(0, 3), d + "/empty.pt")
torch.save({"model": OrderedDict([("a.weight", v(20).reshape(4, 5)), ("a.bias", v(8)),
    ("x", v(3).double()), ("y", torch.arange(3)), ("z", v(3).bfloat16())])}, d + "/checkpoint.pth")
torch.save(OrderedDict((f"p{i}", torch.tensor(float(i))) for i in range(1200)), d + "/many.pt")
"#,
            &[theirs.path()],
        );
        for (name, value) in cases(&t) {
            let (a, b) = (ours.path().join(name), theirs.path().join(name));
            save(&a, &value).unwrap();
            let (a, b) = (masked(&a), masked(&b));
            assert_eq!(a.len(), b.len(), "{name}: file sizes differ");
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            assert_eq!(first, None, "{name}: first difference at byte {first:?}");
        }
    }

    #[test]
    fn load_reads_what_torch_saves() {
        let dir = tempfile::tempdir().unwrap();
        python(
            r#"
import datetime, io, os, sys
from collections import OrderedDict
os.chdir(sys.argv[1])
v = lambda n: (torch.arange(n, dtype=torch.float32) - 5) / 4
torch.save(v(12).reshape(3, 4), "plain.pt")
torch.save(torch.nn.Parameter(v(4)), "param.pt")
base = v(24).reshape(4, 6)
torch.save(base[1:, ::2].t(), "view.pt")
torch.save(base[2], "row.pt")
torch.save({"a": base[:, 1], "b": base[1:3]}, "shared.pt")
lin = torch.nn.Linear(3, 2)
with torch.no_grad():
    lin.weight.copy_(v(6).reshape(2, 3))
    lin.bias.copy_(v(2))
torch.save({"model": lin.state_dict()}, "fabric.ckpt.pt")
torch.save(OrderedDict([("x", v(3).double()), ("y", torch.arange(4) - 2), ("z", v(3).half()),
    ("w", v(3).bfloat16()), ("b", torch.tensor([True, False, True])),
    ("i", (torch.arange(3) - 1).int()), ("u", torch.arange(3).to(torch.uint8))]), "dtypes.pt")
torch.save([1, -5, 70000, 2**40, -2**40, 1.5, "s", None, True, (1, 2, 3, 4),
    torch.Size([2, 3]), {0: "int key"}], "misc.pt")
b = io.BytesIO()
torch.save(v(3), b)
open("stream.pt", "wb").write(b.getvalue())
torch.save(v(300).reshape(3, 100), "big.pt")
torch.save(torch.tensor(7.0), "scalar.pt")
torch.save(torch.zeros(2, 0, 3), "empty.pt")
torch.save(v(6).reshape(2, 3), "legacy.pt", _use_new_zipfile_serialization=False)
torch.save({"when": datetime.date(2020, 1, 1)}, "datetime.pt")
"#,
            &[dir.path()],
        );
        let read = |name: &str| load(dir.path().join(name)).unwrap();
        let t = |shape: &[usize], data: Vec<f32>| TorchValue::Tensor(f32s(shape, &data));
        let base = v(24);
        assert_eq!(read("plain.pt"), t(&[3, 4], v(12)));
        assert_eq!(read("param.pt"), t(&[4], v(4)));
        // base[1:, ::2].t(): element (i, j) is base[1 + j][2 i].
        let view: Vec<f32> = (0..3)
            .flat_map(|i| (0..3).map(move |j| (1 + j) * 6 + 2 * i))
            .map(|k| base[k])
            .collect();
        assert_eq!(read("view.pt"), t(&[3, 3], view));
        assert_eq!(read("row.pt"), t(&[6], base[12..18].to_vec()));
        let col: Vec<f32> = (0..4).map(|r| base[r * 6 + 1]).collect();
        assert_eq!(
            read("shared.pt"),
            TorchValue::Dict(vec![
                ("a".into(), t(&[4], col)),
                ("b".into(), t(&[2, 6], base[6..18].to_vec())),
            ])
        );
        assert_eq!(
            read("fabric.ckpt.pt"),
            TorchValue::Dict(vec![(
                "model".into(),
                TorchValue::Dict(vec![
                    ("weight".into(), t(&[2, 3], v(6))),
                    ("bias".into(), t(&[2], v(2))),
                ])
            )])
        );
        let tt = tensors();
        let le = |xs: &[i64], f: fn(i64) -> Vec<u8>| xs.iter().flat_map(|&x| f(x)).collect();
        let dtypes = [
            ("x", tt.f64.clone()),
            ("y", typed(Dtype::I64, &[4], le(&[-2, -1, 0, 1], |x| x.to_le_bytes().to_vec()))),
            ("z", tt.f16.clone()),
            ("w", tt.bf16.clone()),
            ("b", tt.bool.clone()),
            ("i", typed(Dtype::I32, &[3], le(&[-1, 0, 1], |x| (x as i32).to_le_bytes().to_vec()))),
            ("u", typed(Dtype::U8, &[3], vec![0, 1, 2])),
        ];
        assert_eq!(
            read("dtypes.pt"),
            TorchValue::Dict(
                dtypes.into_iter().map(|(k, x)| (k.into(), TorchValue::Tensor(x))).collect()
            )
        );
        use TorchValue::{Int, Tuple};
        assert_eq!(
            read("misc.pt"),
            TorchValue::List(vec![
                Int(1),
                Int(-5),
                Int(70000),
                Int(1 << 40),
                Int(-(1 << 40)),
                TorchValue::Float(1.5),
                TorchValue::Str("s".into()),
                TorchValue::None,
                TorchValue::Bool(true),
                Tuple(vec![Int(1), Int(2), Int(3), Int(4)]),
                Tuple(vec![Int(2), Int(3)]),
                TorchValue::Dict(vec![("0".into(), TorchValue::Str("int key".into()))]),
            ])
        );
        assert_eq!(read("stream.pt"), t(&[3], v(3)));
        assert_eq!(read("big.pt"), t(&[3, 100], v(300)));
        assert_eq!(read("scalar.pt"), t(&[], vec![7.0]));
        assert_eq!(read("empty.pt"), t(&[2, 0, 3], vec![]));

        let err = |name: &str| load(dir.path().join(name)).unwrap_err().to_string();
        let e = err("legacy.pt");
        assert!(e.contains("legacy.pt") && e.contains("legacy") && e.contains("re-save"), "{e}");
        let e = err("datetime.pt");
        assert!(e.contains("datetime.pt") && e.contains("`datetime.date`"), "{e}");
    }

    #[test]
    fn reads_a_parameter_saved_on_cuda() {
        // Made by scripts/fixtures/torch_files.py: location_tag patched to "cuda:0".
        let p = fixture("param_cuda0.pt");
        let raw = std::fs::read(&p).unwrap();
        assert!(raw.windows(6).any(|w| w == b"cuda:0"));
        let expect: Vec<f32> = (0..8).map(|i| (i as f32 - 3.0) / 8.0).collect();
        assert_eq!(load(&p).unwrap(), TorchValue::Tensor(f32s(&[8], &expect)));
        assert_eq!(load_f32(&p).unwrap(), (vec![8], expect));
    }

    #[test]
    fn reads_npy_files() {
        assert_eq!(load_npy(fixture("f4_v1.npy")).unwrap(), f32s(&[3, 4], &v(12)));
        assert_eq!(load_npy(fixture("f4_v2.npy")).unwrap(), f32s(&[2, 2], &v(4)));
        assert_eq!(load_npy(fixture("f4_v3.npy")).unwrap(), f32s(&[2, 2], &v(4)));
        assert_eq!(load_npy(fixture("scalar_f4.npy")).unwrap(), f32s(&[], &[1.5]));
        assert_eq!(load_npy(fixture("empty_f4.npy")).unwrap(), f32s(&[0, 3], &[]));
        let thirds = (0..5).flat_map(|i| (i as f64 / 3.0).to_le_bytes()).collect();
        assert_eq!(load_npy(fixture("f8.npy")).unwrap(), typed(Dtype::F64, &[5], thirds));
        let ints = (-2..4i64).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(load_npy(fixture("i8.npy")).unwrap(), typed(Dtype::I64, &[2, 3], ints));
        for (name, what) in
            [("fortran_f4.npy", "fortran_order"), ("big_endian_f4.npy", "big-endian")]
        {
            let e = load_npy(fixture(name)).unwrap_err().to_string();
            assert!(e.contains(&fixture(name).display().to_string()) && e.contains(what), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.npy");
        let mut bytes = std::fs::read(fixture("f4_v1.npy")).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&p, &bytes).unwrap();
        let e = load_npy(&p).unwrap_err().to_string();
        assert!(e.contains("short.npy") && e.contains("needs 48 bytes"), "{e}");
    }

    /// An archive of the given records, laid out as torch does.
    fn write_archive(path: &Path, records: &[(&str, &[u8])]) {
        let mut zip = ZipWriter::new(File::create(path).unwrap(), "x", ZIP64_LIMIT);
        for (name, data) in records {
            zip.record(name, data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn pickle_of(v: &SaveValue<'_>) -> Vec<u8> {
        let mut p = Pickler::new();
        p.value(v);
        p.out.push(b'.');
        p.out
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = |p: &Path| {
            let e = load(p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            e
        };
        // Truncated: the end of the central directory is gone.
        let p = dir.path().join("truncated.pt");
        save_f32(&p, &[4, 5], &v(20)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(err(&p).contains("truncated"));
        // Not a zip at all.
        let p = dir.path().join("text.pt");
        std::fs::write(&p, b"hello, world\n").unwrap();
        assert!(err(&p).contains("not a torch.save zip archive"));
        let p = dir.path().join("missing.pt");
        assert!(err(&p).contains("No such file"));
        // A global no weights-only unpickler allows.
        let p = dir.path().join("global.pt");
        write_archive(
            &p,
            &[("data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.")],
        );
        assert!(err(&p).contains("`os.system`"));
        // Storage record absent, or of the wrong length.
        let t = f32s(&[2], &[1.0, 2.0]);
        let pkl = pickle_of(&SaveValue::Tensor(t.as_ref()));
        let p = dir.path().join("nodata.pt");
        write_archive(&p, &[("data.pkl", &pkl), ("byteorder", b"little")]);
        assert!(err(&p).contains("record `x/data/0` is missing"));
        let p = dir.path().join("sizes.pt");
        write_archive(&p, &[("data.pkl", &pkl), ("data/0", &[0u8; 7])]);
        assert!(err(&p).contains("wrong sizes"));
        // A view reaching past its storage.
        let mut bad = pkl.clone();
        let at = bad.windows(3).position(|w| w == [b'K', 2, 0x85]).unwrap(); // size (2,)
        bad[at + 1] = 3;
        let p = dir.path().join("view.pt");
        write_archive(&p, &[("data.pkl", &bad), ("data/0", &t.bytes)]);
        assert!(err(&p).contains("reaches past its storage"));
        // Cut-off pickle; big-endian archive.
        let p = dir.path().join("cut.pt");
        write_archive(&p, &[("data.pkl", &pkl[..pkl.len() / 2]), ("data/0", &t.bytes)]);
        assert!(err(&p).contains("bad pickle"));
        let p = dir.path().join("big.pt");
        write_archive(&p, &[("data.pkl", &pkl), ("byteorder", b"big"), ("data/0", &t.bytes)]);
        assert!(err(&p).contains("little-endian"));
    }

    #[test]
    fn zip64_fields_when_sizes_or_offsets_reach_the_limit() {
        // The limit is 2^32 - 1 for real; 1000, 100 or 0 bytes here, so that the archives hold
        // entries with no ZIP64 field, with a ZIP64 size, a ZIP64 offset, and both.
        let dir = tempfile::tempdir().unwrap();
        let t = tensors();
        let big = f32s(&[100], &v(100));
        let value = SaveValue::OrderedDict(vec![
            (key("big"), SaveValue::Tensor(big.as_ref())),
            (key("small"), SaveValue::Tensor(t.task_wise.as_ref())),
            (key("empty"), SaveValue::Tensor(t.empty.as_ref())),
        ]);
        const LIMITS: [u64; 3] = [1000, 100, 0];
        let paths: Vec<PathBuf> = LIMITS
            .iter()
            .map(|&limit| {
                let p = dir.path().join(format!("zip64_{limit}.pt"));
                save_with_zip64_threshold(&p, &value, limit).unwrap();
                assert_eq!(load(&p).unwrap(), expected(&value));
                p
            })
            .collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let out = python(PY_SHOW, &refs);
        assert_eq!(out.lines().collect::<Vec<_>>(), vec![show(&value); LIMITS.len()], "{out}");
        // Python's zipfile sees ZIP64 extra fields exactly where expected, with the right values.
        let out = python(
            r#"
import sys, zipfile
for p in sys.argv[1:]:
    for i in zipfile.ZipFile(p).infolist():
        print(i.filename, i.file_size, i.header_offset, i.extra[:2] == b"\x01\x00")
"#,
            &refs,
        );
        let mut lines = out.lines();
        let mut kinds = std::collections::BTreeSet::new();
        for (p, limit) in paths.iter().zip(LIMITS) {
            let archive = ZipArchive::open(p, "test").unwrap();
            for e in &archive.entries {
                let zip64 = e.size >= limit || e.header_offset >= limit;
                let line = format!(
                    "{} {} {} {}",
                    e.name,
                    e.size,
                    e.header_offset,
                    if zip64 { "True" } else { "False" }
                );
                assert_eq!(lines.next(), Some(line.as_str()));
                kinds.insert((e.size >= limit, e.header_offset >= limit));
            }
        }
        assert_eq!(kinds.len(), 4, "{kinds:?}");
    }
}
