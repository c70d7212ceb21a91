//! `method=dummy` (FusionBench's `DummyAlgorithm`): the pool's `_pretrained_` model, else its
//! first model, unchanged.

use super::{Merged, Method, RunContext};
use anyhow::Result;

/// Returns the pretrained (or first) model.
pub struct Dummy;

impl Method for Dummy {
    fn run(&self, ctx: &RunContext<'_>) -> Result<Merged> {
        let pool = ctx.pool;
        Ok(Merged {
            weights: pool.load_pretrained_or_first()?,
            trainable: true,
            workers_done: false,
            params: None,
            options: Default::default(),
            rejoin: None,
        })
    }
}
