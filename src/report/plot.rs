//! Line plots as PNGs: accuracy against a swept value (`summary.png` of a sweep), and a training
//! loss against the step (test-time adaptation).

use super::canvas::{nice_ticks, text_width, tick_label, Canvas, LINE};
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

/// Plots `losses[i]` against `steps[i]` under `title`, joined by a line (points marked when
/// there are at most 50), with ticked, gridded, labelled axes (`step`, `loss`), and writes the PNG
/// to `path` atomically. Non-finite losses are left out.
pub fn plot_loss(path: &Path, steps: &[i64], losses: &[f64], title: &str) -> Result<()> {
    anyhow::ensure!(
        steps.len() == losses.len(),
        "plot_loss: {} steps but {} losses",
        steps.len(),
        losses.len()
    );
    let pts: Vec<(f64, f64)> = steps
        .iter()
        .zip(losses)
        .filter(|(_, l)| l.is_finite())
        .map(|(&s, &l)| (s as f64, l))
        .collect();
    let (w, h) = (760u32, 460u32);
    let (left, right, top, bottom) = (96u32, 32u32, 48u32, 72u32);
    let (pw, ph) = (f64::from(w - left - right), f64::from(h - top - bottom));
    let mut c = Canvas::new(w, h);
    let (black, grey, blue) = ([0, 0, 0], [225, 225, 225], [8, 104, 172]);
    let bounds = |v: &mut dyn Iterator<Item = f64>| {
        v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)))
    };
    let (mut x0, mut x1) = bounds(&mut pts.iter().map(|p| p.0));
    let (mut y0, mut y1) = bounds(&mut pts.iter().map(|p| p.1));
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5 * y0.abs().max(1e-3), y1 + 0.5 * y1.abs().max(1e-3));
    }
    // The y range widened to whole ticks; the x range is the steps'.
    let (_, ystep) = nice_ticks(y0, y1, 5);
    let (y0, y1) = ((y0 / ystep).floor() * ystep, (y1 / ystep).ceil() * ystep);
    let px = |x: f64| f64::from(left) + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| f64::from(top) + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let (yticks, ystep) = nice_ticks(y0, y1, 5);
    for &y in &yticks {
        let yy = py(y);
        c.line((f64::from(left), yy), (f64::from(left) + pw, yy), 1, grey);
        let label = tick_label(y, ystep);
        let ly = (yy as u32).saturating_sub(LINE / 2);
        c.text(left.saturating_sub(text_width(&label) + 8), ly, &label, black, false);
    }
    let (xticks, xstep) = nice_ticks(x0, x1, 6);
    let xstep = xstep.max(1.0);
    for &x in xticks.iter().filter(|x| x.fract() == 0.0) {
        let xx = px(x);
        c.line((xx, f64::from(top)), (xx, f64::from(top) + ph), 1, grey);
        let label = tick_label(x, xstep);
        let lx = (xx as u32).saturating_sub(text_width(&label) / 2);
        c.text(lx, top + ph as u32 + 8, &label, black, false);
    }
    let (l, t) = (f64::from(left), f64::from(top));
    c.line((l, t), (l, t + ph), 2, black);
    c.line((l, t + ph), (l + pw, t + ph), 2, black);
    c.text(left + (pw as u32).saturating_sub(text_width(title)) / 2, 14, title, black, false);
    c.text(
        left + (pw as u32).saturating_sub(text_width("step")) / 2,
        h - LINE - 12,
        "step",
        black,
        false,
    );
    c.text(16, top + (ph as u32 + text_width("loss")) / 2, "loss", black, true);
    for pair in pts.windows(2) {
        c.line((px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), 2, blue);
    }
    if pts.len() <= 50 {
        for &(x, y) in &pts {
            c.fill((px(x) as u32).saturating_sub(2), (py(y) as u32).saturating_sub(2), 5, 5, blue);
        }
    }
    let bytes = c.png().context("encoding the loss plot")?;
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

    #[test]
    fn loss_plot_puts_the_curve_inside_the_axes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let steps: Vec<i64> = (0..500).collect();
        let losses: Vec<f64> =
            steps.iter().map(|&s| 2.0 * (-(s as f64) / 120.0).exp() + 0.3).collect();
        plot_loss(&path, &steps, &losses, "AdaMerging: train/loss").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (760, 460));
        let blue = [8u8, 104, 172];
        // The first point (the maximum, 2.3) lies at the left edge, below the top tick (2.5).
        let col: Vec<u32> = (48..48 + 340).filter(|&y| img.get_pixel(97, y).0 == blue).collect();
        assert!(!col.is_empty());
        let y_of = |v: f64| 48.0 + (1.0 - v / 2.5) * 340.0;
        assert!(col.iter().any(|&y| (f64::from(y) - y_of(2.3)).abs() <= 2.0), "{col:?}");
        // Nothing blue outside the plot area.
        let outside = (0..760).flat_map(|x| (0..460).map(move |y| (x, y))).filter(|&(x, y)| {
            !(96..=96 + 632 + 2).contains(&x) || !(46..=48 + 340 + 2).contains(&y)
        });
        assert!(outside.into_iter().all(|(x, y)| img.get_pixel(x, y).0 != blue));
        assert!(plot_loss(&path, &[0, 1], &[1.0], "t").is_err());
        plot_loss(&path, &[], &[], "empty").unwrap();
        plot_loss(&path, &[3], &[f64::NAN], "nan only").unwrap();
        plot_loss(&path, &[3], &[0.5], "one point").unwrap();
    }
}
