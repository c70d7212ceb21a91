//! The router training driver's ring generations: the processes in rank order, each step's
//! pinned work for the ring or the coordinator relay, forming a generation (ring ports, then the
//! full state), and retrying a step after a lost process or a failed ring.

use super::data_parallel::{self, Exchange, Hello, RouterWork, RING_FAILED};
use super::step::StepItem;
use anyhow::{Context, Result};
use fusion_cluster::runtime::{ring_member::RingLayout, ClusterError, Job};

/// One generation of the workers' ring: its processes by rank and their ring addresses
/// (`None`: the coordinator's executor alone).
pub(super) struct Generation {
    /// The processes, by rank.
    pub(super) names: Vec<String>,
    /// Their ring addresses.
    pub(super) layout: Option<RingLayout>,
}

/// Consecutive failed attempts at a step (each a lost or joining process) before the run fails.
pub(super) const MAX_RETRIES: usize = 20;

/// Step `step`'s pinned items on generation `g`: each rank's contiguous block of `items`, as
/// one ring step item per rank ([`Exchange::Ring`]) or one relay item per task
/// ([`Exchange::Coordinator`]), in item order.
pub(super) fn step_work(
    g: &Generation,
    step: u64,
    items: &[StepItem],
    exchange: Exchange,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut work = Vec::new();
    for (rank, range) in data_parallel::blocks(items.len(), g.names.len()).into_iter().enumerate() {
        let name = &g.names[rank];
        match exchange {
            Exchange::Ring => {
                let w = RouterWork::Step {
                    layout: g.layout.clone(),
                    rank: rank as u32,
                    step,
                    mine: items[range].to_vec(),
                };
                work.push((name.clone(), fusion_cluster::codec::encode(&w)?));
            }
            Exchange::Coordinator => {
                for item in &items[range] {
                    let w = RouterWork::Relay(item.clone());
                    work.push((name.clone(), fusion_cluster::codec::encode(&w)?));
                }
            }
        }
    }
    Ok(work)
}

/// An executor's ring failed ([`RING_FAILED`]).
pub(super) fn is_ring_failure(e: &ClusterError) -> bool {
    matches!(e, ClusterError::ItemFailed { error, .. } if error.contains(RING_FAILED))
}

/// The job's processes in rank order: this process's own executor first, then the remote
/// workers in joining order.
pub(super) fn ranked(mut names: Vec<String>) -> Result<Vec<String>> {
    let local = fusion_cluster::runtime::local_worker_name(0);
    let at = names
        .iter()
        .position(|n| *n == local)
        .context("the coordinator's own executor is not in the job")?;
    let me = names.remove(at);
    names.insert(0, me);
    Ok(names)
}

/// Forms ring generation `generation` of the processes `names`: asks each where its ring
/// endpoint is (not when the gradients go through the coordinator), then hands every process
/// `full`, the routers and Adam's state of step `step` (an encoded [`RouterBroadcast::Full`]).
pub(super) fn form_generation(
    job: &mut Job,
    names: Vec<String>,
    generation: u64,
    step: u64,
    full: Vec<u8>,
    exchange: Exchange,
) -> std::result::Result<Generation, ClusterError> {
    let codec = |e: fusion_cluster::codec::CodecError| ClusterError::Runtime(e.to_string());
    let layout = if names.len() > 1 && exchange == Exchange::Ring {
        let hello = fusion_cluster::codec::encode(&RouterWork::Hello).map_err(codec)?;
        let round = job.round_pinned(names.iter().map(|n| (n.clone(), hello.clone())).collect())?;
        let hellos: Vec<Hello> = round
            .results
            .iter()
            .map(|r| fusion_cluster::codec::decode(r))
            .collect::<std::result::Result<_, _>>()
            .map_err(codec)?;
        data_parallel::layout(generation, &hellos)
            .map_err(|e| ClusterError::Runtime(format!("{e:#}")))?
    } else {
        None
    };
    job.broadcast(full)?;
    tracing::info!(generation, processes = ?names, step, %exchange, "router training: ring generation");
    Ok(Generation { names, layout })
}

/// A failed step or ring formation: `Ok` (try again on the processes left) when a process was
/// lost or the ring failed, up to [`MAX_RETRIES`] times in a row; the error otherwise.
pub(super) fn retry(
    e: ClusterError,
    step: u64,
    failures: &mut usize,
    exchange: Exchange,
) -> Result<()> {
    let lost = matches!(e, ClusterError::PinnedWorkerLost { .. }) || is_ring_failure(&e);
    *failures += 1;
    if !lost || *failures > MAX_RETRIES {
        return Err(anyhow::Error::new(e).context(format!("step {step}")));
    }
    match exchange {
        Exchange::Ring => {
            tracing::warn!(step, attempt = *failures, error = %e, "a process was lost or the ring failed: the step runs again on a new ring")
        }
        Exchange::Coordinator => {
            tracing::warn!(step, attempt = *failures, error = %e, "a process was lost: the step runs again on the processes left")
        }
    }
    // Give the coordinator time to see the loss before the next attempt looks at the workers.
    std::thread::sleep(std::time::Duration::from_millis(200 * (*failures as u64).min(10)));
    Ok(())
}
