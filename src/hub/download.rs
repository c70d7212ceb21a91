//! Filling the hub cache from the network (feature `download`), for `fusion_bench --prefetch`.
//!
//! On a login node with internet, [`prefetch`] downloads the files FusionBench reads from each
//! model and dataset repository into the cache [`super::Hub`] resolves offline afterwards (the
//! layout `huggingface_hub` writes). It uses hf-hub's snapshot download, so `HF_ENDPOINT` and
//! `HF_TOKEN` (or `HF_TOKEN_PATH`, `$HF_HOME/token`) work as they do for hf-hub.

use super::legacy_dataset_redirect;
use crate::config::program::ProgramConfig;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Files taken from a model repository: the config, safetensors weights (and their index), the
/// image processor and the tokenizer. PyTorch `.bin`, Flax and TF weights are skipped.
pub const MODEL_PATTERNS: &[&str] = &[
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
];

/// Files taken from a dataset repository: the card and the parquet shards.
pub const DATASET_PATTERNS: &[&str] = &["README.md", "*.parquet"];

/// Whether `HF_HUB_OFFLINE` asks for no network (`1`, `true`, `yes`, `on`, any case).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
    })
}

/// True for ids that name a local path rather than a hub repository.
fn is_local(id: &str) -> bool {
    id.starts_with('/') || id.starts_with('.') || id.starts_with('~') || Path::new(id).is_dir()
}

fn push_unique(out: &mut Vec<String>, id: &str) {
    let id = id.trim();
    if id.is_empty() || is_local(id) {
        return;
    }
    if !out.iter().any(|x| x == id) {
        out.push(id.to_string());
    }
}

/// The hub repositories a composed config reads: `(models, datasets)`, each in config order
/// without duplicates. Models: every `modelpool.models` entry, the model pool's processor and the
/// task pool's base model, CLIP model and processor. Datasets: the `path` of every model-pool
/// train/val/test dataset and task-pool test dataset, with legacy ids (`mnist`) mapped to the
/// repositories the hub redirects them to (`ylecun/mnist`). Local paths are left out.
pub fn config_repos(cfg: &ProgramConfig) -> (Vec<String>, Vec<String>) {
    let mut models = Vec::new();
    let mut datasets = Vec::new();
    let mp = &cfg.modelpool;
    for (_, spec) in &mp.models {
        push_unique(&mut models, &spec.path);
    }
    if let Some(p) = &mp.processor {
        push_unique(&mut models, &p.path);
    }
    let mut pool_datasets: Vec<&str> = [&mp.train_datasets, &mp.val_datasets, &mp.test_datasets]
        .into_iter()
        .flatten()
        .flatten()
        .map(|(_, d)| d.path.as_str())
        .collect();
    if let Some(tp) = &cfg.taskpool {
        if let Some(b) = &tp.base_model {
            push_unique(&mut models, b);
        }
        if let Some(m) = &tp.clip_model {
            push_unique(&mut models, &m.path);
        }
        if let Some(p) = &tp.processor {
            push_unique(&mut models, &p.path);
        }
        pool_datasets.extend(tp.test_datasets.iter().map(|(_, d)| d.path.as_str()));
    }
    for id in pool_datasets {
        push_unique(&mut datasets, legacy_dataset_redirect(id).unwrap_or(id));
    }
    (models, datasets)
}

/// Downloads `models` and `datasets` (hub ids, `org/name` or a bare legacy `name`) at `main`
/// into `cache` (a `…/hub` directory, see [`super::cache_dir`]), keeping only
/// [`MODEL_PATTERNS`] / [`DATASET_PATTERNS`]. `endpoint` overrides `HF_ENDPOINT`. Files already
/// in the cache are not fetched again. Refuses when `HF_HUB_OFFLINE` is set.
pub fn prefetch(
    models: &[String],
    datasets: &[String],
    cache: &Path,
    endpoint: Option<&str>,
) -> Result<()> {
    if hub_offline() {
        bail!("HF_HUB_OFFLINE is set: refusing to download; prefetch on a machine with internet (unset HF_HUB_OFFLINE there)");
    }
    let mut builder = hf_hub::HFClient::builder().cache_dir(cache);
    if let Some(e) = endpoint {
        builder = builder.endpoint(e);
    }
    let client = builder.build().context("creating the Hugging Face hub client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime for downloads")?;
    let patterns = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (model_patterns, dataset_patterns) = (patterns(MODEL_PATTERNS), patterns(DATASET_PATTERNS));
    tracing::info!(
        endpoint = client.endpoint(),
        cache = %cache.display(),
        models = models.len(),
        datasets = datasets.len(),
        "prefetching"
    );
    rt.block_on(async {
        for id in models {
            let (owner, name) = hf_hub::split_id(id);
            let dir = client
                .model(owner, name)
                .snapshot_download()
                .allow_patterns(model_patterns.clone())
                .send()
                .await
                .with_context(|| format!("downloading model `{id}` from {}", client.endpoint()))?;
            tracing::info!(snapshot = %dir.display(), "model {id}: cached");
        }
        for id in datasets {
            let (owner, name) = hf_hub::split_id(id);
            let dir = client
                .dataset(owner, name)
                .snapshot_download()
                .allow_patterns(dataset_patterns.clone())
                .send()
                .await
                .with_context(|| {
                    format!("downloading dataset `{id}` from {}", client.endpoint())
                })?;
            tracing::info!(snapshot = %dir.display(), "dataset {id}: cached");
        }
        Ok(())
    })
}
