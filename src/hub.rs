//! Hugging Face ids → local files, offline.
//!
//! FusionBench names models and datasets by hub id (`openai/clip-vit-base-patch32`,
//! `tanganke/sun397`) or by local path. A local directory wins; otherwise the id is looked up in
//! the hub cache with the layout `huggingface_hub` writes:
//! `<cache>/{models,datasets}--org--name/refs/<revision>` holds a commit hash and
//! `snapshots/<commit>/…` the files. The cache is found as `huggingface_hub` finds it:
//! `HF_HUB_CACHE`, then `HUGGINGFACE_HUB_CACHE`, then `$HF_HOME/hub`, then
//! `$XDG_CACHE_HOME/huggingface/hub`, then `~/.cache/huggingface/hub`.
//! Nothing here touches the network; [`download`] (feature `download`) fills the cache.

use std::path::{Path, PathBuf};

#[cfg(feature = "download")]
pub mod download;
pub mod identity;

/// What kind of hub repository an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    /// A model repository (`models--org--name`).
    Model,
    /// A dataset repository (`datasets--org--name`).
    Dataset,
}

impl RepoType {
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
}

/// Errors of hub resolution; each says where it looked and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The repository is neither a local directory nor in the cache.
    #[error("{kind} `{id}` is not a local directory and is not in the hub cache {cache} (looked for {looked}); prefetch it on a machine with internet or set HF_HOME / HF_HUB_CACHE")]
    NotCached {
        /// "model" or "dataset".
        kind: &'static str,
        /// The id asked for.
        id: String,
        /// The cache directory searched.
        cache: String,
        /// The path that was missing.
        looked: String,
    },
    /// The ref file exists but names a snapshot that is not there.
    #[error("hub cache entry {refs} names revision `{rev}`, but {snapshot} does not exist")]
    MissingSnapshot {
        /// The ref file read.
        refs: String,
        /// The revision it holds.
        rev: String,
        /// The snapshot directory expected.
        snapshot: String,
    },
    /// A file is absent from a resolved snapshot.
    #[error("`{file}` is not in {dir}")]
    MissingFile {
        /// The file name asked for.
        file: String,
        /// The snapshot directory.
        dir: String,
    },
    /// Reading the cache failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path at fault.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The hub cache directory, from the environment as `huggingface_hub` computes it.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let xdg = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    xdg.join("huggingface").join("hub")
}

/// Resolves ids against one cache directory.
#[derive(Debug, Clone)]
pub struct Hub {
    cache: PathBuf,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(cache_dir())
    }
}

impl Hub {
    /// A resolver over the given cache directory (`…/hub`).
    pub fn new(cache: impl Into<PathBuf>) -> Self {
        Self { cache: cache.into() }
    }

    /// The cache directory this resolver reads.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// The local directory holding `id` at `revision` (default `main`): `id` itself when it is an
    /// existing directory, else its snapshot in the cache.
    pub fn resolve(
        &self,
        id: &str,
        kind: RepoType,
        revision: Option<&str>,
    ) -> Result<PathBuf, HubError> {
        let local = Path::new(id);
        if local.is_dir() {
            return Ok(local.to_path_buf());
        }
        let repo = self.cache.join(format!("{}--{}", kind.folder_prefix(), id.replace('/', "--")));
        let revision = revision.unwrap_or("main");
        let refs = repo.join("refs").join(revision);
        let rev = if refs.is_file() {
            std::fs::read_to_string(&refs)
                .map_err(|source| HubError::Io { path: refs.display().to_string(), source })?
                .trim()
                .to_string()
        } else if repo.join("snapshots").join(revision).is_dir() {
            revision.to_string() // a commit hash given directly
        } else {
            return Err(HubError::NotCached {
                kind: match kind {
                    RepoType::Model => "model",
                    RepoType::Dataset => "dataset",
                },
                id: id.to_string(),
                cache: self.cache.display().to_string(),
                looked: refs.display().to_string(),
            });
        };
        let snapshot = repo.join("snapshots").join(&rev);
        if !snapshot.is_dir() {
            return Err(HubError::MissingSnapshot {
                refs: refs.display().to_string(),
                rev,
                snapshot: snapshot.display().to_string(),
            });
        }
        Ok(snapshot)
    }

    /// As [`Hub::resolve`] for a dataset, following the hub's redirects of legacy canonical ids
    /// (`svhn` → `ufldl-stanford/svhn`, `mnist` → `ylecun/mnist`, as FusionBench 0.2.33's dataset
    /// configs still name them) when the id itself is not cached.
    pub fn resolve_dataset(&self, id: &str) -> Result<PathBuf, HubError> {
        match self.resolve(id, RepoType::Dataset, None) {
            Err(e @ HubError::NotCached { .. }) => match legacy_dataset_redirect(id) {
                Some(new) => self.resolve(new, RepoType::Dataset, None).map_err(|_| e),
                None => Err(e),
            },
            other => other,
        }
    }

    /// One file of a resolved repository.
    pub fn file(&self, id: &str, kind: RepoType, file: &str) -> Result<PathBuf, HubError> {
        let dir = self.resolve(id, kind, None)?;
        let path = dir.join(file);
        if path.exists() {
            Ok(path)
        } else {
            Err(HubError::MissingFile { file: file.to_string(), dir: dir.display().to_string() })
        }
    }
}

/// The repository a legacy canonical dataset id now redirects to on the hub.
pub fn legacy_dataset_redirect(id: &str) -> Option<&'static str> {
    Some(match id {
        "svhn" => "ufldl-stanford/svhn",
        "mnist" => "ylecun/mnist",
        "cifar10" => "uoft-cs/cifar10",
        "cifar100" => "uoft-cs/cifar100",
        "fashion_mnist" => "zalando-datasets/fashion_mnist",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_refs_and_local_dirs_and_explains_misses() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("snapshots/abc123/config.json"), "{}").unwrap();
        let hub = Hub::new(tmp.path());
        let dir = hub.resolve("org/m", RepoType::Model, None).unwrap();
        assert_eq!(dir, repo.join("snapshots/abc123"));
        assert!(hub.file("org/m", RepoType::Model, "config.json").is_ok());
        let e = hub.file("org/m", RepoType::Model, "model.safetensors").unwrap_err();
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        let e = hub.resolve("org/m", RepoType::Dataset, None).unwrap_err();
        assert!(e.to_string().contains("datasets--org--m"), "{e}");
        // a local directory is used as is
        let local = hub.resolve(dir.to_str().unwrap(), RepoType::Model, None).unwrap();
        assert_eq!(local, dir);
        // a ref naming a missing snapshot
        std::fs::write(repo.join("refs/main"), "deadbeef").unwrap();
        let e = hub.resolve("org/m", RepoType::Model, None).unwrap_err();
        assert!(matches!(e, HubError::MissingSnapshot { .. }), "{e}");
    }
}
