//! What `tests/runtime.rs` and its child process, `examples/test_runtime_node.rs`, share: the
//! toy computation and executor, and the cluster options.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use fusion_cluster::runtime::{ClusterOptions, Executor};

pub const JOB: &str = "job-runtime";

/// The toy computation: splitmix64 of the item's number.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn items(n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| (1000 + i).to_le_bytes().to_vec()).collect()
}

pub fn expected(n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| mix(1000 + i).to_le_bytes().to_vec()).collect()
}

/// Item = u64 little-endian, result = its `mix`, after an optional sleep. Optionally fails (or
/// panics) on one item, counts its executions, and touches a marker file when it starts its
/// `marker_after`-th item (so at least `marker_after - 1` results were returned by then).
#[derive(Default)]
pub struct Toy {
    pub sleep: Duration,
    pub fail_on: Option<u64>,
    pub panic_on: Option<u64>,
    pub count: Arc<AtomicUsize>,
    pub marker: Option<(PathBuf, usize)>,
}

impl Executor for Toy {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((path, after)) = &self.marker {
            if n == *after {
                std::fs::write(path, b"started").map_err(|e| e.to_string())?;
            }
        }
        let bytes: [u8; 8] =
            item.try_into().map_err(|_| format!("bad item of {} bytes", item.len()))?;
        let x = u64::from_le_bytes(bytes);
        thread::sleep(self.sleep);
        if self.fail_on == Some(x - 1000) {
            return Err(format!("boom on item value {x}"));
        }
        if self.panic_on == Some(x - 1000) {
            panic!("toy executor panics on {x}");
        }
        Ok(mix(x).to_le_bytes().to_vec())
    }
}

pub fn toy(sleep_ms: u64) -> Toy {
    Toy { sleep: Duration::from_millis(sleep_ms), ..Toy::default() }
}

pub fn opts(dir: &Path) -> ClusterOptions {
    ClusterOptions::new(JOB, dir).fast()
}

pub fn loopback() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

// --- Jobs with rounds (tests/rounds.rs): a toy test-time adaptation ---------------------------
//
// Round `r` of the toy job is one optimisation step: every item carries the step's state (the
// "parameters"), the executor builds its "model" from it once per step and caches it, and the
// next step's state is a fold of the step's results in item order. A result of another round
// mixed in, or a fold in another order, changes every later round's state and results.

/// Item `index` of round `round` with state `state`: three u64 little-endian.
pub fn step_item(round: u64, state: u64, index: u64) -> Vec<u8> {
    [round, state, index].iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn step_items(round: u64, state: u64, n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| step_item(round, state, i)).collect()
}

/// (round, state, index) of a [`step_item`].
pub fn parse_step(item: &[u8]) -> Result<(u64, u64, u64), String> {
    if item.len() != 24 {
        return Err(format!("bad step item of {} bytes", item.len()));
    }
    let word = |i: usize| u64::from_le_bytes(item[8 * i..8 * i + 8].try_into().unwrap());
    Ok((word(0), word(1), word(2)))
}

/// The model of step (`round`, `state`), as a worker would build it.
pub fn step_model(round: u64, state: u64) -> u64 {
    mix(mix(round) ^ state)
}

/// The result of item `index` on `model`.
pub fn step_result(model: u64, index: u64) -> Vec<u8> {
    mix(model ^ index).to_le_bytes().to_vec()
}

/// The next round's state: the results folded in item order.
pub fn next_state(state: u64, results: &[Vec<u8>]) -> u64 {
    results.iter().fold(state, |s, r| mix(s ^ u64::from_le_bytes(r[..8].try_into().unwrap())))
}

/// The state of round 1.
pub const STEP_STATE_0: u64 = 42;

/// Every round's results of a `rounds`-round job of `n` items, computed directly.
pub fn step_reference(rounds: u64, n: u64) -> Vec<Vec<Vec<u8>>> {
    let mut state = STEP_STATE_0;
    (1..=rounds)
        .map(|r| {
            let model = step_model(r, state);
            let results: Vec<Vec<u8>> = (0..n).map(|i| step_result(model, i)).collect();
            state = next_state(state, &results);
            results
        })
        .collect()
}

/// The driver of the toy job: `rounds` rounds of `n` items, each from the last one's results.
pub fn drive_steps(
    job: &mut fusion_cluster::runtime::Job,
    rounds: u64,
    n: u64,
) -> Result<Vec<fusion_cluster::runtime::RoundResults>, fusion_cluster::runtime::ClusterError> {
    let mut state = STEP_STATE_0;
    let mut out = Vec::new();
    for r in 1..=rounds {
        let done = job.round(step_items(r, state, n))?;
        state = next_state(state, &done.results);
        out.push(done);
    }
    Ok(out)
}

/// Executes step items: builds (and counts in `builds`) a model when an item carries another
/// step than the cached one, counts the items it saw in its own state and publishes that count
/// in `seen` (so `seen` falls short if the executor were ever rebuilt), sleeps `sleep` per
/// item. With `hang`, touches the file and sleeps for a minute on its `after`-th item of round
/// `round` (to be killed there).
#[derive(Default)]
pub struct Stepper {
    pub sleep: Duration,
    pub builds: Arc<AtomicUsize>,
    pub seen: Arc<AtomicUsize>,
    pub hang: Option<(PathBuf, u64, usize)>,
    model: Option<((u64, u64), u64)>,
    count: usize,
    seen_in_round: Vec<usize>,
}

impl Executor for Stepper {
    fn execute(&mut self, item: &[u8]) -> Result<Vec<u8>, String> {
        let (round, state, index) = parse_step(item)?;
        self.count += 1;
        self.seen.store(self.count, Ordering::SeqCst);
        let r = usize::try_from(round).unwrap();
        if self.seen_in_round.len() <= r {
            self.seen_in_round.resize(r + 1, 0);
        }
        self.seen_in_round[r] += 1;
        if let Some((path, hang_round, after)) = &self.hang {
            if round == *hang_round && self.seen_in_round[r] == *after {
                std::fs::write(path, b"hanging").map_err(|e| e.to_string())?;
                thread::sleep(Duration::from_secs(60));
            }
        }
        let model = match self.model {
            Some((key, model)) if key == (round, state) => model,
            _ => {
                self.builds.fetch_add(1, Ordering::SeqCst);
                let model = step_model(round, state);
                self.model = Some(((round, state), model));
                model
            }
        };
        thread::sleep(self.sleep);
        Ok(step_result(model, index))
    }
}

pub fn stepper(sleep_ms: u64) -> Stepper {
    Stepper { sleep: Duration::from_millis(sleep_ms), ..Stepper::default() }
}
