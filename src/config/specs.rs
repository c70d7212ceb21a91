//! Model and dataset specs as FusionBench configs write them, and typed readers that name the
//! full key path in their errors.

use super::error::ConfigError;
use super::node::{join_key, Map, Node};

/// A model: a hub id / local path, or a mapping with `pretrained_model_name_or_path`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Hub id or local path.
    pub path: String,
    /// `_target_` when given as a mapping.
    pub target: Option<String>,
    /// The node as written.
    pub raw: Node,
}

impl ModelSpec {
    pub(crate) fn from_node(n: &Node, key: &str) -> Result<ModelSpec, ConfigError> {
        match n {
            Node::Str(s) => Ok(ModelSpec { path: s.clone(), target: None, raw: n.clone() }),
            Node::Map(m) => {
                let path = req_str(m, "pretrained_model_name_or_path", key)?;
                Ok(ModelSpec { path, target: opt_str(m, "_target_", key)?, raw: n.clone() })
            }
            Node::Missing => Err(ConfigError::missing(key)),
            other => Err(ConfigError::invalid(
                key,
                format!(
                    "expected a model id or a mapping with pretrained_model_name_or_path, found {}",
                    other.kind()
                ),
            )),
        }
    }
}

/// `train_validation_split` settings of a `val/` dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationSplit {
    /// `validation_fraction`.
    pub fraction: Option<f64>,
    /// `validation_size`.
    pub size: Option<u64>,
    /// `random_seed`.
    pub seed: u64,
    /// `return_split` (`val` or `train`).
    pub return_split: String,
}

/// A dataset: `datasets.load_dataset(path, name, split=split)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Hub id or local path (`path`, or `_args_[0]`).
    pub path: String,
    /// Config name (`name`, or `_args_[1]`), e.g. `cropped_digits`.
    pub name: Option<String>,
    /// The split.
    pub split: String,
    /// Set for `val/` datasets: the split is carved out of `split` this way.
    pub validation: Option<ValidationSplit>,
}

impl DatasetSpec {
    pub(crate) fn from_node(n: &Node, key: &str) -> Result<DatasetSpec, ConfigError> {
        let m = as_map(n, key)?;
        if let Some(inner) = m.get("dataset") {
            let mut d = DatasetSpec::from_node(inner, &join_key(key, "dataset"))?;
            d.validation = Some(ValidationSplit {
                fraction: get_f64(m, "validation_fraction", key)?,
                size: get_u64(m, "validation_size", key)?,
                seed: get_u64(m, "random_seed", key)?.unwrap_or(0),
                return_split: opt_str(m, "return_split", key)?.unwrap_or_else(|| "val".into()),
            });
            return Ok(d);
        }
        let args = match m.get("_args_") {
            Some(Node::List(l)) => l.clone(),
            _ => Vec::new(),
        };
        let arg = |i: usize| -> Result<Option<String>, ConfigError> {
            match args.get(i) {
                None | Some(Node::Null) => Ok(None),
                Some(Node::Str(s)) => Ok(Some(s.clone())),
                Some(o) => Err(ConfigError::invalid(
                    &format!("{key}._args_.{i}"),
                    format!("expected a string, found {}", o.kind()),
                )),
            }
        };
        let path = match opt_str(m, "path", key)? {
            Some(p) => p,
            None => arg(0)?.ok_or_else(|| {
                ConfigError::invalid(key, "a dataset needs `path` (or `_args_: [path, name]`)")
            })?,
        };
        let name = match opt_str(m, "name", key)? {
            Some(n) => Some(n),
            None => arg(1)?,
        };
        let split = req_str(m, "split", key)?;
        Ok(DatasetSpec { path, name, split, validation: None })
    }
}

pub(crate) fn as_map<'a>(n: &'a Node, key: &str) -> Result<&'a Map, ConfigError> {
    match n {
        Node::Map(m) => Ok(m),
        Node::Missing => Err(ConfigError::missing(key)),
        o => Err(ConfigError::invalid(
            if key.is_empty() { "<root>" } else { key },
            format!("expected a mapping, found {}", o.kind()),
        )),
    }
}

pub(crate) fn opt_str(m: &Map, k: &str, prefix: &str) -> Result<Option<String>, ConfigError> {
    let key = join_key(prefix, k);
    match m.get(k) {
        None | Some(Node::Null) => Ok(None),
        Some(Node::Str(s)) => Ok(Some(s.clone())),
        Some(Node::Missing) => Err(ConfigError::missing(&key)),
        Some(o @ (Node::Int(_) | Node::Float(_))) => Ok(Some(o.to_interp_string())),
        Some(o) => {
            Err(ConfigError::invalid(&key, format!("expected a string, found {}", o.kind())))
        }
    }
}

pub(crate) fn req_str(m: &Map, k: &str, prefix: &str) -> Result<String, ConfigError> {
    opt_str(m, k, prefix)?
        .ok_or_else(|| ConfigError::invalid(&join_key(prefix, k), "required, but not set"))
}

pub(crate) fn get_bool(m: &Map, k: &str, prefix: &str) -> Result<Option<bool>, ConfigError> {
    let key = join_key(prefix, k);
    match m.get(k) {
        None | Some(Node::Null) => Ok(None),
        Some(Node::Bool(b)) => Ok(Some(*b)),
        Some(Node::Missing) => Err(ConfigError::missing(&key)),
        Some(o) => {
            Err(ConfigError::invalid(&key, format!("expected true or false, found {}", o.kind())))
        }
    }
}

pub(crate) fn get_u64(m: &Map, k: &str, prefix: &str) -> Result<Option<u64>, ConfigError> {
    let key = join_key(prefix, k);
    match m.get(k) {
        None | Some(Node::Null) => Ok(None),
        Some(Node::Int(i)) if *i >= 0 => Ok(Some(*i as u64)),
        Some(Node::Missing) => Err(ConfigError::missing(&key)),
        Some(o) => Err(ConfigError::invalid(
            &key,
            format!("expected a non-negative integer, found {}", o.kind()),
        )),
    }
}

pub(crate) fn get_f64(m: &Map, k: &str, prefix: &str) -> Result<Option<f64>, ConfigError> {
    let key = join_key(prefix, k);
    match m.get(k) {
        None | Some(Node::Null) => Ok(None),
        Some(Node::Int(i)) => Ok(Some(*i as f64)),
        Some(Node::Float(f)) => Ok(Some(*f)),
        Some(Node::Missing) => Err(ConfigError::missing(&key)),
        Some(o) => {
            Err(ConfigError::invalid(&key, format!("expected a number, found {}", o.kind())))
        }
    }
}
