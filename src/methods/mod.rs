//! Merging methods: one file per method behind [`Method`], picked by name from the config's
//! `method` group through [`build`].
//!
//! A method reads the model pool tensor by tensor (mmap'd safetensors) and returns the merged
//! vision weights as an ordered [`WeightMap`]; the program evaluates and saves them. Parallelism
//! and placement stay out of method files.

pub mod adamerging;
mod aten_sum;
mod dummy;
mod fisher_merging;
pub(crate) mod model_statistics;
mod pool;
pub(crate) mod pool_tasks;
mod regmean;
mod simd;
mod simple_average;
pub(crate) mod task_arithmetic;
mod task_vector_cos_similarity;
mod ties_merging;
mod we_moe;

pub use pool::{Checkpoint, ModelPool};

use crate::config::MethodConfig;
use crate::weights::WeightMap;
use anyhow::{bail, Result};

/// The result of a method: vision weights in `named_parameters()` order.
pub struct Merged {
    /// `vision_model.*` tensors.
    pub weights: WeightMap,
    /// Whether its parameters count as trainable in the report's `model_info` (FusionBench's
    /// merged `nn.Module`s keep `requires_grad=True`).
    pub trainable: bool,
    /// Set on a `--join` worker of a training method once its part is done: the coordinator
    /// evaluates the result on its own devices (a worker has no final λ to evaluate with), so
    /// the worker exits.
    pub workers_done: bool,
    /// `(all, trainable)` parameters for `model_info`, when they are not the weights' count
    /// and `trainable` (a WE-MoE model: its state dict repeats a shared router per layer, and
    /// only its routers train).
    pub params: Option<(i64, i64)>,
    /// How the evaluated model is built from `weights` beyond what they say (WE-MoE routing).
    pub options: crate::models::clip::encoder::LoadOptions,
    /// Set when the method trained on the cluster and its workers go on to evaluate the result
    /// (they received it as the training job's last broadcast): on the coordinator, how many
    /// workers were joined at the training's end (its evaluation waits for them); on a worker,
    /// 0 (it joins the evaluation the coordinator starts once it has saved what it saves).
    pub rejoin: Option<usize>,
}

/// A model-merging method.
pub trait Method {
    /// Runs the method: on `ctx.pool`, with what else the program offers.
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged>;
}

/// What a method sees when it runs: the model pool, the hub (to load the tasks' data and the
/// base CLIP a training method adapts on), and the whole composed config (seed, `fast_dev_run`,
/// `fabric` devices and loggers, `path`).
pub struct RunContext<'a> {
    /// The model pool, its checkpoints mapped.
    pub pool: &'a ModelPool,
    /// Where hub ids resolve.
    pub hub: &'a crate::hub::Hub,
    /// The composed program config.
    pub program: &'a crate::config::ProgramConfig,
    /// This process's role in a cluster (`--serve`, `--join`, or alone): a training method runs
    /// its steps on the cluster's workers.
    pub launch: &'a crate::launch::Launch,
}

/// What a method may need from the program besides its own config section.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// `path.log_dir`: where analyses write their files when not told otherwise.
    pub log_dir: Option<String>,
    /// The program's `seed`.
    pub seed: Option<u64>,
    /// The program's `fast_dev_run`.
    pub fast_dev_run: bool,
}

/// A method of this build: the config option that names it, FusionBench's class (the config's
/// `_target_`), and how to build it from its config section.
pub struct Entry {
    /// The `method=` option of FusionBench's config tree (`task_arithmetic`).
    pub option: &'static str,
    /// The class name ending the `_target_` (`TaskArithmeticAlgorithm`).
    pub class: &'static str,
    /// Builds the method from its config section.
    pub build: fn(&MethodConfig, &Context) -> Result<Box<dyn Method>>,
}

/// Every method of this build: the one list that `build`, `--help` and the errors read.
pub const REGISTRY: &[Entry] = &[
    Entry { option: "dummy", class: "DummyAlgorithm", build: |_, _| Ok(Box::new(dummy::Dummy)) },
    Entry {
        option: "simple_average",
        class: "SimpleAverageAlgorithm",
        build: |_, _| Ok(Box::new(simple_average::SimpleAverage)),
    },
    Entry {
        option: "task_arithmetic",
        class: "TaskArithmeticAlgorithm",
        build: |cfg, _| Ok(Box::new(task_arithmetic::TaskArithmetic::from_config(cfg)?)),
    },
    Entry {
        option: "ties_merging",
        class: "TiesMergingAlgorithm",
        build: |cfg, _| Ok(Box::new(ties_merging::TiesMerging::from_config(cfg)?)),
    },
    Entry {
        option: "fisher_merging/clip_fisher_merging",
        class: "FisherMergingForCLIPVisionModel",
        build: |cfg, _| Ok(Box::new(fisher_merging::FisherMerging::from_config(cfg)?)),
    },
    Entry {
        option: "regmean/clip_regmean",
        class: "RegMeanAlgorithmForCLIP",
        build: |cfg, _| Ok(Box::new(regmean::RegMean::from_config(cfg)?)),
    },
    Entry {
        option: "adamerging/clip",
        class: "CLIPLayerWiseAdaMergingAlgorithm",
        build: |cfg, ctx| Ok(Box::new(adamerging::AdaMerging::from_config(cfg, ctx)?)),
    },
    Entry {
        option: "wemoe/weight_ensembling_moe",
        class: "CLIPWeightEnsemblingMoEAlgorithm",
        build: |cfg, ctx| Ok(Box::new(we_moe::WeMoe::from_config(cfg, ctx, false)?)),
    },
    Entry {
        option: "wemoe/sparse_weight_ensembling_moe",
        class: "SparseCLIPWeightEnsemblingMoEAlgorithm",
        build: |cfg, ctx| Ok(Box::new(we_moe::WeMoe::from_config(cfg, ctx, true)?)),
    },
    Entry {
        option: "analysis/task_vector_cos_similarity",
        class: "TaskVectorCosSimilarity",
        build: |cfg, ctx| {
            Ok(Box::new(task_vector_cos_similarity::TaskVectorCosSimilarity::from_config(
                cfg, ctx,
            )?))
        },
    },
];

/// The `method=` options of [`REGISTRY`], in its order.
pub fn available() -> Vec<String> {
    REGISTRY.iter().map(|e| e.option.to_string()).collect()
}

/// The method a composed `method` config names (by its `_target_` class), with its
/// hyperparameters read from the config.
pub fn build(cfg: &MethodConfig, ctx: &Context) -> Result<Box<dyn Method>> {
    let target = cfg.target.as_deref().unwrap_or("");
    let class = target.rsplit('.').next().unwrap_or("");
    // v0.1 configs (adamerging/clip.yaml) have no `_target_`: FusionBench picks them by `name`;
    // here by the option that composed them.
    let found = REGISTRY.iter().find(|e| e.class == class).or_else(|| {
        cfg.target.is_none().then_some(()).and_then(|_| {
            let option = cfg.option.as_deref().map(crate::config::aliases::current_method_option);
            REGISTRY.iter().find(|e| Some(e.option) == option)
        })
    });
    match found {
        Some(e) => (e.build)(cfg, ctx),
        None => bail!(
            "method `{}` (_target_: {target}) is not available in this build (available: {})",
            cfg.option.as_deref().unwrap_or("?"),
            available().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every registered option has its config file, whose `_target_` names the registered class.
    #[test]
    fn every_method_has_its_config_and_class() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/method");
        assert_eq!(REGISTRY.len(), 10);
        for e in REGISTRY {
            let path = dir.join(format!("{}.yaml", e.option));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            match text.lines().find_map(|l| l.trim().strip_prefix("_target_:")) {
                Some(target) => {
                    assert_eq!(
                        target.trim().rsplit('.').next(),
                        Some(e.class),
                        "{}",
                        path.display()
                    )
                }
                // A v0.1 config, chosen by its option (and its `name`).
                None => assert!(text.lines().any(|l| l.starts_with("name:")), "{}", path.display()),
            }
        }
        let cfg = MethodConfig {
            option: Some("nope".into()),
            name: None,
            target: Some("x.Nope".into()),
            section: crate::config::Section {
                path: "method".into(),
                node: crate::config::Node::Null,
            },
        };
        let e = build(&cfg, &Context::default()).err().unwrap().to_string();
        assert!(e.contains("task_arithmetic") && e.contains("Nope"), "{e}");
    }
}
