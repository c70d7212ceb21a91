//! What `tests/transport.rs` and its child process, `examples/test_transport_peer.rs`, share:
//! the message type and how an endpoint is bound.
#![allow(dead_code)]

use std::net::SocketAddr;

use fusion_cluster::transport::{Endpoint, NodeCredentials, TransportOptions};
use serde::{Deserialize, Serialize};

pub const JOB: &str = "job-42";
pub const LOCAL: &str = "127.0.0.1:0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ctl {
    Ping(u64),
    Grad(Vec<f32>),
    Text(String),
}

pub fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

pub fn bind(creds: &NodeCredentials, job: &str) -> Endpoint {
    Endpoint::bind(local(), creds, job, TransportOptions::fast()).unwrap()
}
