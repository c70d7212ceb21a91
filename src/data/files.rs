//! Which parquet files hold a dataset split, found the way Hugging Face `datasets` finds them
//! (DESIGN.md §2): the `configs:` block of the repo's README.md YAML front matter when present,
//! else the default file-name patterns.
//!
//! `configs:` entries have a `config_name` and `data_files`, which may be a glob, a list of globs
//! (both meaning the `train` split), a map `{split: glob | [globs]}`, or a list of
//! `{split, path}` where `path` is a glob or a list of globs. The config used is the one asked
//! for, else the one marked `default: true`, else the one named `default`, else the only one.
//! Without a configs block: `<config>/<split>-*.parquet`, `<config>/<split>/*.parquet` (when a
//! config is named), then `data/<split>-*.parquet`, `<split>-*.parquet`, `data/<split>/*.parquet`;
//! the first pattern that matches wins. Results are sorted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::DataError;

/// Data files of one config: split name → glob patterns (relative to the repo root).
type SplitPatterns = BTreeMap<String, Vec<String>>;

/// The parquet files of `split` (e.g. `test`) in the dataset snapshot at `root`, sorted.
pub fn find_split_files(
    root: &Path,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>, DataError> {
    let all = list_files(root)?;
    let readme = root.join("README.md");
    if let Some(configs) = readme_configs(&readme)? {
        let names: Vec<String> = configs.iter().map(|(n, _, _)| n.clone()).collect();
        let chosen = match config {
            Some(c) => configs.iter().find(|(n, _, _)| n == c),
            None => configs
                .iter()
                .find(|(_, default, _)| *default)
                .or_else(|| configs.iter().find(|(n, _, _)| n == "default"))
                .or_else(|| (configs.len() == 1).then(|| &configs[0])),
        };
        let Some((name, _, splits)) = chosen else {
            return Err(DataError::NoDataFiles {
                root: root.display().to_string(),
                what: match config {
                    Some(c) => format!("config `{c}`"),
                    None => "a default config (name one)".into(),
                },
                available: format!("configs in README.md: {}", names.join(", ")),
            });
        };
        let Some(patterns) = splits.get(split) else {
            return Err(DataError::NoDataFiles {
                root: root.display().to_string(),
                what: format!("split `{split}` of config `{name}`"),
                available: format!(
                    "splits: {}",
                    splits.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        let mut found: Vec<PathBuf> = all
            .iter()
            .filter(|f| patterns.iter().any(|p| glob_match(p, f)))
            .map(|f| root.join(f))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(DataError::NoDataFiles {
                root: root.display().to_string(),
                what: format!("files for split `{split}` of config `{name}`"),
                available: format!("patterns {patterns:?} match no file"),
            });
        }
        return Ok(found);
    }
    let mut patterns = Vec::new();
    if let Some(c) = config {
        patterns.push(format!("{c}/{split}-*.parquet"));
        patterns.push(format!("{c}/{split}/*.parquet"));
    }
    patterns.push(format!("data/{split}-*.parquet"));
    patterns.push(format!("{split}-*.parquet"));
    patterns.push(format!("data/{split}/*.parquet"));
    for p in &patterns {
        let mut found: Vec<PathBuf> =
            all.iter().filter(|f| glob_match(p, f)).map(|f| root.join(f)).collect();
        if !found.is_empty() {
            found.sort();
            return Ok(found);
        }
    }
    let parquet: Vec<&String> = all.iter().filter(|f| f.ends_with(".parquet")).collect();
    Err(DataError::NoDataFiles {
        root: root.display().to_string(),
        what: format!("split `{split}` (no configs block in README.md; tried {patterns:?})"),
        available: format!("parquet files: {parquet:?}"),
    })
}

/// Every file under `root` as a `/`-separated relative path; hidden entries are skipped.
fn list_files(root: &Path) -> Result<Vec<String>, DataError> {
    let io = |p: &Path, source| DataError::Io { path: p.display().to_string(), source };
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel_name = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            // Follow symlinks (hub cache snapshots link into blobs/).
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_dir() => stack.push((entry.path(), rel_name)),
                Ok(_) => out.push(rel_name),
                Err(_) => {} // a dangling link: not a data file
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `(config_name, is_default, split → patterns)` for each entry of README.md's `configs:`;
/// `None` when there is no README, no front matter or no `configs` key.
type ConfigEntry = (String, bool, SplitPatterns);

fn readme_configs(readme: &Path) -> Result<Option<Vec<ConfigEntry>>, DataError> {
    let Ok(text) = std::fs::read_to_string(readme) else {
        return Ok(None);
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Ok(None);
    }
    let yaml: Vec<&str> = lines.take_while(|l| l.trim_end() != "---").collect();
    let bad = |message: String| DataError::Readme { path: readme.display().to_string(), message };
    let front: Value =
        serde_yaml_ng::from_str(&yaml.join("\n")).map_err(|e| bad(format!("front matter: {e}")))?;
    let Some(configs) = front.get("configs") else {
        return Ok(None);
    };
    let Some(list) = configs.as_sequence() else {
        return Err(bad("`configs` is not a list".into()));
    };
    let mut out = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let name = match entry.get("config_name") {
            None => "default".to_string(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad(format!("configs[{i}].config_name is not a string")))?
                .to_string(),
        };
        let is_default = entry.get("default").and_then(Value::as_bool).unwrap_or(false);
        let data_files = entry
            .get("data_files")
            .ok_or_else(|| bad(format!("configs[{i}] (`{name}`) has no data_files")))?;
        let splits = parse_data_files(data_files)
            .map_err(|m| bad(format!("configs[{i}].data_files (`{name}`): {m}")))?;
        out.push((name, is_default, splits));
    }
    Ok(Some(out))
}

fn globs(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Sequence(items) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or("a glob is not a string".to_string()))
            .collect(),
        _ => Err("expected a glob or a list of globs".into()),
    }
}

fn parse_data_files(v: &Value) -> Result<SplitPatterns, String> {
    let mut out = SplitPatterns::new();
    match v {
        Value::String(_) => {
            out.insert("train".into(), globs(v)?);
        }
        Value::Mapping(m) => {
            for (k, pats) in m {
                let split = k.as_str().ok_or("a split name is not a string")?;
                out.entry(split.to_string()).or_default().extend(globs(pats)?);
            }
        }
        Value::Sequence(items) => {
            for item in items {
                match item {
                    Value::String(s) => out.entry("train".into()).or_default().push(s.clone()),
                    Value::Mapping(_) => {
                        let split = item
                            .get("split")
                            .and_then(Value::as_str)
                            .unwrap_or("train")
                            .to_string();
                        let path = item.get("path").ok_or("an entry has no `path`")?;
                        out.entry(split).or_default().extend(globs(path)?);
                    }
                    _ => return Err("entries must be globs or {split, path} maps".into()),
                }
            }
        }
        _ => return Err("expected a glob, a list or a map".into()),
    }
    Ok(out)
}

/// fsspec-style glob on `/`-separated paths: `*` and `?` stay within one path component, `**`
/// spans components (`a/**/b` also matches `a/b`), `[...]` is a character class.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches("./");
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    match_components(&p, &s)
}

fn match_components(p: &[&str], s: &[&str]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((&"**", rest)) => (0..=s.len()).any(|k| match_components(rest, &s[k..])),
        Some((first, rest)) => match s.split_first() {
            Some((head, tail)) => {
                match_one(first.as_bytes(), head.as_bytes()) && match_components(rest, tail)
            }
            None => false,
        },
    }
}

fn match_one(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|k| match_one(&p[1..], &s[k..])),
        Some(b'?') => !s.is_empty() && match_one(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some(end) = p.iter().skip(1).position(|&c| c == b']').map(|e| e + 1) else {
                return s.first() == Some(&b'[') && match_one(&p[1..], &s[1..]);
            };
            let Some(&c) = s.first() else { return false };
            let (negate, class) = match &p[1..end] {
                [b'!' | b'^', rest @ ..] => (true, rest),
                class => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && match_one(&p[end + 1..], &s[1..])
        }
        Some(&c) => s.first() == Some(&c) && match_one(&p[1..], &s[1..]),
    }
}
