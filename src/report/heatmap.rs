//! A labelled heatmap of a square matrix as a PNG, in the spirit of FusionBench's seaborn plot
//! (`annot=True, fmt=".2f", cmap="GnBu"`): cells coloured on the GnBu scale between the
//! matrix's minimum and maximum, each annotated with its value to two decimals, row labels on the
//! left, column labels (vertical) below, a colour bar on the right. Text uses a built-in 5×7
//! pixel font, so no font files or plotting stack are needed.

use super::canvas::{text_width, Canvas, LINE};
use anyhow::{Context, Result};
use std::path::Path;

/// ColorBrewer's GnBu (9 classes), as matplotlib's `GnBu` interpolates it.
const GNBU: [[u8; 3]; 9] = [
    [247, 252, 240],
    [224, 243, 219],
    [204, 235, 197],
    [168, 221, 181],
    [123, 204, 196],
    [78, 179, 211],
    [43, 140, 190],
    [8, 104, 172],
    [8, 64, 129],
];

fn gnbu(t: f64) -> [u8; 3] {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (GNBU.len() - 1) as f64;
    let i = (x.floor() as usize).min(GNBU.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (GNBU[i][k] as f64 * (1.0 - f) + GNBU[i + 1][k] as f64 * f).round() as u8;
    }
    c
}

/// Draws `m` (rows and columns labelled `names`) under `title` and writes it to `path` as PNG,
/// atomically.
pub fn save_png(path: &Path, names: &[String], m: &[Vec<f64>], title: &str) -> Result<()> {
    let n = names.len() as u32;
    let finite = m.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) =
        finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let span = if hi > lo { hi - lo } else { 1.0 };
    let cell = 64u32.max(text_width("-0.00") + 12);
    let label_w = names.iter().map(|s| text_width(s)).max().unwrap_or(0) + 16;
    let (left, top) = (label_w, 3 * LINE);
    let (grid, bar_w) = (n * cell, 24u32);
    let width = left + grid + 24 + bar_w + text_width("-0.00") + 24;
    let height = top + grid + label_w + 8;
    let mut c = Canvas::new(width, height);
    let black = [0, 0, 0];
    c.text(left + grid.saturating_sub(text_width(title)) / 2, LINE, title, black, false);
    for (i, row) in m.iter().enumerate().take(n as usize) {
        for (j, &v) in row.iter().enumerate().take(n as usize) {
            let t = (v - lo) / span;
            let color = gnbu(t);
            let (x, y) = (left + j as u32 * cell, top + i as u32 * cell);
            c.fill(x, y, cell, cell, color);
            let luminance =
                0.299 * color[0] as f64 + 0.587 * color[1] as f64 + 0.114 * color[2] as f64;
            let ink = if luminance < 128.0 { [255; 3] } else { black };
            let label = if v.is_finite() { format!("{v:.2}") } else { "nan".into() };
            c.text(x + (cell - text_width(&label)) / 2, y + (cell - LINE) / 2, &label, ink, false);
        }
    }
    for (i, name) in names.iter().enumerate() {
        let y = top + i as u32 * cell + (cell - LINE) / 2;
        c.text(label_w - 8 - text_width(name), y, name, black, false);
        let x = left + i as u32 * cell + (cell - LINE) / 2;
        c.text(x, top + grid + 8 + text_width(name), name, black, true);
    }
    // Colour bar: top is the maximum.
    let bx = left + grid + 24;
    for y in 0..grid {
        let t = 1.0 - y as f64 / grid.max(1) as f64;
        c.fill(bx, top + y, bar_w, 1, gnbu(t));
    }
    c.text(bx + bar_w + 6, top, &format!("{hi:.2}"), black, false);
    c.text(bx + bar_w + 6, top + grid - LINE, &format!("{lo:.2}"), black, false);
    let bytes = c.png().context("encoding the heatmap")?;
    super::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_take_the_scale_colours_and_labels_are_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.png");
        let names = vec!["sun397".to_string(), "mnist".to_string()];
        let m = vec![vec![1.0, 0.2], vec![0.2, 1.0]];
        save_png(&path, &names, &m, "title").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let cell = 64u32.max(text_width("-0.00") + 12);
        let left = text_width("sun397") + 16;
        let top = 3 * LINE;
        // Corners of cells: the maximum is the darkest colour, the minimum the lightest.
        assert_eq!(img.get_pixel(left + 1, top + 1).0, GNBU[8]);
        assert_eq!(img.get_pixel(left + cell + 1, top + 1).0, GNBU[0]);
        // Some ink in each row label's box.
        let inked =
            (0..left).any(|x| (top..top + cell).any(|y| img.get_pixel(x, y).0 == [0, 0, 0]));
        assert!(inked);
    }

    #[test]
    fn colour_scale_interpolates_gnbu() {
        assert_eq!(gnbu(0.0), GNBU[0]);
        assert_eq!(gnbu(1.0), GNBU[8]);
        assert_eq!(gnbu(0.5), GNBU[4]);
        assert_eq!(gnbu(f64::NAN), GNBU[0]);
    }
}
