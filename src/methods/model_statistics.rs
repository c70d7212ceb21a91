//! Per-model statistics as reusable artefacts, and as a cluster job: the data-dependent merges
//! (Fisher merging's diagonals, RegMean's Gram matrices) compute one model's statistics from its
//! task's training split, keep them in `path.cache_dir` as safetensors keyed by what they depend
//! on, and on a cluster (`--serve`/`--join`, `srun`) hand out one work item per model. The worker
//! that computes a model writes its file into the shared cache (atomically) and returns only how
//! many images it saw; a lost worker costs only the model it was computing (re-queued; the
//! statistics are deterministic, so whoever computes them writes the same bytes). Every process
//! then reads the statistics from the cache and merges the same model, and the workers join its
//! evaluation.

use super::{Checkpoint, RunContext};
use anyhow::{bail, Context, Result};
use fusion_cluster::runtime::Executor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One method's per-model statistics, computable model by model into their cache files.
pub(crate) trait ModelStatistics: Send + 'static {
    /// Computes model `t`'s statistics into its cache file (unless it is there already):
    /// the images seen, `None` when the cache already held them.
    fn compute_cached(&self, t: usize) -> Result<Option<usize>>;
}

/// One model's statistics to compute (its index in the pool's fine-tuned models).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    model: u32,
}

/// What computing an item gave: the images seen (`None`: the cache already held it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    images: Option<u64>,
}

struct StatisticsExecutor<S>(S);

impl<S: ModelStatistics> Executor for StatisticsExecutor<S> {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: Item = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let images = self.0.compute_cached(item.model as usize).map_err(|e| format!("{e:#}"))?;
        fusion_cluster::codec::encode(&Done { images: images.map(|n| n as u64) })
            .map_err(|e| e.to_string())
    }
}

/// Runs the statistics job of `models` models (`what` names it in logs and errors): as the
/// coordinator (computing too) when this process serves, as a worker when it joins. Returns, on
/// the coordinator, how many remote workers were joined at the end (they go on to evaluate the
/// merged model); 0 on a worker.
pub(crate) fn compute_on_cluster<S: ModelStatistics>(
    ctx: &RunContext<'_>,
    what: &str,
    models: usize,
    statistics: S,
) -> Result<usize> {
    let executor = Box::new(StatisticsExecutor(statistics));
    if let Some(addr) = ctx.launch.join {
        let name = ctx.launch.worker_name();
        let summary = fusion_cluster::runtime::run_worker(
            addr,
            &name,
            executor,
            &ctx.launch.options_for(ctx.program),
        )
        .with_context(|| format!("{what}: worker `{name}` of the coordinator at {addr}"))?;
        tracing::info!(items = summary.executed, "{what}: worker done");
        return Ok(0);
    }
    let Some(listen) = ctx.launch.serve_addr() else {
        bail!("the {what} job runs only with --serve or --join");
    };
    let options = ctx.launch.options_for(ctx.program);
    let job_name = options.job_id.clone();
    let bar = crate::progress::bar(what, models, "models");
    let (outcome, summary) = fusion_cluster::runtime::run_job(
        vec![executor],
        Some(listen),
        &options,
        |addr| {
            crate::launch::Launch::remember_bound(addr);
            tracing::info!(%addr, job = %job_name, "coordinator listening: workers join with --join")
        },
        |job| -> Result<usize> {
            let items = (0..models as u32)
                .map(|model| fusion_cluster::codec::encode(&Item { model }))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let round = job.round(items).with_context(|| what.to_string())?;
            for r in &round.results {
                let _: Done = fusion_cluster::codec::decode(r)?;
                bar.inc(1);
            }
            Ok(job.workers().len().saturating_sub(1))
        },
    )
    .with_context(|| what.to_string())?;
    bar.finish_and_clear();
    let remote = outcome?;
    tracing::info!(workers = ?summary.per_worker, lost = summary.lost.len(), "{what} done");
    Ok(remote)
}

/// Feeds a checkpoint's content identity into a cache key: the SHA-256 of each of its files
/// (free for a hub snapshot, whose links name their blobs' hashes; for a local folder read once
/// and remembered under `cache_dir/content_hashes`), not its path, so that nodes holding the same
/// models at different paths agree on the key. `None` when a file cannot be read (then the
/// statistics are not cached).
pub(crate) fn hash_checkpoint(
    h: &mut Sha256,
    model: &Checkpoint,
    cache_dir: &std::path::Path,
) -> Option<()> {
    use crate::hub::identity::{identify_dir, HashCache};
    let hashes = HashCache::new(Some(cache_dir.join("content_hashes")));
    let identity = identify_dir(model.name(), model.dir(), &hashes).ok()?;
    h.update(format!("|{}|{}", identity.digest, identity.files));
    Some(())
}

/// `<dir>/<model>-<first 12 bytes of the key, hex>.safetensors`, the model's name made safe for
/// a file name.
pub(crate) fn cache_path(dir: &std::path::Path, model: &str, key: Sha256) -> std::path::PathBuf {
    let key: String = key.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let safe: String = model
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    dir.join(format!("{safe}-{key}.safetensors"))
}

/// A cached statistics file (`what`: `Fisher`, `RegMean Grams`) holding the tensors `names`, in
/// that order: `None` when the file is missing; an error naming the file when it is unreadable or
/// lacks a tensor (remove it to recompute).
pub(crate) fn read_cached(
    file: &std::path::Path,
    names: &[String],
    what: &str,
) -> Result<Option<Vec<tch::Tensor>>> {
    use crate::weights::WeightSource;
    if !file.exists() {
        return Ok(None);
    }
    let shown = file.display();
    let f = crate::weights::SafetensorsFile::open(file)
        .with_context(|| format!("reading the cached {what} {shown} (remove it to recompute)"))?;
    names
        .iter()
        .map(|n| {
            f.tensor(n).with_context(|| {
                format!("the cached {what} {shown} has no tensor `{n}` (remove it to recompute)")
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Writes a model's statistics (`what`) to `file` atomically, with the images they saw in the
/// metadata.
pub(crate) fn write_cached(
    file: &std::path::Path,
    names: &[String],
    tensors: &[tch::Tensor],
    seen: usize,
    what: &str,
) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut map = crate::weights::WeightMap::new();
    for (n, t) in names.iter().zip(tensors) {
        map.insert(n, t.shallow_clone());
    }
    let meta = std::collections::HashMap::from([("images".to_string(), seen.to_string())]);
    crate::weights::save_safetensors(&map, file, Some(meta))
        .with_context(|| format!("caching the {what} in {}", file.display()))
}

/// Refuses statistics (`what` of model `model`, tensors `names`) holding NaN or ±inf, naming the
/// tensor and where they came from (`file`: read from the cache), before anything is merged or
/// written: FusionBench would merge them into a NaN model without a word.
pub(crate) fn check_finite(
    what: &str,
    model: &str,
    names: &[String],
    tensors: &[tch::Tensor],
    file: Option<&std::path::Path>,
) -> Result<()> {
    for (name, t) in names.iter().zip(tensors) {
        if t.isfinite().all().int64_value(&[]) == 0 {
            let origin = match file {
                Some(f) => {
                    format!("read from the cache file {} (remove it to recompute)", f.display())
                }
                None => "as computed: the model's outputs overflow float32 on its task's images"
                    .to_string(),
            };
            bail!(
                "the {what} of model `{model}` hold NaN or infinite values in `{name}`, {origin}; nothing was merged"
            );
        }
    }
    Ok(())
}

/// A model's statistics (`what`: "Fisher", "RegMean Grams", named `names`) from its cache file
/// when there is one, or computed by `compute` (the tensors and the images they saw), checked
/// finite and written to the cache. Returns the tensors and, when computed, the images seen (a
/// split smaller than `examples`, `method.<examples_key>`, is a warning). The log lines say
/// `<what> reused from the cache` or `<what> computed`.
pub(crate) fn cached_or_computed(
    what: &str,
    examples_key: &str,
    model: &str,
    names: &[String],
    examples: usize,
    file: Option<&std::path::Path>,
    compute: impl FnOnce() -> Result<(Vec<tch::Tensor>, usize)>,
) -> Result<(Vec<tch::Tensor>, Option<usize>)> {
    if let Some(cached) = file.map(|f| read_cached(f, names, what)).transpose()?.flatten() {
        let file = file.map_or(String::new(), |f| f.display().to_string());
        tracing::info!(model, file = %file, "{what} reused from the cache");
        return Ok((cached, None));
    }
    let started = std::time::Instant::now();
    let (tensors, seen) = compute()?;
    if seen < examples {
        tracing::warn!(
            model,
            used = seen,
            asked = examples,
            "fewer training images than method.{examples_key}: all of them are used"
        );
    }
    tracing::info!(
        model,
        images = seen,
        seconds = started.elapsed().as_secs_f64(),
        "{what} computed"
    );
    check_finite(what, model, names, &tensors, None)?;
    if let Some(file) = file {
        write_cached(file, names, &tensors, seen, what)?;
    }
    Ok((tensors, Some(seen)))
}

/// What Fisher merging and RegMean read alike from `method.*`: the excluded parameter names
/// (`exclude_param_names_regex`, each anchored at the start as Python's `re.match`), the number
/// of examples per model (`examples_key`, default 256) and `dataloader_kwargs.batch_size`
/// (default 32). `dataloader_kwargs.num_workers` is accepted and unused: the images come from
/// the decoded cache.
pub(crate) struct StatisticsConfig {
    /// The excluded parameter names' patterns.
    pub exclude: Vec<fancy_regex::Regex>,
    /// Examples per model.
    pub examples: usize,
    /// Images per batch.
    pub batch_size: usize,
}

impl StatisticsConfig {
    /// Reads the shared keys of `s`; a bad pattern or a count below 1 is an error naming its key.
    pub(crate) fn read(s: &crate::config::Section, examples_key: &str) -> Result<Self> {
        let patterns = s.get::<Vec<String>>("exclude_param_names_regex")?.unwrap_or_default();
        let exclude = patterns
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(&format!("^(?:{p})")).with_context(|| {
                    format!("method.exclude_param_names_regex: `{p}` is not a regular expression")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let at_least_one = |key: &str| -> Result<usize> {
            match s.get::<i64>(key)?.unwrap_or(if key == examples_key { 256 } else { 32 }) {
                n if n >= 1 => Ok(n as usize),
                n => bail!("method.{key} must be at least 1, got {n}"),
            }
        };
        Ok(Self {
            exclude,
            examples: at_least_one(examples_key)?,
            batch_size: at_least_one("dataloader_kwargs.batch_size")?,
        })
    }

    /// Whether parameter `name` is excluded.
    pub(crate) fn excluded(exclude: &[fancy_regex::Regex], name: &str) -> bool {
        exclude.iter().any(|r| r.is_match(name).unwrap_or(false))
    }
}
