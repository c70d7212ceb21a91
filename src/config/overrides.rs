//! The command line: Hydra's flags (`--config-name`, `--cfg job`, ...) and override words
//! (`group=option`, `a.b=value`, `+a.b=value`, `~a.b`), with values typed by Hydra's override
//! grammar (int, float, bool, null, quoted strings, `[lists]`, `{maps}`).

use super::error::ConfigError;
use super::node::{Map, Node};
use std::path::PathBuf;

/// What `--cfg` asked to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgKind {
    /// `--cfg job`: the config without the `hydra` node.
    Job,
    /// `--cfg hydra`: only the `hydra` node.
    Hydra,
    /// `--cfg all`: everything.
    All,
}

/// How an override word changes the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideKind {
    /// `key=value`: the key must exist.
    Change,
    /// `+key=value`: the key must not exist.
    Add,
    /// `++key=value`: set whether it exists or not.
    ForceAdd,
    /// `~key` or `~key=value`: delete.
    Delete,
}

/// One override word.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// How it applies.
    pub kind: OverrideKind,
    /// The key (`method`, `method.scaling_factor`, `fabric/loggers`).
    pub key: String,
    /// `@package` after the key, if any (`group@pkg=option`).
    pub package: Option<String>,
    /// The typed value (None for `~key`).
    pub value: Option<Node>,
    /// The value's text as written (used for group options).
    pub raw_value: Option<String>,
    /// The whole word as given.
    pub arg: String,
}

/// The parsed command line.
#[derive(Debug, Clone, Default)]
pub struct CliArgs {
    /// `--config-name/-cn`.
    pub config_name: Option<String>,
    /// `--config-path/-cp`: replaces the primary config directory.
    pub config_path: Option<PathBuf>,
    /// `--config-dir/-cd`: added to the search path (after the primary directory).
    pub config_dirs: Vec<PathBuf>,
    /// `--cfg/-c`.
    pub cfg: Option<CfgKind>,
    /// `--resolve`.
    pub resolve: bool,
    /// `--package/-p`.
    pub package: Option<String>,
    /// The override words, in order.
    pub overrides: Vec<Override>,
}

fn flag_value<'a>(
    args: &'a [String],
    i: &mut usize,
    inline: Option<&'a str>,
    flag: &str,
) -> Result<&'a str, ConfigError> {
    if let Some(v) = inline {
        return Ok(v);
    }
    *i += 1;
    args.get(*i).map(String::as_str).ok_or_else(|| ConfigError::BadOverride {
        arg: flag.to_string(),
        msg: "this flag needs a value".into(),
    })
}

/// Parse the command line (without the program name).
pub fn parse_args(args: &[String]) -> Result<CliArgs, ConfigError> {
    let mut out = CliArgs::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        if let Some(flag) = arg.strip_prefix('-') {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            match name {
                "-config-name" | "cn" => {
                    out.config_name = Some(flag_value(args, &mut i, inline, arg)?.to_string())
                }
                "-config-path" | "cp" => {
                    out.config_path = Some(PathBuf::from(flag_value(args, &mut i, inline, arg)?))
                }
                "-config-dir" | "cd" => {
                    out.config_dirs.push(PathBuf::from(flag_value(args, &mut i, inline, arg)?))
                }
                "-cfg" | "c" => {
                    out.cfg = Some(match flag_value(args, &mut i, inline, arg)? {
                        "job" => CfgKind::Job,
                        "hydra" => CfgKind::Hydra,
                        "all" => CfgKind::All,
                        other => {
                            return Err(ConfigError::BadOverride {
                                arg: format!("--cfg {other}"),
                                msg: "expected one of job, hydra, all".into(),
                            })
                        }
                    })
                }
                "-package" | "p" => {
                    out.package = Some(flag_value(args, &mut i, inline, arg)?.to_string())
                }
                "-resolve" => out.resolve = true,
                "-multirun" | "m" => {
                    return Err(ConfigError::Unsupported(
                        "--multirun is not supported: run one command per setting (or use the sweep runner)"
                            .into(),
                    ))
                }
                _ => {
                    return Err(ConfigError::BadOverride {
                        arg: arg.to_string(),
                        msg: "unknown flag (known: --config-name/-cn, --config-path/-cp, \
                              --config-dir/-cd, --cfg/-c job|hydra|all, --resolve, --package/-p)"
                            .into(),
                    })
                }
            }
        } else {
            out.overrides.push(parse_override(arg)?);
        }
        i += 1;
    }
    Ok(out)
}

fn bad(arg: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::BadOverride { arg: arg.to_string(), msg: msg.into() }
}

/// Parse one override word.
pub fn parse_override(arg: &str) -> Result<Override, ConfigError> {
    let (kind, rest) = if let Some(r) = arg.strip_prefix("++") {
        (OverrideKind::ForceAdd, r)
    } else if let Some(r) = arg.strip_prefix('+') {
        (OverrideKind::Add, r)
    } else if let Some(r) = arg.strip_prefix('~') {
        (OverrideKind::Delete, r)
    } else {
        (OverrideKind::Change, arg)
    };
    let (key_part, value) = match rest.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None if kind == OverrideKind::Delete => (rest, None),
        None => return Err(bad(arg, "expected key=value (or ~key to delete)")),
    };
    let (key, package) = match key_part.split_once('@') {
        Some((k, p)) => (k, Some(p.to_string())),
        None => (key_part, None),
    };
    let key_ok = !key.is_empty()
        && key.chars().all(|c| c.is_alphanumeric() || "_-./$".contains(c))
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..");
    if !key_ok {
        return Err(bad(arg, format!("'{key}' is not a valid key (letters, digits, _ - . /)")));
    }
    let typed = match value {
        Some(v) => Some(parse_value(v).map_err(|m| bad(arg, m))?),
        None => None,
    };
    Ok(Override {
        kind,
        key: key.to_string(),
        package,
        value: typed,
        raw_value: value.map(|v| unquote(v.trim()).to_string()),
        arg: arg.to_string(),
    })
}

fn unquote(v: &str) -> &str {
    for q in ['\'', '"'] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// Split at top-level commas (outside quotes, brackets and `${...}`).
pub fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0);
    let mut prev = '\0';
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q && prev != '\\' => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => quote = Some(c),
                '[' | '{' | '(' => depth += 1,
                ']' | '}' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
        if depth < 0 {
            return Err("unbalanced brackets".into());
        }
        prev = c;
    }
    if quote.is_some() {
        return Err("unterminated quoted string".into());
    }
    if depth != 0 {
        return Err("unbalanced brackets".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// Type a value like Hydra's override grammar.
pub fn parse_value(v: &str) -> Result<Node, String> {
    let parts = split_top(v)?;
    if parts.len() > 1 {
        return Err(format!(
            "ambiguous value '{v}': to use it as a list write [{v}], to use it as a string quote it ('{v}'); sweeps (--multirun) are not supported"
        ));
    }
    parse_element(v)
}

fn parse_element(v: &str) -> Result<Node, String> {
    let t = v.trim();
    if let Some(q) = t.chars().next().filter(|c| *c == '\'' || *c == '"') {
        if t.len() < 2 || !t.ends_with(q) {
            return Err(format!("unterminated quoted string {t}"));
        }
        let inner = &t[1..t.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' && chars.peek() == Some(&q) {
                out.push(q);
                chars.next();
            } else if c == q {
                return Err(format!("unexpected quote inside {t}"));
            } else {
                out.push(c);
            }
        }
        return Ok(Node::Str(out));
    }
    if let Some(inner) = t.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("a list must end with ']'")?;
        if inner.trim().is_empty() {
            return Ok(Node::List(Vec::new()));
        }
        return split_top(inner)?
            .into_iter()
            .map(parse_element)
            .collect::<Result<_, _>>()
            .map(Node::List);
    }
    if let Some(inner) = t.strip_prefix('{') {
        let inner = inner.strip_suffix('}').ok_or("a mapping must end with '}'")?;
        let mut m = Map::default();
        if !inner.trim().is_empty() {
            for item in split_top(inner)? {
                let (k, val) =
                    item.split_once(':').ok_or_else(|| format!("'{item}' is not key:value"))?;
                m.insert(unquote(k.trim()), parse_element(val)?);
            }
        }
        return Ok(Node::Map(m));
    }
    parse_primitive(t)
}

fn parse_primitive(t: &str) -> Result<Node, String> {
    let lower = t.to_ascii_lowercase();
    match lower.as_str() {
        "null" => return Ok(Node::Null),
        "true" => return Ok(Node::Bool(true)),
        "false" => return Ok(Node::Bool(false)),
        "" => return Ok(Node::Str(String::new())),
        _ => {}
    }
    let digits = t.trim_start_matches(['+', '-']);
    let is_int = !digits.is_empty()
        && t.len() - digits.len() <= 1
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
        && digits.starts_with(|c: char| c.is_ascii_digit())
        && !digits.ends_with('_')
        && !(digits.len() > 1 && digits.starts_with('0'));
    if is_int {
        if let Ok(i) = t.replace('_', "").parse::<i64>() {
            return Ok(Node::Int(i));
        }
    }
    let body = lower.trim_start_matches(['+', '-']);
    let is_float = lower.len() - body.len() <= 1
        && (body == "inf"
            || body == "nan"
            || (body.chars().all(|c| c.is_ascii_digit() || "._e+-".contains(c))
                && body.chars().any(|c| c.is_ascii_digit())
                && (body.contains('.') || body.contains('e'))
                && !body.starts_with('e')));
    if is_float {
        if let Ok(f) = lower.replace('_', "").parse::<f64>() {
            return Ok(Node::Float(f));
        }
    }
    check_unquoted(t)?;
    Ok(Node::Str(t.to_string()))
}

/// Characters Hydra refuses in an unquoted string (outside `${...}`).
fn check_unquoted(t: &str) -> Result<(), String> {
    let mut depth = 0;
    let b = t.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'$' if b.get(i + 1) == Some(&b'{') => {}
            b'{' if i > 0 && b[i - 1] == b'$' => depth += 1,
            b'{' if depth > 0 => depth += 1,
            b'}' if depth > 0 => depth -= 1,
            b'=' | b'(' | b')' | b'[' | b']' | b'{' | b'}' | b'\'' | b'"' if depth == 0 => {
                return Err(format!(
                    "the unquoted value '{t}' contains '{}': quote the value ('...')",
                    c as char
                ))
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unterminated interpolation in '{t}'"));
    }
    Ok(())
}
