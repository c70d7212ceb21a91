//! Cluster benchmark (not a timed test): prints a table of
//!
//! - cluster formation time: wall time from starting N processes (child processes of this binary)
//!   until the coordinator has completed mutual TLS and the Hello/Welcome handshake with all of
//!   them and received a first message from each (N = 1, 4, 16 on loopback; credentials in a
//!   temporary job folder);
//! - ring all-reduce latency over QUIC between 2 and 4 processes, 12 KiB and 4 MiB of `f32`
//!   (median of 20 timed iterations after 2 warm-ups, each preceded by a barrier);
//! - scheduler throughput: `Scheduler::next_for` + `complete` per item, 1 and 16 workers.
//!
//! Run: `cargo run --release -p fusion_cluster --example cluster_bench`.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fusion_cluster::{
    collectives::{quic::form_ring, RingConfig},
    scheduler::Scheduler,
    transport::{Endpoint, JobCredentials, Peer, TransportOptions, MEMBER_SERVER_NAME},
};
use serde::{Deserialize, Serialize};

const JOB: &str = "bench";
const ITERS: usize = 20;
const WARMUP: usize = 2;
/// 12 KiB (AdaMerging's layer-wise λ for 8 tasks) and 4 MiB of `f32`.
const SIZES: [usize; 2] = [3 * 1024, 1 << 20];

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Serialize, Deserialize)]
enum ToChild {
    RingPlan { rank: u32, addrs: Vec<SocketAddr> },
    Bye,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToParent {
    /// The child's endpoint address (its ring address).
    Ready(SocketAddr),
    /// Milliseconds per timed all-reduce, for each size of `SIZES`.
    Latencies(Vec<Vec<f64>>),
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.get(1).map(String::as_str) {
        Some("--child") if args.len() == 5 => {
            rt.block_on(child(args[2].parse()?, Path::new(&args[3]), &args[4]))
        }
        _ => rt.block_on(parent()),
    }
}

/// Child processes, SIGKILLed by PID when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Children {
    /// Waits for every child to exit (they exit after `Bye`).
    fn wait(mut self) -> Result<(), Error> {
        for c in &mut self.0 {
            let status = c.wait()?;
            if !status.success() {
                return Err(format!("a child exited with {status}").into());
            }
        }
        Ok(())
    }
}

/// Starts `n` children that join the coordinator `ep`; returns them and one peer per child, in
/// child order, with each child's endpoint address, plus the time until all had joined.
async fn start(
    ep: &Endpoint,
    dir: &Path,
    n: usize,
) -> Result<(Children, Vec<(Peer, SocketAddr)>, Duration), Error> {
    let addr = ep.local_addr()?;
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut children = Children(Vec::new());
    for i in 0..n {
        children.0.push(
            Command::new(&exe)
                .args(["--child", &addr.to_string(), &dir.display().to_string(), &i.to_string()])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    let mut peers: Vec<Option<(Peer, SocketAddr)>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let mut peer = tokio::time::timeout(Duration::from_secs(60), ep.accept())
            .await
            .map_err(|_| "a child did not join within 60 s")?
            .ok_or("endpoint closed")?;
        let i: usize = peer.node_name().trim_start_matches("child-").parse()?;
        let ToParent::Ready(ring_addr) = peer.recv().await? else {
            return Err("expected Ready".into());
        };
        peers[i] = Some((peer, ring_addr));
    }
    let joined = t0.elapsed();
    let peers = peers.into_iter().map(|p| p.ok_or("missing child")).collect::<Result<_, _>>()?;
    Ok((children, peers, joined))
}

async fn bye(children: Children, peers: Vec<(Peer, SocketAddr)>) -> Result<(), Error> {
    for (mut peer, _) in peers {
        peer.send(&ToChild::Bye).await?;
        // The child exits on Bye; its exit may beat the acknowledgement, so a lost connection
        // here is expected.
        let _ = tokio::time::timeout(Duration::from_secs(2), peer.finish()).await;
    }
    tokio::task::spawn_blocking(move || children.wait()).await?
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

async fn parent() -> Result<(), Error> {
    let mut rows: Vec<(String, String, String)> = Vec::new();

    for n in [1usize, 4, 16] {
        let mut times = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir()?;
            let ca = JobCredentials::create_or_load(dir.path())?;
            let ep = Endpoint::bind(
                "127.0.0.1:0".parse()?,
                &ca.issue_node("coordinator", &[])?,
                JOB,
                TransportOptions::fast(),
            )?;
            let (children, peers, joined) = start(&ep, dir.path(), n).await?;
            times.push(joined.as_secs_f64() * 1e3);
            bye(children, peers).await?;
        }
        let spread = times.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ");
        rows.push((
            "cluster formation (spawn → all handshaken)".into(),
            format!("{n} process{}", if n == 1 { "" } else { "es" }),
            format!("{:.0} ms (median of 3: {spread})", median(times)),
        ));
    }

    for p in [2usize, 4] {
        let dir = tempfile::tempdir()?;
        let ca = JobCredentials::create_or_load(dir.path())?;
        let ep = Endpoint::bind(
            "127.0.0.1:0".parse()?,
            &ca.issue_node("coordinator", &[])?,
            JOB,
            TransportOptions::fast(),
        )?;
        let (children, mut peers, _) = start(&ep, dir.path(), p).await?;
        let addrs: Vec<SocketAddr> = peers.iter().map(|(_, a)| *a).collect();
        for (rank, (peer, _)) in peers.iter_mut().enumerate() {
            peer.send(&ToChild::RingPlan { rank: rank as u32, addrs: addrs.clone() }).await?;
        }
        let mut per_rank = Vec::new();
        for (peer, _) in &mut peers {
            let msg = tokio::time::timeout(Duration::from_secs(300), peer.recv::<ToParent>())
                .await
                .map_err(|_| "ring benchmark timed out")??;
            let ToParent::Latencies(l) = msg else { return Err("expected Latencies".into()) };
            per_rank.push(l);
        }
        for (s, &len) in SIZES.iter().enumerate() {
            let rank0 = median(per_rank[0][s].clone());
            let worst = per_rank.iter().map(|l| median(l[s].clone())).fold(0.0, f64::max);
            let mb_s = (len * 4) as f64 / (rank0 / 1e3) / 1e6;
            rows.push((
                "ring all-reduce over QUIC".into(),
                format!("{p} processes, {} KiB", len * 4 / 1024),
                format!(
                    "{rank0:.2} ms median (slowest rank {worst:.2} ms; {mb_s:.0} MB/s of buffer)"
                ),
            ));
        }
        bye(children, peers).await?;
    }

    for workers in [1usize, 16] {
        let items = 200_000usize;
        let mut sched: Scheduler<u64, u64, usize> = Scheduler::new(0..items as u64);
        let now = Instant::now();
        let t0 = Instant::now();
        let mut done = 0usize;
        while done < items {
            for w in 0..workers {
                let Some(a) = sched.next_for(&w, now) else { continue };
                let (id, v) = (a.id, *a.payload);
                sched.complete(&w, id, v.wrapping_mul(3))?;
                done += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let sum = sched.fold(0u64, |a, r| a.wrapping_add(*r))?;
        assert_eq!(sum, (0..items as u64).map(|v| v * 3).sum::<u64>());
        rows.push((
            "scheduler next_for + complete".into(),
            format!("{workers} worker{}, {items} items", if workers == 1 { "" } else { "s" }),
            format!("{:.2} M items/s", items as f64 / secs / 1e6),
        ));
    }

    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    println!("| {:w0$} | {:w1$} | result |", "measurement", "setting");
    println!("|{}|{}|---|", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
    for (a, b, c) in rows {
        println!("| {a:w0$} | {b:w1$} | {c} |");
    }
    Ok(())
}

async fn child(coordinator: SocketAddr, dir: &Path, index: &str) -> Result<(), Error> {
    let job = JobCredentials::wait_and_load(dir, Duration::from_secs(30))?;
    let node = job.issue_node(&format!("child-{index}"), &[])?;
    let ep = Endpoint::bind("127.0.0.1:0".parse()?, &node, JOB, TransportOptions::fast())?;
    let mut ctl = ep.connect(coordinator, MEMBER_SERVER_NAME).await?;
    ctl.send(&ToParent::Ready(ep.local_addr()?)).await?;
    loop {
        match ctl.recv::<ToChild>().await? {
            ToChild::Bye => {
                ctl.close("bye");
                let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
                return Ok(());
            }
            ToChild::RingPlan { rank, addrs } => {
                let rank = rank as usize;
                let config =
                    RingConfig { timeout: Some(Duration::from_secs(60)), ..RingConfig::default() };
                let mut ring =
                    form_ring(&ep, rank, &addrs, 1, config, Duration::from_secs(30)).await?;
                let mut all = Vec::new();
                for &len in &SIZES {
                    let mut buf: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.25).collect();
                    let mut times = Vec::new();
                    for it in 0..WARMUP + ITERS {
                        ring.barrier().await?;
                        let t = Instant::now();
                        ring.all_reduce_sum(&mut buf).await?;
                        if it >= WARMUP {
                            times.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    all.push(times);
                }
                ring.shutdown(Duration::from_secs(5)).await;
                ctl.send(&ToParent::Latencies(all)).await?;
            }
        }
    }
}
