//! Zip writing: libtorch's `PyTorchStreamWriter` over miniz (64-byte aligned STORED entries, data
//! descriptors, ZIP64 fields and end records, the serialization id), and the zip CRC-32.

use super::zip_read::{
    le32, SIG_CENTRAL, SIG_DESCRIPTOR, SIG_EOCD, SIG_EOCD64, SIG_LOCAL, SIG_LOCATOR64,
};
use std::io::Write;

/// Sizes and offsets from which miniz writes ZIP64 fields (`MZ_UINT32_MAX`).
pub(super) const ZIP64_LIMIT: u64 = 0xFFFF_FFFF;
/// `torch.utils.serialization.config.save.storage_alignment`'s default.
pub(super) const ALIGNMENT: u64 = 64;

/// An entry written, for the central directory.
struct Written {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

pub(super) struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    prefix: String,
    entries: Vec<Written>,
    /// ZIP64 fields for sizes and offsets at or above this (miniz: 2^32 - 1; lower in tests).
    zip64_at: u64,
    /// `c10::hash_combine` of the CRC-32s of the non-empty records, in write order (torch's).
    crc_hash: u64,
    /// `c10::hash_combine` of FNV-1a hashes of the record names, in write order.
    name_hash: u64,
}

fn hash_combine(seed: u64, value: u64) -> u64 {
    seed ^ value.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl<W: Write> ZipWriter<W> {
    pub(super) fn new(out: W, prefix: &str, zip64_at: u64) -> Self {
        Self {
            out,
            pos: 0,
            prefix: prefix.to_string(),
            entries: Vec::new(),
            zip64_at,
            crc_hash: 0,
            name_hash: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// One STORED record `<prefix>/<name>`, its data streamed in 8 MiB pieces.
    pub(super) fn record(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let full = format!("{}/{name}", self.prefix);
        let (offset, size) = (self.pos, data.len() as u64);
        let (big_size, big_offset) = (size >= self.zip64_at, offset >= self.zip64_at);
        // miniz's local ZIP64 field: the size, a compressed size of 0 (not known yet when miniz
        // writes it), and the offset; each only when it reaches the limit.
        let mut zip64 = Vec::new();
        if big_size || big_offset {
            let n = 8 * (2 * big_size as u16 + big_offset as u16);
            zip64.extend_from_slice(&1u16.to_le_bytes());
            zip64.extend_from_slice(&n.to_le_bytes());
            if big_size {
                zip64.extend_from_slice(&size.to_le_bytes());
                zip64.extend_from_slice(&0u64.to_le_bytes());
            }
            if big_offset {
                zip64.extend_from_slice(&offset.to_le_bytes());
            }
        }
        // torch's `getPadding`: an `FB` extra field that puts the data on a 64-byte boundary.
        let start = offset + 30 + full.len() as u64 + zip64.len() as u64 + 4;
        let pad = ((ALIGNMENT - start % ALIGNMENT) % ALIGNMENT) as usize;
        let flags: u16 = 0x0800 | if size > 0 { 0x0008 } else { 0 };
        let mut header = Vec::with_capacity(30 + full.len() + zip64.len() + 4 + pad);
        header.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes()); // version needed
        header.extend_from_slice(&flags.to_le_bytes());
        header.extend_from_slice(&[0u8; 2 + 2 + 2 + 4 + 4 + 4]); // method, time, date, crc, sizes
        header.extend_from_slice(&(full.len() as u16).to_le_bytes());
        header.extend_from_slice(&((zip64.len() + 4 + pad) as u16).to_le_bytes());
        header.extend_from_slice(full.as_bytes());
        header.extend_from_slice(&zip64);
        header.extend_from_slice(b"FB");
        header.extend_from_slice(&(pad as u16).to_le_bytes());
        header.resize(header.len() + pad, b'Z');
        self.put(&header)?;
        let mut crc = 0u32;
        for piece in data.chunks(8 << 20) {
            crc = crc32_update(crc, piece);
            self.put(piece)?;
        }
        if size > 0 {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&SIG_DESCRIPTOR.to_le_bytes());
            d.extend_from_slice(&crc.to_le_bytes());
            if zip64.is_empty() {
                d.extend_from_slice(&(size as u32).to_le_bytes());
                d.extend_from_slice(&(size as u32).to_le_bytes());
            } else {
                d.extend_from_slice(&size.to_le_bytes());
                d.extend_from_slice(&size.to_le_bytes());
            }
            self.put(&d)?;
            self.crc_hash = hash_combine(self.crc_hash, crc as u64);
        }
        self.name_hash = hash_combine(self.name_hash, fnv1a(name));
        self.entries.push(Written { name: full, crc, size, offset });
        Ok(())
    }

    /// `.data/serialization_id`, the central directory and the (ZIP64) end records.
    pub(super) fn finish(mut self) -> std::io::Result<W> {
        let id = format!("{:020}{:020}", self.name_hash, self.crc_hash);
        self.record(".data/serialization_id", id.as_bytes())?;
        let sat = |v: u64, big: bool| if big { 0xFFFF_FFFFu32 } else { v as u32 };
        let cd_offset = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let (big_size, big_offset) = (e.size >= self.zip64_at, e.offset >= self.zip64_at);
            let mut zip64 = Vec::new();
            if big_size || big_offset {
                let n = 8 * (2 * big_size as u16 + big_offset as u16);
                zip64.extend_from_slice(&1u16.to_le_bytes());
                zip64.extend_from_slice(&n.to_le_bytes());
                if big_size {
                    zip64.extend_from_slice(&e.size.to_le_bytes());
                    zip64.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_offset {
                    zip64.extend_from_slice(&e.offset.to_le_bytes());
                }
            }
            let flags: u16 = 0x0800 | if e.size > 0 { 0x0008 } else { 0 };
            cd.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            cd.extend_from_slice(&[0u8; 4]); // version made by, version needed
            cd.extend_from_slice(&flags.to_le_bytes());
            cd.extend_from_slice(&[0u8; 6]); // method, time, date
            cd.extend_from_slice(&e.crc.to_le_bytes());
            cd.extend_from_slice(&sat(e.size, big_size).to_le_bytes());
            cd.extend_from_slice(&sat(e.size, big_size).to_le_bytes());
            cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0u8; 2 + 2 + 2 + 4]); // comment, disk, attributes
            cd.extend_from_slice(&sat(e.offset, big_offset).to_le_bytes());
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&zip64);
        }
        self.put(&cd)?;
        let (count, cd_size) = (self.entries.len() as u64, cd.len() as u64);
        let eocd64_offset = self.pos;
        let mut end = Vec::with_capacity(56 + 20 + 22);
        end.extend_from_slice(&SIG_EOCD64.to_le_bytes());
        end.extend_from_slice(&44u64.to_le_bytes());
        end.extend_from_slice(&0x031Eu16.to_le_bytes()); // made by: Unix, 3.0 (miniz)
        end.extend_from_slice(&0x002Du16.to_le_bytes()); // needed: 4.5
        end.extend_from_slice(&[0u8; 8]); // disk numbers
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&cd_size.to_le_bytes());
        end.extend_from_slice(&cd_offset.to_le_bytes());
        end.extend_from_slice(&SIG_LOCATOR64.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&eocd64_offset.to_le_bytes());
        end.extend_from_slice(&1u32.to_le_bytes());
        end.extend_from_slice(&SIG_EOCD.to_le_bytes());
        end.extend_from_slice(&[0u8; 4]); // disk numbers
        let count16 = count.min(0xFFFF) as u16;
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&sat(cd_size, cd_size >= self.zip64_at).to_le_bytes());
        end.extend_from_slice(&sat(cd_offset, cd_offset >= self.zip64_at).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes()); // comment length
        self.put(&end)?;
        Ok(self.out)
    }
}

// ------------------------------------------------------------------------------------------------
// CRC-32 (zip's: reflected 0xEDB88320), slice-by-8

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            t[s][i] = (t[s - 1][i] >> 8) ^ t[0][(t[s - 1][i] & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// The CRC-32 of everything so far (`crc`, 0 to start) followed by `data`.
pub(super) fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = le32(ch, 0) ^ c;
        let hi = le32(ch, 4);
        c = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}
