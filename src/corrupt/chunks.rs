//! A split cut into chunks, the corrupt command's unit of work: contiguous rows inside one row
//! group of one parquet file, at most [`CorruptArgs::chunk_rows`] of them. A chunk is read
//! without decoding the row groups before it, corrupted (its images in parallel), and written
//! as one record batch, in chunk order; so the written file depends only on the source's files
//! and the chunk size, never on which process or thread corrupted which chunk
//! ([`super::distributed`] hands chunks to the cluster's workers).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::command::{decode_row, encode_png, CorruptArgs};
use super::corrupt_image;
use super::rng::Rng;
use crate::data::parquet as pq;

/// One chunk: rows `offset..offset + rows` of row group `row_group` of file `file`, whose
/// first row is row `index` of the whole split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Index of the file in the split's file list.
    pub file: u32,
    /// Row group within the file.
    pub row_group: u32,
    /// First row within the row group.
    pub offset: u32,
    /// Rows in the chunk.
    pub rows: u32,
    /// The split's row index of the chunk's first row (seeds each image's generator).
    pub index: u64,
    /// The file's row index of the chunk's first row (for error messages).
    pub file_row: u64,
}

/// A corrupted chunk: its images PNG-encoded and their labels, in row order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOut {
    /// PNG bytes of each image.
    pub images: Vec<serde_bytes_vec::Bytes>,
    /// Each image's label.
    pub labels: Vec<i64>,
}

/// The split's files and its chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The split's parquet files, in order.
    pub files: Vec<PathBuf>,
    /// Rows of each file.
    pub file_rows: Vec<u64>,
    /// Every chunk, in row order.
    pub chunks: Vec<Chunk>,
}

impl Plan {
    /// Cuts the split held by `files` into chunks of at most `chunk_rows` rows.
    pub fn new(files: &[PathBuf], chunk_rows: usize) -> Result<Self> {
        if chunk_rows == 0 {
            bail!("corrupt: --chunk-rows must be at least 1");
        }
        let mut chunks = Vec::new();
        let mut file_rows = Vec::with_capacity(files.len());
        let mut index = 0u64;
        for (f, path) in files.iter().enumerate() {
            let groups = pq::row_group_rows(path)?;
            file_rows.push(groups.iter().sum());
            let mut file_row = 0u64;
            for (g, &n) in groups.iter().enumerate() {
                let mut offset = 0u64;
                while offset < n {
                    let rows = (n - offset).min(chunk_rows as u64);
                    chunks.push(Chunk {
                        file: f as u32,
                        row_group: g as u32,
                        offset: u32::try_from(offset).context("a row group of over 2^32 rows")?,
                        rows: rows as u32,
                        index,
                        file_row,
                    });
                    offset += rows;
                    index += rows;
                    file_row += rows;
                }
            }
        }
        Ok(Self { files: files.to_vec(), file_rows, chunks })
    }

    /// The split's rows.
    pub fn total_rows(&self) -> u64 {
        self.file_rows.iter().sum()
    }
}

/// Reads, corrupts and encodes `chunk` of the split in `files` (this process's copy of it:
/// `expected_rows` is the coordinator's row count of the chunk's file, checked so that a worker
/// holding another version of the dataset fails instead of writing other images).
pub fn corrupt_chunk(
    a: &CorruptArgs,
    files: &[PathBuf],
    chunk: &Chunk,
    expected_rows: Option<u64>,
) -> Result<ChunkOut> {
    let corruption = a.corruption.context("corrupt: --corruption is required")?;
    let file: &Path = files.get(chunk.file as usize).with_context(|| {
        format!(
            "corrupt: split `{}` of dataset `{}` has {} files here, the chunk names file {}",
            a.split,
            a.dataset,
            files.len(),
            chunk.file
        )
    })?;
    if let Some(want) = expected_rows {
        let here = pq::num_rows(file)?;
        if here != want {
            bail!(
                "corrupt: {} has {here} rows here but {want} on the coordinator: every process \
                 needs the same copy of dataset `{}`",
                file.display(),
                a.dataset
            );
        }
    }
    let mut rows = Vec::with_capacity(chunk.rows as usize);
    for batch in pq::RowBatches::open_part(
        file,
        chunk.row_group as usize,
        chunk.offset as usize,
        chunk.rows as usize,
    )? {
        rows.extend(
            batch.with_context(|| {
                format!("corrupt: dataset `{}`, split `{}`", a.dataset, a.split)
            })?,
        );
    }
    if rows.len() != chunk.rows as usize {
        bail!(
            "corrupt: {}: row group {} gave {} rows from row {}, {} expected",
            file.display(),
            chunk.row_group,
            rows.len(),
            chunk.offset,
            chunk.rows
        );
    }
    let images = rows
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let idx = chunk.index as usize + i;
            let img = decode_row(a, file, chunk.file_row as usize + i, idx, &r.bytes)?;
            let mut rng = Rng::for_image(a.seed, idx as u64);
            let out = corrupt_image(corruption, a.params, a.severity, &img, &mut rng)
                .with_context(|| {
                    format!("corrupt: dataset `{}`, split `{}`, row {idx}", a.dataset, a.split)
                })?;
            encode_png(&out).map(serde_bytes_vec::Bytes)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ChunkOut { images, labels: rows.iter().map(|r| r.label).collect() })
}

/// Encoded images as one byte string each on the wire (not a sequence of numbers).
pub mod serde_bytes_vec {
    use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

    /// One image's encoded bytes.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct Bytes(pub Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> de::Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("encoded image bytes")
                }
                fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(b.to_vec()))
                }
                fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(b))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_inside_row_groups_and_cover_the_split_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (f, n) in [(0u8, 7u8), (1, 3)] {
            let path = dir.path().join(format!("test-0000{f}-of-00002.parquet"));
            let rows: Vec<(Vec<u8>, i64)> =
                (0..n).map(|i| (vec![f, i], i64::from(10 * f + i))).collect();
            pq::write_image_rows(&path, &rows, Some(4)).unwrap();
            files.push(path);
        }
        let plan = Plan::new(&files, 3).unwrap();
        // File 0: row groups of 4 and 3 rows; file 1: one of 3.
        let got: Vec<_> = plan
            .chunks
            .iter()
            .map(|c| (c.file, c.row_group, c.offset, c.rows, c.index, c.file_row))
            .collect();
        let want = [(0, 0, 0, 3, 0, 0), (0, 0, 3, 1, 3, 3), (0, 1, 0, 3, 4, 4), (1, 0, 0, 3, 7, 0)];
        assert_eq!(got, want);
        assert_eq!((plan.total_rows(), plan.file_rows.clone()), (10, vec![7, 3]));
        // Each chunk reads exactly its rows.
        let mut seen = Vec::new();
        for c in &plan.chunks {
            let path = &files[c.file as usize];
            for b in pq::RowBatches::open_part(
                path,
                c.row_group as usize,
                c.offset as usize,
                c.rows as usize,
            )
            .unwrap()
            {
                seen.extend(b.unwrap().into_iter().map(|r| (r.bytes, r.label)));
            }
        }
        let want: Vec<_> = files
            .iter()
            .flat_map(|p| pq::read_rows(p).unwrap())
            .map(|r| (r.bytes, r.label))
            .collect();
        assert_eq!(seen, want);
        assert!(Plan::new(&files, 0).is_err());
        assert!(pq::RowBatches::open_part(&files[1], 1, 0, 1).is_err(), "no row group 1");
    }

    #[test]
    fn chunk_results_round_trip_on_the_wire() {
        let out = ChunkOut {
            images: vec![serde_bytes_vec::Bytes(vec![1, 2, 3]), serde_bytes_vec::Bytes(vec![])],
            labels: vec![4, -1],
        };
        let wire = fusion_cluster::codec::encode(&out).unwrap();
        assert!(wire.len() < 16, "bytes as byte strings: {} bytes", wire.len());
        assert_eq!(fusion_cluster::codec::decode::<ChunkOut>(&wire).unwrap(), out);
    }
}
