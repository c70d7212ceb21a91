//! Stale names from FusionBench's docs and examples (spec §1.11), mapped to today's config tree
//! with a warning. FusionBench 0.2.33 itself rejects every one of these.

use super::node::Node;
use super::repo::Repo;

/// Old method names that moved into sub-folders.
const METHOD_ALIASES: &[(&str, &str)] = &[
    ("clip_fisher_merging", "fisher_merging/clip_fisher_merging"),
    ("clip_regmean", "regmean/clip_regmean"),
    ("weight_ensembling_moe", "wemoe/weight_ensembling_moe"),
    ("task_vector_cos_similarity", "analysis/task_vector_cos_similarity"),
    ("adamerging", "adamerging/clip"),
];

/// Groups whose options moved under a class-named sub-folder.
const GROUP_PREFIXES: &[(&str, &str)] =
    &[("modelpool", "CLIPVisionModelPool"), ("taskpool", "CLIPVisionModelTaskPool")];

/// Method keys that were renamed: (method option, old key, new key).
const KEY_RENAMES: &[(&str, &str, &str)] =
    &[("analysis/task_vector_cos_similarity", "save_to_csv", "output_path")];

/// The current name of a `method=` option (`adamerging` → `adamerging/clip`); others unchanged.
pub fn current_method_option(option: &str) -> &str {
    METHOD_ALIASES.iter().find(|(a, _)| *a == option).map_or(option, |(_, b)| b)
}

/// The list of stale names handled, for docs and reports: (stale, current).
pub fn stale_names() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = METHOD_ALIASES
        .iter()
        .map(|(a, b)| (format!("method={a}"), format!("method={b}")))
        .collect();
    for (g, p) in GROUP_PREFIXES {
        v.push((format!("{g}=NAME"), format!("{g}={p}/NAME")));
    }
    v.push((
        "modelpool.models.<name>.pretrained_model_name_or_path=X (model given as a string)".into(),
        "modelpool.models.<name>=X".into(),
    ));
    v.push((
        "modelpool.models.<i>.path=X (v0.1 list style)".into(),
        "the i-th model of modelpool.models".into(),
    ));
    v.push((
        "method.save_to_csv=X (task_vector_cos_similarity)".into(),
        "method.output_path=X".into(),
    ));
    v
}

/// The option to load for `group=option`: the option itself when its file exists, else the
/// current name of a stale one (with a warning), else the option unchanged (the caller reports
/// the unknown option).
pub(crate) fn group_option(repo: &Repo, group: &str, option: &str) -> String {
    if repo.find(&format!("{group}/{option}")).is_some() {
        return option.to_string();
    }
    if group == "method" {
        if let Some((_, new)) = METHOD_ALIASES.iter().find(|(old, _)| *old == option) {
            tracing::warn!(
                "method={option} is a stale name (FusionBench < 0.2 docs); using method={new}"
            );
            return new.to_string();
        }
    }
    for (g, prefix) in GROUP_PREFIXES {
        let candidate = format!("{prefix}/{option}");
        if group == *g && repo.find(&format!("{group}/{candidate}")).is_some() {
            tracing::warn!("{group}={option} is a stale name; using {group}={candidate}");
            return candidate;
        }
    }
    option.to_string()
}

/// Rewrite the key path of a `key=value` override whose path does not exist in `root` but names a
/// stale spelling of one that does. Returns the rewritten segments, or None.
pub(crate) fn value_key(
    root: &Node,
    segs: &[String],
    choices: &[(String, String)],
) -> Option<Vec<String>> {
    // Walk as far as the path exists.
    let mut node = root;
    let mut out: Vec<String> = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        let in_models = out.len() == 2 && out[0] == "modelpool" && out[1] == "models";
        if let Some(child) = node.child(seg) {
            node = child;
            out.push(seg.clone());
            continue;
        }
        // `modelpool.models.0...`: the model at that position (v0.1 list style).
        if in_models {
            if let (Ok(idx), Node::Map(m)) = (seg.parse::<usize>(), node) {
                let (name, child) = m.iter().nth(idx)?;
                tracing::warn!(
                    "modelpool.models.{idx} is v0.1 list syntax; modelpool.models is a mapping now: using model '{name}'"
                );
                node = child;
                out.push(name.to_string());
                continue;
            }
        }
        let rest = &segs[i..];
        let model_level = out.len() == 3 && out[0] == "modelpool" && out[1] == "models";
        if model_level && rest.len() == 1 {
            match (node, rest[0].as_str()) {
                // A model given as a plain id: `...pretrained_model_name_or_path` / `.path` set the id.
                (Node::Str(_), "pretrained_model_name_or_path" | "path") => {
                    tracing::warn!(
                        "{}.{} does not exist (the model is given as a string); setting {} instead",
                        out.join("."),
                        rest[0],
                        out.join(".")
                    );
                    return Some(out);
                }
                (Node::Map(m), "path") if m.get("pretrained_model_name_or_path").is_some() => {
                    tracing::warn!(
                        "{}.path is v0.1 syntax; setting {}.pretrained_model_name_or_path",
                        out.join("."),
                        out.join(".")
                    );
                    out.push("pretrained_model_name_or_path".into());
                    return Some(out);
                }
                _ => {}
            }
        }
        if out.len() == 1 && out[0] == "method" && rest.len() == 1 {
            let method = choices.iter().find(|(g, _)| g == "method").map(|(_, c)| c.as_str());
            // The choice may still be the stale option name (`task_vector_cos_similarity`).
            let method = method.map(|c| {
                METHOD_ALIASES.iter().find(|(old, _)| *old == c).map_or(c, |(_, new)| *new)
            });
            for (m, old, new) in KEY_RENAMES {
                if Some(*m) == method && rest[0] == *old && node.child(new).is_some() {
                    tracing::warn!("method.{old} was renamed to method.{new}");
                    out.push(new.to_string());
                    return Some(out);
                }
            }
        }
        return None;
    }
    Some(out)
}

/// A near miss among `candidates` for a mistyped key (one edit or one transposition away).
pub(crate) fn did_you_mean<'a>(
    key: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .filter(|c| edit_distance(key, c) <= 2)
        .min_by_key(|c| edit_distance(key, c))
        .map(str::to_string)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}
