//! WE-MoE's test-time adaptation (FusionBench's `WeightEnsemblingMoEAlgorithm.test_time_adaptation`):
//! per step, for each task in pool order, one batch of its shuffled, endlessly reshuffled test
//! split through the MoE model, the entropy of its zero-shot predictions, and the routers'
//! gradient; the tasks' gradients summed in task order (as `backward` per task accumulates them
//! with `use_grad_accumulate`; FusionBench's other mode backpropagates the summed losses once,
//! the same gradient up to float rounding), then one Adam step (torch's defaults, `lr`) on every
//! router tensor.
//!
//! The batches replay FusionBench's with `seed` ([`Loaders`], after the draws of the model loads
//! and of the router initialisation). Runs in this process; data-parallel steps on the cluster
//! are to come.

use super::construct::Layout;
use super::init::normal_draws;
use super::WeMoeConfig;
use crate::methods::RunContext;
use crate::models::clip::encoder::LoadOptions;
use crate::models::clip::ClipVision;
use crate::models::we_moe::Routing;
use crate::tasks::zeroshot;
use crate::tta::adam::{Adam, AdamConfig};
use crate::tta::entropy::entropy_loss;
use crate::tta::loaders::Loaders;
use crate::weights::{Scope, WeightMap};
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// The router tensors of `map` as trainable leaves, put back into the map (a shared router once,
/// given to every layer): `(name of its first appearance, leaf)` in state-dict order.
pub fn router_leaves(map: &mut WeightMap, shared: bool) -> Vec<(String, Tensor)> {
    let mut leaves: Vec<(String, Tensor)> = Vec::new();
    let mut by_suffix: std::collections::HashMap<String, Tensor> = Default::default();
    let names: Vec<String> = map.names().to_vec();
    for name in names {
        let Some((_, rest)) = name.split_once(".mlp.gate.") else { continue };
        if shared {
            if let Some(leaf) = by_suffix.get(rest) {
                let leaf = leaf.shallow_clone();
                map.insert(name, leaf);
                continue;
            }
        }
        let leaf = map.get(&name).expect("a listed name").detach().copy().set_requires_grad(true);
        if shared {
            by_suffix.insert(rest.to_string(), leaf.shallow_clone());
        }
        map.insert(name.clone(), leaf.shallow_clone());
        leaves.push((name, leaf));
    }
    leaves
}

/// Trains the routers of `map` (FusionBench's initial MoE model) and returns the trained model;
/// `draws` is how many 32-bit draws of torch's default generator seeding with `seed` and the
/// construction took.
pub fn adapt(
    c: &WeMoeConfig,
    ctx: &RunContext<'_>,
    layout: &Layout,
    map: WeightMap,
    seed: u64,
    draws: u64,
) -> Result<WeightMap> {
    let models = ctx.pool.task_models()?;
    let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
    let method = if c.sparse { "sparse weight-ensembling MoE" } else { "weight-ensembling MoE" };
    let set = crate::methods::adamerging::tta::test_time_tasks(ctx, &names, method)?;
    // The zero-shot heads' CLIPModel is the last model FusionBench loads before its loaders.
    let skip = draws + normal_draws(layout.hidden as u64)?;
    let lens: Vec<usize> = set.tasks.iter().map(|t| t.data.len()).collect();
    let mut loaders = Loaders::new(seed, skip, &lens, c.batch_size);
    let mut map = map;
    let mut leaves = router_leaves(&mut map, c.shared_gate);
    let routing = if c.batch_reduce { Routing::Batch } else { Routing::PerSample };
    let vision = ClipVision::load_with(
        &Scope::new(&map, set.device, Kind::Float).pp("vision_model"),
        ctx.pool.config(),
        &LoadOptions { routing },
    )
    .context("the WE-MoE model")?;
    let mut adams: Vec<Adam> =
        leaves.iter().map(|(_, t)| Adam::new(AdamConfig::with_lr(c.lr), &t.size())).collect();
    let inputs: Vec<Tensor> = leaves.iter().map(|(_, t)| t.shallow_clone()).collect();
    let bar = crate::progress::bar(method, c.max_steps as usize, "steps");
    let started = std::time::Instant::now();
    tracing::info!(tasks = ?names, steps = c.max_steps, batch_size = c.batch_size, seed, routers = leaves.len(), "test-time adaptation");
    // A small model adapts on one intra-op thread (as AdaMerging's steps: libtorch's per-op
    // threading costs more than it saves there).
    let small = map.numel() < crate::methods::adamerging::step::SMALL_MODEL
        && set.device == tch::Device::Cpu;
    let mut train = || -> Result<()> {
        for step in 0..c.max_steps {
            let mut total: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0f64;
            for (t, task) in set.tasks.iter().enumerate() {
                let batch = loaders.next_batch(t);
                let x = set.pixels(t, &batch.indices)?;
                let feats = set.base.image_features(&vision, &x);
                let logits = zeroshot::logits(&feats, &task.head, &set.base.logit_scale);
                let loss = entropy_loss(&logits);
                let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)
                    .with_context(|| format!("step {step}, task `{}`: backward", task.name))?;
                loss_sum += loss.double_value(&[]);
                total = Some(match total {
                    None => grads,
                    Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect(),
                });
            }
            let total = total.context("no task to adapt on")?;
            for (((_, leaf), adam), g) in leaves.iter_mut().zip(&mut adams).zip(&total) {
                adam.step(leaf, g);
            }
            bar.set_message(format!("loss {loss_sum:.4}"));
            bar.inc(1);
            tracing::debug!(step, loss = loss_sum, "step");
        }
        Ok(())
    };
    if small {
        crate::device::single_threaded(train)?;
    } else {
        train()?;
    }
    bar.finish_and_clear();
    tracing::info!(
        steps = c.max_steps,
        seconds = started.elapsed().as_secs_f64(),
        seconds_per_step = started.elapsed().as_secs_f64() / c.max_steps.max(1) as f64,
        "test-time adaptation done"
    );
    drop(vision);
    // The trained model, its routers plain tensors again.
    let mut out = WeightMap::new();
    for (name, t) in map.iter() {
        out.insert(name, t.detach());
    }
    Ok(out)
}
