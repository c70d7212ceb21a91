//! Publishing a new split: the finished parquet file renamed into place and the dataset card
//! (README.md front matter) updated, so that split resolution ([`crate::data::files`]) finds it.
//!
//! A card with a `configs:` block lists the data files of each split: the new split is added to
//! the default config as `{split: NAME, path: data/NAME-*}`, and to `dataset_info.splits` with
//! its row count and bytes. A repository without `configs:` needs no card change:
//! `data/NAME-00000-of-00001.parquet` matches `datasets`' sharded pattern. Either way the
//! result is checked after the rename: the new split must resolve to exactly its file and the
//! source split to the files it had; otherwise both changes are undone and the error says why.
//! The card is replaced by rename (a hub-cache snapshot's README.md is usually a symlink into
//! `blobs/`; the link is replaced, the blob is never written).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_yaml_ng::{Mapping, Value};

use crate::data::files;

/// The card's text with `name` added, or `None` when the card needs no change.
pub fn updated_card(text: &str, name: &str, rows: u64, num_bytes: u64) -> Result<Option<String>> {
    let Some(rest) = text.strip_prefix("---\n") else { return Ok(None) };
    let Some(end) = rest.find("\n---\n").or_else(|| rest.strip_suffix("\n---").map(|r| r.len()))
    else {
        return Ok(None);
    };
    let (yaml, body) = (&rest[..end], &rest[(end + 5).min(rest.len())..]);
    let mut front: Value = serde_yaml_ng::from_str(yaml).context("the card's front matter")?;
    let Some(configs) = front.get_mut("configs").and_then(Value::as_sequence_mut) else {
        return Ok(None);
    };
    let pick = configs
        .iter()
        .position(|c| c.get("default").and_then(Value::as_bool) == Some(true))
        .or_else(|| {
            configs.iter().position(|c| {
                c.get("config_name").and_then(Value::as_str).unwrap_or("default") == "default"
            })
        })
        .or_else(|| (configs.len() == 1).then_some(0))
        .context("the card has several configs and none is the default")?;
    let path = format!("data/{name}-*");
    let entry = |split: &str, path: Value| {
        let mut m = Mapping::new();
        m.insert("split".into(), split.into());
        m.insert("path".into(), path);
        Value::Mapping(m)
    };
    let config = configs[pick].as_mapping_mut().context("a `configs` entry is not a mapping")?;
    let data_files =
        config.get_mut("data_files").context("the default config has no data_files")?;
    match data_files {
        Value::Sequence(list) if list.iter().all(Value::is_mapping) => {
            list.retain(|e| e.get("split").and_then(Value::as_str) != Some(name));
            list.push(entry(name, path.into()));
        }
        Value::Mapping(map) => {
            map.insert(name.into(), path.into());
        }
        other => {
            // A glob or a list of globs: the `train` split.
            let train = other.clone();
            *other = Value::Sequence(vec![entry("train", train), entry(name, path.into())]);
        }
    }
    if let Some(splits) = front
        .get_mut("dataset_info")
        .and_then(|d| d.get_mut("splits"))
        .and_then(Value::as_sequence_mut)
    {
        splits.retain(|s| s.get("name").and_then(Value::as_str) != Some(name));
        let mut m = Mapping::new();
        m.insert("name".into(), name.into());
        m.insert("num_bytes".into(), num_bytes.into());
        m.insert("num_examples".into(), rows.into());
        splits.push(Value::Mapping(m));
    }
    let yaml = serde_yaml_ng::to_string(&front).context("writing the card's front matter")?;
    Ok(Some(format!("---\n{yaml}---\n{body}")))
}

/// The old card, to restore: a symlink's target or a file's text.
enum OldCard {
    Missing,
    Link(PathBuf),
    Text(String),
}

/// Renames `tmp` to `target`, updates the card of the snapshot at `root`, checks that the split
/// `name` resolves to `target` and `source` to its old files, and undoes it all if not.
pub fn publish(
    root: &Path,
    source: &str,
    name: &str,
    tmp: &Path,
    target: &Path,
    rows: u64,
    num_bytes: u64,
) -> Result<()> {
    let readme = root.join("README.md");
    let source_files = files::find_split_files(root, None, source)?;
    let old = match std::fs::symlink_metadata(&readme) {
        Err(_) => OldCard::Missing,
        Ok(m) if m.file_type().is_symlink() => OldCard::Link(std::fs::read_link(&readme)?),
        Ok(_) => OldCard::Text(std::fs::read_to_string(&readme)?),
    };
    let text = match &old {
        OldCard::Missing => None,
        _ => Some(
            std::fs::read_to_string(&readme)
                .with_context(|| format!("reading {}", readme.display()))?,
        ),
    };
    let new_card = match &text {
        Some(t) => updated_card(t, name, rows, num_bytes)?,
        None => None,
    };
    let card_tmp = root.join(format!(".README.md.{}.partial", std::process::id()));
    if let Some(card) = &new_card {
        std::fs::write(&card_tmp, card)
            .with_context(|| format!("writing {}", card_tmp.display()))?;
        std::fs::File::open(&card_tmp)?.sync_all()?;
    }
    let undo = |card_changed: bool| {
        let _ = std::fs::remove_file(target);
        let _ = std::fs::remove_file(&card_tmp);
        if card_changed {
            match &old {
                OldCard::Missing => {
                    let _ = std::fs::remove_file(&readme);
                }
                OldCard::Link(t) => {
                    let _ = std::fs::remove_file(&readme);
                    let _ = std::os::unix::fs::symlink(t, &readme);
                }
                OldCard::Text(t) => {
                    let _ = std::fs::write(&readme, t);
                }
            }
        }
    };
    if let Err(e) = std::fs::rename(tmp, target) {
        let _ = std::fs::remove_file(tmp);
        let _ = std::fs::remove_file(&card_tmp);
        return Err(e)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()));
    }
    if new_card.is_some() {
        if let Err(e) = std::fs::rename(&card_tmp, &readme) {
            undo(false);
            return Err(e).with_context(|| format!("replacing {}", readme.display()));
        }
    }
    let found = files::find_split_files(root, None, name);
    let source_after = files::find_split_files(root, None, source);
    let ok_new = matches!(&found, Ok(f) if f.as_slice() == [target.to_path_buf()]);
    let ok_source = matches!(&source_after, Ok(f) if *f == source_files);
    if !(ok_new && ok_source) {
        undo(new_card.is_some());
        bail!(
            "after writing, split `{name}` resolves to {found:?} and split `{source}` to {source_after:?} \
             (was {source_files:?}); the repository's layout does not take a new split under data/ \
             without a `configs:` block in README.md; nothing was changed"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_gains_the_split_in_configs_and_dataset_info() {
        let card = "---\ndataset_info:\n  splits:\n  - name: test\n    num_bytes: 1\n    num_examples: 2\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n---\n\n# body\n";
        let new = updated_card(card, "contrast", 5, 77).unwrap().unwrap();
        assert!(new.ends_with("---\n\n# body\n"), "{new}");
        assert!(new.contains("- split: contrast\n    path: data/contrast-*"), "{new}");
        assert!(new.contains("name: contrast\n    num_bytes: 77\n    num_examples: 5"), "{new}");
        // Idempotent for a rewritten split.
        let again = updated_card(&new, "contrast", 5, 77).unwrap().unwrap();
        assert_eq!(again.matches("split: contrast").count(), 1);
        assert_eq!(updated_card("# no front matter\n", "x", 1, 1).unwrap(), None);
        assert_eq!(updated_card("---\na: 1\n---\n", "x", 1, 1).unwrap(), None);
    }
}
