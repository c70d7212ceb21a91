//! Ring collectives over QUIC between processes: results bit-identical to the in-memory ring, a
//! refused ring hello, and a killed rank that makes the others fail fast instead of hanging.
//!
//! The multi-process tests start child processes of this test binary (as `tests/transport.rs`
//! does): each child binds an endpoint on 127.0.0.1, reports its address to the parent over a
//! transport connection, receives the plan (its rank, every rank's address, the input seed), forms
//! the ring, runs the collectives and sends the result bits back. All use
//! `TransportOptions::fast()` (idle 1 s, keep-alive 0.3 s).

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
        ring::CollectiveError,
        LinkError, Ring, RingConfig,
    },
    transport::{Endpoint, JobCredentials, NodeCredentials, Peer, TransportOptions},
};
use serde::{Deserialize, Serialize};

const JOB: &str = "ring-job";
const CHILD_ENV: &str = "FUSION_RING_QUIC_TEST_CHILD";
/// Several chunks per buffer, so the pipelined schedule is exercised.
const CHUNK: usize = 4096;
const LEN: usize = 30_001;
const BCAST_ROOT: usize = 1;

#[derive(Debug, Serialize, Deserialize)]
enum ToChild {
    Plan { rank: u32, addrs: Vec<SocketAddr>, seed: u64, victim: Option<u32> },
    Round2,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToParent {
    Addr(SocketAddr),
    Round1 { all_reduce: Result<Vec<u32>, String>, broadcast: Result<Vec<u32>, String> },
    Round2 { error: Option<String>, elapsed_ms: u64 },
    ShutDown,
}

fn config() -> RingConfig {
    RingConfig { chunk_floats: CHUNK, timeout: Some(Duration::from_secs(20)) }
}

/// SplitMix64 floats over many magnitudes: a sum in another order gives other bits.
fn inputs(seed: u64, rank: usize, len: usize) -> Vec<f32> {
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

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

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

fn node(dir: &Path, name: &str) -> NodeCredentials {
    JobCredentials::create_or_load(dir).unwrap().issue_node(name, &[]).unwrap()
}

fn bind(creds: &NodeCredentials) -> Endpoint {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), creds, JOB, TransportOptions::fast()).unwrap()
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
    let children = Children(
        (0..n)
            .map(|i| {
                let child = Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "child_rank_process", "--nocapture", "--test-threads=1"])
                    .env(CHILD_ENV, format!("{addr}|{}|{i}", dir.display()))
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
async fn killed_rank_makes_the_other_ranks_fail_within_two_seconds() {
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
        let msg = tokio::time::timeout(Duration::from_secs(10), peer.recv::<ToParent>())
            .await
            .unwrap_or_else(|_| panic!("rank {rank} hung after the kill"))
            .unwrap();
        let ToParent::Round2 { error, elapsed_ms } = msg else { panic!("{msg:?}") };
        let error = error.unwrap_or_else(|| panic!("rank {rank} finished without the victim"));
        println!("rank {rank}: failed after {elapsed_ms} ms: {error}");
        assert!(error.contains("ring link"), "rank {rank}: {error}");
        assert!(elapsed_ms < 2_000, "rank {rank} took {elapsed_ms} ms");
    }
    let all_failed = killed_at.elapsed();
    println!("all surviving ranks reported failure {all_failed:?} after the kill");
    assert!(all_failed < Duration::from_millis(2_500), "{all_failed:?}");
}

/// Not a test on its own: the body of one rank, started by the tests above.
#[test]
fn child_rank_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (Some(parent), Some(dir), Some(index)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD_ENV}: {spec}");
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
