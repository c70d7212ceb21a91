//! fsspec's glob matching on `/`-separated relative paths, as `datasets` resolves data files
//! with it ([`super::files`]).

/// fsspec's glob (`fsspec.utils.glob_translate` and its fnmatch `_translate`, fsspec 2026.6.0) on
/// `/`-separated relative paths. `*` and `?` stay within one path component; `**` as a whole
/// component spans components (`a/**/b` matches `a/b`; a final `**` matches one or more, so
/// `data/**` matches `data/x` but not `data`). `[...]` is a character class: `[!...]` negates (`^`
/// is an ordinary member), a `]` first is a member, a `-` first or last is literal, a reversed
/// range matches nothing, an unclosed `[` is literal. A `**` inside a component (an error for
/// fsspec) acts as `*`; a leading `./` is ignored.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches("./");
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    match_components(&p, &s)
}

fn match_components(p: &[&str], s: &[&str]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((&"**", [])) => !s.is_empty(),
        Some((&"**", rest)) => (0..=s.len()).any(|k| match_components(rest, &s[k..])),
        Some((first, rest)) => match s.split_first() {
            Some((head, tail)) => {
                let chars: Vec<char> = head.chars().collect();
                match_part(&tokens(first), &chars) && match_components(rest, tail)
            }
            None => false,
        },
    }
}

/// One element of a path component's pattern.
#[derive(Debug)]
enum Tok {
    Star,
    One,
    Lit(char),
    /// Inclusive ranges (a single character is a range of one).
    Class {
        negate: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Tok {
    fn matches(&self, c: char) -> bool {
        match self {
            Tok::Star => false,
            Tok::One => true,
            Tok::Lit(l) => *l == c,
            Tok::Class { negate, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negate
            }
        }
    }
}

fn tokens(part: &str) -> Vec<Tok> {
    let p: Vec<char> = part.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let c = p[i];
        i += 1;
        match c {
            '*' if matches!(out.last(), Some(Tok::Star)) => {}
            '*' => out.push(Tok::Star),
            '?' => out.push(Tok::One),
            '[' => match class(&p, i) {
                Some((tok, next)) => {
                    out.push(tok);
                    i = next;
                }
                None => out.push(Tok::Lit('[')),
            },
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

/// fnmatch's class whose `[` is just before `start`: the token and the index after its `]`, or
/// `None` when it is not closed.
fn class(p: &[char], start: usize) -> Option<(Tok, usize)> {
    let negate = p.get(start) == Some(&'!');
    let first = start + usize::from(negate);
    let mut end = first;
    if p.get(end) == Some(&']') {
        end += 1;
    }
    while end < p.len() && p[end] != ']' {
        end += 1;
    }
    if end >= p.len() {
        return None;
    }
    let body = &p[first..end];
    let mut ranges = Vec::new();
    let mut k = 0;
    while k < body.len() {
        if k + 2 < body.len() && body[k + 1] == '-' {
            ranges.push((body[k], body[k + 2]));
            k += 3;
        } else {
            ranges.push((body[k], body[k]));
            k += 1;
        }
    }
    Some((Tok::Class { negate, ranges }, end + 1))
}

/// Wildcard matching with backtracking to the last `*`.
fn match_part(toks: &[Tok], s: &[char]) -> bool {
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match toks.get(t) {
            Some(Tok::Star) => {
                star = Some((t, i));
                t += 1;
            }
            Some(tok) if tok.matches(s[i]) => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((st, si)) => {
                    t = st + 1;
                    i = si + 1;
                    star = Some((st, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[t.min(toks.len())..].iter().all(|tok| matches!(tok, Tok::Star))
}
