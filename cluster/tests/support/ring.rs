//! What `tests/ring_quic.rs` and its child process, `examples/test_ring_rank.rs`, share: the
//! control messages, the ring settings and the inputs each rank sums.
#![allow(dead_code)]

use std::{net::SocketAddr, path::Path, time::Duration};

use fusion_cluster::{
    collectives::RingConfig,
    transport::{Endpoint, JobCredentials, NodeCredentials, TransportOptions},
};
use serde::{Deserialize, Serialize};

pub const JOB: &str = "ring-job";
/// Several chunks per buffer, so the pipelined schedule is exercised.
pub const CHUNK: usize = 4096;
pub const LEN: usize = 30_001;
pub const BCAST_ROOT: usize = 1;

#[derive(Debug, Serialize, Deserialize)]
pub enum ToChild {
    Plan { rank: u32, addrs: Vec<SocketAddr>, seed: u64, victim: Option<u32> },
    Round2,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToParent {
    Addr(SocketAddr),
    Round1 {
        all_reduce: Result<Vec<u32>, String>,
        broadcast: Result<Vec<u32>, String>,
    },
    /// The all-reduce after the victim was killed: its error (`None` if it succeeded) and how
    /// long the rank took to see it (printed, not asserted).
    Round2 {
        error: Option<String>,
        elapsed_ms: u64,
    },
    ShutDown,
}

pub fn config() -> RingConfig {
    RingConfig { chunk_floats: CHUNK, timeout: Some(Duration::from_secs(20)) }
}

/// SplitMix64 floats over many magnitudes: a sum in another order gives other bits.
pub fn inputs(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut s = seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..len)
        .map(|_| {
            let m = (next() % 2001) as f32 - 1000.0;
            m * 10f32.powi((next() % 10) as i32 - 3)
        })
        .collect()
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn node(dir: &Path, name: &str) -> NodeCredentials {
    JobCredentials::create_or_load(dir).unwrap().issue_node(name, &[]).unwrap()
}

pub fn bind(creds: &NodeCredentials) -> Endpoint {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), creds, JOB, TransportOptions::fast()).unwrap()
}
