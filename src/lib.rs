//! fusion_bench: FusionBench's CLIP-ViT model-merging benchmark, re-implemented on libtorch.
//!
//! The folder layout is the architecture (DESIGN.md §2): [`hub`] resolves Hugging Face ids to
//! local files, [`weights`] holds name→tensor maps, [`models::clip`] is the one CLIP forward,
//! [`data`] reads parquet image datasets and preprocesses them, [`tasks`] builds zero-shot heads
//! and metrics. [`methods`] holds one file per method behind one registry, [`program`] runs a
//! composed config (method, then evaluation), [`sweep`] runs `-m` sweeps, [`launch`] gives a
//! process its role in a cluster and [`cli`] reads the command line; [`corrupt`] writes corrupted
//! copies of dataset splits (`fusion_bench corrupt`).
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod corrupt;
pub mod data;
pub mod device;
pub mod hub;
pub mod launch;
pub mod methods;
pub mod models;
pub mod program;
pub mod progress;
pub mod report;
pub mod signals;
pub mod sweep;
pub mod tasks;
pub mod tta;
pub mod version;
pub mod weights;
