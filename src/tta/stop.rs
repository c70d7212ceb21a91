//! What a test-time adaptation does on a stop signal (SIGTERM, SIGUSR2): write the state of its
//! last finished step at once and end the process with status 143, whatever the step under way.
//! A step can outlast a scheduler's grace period (an L/14 step takes minutes on a CPU, and a
//! coordinator may be waiting for workers), and the steps since the last periodic checkpoint
//! would otherwise be lost to the SIGKILL that follows.
//!
//! The loop keeps its step-boundary state behind a mutex and holds it while it moves the state
//! on to the next boundary; the watcher's `checkpoint` takes the mutex (so it never sees a
//! half-updated state), writes, and keeps it (forgets its guard): the loop cannot move the state
//! on, or write a later checkpoint, before the process ends.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the watcher looks at the signal flag.
const POLL: Duration = Duration::from_millis(20);

/// Ends the watcher thread of [`watch`] when dropped: the adaptation is over, and a later
/// signal is for whatever runs next (a sweep's next cell, the evaluation).
pub struct Watching(Arc<AtomicBool>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Watches `flag` (a [`crate::signals::StopSignals`] flag) until the returned guard is dropped.
/// Once it is raised: calls `checkpoint(file)`, which writes the loop's last step-boundary state
/// to `file` when there is one, keeps that state locked, and returns its step; then logs what was done, and ends the
/// process with status 143 (`_exit`: libtorch may be mid-computation on other threads, and
/// nothing of this process needs to run once the checkpoint is on disk).
pub fn watch<F>(
    flag: Arc<AtomicBool>,
    file: Option<PathBuf>,
    max_steps: u64,
    checkpoint: F,
) -> Watching
where
    F: Fn(Option<&Path>) -> Result<u64> + Send + 'static,
{
    let done = Arc::new(AtomicBool::new(false));
    let over = done.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(POLL);
        if over.load(Ordering::SeqCst) {
            return;
        }
        if !flag.load(Ordering::SeqCst) {
            continue;
        }
        match (checkpoint(file.as_deref()), &file) {
            (Err(e), _) => tracing::error!(
                error = %format!("{e:#}"),
                "signal received: the checkpoint could not be written"
            ),
            (Ok(step), Some(f)) => tracing::warn!(
                step,
                of = max_steps,
                checkpoint = %f.display(),
                "signal received: checkpointed; the same command resumes from here"
            ),
            (Ok(step), None) => tracing::warn!(
                step,
                "signal received: stopping (no path.cache_dir, so no checkpoint: a rerun starts afresh)"
            ),
        }
        // SAFETY: `_exit` ends the process without running destructors or atexit handlers; the
        // checkpoint was written (and synced) above.
        unsafe { libc::_exit(143) }
    });
    Watching(done)
}
