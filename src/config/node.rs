//! The config tree: an ordered YAML-like value (OmegaConf's `DictConfig`/`ListConfig` without
//! the type machinery), with `Missing` for `???`.

use super::error::ConfigError;
use serde_yaml_ng::Value as Yaml;

/// One node of a composed config.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `null` / `~`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string; may hold `${...}` interpolations until resolved.
    Str(String),
    /// A sequence.
    List(Vec<Node>),
    /// A mapping in insertion order.
    Map(Map),
    /// `???`: a mandatory value nobody set.
    Missing,
}

/// An insertion-ordered string-keyed map (config maps are small: a linear scan is fine).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Map(pub Vec<(String, Node)>);

impl Map {
    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// The value at `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Set `key` (keeps its position when it exists, appends otherwise).
    pub fn insert(&mut self, key: &str, value: Node) {
        match self.get_mut(key) {
            Some(v) => *v = value,
            None => self.0.push((key.to_string(), value)),
        }
    }
    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Node> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }
    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Join a key path for messages: `""` + `a` → `a`, `a` + `b` → `a.b`.
pub fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Node {
    /// An empty map.
    pub fn empty_map() -> Node {
        Node::Map(Map::default())
    }

    /// Convert a parsed YAML value. `???` becomes [`Node::Missing`].
    pub fn from_yaml(v: &Yaml, what: &str) -> Result<Node, ConfigError> {
        Ok(match v {
            Yaml::Null => Node::Null,
            Yaml::Bool(b) => Node::Bool(*b),
            Yaml::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Node::Int(i)
                } else {
                    Node::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Yaml::String(s) if s == "???" => Node::Missing,
            Yaml::String(s) => Node::Str(s.clone()),
            Yaml::Sequence(seq) => {
                Node::List(seq.iter().map(|x| Node::from_yaml(x, what)).collect::<Result<_, _>>()?)
            }
            Yaml::Mapping(m) => {
                let mut out = Map::default();
                for (k, v) in m {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Bool(b) => b.to_string(),
                        Yaml::Number(n) => n.to_string(),
                        Yaml::Null => "null".into(),
                        _ => {
                            return Err(ConfigError::Parse {
                                what: what.into(),
                                msg: format!("unsupported mapping key {k:?}"),
                            })
                        }
                    };
                    out.insert(&key, Node::from_yaml(v, what)?);
                }
                Node::Map(out)
            }
            Yaml::Tagged(t) => Node::from_yaml(&t.value, what)?,
        })
    }

    /// Parse YAML text (a file's content); an empty document is an empty map.
    pub fn parse_yaml(text: &str, what: &str) -> Result<Node, ConfigError> {
        let v: Yaml = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::Parse { what: what.into(), msg: e.to_string() })?;
        match v {
            Yaml::Null => Ok(Node::empty_map()),
            v => Node::from_yaml(&v, what),
        }
    }

    /// Convert to a YAML value for printing (`???` prints as `???`).
    pub fn to_yaml(&self) -> Yaml {
        match self {
            Node::Null => Yaml::Null,
            Node::Bool(b) => Yaml::Bool(*b),
            Node::Int(i) => Yaml::Number((*i).into()),
            Node::Float(f) => Yaml::Number((*f).into()),
            Node::Str(s) => Yaml::String(s.clone()),
            Node::Missing => Yaml::String("???".into()),
            Node::List(l) => Yaml::Sequence(l.iter().map(Node::to_yaml).collect()),
            Node::Map(m) => {
                let mut out = serde_yaml_ng::Mapping::new();
                for (k, v) in m.iter() {
                    out.insert(Yaml::String(k.to_string()), v.to_yaml());
                }
                Yaml::Mapping(out)
            }
        }
    }

    /// Print as YAML (block style, keys in order), like `OmegaConf.to_yaml`.
    pub fn to_yaml_string(&self) -> String {
        match self {
            Node::Map(m) if m.is_empty() => "{}\n".into(),
            _ => serde_yaml_ng::to_string(&self.to_yaml()).unwrap_or_default(),
        }
    }

    /// Convert to JSON for serde; a `???` anywhere is an error naming its full key path.
    pub fn to_json(&self, path: &str) -> Result<serde_json::Value, ConfigError> {
        use serde_json::Value as J;
        Ok(match self {
            Node::Null => J::Null,
            Node::Bool(b) => J::Bool(*b),
            Node::Int(i) => J::from(*i),
            Node::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
            Node::Str(s) => J::String(s.clone()),
            Node::Missing => return Err(ConfigError::missing(path)),
            Node::List(l) => J::Array(
                l.iter()
                    .enumerate()
                    .map(|(i, v)| v.to_json(&join_key(path, &i.to_string())))
                    .collect::<Result<_, _>>()?,
            ),
            Node::Map(m) => {
                let mut out = serde_json::Map::new();
                for (k, v) in m.iter() {
                    out.insert(k.to_string(), v.to_json(&join_key(path, k))?);
                }
                J::Object(out)
            }
        })
    }

    /// The child at one key (a map key, or a list index).
    pub fn child(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(m) => m.get(key),
            Node::List(l) => key.parse::<usize>().ok().and_then(|i| l.get(i)),
            _ => None,
        }
    }

    /// The child at one key, mutably.
    pub fn child_mut(&mut self, key: &str) -> Option<&mut Node> {
        match self {
            Node::Map(m) => m.get_mut(key),
            Node::List(l) => key.parse::<usize>().ok().and_then(move |i| l.get_mut(i)),
            _ => None,
        }
    }

    /// The node at a dotted path (`""` is this node).
    pub fn get_path(&self, path: &str) -> Option<&Node> {
        split_path(path).iter().try_fold(self, |n, k| n.child(k))
    }

    /// The node at a dotted path, mutably.
    pub fn get_path_mut(&mut self, path: &str) -> Option<&mut Node> {
        let mut n = self;
        for k in split_path(path) {
            n = n.child_mut(&k)?;
        }
        Some(n)
    }

    /// The map inside, if this is one.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Node::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The string inside, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of this node's type, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a bool",
            Node::Int(_) => "an int",
            Node::Float(_) => "a float",
            Node::Str(_) => "a string",
            Node::List(_) => "a list",
            Node::Map(_) => "a mapping",
            Node::Missing => "??? (missing)",
        }
    }

    /// Merge `src` into `self` like `OmegaConf.merge`: maps merge key by key (later wins, new
    /// keys are appended), anything else replaces; a `???` in `src` keeps an existing value.
    pub fn merge(&mut self, src: Node) {
        match (self, src) {
            (Node::Map(dst), Node::Map(src)) => {
                for (k, v) in src.0 {
                    match dst.get_mut(&k) {
                        Some(d) => d.merge(v),
                        None => dst.0.push((k, v)),
                    }
                }
            }
            (_, Node::Missing) => {}
            (dst, src) => *dst = src,
        }
    }

    /// Merge `src` at a dotted package path (creating maps on the way; `""` is the root).
    pub fn merge_at(&mut self, package: &str, src: Node) {
        let mut n = self;
        for k in split_path(package) {
            if !matches!(n, Node::Map(_)) {
                *n = Node::empty_map();
            }
            let Node::Map(m) = n else { unreachable!() };
            if m.get(&k).is_none() {
                m.0.push((k.clone(), Node::empty_map()));
            }
            n = m.get_mut(&k).expect("just inserted");
        }
        if matches!(n, Node::Null | Node::Missing) && matches!(src, Node::Map(_)) {
            *n = Node::empty_map();
        }
        n.merge(src);
    }

    /// Display a scalar the way Python's `str()` does in a string interpolation.
    pub fn to_interp_string(&self) -> String {
        match self {
            Node::Null => "None".into(),
            Node::Bool(true) => "True".into(),
            Node::Bool(false) => "False".into(),
            Node::Int(i) => i.to_string(),
            Node::Float(f) => python_float(*f),
            Node::Str(s) => s.clone(),
            Node::Missing => "???".into(),
            other => other.to_yaml_string().trim_end().to_string(),
        }
    }
}

/// Python's `repr(float)` for the common cases.
pub fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{f:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// Split a dotted key path (`a.b.0`); `""` is the empty path.
pub fn split_path(path: &str) -> Vec<String> {
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('.').map(str::to_string).collect()
    }
}
