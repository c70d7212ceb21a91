//! A cell's content address: the same cell has the same key on every process and every run,
//! and any change that could change its result gives a new key.
//!
//! The key hashes
//! - the cell's composed configuration, unresolved (`${...}` stays as written, so no path or
//!   time enters), without the keys of [`VOLATILE`], which do not change results;
//! - the content identity of every model and dataset it reads ([`crate::hub::identity`]): file
//!   hashes, never cache paths or modification times, so node-local hub caches, copied caches
//!   and fresh downloads of the same revision all give the same key;
//! - [`code_version`]: the crate version and [`NUMERICS_VERSION`].

use super::Cell;
use crate::config::{compose_from_args, default_config_dirs, Composed, ProgramConfig};
use crate::hub::identity::{HashCache, Identity};
use crate::hub::Hub;
pub use crate::version::{code_version, NUMERICS_VERSION};
use anyhow::{Context, Result};

/// Keys of the composed configuration (dotted paths) that do not change a cell's result: where
/// outputs go, what is printed, and how many devices compute it (the report is the same for any
/// number of workers, threads or processes).
pub const VOLATILE: &[&str] = &[
    "path",
    "report_save_path",
    "merged_model_save_path",
    "print_config",
    "dry_run",
    "hydra",
    "fabric.devices",
    "fabric.loggers",
];

/// A cell composed and keyed.
#[derive(Debug, Clone)]
pub struct Keyed {
    /// The cell.
    pub cell: Cell,
    /// Its composed configuration.
    pub cfg: ProgramConfig,
    /// Its key in the store.
    pub key: String,
}

/// Composes `cell` (with the default config search path) and computes its key.
pub fn keyed(cell: &Cell, hub: &Hub, hashes: &HashCache) -> Result<Keyed> {
    let composed = compose_from_args(&cell.args, &default_config_dirs())
        .with_context(|| format!("sweep cell {} ({})", cell.index, cell.label()))?;
    let cfg = composed.program_config()?;
    let key = cell_key(&composed, &cfg, hub, hashes)?;
    Ok(Keyed { cell: cell.clone(), cfg, key })
}

/// The identities of the models and datasets `cfg` reads, in config order: `("model <name>",
/// identity)` and `("dataset <task>", identity)`; an id that does not resolve is an error.
pub fn inputs(
    cfg: &ProgramConfig,
    hub: &Hub,
    hashes: &HashCache,
) -> Result<Vec<(String, Identity)>> {
    let mut out = Vec::new();
    for (name, m) in &cfg.modelpool.models {
        let id = hub
            .model_identity(&m.path, hashes)
            .with_context(|| format!("fingerprinting model `{name}` ({})", m.path))?;
        out.push((format!("model {name}"), id));
    }
    if let Some(tp) = &cfg.taskpool {
        for (name, d) in &tp.test_datasets {
            let id = hub.dataset_identity(&d.path, hashes).with_context(|| {
                format!("fingerprinting the dataset of task `{name}` ({})", d.path)
            })?;
            out.push((format!("dataset {name}"), id));
        }
    }
    Ok(out)
}

/// The content address of a cell: its composed configuration (without [`VOLATILE`] keys), the
/// content identities of its models and datasets, and [`code_version`]. A model or dataset that
/// does not resolve enters as such (the run itself then reports it).
pub fn cell_key(
    composed: &Composed,
    cfg: &ProgramConfig,
    hub: &Hub,
    hashes: &HashCache,
) -> Result<String> {
    let yaml = composed.to_yaml()?;
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&yaml).context("re-reading the composed configuration")?;
    for k in VOLATILE {
        remove_path(&mut doc, k);
    }
    let mut text = serde_yaml_ng::to_string(&doc).context("writing the configuration")?;
    text.push_str(&code_version());
    let mut line = |what: String, id: &str, identity: Result<Identity>| {
        let digest = match identity {
            Ok(i) => i.digest,
            Err(_) => "unresolved".into(),
        };
        text.push_str(&format!("\n{what} {id} {digest}"));
    };
    for (name, m) in &cfg.modelpool.models {
        let i = hub.model_identity(&m.path, hashes).map_err(anyhow::Error::from);
        line(format!("model {name}"), &m.path, i);
    }
    if let Some(tp) = &cfg.taskpool {
        for (name, d) in &tp.test_datasets {
            let i = hub.dataset_identity(&d.path, hashes).map_err(anyhow::Error::from);
            line(format!("dataset {name}"), &d.path, i);
        }
    }
    Ok(crate::report::stable_hash(text.as_bytes()))
}

/// Removes the dotted `path` (`fabric.devices`) from a YAML mapping, if present.
fn remove_path(doc: &mut serde_yaml_ng::Value, path: &str) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let Some(m) = doc.as_mapping_mut() else { return };
    match rest {
        None => {
            m.remove(head);
        }
        Some(rest) => {
            if let Some(child) = m.get_mut(head) {
                remove_path(child, rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_home/hub")
    }

    /// `cp -r src dst` (files as they are, links as links).
    fn copy_tree(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let ok = std::process::Command::new("cp").arg("-r").arg(src).arg(dst).status().unwrap();
        assert!(ok.success(), "cp -r {} {}", src.display(), dst.display());
    }

    fn key(args: &[&str], hub: &Hub) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let dirs = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")];
        let composed = compose_from_args(&args, &dirs).unwrap();
        let cfg = composed.program_config().unwrap();
        cell_key(&composed, &cfg, hub, &HashCache::new(None)).unwrap()
    }

    const CELL: &[&str] = &[
        "method=task_arithmetic",
        "method.scaling_factor=0.3",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ];

    #[test]
    fn two_caches_at_different_paths_give_the_same_keys() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("node-a/hub"), t.path().join("elsewhere/b/hub"));
        copy_tree(&fixtures(), &a);
        copy_tree(&fixtures(), &b);
        let (ha, hb) = (Hub::new(&a), Hub::new(&b));
        let k = key(CELL, &ha);
        assert_eq!(k, key(CELL, &hb), "the cache's path entered the key");
        assert_eq!(k, key(CELL, &Hub::new(fixtures())));
        // The key is the cell's: another setting, another key.
        let mut other = CELL.to_vec();
        other[1] = "method.scaling_factor=0.4";
        assert_ne!(key(&other, &ha), k);
        // Paths of the output, or the number of devices computing it, do not enter it.
        let mut moved = CELL.to_vec();
        moved.push("report_save_path=/somewhere/else.json");
        moved.push("fabric.devices=2");
        assert_eq!(key(&moved, &ha), k);
        // A changed file of one model does.
        let snap =
            std::fs::read_dir(a.join("models--tanganke--clip-vit-base-patch32_mnist/snapshots"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
        let cfg = snap.join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text.replace('{', "{ ")).unwrap();
        assert_ne!(key(CELL, &ha), k, "a changed model file kept the key");
        assert_eq!(key(CELL, &hb), k);
    }

    #[test]
    fn inputs_name_each_model_and_dataset_with_its_revision() {
        let dirs = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")];
        let args: Vec<String> = CELL.iter().map(|s| s.to_string()).collect();
        let cfg = compose_from_args(&args, &dirs).unwrap().program_config().unwrap();
        let found = inputs(&cfg, &Hub::new(fixtures()), &HashCache::new(None)).unwrap();
        assert_eq!(found.len(), 9 + 8, "{found:?}");
        assert!(found.iter().all(|(_, i)| i.revision.is_some()));
    }
}
