//! A line plot as a PNG: accuracy against a swept value (`summary.png` of a sweep).

use super::canvas::{text_width, Canvas, LINE};
use anyhow::{Context, Result};
use std::path::Path;

/// Plots `points` (x, y), sorted by x, joined by a line, with the axes' ranges labelled, and
/// writes the PNG to `path` atomically.
pub fn save_line_png(
    path: &Path,
    points: &[(f64, f64)],
    x_label: &str,
    y_label: &str,
) -> Result<()> {
    let mut pts: Vec<(f64, f64)> =
        points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (w, h) = (640u32, 420u32);
    let (left, right, top, bottom) = (90u32, 30u32, 40u32, 70u32);
    let mut c = Canvas::new(w, h);
    let black = [0, 0, 0];
    let (pw, ph) = (f64::from(w - left - right), f64::from(h - top - bottom));
    let range = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        if lo > hi {
            (0.0, 1.0)
        } else if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, hi + 0.5)
        }
    };
    let (x0, x1) = range(&mut pts.iter().map(|p| p.0));
    let (y0, y1) = range(&mut pts.iter().map(|p| p.1));
    let px = |x: f64| f64::from(left) + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| f64::from(top) + (1.0 - (y - y0) / (y1 - y0)) * ph;
    // Axes.
    c.line((f64::from(left), f64::from(top)), (f64::from(left), f64::from(top) + ph), 2, black);
    c.line(
        (f64::from(left), f64::from(top) + ph),
        (f64::from(left) + pw, f64::from(top) + ph),
        2,
        black,
    );
    // Range labels.
    let (ybot, ytop) = (format!("{y0:.3}"), format!("{y1:.3}"));
    c.text(left.saturating_sub(text_width(&ytop) + 6), top, &ytop, black, false);
    c.text(left.saturating_sub(text_width(&ybot) + 6), top + ph as u32 - LINE, &ybot, black, false);
    let (xl, xr) = (format!("{x0}"), format!("{x1}"));
    c.text(left, top + ph as u32 + 8, &xl, black, false);
    c.text(
        (left + pw as u32).saturating_sub(text_width(&xr)),
        top + ph as u32 + 8,
        &xr,
        black,
        false,
    );
    c.text(
        left + (pw as u32).saturating_sub(text_width(x_label)) / 2,
        h - LINE - 8,
        x_label,
        black,
        false,
    );
    c.text(8, 10, y_label, black, false);
    // The line and its points.
    let blue = [8, 104, 172];
    for pair in pts.windows(2) {
        c.line((px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), 2, blue);
    }
    for &(x, y) in &pts {
        c.fill((px(x) as u32).saturating_sub(3), (py(y) as u32).saturating_sub(3), 7, 7, blue);
    }
    let bytes = c.png().context("encoding the plot")?;
    super::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_land_where_their_values_say() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        save_line_png(&path, &[(0.3, 0.5), (0.1, 0.25), (0.5, 0.75)], "lambda", "accuracy")
            .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let blue = [8u8, 104, 172];
        // The lowest x has the lowest y: its marker is at the bottom-left corner of the plot.
        assert_eq!(img.get_pixel(90, 40 + 310).0, blue);
        // The highest: top-right.
        assert_eq!(img.get_pixel(90 + 520, 40).0, blue);
    }
}
