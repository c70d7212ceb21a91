//! `fusion_cluster`: the model-agnostic cluster runtime of fusion_bench.
//!
//! This crate never depends on libtorch (see DESIGN.md §2). It holds the process-placement facts
//! every process needs (which rank it is and which GPU it binds), the wire codec, the QUIC
//! transport with mutual TLS, the collectives, and the pure state machines of scheduling and
//! membership.
#![warn(missing_docs, unreachable_pub)]

pub mod codec;
pub mod collectives;
pub mod membership;
pub mod placement;
pub mod runtime;
pub mod scheduler;
pub mod slurm;
pub mod transport;

#[cfg(test)]
mod test_rng;
