//! `--grid`: one image of a split under each corruption (rows) at severities 1-5 (columns, after
//! the clean image), as a PNG, like FusionBench's documentation figure of the corruptions.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::command::{decode_row, CorruptArgs};
use super::pixelate::resize_nearest;
use super::rng::Rng;
use super::{corrupt_image, Corruption, ALL};
use crate::data::{parquet as pq, RgbImage};
use crate::report::canvas::{text_width, Canvas, LINE};

/// Smallest drawn size of an image's longer side, in pixels (tiny images are enlarged).
const MIN_CELL: usize = 96;
const GAP: u32 = 6;

/// Draws row `a.index` of the split in `files` under `a.corruption` (or all seven) at
/// severities 1-5 and writes the PNG to `out` atomically.
pub fn write_grid(a: &CorruptArgs, files: &[std::path::PathBuf], out: &Path) -> Result<()> {
    let (mut seen, mut found) = (0usize, None);
    'files: for file in files {
        let mut row_in_file = 0usize;
        for batch in pq::RowBatches::open(file)? {
            let rows = batch?;
            if a.index < seen + rows.len() {
                let r = &rows[a.index - seen];
                found = Some(decode_row(a, file, row_in_file + a.index - seen, a.index, &r.bytes)?);
                break 'files;
            }
            seen += rows.len();
            row_in_file += rows.len();
        }
    }
    let Some(img) = found else {
        bail!(
            "corrupt: --index {} is past the end of split `{}` of `{}` ({seen} rows)",
            a.index,
            a.split,
            a.dataset
        );
    };
    let corruptions: Vec<Corruption> = a.corruption.map_or_else(|| ALL.to_vec(), |c| vec![c]);
    let tiles: Vec<Vec<RgbImage>> = corruptions
        .par_iter()
        .map(|&c| {
            (1..=5u8)
                .map(|s| {
                    let mut rng = Rng::for_image(a.seed, a.index as u64);
                    corrupt_image(c, a.params, s, &img, &mut rng).map_err(anyhow::Error::from)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let f = MIN_CELL.div_ceil(img.width.max(img.height)).max(1);
    let (cw, ch) = (img.width * f, img.height * f);
    let names: Vec<&str> = corruptions.iter().map(|c| c.name()).collect();
    let left = names.iter().map(|n| text_width(n)).max().unwrap_or(0) + 2 * GAP;
    let top = 3 * LINE + 2 * GAP;
    let (cwu, chu) = (cw as u32, ch as u32);
    let title = format!(
        "{} {} row {} ({} parameters, seed {})",
        a.dataset,
        a.split,
        a.index,
        a.params.name(),
        a.seed
    );
    let width = (left + 6 * (cwu + GAP) + GAP).max(text_width(&title) + 2 * GAP);
    let height = top + names.len() as u32 * (chu + GAP) + GAP;
    let mut canvas = Canvas::new(width, height);
    let black = [0, 0, 0];
    canvas.text(GAP, GAP, &title, black, false);
    for (j, label) in ["clean", "1", "2", "3", "4", "5"].iter().enumerate() {
        let x = left + j as u32 * (cwu + GAP) + cwu.saturating_sub(text_width(label)) / 2;
        canvas.text(x, top - LINE - GAP, label, black, false);
    }
    for (i, (name, row)) in names.iter().zip(&tiles).enumerate() {
        let y = top + i as u32 * (chu + GAP);
        canvas.text(GAP, y + chu.saturating_sub(LINE) / 2, name, black, false);
        for (j, tile) in std::iter::once(&img).chain(row).enumerate() {
            let t = resize_nearest(tile, cw, ch);
            let x = left + j as u32 * (cwu + GAP);
            for (k, px) in t.data.chunks_exact(3).enumerate() {
                let (dx, dy) = ((k % cw) as u32, (k / cw) as u32);
                canvas.img.put_pixel(x + dx, y + dy, image::Rgb([px[0], px[1], px[2]]));
            }
        }
    }
    let bytes = canvas.png().context("encoding the grid")?;
    crate::report::write_atomic(out, &bytes)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
