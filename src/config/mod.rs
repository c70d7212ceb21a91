//! FusionBench's Hydra command line and YAML config tree, composed without Python.
//!
//! `fusion_bench method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 ...` is
//! parsed ([`overrides`]), the primary config's defaults lists are expanded and merged
//! ([`compose`]), value overrides are applied ([`apply`]), `${...}` is resolved
//! ([`interpolate`]), and the result is read into [`ProgramConfig`] ([`program`]).
//! Stale names from FusionBench's docs are mapped with a warning ([`aliases`]).
//!
//! Search path (as FusionBench's `get_default_config_path`): the first existing directory among
//! `$CWD/config` and `$CWD/fusion_bench_config`, else the tree built into the binary (this
//! crate's `config/`, embedded at build time, so an installed or copied binary runs anywhere);
//! `--config-path` replaces it; each `--config-dir` is searched after it.

pub mod aliases;
mod apply;
pub mod compose;
pub mod error;
pub mod interpolate;
pub mod node;
pub mod overrides;
pub mod program;
pub mod repo;
pub mod specs;

pub use error::ConfigError;
pub use node::{Map, Node};
pub use overrides::{CfgKind, CliArgs};
pub use program::{
    warn_unknown_keys, DatasetSpec, FabricConfig, LoggersConfig, MethodConfig, ModelPoolConfig,
    ModelSpec, PathConfig, ProgramConfig, Section, TaskPoolConfig, TaskPoolKind, ValidationSplit,
};

use interpolate::Context;
use std::path::PathBuf;
use std::time::SystemTime;

/// The default primary config (`@hydra.main(config_name=...)`).
pub const DEFAULT_CONFIG_NAME: &str = "fabric_model_fusion";

/// The candidate primary config directories, in FusionBench's order: `./config`, then
/// `./fusion_bench_config`. When neither exists, the built-in tree is the primary one.
pub fn default_config_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        v.push(cwd.join("config"));
        v.push(cwd.join("fusion_bench_config"));
    }
    v
}

/// A composed config and what the command line asked for.
#[derive(Debug, Clone)]
pub struct Composed {
    root: Node,
    cli: CliArgs,
    config_name: String,
    ctx: Context,
    choices: Vec<(String, String)>,
    search_path: Vec<repo::Source>,
}

/// Compose the config for `args` (the words after the program name). `config_dirs` are the
/// candidate primary directories (usually [`default_config_dirs`]); the first that exists is
/// used, else the built-in tree.
pub fn compose_from_args(
    args: &[String],
    config_dirs: &[PathBuf],
) -> Result<Composed, ConfigError> {
    compose_at(args, config_dirs, SystemTime::now())
}

/// [`compose_from_args`] with a fixed `${now:...}` instant (for reproducible output).
pub fn compose_at(
    args: &[String],
    config_dirs: &[PathBuf],
    now: SystemTime,
) -> Result<Composed, ConfigError> {
    let cli = overrides::parse_args(args)?;
    let primary = match &cli.config_path {
        Some(p) => repo::Source::Dir(p.clone()),
        None => match config_dirs.iter().find(|d| d.is_dir()) {
            Some(d) => repo::Source::Dir(d.clone()),
            None => repo::Source::BuiltIn,
        },
    };
    let mut sources = vec![primary];
    sources.extend(cli.config_dirs.iter().cloned().map(repo::Source::Dir));
    let repo = repo::Repo::with_sources(sources);
    let config_name = cli.config_name.clone().unwrap_or_else(|| DEFAULT_CONFIG_NAME.to_string());

    let is_group = |o: &overrides::Override| !o.key.contains('.') && repo.is_group(&o.key);
    let (groups, values): (Vec<_>, Vec<_>) =
        cli.overrides.iter().cloned().partition(|o| is_group(o));
    let mut composer = compose::Composer::new(&repo);
    let added = composer.set_cli_groups(&groups)?;
    let (mut root, choices) = composer.compose(&config_name, &added)?;

    let cwd =
        std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_else(|_| ".".into());
    let hydra = hydra_context(&config_name, &cwd, &choices);
    if let Node::Map(m) = &mut root {
        if let Some(h) = m.get_mut("hydra") {
            h.merge(hydra.clone());
        }
    }
    for ov in &values {
        apply::apply(&mut root, ov, &choices)?;
    }
    Ok(Composed {
        root,
        cli,
        config_name,
        ctx: Context { hydra, now },
        choices,
        search_path: repo.sources().to_vec(),
    })
}

fn hydra_context(config_name: &str, cwd: &str, choices: &[(String, String)]) -> Node {
    let mut job = Map::default();
    job.insert("name", Node::Str("cli".into()));
    job.insert("config_name", Node::Str(config_name.into()));
    job.insert("num", Node::Int(0));
    let mut ch = Map::default();
    for (g, c) in choices {
        ch.insert(g, Node::Str(c.clone()));
    }
    let mut runtime = Map::default();
    runtime.insert("cwd", Node::Str(cwd.into()));
    runtime.insert("choices", Node::Map(ch));
    let mut m = Map::default();
    m.insert("job", Node::Map(job));
    m.insert("runtime", Node::Map(runtime));
    Node::Map(m)
}

impl Composed {
    /// The composed tree (interpolations not resolved; includes `hydra`).
    pub fn node(&self) -> &Node {
        &self.root
    }
    /// The primary config's name (`--config-name`).
    pub fn config_name(&self) -> &str {
        &self.config_name
    }
    /// What `--cfg` asked to print, if anything (then the program must not run).
    pub fn cfg(&self) -> Option<CfgKind> {
        self.cli.cfg
    }
    /// The parsed command line.
    pub fn cli(&self) -> &CliArgs {
        &self.cli
    }
    /// The option chosen per group (`method` → `dummy`, ...), as Hydra's `runtime.choices`.
    pub fn choices(&self) -> &[(String, String)] {
        &self.choices
    }
    /// Where configs were read from, primary first.
    pub fn search_path(&self) -> &[repo::Source] {
        &self.search_path
    }
    /// The search path in words, for the log: `<built-in config tree>` or the folders.
    pub fn describe_tree(&self) -> String {
        self.search_path.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
    }
    /// The job config (no `hydra` node) with every interpolation resolved; `???` stays.
    pub fn resolved(&self) -> Result<Node, ConfigError> {
        let mut r = interpolate::resolve_all(&self.root, &self.ctx)?;
        if let Node::Map(m) = &mut r {
            m.remove("hydra");
        }
        Ok(r)
    }
    /// The `--cfg` output: YAML of the job config (`job`), the `hydra` node (`hydra`) or both
    /// (`all`); resolved when `--resolve` was given; only `--package` when given.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let kind = self.cli.cfg.unwrap_or(CfgKind::Job);
        let base = if self.cli.resolve {
            interpolate::resolve_all(&self.root, &self.ctx)?
        } else {
            self.root.clone()
        };
        let mut node = match kind {
            CfgKind::All => base,
            CfgKind::Hydra => {
                let mut m = Map::default();
                m.insert("hydra", base.get_path("hydra").cloned().unwrap_or(Node::Null));
                Node::Map(m)
            }
            CfgKind::Job => {
                let mut b = base;
                if let Node::Map(m) = &mut b {
                    m.remove("hydra");
                }
                b
            }
        };
        if let Some(p) = &self.cli.package {
            if !p.is_empty() && p != "_global_" {
                node = node
                    .get_path(p)
                    .cloned()
                    .ok_or_else(|| ConfigError::invalid(p, "no such package in the config"))?;
            }
        }
        Ok(node.to_yaml_string())
    }
    /// The typed view the program runs from (resolves interpolations first).
    pub fn program_config(&self) -> Result<ProgramConfig, ConfigError> {
        let resolved = self.resolved()?;
        let option = self.choices.iter().find(|(g, _)| g == "method").map(|(_, c)| c.clone());
        ProgramConfig::from_resolved(&resolved, option)
    }
}
