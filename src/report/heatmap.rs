//! A labelled heatmap of a square matrix as a PNG, in the spirit of FusionBench's seaborn plot
//! (`annot=True, fmt=".2f", cmap="GnBu"`): cells coloured on the GnBu scale between the
//! matrix's minimum and maximum, each annotated with its value to two decimals, row labels on the
//! left, column labels (vertical) below, a colour bar on the right. Text uses a built-in 5×7
//! pixel font, so no font files or plotting stack are needed.

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

/// 5×7 glyphs, one byte per row, bit 4 the leftmost pixel.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        ' ' => [0; 7],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// Pixel scale of the font and the advance of one character.
const SCALE: u32 = 2;
const ADVANCE: u32 = 6 * SCALE;
const LINE: u32 = 7 * SCALE;

struct Canvas {
    img: image::RgbImage,
}

impl Canvas {
    fn fill(&mut self, x0: u32, y0: u32, w: u32, h: u32, c: [u8; 3]) {
        for y in y0..(y0 + h).min(self.img.height()) {
            for x in x0..(x0 + w).min(self.img.width()) {
                self.img.put_pixel(x, y, image::Rgb(c));
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y); `vertical` turns it 90° anticlockwise
    /// (reading bottom to top, starting at (x, y) as its bottom-left corner).
    fn text(&mut self, x: u32, y: u32, text: &str, c: [u8; 3], vertical: bool) {
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5u32 {
                    if bits & (0x10 >> col) == 0 {
                        continue;
                    }
                    let (gx, gy) = (i as u32 * ADVANCE + col * SCALE, row as u32 * SCALE);
                    let (px, py) = if vertical {
                        (x + gy, y.saturating_sub(gx + SCALE))
                    } else {
                        (x + gx, y + gy)
                    };
                    self.fill(px, py, SCALE, SCALE, c);
                }
            }
        }
    }
}

fn text_width(s: &str) -> u32 {
    s.chars().count() as u32 * ADVANCE
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
    let mut c = Canvas { img: image::RgbImage::from_pixel(width, height, image::Rgb([255; 3])) };
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
    let mut bytes = Vec::new();
    c.img
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .context("encoding the heatmap")?;
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
