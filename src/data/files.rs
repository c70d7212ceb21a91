//! Which parquet files hold a dataset split, found the way Hugging Face `datasets` finds them
//! (DESIGN.md §2).
//!
//! **With a `configs:` block** in the repo's README.md YAML front matter: its entries have a
//! `config_name` and `data_files`, which may be a glob, a list of globs (both meaning the `train`
//! split), a map `{split: glob | [globs]}`, or a list of `{split, path}` where `path` is a glob or
//! a list of globs. The config used is the one asked for, else the one marked `default: true`,
//! else the one named `default`, else the only one. The split's files are those its globs match,
//! sorted.
//!
//! **Without one**, the rules of `datasets` **5.0.1** (the version the reference venv of
//! fusion-bench 0.2.33 installs, with fsspec 2026.6.0), read from its `datasets/data_files.py`:
//! `get_data_patterns` → `_get_data_files_patterns` picks the patterns, then
//! `DataFilesDict.from_patterns` → `DataFilesList.from_patterns` → `resolve_pattern` lists each
//! split's files.
//!
//! 1. `SPLIT_PATTERN_SHARDED`, `data/{split}-[0-9]×5-of-[0-9]×5*.*`, tried first with `*` for the
//!    split. If any file matches, every split name it finds is a split, whatever the name
//!    (FusionBench's corrupted splits `contrast`, `gaussian_noise`): the base name up to the last
//!    `-NNNNN-of-NNNN` (`string_to_dict`), which must match `^\w+(\.\w+)*$` (`naming._split_re`)
//!    or the whole repo is an error. Splits come as `DEFAULT_SPLITS` (`train`, `validation`,
//!    `test`) then the others sorted, each with its own sharded pattern.
//! 2. Else the first of `ALL_DEFAULT_PATTERNS` in which some split's pattern matches a file; the
//!    splits are those with a match, each keeping all its patterns:
//!    - `DEFAULT_PATTERNS_LOGS`: `**/*.eval` → split `logs` (new in 5.x, ahead of the rest);
//!    - `DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME`, from `KEYWORDS_IN_DIR_NAME_BASE_PATTERNS`:
//!      `**/{keyword}/**`, `**/{keyword}[{sep}]*/**`, `**/*[{sep}]{keyword}/**`,
//!      `**/*[{sep}]{keyword}[{sep}]*/**` (a `testing/` or `my-test_1/` folder);
//!    - `DEFAULT_PATTERNS_SPLIT_IN_FILENAME`, from `KEYWORDS_IN_FILENAME_BASE_PATTERNS`:
//!      `**/{keyword}[{sep}]*`, `**/*[{sep}]{keyword}[{sep}]*`
//!      (`mnist/test-00000-of-00001.parquet`, `foo/bar_test_01.parquet`; not `latest.parquet`,
//!      `contest-1.parquet`, `testa.parquet`);
//!    - `DEFAULT_PATTERNS_ALL`: `**` → `train`.
//!
//!    `{sep}` is `NON_WORDS_CHARS`, `-._ 0-9`; `SPLIT_KEYWORDS` map `train`, `training` → train;
//!    `validation`, `valid`, `dev`, `val` → validation; `test`, `testing`, `eval`,
//!    `evaluation` → test, tried keyword by keyword, each with the base patterns in the order
//!    above.
//! 3. A split's files are its patterns' matches, pattern by pattern (each sorted by path) and
//!    concatenated: not re-sorted, and a file two patterns match is listed twice
//!    (`test-eval.parquet`), as `DataFilesList.from_patterns` does.
//!
//! `resolve_pattern` never matches a directory; nor, unless the pattern itself names them, a file
//! named in `FILES_TO_IGNORE` (README.md, config.json, dataset_info.json, dataset_infos.json,
//! dummy_data.zip, dataset_dict.json), a file under a folder whose name starts with `__`
//! (`_is_inside_unrequested_special_dir`), or a hidden file or one under a hidden folder (a name
//! starting with `.` that is not only dots,
//! `_is_unrequested_hidden_file_or_is_inside_unrequested_hidden_dir`). Every other file counts
//! when choosing the patterns (a `train/notes.txt` makes the folder group win); of a split's files
//! only the `*.parquet` ones are kept (`datasets` keeps those of the format it infers,
//! `DataFilesList.filter`; its parquet module would also take `.geoparquet`, `.gpq` and `.zip`).
//!
//! A config asked for without a `configs:` block (FusionBench's `load_dataset(path, name)`):
//! `<config>/<split>-*.parquet`, then `<config>/<split>/*.parquet` (the first that matches, sorted,
//! any split name); else the rules above inside `<config>/` when it exists, as
//! `load_dataset(path, data_dir=config)` applies them (so the hub parquet-converter layouts
//! `<config>/<split>/0000.parquet` and `<config>/partial-<split>/0000.parquet` work); else in the
//! whole repo.
//!
//! Where we differ from `datasets`: folders that are symlinks are followed (fsspec's local `find`
//! does not descend into them; hub snapshots link only files), hidden entries are never listed (a
//! `configs:` glob naming a hidden path matches nothing), and no file format is inferred
//! (`infer_module_for_data_files`): the parquet files are taken. Globs are fsspec's
//! ([`super::glob::glob_match`]). `tests/fixtures/golden/data_files.json`, written by
//! `scripts/fixtures/golden_data_files.py` with the real `datasets`, is replayed by the unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::glob::glob_match;
use super::DataError;

/// The `datasets` release whose rules are implemented here (and which wrote the golden).
pub const DATASETS_VERSION: &str = "5.0.1";

const SPLIT_PATTERN_SHARDED: &str =
    "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
const NON_WORDS_CHARS: &str = "-._ 0-9";
const KEYWORDS_IN_FILENAME_BASE_PATTERNS: [&str; 2] =
    ["**/{keyword}[{sep}]*", "**/*[{sep}]{keyword}[{sep}]*"];
const KEYWORDS_IN_DIR_NAME_BASE_PATTERNS: [&str; 4] = [
    "**/{keyword}/**",
    "**/{keyword}[{sep}]*/**",
    "**/*[{sep}]{keyword}/**",
    "**/*[{sep}]{keyword}[{sep}]*/**",
];
const FILES_TO_IGNORE: [&str; 6] = [
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// Data files of one config: split name → glob patterns (relative to the repo root).
type SplitPatterns = BTreeMap<String, Vec<String>>;

/// Splits and their patterns, in `datasets`' order.
type Patterns = Vec<(String, Vec<String>)>;

/// The parquet files of `split` (e.g. `test`) in the dataset snapshot at `root`.
pub fn find_split_files(
    root: &Path,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>, DataError> {
    let all = list_files(root)?;
    let readme = root.join("README.md");
    let Some(configs) = readme_configs(&readme)? else {
        return find_without_configs(root, &all, config, split);
    };
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
            available: format!("splits: {}", splits.keys().cloned().collect::<Vec<_>>().join(", ")),
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
    Ok(found)
}

/// No `configs:` block: the config's own layouts, then `datasets`' default patterns.
fn find_without_configs(
    root: &Path,
    all: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>, DataError> {
    let mut tried = Vec::new();
    let mut base = String::new();
    if let Some(c) = config {
        for p in [format!("{c}/{split}-*.parquet"), format!("{c}/{split}/*.parquet")] {
            let mut found: Vec<PathBuf> =
                all.iter().filter(|f| glob_match(&p, f)).map(|f| root.join(f)).collect();
            if !found.is_empty() {
                found.sort();
                return Ok(found);
            }
            tried.push(format!("`{p}`"));
        }
        if all.iter().any(|f| f.starts_with(&format!("{c}/"))) {
            base = format!("{c}/");
        }
    }
    let files: Vec<String> =
        all.iter().filter_map(|f| f.strip_prefix(base.as_str())).map(str::to_string).collect();
    let place = if base.is_empty() { "the repo".to_string() } else { format!("`{base}`") };
    tried.push(format!("`datasets` {DATASETS_VERSION}'s default patterns in {place}"));
    let no = |found: String| {
        let parquet: Vec<&String> = all.iter().filter(|f| is_parquet(f)).collect();
        DataError::NoDataFiles {
            root: root.display().to_string(),
            what: format!(
                "split `{split}` (no configs block in README.md; tried {})",
                tried.join(", then ")
            ),
            available: format!("{found}; parquet files: {parquet:?}"),
        }
    };
    let (group, patterns) = match default_patterns(&files) {
        Ok(found) => found,
        Err(NoPatterns::Empty) => return Err(no("there are no data files there".into())),
        Err(NoPatterns::BadSplitNames(names)) => {
            return Err(no(format!(
                "sharded file names under `{base}data/` give split names `datasets` rejects \
                 (they must match ^\\w+(\\.\\w+)*$): {names:?}"
            )))
        }
    };
    let Some((_, globs)) = patterns.iter().find(|(s, _)| s == split) else {
        let splits: Vec<&String> = patterns.iter().map(|(s, _)| s).collect();
        return Err(no(format!("{} found the splits {splits:?}", group.describe())));
    };
    let matched: Vec<&String> = globs.iter().flat_map(|g| resolve(&files, g)).collect();
    let found: Vec<PathBuf> =
        matched.iter().filter(|f| is_parquet(f)).map(|f| root.join(format!("{base}{f}"))).collect();
    if found.is_empty() {
        return Err(no(format!(
            "{} gave split `{split}` the files {matched:?}, none of them parquet",
            group.describe()
        )));
    }
    Ok(found)
}

/// Which of `datasets`' pattern groups gave a repo's splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Sharded,
    Logs,
    DirName,
    FileName,
    All,
}

impl Group {
    fn describe(self) -> &'static str {
        match self {
            Group::Sharded => "the sharded pattern `data/{split}-NNNNN-of-NNNNN*.*`",
            Group::Logs => "the logs pattern `**/*.eval`",
            Group::DirName => "split names in folder names (`**/test/**`, …)",
            Group::FileName => "split names in file names (`**/test[-._ 0-9]*`, …)",
            Group::All => "`**` (every file is `train`)",
        }
    }
}

/// Why `get_data_patterns` raises.
#[derive(Debug, PartialEq, Eq)]
enum NoPatterns {
    /// `EmptyDatasetError`: no pattern matches any file.
    Empty,
    /// `ValueError`: the sharded files' split names (or file names) that are not valid.
    BadSplitNames(Vec<String>),
}

/// `_get_data_files_patterns` on these files (`/`-separated, relative to the base path, sorted).
fn default_patterns(files: &[String]) -> Result<(Group, Patterns), NoPatterns> {
    let any_split = SPLIT_PATTERN_SHARDED.replace("{split}", "*");
    let mut names = BTreeSet::new();
    let mut bad = Vec::new();
    for f in resolve(files, &any_split) {
        let base = f.rsplit('/').next().unwrap_or(f);
        match sharded_split_name(base) {
            Some(name) if is_split_name(name) => {
                names.insert(name.to_string());
            }
            Some(name) => bad.push(name.to_string()),
            None => bad.push(base.to_string()), // `string_to_dict` finds nothing: an assert fails
        }
    }
    if !bad.is_empty() {
        bad.sort();
        bad.dedup();
        return Err(NoPatterns::BadSplitNames(bad));
    }
    if !names.is_empty() {
        let defaults = SPLIT_KEYWORDS.map(|(s, _)| s);
        let mut ordered: Vec<String> =
            defaults.iter().filter(|s| names.contains(**s)).map(|s| s.to_string()).collect();
        ordered.extend(names.into_iter().filter(|n| !defaults.contains(&n.as_str())));
        let patterns = ordered
            .into_iter()
            .map(|s| {
                let p = SPLIT_PATTERN_SHARDED.replace("{split}", &s);
                (s, vec![p])
            })
            .collect();
        return Ok((Group::Sharded, patterns));
    }
    let keywords = |bases: &[&str]| -> Patterns {
        SPLIT_KEYWORDS
            .iter()
            .map(|(split, keywords)| {
                let patterns = keywords
                    .iter()
                    .flat_map(|k| {
                        bases.iter().map(move |b| {
                            b.replace("{keyword}", k).replace("{sep}", NON_WORDS_CHARS)
                        })
                    })
                    .collect();
                (split.to_string(), patterns)
            })
            .collect()
    };
    let one = |split: &str, pattern: &str| vec![(split.to_string(), vec![pattern.to_string()])];
    let groups = [
        (Group::Logs, one("logs", "**/*.eval")),
        (Group::DirName, keywords(&KEYWORDS_IN_DIR_NAME_BASE_PATTERNS)),
        (Group::FileName, keywords(&KEYWORDS_IN_FILENAME_BASE_PATTERNS)),
        (Group::All, one("train", "**")),
    ];
    for (group, patterns) in groups {
        let hit: Patterns = patterns
            .into_iter()
            .filter(|(_, ps)| ps.iter().any(|p| resolve(files, p).next().is_some()))
            .collect();
        if !hit.is_empty() {
            return Ok((group, hit));
        }
    }
    Err(NoPatterns::Empty)
}

/// `resolve_pattern`'s matches of `pattern` among `files` (sorted, so the matches are too).
fn resolve<'a>(files: &'a [String], pattern: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    files.iter().filter(move |f| glob_match(pattern, f) && !unrequested(pattern, f))
}

/// Whether `resolve_pattern` drops a match: an ignored file name, or more `__` folders or
/// hidden parts in the path than in the pattern.
fn unrequested(pattern: &str, path: &str) -> bool {
    fn parts(s: &str) -> Vec<&str> {
        s.split('/').filter(|p| !p.is_empty() && *p != ".").collect()
    }
    let (pat, file) = (parts(pattern), parts(path));
    let name = file.last().copied().unwrap_or_default();
    let ignored = FILES_TO_IGNORE.contains(&name) && pat.last().copied() != Some(name);
    let special = |parts: &[&str]| {
        parts[..parts.len().saturating_sub(1)].iter().filter(|p| p.starts_with("__")).count()
    };
    let hidden = |parts: &[&str]| {
        parts.iter().filter(|p| p.starts_with('.') && !p.bytes().all(|b| b == b'.')).count()
    };
    ignored || special(&pat) != special(&file) || hidden(&pat) != hidden(&file)
}

/// The split name `string_to_dict` reads off a sharded base name: the text before the last
/// `-NNNNN-of-NNNN` that has at least one character before it.
fn sharded_split_name(base: &str) -> Option<&str> {
    let shard = |s: &[u8]| {
        s.len() >= 14
            && s[0] == b'-'
            && s[1..6].iter().all(u8::is_ascii_digit)
            && &s[6..10] == b"-of-"
            && s[10..14].iter().all(u8::is_ascii_digit)
    };
    let b = base.as_bytes();
    (1..b.len()).rev().find(|&i| base.is_char_boundary(i) && shard(&b[i..])).map(|i| &base[..i])
}

/// `naming._split_re`, `^\w+(\.\w+)*$` (Python's Unicode `\w`).
fn is_split_name(name: &str) -> bool {
    name.split('.').all(|w| !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// A data file we read: its name ends in `.parquet`.
fn is_parquet(path: &str) -> bool {
    path.ends_with(".parquet")
}

/// Every file under `root` as a `/`-separated relative path, sorted; hidden entries (a name
/// starting with `.` that is not only dots) are skipped, symlinks followed.
fn list_files(root: &Path) -> Result<Vec<String>, DataError> {
    let io = |p: &Path, source| DataError::Io { path: p.display().to_string(), source };
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && !name.bytes().all(|b| b == b'.') {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    fn write(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            write(dir.path(), f);
        }
        dir
    }

    fn rel(root: &Path, files: Vec<PathBuf>) -> Vec<String> {
        files.iter().map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned()).collect()
    }

    /// `split`'s files in a repo holding `files` (no README configs), or the error's text.
    fn find(files: &[&str], config: Option<&str>, split: &str) -> Result<Vec<String>, String> {
        let dir = tree(files);
        find_split_files(dir.path(), config, split)
            .map(|f| rel(dir.path(), f))
            .map_err(|e| e.to_string())
    }

    fn ok(files: &[&str], split: &str) -> Vec<String> {
        find(files, None, split).unwrap()
    }

    #[test]
    fn split_name_in_a_nested_file_name() {
        let files = [
            "README.md",
            "mnist/test-00000-of-00001.parquet",
            "mnist/train-00000-of-00001.parquet",
        ];
        assert_eq!(ok(&files, "test"), ["mnist/test-00000-of-00001.parquet"]);
        assert_eq!(ok(&files, "train"), ["mnist/train-00000-of-00001.parquet"]);
        let files = ["foo/bar_test_01.parquet", "foo/bar_train_01.parquet", "test0.parquet"];
        assert_eq!(ok(&files, "test"), ["test0.parquet", "foo/bar_test_01.parquet"]);
    }

    #[test]
    fn split_named_folders_and_synonyms() {
        let files =
            ["testing/b.parquet", "testing/a.parquet", "dev/x.parquet", "training/t.parquet"];
        assert_eq!(ok(&files, "test"), ["testing/a.parquet", "testing/b.parquet"]);
        assert_eq!(ok(&files, "validation"), ["dev/x.parquet"]);
        assert_eq!(ok(&files, "train"), ["training/t.parquet"]);
        let files = ["eval/a.parquet", "valid/b.parquet", "my-test_1/c.parquet"];
        assert_eq!(ok(&files, "test"), ["my-test_1/c.parquet", "eval/a.parquet"]);
        assert_eq!(ok(&files, "validation"), ["valid/b.parquet"]);
        let files = ["eval.parquet", "valid-0.parquet", "dev_1.parquet", "evaluation 2.parquet"];
        assert_eq!(ok(&files, "test"), ["eval.parquet", "evaluation 2.parquet"]);
        assert_eq!(ok(&files, "validation"), ["valid-0.parquet", "dev_1.parquet"]);
    }

    #[test]
    fn sharded_pattern_finds_free_split_names() {
        let files = [
            "data/contrast-00000-of-00001.parquet",
            "data/gaussian_noise-00001-of-00002.parquet",
            "data/gaussian_noise-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ];
        assert_eq!(ok(&files, "contrast"), ["data/contrast-00000-of-00001.parquet"]);
        assert_eq!(
            ok(&files, "gaussian_noise"),
            [
                "data/gaussian_noise-00000-of-00002.parquet",
                "data/gaussian_noise-00001-of-00002.parquet"
            ]
        );
        let err = find(&files, None, "validation").unwrap_err();
        assert!(err.contains(r#"["test", "contrast", "gaussian_noise"]"#), "{err}");
        // Outside data/, a sharded name is an ordinary file (all train here).
        assert_eq!(
            ok(&["contrast-00000-of-00001.parquet"], "train"),
            ["contrast-00000-of-00001.parquet"]
        );
        let err = find(&["data/my-split-00000-of-00001.parquet"], None, "test").unwrap_err();
        assert!(err.contains(r"^\w+(\.\w+)*$") && err.contains("my-split"), "{err}");
    }

    #[test]
    fn pattern_groups_in_order() {
        // Sharded beats split-named folders: no validation split.
        let files = ["data/test-00000-of-00001.parquet", "validation/x.parquet"];
        assert!(find(&files, None, "validation").is_err());
        // Folders beat file names: no test split.
        let files = ["train/a.parquet", "test-0.parquet"];
        assert_eq!(ok(&files, "train"), ["train/a.parquet"]);
        assert!(find(&files, None, "test").unwrap_err().contains("folder names"));
        // File names beat `**`: the other file is in no split.
        let files = ["test-0.parquet", "other.parquet"];
        assert_eq!(ok(&files, "test"), ["test-0.parquet"]);
        assert!(find(&files, None, "train").is_err());
        assert_eq!(ok(&["b/x.parquet", "a.parquet"], "train"), ["a.parquet", "b/x.parquet"]);
        // A non-data file counts when choosing the group (as in `datasets`).
        let err = find(&["train/notes.txt", "test-0.parquet"], None, "train").unwrap_err();
        assert!(err.contains("train/notes.txt") && err.contains("none of them parquet"), "{err}");
    }

    #[test]
    fn keyword_must_stand_alone() {
        let files = ["latest.parquet", "contest-1.parquet", "testa.parquet", "mytest.parquet"];
        assert!(find(&files, None, "test").is_err());
        assert_eq!(ok(&files, "train").len(), 4);
    }

    #[test]
    fn hidden_special_and_ignored_files() {
        let files = [
            ".git/test-0.parquet",
            "__pycache__/test-1.parquet",
            "a/__x__/test-2.parquet",
            "train/README.md",
            "test/.hidden.parquet",
            "test-3.parquet",
            "test-4.txt",
        ];
        assert_eq!(ok(&files, "test"), ["test-3.parquet"]);
    }

    #[test]
    fn pattern_order_not_sorted_and_duplicates_kept() {
        let files = ["val.parquet", "validation-0.parquet", "dev.parquet"];
        assert_eq!(
            ok(&files, "validation"),
            ["validation-0.parquet", "dev.parquet", "val.parquet"]
        );
        assert_eq!(ok(&["test-eval.parquet"], "test"), ["test-eval.parquet", "test-eval.parquet"]);
    }

    #[test]
    fn a_named_config_without_configs_block() {
        let files = ["mnist/contrast-00000-of-00001.parquet", "mnist/test-00000-of-00001.parquet"];
        assert_eq!(
            find(&files, Some("mnist"), "contrast").unwrap(),
            ["mnist/contrast-00000-of-00001.parquet"]
        );
        let files = ["cropped_digits/test/0000.parquet", "full_numbers/test/0000.parquet"];
        assert_eq!(
            find(&files, Some("cropped_digits"), "test").unwrap(),
            ["cropped_digits/test/0000.parquet"]
        );
        // The parquet converter's partial splits: `datasets`' rules inside the config's folder.
        let files =
            ["cropped_digits/partial-test/0000.parquet", "full_numbers/partial-test/0000.parquet"];
        assert_eq!(
            find(&files, Some("cropped_digits"), "test").unwrap(),
            ["cropped_digits/partial-test/0000.parquet"]
        );
        let files = ["mnist/data/contrast-00000-of-00001.parquet"];
        assert_eq!(
            find(&files, Some("mnist"), "contrast").unwrap(),
            ["mnist/data/contrast-00000-of-00001.parquet"]
        );
        // No such folder: the whole repo.
        let files = ["data/test-00000-of-00001.parquet"];
        assert_eq!(
            find(&files, Some("default"), "test").unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
    }

    #[test]
    fn errors_name_root_split_tries_and_parquet_files() {
        let dir = tree(&["mnist/train-00000-of-00001.parquet", "notes.txt"]);
        let err = find_split_files(dir.path(), Some("mnist"), "test").unwrap_err().to_string();
        for part in [
            dir.path().display().to_string().as_str(),
            "split `test`",
            "`mnist/test-*.parquet`",
            "`mnist/test/*.parquet`",
            "`datasets` 5.0.1's default patterns in `mnist/`",
            r#"found the splits ["train"]"#,
            r#"parquet files: ["mnist/train-00000-of-00001.parquet"]"#,
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
        let err = find(&["README.md"], None, "test").unwrap_err();
        assert!(err.contains("no data files") && err.contains("parquet files: []"), "{err}");
    }

    /// The bundled hub datasets resolve as their README configs say, and `datasets`' default
    /// patterns (the README ignored) give the same files.
    #[test]
    fn fixture_datasets_resolve_as_before() {
        let hub = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_home/hub");
        let mut seen = 0;
        for entry in std::fs::read_dir(&hub).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let Some(repo) = name.strip_prefix("datasets--") else { continue };
            let config = match repo {
                "ufldl-stanford--svhn" => Some("cropped_digits"),
                _ => None,
            };
            let folder = match repo {
                "ufldl-stanford--svhn" => "cropped_digits",
                "ylecun--mnist" => "mnist",
                _ => "data",
            };
            for snapshot in std::fs::read_dir(hub.join(&name).join("snapshots")).unwrap() {
                let root = snapshot.unwrap().path();
                let all = list_files(&root).unwrap();
                for split in ["train", "test"] {
                    let want = [format!("{folder}/{split}-00000-of-00001.parquet")];
                    let got = find_split_files(&root, config, split).unwrap();
                    assert_eq!(rel(&root, got), want, "{repo} {split}");
                    let got = find_without_configs(&root, &all, config, split).unwrap();
                    assert_eq!(rel(&root, got), want, "{repo} {split} without configs");
                    let got = find_without_configs(&root, &all, None, split).unwrap();
                    assert_eq!(rel(&root, got), want, "{repo} {split} without configs or name");
                }
                seen += 1;
            }
        }
        assert_eq!(seen, 8);
    }

    fn strings(v: &Json) -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    }

    /// Replays tests/fixtures/golden/data_files.json (scripts/fixtures/golden_data_files.py):
    /// what `datasets` 5.0.1 gives each split of each tree, and fsspec's glob on each pair.
    #[test]
    fn golden_datasets_data_files() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/data_files.json");
        let golden: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(golden["versions"]["datasets"], DATASETS_VERSION);
        let cases = golden["cases"].as_array().unwrap();
        let mut compared = 0;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("repo");
            std::fs::create_dir(&root).unwrap();
            for f in strings(&case["files"]) {
                write(&root, &f);
            }
            for link in case["links"].as_array().unwrap() {
                let (path, blob) = (link[0].as_str().unwrap(), link[1].as_str().unwrap());
                write(tmp.path(), &format!("blobs/{blob}"));
                let at = root.join(path);
                std::fs::create_dir_all(at.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(tmp.path().join("blobs").join(blob), at).unwrap();
            }
            let all = list_files(&root).unwrap();
            let got = default_patterns(&all);
            match (case["error"].as_str(), &got) {
                (None, Ok((_, patterns))) => {
                    let want: Vec<(String, Vec<String>)> = case["patterns"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_str().unwrap().to_string(), strings(&p[1])))
                        .collect();
                    assert_eq!(patterns, &want, "{name}: patterns");
                }
                (Some("EmptyDatasetError"), Err(NoPatterns::Empty)) => {}
                (Some("ValueError"), Err(NoPatterns::BadSplitNames(_))) => {}
                (want, got) => panic!("{name}: datasets {want:?}, ours {got:?}"),
            }
            let want: BTreeMap<String, Vec<String>> = case["splits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s[0].as_str().unwrap().to_string(), strings(&s[1])))
                .collect();
            let mut queries: BTreeSet<String> = want.keys().cloned().collect();
            queries.extend(["train", "validation", "test"].map(String::from));
            for split in &queries {
                let got = find_split_files(&root, None, split).map(|f| rel(&root, f));
                match want.get(split) {
                    Some(files) if !files.is_empty() => {
                        assert_eq!(got.as_ref().ok(), Some(files), "{name}: split {split}")
                    }
                    _ => assert!(got.is_err(), "{name}: split {split}: {got:?}"),
                }
            }
            compared += 1;
        }
        assert_eq!((compared, cases.len()), (30, 30), "cases compared");
        let globs = golden["globs"].as_array().unwrap();
        for g in globs {
            let (pattern, path) = (g[0].as_str().unwrap(), g[1].as_str().unwrap());
            assert_eq!(glob_match(pattern, path), g[2].as_bool().unwrap(), "{pattern} on {path}");
        }
        assert_eq!(globs.len(), 44, "globs compared");
    }
}
