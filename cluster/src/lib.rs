//! `fusion_cluster`: the model-agnostic cluster runtime of fusion_bench.
//!
//! This crate never depends on libtorch (see DESIGN.md §2). Later issues add the coordinator,
//! worker and dataset-shard actors, the QUIC transport and the sweep scheduler. For now it holds
//! the process-placement facts every process needs: which rank it is and which GPU it binds.
#![warn(missing_docs, unreachable_pub)]

pub mod placement;
