//! fusion_bench: FusionBench's CLIP-ViT model-merging benchmark, re-implemented on libtorch.
//!
//! The folder layout is the architecture (DESIGN.md §2): [`hub`] resolves Hugging Face ids to
//! local files, [`weights`] holds name→tensor maps, [`models::clip`] is the one CLIP forward,
//! [`data`] reads parquet image datasets and preprocesses them, [`tasks`] builds zero-shot heads
//! and metrics.
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod device;
pub mod hub;
pub mod methods;
pub mod models;
pub mod program;
pub mod progress;
pub mod report;
pub mod sweep;
pub mod tasks;
pub mod weights;
