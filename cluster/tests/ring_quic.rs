//! Ring collectives over QUIC between processes: results bit-identical to the in-memory ring, a
//! refused ring hello, and a killed rank that makes the other ranks fail instead of hanging.
//!
//! The multi-process tests start `examples/test_ring_rank` (as `tests/transport.rs` and
//! `tests/runtime.rs` start their examples): each child binds an endpoint on 127.0.0.1, reports
//! its address to the parent over a transport connection, receives the plan (its rank, every
//! rank's address, the input seed), forms the ring, runs the collectives and sends the result bits
//! back. All use `TransportOptions::fast()` (idle 1 s, keep-alive 0.3 s).

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fusion_cluster::{
    collectives::{
        memory_ring,
        quic::{form_ring, QuicRing, QuicRingError},
        Ring,
    },
    transport::{Endpoint, Peer},
};
use support::ring::{bind, bits, config, inputs, node, ToChild, ToParent, BCAST_ROOT, LEN};

/// What the in-memory ring computes for these inputs: the reference.
async fn memory_all_reduce(all: &[Vec<f32>]) -> Vec<u32> {
    let n = all.len();
    let handles: Vec<_> = memory_ring(n, 2)
        .into_iter()
        .zip(all.iter().cloned())
        .enumerate()
        .map(|(r, ((s, rx), mut buf))| {
            tokio::spawn(async move {
                let mut ring = Ring::new(r, n, s, rx, config()).unwrap();
                ring.all_reduce_sum(&mut buf).await.unwrap();
                buf
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(bits(&h.await.unwrap()));
    }
    assert!(out.iter().all(|b| b == &out[0]), "the memory ring disagrees with itself");
    out.swap_remove(0)
}

fn sequential(all: &[Vec<f32>]) -> Vec<u32> {
    let mut acc = all[0].clone();
    for x in &all[1..] {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
    bits(&acc)
}

/// Child processes, SIGKILLed (by PID) when dropped so a failing test leaves none behind.
struct Children(Vec<Option<Child>>);

impl Children {
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill(i);
        }
    }
}

/// Starts `n` children, waits until each has joined and sent its ring address; returns the
/// children and one peer per rank (rank = child index).
async fn start_children(n: usize, dir: &Path) -> (Children, Vec<Peer>, Vec<SocketAddr>, Endpoint) {
    let parent = bind(&node(dir, "parent"));
    let addr = parent.local_addr().unwrap();
    let bin = support::example_bin("test_ring_rank");
    let children = Children(
        (0..n)
            .map(|i| {
                let child = Command::new(&bin)
                    .args([addr.to_string(), dir.display().to_string(), i.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap();
                Some(child)
            })
            .collect(),
    );
    let mut peers: Vec<Option<(Peer, SocketAddr)>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let mut peer = tokio::time::timeout(Duration::from_secs(30), parent.accept())
            .await
            .expect("a child did not join within 30 s")
            .expect("endpoint open");
        let i: usize = peer.node_name().trim_start_matches("child-").parse().unwrap();
        let ToParent::Addr(ring_addr) = peer.recv::<ToParent>().await.unwrap() else {
            panic!("expected Addr")
        };
        peers[i] = Some((peer, ring_addr));
    }
    let (peers, addrs): (Vec<_>, Vec<_>) = peers.into_iter().map(Option::unwrap).unzip();
    (children, peers, addrs, parent)
}

async fn send_plans(peers: &mut [Peer], addrs: &[SocketAddr], seed: u64, victim: Option<u32>) {
    for (rank, peer) in peers.iter_mut().enumerate() {
        let plan = ToChild::Plan { rank: rank as u32, addrs: addrs.to_vec(), seed, victim };
        peer.send(&plan).await.unwrap();
    }
}

/// Receives every rank's round-1 results and checks them against the in-memory ring.
async fn check_round1(peers: &mut [Peer], seed: u64) {
    let n = peers.len();
    let all: Vec<Vec<f32>> = (0..n).map(|r| inputs(seed, r, LEN)).collect();
    let want = memory_all_reduce(&all).await;
    assert_eq!(want, sequential(&all), "the ring's documented rank-order fold");
    let mut reversed = all.clone();
    reversed.reverse();
    assert_ne!(want, sequential(&reversed), "inputs must be order-sensitive");
    for (rank, peer) in peers.iter_mut().enumerate() {
        let msg = tokio::time::timeout(Duration::from_secs(30), peer.recv::<ToParent>())
            .await
            .expect("round 1 result within 30 s")
            .unwrap();
        let ToParent::Round1 { all_reduce, broadcast } = msg else { panic!("{msg:?}") };
        assert!(all_reduce.as_ref().unwrap() == &want, "rank {rank}: all-reduce bits differ");
        assert_eq!(broadcast.unwrap(), bits(&all[BCAST_ROOT]), "rank {rank}: broadcast");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_all_reduce_bit_identical_to_memory_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (_children, mut peers, addrs, _parent) = start_children(3, dir.path()).await;
    send_plans(&mut peers, &addrs, 31, None).await;
    check_round1(&mut peers, 31).await;
    for (rank, peer) in peers.iter_mut().enumerate() {
        let msg = tokio::time::timeout(Duration::from_secs(10), peer.recv::<ToParent>()).await;
        assert!(matches!(msg, Ok(Ok(ToParent::ShutDown))), "rank {rank}: {msg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The survivors' all-reduce must fail with a closed ring link (the QUIC idle timeout of 1 s finds
/// the dead neighbour; the ring's own 20 s timeout would be another error). How long each took is
/// printed, not asserted: a loaded machine is slow, not wrong; 30 s without an answer is a hang.
async fn killed_rank_makes_the_other_ranks_fail_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (mut children, mut peers, addrs, _parent) = start_children(4, dir.path()).await;
    let victim = 2usize;
    send_plans(&mut peers, &addrs, 77, Some(victim as u32)).await;
    check_round1(&mut peers, 77).await;

    children.kill(victim); // SIGKILL: no CONNECTION_CLOSE
    let killed_at = Instant::now();
    for (rank, peer) in peers.iter_mut().enumerate() {
        if rank != victim {
            peer.send(&ToChild::Round2).await.unwrap();
        }
    }
    for (rank, peer) in peers.iter_mut().enumerate() {
        if rank == victim {
            continue;
        }
        let msg = tokio::time::timeout(Duration::from_secs(30), peer.recv::<ToParent>())
            .await
            .unwrap_or_else(|_| {
                panic!("rank {rank} gave no answer within 30 s of the kill: a hang")
            })
            .unwrap();
        let ToParent::Round2 { error, elapsed_ms } = msg else { panic!("{msg:?}") };
        let error = error.unwrap_or_else(|| panic!("rank {rank} finished without the victim"));
        println!("rank {rank}: failed after {elapsed_ms} ms: {error}");
        assert!(error.contains("ring link"), "rank {rank}: {error}");
    }
    println!("all surviving ranks reported failure {:?} after the kill", killed_at.elapsed());
}

/// Three ranks as tasks of one process, each with its own endpoint: several rounds of every
/// collective, then a graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_in_process_ranks_run_every_collective_repeatedly() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3;
    let eps: Vec<Endpoint> =
        (0..n).map(|r| bind(&node(dir.path(), &format!("rank-{r}")))).collect();
    let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.local_addr().unwrap()).collect();
    let all: Vec<Vec<f32>> = (0..n).map(|r| inputs(5, r, 1000)).collect();
    let want = memory_all_reduce(&all).await;
    let handles: Vec<_> = eps
        .into_iter()
        .enumerate()
        .map(|(rank, ep)| {
            let addrs = addrs.clone();
            let mine = all[rank].clone();
            tokio::spawn(async move {
                let mut ring =
                    form_ring(&ep, rank, &addrs, 9, config(), Duration::from_secs(10)).await?;
                let mut outs = Vec::new();
                for round in 0..5 {
                    let mut buf = mine.clone();
                    ring.all_reduce_sum(&mut buf).await?;
                    outs.push(bits(&buf));
                    ring.barrier().await?;
                    let mut b = vec![rank as f32; 7];
                    ring.broadcast(round % n, &mut b).await?;
                    assert_eq!(b, vec![(round % n) as f32; 7]);
                }
                ring.shutdown(Duration::from_secs(5)).await;
                Ok::<_, QuicRingError>(outs)
            })
        })
        .collect();
    for h in handles {
        let outs =
            tokio::time::timeout(Duration::from_secs(30), h).await.unwrap().unwrap().unwrap();
        assert!(outs.iter().all(|o| o == &want));
    }
}

#[tokio::test]
async fn ranks_of_different_rings_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let eps: Vec<Endpoint> =
        (0..2).map(|r| bind(&node(dir.path(), &format!("rank-{r}")))).collect();
    let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.local_addr().unwrap()).collect();
    let t = Duration::from_secs(5);
    let (a, b) = tokio::join!(
        form_ring(&eps[0], 0, &addrs, 1, config(), t),
        form_ring(&eps[1], 1, &addrs, 2, config(), t)
    );
    // Each rank refuses the other's hello; a rank that fails first may drop the other's link
    // before its refusal is read, so one of the two may see a lost link instead.
    let errs: Vec<QuicRingError> =
        [a, b].into_iter().map(|r| r.expect_err("mismatched ring ids must not form")).collect();
    assert!(
        errs.iter().any(
            |e| matches!(e, QuicRingError::Refused { .. }) && e.to_string().contains("ring_id")
        ),
        "{errs:?}"
    );
}

#[tokio::test]
async fn a_ring_of_one_needs_no_links_and_bad_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ep = bind(&node(dir.path(), "rank-0"));
    let addr = ep.local_addr().unwrap();
    let mut ring: QuicRing =
        form_ring(&ep, 0, &[addr], 0, config(), Duration::from_secs(1)).await.unwrap();
    let mut buf = vec![1.5f32, -2.0];
    ring.all_reduce_sum(&mut buf).await.unwrap();
    ring.barrier().await.unwrap();
    assert_eq!(buf, vec![1.5, -2.0]);
    ring.shutdown(Duration::from_secs(1)).await;
    let err = form_ring(&ep, 1, &[addr], 0, config(), Duration::from_secs(1)).await.err();
    assert!(matches!(err, Some(QuicRingError::InvalidRank { rank: 1, size: 1 })), "{err:?}");
}
