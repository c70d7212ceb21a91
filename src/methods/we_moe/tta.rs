//! WE-MoE's test-time adaptation (FusionBench's `WeightEnsemblingMoEAlgorithm.test_time_adaptation`),
//! data-parallel on the cluster runtime: per step, one item per task in pool order (its batch of
//! the shuffled, endlessly reshuffled test split, [`Loaders`] replaying FusionBench's with
//! `seed`); the items split over the job's processes in contiguous blocks, each process
//! computing its block ([`RouterExecutor`]) and the ring between them summing the router
//! gradients in item order (float32, as `backward` per task accumulates them with
//! `use_grad_accumulate`; FusionBench's other mode backpropagates the summed losses once, the
//! same gradient up to rounding); then every process applies the same Adam step (torch's
//! defaults, `lr`) per router tensor ([`super::data_parallel`]). The trajectory does not depend
//! on how many processes computed it, nor on a process lost on the way (the step is recomputed
//! on a ring of the processes left), nor on whether the workers could reach each other (if they
//! cannot, the gradients go through the coordinator instead, summed with the ring's fold:
//! [`data_parallel::RingFallback`]).
//!
//! The state (routers, Adam's moments, step, loaders, losses) is checkpointed atomically under
//! `path.cache_dir/tta/` every `+method.checkpoint_every_steps` (50) steps or
//! `+method.checkpoint_every_seconds` (300), at the end, and at the first step boundary after
//! SIGTERM/SIGUSR2 (then the process exits 143); the same command resumes from it.

use super::construct::Layout;
use super::data_parallel::{
    self, BlockResult, Exchange, RingFallback, RouterBroadcast, RING_FAILURES_BEFORE_RELAY,
};
use super::generation::{form_generation, is_ring_failure, ranked, retry, step_work, Generation};
use super::init::normal_draws;
use super::run_state::{resume, save_state, Boundary, Meta};
use super::step::{unflatten, RouterExecutor, StepItem, StepResult};
use super::WeMoeConfig;
use crate::methods::RunContext;
use crate::models::clip::encoder::LoadOptions;
use crate::models::we_moe::Routing;
use crate::tasks::set::TaskSet;
use crate::tta::adam::{Adam, AdamConfig, AdamState};
use crate::tta::loaders::Loaders;
use crate::weights::WeightMap;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tch::Tensor;

fn method_name(c: &WeMoeConfig) -> &'static str {
    if c.sparse {
        "sparse weight-ensembling MoE"
    } else {
        "weight-ensembling MoE"
    }
}

fn options(c: &WeMoeConfig) -> LoadOptions {
    LoadOptions { routing: if c.batch_reduce { Routing::Batch } else { Routing::PerSample } }
}

/// Cluster options with frames large enough for the routers and Adam's state (`floats` each).
fn cluster_options(
    mut o: fusion_cluster::runtime::ClusterOptions,
    floats: usize,
) -> fusion_cluster::runtime::ClusterOptions {
    let need = 3 * floats * 4 + (1 << 20);
    o.transport.max_frame_len = o.transport.max_frame_len.max(need);
    o
}

fn tasks(c: &WeMoeConfig, ctx: &RunContext<'_>) -> Result<TaskSet> {
    let models = ctx.pool.task_models()?;
    let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
    crate::methods::adamerging::tta::test_time_tasks(ctx, &names, method_name(c))
}

fn run_key(c: &WeMoeConfig, set: &TaskSet, ctx: &RunContext<'_>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "wemoe|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}",
        c.sparse,
        c.router_hidden_layers,
        c.init_lambda,
        c.batch_reduce,
        c.lr,
        c.batch_size,
        c.tv_prune_ratio,
        c.shared_gate,
        c.position_encoding,
        c.position_encoding_dim,
        ctx.program.seed,
        crate::version::NUMERICS_VERSION
    ));
    for (name, m) in &ctx.program.modelpool.models {
        h.update(format!("{name}={}|", m.path));
    }
    for t in &set.tasks {
        h.update(format!("{}|{}|{:x}", t.name, t.data.len(), t.data.fingerprint()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Trains the routers of `map` (FusionBench's initial MoE model) on the cluster (this process
/// computing too) and returns the trained model and how many remote workers were joined at the
/// end (each got the trained routers as the job's last broadcast, so it can evaluate); `draws`
/// is how many 32-bit draws of torch's default generator seeding with `seed` and the
/// construction took.
pub fn adapt(
    c: &WeMoeConfig,
    ctx: &RunContext<'_>,
    layout: &Layout,
    map: WeightMap,
    seed: u64,
    draws: u64,
) -> Result<(WeightMap, usize)> {
    let set = tasks(c, ctx)?;
    let names = set.names();
    let key = run_key(c, &set, ctx);
    // The zero-shot heads' CLIPModel is the last model FusionBench loads before its loaders.
    let skip = draws + normal_draws(layout.hidden as u64)?;
    let lens: Vec<usize> = set.tasks.iter().map(|t| t.data.len()).collect();
    let cfg = AdamConfig::with_lr(c.lr);
    let local = RouterExecutor::new(
        set,
        map.shallow_clone(),
        c.shared_gate,
        options(c),
        ctx.pool.config(),
        cfg,
    )?;
    let pending = local.pending_sum();
    let initial: Vec<Tensor> = local.leaves().iter().map(|t| t.detach().copy()).collect();
    let floats: usize = initial.iter().map(|t| t.numel()).sum();
    let state_file =
        ctx.program.path.cache_dir.as_ref().map(|d| {
            PathBuf::from(d).join("tta").join(format!("wemoe-{}.safetensors", &key[..32]))
        });
    let resumed = match &state_file {
        Some(f) => resume(f, &key, c, &initial)?,
        None => None,
    };
    let (mut step, mut loaders, params, adams, mut losses) = match resumed {
        Some((meta, params, adams)) => {
            tracing::info!(
                step = meta.step,
                of = c.max_steps,
                "resuming the router training from its checkpoint"
            );
            (meta.step, meta.loaders, params, adams, meta.losses)
        }
        None => {
            let adams = initial.iter().map(|t| Adam::new(cfg, &t.size())).collect();
            (0, Loaders::new(seed, skip, &lens, c.batch_size), initial, adams, Vec::new())
        }
    };
    let (listen, opts) = match ctx.launch.serve_addr() {
        Some(addr) => (Some(addr), ctx.launch.options_for(ctx.program)),
        None => (None, fusion_cluster::runtime::ClusterOptions::new("local", std::env::temp_dir())),
    };
    let opts = cluster_options(opts, floats);
    let local = match listen {
        Some(_) => {
            local.with_ring(&fusion_cluster::runtime::local_worker_name(0), opts.clone(), None)
        }
        None => local,
    };
    let method = method_name(c);
    let bar = crate::progress::bar(method, c.max_steps as usize, "steps");
    bar.inc(step);
    // The state at the last step boundary: the loop moves it on under the lock; on a stop
    // signal the watcher writes it and ends the process, whatever the step under way.
    let latest = Arc::new(Mutex::new(Boundary {
        meta: Meta {
            run: key.clone(),
            step,
            loaders: loaders.clone(),
            seed,
            adam_steps: adams.first().map_or(0, Adam::steps),
            losses: losses.clone(),
        },
        params,
        adams,
    }));
    let signals = crate::signals::StopSignals::install()?;
    let watching = {
        let latest = latest.clone();
        crate::tta::stop::watch(signals.flag(), state_file.clone(), c.max_steps, move |file| {
            let b = latest.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = file {
                save_state(f, &b.meta, &b.params, &b.adams)?;
            }
            let step = b.meta.step;
            // Held until the process ends: the loop cannot move the state on meanwhile.
            std::mem::forget(b);
            Ok(step)
        })
    };
    let every = std::time::Duration::from_secs_f64(c.checkpoint_every_seconds);
    let job_name = opts.job_id.clone();
    tracing::info!(tasks = ?names, steps = c.max_steps, batch_size = c.batch_size, seed, router_floats = floats, "test-time adaptation");
    let started = std::time::Instant::now();
    let first = step;
    let (outcome, summary) = fusion_cluster::runtime::run_job(
        vec![Box::new(local)],
        listen,
        &opts,
        |addr| {
            crate::launch::Launch::remember_bound(addr);
            tracing::info!(%addr, job = %job_name, "coordinator listening: workers join with --join")
        },
        |job| -> Result<usize> {
            let mut ring: Option<Generation> = None;
            let mut generation = 0u64;
            let mut failures = 0usize;
            let mut fallback = RingFallback::default();
            // A step's batches, drawn once: a step recomputed after a loss uses the same ones.
            let mut drawn: Option<Vec<StepItem>> = None;
            let mut last_save = std::time::Instant::now();
            let (mut round_seconds, mut compute_seconds, mut reduce_seconds) = (0f64, 0f64, 0f64);
            while step < c.max_steps {
                let procs = ranked(job.workers())?;
                if ring.as_ref().is_none_or(|g| g.names != procs) {
                    generation += 1;
                    let full = {
                        let b = latest.lock().unwrap_or_else(|e| e.into_inner());
                        let states: Vec<AdamState> = b.adams.iter().map(Adam::state).collect();
                        let full = RouterBroadcast::full(step, super::step::flatten(&b.params), &states);
                        fusion_cluster::codec::encode(&full)?
                    };
                    match form_generation(job, procs, generation, step, full, fallback.exchange()) {
                        Ok(g) => ring = Some(g),
                        Err(e) => {
                            fallback.reset();
                            retry(e, step, &mut failures, fallback.exchange())?;
                            continue;
                        }
                    }
                }
                let g = ring.as_ref().expect("formed above");
                let items = drawn.get_or_insert_with(|| {
                    (0..names.len())
                        .map(|t| StepItem {
                            step,
                            task: t as u32,
                            indices: loaders.next_batch(t).indices.iter().map(|&i| i as u32).collect(),
                        })
                        .collect()
                });
                let exchange = fallback.exchange();
                let n_items = items.len();
                let work = step_work(g, step, items, exchange)?;
                let round = match job.round_pinned(work) {
                    Ok(round) => round,
                    Err(e) => {
                        // Every process still joined after a ring failure: none was lost (or the
                        // coordinator has not noticed yet; then the next formation fails on it).
                        let all_joined = is_ring_failure(&e) && ranked(job.workers())? == g.names;
                        if !all_joined {
                            fallback.reset();
                        } else if fallback.ring_failed_all_joined() {
                            tracing::warn!(
                                step,
                                attempts = RING_FAILURES_BEFORE_RELAY,
                                processes = ?g.names,
                                error = %e,
                                "the workers cannot reach each other over the ring (its last attempts failed with every process still joined): for the rest of the run the router gradients go through the coordinator"
                            );
                        }
                        ring = None;
                        retry(e, step, &mut failures, exchange)?;
                        continue;
                    }
                };
                fallback.reset();
                failures = 0;
                drawn = None;
                round_seconds += round.summary.elapsed.as_secs_f64();
                let (loss, relayed) = match exchange {
                    Exchange::Ring => {
                        let results: Vec<BlockResult> = round
                            .results
                            .iter()
                            .map(|r| fusion_cluster::codec::decode(r))
                            .collect::<std::result::Result<_, _>>()?;
                        compute_seconds += results.iter().map(|r| r.compute_seconds).fold(0.0, f64::max);
                        // The rank that reached the reduction last waited for nobody: its time
                        // is the reduction's own (the others' include waiting for slower ranks).
                        let reduce = results.iter().map(|r| r.reduce_seconds).fold(f64::INFINITY, f64::min);
                        reduce_seconds += if reduce.is_finite() { reduce } else { 0.0 };
                        (results.iter().flat_map(|r| &r.losses).map(|&l| l as f64).sum::<f64>(), None)
                    }
                    Exchange::Coordinator => {
                        let results: Vec<StepResult> = round
                            .results
                            .iter()
                            .map(|r| fusion_cluster::codec::decode(r))
                            .collect::<std::result::Result<_, _>>()?;
                        if results.len() != n_items {
                            bail!("step {step}: {} results for {n_items} items", results.len());
                        }
                        compute_seconds += data_parallel::blocks(results.len(), g.names.len())
                            .into_iter()
                            .map(|range| results[range].iter().map(|r| r.seconds).sum::<f64>())
                            .fold(0.0, f64::max);
                        let started = std::time::Instant::now();
                        let sum = data_parallel::relay_sum(&results, floats)
                            .with_context(|| format!("step {step}: relaying the gradients"))?;
                        reduce_seconds += started.elapsed().as_secs_f64();
                        (results.iter().map(|r| r.loss as f64).sum::<f64>(), Some(sum))
                    }
                };
                let mut guard = latest.lock().unwrap_or_else(|e| e.into_inner());
                let b = &mut *guard;
                let grads = match &relayed {
                    Some(sum) => unflatten(sum, &b.params)?,
                    None => {
                        let held = pending.lock().unwrap_or_else(|e| e.into_inner());
                        match held.as_ref() {
                            Some((s, sum)) if *s == step => unflatten(sum, &b.params)?,
                            _ => bail!("step {step}: this process holds no summed gradient of it"),
                        }
                    }
                };
                for ((p, a), g) in b.params.iter_mut().zip(&mut b.adams).zip(&grads) {
                    a.step(p, g);
                }
                step += 1;
                losses.push(loss);
                b.meta = Meta {
                    run: key.clone(),
                    step,
                    loaders: loaders.clone(),
                    seed,
                    adam_steps: b.adams.first().map_or(0, Adam::steps),
                    losses: losses.clone(),
                };
                let due = step % c.checkpoint_every_steps == 0 || last_save.elapsed() >= every || step == c.max_steps;
                if let (Some(file), true) = (&state_file, due) {
                    save_state(file, &b.meta, &b.params, &b.adams)?;
                    last_save = std::time::Instant::now();
                }
                // After the last step too: the workers keep the trained routers and go on to
                // evaluate the trained model.
                let commit = match relayed {
                    Some(sum) => RouterBroadcast::CommitSum { step, sum },
                    None => RouterBroadcast::Commit { step },
                };
                job.broadcast(fusion_cluster::codec::encode(&commit)?)
                    .context("committing the step on the workers")?;
                drop(guard);
                bar.set_message(format!("loss {loss:.4}"));
                bar.inc(1);
                tracing::debug!(step, loss, %exchange, "step");
            }
            let done = (step - first).max(1) as f64;
            tracing::info!(
                steps = step - first,
                seconds = started.elapsed().as_secs_f64(),
                seconds_per_step = started.elapsed().as_secs_f64() / done,
                round_seconds,
                compute_seconds,
                reduce_seconds,
                reduce_seconds_per_step = reduce_seconds / done,
                generations = generation,
                exchange = %fallback.exchange(),
                exchange_share = if round_seconds > 0.0 { (1.0 - compute_seconds / round_seconds).max(0.0) } else { 0.0 },
                "test-time adaptation loop"
            );
            // Every worker joined now but this process's own executor.
            let remote = job.workers().len().saturating_sub(1);
            Ok(remote)
        },
    )
    .context("test-time adaptation")?;
    let remote = outcome?;
    drop(watching);
    drop(signals);
    let params = std::mem::take(&mut latest.lock().unwrap_or_else(|e| e.into_inner()).params);
    bar.finish_and_clear();
    tracing::info!(rounds = summary.rounds.len(), workers = ?summary.per_worker, lost = summary.lost.len(), "test-time adaptation done");
    Ok((with_routers(map, &params, c.shared_gate), remote))
}

/// `map` with its router tensors replaced by `params` (state-dict order; a shared router once).
pub fn with_routers(map: WeightMap, params: &[Tensor], shared: bool) -> WeightMap {
    let mut out = WeightMap::new();
    let mut next = params.iter();
    let mut by_suffix: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in map.iter() {
        match name.split_once(".mlp.gate.") {
            Some((_, rest)) => {
                let p = match by_suffix.get(rest).filter(|_| shared) {
                    Some(p) => p.shallow_clone(),
                    None => {
                        let p = next.next().expect("one parameter per router tensor").detach();
                        by_suffix.insert(rest.to_string(), p.shallow_clone());
                        p
                    }
                };
                out.insert(name, p);
            }
            None => out.insert(name, t.shallow_clone()),
        }
    }
    out
}

/// A worker's side of the router training (`--join`): computes the items the coordinator hands
/// out, with the routers it broadcasts, until it releases this worker. Returns the trained
/// routers (state-dict order, on the CPU) when the job's last broadcast was those of the last
/// step, as a finished training's is; `None` when the job ended otherwise.
pub fn work(
    c: &WeMoeConfig,
    ctx: &RunContext<'_>,
    map: WeightMap,
    coordinator: std::net::SocketAddr,
) -> Result<Option<Vec<Tensor>>> {
    let set = tasks(c, ctx)?;
    let cfg = AdamConfig::with_lr(c.lr);
    let executor =
        RouterExecutor::new(set, map, c.shared_gate, options(c), ctx.pool.config(), cfg)?;
    let floats: usize = executor.leaves().iter().map(|t| t.numel()).sum();
    // The executor updates its routers in place: these views see the last state it took.
    let routers: Vec<Tensor> = executor.leaves().iter().map(Tensor::shallow_clone).collect();
    let last_step = executor.step_seen();
    let name = ctx.launch.worker_name();
    let opts = cluster_options(ctx.launch.options_for(ctx.program), floats);
    let executor = executor.with_ring(&name, opts.clone(), Some(coordinator));
    let summary =
        fusion_cluster::runtime::run_worker(coordinator, &name, Box::new(executor), &opts)
            .with_context(|| {
                format!("test-time adaptation: worker `{name}` of the coordinator at {coordinator}")
            })?;
    let step = last_step.load(std::sync::atomic::Ordering::SeqCst);
    tracing::info!(items = summary.executed, last_step = step, "test-time adaptation: worker done");
    if step != c.max_steps {
        return Ok(None);
    }
    let _guard = tch::no_grad_guard();
    Ok(Some(routers.iter().map(|t| t.detach().to_device(tch::Device::Cpu).copy()).collect()))
}
