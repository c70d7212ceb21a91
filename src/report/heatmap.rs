//! A labelled heatmap of a square matrix as a PNG, in the spirit of FusionBench's seaborn plot
//! (`annot=True, fmt=".2f", cmap="GnBu"`): cells coloured on the GnBu scale between the
//! matrix's minimum and maximum, each annotated with its value to two decimals, row labels on the
//! left, column labels (vertical) below, a colour bar on the right. Text uses a built-in 5×7
//! pixel font, so no font files or plotting stack are needed.
//!
//! [`plot_lambda_heatmap`] draws AdaMerging's merging coefficients the same way, tasks × layers
//! (FusionBench's `adamerging_layerwise_coefficients.png`).

use super::canvas::{nice_ticks, text_width, tick_label, Canvas, LINE};
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

/// Draws AdaMerging's coefficients `values` (row-major `[tasks.len(), columns]`: one row per
/// task, one column per layer) under `title` as a heatmap on the GnBu scale with a ticked colour
/// bar, task names on the left and layer indices below, and writes the PNG to `path` atomically.
/// Cells are annotated with their values when wide enough (task-wise: one column); non-finite
/// values are grey.
pub fn plot_lambda_heatmap(
    path: &Path,
    tasks: &[String],
    columns: usize,
    values: &[f32],
    title: &str,
) -> Result<()> {
    anyhow::ensure!(
        values.len() == tasks.len() * columns,
        "plot_lambda_heatmap: {} values for {} tasks × {columns} columns",
        values.len(),
        tasks.len()
    );
    let black = [0, 0, 0];
    let finite = values.iter().map(|&v| f64::from(v)).filter(|v| v.is_finite());
    let (lo, hi) =
        finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi {
        (0.0, 1.0)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let cols = columns.max(1) as u32;
    let annotate_w = text_width("-0.00") + 6;
    let cell_w = (960 / cols).clamp(3, annotate_w);
    let cell_h = 28u32;
    let label_w = tasks.iter().map(|s| text_width(s)).max().unwrap_or(0) + 16;
    let (left, top) = (label_w, 3 * LINE + 8);
    let (grid_w, grid_h) = (cell_w * cols, cell_h * tasks.len() as u32);
    let bar_h = grid_h.max(140);
    let (cticks, cstep) = nice_ticks(lo, hi, 4);
    let tick_w = cticks.iter().map(|&v| text_width(&tick_label(v, cstep))).max().unwrap_or(0);
    let bx = left + grid_w + 24;
    let width = (bx + 20 + 10 + tick_w + 16).max(text_width(title) + 32);
    let height = top + bar_h + 8 + LINE + 12 + LINE + 12;
    let mut c = Canvas::new(width, height);
    let tx =
        (left + grid_w.saturating_sub(text_width(title)) / 2).min(width - text_width(title) - 16);
    c.text(tx, LINE, title, black, false);
    for (t, row) in values.chunks(columns.max(1)).enumerate().take(tasks.len()) {
        for (j, &v) in row.iter().enumerate() {
            let v = f64::from(v);
            let color = if v.is_finite() { gnbu((v - lo) / (hi - lo)) } else { [190; 3] };
            let (x, y) = (left + j as u32 * cell_w, top + t as u32 * cell_h);
            c.fill(x, y, cell_w, cell_h, color);
            if cell_w >= annotate_w {
                let lum = 0.299 * f64::from(color[0])
                    + 0.587 * f64::from(color[1])
                    + 0.114 * f64::from(color[2]);
                let ink = if lum < 128.0 { [255; 3] } else { black };
                let label = if v.is_finite() { format!("{v:.2}") } else { "nan".into() };
                let lx = x + (cell_w - text_width(&label)) / 2;
                c.text(lx, y + (cell_h - LINE) / 2, &label, ink, false);
            }
        }
    }
    for (t, name) in tasks.iter().enumerate() {
        let y = top + t as u32 * cell_h + (cell_h - LINE) / 2;
        c.text(label_w - 8 - text_width(name), y, name, black, false);
    }
    // Layer indices: every k-th column, k a round number leaving room for the widest label.
    let need = text_width(&(cols - 1).to_string()) + 8;
    let every = [1u32, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10_000]
        .into_iter()
        .find(|k| k * cell_w >= need)
        .unwrap_or(cols);
    let ty = top + grid_h;
    for j in (0..cols).step_by(every as usize) {
        let cx = left + j * cell_w + cell_w / 2;
        c.fill(cx, ty, 1, 5, black);
        let label = j.to_string();
        c.text(cx.saturating_sub(text_width(&label) / 2), ty + 8, &label, black, false);
    }
    let xl = left + grid_w.saturating_sub(text_width("layer")) / 2;
    c.text(xl, ty + 8 + LINE + 12, "layer", black, false);
    // Colour bar: top is the maximum; ticks at round values.
    for y in 0..bar_h {
        c.fill(bx, top + y, 20, 1, gnbu(1.0 - f64::from(y) / f64::from(bar_h - 1)));
    }
    for &v in &cticks {
        let y = top + ((1.0 - (v - lo) / (hi - lo)) * f64::from(bar_h - 1)).round() as u32;
        c.fill(bx + 20, y, 5, 1, black);
        let label = tick_label(v, cstep);
        c.text(bx + 30, y.saturating_sub(LINE / 2), &label, black, false);
    }
    let bytes = c.png().context("encoding the coefficient heatmap")?;
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

    #[test]
    fn lambda_heatmap_colours_cells_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lambda.png");
        let tasks = vec!["sun397".to_string(), "dtd".to_string()];
        // Columns 0..200; the maximum at (0, 0), the minimum at (1, 199), a NaN at (1, 0).
        let mut values: Vec<f32> = (0..400).map(|i| 0.3 + (i % 7) as f32 * 0.01).collect();
        values[0] = 0.9;
        values[399] = -0.1;
        values[200] = f32::NAN;
        plot_lambda_heatmap(&path, &tasks, 200, &values, "layer-wise coefficients").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let (left, top, cell_w) = (text_width("sun397") + 16, 3 * LINE + 8, 960 / 200);
        assert_eq!(img.get_pixel(left, top).0, GNBU[8]);
        assert_eq!(img.get_pixel(left + 199 * cell_w, top + 28).0, GNBU[0]);
        assert_eq!(img.get_pixel(left, top + 28).0, [190; 3]);
        assert!(plot_lambda_heatmap(&path, &tasks, 3, &values, "t").is_err());
        // Task-wise: one annotated column; constant values still draw.
        plot_lambda_heatmap(&path, &tasks, 1, &[0.3, 0.3], "task-wise").unwrap();
        plot_lambda_heatmap(&path, &[], 0, &[], "empty").unwrap();
    }
}
