//! Defaults lists, as Hydra composes them: the primary config's `defaults` is expanded depth
//! first into an ordered list of (package, content) pieces, which are merged in order.
//!
//! Supported entries: `_self_` (absent means last), `group: option`, `group: [a, b]` (each merged
//! at the same package, in list order), `group@pkg: ...`, `group@_here_`/`group@:`, absolute
//! `/group`, `@_global_`, `optional group: ...`, `override group: ...` (applies to the whole
//! subtree below the list that holds it), `group: null`, and plain config names (`- other`).

use super::aliases;
use super::error::ConfigError;
use super::node::Node;
use super::overrides::{Override, OverrideKind};
use super::repo::Repo;
use std::collections::HashMap;

/// One option choice: a name, a list of names (merged in order) or nothing.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    One(String),
    Many(Vec<String>),
    Nothing,
}

impl Choice {
    fn from_node(v: &Node, what: &str) -> Result<Choice, ConfigError> {
        Ok(match v {
            Node::Null => Choice::Nothing,
            Node::Str(s) => Choice::One(s.clone()),
            Node::Int(_) | Node::Float(_) | Node::Bool(_) => Choice::One(v.to_interp_string()),
            Node::List(l) => Choice::Many(
                l.iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad_entry(what)))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(bad_entry(what)),
        })
    }
    fn names(&self) -> Vec<String> {
        match self {
            Choice::One(s) => vec![s.clone()],
            Choice::Many(v) => v.clone(),
            Choice::Nothing => Vec::new(),
        }
    }
}

fn bad_entry(what: &str) -> ConfigError {
    ConfigError::Parse { what: what.into(), msg: "invalid defaults list entry".into() }
}

enum Entry {
    SelfRef,
    Config {
        path: String,
        package: Option<String>,
    },
    Group {
        group: String,
        package: Option<String>,
        choice: Choice,
        optional: bool,
        is_override: bool,
    },
}

fn parse_entries(defaults: &Node, what: &str) -> Result<Vec<Entry>, ConfigError> {
    let Node::List(items) = defaults else { return Err(bad_entry(what)) };
    let mut out = Vec::new();
    for item in items {
        match item {
            Node::Str(s) if s == "_self_" => out.push(Entry::SelfRef),
            Node::Str(s) => {
                let (path, package) = split_package(s);
                out.push(Entry::Config { path, package })
            }
            Node::Map(m) if m.len() == 1 => {
                let (key, value) = m.iter().next().expect("one entry");
                let mut words: Vec<&str> = key.split_whitespace().collect();
                let name = words.pop().ok_or_else(|| bad_entry(what))?;
                let is_override = words.contains(&"override");
                let optional = words.contains(&"optional");
                let (group, package) = split_package(name);
                let choice = Choice::from_node(value, what)?;
                out.push(Entry::Group { group, package, choice, optional, is_override });
            }
            _ => return Err(bad_entry(what)),
        }
    }
    Ok(out)
}

fn split_package(s: &str) -> (String, Option<String>) {
    match s.split_once('@') {
        Some((g, p)) => (g.trim().to_string(), Some(p.trim().to_string())),
        None => (s.trim().to_string(), None),
    }
}

fn join(a: &str, b: &str, sep: char) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}{sep}{b}"),
    }
}

fn dirname(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// The absolute package of an entry, from its parent's package.
fn package_of(parent_pkg: &str, group: Option<&str>, package: Option<&str>) -> String {
    match package {
        None => match group {
            Some(g) => join(parent_pkg, &g.trim_start_matches('/').replace('/', "."), '.'),
            None => parent_pkg.to_string(),
        },
        Some("" | "_here_") => parent_pkg.to_string(),
        Some("_global_") => String::new(),
        Some(p) if p.starts_with("_global_.") => p["_global_.".len()..].to_string(),
        Some("_group_") => {
            join(parent_pkg, &group.unwrap_or("").trim_start_matches('/').replace('/', "."), '.')
        }
        Some(p) => join(parent_pkg, p, '.'),
    }
}

/// Expands defaults lists into merge pieces.
pub(crate) struct Composer<'a> {
    repo: &'a Repo,
    /// Group choices from the command line: group → (choice, used).
    cli: HashMap<String, (Choice, bool)>,
    /// Choices from `override` entries, first (outermost) wins.
    overrides: HashMap<String, Choice>,
    /// The final choice per group (Hydra's `hydra.runtime.choices`).
    pub choices: Vec<(String, String)>,
    pieces: Vec<(String, Node)>,
    depth: usize,
}

impl<'a> Composer<'a> {
    pub(crate) fn new(repo: &'a Repo) -> Self {
        Composer {
            repo,
            cli: HashMap::new(),
            overrides: HashMap::new(),
            choices: Vec::new(),
            pieces: Vec::new(),
            depth: 0,
        }
    }

    /// Record the group overrides of the command line; returns the ones that add a group (`+g=o`).
    pub(crate) fn set_cli_groups(
        &mut self,
        groups: &[Override],
    ) -> Result<Vec<Override>, ConfigError> {
        let mut added = Vec::new();
        for ov in groups {
            let choice = match (&ov.kind, &ov.value) {
                (OverrideKind::Delete, _) => Choice::Nothing,
                (_, Some(Node::List(_))) => Choice::from_node(ov.value.as_ref().unwrap(), &ov.arg)?,
                (_, Some(Node::Null)) => Choice::Nothing,
                _ => Choice::One(ov.raw_value.clone().unwrap_or_default()),
            };
            if ov.kind == OverrideKind::Add {
                added.push(ov.clone());
            } else {
                self.cli.insert(ov.key.trim_start_matches('/').to_string(), (choice, false));
            }
        }
        Ok(added)
    }

    /// Expand the primary config `name`, then the `+group=option` additions; returns the
    /// composed tree.
    pub(crate) fn compose(
        mut self,
        name: &str,
        added: &[Override],
    ) -> Result<(Node, Vec<(String, String)>), ConfigError> {
        if self.repo.find(name).is_none() {
            return Err(ConfigError::NoPrimaryConfig {
                name: name.into(),
                searched: self.repo.describe(),
            });
        }
        self.expand_config(name, "", "", "")?;
        for ov in added {
            let group = ov.key.trim_start_matches('/').to_string();
            let choice = match &ov.value {
                Some(v @ Node::List(_)) => Choice::from_node(v, &ov.arg)?,
                _ => Choice::One(ov.raw_value.clone().unwrap_or_default()),
            };
            let pkg = package_of("", Some(&group), ov.package.as_deref());
            self.expand_group(&group, &pkg, &choice, false, "<command line>")?;
        }
        let unused: Vec<_> = self
            .cli
            .iter()
            .filter(|(_, (_, used))| !used)
            .map(|(g, (c, _))| (g.clone(), c.clone()))
            .collect();
        if let Some((group, choice)) = unused.into_iter().next() {
            return Err(ConfigError::GroupNotInDefaults {
                group,
                option: choice.names().join(","),
            });
        }
        let mut root = Node::empty_map();
        for (pkg, node) in self.pieces {
            root.merge_at(&pkg, node);
        }
        Ok((root, self.choices))
    }

    fn expand_config(
        &mut self,
        path: &str,
        package: &str,
        base_dir: &str,
        parent: &str,
    ) -> Result<(), ConfigError> {
        self.depth += 1;
        if self.depth > 32 {
            return Err(ConfigError::Unsupported(format!(
                "defaults lists nest too deep at '{path}' (a cycle?)"
            )));
        }
        let mut node = self.repo.load(path).map_err(|e| match e {
            ConfigError::NoPrimaryConfig { .. } => ConfigError::UnknownOption {
                group: dirname(path).to_string(),
                option: path.rsplit('/').next().unwrap_or(path).to_string(),
                parent: parent.to_string(),
                choices: self.repo.options(dirname(path)),
            },
            e => e,
        })?;
        let defaults = match &mut node {
            Node::Map(m) => m.remove("defaults"),
            Node::Null => None,
            _ => {
                return Err(ConfigError::Parse {
                    what: path.into(),
                    msg: "a config file must be a mapping".into(),
                })
            }
        };
        let entries = match &defaults {
            Some(d) => parse_entries(d, path)?,
            None => Vec::new(),
        };
        // `override` entries apply to everything below this list; outer lists win.
        for e in &entries {
            if let Entry::Group { group, choice, is_override: true, .. } = e {
                let abs = abs_group(base_dir, group);
                if abs.starts_with("hydra/") && !self.repo.is_group(&abs) {
                    continue; // Hydra's own groups (help, job_logging): not reproduced
                }
                self.overrides.entry(abs).or_insert_with(|| choice.clone());
            }
        }
        let has_self = entries.iter().any(|e| matches!(e, Entry::SelfRef));
        for e in &entries {
            match e {
                Entry::SelfRef => self
                    .pieces
                    .push((package.to_string(), std::mem::replace(&mut node, Node::Null))),
                Entry::Config { path: p, package: pk } => {
                    let child = if let Some(abs) = p.strip_prefix('/') {
                        abs.to_string()
                    } else {
                        join(base_dir, p, '/')
                    };
                    let pkg = package_of(package, None, pk.as_deref());
                    self.expand_config(&child, &pkg, dirname(&child), path)?;
                }
                Entry::Group { is_override: true, .. } => {}
                Entry::Group { group, package: pk, choice, optional, .. } => {
                    let abs = abs_group(base_dir, group);
                    let pkg = package_of(package, Some(group), pk.as_deref());
                    let choice = if let Some((c, used)) = self.cli.get_mut(&abs) {
                        *used = true;
                        c.clone()
                    } else {
                        self.overrides.get(&abs).cloned().unwrap_or_else(|| choice.clone())
                    };
                    self.expand_group(&abs, &pkg, &choice, *optional, path)?;
                }
            }
        }
        if !has_self {
            self.pieces.push((package.to_string(), node));
        }
        self.depth -= 1;
        Ok(())
    }

    fn expand_group(
        &mut self,
        abs: &str,
        pkg: &str,
        choice: &Choice,
        optional: bool,
        parent: &str,
    ) -> Result<(), ConfigError> {
        let names = choice.names();
        if !names.is_empty() && !matches!(choice, Choice::Many(_)) {
            self.choices.push((abs.to_string(), names.join(",")));
        }
        for name in names {
            let option = aliases::group_option(self.repo, abs, &name);
            let path = format!("{abs}/{option}");
            if self.repo.find(&path).is_none() {
                if optional {
                    continue;
                }
                return Err(ConfigError::UnknownOption {
                    group: abs.to_string(),
                    option,
                    parent: parent.to_string(),
                    choices: self.repo.options(abs),
                });
            }
            self.expand_config(&path, pkg, abs, parent)?;
        }
        Ok(())
    }
}

fn abs_group(base_dir: &str, group: &str) -> String {
    match group.strip_prefix('/') {
        Some(abs) => abs.to_string(),
        None => join(base_dir, group, '/'),
    }
}
