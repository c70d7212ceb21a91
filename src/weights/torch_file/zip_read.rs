//! Zip reading: the central directory (ZIP64 end records and extra fields included) and the
//! STORED entries of a `torch.save` archive, read at an offset without loading the whole file.

use super::{io_err, Result, TorchFileError};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The entry of a zip archive's central directory.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) header_offset: u64,
    method: u16,
}

/// An open zip archive: its central directory, and the folder all entries are in.
pub(super) struct ZipArchive {
    pub(super) path: String,
    file: File,
    len: u64,
    pub(super) entries: Vec<Entry>,
    pub(super) prefix: String,
}

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

pub(super) const SIG_LOCAL: u32 = 0x0403_4b50;
pub(super) const SIG_CENTRAL: u32 = 0x0201_4b50;
pub(super) const SIG_EOCD: u32 = 0x0605_4b50;
pub(super) const SIG_EOCD64: u32 = 0x0606_4b50;
pub(super) const SIG_LOCATOR64: u32 = 0x0706_4b50;
pub(super) const SIG_DESCRIPTOR: u32 = 0x0807_4b50;

impl ZipArchive {
    pub(super) fn open(path: &Path, path_str: &str) -> Result<Self> {
        let mut file = File::open(path).map_err(io_err(path_str))?;
        let len = file.metadata().map_err(io_err(path_str))?.len();
        let not_zip =
            |reason: String| TorchFileError::NotZip { path: path_str.to_string(), reason };
        let mut head = [0u8; 4];
        let n = read_up_to(&mut file, &mut head).map_err(io_err(path_str))?;
        if n >= 1 && head[0] == 0x80 {
            return Err(TorchFileError::Legacy { path: path_str.to_string() });
        }
        if n < 4 || le32(&head, 0) != SIG_LOCAL {
            return Err(not_zip(format!("it does not start with a zip header ({n} bytes read)")));
        }
        // End of central directory: the last 22 bytes plus a comment of up to 64 KiB.
        let tail_len = len.min(22 + 65535);
        let tail =
            read_at(&mut file, len - tail_len, tail_len as usize).map_err(io_err(path_str))?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| le32(&tail, i) == SIG_EOCD)
            .ok_or_else(|| {
            not_zip("no end-of-central-directory record: the file is truncated".to_string())
        })?;
        let mut count = le16(&tail, eocd + 10) as u64;
        let mut cd_size = le32(&tail, eocd + 12) as u64;
        let mut cd_offset = le32(&tail, eocd + 16) as u64;
        if eocd >= 20 && le32(&tail, eocd - 20) == SIG_LOCATOR64 {
            let at = le64(&tail, eocd - 20 + 8);
            if at.checked_add(56).is_none_or(|end| end > len) {
                return Err(not_zip(format!("ZIP64 end record offset {at} is past the end")));
            }
            let rec = read_at(&mut file, at, 56).map_err(io_err(path_str))?;
            if le32(&rec, 0) != SIG_EOCD64 {
                return Err(not_zip(format!("no ZIP64 end record at offset {at}")));
            }
            count = le64(&rec, 32);
            cd_size = le64(&rec, 40);
            cd_offset = le64(&rec, 48);
        }
        if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
            return Err(not_zip(format!(
                "central directory ({cd_size} bytes at {cd_offset}) is past the end of the \
                 {len}-byte file: truncated"
            )));
        }
        let cd = read_at(&mut file, cd_offset, cd_size as usize).map_err(io_err(path_str))?;
        let entries = parse_central_directory(&cd, count).map_err(not_zip)?;
        let first = entries.first().ok_or_else(|| not_zip("the archive is empty".to_string()))?;
        let prefix = match first.name.find('/') {
            Some(i) => first.name[..i].to_string(),
            None => return Err(not_zip(format!("entry `{}` is not in a folder", first.name))),
        };
        Ok(Self { path: path_str.to_string(), file, len, entries, prefix })
    }

    /// The entry `<prefix>/<record>`.
    pub(super) fn find(&self, record: &str) -> Option<Entry> {
        let full = format!("{}/{record}", self.prefix);
        self.entries.iter().find(|e| e.name == full).cloned()
    }

    /// `len` bytes of `entry`'s data from byte `start`.
    pub(super) fn read(&mut self, entry: &Entry, start: u64, len: u64) -> Result<Vec<u8>> {
        let corrupt = |reason: String| TorchFileError::NotZip { path: self.path.clone(), reason };
        if entry.method != 0 {
            return Err(TorchFileError::Unsupported {
                path: self.path.clone(),
                reason: format!(
                    "entry `{}` is compressed (method {}); torch.save stores entries uncompressed",
                    entry.name, entry.method
                ),
            });
        }
        if entry.header_offset.checked_add(30).is_none_or(|end| end > self.len) {
            return Err(corrupt(format!("entry `{}`'s header is past the end", entry.name)));
        }
        let header =
            read_at(&mut self.file, entry.header_offset, 30).map_err(io_err(&self.path))?;
        if le32(&header, 0) != SIG_LOCAL {
            return Err(corrupt(format!("entry `{}` has no local header", entry.name)));
        }
        let data_start =
            entry.header_offset + 30 + le16(&header, 26) as u64 + le16(&header, 28) as u64;
        if data_start.checked_add(entry.size).is_none_or(|end| end > self.len) {
            return Err(corrupt(format!(
                "entry `{}` ({} bytes at {data_start}) runs past the end of the {}-byte file: \
                 truncated",
                entry.name, entry.size, self.len
            )));
        }
        debug_assert!(start + len <= entry.size);
        read_at(&mut self.file, data_start + start, len as usize).map_err(io_err(&self.path))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn parse_central_directory(cd: &[u8], count: u64) -> std::result::Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        if at + 46 > cd.len() || le32(cd, at) != SIG_CENTRAL {
            return Err(format!("central directory entry {i} of {count} is malformed"));
        }
        let method = le16(cd, at + 10);
        let mut size = le32(cd, at + 24) as u64;
        let comp_size = le32(cd, at + 20) as u64;
        let mut header_offset = le32(cd, at + 42) as u64;
        let (name_len, extra_len, comment_len) =
            (le16(cd, at + 28) as usize, le16(cd, at + 30) as usize, le16(cd, at + 32) as usize);
        let name_at = at + 46;
        let end = name_at + name_len + extra_len + comment_len;
        if end > cd.len() {
            return Err(format!("central directory entry {i} runs past the directory"));
        }
        let name = String::from_utf8_lossy(&cd[name_at..name_at + name_len]).into_owned();
        // ZIP64 extended information: the saturated fields, in order, as u64s.
        let mut extra = &cd[name_at + name_len..name_at + name_len + extra_len];
        while extra.len() >= 4 {
            let (id, len) = (le16(extra, 0), le16(extra, 2) as usize);
            let body = extra.get(4..4 + len).ok_or_else(|| format!("`{name}`: bad extra field"))?;
            if id == 1 {
                let mut fields = body.chunks_exact(8).map(|c| le64(c, 0));
                let mut next = |what: &str| {
                    fields.next().ok_or_else(|| format!("`{name}`: ZIP64 field lacks the {what}"))
                };
                if size == 0xFFFF_FFFF {
                    size = next("size")?;
                }
                if comp_size == 0xFFFF_FFFF {
                    next("compressed size")?;
                }
                if header_offset == 0xFFFF_FFFF {
                    header_offset = next("header offset")?;
                }
            }
            extra = &extra[4 + len..];
        }
        entries.push(Entry { name, size, header_offset, method });
        at = end;
    }
    Ok(entries)
}
