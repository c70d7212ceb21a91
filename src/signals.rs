//! Slurm's stop signals (SIGTERM, and SIGUSR2 for `--signal`; NCCL owns SIGUSR1) while some part
//! of the program can stop cleanly, and their default action (the process ends) otherwise.
//!
//! A sweep finishes its current cell and stops; test-time adaptation checkpoints its last step
//! and stops. Each holds a [`StopSignals`] while it can do so. `signal-hook` cannot give a
//! signal its default disposition back once it has taken it, so a signal that arrives while no
//! [`StopSignals`] is held is given that default here: the process ends, as it would have with
//! no handler at all (a single run evaluating after its adaptation, say, is not left running
//! past the scheduler's grace period with the signal swallowed).

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

/// The signals a scheduler sends to stop a job.
pub const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR2];

/// How many [`StopSignals`] are held now, process-wide.
static HELD: AtomicUsize = AtomicUsize::new(0);
static DEFAULT_WHEN_UNHELD: Once = Once::new();

/// A flag raised by a stop signal, for as long as this is held. Dropping it unregisters the flag;
/// once none is held, the signals end the process again.
pub struct StopSignals {
    flag: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl StopSignals {
    /// Starts watching the stop signals.
    pub fn install() -> Result<Self> {
        let mut failed = None;
        DEFAULT_WHEN_UNHELD.call_once(|| {
            for sig in STOP_SIGNALS {
                // SAFETY: the action only reads an atomic and, when nothing holds a watcher,
                // calls `emulate_default_handler`, which signal-hook documents as async-signal-safe.
                let installed = unsafe {
                    signal_hook::low_level::register(sig, move || {
                        if HELD.load(Ordering::SeqCst) == 0 {
                            let _ = signal_hook::low_level::emulate_default_handler(sig);
                        }
                    })
                };
                if let Err(e) = installed {
                    failed = Some((sig, e));
                }
            }
        });
        if let Some((sig, e)) = failed {
            return Err(e).with_context(|| format!("installing the handler of signal {sig}"));
        }
        let flag = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for sig in STOP_SIGNALS {
            let id = signal_hook::flag::register(sig, flag.clone())
                .with_context(|| format!("installing the handler of signal {sig}"))?;
            ids.push(id);
        }
        HELD.fetch_add(1, Ordering::SeqCst);
        Ok(Self { flag, ids })
    }

    /// The flag the signals raise.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Whether a stop signal has arrived since [`StopSignals::install`].
    pub fn raised(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::SeqCst);
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SIGUSR2 only, raised at this process: the test harness's other threads ignore it, and
    // the default action is never reached while a watcher is held.
    #[test]
    fn a_held_watcher_sees_the_signal_and_a_dropped_one_no_longer_does() {
        let outer = StopSignals::install().unwrap();
        let inner = StopSignals::install().unwrap();
        let inner_flag = inner.flag();
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR2).unwrap();
        assert!(outer.raised() && inner.raised());
        drop(inner);
        outer.flag.store(false, Ordering::SeqCst);
        inner_flag.store(false, Ordering::SeqCst);
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR2).unwrap();
        assert!(outer.raised(), "the watcher still held sees the signal");
        assert!(!inner_flag.load(Ordering::SeqCst), "a dropped watcher's flag stays down");
        drop(outer);
    }

    /// Run in a child process (this test binary again): once the last watcher is dropped,
    /// SIGTERM ends the process by the signal, as with no handler at all.
    #[test]
    fn once_no_watcher_is_held_sigterm_ends_the_process() {
        if std::env::var_os("FUSION_BENCH_SIGNALS_CHILD").is_some() {
            let watching = StopSignals::install().unwrap();
            drop(watching);
            signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::exit(0);
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "signals::tests::once_no_watcher_is_held_sigterm_ends_the_process"])
            .args(["--test-threads", "1"])
            .env("FUSION_BENCH_SIGNALS_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(signal_hook::consts::SIGTERM), "{status}");
    }
}
