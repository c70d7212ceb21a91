//! `${...}` interpolation, as OmegaConf resolves it: absolute (`${a.b}`) and relative
//! (`${.x}`, `${..x}`, `${...x}`) node references, resolvers `oc.env`, `now`, `hydra`, string
//! interpolation (`${.root_dir}/outputs`), and type preservation when a value is one interpolation.

use super::error::ConfigError;
use super::node::Node;
use std::time::{SystemTime, UNIX_EPOCH};

/// What resolvers need besides the tree.
#[derive(Debug, Clone)]
pub struct Context {
    /// What `${hydra:...}` looks up (`job.config_name`, `runtime.cwd`, ...).
    pub hydra: Node,
    /// The instant `${now:...}` formats (one per run, as Hydra caches it).
    pub now: SystemTime,
}

/// Resolve every interpolation in `root` (like `OmegaConf.resolve`); `???` stays `???`.
pub fn resolve_all(root: &Node, ctx: &Context) -> Result<Node, ConfigError> {
    let mut out = root.clone();
    walk(root, &mut out, &mut Vec::new(), ctx)?;
    Ok(out)
}

fn walk(
    root: &Node,
    node: &mut Node,
    path: &mut Vec<String>,
    ctx: &Context,
) -> Result<(), ConfigError> {
    match node {
        Node::Str(s) if s.contains("${") => {
            let s = s.clone();
            *node = resolve_string(root, path, &s, ctx, 0)?;
        }
        Node::Map(m) => {
            for (k, v) in m.0.iter_mut() {
                path.push(k.clone());
                walk(root, v, path, ctx)?;
                path.pop();
            }
        }
        Node::List(l) => {
            for (i, v) in l.iter_mut().enumerate() {
                path.push(i.to_string());
                walk(root, v, path, ctx)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Resolve the node at `key` (following interpolations); None when the key does not exist.
pub fn resolve_path(root: &Node, key: &str, ctx: &Context) -> Result<Option<Node>, ConfigError> {
    let Some(n) = root.get_path(key) else { return Ok(None) };
    let path: Vec<String> = super::node::split_path(key);
    let mut out = n.clone();
    let mut p = path.clone();
    walk(root, &mut out, &mut p, ctx)?;
    Ok(Some(out))
}

fn err(path: &[String], expr: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Interpolation { key: path.join("."), expr: expr.to_string(), msg: msg.into() }
}

/// Find the `}` closing the `${` at `start` (nested `${}` and quotes respected).
fn closing(s: &str, start: usize) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut i, mut quote) = (0usize, start, None::<u8>);
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q && b[i - 1] != b'\\' => quote = None,
            Some(_) => {}
            None if c == b'$' && b.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            None if (c == b'\'' || c == b'"') && depth > 1 => quote = Some(c),
            None if c == b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            None => {}
        }
        i += 1;
    }
    None
}

/// Resolve a string value located at `path`.
fn resolve_string(
    root: &Node,
    path: &[String],
    s: &str,
    ctx: &Context,
    depth: usize,
) -> Result<Node, ConfigError> {
    if depth > 64 {
        return Err(err(path, s, "interpolation cycle"));
    }
    let mut parts: Vec<Node> = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let mut whole = true;
    while i < s.len() {
        if s[i..].starts_with("\\${") {
            text.push_str("${");
            i += 3;
            whole = false;
            continue;
        }
        if s[i..].starts_with("${") {
            let end = closing(s, i).ok_or_else(|| err(path, s, "unterminated '${'"))?;
            let expr = &s[i + 2..end];
            if !text.is_empty() {
                parts.push(Node::Str(std::mem::take(&mut text)));
            }
            parts.push(eval(root, path, expr, ctx, depth + 1)?);
            i = end + 1;
            continue;
        }
        let c = s[i..].chars().next().expect("in bounds");
        text.push(c);
        i += c.len_utf8();
    }
    if !text.is_empty() {
        parts.push(Node::Str(text));
    }
    if whole && parts.len() == 1 && s.starts_with("${") && s.ends_with('}') {
        return Ok(parts.pop().expect("one part"));
    }
    let mut out = String::new();
    for p in parts {
        if matches!(p, Node::Missing) {
            return Err(err(path, s, "it refers to a ??? (missing) value: set that value first"));
        }
        out.push_str(&p.to_interp_string());
    }
    Ok(Node::Str(out))
}

fn is_resolver(expr: &str) -> Option<(&str, &str)> {
    let (name, args) = expr.split_once(':')?;
    let ok = !name.is_empty()
        && name.split('.').all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    ok.then_some((name, args))
}

fn eval(
    root: &Node,
    path: &[String],
    expr: &str,
    ctx: &Context,
    depth: usize,
) -> Result<Node, ConfigError> {
    let expr_t = expr.trim();
    if let Some((name, args)) = is_resolver(expr_t) {
        let args = split_args(args).map_err(|m| err(path, expr, m))?;
        let mut vals = Vec::new();
        for a in &args {
            vals.push(eval_arg(root, path, a, ctx, depth)?);
        }
        return match name {
            "oc.env" => {
                let var = vals
                    .first()
                    .map(Node::to_interp_string)
                    .ok_or_else(|| err(path, expr, "oc.env needs a variable name"))?;
                match std::env::var(&var) {
                    Ok(v) => Ok(Node::Str(v)),
                    Err(_) => match vals.get(1) {
                        Some(Node::Null) => Ok(Node::Null),
                        Some(d) => Ok(Node::Str(d.to_interp_string())),
                        None => Err(err(
                            path,
                            expr,
                            format!(
                                "environment variable '{var}' is not set and no default is given"
                            ),
                        )),
                    },
                }
            }
            "now" => Ok(Node::Str(strftime(&args.join(","), ctx.now))),
            "hydra" => {
                let key = vals.first().map(Node::to_interp_string).unwrap_or_default();
                let n = ctx.hydra.get_path(&key).ok_or_else(|| {
                    err(path, expr, format!("hydra key '{key}' is not available"))
                })?;
                match n {
                    Node::Str(s) if s.contains("${") => {
                        resolve_string(root, &["hydra".into(), key.clone()], s, ctx, depth)
                    }
                    n => Ok(n.clone()),
                }
            }
            other => Err(err(
                path,
                expr,
                format!("unsupported resolver '{other}' (supported: oc.env, now, hydra)"),
            )),
        };
    }
    // A node reference.
    let dots = expr_t.chars().take_while(|c| *c == '.').count();
    let rest = &expr_t[dots..];
    let mut target: Vec<String> = if dots == 0 {
        Vec::new()
    } else {
        let up = dots; // `.x` is a sibling: drop the value's own key, then one more per extra dot
        if up > path.len() {
            return Err(err(path, expr, "relative interpolation goes above the root"));
        }
        path[..path.len() - up].to_vec()
    };
    for seg in rest.replace('[', ".").replace(']', "").split('.').filter(|s| !s.is_empty()) {
        target.push(seg.to_string());
    }
    let key = target.join(".");
    let node =
        root.get_path(&key).ok_or_else(|| err(path, expr, format!("key '{key}' not found")))?;
    match node {
        Node::Str(s) if s.contains("${") => resolve_string(root, &target, s, ctx, depth),
        Node::Map(_) | Node::List(_) => {
            resolve_path(root, &key, ctx).map(|n| n.unwrap_or(Node::Null))
        }
        n => Ok(n.clone()),
    }
}

fn split_args(args: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut cur) = (0i32, None::<char>, String::new());
    let mut prev = '\0';
    for c in args.chars() {
        match quote {
            Some(q) if c == q && prev != '\\' => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' if depth == 0 => quote = Some(c),
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(std::mem::take(&mut cur));
                    prev = c;
                    continue;
                }
                _ => {}
            },
        }
        cur.push(c);
        prev = c;
    }
    if quote.is_some() {
        return Err("unterminated quoted string".into());
    }
    if !args.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

fn eval_arg(
    root: &Node,
    path: &[String],
    arg: &str,
    ctx: &Context,
    depth: usize,
) -> Result<Node, ConfigError> {
    let a = arg.trim();
    for q in ['\'', '"'] {
        if a.len() >= 2 && a.starts_with(q) && a.ends_with(q) {
            let inner = a[1..a.len() - 1].replace(&format!("\\{q}"), &q.to_string());
            return if inner.contains("${") {
                resolve_string(root, path, &inner, ctx, depth)
            } else {
                Ok(Node::Str(inner))
            };
        }
    }
    if a.contains("${") {
        return resolve_string(root, path, a, ctx, depth);
    }
    Ok(match a.to_ascii_lowercase().as_str() {
        "null" => Node::Null,
        "true" => Node::Bool(true),
        "false" => Node::Bool(false),
        _ => a.parse::<i64>().map(Node::Int).unwrap_or_else(|_| Node::Str(a.to_string())),
    })
}

/// `strftime` for the directives Hydra configs use, in UTC (no time-zone database here).
pub fn strftime(fmt: &str, t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y:04}")),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('s') => out.push_str(&secs.to_string()),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
