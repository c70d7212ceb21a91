//! The [`WeightSource`] trait: where a model's tensors come from.
//!
//! As candle's `VarBuilder`: a model asks for tensors by their Hugging Face names through a
//! [`Scope`] (`scope.pp("encoder").pp("layers").pp(3)`), and does not care whether they live in an
//! mmap'd safetensors file, an in-memory merged map, or a differentiable merge.

use super::WeightError;
use tch::Tensor;

/// Anything a model can read named tensors from.
pub trait WeightSource {
    /// The tensor called `name` (a shallow handle where possible; reading from a file copies it
    /// into memory once).
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError>;

    /// Whether `name` exists, without materialising it.
    fn contains(&self, name: &str) -> bool;

    /// Where the tensors come from, for error messages (a file path, "weight map", …).
    fn origin(&self) -> String;
}

/// A prefixed view of a [`WeightSource`], with shape checks and a target device and dtype.
#[derive(Clone)]
pub struct Scope<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
    device: tch::Device,
    kind: tch::Kind,
}

impl<'a> Scope<'a> {
    /// A root scope: tensors are moved to `device` and cast to `kind` (floating tensors only).
    pub fn new(source: &'a dyn WeightSource, device: tch::Device, kind: tch::Kind) -> Self {
        Self { source, prefix: String::new(), device, kind }
    }

    /// The sub-scope `<prefix>.<name>`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self { prefix, ..self.clone() }
    }

    /// The full name of `name` in this scope.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether `name` exists in this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.path(name))
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// The shape of `name`, read without checking it against anything (a model whose sizes
    /// are not all in its config, such as a WE-MoE block's expert count, reads them here).
    pub fn shape(&self, name: &str) -> Result<Vec<i64>, WeightError> {
        Ok(self.source.tensor(&self.path(name))?.size())
    }

    /// The tensor `name`, checked to have `shape`, on this scope's device and dtype.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        let full = self.path(name);
        let t = self.source.tensor(&full)?;
        if t.size() != shape {
            return Err(WeightError::Shape {
                name: full,
                origin: self.source.origin(),
                found: t.size(),
                expected: shape.to_vec(),
            });
        }
        let t =
            if t.is_floating_point() && t.kind() != self.kind { t.to_kind(self.kind) } else { t };
        Ok(if t.device() != self.device { t.to_device(self.device) } else { t })
    }
}
