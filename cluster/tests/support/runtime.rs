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
