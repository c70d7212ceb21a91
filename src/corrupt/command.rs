//! The `corrupt` command: arguments, reading the source split, corrupting in parallel, writing
//! the new split atomically.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_schema::Schema;
use parquet::arrow::ArrowWriter;
use rayon::prelude::*;

use super::chunks::{corrupt_chunk, ChunkOut, Plan};
use super::{parse_severity, Corruption, ParamSet};
use crate::cli::{Flag, Owner};
use crate::data::{decode_rgb, files, parquet as pq, RgbImage};
use crate::hub::Hub;
use crate::launch::Launch;

const fn flag(
    names: &'static [&'static str],
    value: Option<&'static str>,
    help: &'static str,
) -> Flag {
    Flag { names, value, owner: Owner::Program, help }
}

/// The flags of `fusion_bench corrupt`, in the order its help lists them.
pub const FLAGS: &[Flag] = &[
    flag(&["--dataset"], Some("ID"), "the hub dataset (e.g. tanganke/eurosat) or a local dataset folder"),
    flag(&["--split"], Some("SPLIT"), "the split to corrupt (default test)"),
    flag(&["--corruption"], Some("NAME"), "contrast, gaussian_noise, impulse_noise, jpeg_compression, motion_blur, pixelate or spatter"),
    flag(&["--severity"], Some("1-5"), "the severity (default 3)"),
    flag(&["--params"], Some("cifar10c|imagenetc"), "parameter table: FusionBench's CIFAR-10-C (default) or ImageNet-C's"),
    flag(&["--seed"], Some("N"), "seed of the random corruptions (default 0); the same seed gives the same bytes for any --threads"),
    flag(&["--name"], Some("SPLIT"), "the new split's name (default: the corruption's name)"),
    flag(&["--overwrite"], None, "replace a split of that name written before"),
    flag(&["--threads"], Some("N"), "worker threads (default: all cores)"),
    flag(&["--grid"], Some("FILE.png"), "instead of a split: draw one image under every corruption (or --corruption) at severities 1-5"),
    flag(&["--index"], Some("ROW"), "with --grid: the row to draw (default 0)"),
    flag(&["--chunk-rows"], Some("N"), "rows per work item (default 64): the unit a cluster's processes share, and written as one record batch"),
];

/// Rows per chunk unless `--chunk-rows` says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 64;

/// The parsed arguments of `fusion_bench corrupt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptArgs {
    /// Hub id or local folder.
    pub dataset: String,
    /// Source split.
    pub split: String,
    /// The corruption (all of them for a grid when `None`).
    pub corruption: Option<Corruption>,
    /// Severity 1-5.
    pub severity: u8,
    /// Parameter table.
    pub params: ParamSet,
    /// Seed of the random corruptions.
    pub seed: u64,
    /// Name of the new split.
    pub name: Option<String>,
    /// Replace an existing split of that name.
    pub overwrite: bool,
    /// Worker threads (0: rayon's default).
    pub threads: usize,
    /// Draw a grid to this PNG instead of writing a split.
    pub grid: Option<PathBuf>,
    /// The row drawn in the grid.
    pub index: usize,
    /// Rows per chunk ([`super::chunks`]).
    pub chunk_rows: usize,
}

impl CorruptArgs {
    /// Parses the words after `corrupt`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut v: std::collections::BTreeMap<&'static str, String> = Default::default();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let (name, inline) = match arg.split_once('=') {
                Some((n, val)) => (n, Some(val.to_string())),
                None => (arg.as_str(), None),
            };
            let Some(f) = FLAGS.iter().find(|f| f.names.contains(&name)) else {
                bail!("corrupt: unknown argument `{arg}` (fusion_bench corrupt --help lists the flags)");
            };
            let value = match (f.value, inline) {
                (None, Some(_)) => bail!("corrupt: {name} takes no value"),
                (None, None) => String::new(),
                (Some(_), Some(val)) => val,
                (Some(p), None) => {
                    let val = args.get(i).filter(|a| !a.starts_with("--"));
                    let val =
                        val.with_context(|| format!("corrupt: {name} needs a value ({name} {p})"))?;
                    i += 1;
                    val.clone()
                }
            };
            if v.insert(f.names[0], value).is_some() {
                bail!("corrupt: {name} given twice");
            }
        }
        let get = |k: &str| v.get(k).cloned();
        let number = |k: &str, default: u64| -> Result<u64> {
            get(k).map_or(Ok(default), |s| {
                s.parse().with_context(|| {
                    format!("corrupt: {k} wants a non-negative integer, got `{s}`")
                })
            })
        };
        let grid = get("--grid").map(PathBuf::from);
        let corruption = get("--corruption").map(|c| Corruption::parse(&c)).transpose()?;
        if corruption.is_none() && grid.is_none() {
            bail!(
                "corrupt: --corruption NAME is required (one of {})",
                super::ALL.map(Corruption::name).join(", ")
            );
        }
        let Some(dataset) = get("--dataset") else { bail!("corrupt: --dataset ID is required") };
        let name = get("--name");
        if let Some(n) = &name {
            check_split_name(n)?;
        }
        Ok(Self {
            dataset,
            split: get("--split").unwrap_or_else(|| "test".into()),
            corruption,
            severity: parse_severity(&get("--severity").unwrap_or_else(|| "3".into()))?,
            params: ParamSet::parse(&get("--params").unwrap_or_else(|| "cifar10c".into()))?,
            seed: number("--seed", 0)?,
            name,
            overwrite: v.contains_key("--overwrite"),
            threads: number("--threads", 0)? as usize,
            grid,
            index: number("--index", 0)? as usize,
            chunk_rows: match number("--chunk-rows", DEFAULT_CHUNK_ROWS as u64)? {
                0 => bail!("corrupt: --chunk-rows must be at least 1"),
                n => n as usize,
            },
        })
    }

    /// The new split's name.
    pub fn split_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.corruption.map_or("", Corruption::name).to_string())
    }
}

/// `datasets`' rule for split names (`naming._split_re`): `^\w+(\.\w+)*$`.
fn check_split_name(name: &str) -> Result<()> {
    let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !name.split('.').all(word) {
        bail!("corrupt: `{name}` is not a valid split name (letters, digits, `_`, dots between words)");
    }
    Ok(())
}

/// The help of `fusion_bench corrupt`.
pub fn help() -> String {
    let mut out = String::from(
        "Usage: fusion_bench corrupt --dataset ID [--split test] --corruption NAME [--severity 3]\n\
         \x20      [--params cifar10c|imagenetc] [--seed 0] [--name SPLIT] [--threads N] [--grid FILE.png]\n\
         \x20      [--serve HOST:PORT | --join HOST:PORT | --hosts H1:PORT,H2,... --rank R]\n\n\
         Writes SPLIT (default: the corruption's name) beside the dataset's splits in its hub-cache\n\
         snapshot: data/SPLIT-00000-of-00001.parquet (PNG images, the source's labels) and the card's\n\
         configs/dataset_info entries, atomically; then `split: SPLIT` evaluates on it.\n\
         A large split can be shared by a cluster's processes, launched like any job (the launch\n\
         flags of `fusion_bench --help`, or srun): each reads its chunks from its own hub cache,\n\
         the coordinator writes the split, byte for byte what one process writes.\n\nFlags:\n",
    );
    let cols: Vec<(String, &str)> = FLAGS
        .iter()
        .map(|f| {
            (
                format!(
                    "{}{}",
                    f.names.join(", "),
                    f.value.map(|v| format!(" {v}")).unwrap_or_default()
                ),
                f.help,
            )
        })
        .collect();
    let w = cols.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    for (s, h) in cols {
        out.push_str(&format!("  {s:<w$}  {h}\n"));
    }
    out
}

/// The source split: its parquet files, in order, and the snapshot folder holding them.
struct Source {
    files: Vec<PathBuf>,
    root: PathBuf,
}

/// Runs `fusion_bench corrupt ARGS` in the role `launch` gives this process: alone, as the
/// coordinator of a cluster job (which writes the split) or as one of its workers.
pub fn run(args: &[String], launch: &Launch) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", help());
        return Ok(());
    }
    let a = CorruptArgs::parse(args)?;
    let src = open_source(&a)?;
    if a.grid.is_some() && launch.is_distributed() {
        bail!("corrupt: --grid draws one image on one process; leave out the launch flags");
    }
    if launch.join.is_some() {
        return super::distributed::work(&a, &src.files, launch);
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if a.threads > 0 {
        pool = pool.num_threads(a.threads);
    }
    let pool = pool.build().context("starting the worker threads")?;
    if let Some(grid) = &a.grid {
        return pool.install(|| super::grid::write_grid(&a, &src.files, grid));
    }
    pool.install(|| write_split(&a, &src, launch))
}

fn open_source(a: &CorruptArgs) -> Result<Source> {
    let root = Hub::default()
        .resolve_dataset(&a.dataset)
        .with_context(|| format!("corrupt: dataset `{}`", a.dataset))?;
    let files = files::find_split_files(&root, None, &a.split).with_context(|| {
        format!(
            "corrupt: split `{}` of dataset `{}` (snapshot {})",
            a.split,
            a.dataset,
            root.display()
        )
    })?;
    if files.is_empty() {
        bail!("corrupt: split `{}` of dataset `{}` has no parquet files", a.split, a.dataset);
    }
    Ok(Source { files, root })
}

/// Decodes row `index` (of the whole split) or says which dataset, split, file and row failed.
pub(crate) fn decode_row(
    a: &CorruptArgs,
    file: &Path,
    row_in_file: usize,
    index: usize,
    bytes: &[u8],
) -> Result<RgbImage> {
    decode_rgb(bytes).with_context(|| {
        format!(
            "corrupt: dataset `{}`, split `{}`, row {index} ({}, row {row_in_file}): the image does not decode",
            a.dataset,
            a.split,
            file.display()
        )
    })
}

/// `img` as a PNG file's bytes (lossless: the split holds exactly the corrupted pixels).
pub(crate) fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .context("corrupt: image buffer of the wrong size")?;
    buf.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .context("encoding PNG")?;
    Ok(out)
}

/// Chunks corrupted at once by a process alone (each in parallel inside too), then written in
/// order.
const LOCAL_GROUP: usize = 16;

fn write_split(a: &CorruptArgs, src: &Source, launch: &Launch) -> Result<()> {
    let started = std::time::Instant::now();
    let corruption = a.corruption.context("corrupt: --corruption is required")?;
    let name = a.split_name();
    check_split_name(&name)?;
    let data_dir = src.root.join("data");
    let file_name = format!("{name}-00000-of-00001.parquet");
    let target = data_dir.join(&file_name);
    if name == a.split {
        bail!("corrupt: the new split `{name}` would replace its source; choose another --name");
    }
    if let Ok(existing) = files::find_split_files(&src.root, None, &name) {
        if !existing.is_empty() && (!a.overwrite || existing.iter().any(|f| f != &target)) {
            bail!(
                "corrupt: dataset `{}` already has a split `{name}` ({}); choose another --name{}",
                a.dataset,
                existing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                if a.overwrite { "" } else { " or pass --overwrite" }
            );
        }
    }
    let plan = Plan::new(&src.files, a.chunk_rows)?;
    let total = plan.total_rows();
    // Check the columns before writing anything.
    pq::RowBatches::open(&src.files[0])?;
    let metadata = source_metadata(&src.files[0])?;
    let made_data_dir = !data_dir.is_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // On failure nothing stays: not even the folder, when this run made it (and it is empty).
    let clean_up = |tmp: &Path| {
        let _ = std::fs::remove_file(tmp);
        if made_data_dir {
            let _ = std::fs::remove_dir(&data_dir);
        }
    };
    remove_stale_partials(&data_dir, &file_name);
    let tmp = data_dir.join(format!(".{file_name}.{}.partial", std::process::id()));
    let result = (|| -> Result<(u64, u64)> {
        let mut out = SplitWriter::create(&tmp, metadata)?;
        let bar = crate::progress::bar(corruption.name(), total as usize, "images");
        let mut sink = |chunk: ChunkOut| out.write(chunk);
        if launch.serve.is_some() {
            let progress = |rows: u64| bar.inc(rows);
            super::distributed::coordinate(a, &plan, launch, &mut sink, &progress)?;
        } else {
            for group in plan.chunks.chunks(LOCAL_GROUP) {
                let outs = group
                    .par_iter()
                    .map(|c| {
                        let out = corrupt_chunk(a, &plan.files, c, None)?;
                        bar.inc(u64::from(c.rows));
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>>>()?;
                outs.into_iter().try_for_each(&mut sink)?;
            }
        }
        let done = out.finish()?;
        bar.finish_and_clear();
        Ok(done)
    })();
    let (rows, num_bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            clean_up(&tmp);
            return Err(e);
        }
    };
    if rows != total {
        clean_up(&tmp);
        bail!("corrupt: wrote {rows} rows, the split has {total}; nothing was published");
    }
    if let Err(e) = super::card::publish(&src.root, &a.split, &name, &tmp, &target, rows, num_bytes)
    {
        clean_up(&tmp);
        return Err(e)
            .with_context(|| format!("corrupt: publishing split `{name}` of `{}`", a.dataset));
    }
    tracing::info!(
        dataset = %a.dataset, split = %a.split, corruption = corruption.name(), severity = a.severity,
        params = a.params.name(), seed = a.seed, rows,
        seconds = started.elapsed().as_secs_f64(), file = %target.display(), "wrote split `{name}`"
    );
    Ok(())
}

/// Removes what a killed run of this command left in `data_dir` for `file_name`: hidden
/// `.{file_name}.{pid}.partial` files whose process is gone (never listed as a split, but dead
/// weight). A live process's file is left alone.
fn remove_stale_partials(data_dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.");
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".partial")) else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(file = %e.path().display(), "removed what a killed run left");
        }
    }
}

/// The new split's parquet file while it is written (under its temporary name): one record
/// batch per chunk, in chunk order.
struct SplitWriter {
    writer: ArrowWriter<File>,
    schema: Arc<Schema>,
    rows: u64,
    bytes: u64,
}

impl SplitWriter {
    fn create(tmp: &Path, metadata: arrow_schema::Metadata) -> Result<Self> {
        let schema = Arc::new(pq::image_schema(metadata));
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), None)?;
        Ok(Self { writer, schema, rows: 0, bytes: 0 })
    }

    fn write(&mut self, chunk: ChunkOut) -> Result<()> {
        let images: Vec<Vec<u8>> = chunk.images.into_iter().map(|b| b.0).collect();
        self.bytes += images.iter().map(|b| b.len() as u64).sum::<u64>();
        self.rows += images.len() as u64;
        self.writer.write(&pq::image_batch(&self.schema, &images, chunk.labels)?)?;
        Ok(())
    }

    /// Closes and syncs the file: its rows and image bytes.
    fn finish(self) -> Result<(u64, u64)> {
        let file = self.writer.into_inner()?;
        file.sync_all()?;
        Ok((self.rows, self.bytes))
    }
}

fn source_metadata(file: &Path) -> Result<arrow_schema::Metadata> {
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(b.schema().metadata().clone())
}
