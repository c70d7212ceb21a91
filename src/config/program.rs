//! The typed view of a resolved config: what the program reads. Components (methods, pools)
//! keep their raw node too, and read their own keys with [`Section::get`].

use super::error::ConfigError;
use super::node::{join_key, Map, Node};
use super::specs::{as_map, get_bool, get_u64, opt_str, req_str};
pub use super::specs::{DatasetSpec, ModelSpec, ValidationSplit};
use serde::de::DeserializeOwned;

/// A config section (`method`, `modelpool`, ...) with its key path, for typed reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The key path of this section (`method`).
    pub path: String,
    /// The resolved node.
    pub node: Node,
}

impl Section {
    /// Read `key` (dotted, relative to this section) as `T`; None when absent or null. A `???`
    /// or a type mismatch is an error naming the full key path.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        let full = join_key(&self.path, key);
        match self.node.get_path(key) {
            None | Some(Node::Null) => Ok(None),
            Some(n) => {
                let json = n.to_json(&full)?;
                serde_json::from_value(json)
                    .map(Some)
                    .map_err(|e| ConfigError::invalid(&full, e.to_string()))
            }
        }
    }
    /// Deserialize the whole section as `T` (errors name the section's key path).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let json = self.node.to_json(&self.path)?;
        serde_json::from_value(json).map_err(|e| ConfigError::invalid(&self.path, e.to_string()))
    }
    /// The string at `key`, if it is a string.
    pub fn str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.get::<String>(key)
    }
}

/// Log a warning for each key of `section` that its component does not use (FusionBench logs
/// unused constructor arguments the same way). Keys starting with `_` are config machinery.
pub fn warn_unknown_keys(section: &Section, known: &[&str]) -> Vec<String> {
    let mut unknown = Vec::new();
    if let Node::Map(m) = &section.node {
        for k in m.keys() {
            if !k.starts_with('_') && !known.contains(&k) {
                tracing::warn!(
                    "Unused argument: {}.{k} (not used by this component)",
                    section.path
                );
                unknown.push(k.to_string());
            }
        }
    }
    unknown
}

/// `method`: its name (v0.1) or `_target_`, its group option, and the raw node.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodConfig {
    /// The option chosen in the `method` group (`dummy`, `fisher_merging/clip_fisher_merging`).
    pub option: Option<String>,
    /// `name` (v0.1 configs), when set.
    pub name: Option<String>,
    /// `_target_`, when set.
    pub target: Option<String>,
    /// The whole section, for the method to read.
    pub section: Section,
}

/// `modelpool`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPoolConfig {
    /// `_target_`.
    pub target: Option<String>,
    /// The models in config order (`_pretrained_` first when present in the file).
    pub models: Vec<(String, ModelSpec)>,
    /// `processor`.
    pub processor: Option<ModelSpec>,
    /// `train_datasets`.
    pub train_datasets: Option<Vec<(String, DatasetSpec)>>,
    /// `test_datasets`.
    pub test_datasets: Option<Vec<(String, DatasetSpec)>>,
    /// `val_datasets`.
    pub val_datasets: Option<Vec<(String, DatasetSpec)>>,
    /// The whole section.
    pub section: Section,
}

/// Which task pool implementation a config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskPoolKind {
    /// `fusion_bench.taskpool.CLIPVisionModelTaskPool` (and subclasses).
    ClipVision,
    /// `fusion_bench.taskpool.DummyTaskPool` or `type: dummy`.
    Dummy,
    /// v0.1 `type: clip_vit_classification` (robustness task pools).
    LegacyClipVit,
    /// Anything else: `_target_` or `type` as written.
    Other(String),
}

/// `taskpool`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPoolConfig {
    /// The implementation.
    pub kind: TaskPoolKind,
    /// `base_model`.
    pub base_model: Option<String>,
    /// `clip_model` (a string or a mapping).
    pub clip_model: Option<ModelSpec>,
    /// `processor`.
    pub processor: Option<ModelSpec>,
    /// Test sets in report order (legacy `tasks:` keyed by task name).
    pub test_datasets: Vec<(String, DatasetSpec)>,
    /// `dataloader_kwargs.batch_size` (legacy: `batch_size`); 128 when unset.
    pub batch_size: usize,
    /// `dataloader_kwargs.num_workers` (legacy: `num_workers`).
    pub num_workers: Option<usize>,
    /// `fast_dev_run` (None: the program's).
    pub fast_dev_run: Option<bool>,
    /// The whole section.
    pub section: Section,
}

/// `fabric`.
#[derive(Debug, Clone, PartialEq)]
pub struct FabricConfig {
    /// `accelerator` (`auto`, `cpu`, `gpu`, `cuda`).
    pub accelerator: String,
    /// `devices` as written (an int, `auto`, or a list).
    pub devices: Node,
    /// `loggers`: where training methods write their logs.
    pub loggers: LoggersConfig,
}

/// `fabric.loggers` (FusionBench's TensorBoard or CSV logger config): the log directory is
/// `root_dir/name/version_N`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoggersConfig {
    /// `root_dir` (FusionBench: `${path.log_dir}`).
    pub root_dir: Option<String>,
    /// `name` (`""`: none).
    pub name: Option<String>,
    /// `version` (`""` or null: the next free `version_N`).
    pub version: Option<String>,
}

impl FabricConfig {
    /// `devices` as a count, when it is one.
    pub fn device_count(&self) -> Option<usize> {
        match &self.devices {
            Node::Int(i) if *i > 0 => Some(*i as usize),
            Node::List(l) => Some(l.len()),
            _ => None,
        }
    }
}

/// `path`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PathConfig {
    /// `path.log_dir` (`{log_dir}` in report and model paths).
    pub log_dir: Option<String>,
    /// `path.root_dir`.
    pub root_dir: Option<String>,
    /// `path.output_dir`.
    pub output_dir: Option<String>,
    /// `path.data_dir`.
    pub data_dir: Option<String>,
    /// `path.cache_dir`.
    pub cache_dir: Option<String>,
    /// `path.work_dir`.
    pub work_dir: Option<String>,
}

/// Everything the program reads from the composed, resolved config.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramConfig {
    /// `seed` (null: nothing seeded).
    pub seed: Option<u64>,
    /// `fast_dev_run`.
    pub fast_dev_run: bool,
    /// `dry_run`.
    pub dry_run: bool,
    /// `print_config`.
    pub print_config: bool,
    /// `report_save_path` (may contain `{log_dir}`; see [`ProgramConfig::report_path`]).
    pub report_save_path: Option<String>,
    /// `merged_model_save_path` (may contain `{log_dir}`).
    pub merged_model_save_path: Option<String>,
    /// `method`.
    pub method: MethodConfig,
    /// `modelpool`.
    pub modelpool: ModelPoolConfig,
    /// `taskpool` (null: no evaluation).
    pub taskpool: Option<TaskPoolConfig>,
    /// `fabric`.
    pub fabric: FabricConfig,
    /// `path`.
    pub path: PathConfig,
}

impl ProgramConfig {
    /// `report_save_path` with `{log_dir}` substituted, as FusionBench does.
    pub fn report_path(&self) -> Option<String> {
        self.report_save_path.as_ref().map(|p| self.with_log_dir(p))
    }
    /// `merged_model_save_path` with `{log_dir}` substituted.
    pub fn merged_model_path(&self) -> Option<String> {
        self.merged_model_save_path.as_ref().map(|p| self.with_log_dir(p))
    }
    fn with_log_dir(&self, p: &str) -> String {
        p.replace("{log_dir}", self.path.log_dir.as_deref().unwrap_or("."))
    }

    /// Read the typed view from a resolved root.
    pub fn from_resolved(
        root: &Node,
        method_option: Option<String>,
    ) -> Result<ProgramConfig, ConfigError> {
        let m = as_map(root, "")?;
        let report_save_path = match m.get("report_save_path") {
            None | Some(Node::Null) => None,
            Some(Node::Str(s)) => Some(s.clone()),
            Some(Node::Bool(false)) => {
                return Err(ConfigError::invalid(
                    "report_save_path",
                    "false is not a path (FusionBench would fail with a TypeError here): use report_save_path=null to skip saving the report",
                ))
            }
            Some(o) => return Err(ConfigError::invalid("report_save_path", format!("expected a path or null, found {}", o.kind()))),
        };
        let method_node = m.get("method").cloned().unwrap_or(Node::empty_map());
        let mm = as_map(&method_node, "method")?;
        let method = MethodConfig {
            option: method_option,
            name: opt_str(mm, "name", "method")?,
            target: opt_str(mm, "_target_", "method")?,
            section: Section { path: "method".into(), node: method_node.clone() },
        };
        let taskpool = match m.get("taskpool") {
            None | Some(Node::Null) => None,
            Some(n) => Some(taskpool(n)?),
        };
        let fabric = match m.get("fabric") {
            Some(Node::Map(f)) => FabricConfig {
                accelerator: opt_str(f, "accelerator", "fabric")?.unwrap_or_else(|| "auto".into()),
                devices: f.get("devices").cloned().unwrap_or(Node::Int(1)),
                loggers: match f.get("loggers") {
                    Some(Node::Map(l)) => LoggersConfig {
                        root_dir: opt_str(l, "root_dir", "fabric.loggers")?,
                        name: opt_str(l, "name", "fabric.loggers")?,
                        version: match l.get("version") {
                            Some(Node::Int(i)) => Some(i.to_string()),
                            _ => opt_str(l, "version", "fabric.loggers")?,
                        },
                    },
                    _ => LoggersConfig::default(),
                },
            },
            _ => FabricConfig {
                accelerator: "auto".into(),
                devices: Node::Int(1),
                loggers: LoggersConfig::default(),
            },
        };
        let path = match m.get("path") {
            Some(Node::Map(p)) => PathConfig {
                log_dir: opt_str(p, "log_dir", "path")?,
                root_dir: opt_str(p, "root_dir", "path")?,
                output_dir: opt_str(p, "output_dir", "path")?,
                data_dir: opt_str(p, "data_dir", "path")?,
                cache_dir: opt_str(p, "cache_dir", "path")?,
                work_dir: opt_str(p, "work_dir", "path")?,
            },
            _ => PathConfig::default(),
        };
        Ok(ProgramConfig {
            seed: get_u64(m, "seed", "")?,
            fast_dev_run: get_bool(m, "fast_dev_run", "")?.unwrap_or(false),
            dry_run: get_bool(m, "dry_run", "")?.unwrap_or(false),
            print_config: get_bool(m, "print_config", "")?.unwrap_or(true),
            report_save_path,
            merged_model_save_path: opt_str(m, "merged_model_save_path", "")?,
            method,
            modelpool: modelpool(m.get("modelpool").unwrap_or(&Node::empty_map()))?,
            taskpool,
            fabric,
            path,
        })
    }
}

fn datasets(
    m: &Map,
    key: &str,
    prefix: &str,
) -> Result<Option<Vec<(String, DatasetSpec)>>, ConfigError> {
    let full = join_key(prefix, key);
    match m.get(key) {
        None | Some(Node::Null) => Ok(None),
        Some(n) => Ok(Some(
            as_map(n, &full)?
                .iter()
                .map(|(k, v)| Ok((k.to_string(), DatasetSpec::from_node(v, &join_key(&full, k))?)))
                .collect::<Result<_, ConfigError>>()?,
        )),
    }
}

fn modelpool(n: &Node) -> Result<ModelPoolConfig, ConfigError> {
    let m = as_map(n, "modelpool")?;
    let models_node = m.get("models").ok_or_else(|| ConfigError::missing("modelpool.models"))?;
    let models = match models_node {
        Node::Map(mm) => mm
            .iter()
            .map(|(k, v)| {
                Ok((k.to_string(), ModelSpec::from_node(v, &format!("modelpool.models.{k}"))?))
            })
            .collect::<Result<_, ConfigError>>()?,
        Node::List(l) => l
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let key = format!("modelpool.models.{i}");
                let vm = as_map(v, &key)?;
                let name = req_str(vm, "name", &key)?;
                let path = req_str(vm, "path", &key)?;
                Ok((name, ModelSpec { path, target: None, raw: v.clone() }))
            })
            .collect::<Result<_, ConfigError>>()?,
        Node::Missing => return Err(ConfigError::missing("modelpool.models")),
        o => {
            return Err(ConfigError::invalid(
                "modelpool.models",
                format!("expected a mapping of name: model, found {}", o.kind()),
            ))
        }
    };
    Ok(ModelPoolConfig {
        target: opt_str(m, "_target_", "modelpool")?,
        models,
        processor: match m.get("processor") {
            None | Some(Node::Null) => None,
            Some(p) => Some(ModelSpec::from_node(p, "modelpool.processor")?),
        },
        train_datasets: datasets(m, "train_datasets", "modelpool")?,
        test_datasets: datasets(m, "test_datasets", "modelpool")?,
        val_datasets: datasets(m, "val_datasets", "modelpool")?,
        section: Section { path: "modelpool".into(), node: n.clone() },
    })
}

fn taskpool(n: &Node) -> Result<TaskPoolConfig, ConfigError> {
    let m = as_map(n, "taskpool")?;
    let target = opt_str(m, "_target_", "taskpool")?;
    let ty = opt_str(m, "type", "taskpool")?;
    let kind = match (target.as_deref(), ty.as_deref()) {
        (Some(t), _) if t.ends_with("DummyTaskPool") => TaskPoolKind::Dummy,
        (Some(t), _) if t.ends_with("CLIPVisionModelTaskPool") => TaskPoolKind::ClipVision,
        (Some(t), _) => TaskPoolKind::Other(t.to_string()),
        (None, Some("dummy")) => TaskPoolKind::Dummy,
        (None, Some("clip_vit_classification")) => TaskPoolKind::LegacyClipVit,
        (None, Some(t)) => TaskPoolKind::Other(t.to_string()),
        (None, None) => {
            return Err(ConfigError::invalid("taskpool", "neither _target_ nor type is set"))
        }
    };
    let spec = |k: &str| -> Result<Option<ModelSpec>, ConfigError> {
        match m.get(k) {
            None | Some(Node::Null) => Ok(None),
            Some(v) => ModelSpec::from_node(v, &format!("taskpool.{k}")).map(Some),
        }
    };
    let (test_datasets, batch_size, num_workers) = if kind == TaskPoolKind::LegacyClipVit {
        let mut out = Vec::new();
        if let Some(Node::List(tasks)) = m.get("tasks") {
            for (i, t) in tasks.iter().enumerate() {
                let key = format!("taskpool.tasks.{i}");
                let tm = as_map(t, &key)?;
                let name = req_str(tm, "name", &key)?;
                let dkey = format!("{key}.dataset");
                let d =
                    as_map(tm.get("dataset").ok_or_else(|| ConfigError::missing(&dkey))?, &dkey)?;
                let spec = DatasetSpec {
                    path: req_str(d, "name", &dkey)?,
                    name: None,
                    split: opt_str(d, "split", &dkey)?.unwrap_or_else(|| "test".into()),
                    validation: None,
                };
                out.push((name, spec));
            }
        }
        (out, get_u64(m, "batch_size", "taskpool")?, get_u64(m, "num_workers", "taskpool")?)
    } else {
        let tds = if kind == TaskPoolKind::Dummy {
            None
        } else {
            datasets(m, "test_datasets", "taskpool")?
        };
        let (bs, nw) = match m.get("dataloader_kwargs") {
            Some(Node::Map(dl)) => (
                get_u64(dl, "batch_size", "taskpool.dataloader_kwargs")?,
                get_u64(dl, "num_workers", "taskpool.dataloader_kwargs")?,
            ),
            _ => (None, None),
        };
        (tds.unwrap_or_default(), bs, nw)
    };
    Ok(TaskPoolConfig {
        kind,
        base_model: opt_str(m, "base_model", "taskpool")?,
        clip_model: spec("clip_model")?,
        processor: spec("processor")?,
        test_datasets,
        batch_size: batch_size.unwrap_or(128) as usize,
        num_workers: num_workers.map(|n| n as usize),
        fast_dev_run: get_bool(m, "fast_dev_run", "taskpool")?,
        section: Section { path: "taskpool".into(), node: n.clone() },
    })
}
