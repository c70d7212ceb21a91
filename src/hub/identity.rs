//! What a model or dataset *is*, wherever it lies: its content identity.
//!
//! Sweep cells are keyed by it and `<report>.meta.json` records it, so it must not change when
//! the same files sit in another cache (node-local `HF_HOME`s on a cluster), are copied, or are
//! downloaded again, and must change when any file does.
//!
//! - Every file of the repository's folder is named by the SHA-256 of its content. In a hub cache
//!   a snapshot's large files are links to `blobs/<sha256>` (Git LFS objects are named by the
//!   SHA-256 of their content), so the link's target names them without a read; other files
//!   (small ones, whose blobs carry git's SHA-1, or plain copies made with `cp -L`) are read and
//!   hashed. Hashes of read files are kept in a [`HashCache`] keyed by (absolute path, size,
//!   modification time), so a large local folder is read once, not per cell or per run.
//! - The [`Identity::digest`] hashes the sorted `(relative name, file hash)` list: two folders
//!   with the same files have the same digest, whatever their paths.
//! - [`Identity::revision`] is the hub snapshot's revision (the commit the files came from;
//!   the bundled fixtures use revisions named `fixture-…`), `None` for a local folder. It is
//!   recorded for provenance; the digest alone decides identity.

use super::{Hub, HubError, RepoType};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a model's or dataset's files were found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A snapshot of the hub cache.
    Hub,
    /// A local folder given by path.
    Local,
}

/// The content identity of one model or dataset repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    /// The id as the config names it.
    pub id: String,
    /// Hub cache or local folder.
    pub origin: Origin,
    /// The hub snapshot's revision; `None` for a local folder.
    pub revision: Option<String>,
    /// SHA-256 over the sorted `(relative name, content SHA-256)` of every file.
    pub digest: String,
    /// Number of files.
    pub files: usize,
}

/// Errors finding an identity; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The id does not resolve.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A file could not be read.
    #[error("reading {path} to fingerprint it: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.display().to_string(), source }
}

/// Content hashes of files read before, keyed by (absolute path, size, modification time), in
/// this process and, when given a folder, on disk (one small file per entry, written atomically,
/// so processes can share the folder).
#[derive(Debug, Default)]
pub struct HashCache {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, String>>,
}

impl HashCache {
    /// A cache kept in memory and, if `dir` is given, in files under it.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir, memory: Mutex::new(HashMap::new()) }
    }

    /// The SHA-256 (hex) of `path`'s content.
    pub fn sha256(&self, path: &Path) -> Result<String, IdentityError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let abs = std::fs::canonicalize(path).map_err(io(path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key = crate::report::stable_hash(
            format!("{}\0{}\0{mtime}", abs.display(), meta.len()).as_bytes(),
        );
        if let Some(h) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(h.clone());
        }
        let entry = self.dir.as_ref().map(|d| d.join(&key[..2]).join(&key));
        if let Some(h) = entry.as_ref().and_then(|e| std::fs::read_to_string(e).ok()) {
            let h = h.trim().to_string();
            if is_sha256(&h) {
                self.remember(key, &h);
                return Ok(h);
            }
        }
        let h = sha256_file(path)?;
        if let Some(e) = &entry {
            // A cache that cannot be written only costs a re-read next time.
            if let Some(parent) = e.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = crate::report::write_atomic(e, h.as_bytes());
        }
        self.remember(key, &h);
        Ok(h)
    }

    fn remember(&self, key: String, hash: &str) {
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(key, hash.to_string());
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// SHA-256 (hex) of a file's content, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String, IdentityError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash a hub snapshot's link names: the file name of its `blobs/` target when that is a
/// SHA-256 (Git LFS objects), else `None` (read the file).
fn linked_blob_sha256(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    let name = target.file_name()?.to_str()?;
    let in_blobs = target.parent().and_then(|p| p.file_name()).is_some_and(|p| p == "blobs");
    (in_blobs && is_sha256(name)).then(|| name.to_ascii_lowercase())
}

/// The identity of the folder `dir` holding repository `id`: hub snapshot when `dir` is
/// `…/snapshots/<revision>` of a hub cache entry, else a local folder.
pub fn identify_dir(id: &str, dir: &Path, hashes: &HashCache) -> Result<Identity, IdentityError> {
    let snapshot_rev = dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(|p| p.parent())
        .and_then(|repo| repo.file_name())
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("models--") || n.starts_with("datasets--"))
        .and_then(|_| dir.file_name()?.to_str().map(str::to_string));
    let mut files = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // .git, .cache (huggingface_hub's local-dir metadata)
            }
            let path = entry.path();
            let rel_name = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let meta = std::fs::metadata(&path).map_err(io(&path))?;
            if meta.is_dir() {
                stack.push((path, rel_name));
            } else {
                let h = match linked_blob_sha256(&path) {
                    Some(h) => h,
                    None => hashes.sha256(&path)?,
                };
                files.push((rel_name, h));
            }
        }
    }
    files.sort();
    let mut digest = Sha256::new();
    for (name, h) in &files {
        digest.update(name.as_bytes());
        digest.update(b"\0");
        digest.update(h.as_bytes());
        digest.update(b"\n");
    }
    Ok(Identity {
        id: id.to_string(),
        origin: if snapshot_rev.is_some() { Origin::Hub } else { Origin::Local },
        revision: snapshot_rev,
        digest: hex(&digest.finalize()),
        files: files.len(),
    })
}

impl Hub {
    /// The identity of model `id` as [`Hub::resolve`] finds it.
    pub fn model_identity(&self, id: &str, hashes: &HashCache) -> Result<Identity, IdentityError> {
        let dir = self.resolve(id, RepoType::Model, None)?;
        identify_dir(id, &dir, hashes)
    }

    /// The identity of dataset `id` as [`Hub::resolve_dataset`] finds it.
    pub fn dataset_identity(
        &self,
        id: &str,
        hashes: &HashCache,
    ) -> Result<Identity, IdentityError> {
        let dir = self.resolve_dataset(id)?;
        identify_dir(id, &dir, hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A hub cache entry in huggingface_hub's layout: snapshot files linked to `blobs/`.
    fn hub_entry(cache: &Path, rev: &str, files: &[(&str, &str)]) -> PathBuf {
        let repo = cache.join("models--org--m");
        write(&repo.join("refs/main"), rev);
        let snap = repo.join("snapshots").join(rev);
        for (name, text) in files {
            let sha = hex(&Sha256::digest(text.as_bytes()));
            write(&repo.join("blobs").join(&sha), text);
            let link = snap.join(name);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = name.matches('/').count();
            let up = "../".repeat(depth + 2);
            std::os::unix::fs::symlink(format!("{up}blobs/{sha}"), &link).unwrap();
        }
        snap
    }

    #[test]
    fn the_same_files_anywhere_have_the_same_identity() {
        let t = tempfile::tempdir().unwrap();
        let files = [("config.json", "{}"), ("model.safetensors", "weights"), ("sub/x.txt", "x")];
        let a = hub_entry(&t.path().join("cache-a"), "abc", &files);
        let b = hub_entry(&t.path().join("node-2/hub"), "abc", &files);
        let hashes = HashCache::new(None);
        let ia = Hub::new(t.path().join("cache-a")).model_identity("org/m", &hashes).unwrap();
        let ib = Hub::new(t.path().join("node-2/hub")).model_identity("org/m", &hashes).unwrap();
        assert_eq!(ia, ib);
        assert_eq!(
            (ia.origin.clone(), ia.revision.as_deref(), ia.files),
            (Origin::Hub, Some("abc"), 3)
        );
        // A dereferenced copy (`cp -rL`) as a local folder: same digest, no revision.
        let plain = t.path().join("plain");
        for (name, text) in &files {
            write(&plain.join(name), text);
        }
        let ip = identify_dir("org/m", &plain, &hashes).unwrap();
        assert_eq!(
            (ip.digest.as_str(), ip.origin, ip.revision),
            (ia.digest.as_str(), Origin::Local, None)
        );
        // One byte changed, or a file renamed: another identity.
        write(&plain.join("sub/x.txt"), "y");
        assert_ne!(identify_dir("org/m", &plain, &HashCache::new(None)).unwrap().digest, ia.digest);
        assert!(a.is_dir() && b.is_dir());
    }

    #[test]
    fn hashes_are_cached_by_path_size_and_mtime_on_disk() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("data/train.parquet");
        write(&f, "rows");
        let dir = t.path().join("hashes");
        let first = HashCache::new(Some(dir.clone())).sha256(&f).unwrap();
        assert_eq!(first, hex(&Sha256::digest(b"rows")));
        // A fresh process reads the cached entry: prove it by corrupting the entry's hash.
        let entries: Vec<PathBuf> = walk(&dir);
        assert_eq!(entries.len(), 1);
        let fake = "ab".repeat(32);
        std::fs::write(&entries[0], &fake).unwrap();
        assert_eq!(HashCache::new(Some(dir.clone())).sha256(&f).unwrap(), fake);
        // A rewritten file (new mtime or size) is read again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(&f, "other rows");
        assert_eq!(
            HashCache::new(Some(dir)).sha256(&f).unwrap(),
            hex(&Sha256::digest(b"other rows"))
        );
    }

    fn walk(d: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn errors_name_what_is_missing() {
        let t = tempfile::tempdir().unwrap();
        let e = Hub::new(t.path()).model_identity("org/none", &HashCache::new(None)).unwrap_err();
        assert!(e.to_string().contains("org/none"), "{e}");
    }
}
