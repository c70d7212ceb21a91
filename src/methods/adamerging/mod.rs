//! `method=adamerging/clip` (and the stale `method=adamerging`): task-wise and layer-wise
//! AdaMerging (Yang et al., ICLR 2024, <https://arxiv.org/abs/2310.02575>), FusionBench's
//! `CLIPTaskWiseAdaMergingAlgorithm` / `CLIPLayerWiseAdaMergingAlgorithm`
//! (`fusion_bench/method/adamerging/`, spec §4.7).
//!
//! θ(λ) = θ₀ + Σᵢ λᵢ(ⱼ) τᵢ ([`merge`]); λ starts at `init_values` and follows Adam on the
//! entropy of each task's predictions on its shuffled test batches, one batch of `batch_size` per
//! task per step, the tasks' gradients summed ([`step`], [`tta`]). `method.weights` (a list of
//! floats, or a `.pt`/`.pth`/`.npy` file) skips the adaptation. The result is θ(λ), frozen: the
//! report's `model_info` shows `trainable_params: 0`, as FusionBench's does.

pub mod merge;
pub mod step;
pub mod tta;
pub mod worker;

use super::{Merged, Method, RunContext};
use crate::config::{MethodConfig, Node};
use anyhow::{bail, Context, Result};
use merge::Granularity;
use std::path::{Path, PathBuf};

/// Where `method.weights` points, or the list itself.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSpec {
    /// A list of floats (task-wise λ, or a flattened `[T, P]`).
    Values(Vec<f32>),
    /// A `.pt`/`.pth` (torch) or `.npy`/`.np` (NumPy) file.
    File(PathBuf),
}

/// The method's settings: every key of FusionBench 0.2.33's `config/method/adamerging/clip.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaMergingConfig {
    /// `name`: `clip_task_wise_adamerging` or `clip_layer_wise_adamerging`.
    pub granularity: Granularity,
    /// `weights`: skip the adaptation with these coefficients.
    pub weights: Option<WeightsSpec>,
    /// `lr` (Adam).
    pub lr: f64,
    /// `init_values`.
    pub init_values: f32,
    /// `clamp_weights`: clamp λ to [0, 1] inside the merge.
    pub clamp_weights: bool,
    /// `batch_size` (per task, per device).
    pub batch_size: usize,
    /// `max_steps` (1 with `fast_dev_run`).
    pub max_steps: u64,
    /// `save_merging_weights` (null/false/"": not saved).
    pub save_merging_weights: Option<String>,
    /// `cache_dir` (FusionBench caches task-wise heads there; ours live in `path.cache_dir`).
    pub cache_dir: Option<String>,
    /// `devices`: FusionBench's v0.1 knob, replaced by `fabric.devices` from the CLI.
    pub devices: Option<Node>,
    /// `num_workers`: data-loading processes (decoding here uses every core).
    pub num_workers: Option<usize>,
    /// `checkpoint_every_steps` (ours; default 50): how often the adaptation's state is
    /// checkpointed under `path.cache_dir/tta/`, besides every `checkpoint_every_seconds`
    /// (default 300) and on SIGTERM/SIGUSR2.
    pub checkpoint_every_steps: u64,
    /// `checkpoint_every_seconds` (ours; default 300).
    pub checkpoint_every_seconds: f64,
    /// `trace_path` (ours; default null): writes every step's batches, losses and λ as JSON in
    /// the format of FusionBench's recorded traces (`scripts/fixtures/fb_adamerging_hooks.py`),
    /// which `scripts/fixtures/adamerging_replay.py` replays into FusionBench's own classes.
    pub trace_path: Option<PathBuf>,
}

const KEYS: &[&str] = &[
    "_target_",
    "name",
    "weights",
    "optimizer",
    "lr",
    "init_values",
    "clamp_weights",
    "tie_weights",
    "strict",
    "devices",
    "batch_size",
    "num_workers",
    "max_steps",
    "fast_dev_run",
    "save_merging_weights",
    "cache_dir",
    "checkpoint_every_steps",
    "checkpoint_every_seconds",
    "trace_path",
];

impl AdaMergingConfig {
    /// Reads and checks `method.*` (`fast_dev_run` falls back to the program's).
    pub fn from_config(cfg: &MethodConfig, program_fast_dev_run: bool) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(s, KEYS);
        let name = s.get::<String>("name")?.unwrap_or_else(|| "clip_layer_wise_adamerging".into());
        let granularity = match name.as_str() {
            "clip_task_wise_adamerging" => Granularity::TaskWise,
            "clip_layer_wise_adamerging" => Granularity::LayerWise,
            other => bail!(
                "method.name=`{other}`: adamerging/clip takes clip_task_wise_adamerging or clip_layer_wise_adamerging"
            ),
        };
        let optimizer = s.get::<String>("optimizer")?.unwrap_or_else(|| "adam".into());
        if optimizer != "adam" {
            bail!("method.optimizer=`{optimizer}`: only `adam` is supported (FusionBench's only choice)");
        }
        let lr = s.get::<f64>("lr")?.unwrap_or(1e-3);
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("method.lr must be a positive number, got {lr}");
        }
        let init_values = s.get::<f64>("init_values")?.unwrap_or(0.3);
        if !init_values.is_finite() {
            bail!("method.init_values must be a finite number, got {init_values}");
        }
        let batch_size = s.get::<i64>("batch_size")?.unwrap_or(16);
        if batch_size <= 0 {
            bail!("method.batch_size must be at least 1, got {batch_size}");
        }
        let max_steps = s.get::<i64>("max_steps")?.unwrap_or(1000);
        if max_steps <= 0 {
            bail!("method.max_steps must be at least 1, got {max_steps}");
        }
        let fast_dev_run = s.get::<bool>("fast_dev_run")?.unwrap_or(program_fast_dev_run);
        let weights = match s.node.get_path("weights") {
            None | Some(Node::Null) => None,
            Some(Node::List(items)) => {
                let mut v = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    v.push(match it {
                        Node::Int(x) => *x as f32,
                        Node::Float(x) => *x as f32,
                        other => bail!("method.weights[{i}] must be a number, found {}", other.kind()),
                    });
                }
                Some(WeightsSpec::Values(v))
            }
            Some(Node::Str(p)) if !p.is_empty() => Some(WeightsSpec::File(PathBuf::from(p))),
            Some(other) => bail!(
                "method.weights must be a list of floats or the path of a .pt/.pth/.npy file, found {}",
                other.kind()
            ),
        };
        let save_merging_weights = match s.node.get_path("save_merging_weights") {
            Some(Node::Str(p)) if !p.is_empty() => Some(p.clone()),
            Some(Node::Bool(false)) | Some(Node::Null) | None => None,
            Some(Node::Str(_)) => None,
            Some(other) => {
                bail!("method.save_merging_weights must be a path, found {}", other.kind())
            }
        };
        Ok(Self {
            granularity,
            weights,
            lr,
            init_values: init_values as f32,
            clamp_weights: s.get::<bool>("clamp_weights")?.unwrap_or(false),
            batch_size: batch_size as usize,
            max_steps: if fast_dev_run { 1 } else { max_steps as u64 },
            save_merging_weights,
            cache_dir: s.get::<String>("cache_dir")?,
            devices: s.node.get_path("devices").cloned(),
            num_workers: s.get::<usize>("num_workers")?,
            checkpoint_every_steps: match s.get::<i64>("checkpoint_every_steps")?.unwrap_or(50) {
                n if n >= 1 => n as u64,
                n => bail!("method.checkpoint_every_steps must be at least 1, got {n}"),
            },
            trace_path: s.get::<String>("trace_path")?.filter(|p| !p.is_empty()).map(PathBuf::from),
            checkpoint_every_seconds: match s.get::<f64>("checkpoint_every_seconds")? {
                Some(x) if x.is_nan() || x <= 0.0 => {
                    bail!("method.checkpoint_every_seconds must be positive, got {x}")
                }
                x => x.unwrap_or(300.0),
            },
        })
    }
}

/// AdaMerging, configured.
pub struct AdaMerging {
    config: AdaMergingConfig,
}

impl AdaMerging {
    /// Reads `method.*`.
    pub fn from_config(cfg: &MethodConfig, ctx: &super::Context) -> Result<Self> {
        Ok(Self { config: AdaMergingConfig::from_config(cfg, ctx.fast_dev_run)? })
    }
}

impl Method for AdaMerging {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let c = &self.config;
        tracing::debug!(rss = ?crate::device::resident_mib(), "adamerging starts");
        let inputs = std::sync::Arc::new(merge::Inputs::open(ctx.pool)?);
        tracing::debug!(rss = ?crate::device::resident_mib(), "checkpoints opened");
        let shape = c.granularity.shape(inputs.tasks(), inputs.params());
        // `rejoin`: after a training on the cluster, the workers that go on to evaluate.
        let (lambda, rejoin) = match &c.weights {
            Some(spec) => {
                let lambda = load_weights(spec, &shape).map_err(|e| match spec {
                    WeightsSpec::File(p) if !p.exists() => missing_weights(e, p, ctx.program),
                    _ => e,
                })?;
                tracing::info!(shape = ?shape, "method.weights given: test-time adaptation skipped");
                (lambda, None)
            }
            None if ctx.launch.join.is_some() => {
                let addr = ctx.launch.join.context("a coordinator address")?;
                match worker::work(c, &inputs, ctx, addr)? {
                    // The final λ: this worker merges the same model and joins its evaluation.
                    Some(lambda) => (lambda, Some(0)),
                    None => {
                        tracing::warn!("the coordinator ended the adaptation before its last step: this worker is done");
                        return Ok(Merged {
                            weights: crate::weights::WeightMap::new(),
                            trainable: false,
                            workers_done: true,
                            params: None,
                            options: Default::default(),
                            rejoin: None,
                        });
                    }
                }
            }
            None => {
                let log_dir = tta::log_dir(ctx.program);
                let (lambda, remote) = tta::adapt(c, &inputs, ctx, &log_dir)?;
                if let Some(path) = &c.save_merging_weights {
                    let dest = save_path(path, c.granularity, &log_dir);
                    save_weights(&dest, &shape, &lambda)?;
                    tracing::info!(path = %dest.display(), "merging weights saved");
                }
                (lambda, ctx.launch.serve.is_some().then_some(remote))
            }
        };
        let weights = merge::merge(&inputs, &lambda, c.granularity, c.clamp_weights)?;
        Ok(Merged {
            weights,
            trainable: false,
            workers_done: false,
            params: None,
            options: Default::default(),
            rejoin,
        })
    }
}

/// Where FusionBench writes `save_merging_weights`: layer-wise, a path not starting with `/` or
/// `.` goes under the logger's `log_dir`; task-wise, the path as given (relative to the working
/// directory).
pub fn save_path(path: &str, g: Granularity, log_dir: &Path) -> PathBuf {
    match g {
        Granularity::LayerWise if !(path.starts_with('/') || path.starts_with('.')) => {
            log_dir.join(path)
        }
        _ => PathBuf::from(path),
    }
}

/// λ from `method.weights`, checked against `shape` (a task-wise list may also be given for a
/// layer-wise run's `[T, P]` only by its full length).
pub fn load_weights(spec: &WeightsSpec, shape: &[usize]) -> Result<Vec<f32>> {
    let want: usize = shape.iter().product();
    let (found_shape, values, origin) = match spec {
        WeightsSpec::Values(v) => (vec![v.len()], v.clone(), "method.weights".to_string()),
        WeightsSpec::File(p) => {
            let (s, v) = crate::weights::torch_file::load_f32(p)
                .with_context(|| format!("method.weights={}", p.display()))?;
            (s, v, p.display().to_string())
        }
    };
    let compatible = found_shape == shape
        || (found_shape.len() == 1 && found_shape[0] == want && shape.len() == 1);
    if !compatible {
        bail!(
            "{origin}: merging weights of shape {found_shape:?}, but this pool and method need {shape:?} ({} models{})",
            shape[0],
            if shape.len() == 2 { format!(" × {} parameter tensors", shape[1]) } else { String::new() }
        );
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("{origin}: merging weight #{i} is {} (not finite)", values[i]);
    }
    Ok(values)
}

/// `method.weights` names a file that is not there. FusionBench's layer-wise AdaMerging saves
/// `save_merging_weights` (a path not starting with `/` or `.`) under its log directory, so the
/// seed's two-stage L/14 recipe reads, relative to the working directory, a file its first stage
/// wrote elsewhere (in FusionBench too). The error names the files under `path.output_dir` whose
/// path ends with the one given, newest first.
fn missing_weights(
    e: anyhow::Error,
    p: &Path,
    program: &crate::config::ProgramConfig,
) -> anyhow::Error {
    if p.is_absolute() {
        return e;
    }
    let root = PathBuf::from(program.path.output_dir.as_deref().unwrap_or("outputs"));
    let mut found = Vec::new();
    let mut budget = 100_000usize;
    find_ending_with(&root, p, 8, &mut budget, &mut found);
    found.sort_by_key(|f| std::cmp::Reverse(std::fs::metadata(f).and_then(|m| m.modified()).ok()));
    match found.first() {
        None => e,
        Some(newest) => e.context(format!(
            "method.weights={}: no such file. A layer-wise AdaMerging run saves \
             method.save_merging_weights under its logger's directory when the path does not start \
             with `/` or `.` (as FusionBench does); it wrote: {} (the newest of {} such file(s) under \
             {}). Pass that path, or save with a path starting with `./`",
            p.display(),
            newest.display(),
            found.len(),
            root.display()
        )),
    }
}

/// Files under `dir` (at most `depth` folders down, at most `budget` entries looked at, links
/// not followed) whose path ends with `tail`.
fn find_ending_with(
    dir: &Path,
    tail: &Path,
    depth: usize,
    budget: &mut usize,
    found: &mut Vec<PathBuf>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() && depth > 0 {
            find_ending_with(&path, tail, depth - 1, budget, found);
        } else if kind.is_file() && path.ends_with(tail) {
            found.push(path);
        }
    }
}

/// Writes λ as `torch.save` would (a float32 tensor `torch.load(weights_only=True)` reads),
/// atomically.
pub fn save_weights(path: &Path, shape: &[usize], lambda: &[f32]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::weights::torch_file::save_f32(path, shape, lambda)
        .with_context(|| format!("saving the merging weights to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_paths_follow_fusionbench() {
        let log = Path::new("outputs/logs/x/version_0");
        assert_eq!(save_path("m.pt", Granularity::LayerWise, log), log.join("m.pt"));
        assert_eq!(save_path("./m.pt", Granularity::LayerWise, log), PathBuf::from("./m.pt"));
        assert_eq!(save_path("/a/m.pt", Granularity::LayerWise, log), PathBuf::from("/a/m.pt"));
        assert_eq!(
            save_path("outputs/m.pt", Granularity::TaskWise, log),
            PathBuf::from("outputs/m.pt")
        );
    }

    #[test]
    fn weights_lists_are_checked() {
        let ok = load_weights(&WeightsSpec::Values(vec![0.3; 4]), &[4]).unwrap();
        assert_eq!(ok, vec![0.3; 4]);
        let e = load_weights(&WeightsSpec::Values(vec![0.3; 3]), &[4]).unwrap_err().to_string();
        assert!(e.contains("[3]") && e.contains("[4]"), "{e}");
        let e =
            load_weights(&WeightsSpec::Values(vec![0.3, f32::NAN]), &[2]).unwrap_err().to_string();
        assert!(e.contains("#1") && e.contains("NaN"), "{e}");
        let e = load_weights(&WeightsSpec::Values(vec![0.3; 8]), &[2, 4]).unwrap_err().to_string();
        assert!(e.contains("[2, 4]"), "{e}");
    }
}
