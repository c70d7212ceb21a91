//! The CLIP byte-level BPE tokenizer, id-for-id with Hugging Face `CLIPTokenizerFast`
//! (transformers 4.57, tokenizers 0.22) as the `openai/clip-vit-*` repos configure it in
//! `tokenizer.json`; OpenAI's original is `clip/simple_tokenizer.py`.
//!
//! The pipeline, in `tokenizer.json`'s order:
//! 1. normalizer: NFC, every whitespace run → one space, lowercase (char by char, as tokenizers'
//!    `NormalizedString::lowercase`: a final `Σ` becomes `σ`, `İ` becomes `i` + U+0307);
//! 2. added tokens: `<|startoftext|>` / `<|endoftext|>` written in the (normalized) text become
//!    their ids, as in HF (so `<|ENDOFTEXT|>` does too);
//! 3. pre-tokenizer: the words are the matches of [`CLIP_PATTERN`] (everything else, i.e.
//!    whitespace, is dropped); then ByteLevel maps each word's UTF-8 bytes to GPT-2's printable
//!    characters. ByteLevel's own GPT-2 regex re-split changes nothing here: each word is a
//!    contraction, a letter run, one digit, or a run of non-space non-letter non-digits, which the
//!    GPT-2 pattern matches whole;
//! 4. BPE: one symbol per byte, `</w>` glued to the last one, then the lowest-ranked adjacent pair
//!    merged (leftmost first) until no pair has a merge;
//! 5. post-processor: `<|startoftext|>` + ids + `<|endoftext|>`, the content cut to
//!    `model_max_length - 2` first (HF's `truncation=True`).
//!
//! Checked against HF on every task prompt, tricky strings, 5,000 random strings and every
//! non-private-use code point up to U+31FFF.
//! Known difference: three Unicode 16 compositions (U+113C2, U+1611E, U+16D67 repeated) are NFC
//! composed by `unicode-normalization` 0.1.26 but not by tokenizers' older Unicode tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

/// The pre-tokenizer's `Split` pattern (kept matches are the words).
pub const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The beginning-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also CLIP's unknown and, by default, padding token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

type Vocab = HashMap<String, u32>;
type Merges = Vec<(String, String)>;
/// Words cached before the cache is emptied (the prompts of all tasks hold ~2,000 words).
const CACHE_CAPACITY: usize = 100_000;

/// Errors loading a tokenizer directory; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file is missing or unreadable.
    #[error("cannot read {path}: {source} (a CLIP tokenizer directory holds tokenizer.json, or vocab.json + merges.txt, as saved by CLIPTokenizerFast.save_pretrained)")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A file parses but its content is not a usable CLIP BPE tokenizer.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A CLIP tokenizer: vocabulary, merge ranks and special ids, with a per-word BPE cache.
/// `Send + Sync`: one instance can serve many threads.
#[derive(Debug)]
pub struct ClipTokenizer {
    /// `(left, right)` → `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The id of each byte's symbol inside a word, and at the end of a word (with `</w>`).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    split: fancy_regex::Regex,
    vocab_size: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json` (vocab and merges from its `model` section) or, without it,
    /// `dir/vocab.json` + `dir/merges.txt`; `model_max_length` (default 77) and `pad_token`
    /// (default `<|endoftext|>`) come from `dir/tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab, merges, vocab_path) = if tokenizer_json.is_file() {
            let (vocab, merges) = read_tokenizer_json(&tokenizer_json)?;
            (vocab, merges, tokenizer_json.display().to_string())
        } else {
            let vocab_json = dir.join("vocab.json");
            let path = vocab_json.display().to_string();
            let vocab = parse_vocab(&read_json(&vocab_json)?).map_err(|r| invalid(&path, &r))?;
            (vocab, read_merges_txt(&dir.join("merges.txt"))?, path)
        };
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let config_name = config_path.display().to_string();
        Self::build(&vocab, &merges, &vocab_path, config.as_ref(), &config_name)
    }

    fn build(
        vocab: &Vocab,
        merges: &[(String, String)],
        vocab_path: &str,
        config: Option<&serde_json::Value>,
        config_path: &str,
    ) -> Result<Self, TokenizerError> {
        let lookup = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| format!("the vocabulary has no token {token:?}"))
        };
        let id = |token: &str| lookup(token).map_err(|reason| invalid(vocab_path, &reason));
        let (mut byte_ids, mut byte_end_ids) = ([0u32; 256], [0u32; 256]);
        for (b, c) in bytes_to_unicode().into_iter().enumerate() {
            byte_ids[b] = id(&c.to_string())?;
            byte_end_ids[b] = id(&format!("{c}{END_OF_WORD}"))?;
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (l, r)) in merges.iter().enumerate() {
            let rank =
                u32::try_from(rank).map_err(|_| invalid(vocab_path, "more than 2^32 merges"))?;
            let merge_id = |token: &str| {
                let at = format!("merge {} `{l} {r}`", rank + 1);
                lookup(token).map_err(|e| invalid(vocab_path, &format!("{at}: {e}")))
            };
            let merged = merge_id(&format!("{l}{r}"))?;
            // A repeated pair keeps its last rank, as tokenizers' map built by `collect` does.
            merge_map.insert((merge_id(l)?, merge_id(r)?), (rank, merged));
        }
        let max_len = match config.and_then(|c| c.get("model_max_length")) {
            None | Some(serde_json::Value::Null) => 77,
            Some(v) => match v.as_f64() {
                // Hub configs write "no limit" as 1e30; `as` saturates to usize::MAX.
                Some(n) if n >= 2.0 => n as usize,
                _ => {
                    let reason = format!("model_max_length {v} is not a number ≥ 2");
                    return Err(invalid(config_path, &reason));
                }
            },
        };
        let pad_token = match config.and_then(|c| c.get("pad_token")) {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(serde_json::Value::Object(o)) => match o.get("content").and_then(|c| c.as_str()) {
                Some(s) => s,
                None => return Err(invalid(config_path, "pad_token object has no `content`")),
            },
            _ => EOS_TOKEN,
        };
        let pad = vocab.get(pad_token).copied().ok_or_else(|| {
            invalid(config_path, &format!("pad_token {pad_token:?} is not in the vocabulary"))
        })?;
        let split = fancy_regex::Regex::new(CLIP_PATTERN)
            .map_err(|e| invalid(vocab_path, &format!("pre-tokenizer pattern: {e}")))?;
        Ok(Self {
            merges: merge_map,
            byte_ids,
            byte_end_ids,
            split,
            vocab_size: vocab.len(),
            bos: id(BOS_TOKEN)?,
            eos: id(EOS_TOKEN)?,
            pad,
            max_len,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The ids of `text` with no special tokens around them and no truncation.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let normalized = normalize(text);
        let mut ids = Vec::new();
        let mut rest = normalized.as_str();
        // Added tokens are cut out first (leftmost occurrence of either), then each piece between
        // them goes through the pre-tokenizer and BPE.
        loop {
            let next = [(BOS_TOKEN, self.bos), (EOS_TOKEN, self.eos)]
                .into_iter()
                .filter_map(|(tok, id)| rest.find(tok).map(|at| (at, tok.len(), id)))
                .min();
            let Some((at, len, special)) = next else { break };
            self.tokenize_piece(&rest[..at], &mut ids);
            ids.push(special);
            rest = &rest[at + len..];
        }
        self.tokenize_piece(rest, &mut ids);
        ids
    }

    fn tokenize_piece(&self, text: &str, ids: &mut Vec<u32>) {
        // CLIP_PATTERN uses no look-around or back-reference, so fancy-regex runs it on the plain
        // `regex` engine, whose search cannot fail: `flatten` drops nothing.
        for word in self.split.find_iter(text).flatten() {
            let word = word.as_str();
            let cached = self.cache.lock().ok().and_then(|c| c.get(word).cloned());
            let word_ids = match cached {
                Some(w) => w,
                None => {
                    let w = self.bpe(word.as_bytes());
                    if let Ok(mut cache) = self.cache.lock() {
                        if cache.len() >= CACHE_CAPACITY {
                            cache.clear();
                        }
                        cache.insert(word.to_owned(), w.clone());
                    }
                    w
                }
            };
            ids.extend_from_slice(&word_ids);
        }
    }

    /// BPE on one pre-tokenized word (its UTF-8 bytes): the lowest-ranked adjacent pair is merged
    /// first, the leftmost among equals, until no adjacent pair has a merge.
    fn bpe(&self, word: &[u8]) -> Vec<u32> {
        let last = word.len().saturating_sub(1);
        let mut symbols: Vec<u32> =
            word.iter()
                .enumerate()
                .map(|(i, &b)| {
                    if i == last {
                        self.byte_end_ids[b as usize]
                    } else {
                        self.byte_ids[b as usize]
                    }
                })
                .collect();
        while let Some((_, at, merged)) = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(i, p)| self.merges.get(&(p[0], p[1])).map(|&(rank, m)| (rank, i, m)))
            .min()
        {
            symbols[at] = merged;
            symbols.remove(at + 1);
        }
        symbols
    }

    /// `<|startoftext|>` + ids + `<|endoftext|>`, cut to `model_max_length` with the end token kept
    /// last: HF's `tokenizer(text, truncation=True, max_length=model_max_length)["input_ids"]`.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = self.tokenize(text);
        ids.truncate(self.max_len - 2);
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(i64::from(self.bos));
        out.extend(ids.into_iter().map(i64::from));
        out.push(i64::from(self.eos));
        out
    }

    /// Encodes a batch padded (on the right, with the pad id) to its longest sequence:
    /// `(input_ids, attention_mask, L)`, both row-major `[texts.len(), L]`, the mask 1 on real
    /// tokens and 0 on padding; HF's `tokenizer(texts, padding=True, truncation=True,
    /// max_length=model_max_length)`.
    pub fn encode_batch(&self, texts: &[impl AsRef<str>]) -> (Vec<i64>, Vec<i64>, usize) {
        let rows: Vec<Vec<i64>> = texts.iter().map(|t| self.encode(t.as_ref())).collect();
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for row in &rows {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + len - row.len(), i64::from(self.pad));
            mask.resize(mask.len() + row.len(), 1);
            mask.resize(mask.len() + len - row.len(), 0);
        }
        (ids, mask, len)
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> i64 {
        i64::from(self.bos)
    }
    /// The id of `<|endoftext|>`.
    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos)
    }
    /// The padding id (`pad_token` of `tokenizer_config.json`).
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad)
    }
    /// The longest encoding, special tokens included (77 for CLIP).
    pub fn model_max_length(&self) -> usize {
        self.max_len
    }
    /// The number of vocabulary entries (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// NFC, whitespace runs → one space, then per-char lowercase (the `tokenizer.json` normalizer;
/// Rust's `char::is_whitespace` is Unicode `White_Space`, as the normalizer's `\s`).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// GPT-2's byte → printable char table (`bytes_to_unicode` in OpenAI's tokenizers).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            extra += 1;
            extra - 1
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

fn invalid(path: &str, reason: &str) -> TokenizerError {
    TokenizerError::Invalid { path: path.to_owned(), reason: reason.to_owned() }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path)
        .map_err(|source| TokenizerError::Read { path: path.display().to_string(), source })
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|source| TokenizerError::Json { path: path.display().to_string(), source })
}

/// A `{token: id}` object.
fn parse_vocab(v: &serde_json::Value) -> Result<Vocab, String> {
    let obj = v.as_object().ok_or("not a {token: id} object")?;
    obj.iter()
        .map(|(token, id)| match id.as_u64().and_then(|i| u32::try_from(i).ok()) {
            Some(i) => Ok((token.clone(), i)),
            None => Err(format!("the id of {token:?} is {id}, not an integer in 0..2^32")),
        })
        .collect()
}

/// `"left right"` → the pair.
fn split_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(r), None) if !l.is_empty() && !r.is_empty() => {
            Some((l.to_owned(), r.to_owned()))
        }
        _ => None,
    }
}

/// The `model` section of `tokenizer.json`: its vocabulary and merges (`"l r"` strings, or
/// `["l", "r"]` pairs as tokenizers ≥ 0.20 writes them).
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges), TokenizerError> {
    let name = path.display().to_string();
    let bad = |reason: &str| invalid(&name, reason);
    let v = read_json(path)?;
    let model = v.get("model").ok_or_else(|| bad("no `model` section"))?;
    if let Some(kind) = model.get("type").and_then(|t| t.as_str()) {
        if kind != "BPE" {
            return Err(bad(&format!("model type is {kind}, not BPE")));
        }
    }
    let suffix = model.get("end_of_word_suffix").and_then(|s| s.as_str());
    if suffix.is_some_and(|s| s != END_OF_WORD) {
        return Err(bad("model.end_of_word_suffix is not `</w>`"));
    }
    let vocab = parse_vocab(model.get("vocab").ok_or_else(|| bad("no `model.vocab`"))?)
        .map_err(|r| bad(&format!("model.vocab: {r}")))?;
    let list = model.get("merges").and_then(|m| m.as_array());
    let list = list.ok_or_else(|| bad("no `model.merges` list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let pair = match m {
            serde_json::Value::String(s) => split_merge(s),
            serde_json::Value::Array(a) => match a.as_slice() {
                [serde_json::Value::String(l), serde_json::Value::String(r)] => {
                    Some((l.clone(), r.clone()))
                }
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| bad(&format!("model.merges[{i}] is not a pair")))?);
    }
    Ok((vocab, merges))
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn read_merges_txt(path: &Path) -> Result<Merges, TokenizerError> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let pair = split_merge(line).ok_or_else(|| {
            let reason = format!("line {} is {line:?}, not `left right`", n + 1);
            invalid(&path.display().to_string(), &reason)
        })?;
        merges.push(pair);
    }
    Ok(merges)
}
