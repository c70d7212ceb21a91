//! Value overrides (`a.b=value`, `+a.b=value`, `++a.b=value`, `~a.b`) applied to the composed
//! tree in command-line order, with Hydra's rules: a plain override needs an existing key, `+`
//! needs a new one; a mapping merges into a mapping, anything else replaces.

use super::aliases;
use super::error::ConfigError;
use super::node::{split_path, Map, Node};
use super::overrides::{Override, OverrideKind};

/// Apply one value override.
pub(crate) fn apply(
    root: &mut Node,
    ov: &Override,
    choices: &[(String, String)],
) -> Result<(), ConfigError> {
    let segs = split_path(&ov.key);
    let exists = root.get_path(&ov.key).is_some();
    // Hydra treats a key holding null as absent for `+key=value`.
    let occupied = !matches!(root.get_path(&ov.key), None | Some(Node::Null));
    match ov.kind {
        OverrideKind::Delete => {
            let (parent, last) = segs.split_at(segs.len() - 1);
            let parent_node = root.get_path_mut(&parent.join("."));
            let removed = match parent_node {
                Some(Node::Map(m)) => m.remove(&last[0]).is_some(),
                Some(Node::List(l)) => match last[0].parse::<usize>() {
                    Ok(i) if i < l.len() => {
                        l.remove(i);
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !removed {
                return Err(ConfigError::BadOverride {
                    arg: ov.arg.clone(),
                    msg: format!("could not delete from config: '{}' does not exist", ov.key),
                });
            }
            Ok(())
        }
        OverrideKind::Add if occupied => Err(ConfigError::KeyExists { key: ov.key.clone() }),
        OverrideKind::Add | OverrideKind::ForceAdd => set(root, &segs, value(ov), true)
            .map_err(|msg| ConfigError::BadOverride { arg: ov.arg.clone(), msg }),
        OverrideKind::Change => {
            let target = if exists {
                segs
            } else if let Some(s) = aliases::value_key(root, &segs, choices) {
                s
            } else {
                let top: Vec<&str> = root.as_map().map(|m| m.keys().collect()).unwrap_or_default();
                let hint = match aliases::did_you_mean(&segs[0], top.into_iter()) {
                    Some(k) if segs.len() == 1 || root.get_path(&segs[0]).is_none() => {
                        format!(" (did you mean '{k}'?)")
                    }
                    _ => String::new(),
                };
                let arg = ov.arg.trim_start_matches('+').to_string();
                return Err(ConfigError::NoSuchKey { key: ov.key.clone(), arg, hint });
            };
            set(root, &target, value(ov), false)
                .map_err(|msg| ConfigError::BadOverride { arg: ov.arg.clone(), msg })
        }
    }
}

fn value(ov: &Override) -> Node {
    ov.value.clone().unwrap_or(Node::Null)
}

/// Set `segs` to `v`; `create` makes missing maps on the way.
fn set(root: &mut Node, segs: &[String], v: Node, create: bool) -> Result<(), String> {
    let mut node = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        if create && node.child(seg).is_none() {
            match node {
                Node::Map(m) => m
                    .0
                    .push((seg.clone(), if last { Node::Null } else { Node::Map(Map::default()) })),
                Node::Null if i > 0 => {
                    *node = Node::Map(Map::default());
                    let Node::Map(m) = node else { unreachable!() };
                    m.0.push((
                        seg.clone(),
                        if last { Node::Null } else { Node::Map(Map::default()) },
                    ));
                }
                other => return Err(format!("cannot add key '{seg}' under {}", other.kind())),
            }
        }
        node = node
            .child_mut(seg)
            .ok_or_else(|| format!("key '{}' does not exist", segs[..=i].join(".")))?;
    }
    match (&mut *node, v) {
        (Node::Map(_), v @ Node::Map(_)) => node.merge(v),
        (_, v) => *node = v,
    }
    Ok(())
}
