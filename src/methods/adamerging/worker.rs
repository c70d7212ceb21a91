//! A worker's side of AdaMerging on the cluster (`--join`): it computes the step items the
//! coordinator hands out and keeps the final λ the coordinator broadcasts at the adaptation's
//! end, so that it can merge the same model and join its evaluation.

use super::step::StepExecutor;
use super::AdaMergingConfig;
use crate::methods::RunContext;
use anyhow::{Context, Result};
use fusion_cluster::runtime::Executor;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// The coordinator's last broadcast of an adaptation: λ after its last step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Final {
    /// Steps taken (the run's `max_steps` once it finished).
    pub step: u64,
    /// λ, flattened.
    pub lambda: Vec<f32>,
}

/// The step executor, keeping the last [`Final`] broadcast.
struct Keeping {
    inner: StepExecutor,
    last: Arc<Mutex<Option<Final>>>,
}

impl Executor for Keeping {
    fn execute(&mut self, item: &[u8]) -> std::result::Result<Vec<u8>, String> {
        self.inner.execute(item)
    }

    fn batch_limit(&self) -> usize {
        Executor::batch_limit(&self.inner)
    }

    fn execute_batch(&mut self, items: &[&[u8]]) -> Vec<std::result::Result<Vec<u8>, String>> {
        self.inner.execute_batch(items)
    }

    fn on_broadcast(&mut self, state: &[u8]) -> std::result::Result<(), String> {
        let last: Final = fusion_cluster::codec::decode(state)
            .map_err(|e| format!("the coordinator's final λ: {e}"))?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
        Ok(())
    }
}

/// Computes the step items the coordinator at `coordinator` hands out until it releases this
/// worker. Returns the final λ when the coordinator broadcast it (a finished adaptation of
/// `max_steps` steps), `None` when the job ended otherwise.
pub fn work(
    c: &AdaMergingConfig,
    inputs: &Arc<super::merge::Inputs>,
    ctx: &RunContext<'_>,
    coordinator: std::net::SocketAddr,
) -> Result<Option<Vec<f32>>> {
    let set = super::tta::task_set(ctx, inputs)?;
    let devices = super::tta::chosen_devices(ctx)?;
    let inner = super::tta::executors(c, inputs, ctx, set, &devices)?
        .into_iter()
        .next()
        .context("a device")?;
    let last = Arc::new(Mutex::new(None));
    let executor = Keeping { inner, last: last.clone() };
    let name = ctx.launch.worker_name();
    let summary = fusion_cluster::runtime::run_worker(
        coordinator,
        &name,
        Box::new(executor),
        &ctx.launch.options_for(ctx.program),
    )
    .with_context(|| {
        format!("test-time adaptation: worker `{name}` of the coordinator at {coordinator}")
    })?;
    let last = last.lock().unwrap_or_else(|e| e.into_inner()).take();
    tracing::info!(
        items = summary.executed,
        last_step = last.as_ref().map(|f| f.step),
        "test-time adaptation: worker done"
    );
    Ok(last.filter(|f| f.step == c.max_steps).map(|f| f.lambda))
}
