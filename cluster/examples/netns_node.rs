//! One node of the network-namespace fault harness (`scripts/netns-faults.sh`): a coordinator that
//! hands toy work items to workers with the [`Scheduler`] over the QUIC transport, a worker, or an
//! intruder holding another job's CA.
//!
//! The toy item `i` takes `work_ms` (a sleep) and returns a SplitMix64 hash of `i`; the coordinator
//! folds the hashes in item order into one digest, so an interrupted run that re-queued a lost
//! worker's items must print the same digest as an uninterrupted one. Timeouts are
//! `TransportOptions::fast()` (idle 1 s, keep-alive 0.3 s).
//!
//! ```text
//! netns_node coordinator <listen addr> <job dir> <workers> <items> <work ms>
//! netns_node worker      <coordinator addr> <job dir> <name>
//! netns_node intruder    <coordinator addr> <a different job dir>
//! ```
//!
//! Output lines for the harness (stdout): `LISTENING`, `JOINED <name>`, `LOST <name> <unix ms>
//! <reason>`, `REQUEUED <name> <n>`, `RESULT <digest> ...`, `REFUSED <error>` / `ACCEPTED`.
//! Exit codes: 0 done; 1 an intruder was accepted; 2 every worker was lost; 3 a worker lost its
//! coordinator.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fusion_cluster::{
    scheduler::Scheduler,
    transport::{Endpoint, JobCredentials, PeerSender, TransportOptions, MEMBER_SERVER_NAME},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const JOB: &str = "netns-faults";

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Serialize, Deserialize)]
enum ToWorker {
    Work { id: usize, item: u64, work_ms: u64 },
    Done,
}

#[derive(Debug, Serialize, Deserialize)]
struct Finished {
    id: usize,
    hash: u64,
}

fn hash(item: u64) -> u64 {
    let mut z = item.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn usage() -> Error {
    "usage: netns_node coordinator <listen> <job dir> <workers> <items> <work ms> | \
     worker <coordinator> <job dir> <name> | intruder <coordinator> <other job dir>"
        .into()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start tokio: {e}");
                std::process::exit(4);
            }
        };
    let code = match rt.block_on(dispatch(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            4
        }
    };
    std::process::exit(code);
}

async fn dispatch(args: &[String]) -> Result<i32, Error> {
    let arg = |i: usize| args.get(i).ok_or_else(usage);
    match arg(0)?.as_str() {
        "coordinator" => {
            coordinator(
                arg(1)?.parse()?,
                Path::new(arg(2)?),
                arg(3)?.parse()?,
                arg(4)?.parse()?,
                arg(5)?.parse()?,
            )
            .await
        }
        "worker" => worker(arg(1)?.parse()?, Path::new(arg(2)?), arg(3)?).await,
        "intruder" => intruder(arg(1)?.parse()?, Path::new(arg(2)?)).await,
        _ => Err(usage()),
    }
}

enum Event {
    Finished(usize, Finished),
    Lost(usize, String),
}

async fn coordinator(
    listen: SocketAddr,
    dir: &Path,
    workers: usize,
    items: u64,
    work_ms: u64,
) -> Result<i32, Error> {
    let ca = JobCredentials::create_or_load(dir)?;
    let ep =
        Endpoint::bind(listen, &ca.issue_node("coordinator", &[])?, JOB, TransportOptions::fast())?;
    println!("LISTENING {}", ep.local_addr()?);
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut senders: HashMap<usize, PeerSender> = HashMap::new();
    let mut names = Vec::new();
    for w in 0..workers {
        let peer = tokio::time::timeout(Duration::from_secs(60), ep.accept())
            .await
            .map_err(|_| "workers did not join within 60 s")?
            .ok_or("endpoint closed")?;
        println!("JOINED {} from {}", peer.node_name(), peer.remote_address());
        names.push(peer.node_name().to_string());
        let (send, mut recv) = peer.split();
        senders.insert(w, send);
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match recv.recv::<Finished>().await {
                    Ok(f) => {
                        if tx.send(Event::Finished(w, f)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Lost(w, e.to_string()));
                        return;
                    }
                }
            }
        });
    }
    // Every later accept is refused by TLS or ignored; the intruder test only needs the refusal.
    let started = Instant::now();
    let mut sched = Scheduler::<u64, u64, usize>::new(0..items).with_in_flight_limit(2)?;
    let mut per_worker = vec![0usize; workers];
    let mut requeued = 0usize;
    let mut lost = Vec::new();
    loop {
        // Hand out work to every live worker up to its limit.
        let now = Instant::now();
        for (&w, send) in senders.iter_mut() {
            while let Some(a) = sched.next_for(&w, now) {
                let msg = ToWorker::Work { id: a.id.0, item: *a.payload, work_ms };
                if send.send(&msg).await.is_err() {
                    break; // the reader task reports the loss
                }
            }
        }
        if sched.is_done() {
            break;
        }
        if senders.is_empty() {
            println!("ALL-LOST done={}/{}", sched.progress().done, items);
            return Ok(2);
        }
        match events.recv().await {
            Some(Event::Finished(w, f)) => {
                let id = fusion_cluster::scheduler::ItemId(f.id);
                if sched.complete(&w, id, f.hash).is_ok() {
                    per_worker[w] += 1;
                }
            }
            Some(Event::Lost(w, reason)) => {
                println!("LOST {} {} {}", names[w], unix_ms(), reason);
                senders.remove(&w);
                let back = sched.worker_lost(&w);
                requeued += back.len();
                println!("REQUEUED {} {}", names[w], back.len());
                lost.push(names[w].clone());
            }
            None => return Err("event channel closed".into()),
        }
    }
    let digest =
        sched.fold(0xCBF2_9CE4_8422_2325u64, |d, h| (d ^ h).wrapping_mul(0x100_0000_01B3))?;
    let p = sched.progress();
    let counts: Vec<String> =
        names.iter().zip(&per_worker).map(|(n, c)| format!("{n}:{c}")).collect();
    println!(
        "RESULT {digest:016x} items={} requeued={requeued} computed_twice={} lost=[{}] \
         per_worker=[{}] secs={:.2}",
        p.total,
        p.computed_twice,
        lost.join(","),
        counts.join(","),
        started.elapsed().as_secs_f64()
    );
    for send in senders.values_mut() {
        let _ = send.send(&ToWorker::Done).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), send.finish()).await;
    }
    Ok(0)
}

async fn worker(coordinator: SocketAddr, dir: &Path, name: &str) -> Result<i32, Error> {
    let job = JobCredentials::wait_and_load(dir, Duration::from_secs(30))?;
    let ep = Endpoint::bind(
        "0.0.0.0:0".parse()?,
        &job.issue_node(name, &[])?,
        JOB,
        TransportOptions::fast(),
    )?;
    let peer = ep.connect(coordinator, MEMBER_SERVER_NAME).await?;
    println!("JOINED {name}");
    let (mut send, mut recv) = peer.split();
    loop {
        match recv.recv::<ToWorker>().await {
            Ok(ToWorker::Work { id, item, work_ms }) => {
                tokio::time::sleep(Duration::from_millis(work_ms)).await;
                if let Err(e) = send.send(&Finished { id, hash: hash(item) }).await {
                    println!("LOST coordinator {} {e}", unix_ms());
                    return Ok(3);
                }
            }
            Ok(ToWorker::Done) => return Ok(0),
            Err(e) => {
                println!("LOST coordinator {} {e}", unix_ms());
                return Ok(3);
            }
        }
    }
}

async fn intruder(coordinator: SocketAddr, other_dir: &Path) -> Result<i32, Error> {
    let foreign = JobCredentials::create_or_load(other_dir)?;
    let ep = Endpoint::bind(
        "0.0.0.0:0".parse()?,
        &foreign.issue_node("intruder", &[])?,
        JOB,
        TransportOptions::fast(),
    )?;
    match ep.connect(coordinator, MEMBER_SERVER_NAME).await {
        Err(e) => {
            println!("REFUSED {e}");
            Ok(0)
        }
        Ok(_) => {
            println!("ACCEPTED");
            Ok(1)
        }
    }
}
