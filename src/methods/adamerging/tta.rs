//! AdaMerging's test-time adaptation loop (FusionBench's `test_time_adaptation`): per step, one
//! shuffled test batch per task under the step's θ(λ), the tasks' λ-gradients summed in task
//! order, one Adam update; λ, Adam's moments, the step and every loader's state are checkpointed
//! so that the same command, restarted, resumes where it stopped.

use super::merge::Inputs;
use super::step::{StepExecutor, StepItem, StepResult};
use super::AdaMergingConfig;
use crate::config::ProgramConfig;
use crate::methods::RunContext;
use crate::tasks::set::TaskSet;
use crate::tta::adam::{Adam, AdamConfig, AdamState};
use crate::tta::loaders::Loaders;
use crate::tta::sharded::ShardedLoaders;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

/// The log directory of a training run, as FusionBench's TensorBoard logger makes it
/// (Lightning's rules, [`crate::report::metrics_log::resolve_log_dir`]): `fabric.loggers.root_dir`
/// (default `path.log_dir`), then `name` and `version` when not empty; a null `version` is the
/// next free `version_N`.
pub fn log_dir(program: &ProgramConfig) -> PathBuf {
    use crate::report::metrics_log::{resolve_log_dir, LogVersion};
    let l = &program.fabric.loggers;
    let root = l
        .root_dir
        .clone()
        .or_else(|| program.path.log_dir.clone())
        .unwrap_or_else(|| "outputs/logs".into());
    let version = match l.version.as_deref() {
        None => LogVersion::Next,
        Some(v) => v.parse::<i64>().map(LogVersion::Number).unwrap_or(LogVersion::Named(v.into())),
    };
    resolve_log_dir(Path::new(&root), l.name.as_deref(), &version)
}

/// What a checkpoint of the loop holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// What run this is (config and inputs); a checkpoint of another run is refused.
    run: String,
    step: u64,
    lambda: Vec<f32>,
    adam: AdamState,
    loaders: Loaders,
    /// Each rank's loaders when the run has several devices (FusionBench's DDP batches).
    #[serde(default)]
    sharded: Option<ShardedLoaders>,
    seed: u64,
    /// Every step's logged scalars (`train/loss`, `train/weight_{max,min,mean}`) so far: a
    /// resumed run's `metrics.csv`, event file and loss plot hold the whole run.
    #[serde(default)]
    history: Vec<[f64; 4]>,
}

/// The names of [`State::history`]'s columns, as FusionBench logs them.
const LOGGED: [&str; 4] =
    ["train/loss", "train/weight_max", "train/weight_min", "train/weight_mean"];

/// The seed of the shuffles: the program's `seed`, else a fresh one (logged, so the run can be
/// repeated; a checkpoint keeps it, so a resumed unseeded run goes on with its own).
pub(crate) fn seed_of(program: &ProgramConfig) -> u64 {
    program.seed.unwrap_or_else(|| {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 ^ (std::process::id() as u64) << 32)
            .unwrap_or(0)
            % (1 << 31);
        tracing::info!(
            seed = s,
            "no `seed` given: shuffling with a fresh one (pass seed={s} to repeat this run)"
        );
        s
    })
}

/// The task set AdaMerging adapts on: the pool's `test_datasets` in model order, heads from
/// `_pretrained_`, FusionBench's `CLIPClassificationMixin`.
pub(super) fn task_set(ctx: &RunContext<'_>, inputs: &Inputs) -> Result<TaskSet> {
    let names: Vec<&str> = inputs.models.iter().map(|m| m.name()).collect();
    test_time_tasks(ctx, &names, "adamerging")
}

/// The task set a test-time adaptation adapts on: each model's test split (from
/// `modelpool.test_datasets`), its zero-shot head, decoded images cached. `method` names the
/// method in errors.
pub(crate) fn test_time_tasks(
    ctx: &RunContext<'_>,
    models: &[&str],
    method: &str,
) -> Result<TaskSet> {
    crate::methods::pool_tasks::pool_tasks(
        ctx,
        models,
        crate::methods::pool_tasks::PoolSplit::Test,
        method,
        true,
    )
}

/// A fingerprint of what determines the trajectory: λ's shape and start, the optimiser, the
/// batches (`seed` as configured, sizes) and the models and datasets by path. `max_steps` is
/// not part of it: a longer run goes on from a shorter one's checkpoint.
fn run_key(
    c: &AdaMergingConfig,
    set: &TaskSet,
    program: &ProgramConfig,
    replicas: usize,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "{:?}|{}|{}|{}|{}|{:?}|{}|{replicas}",
        c.granularity,
        c.lr,
        c.init_values,
        c.clamp_weights,
        c.batch_size,
        program.seed,
        crate::version::NUMERICS_VERSION
    ));
    for (name, m) in &program.modelpool.models {
        h.update(format!("{name}={}|", m.path));
    }
    for t in &set.tasks {
        h.update(format!("{}|{}|{:x}", t.name, t.data.len(), t.data.fingerprint()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the adaptation and returns the final λ (flattened) and how many remote workers were
/// joined at its end: each got the final λ as the job's last broadcast ([`super::worker::Final`])
/// and goes on to evaluate the merged model.
pub fn adapt(
    c: &AdaMergingConfig,
    inputs: &Arc<Inputs>,
    ctx: &RunContext<'_>,
    log_dir: &Path,
) -> Result<(Vec<f32>, usize)> {
    let set = task_set(ctx, inputs)?;
    tracing::debug!(rss = ?crate::device::resident_mib(), "task set loaded");
    let shape = c.granularity.shape(inputs.tasks(), inputs.params());
    let shape_i64: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let lens: Vec<usize> = set.tasks.iter().map(|t| t.data.len()).collect();
    let hidden = ctx.pool.config().encoder.hidden_size as usize;
    let skip = crate::tta::loaders::fusionbench_draws_before_tta(inputs.tasks(), hidden)
        .unwrap_or_else(|| {
            tracing::warn!(
                hidden,
                "hidden size below 16: the shuffles do not replay FusionBench's"
            );
            0
        });
    let devices = chosen_devices(ctx)?;
    let replicas = devices.len();
    let key = run_key(c, &set, ctx.program, replicas);
    let state_file = ctx
        .program
        .path
        .cache_dir
        .as_ref()
        .map(|d| PathBuf::from(d).join("tta").join(format!("adamerging-{}.json", &key[..32])));
    let adam_cfg = AdamConfig::with_lr(c.lr);
    let resumed = match &state_file {
        Some(file) => resume(file, &key, c, adam_cfg, &shape_i64)?,
        None => None,
    };
    let (mut step, mut lambda, mut adam, mut loaders, mut sharded, seed, history) = match resumed {
        Some((s, adam)) => (s.step, s.lambda, adam, s.loaders, s.sharded, s.seed, s.history),
        None => {
            let seed = seed_of(ctx.program);
            let n: usize = shape.iter().product();
            let loaders = Loaders::new(seed, skip, &lens, c.batch_size);
            // Several devices: FusionBench's DDP batches, `batch_size` per rank, shuffled with
            // `PL_GLOBAL_SEED` (the configured seed, else 0).
            let sharded = (replicas > 1).then(|| {
                ShardedLoaders::new(ctx.program.seed.unwrap_or(0), replicas, &lens, c.batch_size)
            });
            let adam = Adam::new(adam_cfg, &shape_i64);
            (0, vec![c.init_values; n], adam, loaders, sharded, seed, Vec::new())
        }
    };
    let names = set.names();
    let local = executors(c, inputs, ctx, set, &devices)?;
    // A worker may hold two batches of the items its executor projects in one pass (the same
    // on every process: the model's size decides it), so one dispatch can hand it a step's
    // items together; items go one per worker in turn, so several workers still share a step.
    let batch = local.first().map_or(1, StepExecutor::batch_limit);
    let local: Vec<Box<dyn fusion_cluster::runtime::Executor>> = local
        .into_iter()
        .map(|e| Box::new(e) as Box<dyn fusion_cluster::runtime::Executor>)
        .collect();
    let bar = crate::progress::bar("adamerging", c.max_steps as usize, "steps");
    bar.inc(step);
    let every_steps = c.checkpoint_every_steps;
    let every = std::time::Duration::from_secs_f64(c.checkpoint_every_seconds);
    let mut last_save = std::time::Instant::now();
    let mut param = Tensor::from_slice(&lambda).view(shape_i64.as_slice());
    // Held until the adaptation ends: a signal after it (during evaluation, say) is handled by
    // whatever holds one then, a sweep, or else ends the process (`crate::signals`).
    let signals = crate::signals::StopSignals::install()?;
    let stop = signals.flag();
    // The state at the last step boundary. On SIGTERM/SIGUSR2 a watcher writes it and ends the
    // process at once, rather than after the step under way (an L/14 step can outlast a
    // cluster's KillWait, and the steps since the last periodic checkpoint would be lost).
    let latest = Arc::new(std::sync::Mutex::new(State {
        run: key.clone(),
        step,
        lambda: lambda.clone(),
        adam: adam.state(),
        loaders: loaders.clone(),
        sharded: sharded.clone(),
        seed,
        history: history.clone(),
    }));
    let _watching = {
        let latest = latest.clone();
        crate::tta::stop::watch(stop.clone(), state_file.clone(), c.max_steps, move |file| {
            let state = latest.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = file {
                write_state(f, &state)?;
            }
            let step = state.step;
            // Held until the process ends: the loop cannot move the state on meanwhile.
            std::mem::forget(state);
            Ok(step)
        })
    };
    let mut trace = Vec::new();
    // FusionBench's per-step scalars (`train/loss` is the last task's loss), as TensorBoard
    // events and Lightning's metrics.csv in the logger's directory.
    let mut metrics = crate::report::metrics_log::MetricsLogger::new(log_dir)
        .with_context(|| format!("opening the training logs in {}", log_dir.display()))?;
    let mut losses: Vec<(i64, f64)> = Vec::new();
    // A resumed run's earlier steps, logged again: the logs then hold the whole run.
    for (i, row) in history.iter().enumerate() {
        let logged: Vec<(&str, f64)> = LOGGED.iter().copied().zip(row.iter().copied()).collect();
        metrics.log(i as i64, &logged)?;
        losses.push((i as i64, row[0]));
    }
    let mut history = history;
    // Wall time of the rounds, and of computing their items (per busy worker): the rest is
    // exchange (encoding, transport, scheduling, waiting on the slowest worker).
    let (mut round_seconds, mut compute_seconds) = (0f64, 0f64);
    let started = std::time::Instant::now();
    let first_step = step;
    tracing::info!(tasks = ?names, shape = ?shape, steps = c.max_steps, batch_size = c.batch_size, seed, log_dir = %log_dir.display(), "test-time adaptation");
    let (listen, mut options) = match ctx.launch.serve_addr() {
        Some(addr) => (Some(addr), ctx.launch.options_for(ctx.program)),
        None => (None, fusion_cluster::runtime::ClusterOptions::new("local", std::env::temp_dir())),
    };
    options.in_flight_per_worker = options.in_flight_per_worker.max(2 * batch);
    let job_name = options.job_id.clone();
    let (outcome, summary) = fusion_cluster::runtime::run_job(
        local,
        listen,
        &options,
        |addr| {
            crate::launch::Launch::remember_bound(addr);
            tracing::info!(%addr, job = %job_name, "coordinator listening: workers join with --join")
        },
        |job| -> Result<(Vec<f32>, usize)> {
    while step < c.max_steps {
        // One item per task, or per task and rank (task-major) with several devices.
        let items: Vec<StepItem> = (0..names.len())
            .flat_map(|t| {
                let batches = match sharded.as_mut() {
                    Some(s) => s.next_batches(t),
                    None => vec![loaders.next_batch(t).indices],
                };
                batches.into_iter().map(move |b| (t, b))
            })
            .map(|(t, b)| StepItem {
                step,
                task: t as u32,
                indices: b.iter().map(|&i| i as u32).collect(),
                lambda: lambda.clone(),
            })
            .collect();
        let encoded = items
            .iter()
            .map(fusion_cluster::codec::encode)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let round = job.round(encoded).with_context(|| format!("step {step}"))?;
        let busy = round.summary.per_worker.iter().filter(|(_, n)| *n > 0).count().max(1);
        round_seconds += round.summary.elapsed.as_secs_f64();
        let results: Vec<StepResult> = round
            .results
            .iter()
            .map(|r| fusion_cluster::codec::decode(r))
            .collect::<std::result::Result<_, _>>()?;
        compute_seconds += results.iter().map(|r| r.seconds).sum::<f64>() / busy as f64;
        let grad = fold_gradients(&results, replicas);
        adam.step(&mut param, &Tensor::from_slice(&grad).view(shape_i64.as_slice()));
        lambda = super::merge::values_of(&param);
        if c.trace_path.is_some() {
            let tasks: Vec<serde_json::Value> = items
                .iter()
                .zip(&results)
                .enumerate()
                .map(|(i, (it, r))| {
                    let mut v = serde_json::json!({"task": names[it.task as usize], "indices": it.indices, "loss": r.loss});
                    if replicas > 1 {
                        v["rank"] = serde_json::json!(i % replicas);
                    }
                    v
                })
                .collect();
            trace.push(serde_json::json!({"step": step, "tasks": tasks, "lambda": lambda}));
        }
        step += 1;
        // FusionBench logs rank 0's loss of the last task.
        let loss = results.len().checked_sub(replicas).map_or(0.0, |i| results[i].loss);
        let (lo, hi) = lambda.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let mean = lambda.iter().map(|&v| v as f64).sum::<f64>() / lambda.len() as f64;
        bar.set_message(format!("loss {loss:.4} λ [{lo:.4}, {hi:.4}]"));
        bar.inc(1);
        tracing::debug!(step, loss, weight_min = lo, weight_max = hi, weight_mean = mean, "step");
        let row = [loss as f64, hi as f64, lo as f64, (mean as f32) as f64];
        let logged: Vec<(&str, f64)> = LOGGED.iter().copied().zip(row).collect();
        metrics.log(step as i64 - 1, &logged)?;
        history.push(row);
        losses.push((step as i64 - 1, loss as f64));
        let due = step % every_steps == 0 || last_save.elapsed() >= every || step == c.max_steps;
        {
            let mut state = latest.lock().unwrap_or_else(|e| e.into_inner());
            *state = State {
                run: key.clone(),
                step,
                lambda: lambda.clone(),
                adam: adam.state(),
                loaders: loaders.clone(),
                sharded: sharded.clone(),
                seed,
                history: history.clone(),
            };
            if let (Some(file), true) = (&state_file, due) {
                write_state(file, &state)?;
                metrics.save()?;
                last_save = std::time::Instant::now();
            }
        }
    }
    bar.finish_and_clear();
    let steps = (step - first_step).max(1) as f64;
    tracing::info!(
        steps = step - first_step,
        seconds = started.elapsed().as_secs_f64(),
        seconds_per_step = started.elapsed().as_secs_f64() / steps,
        round_seconds,
        compute_seconds,
        exchange_share = if round_seconds > 0.0 { (1.0 - compute_seconds / round_seconds).max(0.0) } else { 0.0 },
        "test-time adaptation loop"
    );
    // The remote workers evaluate the merged model too: they get the final λ before `Done`.
    let mut remote = 0;
    if listen.is_some() {
        let last = super::worker::Final { step, lambda: lambda.clone() };
        job.broadcast(fusion_cluster::codec::encode(&last)?)
            .context("sending the final λ to the workers")?;
        remote = job.workers().len().saturating_sub(replicas);
    }
    Ok((lambda.clone(), remote))
        },
    )
    .context("test-time adaptation")?;
    let (lambda, remote) = outcome?;
    tracing::info!(rounds = summary.rounds.len(), workers = ?summary.per_worker, lost = summary.lost.len(), "test-time adaptation done");
    metrics.finish()?;
    if !losses.is_empty() {
        let (steps, values): (Vec<i64>, Vec<f64>) = losses.into_iter().unzip();
        let png = log_dir.join("train_loss.png");
        crate::report::plot::plot_loss(
            &png,
            &steps,
            &values,
            "adamerging: entropy of the last task",
        )?;
    }
    if c.granularity == super::Granularity::LayerWise {
        let png = log_dir.join("merging_weights.png");
        crate::report::heatmap::plot_lambda_heatmap(
            &png,
            &names,
            inputs.params(),
            &lambda,
            "layer-wise adamerging: lambda",
        )?;
    }
    if let Some(path) = &c.trace_path {
        let doc = serde_json::json!({
            "format": "fusionbench-adamerging-trace/1",
            "producer": "fusion_bench (Rust)",
            "flavour": match c.granularity { super::Granularity::TaskWise => "task_wise", super::Granularity::LayerWise => "layer_wise" },
            "tasks": names,
            "lambda_shape": shape,
            "lambda_init": c.init_values,
            "seed": seed,
            "steps": trace,
            "lambda_final": lambda,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::report::write_atomic(path, &serde_json::to_vec(&doc)?)?;
    }
    Ok((lambda, remote))
}

/// The checkpoint in `file`, if any, restored: `None` when there is none, or when it is a
/// shorter-lived state of a longer run than this one (it is then started afresh, with a
/// warning). A file that cannot be read, or that another configuration wrote, is an error
/// naming it: resuming the wrong state would silently give another run's result.
fn resume(
    file: &Path,
    key: &str,
    c: &AdaMergingConfig,
    adam_cfg: AdamConfig,
    shape: &[i64],
) -> Result<Option<(State, Adam)>> {
    let remedy = "remove it to start the adaptation afresh";
    let s = match read_state(file) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "the test-time adaptation checkpoint {} is unreadable; {remedy}",
                    file.display()
                )
            })
        }
    };
    if s.run != key {
        bail!(
            "the test-time adaptation checkpoint {} is of another configuration (run {}, this one {}); {remedy}",
            file.display(),
            &s.run[..s.run.len().min(16)],
            &key[..16]
        );
    }
    let n: i64 = shape.iter().product();
    let adam = Adam::restore(adam_cfg, shape, &s.adam)
        .filter(|_| s.lambda.len() as i64 == n && s.loaders.len() == tasks_of(shape))
        .with_context(|| {
            format!(
                "the test-time adaptation checkpoint {} does not fit λ of shape {shape:?}; {remedy}",
                file.display()
            )
        })?;
    if s.step > c.max_steps {
        tracing::warn!(
            file = %file.display(),
            step = s.step,
            max_steps = c.max_steps,
            "the checkpoint is of a longer run than max_steps: starting afresh (it will be overwritten)"
        );
        return Ok(None);
    }
    tracing::info!(step = s.step, file = %file.display(), "resuming test-time adaptation from its checkpoint");
    Ok(Some((s, adam)))
}

/// `λ.grad` after one step: the tasks' gradients accumulated in task order (float32), as
/// FusionBench's per-task `backward()` does. With `replicas` ranks (items task-major, rank-minor)
/// each task's gradient is DDP's average, every rank's share divided by the world size before
/// the sum (its default all-reduce hook), summed in rank order.
fn fold_gradients(results: &[StepResult], replicas: usize) -> Vec<f32> {
    let replicas = replicas.max(1);
    let mut grad: Vec<f32> = Vec::new();
    for task in results.chunks(replicas) {
        let mut g = task[0].grad.clone();
        if replicas > 1 {
            let n = replicas as f32;
            g.iter_mut().for_each(|x| *x /= n);
            for r in &task[1..] {
                for (a, x) in g.iter_mut().zip(&r.grad) {
                    *a += x / n;
                }
            }
        }
        if grad.is_empty() {
            grad = g;
        } else {
            for (a, x) in grad.iter_mut().zip(&g) {
                *a += x;
            }
        }
    }
    grad
}

/// The number of tasks of a λ shape (`[T]` or `[T, P]`).
fn tasks_of(shape: &[i64]) -> usize {
    shape.first().copied().unwrap_or(0) as usize
}

fn read_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_state(path: &Path, state: &State) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::report::write_atomic(path, &serde_json::to_vec(state)?)
}

/// The devices of `fabric.devices` on `fabric.accelerator`.
pub(super) fn chosen_devices(ctx: &RunContext<'_>) -> Result<Vec<tch::Device>> {
    let accelerator = ctx.program.fabric.accelerator.parse()?;
    let devices = crate::device::Devices::from_node(&ctx.program.fabric.devices)?;
    Ok(crate::device::select_all(accelerator, &devices)?)
}

/// One step executor per device of `fabric.devices` (`fabric.accelerator`), sharing the task
/// set's data and the mapped checkpoints. Every executor computes an item the same way, so
/// where an item runs changes nothing (CPU executors keep this process's intra-op thread
/// count). The number of devices does change the batches, as in FusionBench's DDP: each rank
/// draws its own `DistributedSampler` shard ([`ShardedLoaders`]).
pub(super) fn executors(
    c: &AdaMergingConfig,
    inputs: &Arc<Inputs>,
    ctx: &RunContext<'_>,
    set: TaskSet,
    chosen: &[tch::Device],
) -> Result<Vec<StepExecutor>> {
    let mut out = Vec::with_capacity(chosen.len());
    let config = ctx.pool.config().clone();
    for &d in &chosen[1..] {
        let set = set.replicate(d)?;
        out.push(StepExecutor::new(
            inputs.clone(),
            set,
            config.clone(),
            c.granularity,
            c.clamp_weights,
        ));
    }
    let first = if chosen[0] == set.device { set } else { set.replicate(chosen[0])? };
    out.insert(0, StepExecutor::new(inputs.clone(), first, config, c.granularity, c.clamp_weights));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(grad: &[f32]) -> StepResult {
        StepResult { loss: 0.0, grad: grad.to_vec(), seconds: 0.0 }
    }

    #[test]
    fn gradients_add_over_tasks_and_average_over_ranks() {
        let one = [result(&[1.0, 2.0]), result(&[0.5, -1.0])];
        assert_eq!(fold_gradients(&one, 1), vec![1.5, 1.0]);
        // Two tasks on two ranks, task-major: each task's mean over its ranks, then the sum.
        let two =
            [result(&[1.0, 2.0]), result(&[3.0, 4.0]), result(&[0.5, 0.0]), result(&[1.5, 2.0])];
        assert_eq!(fold_gradients(&two, 2), vec![2.0 + 1.0, 3.0 + 1.0]);
    }
}
