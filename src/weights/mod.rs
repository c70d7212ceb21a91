//! Weights: ordered name → tensor maps, safetensors I/O, and the [`WeightSource`] a model reads
//! its parameters through.
//!
//! A [`WeightMap`] keeps insertion order, so a map built in a model's `named_parameters()` order
//! stays in that order (FusionBench's layer-wise weights are indexed by it).

mod safetensors_io;
mod source;
mod stream_writer;
pub mod torch_file;

pub use safetensors_io::{save_safetensors, SafetensorsFile};
pub use source::{Scope, WeightSource};
pub use stream_writer::SafetensorsWriter;

/// The flat index of the first NaN or ±inf of a float32 tensor, and how many there are; `None`
/// when all values are finite. Other dtypes are checked through a float32 copy.
pub fn non_finite(t: &Tensor) -> Option<(usize, usize)> {
    let owned;
    let data = match stream_writer::f32_slice(t) {
        Some(d) => d,
        None => {
            owned = t.detach().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous();
            stream_writer::f32_slice(&owned)?
        }
    };
    // Exponent bits all set: NaN or infinity. A branch-free count first (vectorises), then the
    // position only when something was found.
    let bad = data.iter().filter(|x| x.to_bits() & 0x7f80_0000 == 0x7f80_0000).count();
    if bad == 0 {
        return None;
    }
    data.iter().position(|x| !x.is_finite()).map(|i| (i, bad))
}

use std::collections::HashMap;
use tch::Tensor;

/// Errors of weight loading and lookup. Each names the file and tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The file could not be opened, mapped or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors (truncated, bad header, offsets out of range).
    #[error("{path} is not a valid safetensors file: {reason}")]
    Corrupt {
        /// The file at fault.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("tensor `{name}` is missing from {origin}")]
    Missing {
        /// Full tensor name.
        name: String,
        /// Where it was looked up (a file, or "weight map").
        origin: String,
    },
    /// A tensor has another shape than the model's config implies.
    #[error("tensor `{name}` in {origin} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Full tensor name.
        name: String,
        /// Where it came from.
        origin: String,
        /// The shape in the file.
        found: Vec<i64>,
        /// The shape the config implies.
        expected: Vec<i64>,
    },
    /// A tensor's dtype has no libtorch equivalent here.
    #[error("tensor `{name}` in {origin} has unsupported dtype {dtype}")]
    Dtype {
        /// Full tensor name.
        name: String,
        /// Where it came from.
        origin: String,
        /// The safetensors dtype.
        dtype: String,
    },
    /// libtorch refused an operation.
    #[error("tensor `{name}`: {source}")]
    Torch {
        /// The tensor concerned.
        name: String,
        /// libtorch's error.
        source: tch::TchError,
    },
}

/// An ordered name → tensor map (a state dict).
#[derive(Debug, Default)]
pub struct WeightMap {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl WeightMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces `name`; a new name goes last.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.tensors[i] = tensor,
            None => {
                self.index.insert(name.clone(), self.names.len());
                self.names.push(name);
                self.tensors.push(tensor);
            }
        }
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names in insertion order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// (name, tensor) pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(self.tensors.iter())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of elements over all tensors.
    pub fn numel(&self) -> i64 {
        self.tensors.iter().map(|t| t.numel() as i64).sum()
    }

    /// A copy whose tensors share storage with this map's (cheap).
    pub fn shallow_clone(&self) -> Self {
        let mut out = Self::new();
        for (n, t) in self.iter() {
            out.insert(n, t.shallow_clone());
        }
        out
    }

    /// The same map moved to `device` (tensors already there are shared, not copied).
    pub fn to_device(&self, device: tch::Device) -> Self {
        let mut out = Self::new();
        for (n, t) in self.iter() {
            out.insert(n, t.to_device(device));
        }
        out
    }
}

impl WeightSource for WeightMap {
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        self.get(name).map(Tensor::shallow_clone).ok_or_else(|| WeightError::Missing {
            name: name.to_string(),
            origin: "weight map".to_string(),
        })
    }

    fn contains(&self, name: &str) -> bool {
        WeightMap::contains(self, name)
    }

    fn origin(&self) -> String {
        "weight map".to_string()
    }
}
