//! `method=wemoe/weight_ensembling_moe` (and the stale `method=weight_ensembling_moe`) and
//! `method=wemoe/sparse_weight_ensembling_moe`: Weight-Ensembling MoE (Tang et al., ICML 2024,
//! <http://arxiv.org/abs/2402.00433>) and its sparse variant, FusionBench 0.2.33's
//! `CLIPWeightEnsemblingMoEAlgorithm` / `SparseCLIPWeightEnsemblingMoEAlgorithm` (spec §4.8-4.9).
//!
//! The model ([`construct`]): non-MLP weights are task arithmetic at `init_lambda`; every encoder
//! layer's MLP is a weight-ensembling block ([`crate::models::we_moe`]) over the pretrained MLP
//! and the task vectors, with a router initialised as FusionBench's ([`init`]). The routers then
//! follow Adam on the entropy of each task's shuffled test batches ([`tta`]), or
//! `method.checkpoint` loads FusionBench's (or our) trained model ([`checkpoint`]). The result is
//! the MoE state dict itself, which the evaluator loads as a CLIP whose MLP slots hold the blocks.

pub mod checkpoint;
pub mod construct;
pub mod data_parallel;
mod generation;
pub mod init;
mod run_state;
pub mod step;
pub mod tta;

use super::{Merged, Method, RunContext};
use crate::config::{MethodConfig, Node};
use crate::models::we_moe::Routing;
use anyhow::{bail, Context, Result};
use construct::{Layout, Pruning};
use std::path::PathBuf;

/// The method's settings: every key of FusionBench 0.2.33's `config/method/wemoe/*.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeMoeConfig {
    /// Sparse WE-MoE (`sparse_clip_weight_ensembling_moe`).
    pub sparse: bool,
    /// `checkpoint`: load this trained model and skip the adaptation.
    pub checkpoint: Option<PathBuf>,
    /// `save_checkpoint`: where the trained model goes (FusionBench's `fabric.save`).
    pub save_checkpoint: Option<PathBuf>,
    /// `router_hidden_layers` (0, 1, 2).
    pub router_hidden_layers: usize,
    /// `init_lambda`: task arithmetic's scaling and the routers' initial output.
    pub init_lambda: f64,
    /// `batch_reduce`: route per batch (true) or per sample, in training and evaluation alike
    /// (FusionBench's later `batch_reduce = False` changes nothing).
    pub batch_reduce: bool,
    /// `lr` (Adam).
    pub lr: f64,
    /// `batch_size` per task.
    pub batch_size: usize,
    /// `max_steps` (1 with `fast_dev_run`).
    pub max_steps: u64,
    /// `use_grad_accumulate`: one backward per task (true) or one of the summed losses; the
    /// gradient is the same (here always per task, the sum in task order).
    pub use_grad_accumulate: bool,
    /// `tv_prune_ratio` (sparse): the quantile of |τ| below which task-vector entries are zeroed.
    pub tv_prune_ratio: f64,
    /// `post_sparse_gate` (sparse): prune the routers after the adaptation.
    pub post_sparse_gate: bool,
    /// `gate_prune_ratio` (sparse).
    pub gate_prune_ratio: f64,
    /// `shared_gate` (sparse): one router for every layer.
    pub shared_gate: bool,
    /// `position_encoding` (sparse, with a shared router): the router sees the layer index.
    pub position_encoding: bool,
    /// `position_encoding_dim`.
    pub position_encoding_dim: usize,
    /// `per_sample_routing` (ours, default false): evaluate routing each sample on its own, as
    /// the paper describes, instead of FusionBench's batch average. Changes the numbers.
    pub per_sample_routing: bool,
    /// `checkpoint_every_steps` (ours, default 50): how often the router training is
    /// checkpointed under `path.cache_dir/tta/`, besides every `checkpoint_every_seconds` (300),
    /// at the end and on SIGTERM/SIGUSR2.
    pub checkpoint_every_steps: u64,
    /// `checkpoint_every_seconds` (ours, default 300).
    pub checkpoint_every_seconds: f64,
}

const KEYS: &[&str] = &[
    "_target_",
    "name",
    "checkpoint",
    "save_checkpoint",
    "router_hidden_layers",
    "init_lambda",
    "batch_reduce",
    "lr",
    "optimizer",
    "devices",
    "batch_size",
    "num_workers",
    "max_steps",
    "use_grad_accumulate",
    "cache_dir",
    "fast_dev_run",
    "tv_prune_ratio",
    "post_sparse_gate",
    "gate_prune_ratio",
    "shared_gate",
    "position_encoding",
    "position_encoding_dim",
    "per_sample_routing",
    "checkpoint_every_steps",
    "checkpoint_every_seconds",
];

/// A path key that FusionBench also takes as `False` (not set).
fn path_key(s: &crate::config::Section, key: &str) -> Result<Option<PathBuf>> {
    Ok(match s.node.get_path(key) {
        None | Some(Node::Null) | Some(Node::Bool(false)) => None,
        Some(Node::Str(p)) if p.is_empty() => None,
        Some(Node::Str(p)) => Some(PathBuf::from(p)),
        Some(other) => bail!("method.{key} must be a path or false, found {}", other.kind()),
    })
}

impl WeMoeConfig {
    /// Reads and checks `method.*` (`fast_dev_run` falls back to the program's).
    pub fn from_config(
        cfg: &MethodConfig,
        program_fast_dev_run: bool,
        sparse: bool,
    ) -> Result<Self> {
        let s = &cfg.section;
        crate::config::warn_unknown_keys(s, KEYS);
        let want =
            if sparse { "sparse_clip_weight_ensembling_moe" } else { "clip_weight_ensembling_moe" };
        match s.get::<String>("name") {
            Ok(Some(n)) if n == want => {}
            Ok(Some(n)) => bail!("method.name=`{n}`: this config takes method.name={want}"),
            Ok(None) => bail!("method.name is mandatory (`???`): pass method.name={want}"),
            Err(e) => return Err(e).context(format!("method.name (pass method.name={want})")),
        }
        let optimizer = s.get::<String>("optimizer")?.unwrap_or_else(|| "adam".into());
        if optimizer != "adam" {
            bail!("method.optimizer=`{optimizer}`: only `adam` is supported (FusionBench's only choice)");
        }
        let lr = s.get::<f64>("lr")?.unwrap_or(1e-4);
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("method.lr must be a positive number, got {lr}");
        }
        let depth = s.get::<i64>("router_hidden_layers")?.unwrap_or(2);
        if !(0..=2).contains(&depth) {
            bail!("method.router_hidden_layers must be 0, 1 or 2 (FusionBench's routers), got {depth}");
        }
        let init_lambda = s.get::<f64>("init_lambda")?.unwrap_or(0.3);
        if !init_lambda.is_finite() {
            bail!("method.init_lambda must be a finite number, got {init_lambda}");
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
        let ratio = |key: &str, default: f64| -> Result<f64> {
            let r = s.get::<f64>(key)?.unwrap_or(default);
            if !(0.0..1.0).contains(&r) {
                bail!("method.{key} must be in [0, 1), got {r}");
            }
            Ok(r)
        };
        let pe_dim = s.get::<i64>("position_encoding_dim")?.unwrap_or(8);
        if pe_dim < 0 || pe_dim % 2 != 0 {
            bail!("method.position_encoding_dim must be a non-negative even number, got {pe_dim}");
        }
        Ok(Self {
            sparse,
            checkpoint: path_key(s, "checkpoint")?,
            save_checkpoint: path_key(s, "save_checkpoint")?,
            router_hidden_layers: depth as usize,
            init_lambda,
            batch_reduce: s.get::<bool>("batch_reduce")?.unwrap_or(true),
            lr,
            batch_size: batch_size as usize,
            max_steps: if fast_dev_run { 1 } else { max_steps as u64 },
            use_grad_accumulate: s.get::<bool>("use_grad_accumulate")?.unwrap_or(!sparse),
            tv_prune_ratio: if sparse { ratio("tv_prune_ratio", 0.9)? } else { 0.0 },
            post_sparse_gate: sparse && s.get::<bool>("post_sparse_gate")?.unwrap_or(false),
            gate_prune_ratio: if sparse { ratio("gate_prune_ratio", 0.0)? } else { 0.0 },
            shared_gate: sparse && s.get::<bool>("shared_gate")?.unwrap_or(true),
            position_encoding: sparse && s.get::<bool>("position_encoding")?.unwrap_or(false),
            position_encoding_dim: pe_dim as usize,
            per_sample_routing: s.get::<bool>("per_sample_routing")?.unwrap_or(false),
            checkpoint_every_steps: match s.get::<i64>("checkpoint_every_steps")?.unwrap_or(50) {
                n if n >= 1 => n as u64,
                n => bail!("method.checkpoint_every_steps must be at least 1, got {n}"),
            },
            checkpoint_every_seconds: match s.get::<f64>("checkpoint_every_seconds")? {
                Some(x) if x.is_nan() || x <= 0.0 => {
                    bail!("method.checkpoint_every_seconds must be positive, got {x}")
                }
                x => x.unwrap_or(300.0),
            },
        })
    }

    /// The state dict's sizes for a pool.
    pub fn layout(&self, ctx: &RunContext<'_>, experts: usize) -> Layout {
        let e = &ctx.pool.config().encoder;
        Layout {
            layers: e.num_hidden_layers as usize,
            hidden: e.hidden_size,
            intermediate: e.intermediate_size,
            experts,
            depth: self.router_hidden_layers,
            position_dim: if self.shared_gate
                && self.position_encoding
                && self.router_hidden_layers > 0
            {
                self.position_encoding_dim
            } else {
                0
            },
        }
    }

    fn pruning(&self) -> Pruning {
        if self.sparse {
            Pruning::Magnitude(self.tv_prune_ratio)
        } else {
            Pruning::None
        }
    }
}

/// WE-MoE, configured.
pub struct WeMoe {
    config: WeMoeConfig,
}

impl WeMoe {
    /// Reads `method.*`.
    pub fn from_config(cfg: &MethodConfig, ctx: &super::Context, sparse: bool) -> Result<Self> {
        Ok(Self { config: WeMoeConfig::from_config(cfg, ctx.fast_dev_run, sparse)? })
    }
}

impl Method for WeMoe {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let c = &self.config;
        let experts = ctx.pool.task_models()?.len();
        if experts == 0 {
            bail!("weight-ensembling MoE: the model pool has no fine-tuned models");
        }
        let layout = c.layout(ctx, experts);
        let dense = construct::dense_keys(ctx);
        let keys = layout.keys(&dense);
        // `rejoin`: the workers that go on to evaluate after a training on the cluster.
        let (weights, rejoin) = match &c.checkpoint {
            Some(path) => {
                tracing::info!(checkpoint = %path.display(), "method.checkpoint given: test-time adaptation skipped");
                (checkpoint::load(path, &keys, c.shared_gate)?, None)
            }
            None => {
                let seed = crate::methods::adamerging::tta::seed_of(ctx.program);
                let towers = experts + 1;
                let mut routers = init::RouterInit::new(
                    seed,
                    towers,
                    layout.hidden,
                    c.init_lambda,
                    c.shared_gate,
                )?;
                let map =
                    construct::construct(ctx, &layout, c.init_lambda, c.pruning(), &mut routers)?;
                let draws = routers.draws();
                drop(routers);
                if let Some(addr) = ctx.launch.join {
                    // A worker: its routers come from the coordinator, the trained ones last;
                    // with them it joins the evaluation (the coordinator saves the checkpoint).
                    match tta::work(c, ctx, map.shallow_clone(), addr)? {
                        Some(trained) => (tta::with_routers(map, &trained, c.shared_gate), Some(0)),
                        None => {
                            tracing::warn!("the coordinator ended the training before its last step: this worker is done");
                            return Ok(Merged {
                                weights: crate::weights::WeightMap::new(),
                                trainable: true,
                                workers_done: true,
                                params: None,
                                options: Default::default(),
                                rejoin: None,
                            });
                        }
                    }
                } else {
                    let (trained, remote) = tta::adapt(c, ctx, &layout, map, seed, draws)?;
                    if let Some(path) = &c.save_checkpoint {
                        checkpoint::save(path, &trained)?;
                        tracing::info!(path = %path.display(), "checkpoint saved");
                    }
                    (trained, ctx.launch.serve.is_some().then_some(remote))
                }
            }
        };
        let weights = if c.post_sparse_gate {
            prune_routers(weights, c.gate_prune_ratio, c.shared_gate)?
        } else {
            weights
        };
        let routers: i64 =
            layout.router_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        let router_copies = if c.shared_gate { 1 } else { layout.layers as i64 };
        let all = weights.numel() - routers * (layout.layers as i64 - router_copies);
        let routing = if c.per_sample_routing || !c.batch_reduce {
            Routing::PerSample
        } else {
            Routing::Batch
        };
        Ok(Merged {
            weights,
            trainable: true,
            workers_done: false,
            params: Some((all, routers * router_copies)),
            options: crate::models::clip::encoder::LoadOptions { routing },
            rejoin,
        })
    }
}

/// FusionBench's `construct_post_spare_gate_model`: layer by layer, every router tensor
/// magnitude-pruned at `ratio` ([`construct::magnitude_prune`]). A shared router is the same
/// tensors in every layer, so it is pruned once per layer, each time of what the last left.
fn prune_routers(
    mut weights: crate::weights::WeightMap,
    ratio: f64,
    shared: bool,
) -> Result<crate::weights::WeightMap> {
    let _guard = tch::no_grad_guard();
    let suffix = |name: &str| name.split_once(".mlp.gate.").map(|(_, r)| r.to_string());
    let names: Vec<String> =
        weights.names().iter().filter(|n| n.contains(".mlp.gate.")).cloned().collect();
    let mut current: std::collections::HashMap<String, tch::Tensor> = Default::default();
    for name in &names {
        let key = suffix(name).unwrap_or_default();
        let t = match current.get(&key).filter(|_| shared) {
            Some(t) => t.shallow_clone(),
            None => weights.get(name).context("a listed router tensor")?.shallow_clone(),
        };
        let pruned = construct::magnitude_prune(&t, ratio)
            .with_context(|| format!("post_sparse_gate: pruning `{name}`"))?;
        current.insert(key, pruned.shallow_clone());
        weights.insert(name.clone(), pruned);
    }
    if shared {
        // Every layer evaluates with the router as the last layer's pruning left it.
        for name in &names {
            let key = suffix(name).unwrap_or_default();
            weights.insert(name.clone(), current[&key].shallow_clone());
        }
    }
    Ok(weights)
}
