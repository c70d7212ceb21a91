//! Preprocessing throughput, single thread: parquet image bytes → decode → CLIP preprocessing,
//! for every row of a parquet file, repeated. Used by `scripts/bench_eval.py`, which times
//! transformers' `CLIPImageProcessor` on the same file and prints the ratio.
//!
//! usage: bench_preprocess FILE.parquet PREPROCESSOR_CONFIG.json [REPEATS]

use anyhow::{Context, Result};
use fusion_bench::data::{decode_rgb, parquet::read_rows, preprocess, ImageProcessorConfig};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, config, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: bench_preprocess FILE.parquet PREPROCESSOR_CONFIG.json [REPEATS]");
    };
    let repeats: usize = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let rows = read_rows(Path::new(file))?;
    let cfg = ImageProcessorConfig::from_file(Path::new(config))?;
    let mut best = f64::INFINITY;
    let mut checksum = 0f64;
    for _ in 0..repeats {
        let t0 = Instant::now();
        for r in &rows {
            let img = decode_rgb(&r.bytes).context("decode")?;
            let px = preprocess(&img, &cfg)?;
            checksum += f64::from(px[px.len() / 2]);
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "{{\"images\": {}, \"seconds\": {best}, \"images_per_s\": {}, \"checksum\": {checksum}}}",
        rows.len(),
        rows.len() as f64 / best
    );
    Ok(())
}
