//! The config search path: directories holding the YAML tree, searched in order.

use super::error::ConfigError;
use super::node::Node;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The config directories, first match wins.
#[derive(Debug, Clone)]
pub struct Repo {
    dirs: Vec<PathBuf>,
}

impl Repo {
    /// A search path over `dirs` (kept only where they exist).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        let mut seen = Vec::new();
        for d in dirs {
            if d.is_dir() && !seen.contains(&d) {
                seen.push(d);
            }
        }
        Repo { dirs: seen }
    }

    /// The directories searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// `a:b:c` for messages.
    pub fn describe(&self) -> String {
        self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// The file of config `path` (`modelpool/CLIPVisionModelPool/x`, no extension).
    pub fn find(&self, path: &str) -> Option<PathBuf> {
        let rel = path.trim_start_matches('/');
        let rel = rel.strip_suffix(".yaml").unwrap_or(rel);
        self.dirs.iter().map(|d| d.join(format!("{rel}.yaml"))).find(|p| p.is_file())
    }

    /// Whether `group` is a directory in some search dir.
    pub fn is_group(&self, group: &str) -> bool {
        let rel = group.trim_start_matches('/');
        !rel.is_empty() && self.dirs.iter().any(|d| d.join(rel).is_dir())
    }

    /// The options of `group`: its `.yaml` files, sub-folders' as `sub/name`, sorted.
    pub fn options(&self, group: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        for d in &self.dirs {
            collect(&d.join(group.trim_start_matches('/')), "", &mut out, 0);
        }
        out.into_iter().collect()
    }

    /// Load and parse config `path`.
    pub fn load(&self, path: &str) -> Result<Node, ConfigError> {
        let file = self.find(path).ok_or_else(|| ConfigError::NoPrimaryConfig {
            name: path.to_string(),
            searched: self.describe(),
        })?;
        load_file(&file)
    }
}

fn collect(dir: &Path, prefix: &str, out: &mut BTreeSet<String>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() && depth < 3 {
            collect(&p, &format!("{prefix}{name}/"), out, depth + 1);
        } else if let Some(stem) = name.strip_suffix(".yaml") {
            out.insert(format!("{prefix}{stem}"));
        }
    }
}

/// Parse one YAML file.
pub fn load_file(file: &Path) -> Result<Node, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|source| ConfigError::Io { path: file.to_path_buf(), source })?;
    Node::parse_yaml(&text, &file.display().to_string())
}
