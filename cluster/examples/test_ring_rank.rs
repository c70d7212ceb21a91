//! One rank of the multi-process ring tests (`tests/ring_quic.rs` starts it; not a tool):
//! `test_ring_rank <parent addr> <job dir> <index>`. It binds an endpoint on 127.0.0.1, joins the
//! parent as `child-<index>` and sends its ring address, receives the plan (rank, every rank's
//! address, the input seed, the victim), forms the ring, runs an all-reduce, a barrier and a
//! broadcast and sends the result bits back. Then: the victim waits to be killed; the other ranks
//! run one more all-reduce when told and report how it failed; without a victim the ring shuts
//! down gracefully. Exits non-zero (panics) on anything unexpected.

#[path = "../tests/support/ring.rs"]
mod ring;

use std::{net::SocketAddr, path::Path, time::Duration, time::Instant};

use fusion_cluster::{
    collectives::{quic::form_ring, ring::CollectiveError, LinkError},
    transport::JobCredentials,
};
use ring::{bind, bits, config, inputs, ToChild, ToParent, BCAST_ROOT, LEN};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [parent, dir, index] = &args[..] else {
        panic!("usage: test_ring_rank <parent addr> <job dir> <index>; got {args:?}");
    };
    let parent: SocketAddr = parent.parse().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let job = JobCredentials::wait_and_load(Path::new(dir), Duration::from_secs(10)).unwrap();
        let ep = bind(&job.issue_node(&format!("child-{index}"), &[]).unwrap());
        let mut ctl = ep.connect(parent, "localhost").await.unwrap();
        ctl.send(&ToParent::Addr(ep.local_addr().unwrap())).await.unwrap();
        let ToChild::Plan { rank, addrs, seed, victim } = ctl.recv::<ToChild>().await.unwrap()
        else {
            panic!("expected a plan")
        };
        let rank = rank as usize;
        let mut ring =
            form_ring(&ep, rank, &addrs, 1, config(), Duration::from_secs(20)).await.unwrap();
        let mut buf = inputs(seed, rank, LEN);
        let all_reduce = ring.all_reduce_sum(&mut buf).await.map(|()| bits(&buf));
        ring.barrier().await.unwrap();
        let mut b = inputs(seed, rank, LEN);
        let broadcast = ring.broadcast(BCAST_ROOT, &mut b).await.map(|()| bits(&b));
        let err = |e: CollectiveError| e.to_string();
        let round1 = ToParent::Round1 {
            all_reduce: all_reduce.map_err(err),
            broadcast: broadcast.map_err(err),
        };
        ctl.send(&round1).await.unwrap();
        match victim {
            Some(v) if v as usize == rank => {
                // Wait to be killed.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Some(_) => {
                let ToChild::Round2 = ctl.recv::<ToChild>().await.unwrap() else {
                    panic!("expected Round2")
                };
                let start = Instant::now();
                let mut buf = inputs(seed, rank, LEN);
                let res = ring.all_reduce_sum(&mut buf).await;
                let elapsed_ms = start.elapsed().as_millis() as u64;
                if let Err(e) = &res {
                    assert!(ring.is_broken());
                    assert!(
                        matches!(e, CollectiveError::Link(LinkError::Closed(_))),
                        "a lost neighbour is a closed link: {e:?}"
                    );
                }
                let error = res.err().map(|e| e.to_string());
                ctl.send(&ToParent::Round2 { error, elapsed_ms }).await.unwrap();
                ctl.finish().await.unwrap();
            }
            None => {
                ring.shutdown(Duration::from_secs(5)).await;
                ctl.send(&ToParent::ShutDown).await.unwrap();
                ctl.finish().await.unwrap();
            }
        }
    });
}
