//! The child process of `tests/transport.rs`'s killed-peer test (not a tool):
//! `test_transport_peer <server addr> <job dir>` loads the CA the parent created (credentials
//! across processes), connects as `child`, sends `ready` and waits to be SIGKILLed.

#[path = "../tests/support/transport.rs"]
mod transport;

use std::{net::SocketAddr, path::Path, time::Duration};

use fusion_cluster::transport::JobCredentials;
use transport::{bind, Ctl, JOB};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, dir] = &args[..] else {
        panic!("usage: test_transport_peer <server addr> <job dir>; got {args:?}");
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let job = JobCredentials::wait_and_load(Path::new(dir), Duration::from_secs(5)).unwrap();
        let creds = job.issue_node("child", &[]).unwrap();
        let ep = bind(&creds, JOB);
        let mut peer = ep.connect(addr, "localhost").await.unwrap();
        peer.send(&Ctl::Text("ready".into())).await.unwrap();
        // Wait to be killed.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
}
