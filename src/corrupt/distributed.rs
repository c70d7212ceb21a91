//! `fusion_bench corrupt` across the cluster's processes, for large splits: launched like any
//! job (`--serve`/`--join`, `--hosts`/`--rank`, or `srun` with several tasks), every process
//! runs the same command line. The coordinator cuts the split into chunks ([`super::chunks`]),
//! hands them out in rounds, corrupts some itself, and writes the results in chunk order; the
//! workers read their chunks from their own copy of the dataset (each node's hub cache: the
//! same files, checked by row count) and send back the PNG-encoded images. The written split is
//! byte for byte the one a single process writes: each image's noise comes from its row index
//! ([`super::rng::Rng::for_image`]) and the file from the chunk order. A lost worker costs only
//! the chunks it held, which the runtime hands to the others; nothing is visible before the
//! coordinator publishes the finished file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fusion_cluster::runtime::{ClusterOptions, Executor};
use serde::{Deserialize, Serialize};

use super::chunks::{corrupt_chunk, Chunk, ChunkOut, Plan};
use super::command::CorruptArgs;
use crate::launch::Launch;

/// The largest result frame of this job: a chunk's PNGs (64 images of several hundred KB).
const MAX_FRAME_LEN: usize = 256 << 20;

/// Chunks per round and process: results are written as each round ends, so the coordinator
/// holds at most this many chunks per process.
const CHUNKS_PER_PROCESS: usize = 4;

/// One work item: a chunk and the row count of its file on the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    chunk: Chunk,
    file_rows: u64,
}

/// A process's executor: its own copy of the split's files.
struct ChunkExecutor {
    args: CorruptArgs,
    files: Vec<PathBuf>,
    pool: rayon::ThreadPool,
}

impl Executor for ChunkExecutor {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let item: Item = fusion_cluster::codec::decode(item).map_err(|e| e.to_string())?;
        let out = self
            .pool
            .install(|| corrupt_chunk(&self.args, &self.files, &item.chunk, Some(item.file_rows)))
            .map_err(|e| format!("{e:#}"))?;
        tracing::debug!(index = item.chunk.index, rows = item.chunk.rows, "corrupt: chunk done");
        fusion_cluster::codec::encode(&out).map_err(|e| e.to_string())
    }
}

/// The job's id: what every process must agree on (the command's arguments but the threads).
pub fn job_id(a: &CorruptArgs) -> String {
    let key = format!(
        "corrupt|{}|{}|{:?}|{}|{}|{}|{:?}|{}",
        a.dataset,
        a.split,
        a.corruption.map(super::Corruption::name),
        a.severity,
        a.params.name(),
        a.seed,
        a.name,
        a.chunk_rows
    );
    crate::report::stable_hash(key.as_bytes())
}

/// The cluster settings of the job: credentials in `--job-dir`, else `outputs/.cluster/<id>`.
pub fn options(a: &CorruptArgs, launch: &Launch) -> ClusterOptions {
    let id = job_id(a);
    let dir = PathBuf::from("outputs").join(".cluster").join(&id);
    let mut o = launch.options(id, dir);
    o.transport.max_frame_len = o.transport.max_frame_len.max(MAX_FRAME_LEN);
    o
}

fn executor(a: &CorruptArgs, files: &[PathBuf]) -> Result<Box<ChunkExecutor>> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if a.threads > 0 {
        pool = pool.num_threads(a.threads);
    }
    let pool = pool.build().context("starting the worker threads")?;
    Ok(Box::new(ChunkExecutor { args: a.clone(), files: files.to_vec(), pool }))
}

/// A worker of the job at `coordinator`: corrupts the chunks it is given from `files` (its copy
/// of the source split) until the coordinator is done.
pub fn work(a: &CorruptArgs, files: &[PathBuf], launch: &Launch) -> Result<()> {
    let coordinator = launch.join.context("corrupt: a worker needs --join")?;
    let name = launch.worker_name();
    let summary = fusion_cluster::runtime::run_worker(
        coordinator,
        &name,
        executor(a, files)?,
        &options(a, launch),
    )
    .with_context(|| format!("corrupt: worker `{name}` of the coordinator at {coordinator}"))?;
    tracing::info!(items = summary.executed, "corrupt: worker done");
    Ok(())
}

/// The coordinator: corrupts `plan`'s chunks with the workers that join at `launch`'s address
/// and passes each chunk's result to `sink`, in chunk order; `progress` gets the rows done.
pub fn coordinate(
    a: &CorruptArgs,
    plan: &Plan,
    launch: &Launch,
    sink: &mut dyn FnMut(ChunkOut) -> Result<()>,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let listen = launch.serve_addr().context("corrupt: a coordinator needs --serve")?;
    let opts = options(a, launch);
    let job = opts.job_id.clone();
    let (outcome, summary) = fusion_cluster::runtime::run_job(
        vec![executor(a, &plan.files)?],
        Some(listen),
        &opts,
        |addr| {
            Launch::remember_bound(addr);
            tracing::info!(%addr, %job, "coordinator listening: workers join with --join")
        },
        |job| -> Result<()> {
            let mut next = 0;
            while next < plan.chunks.len() {
                let per_round = CHUNKS_PER_PROCESS * job.workers().len().max(1);
                let end = (next + per_round).min(plan.chunks.len());
                let items = plan.chunks[next..end]
                    .iter()
                    .map(|c| {
                        fusion_cluster::codec::encode(&Item {
                            chunk: *c,
                            file_rows: plan.file_rows[c.file as usize],
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let round = job.round(items).context("corrupt: a round of chunks")?;
                for (c, r) in plan.chunks[next..end].iter().zip(&round.results) {
                    let out: ChunkOut = fusion_cluster::codec::decode(r)?;
                    sink(out)?;
                    progress(u64::from(c.rows));
                }
                next = end;
            }
            Ok(())
        },
    )
    .context("corrupt: the cluster job")?;
    outcome?;
    tracing::info!(
        workers = ?summary.per_worker,
        lost = summary.lost.len(),
        "corrupt: chunks done on the cluster"
    );
    Ok(())
}
