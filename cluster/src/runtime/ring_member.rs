//! A process's place in a ring of the job's workers, for executors whose items end in a
//! collective among the workers (data-parallel training: each process computes its block of a
//! step's items, then the ring reduces the blocks, [`crate::collectives::Ring::reduce_parts`]).
//!
//! Each process binds one more endpoint for the ring ([`RingMember::bind`], with the job's
//! credentials) and tells the driver its address (an item's result). The driver numbers the
//! processes and hands every one the same [`RingLayout`] in its items; a member forms the ring
//! when a layout's generation is new to it, and keeps it for the later items of that generation.
//! After a loss the driver hands out a layout of a new generation, and the survivors form a new
//! ring (the old one, broken, is dropped).
//!
//! Blocking: a member owns a small tokio runtime, so executors call it from their blocking
//! thread. The ring's links are the QUIC transport's: a killed or frozen neighbour is noticed by
//! the transport's idle timeout ([`crate::transport::TransportOptions::idle_timeout`]), so a
//! collective has no time limit of its own (a rank may wait long for a slower rank's compute).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{ClusterOptions, CA_WAIT_MIN};
use crate::{
    collectives::{
        quic::{form_ring, QuicRing},
        RingConfig,
    },
    transport::{Endpoint, JobCredentials},
};

/// Who is where in one generation of the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingLayout {
    /// Grows each time the driver re-forms the ring.
    pub generation: u64,
    /// Every rank's ring address ([`RingMember::addr`]), by rank.
    pub addrs: Vec<SocketAddr>,
}

/// Errors of a ring member.
#[derive(Debug, thiserror::Error)]
pub enum RingMemberError {
    /// Binding the ring endpoint, loading the credentials or starting the runtime failed.
    #[error("ring endpoint: {0}")]
    Setup(String),
    /// The rank given is not one of the layout's.
    #[error("rank {rank} is not in ring generation {generation}")]
    NotInLayout {
        /// The rank given.
        rank: usize,
        /// The layout's generation.
        generation: u64,
    },
    /// The ring could not form, or a collective on it failed (a rank was lost): re-form.
    #[error("ring generation {generation}: {reason}")]
    Ring {
        /// The generation.
        generation: u64,
        /// What failed.
        reason: String,
    },
}

/// One process's ring endpoint and, once formed, its ring.
pub struct RingMember {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    /// `None` only while dropping.
    endpoint: Option<Endpoint>,
    addr: SocketAddr,
    ring: Option<(u64, QuicRing)>,
    config: RingConfig,
    form_timeout: Duration,
}

impl Drop for RingMember {
    /// Drops the ring and the endpoint inside the member's runtime, then lets the runtime go
    /// without waiting (a member may be dropped from an async context, where blocking is not
    /// allowed).
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            {
                let _inside = rt.enter();
                self.ring = None;
                self.endpoint = None;
            }
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for RingMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingMember")
            .field("addr", &self.addr)
            .field("generation", &self.ring.as_ref().map(|(g, _)| *g))
            .finish()
    }
}

/// The local address this host uses to reach `toward` (no packet is sent): where the other
/// processes of a job can reach this one.
pub fn outbound_ip(toward: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr =
        if toward.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(toward)?;
    Ok(socket.local_addr()?.ip())
}

impl RingMember {
    /// Binds this process's ring endpoint on `ip` (a free port) as node `name` of the job of
    /// `opts` (its CA from [`ClusterOptions::job_dir`]).
    pub fn bind(ip: IpAddr, name: &str, opts: &ClusterOptions) -> Result<Self, RingMemberError> {
        let setup = |e: &dyn std::fmt::Display| RingMemberError::Setup(e.to_string());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fusion-ring")
            .build()
            .map_err(|e| setup(&e))?;
        let wait = opts.wait_for_workers.max(CA_WAIT_MIN);
        let ca = JobCredentials::wait_and_load(&opts.job_dir, wait).map_err(|e| setup(&e))?;
        let node = ca.issue_node(&format!("{name}-ring"), &[]).map_err(|e| setup(&e))?;
        let endpoint = rt
            .block_on(async {
                Endpoint::bind(SocketAddr::new(ip, 0), &node, &opts.job_id, opts.transport.clone())
            })
            .map_err(|e| setup(&e))?;
        let addr = endpoint.local_addr().map_err(|e| setup(&e))?;
        let config = RingConfig { timeout: None, ..RingConfig::default() };
        let form_timeout = opts.wait_for_workers.max(Duration::from_secs(30));
        Ok(Self { rt: Some(rt), endpoint: Some(endpoint), addr, ring: None, config, form_timeout })
    }

    fn parts(&self) -> (&tokio::runtime::Runtime, &Endpoint) {
        match (&self.rt, &self.endpoint) {
            (Some(rt), Some(endpoint)) => (rt, endpoint),
            _ => unreachable!("only a dropped member lacks its runtime"),
        }
    }

    /// The bound address. Bound on an unspecified IP (`0.0.0.0`), the others reach this member
    /// at this host's address ([`outbound_ip`]) and this port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ring of `layout`, where this member is rank `rank`, formed first if its generation is
    /// new to this member (every rank of the layout must call this for the ring to form).
    fn ring_for(
        &mut self,
        layout: &RingLayout,
        rank: usize,
    ) -> Result<&mut QuicRing, RingMemberError> {
        if rank >= layout.addrs.len() {
            return Err(RingMemberError::NotInLayout { rank, generation: layout.generation });
        }
        let current =
            self.ring.as_ref().is_some_and(|(g, r)| *g == layout.generation && !r.is_broken());
        if !current {
            // The old ring goes first: its links close, and its neighbours fail over.
            self.ring = None;
            let started = std::time::Instant::now();
            let (rt, endpoint) = self.parts();
            let ring = rt
                .block_on(form_ring(
                    endpoint,
                    rank,
                    &layout.addrs,
                    layout.generation,
                    self.config,
                    self.form_timeout,
                ))
                .map_err(|e| RingMemberError::Ring {
                    generation: layout.generation,
                    reason: e.to_string(),
                })?;
            info!(
                rank,
                size = layout.addrs.len(),
                generation = layout.generation,
                seconds = started.elapsed().as_secs_f64(),
                "worker ring formed"
            );
            self.ring = Some((layout.generation, ring));
        }
        Ok(&mut self.ring.as_mut().expect("formed above").1)
    }

    /// [`crate::collectives::Ring::reduce_parts`] over the ring of `layout`, this member being
    /// rank `rank`: the sum of every member's `parts`, in rank-then-part order, into `out` on
    /// every member.
    ///
    /// Fails as soon as either of this member's links closes (a neighbour gave up on the ring,
    /// say because it cannot reach its own next rank), and then drops the ring at once, so the
    /// other neighbour fails too instead of waiting for data that will not come.
    pub fn reduce_parts(
        &mut self,
        layout: &RingLayout,
        rank: usize,
        parts: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), RingMemberError> {
        let generation = layout.generation;
        let rt = self.parts().0.handle().clone();
        let ring = self.ring_for(layout, rank)?;
        let closed = ring.closed();
        let res = rt.block_on(async {
            tokio::select! {
                biased;
                res = ring.reduce_parts(parts, out) => res.map_err(|e| e.to_string()),
                reason = closed => Err(reason),
            }
        });
        res.map_err(|reason| {
            self.ring = None;
            RingMemberError::Ring { generation, reason }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbound_address_of_loopback_is_loopback() {
        let ip = outbound_ip("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(ip.is_loopback(), "{ip}");
    }

    fn opts(dir: &std::path::Path) -> ClusterOptions {
        JobCredentials::create_or_load(dir).unwrap();
        ClusterOptions::new("ring-test", dir).fast()
    }

    /// Runs `f(rank, member)` on a thread per member; returns their results by rank.
    fn on_each<T: Send + 'static>(
        members: Vec<RingMember>,
        f: impl Fn(usize, &mut RingMember) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<(RingMember, T)> {
        let threads: Vec<_> = members
            .into_iter()
            .enumerate()
            .map(|(r, mut m)| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let out = f(r, &mut m);
                    (m, out)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// Ranks 1 and 2 cannot reach each other (rank 1's layout sends it to a socket that never
    /// answers, as through a firewall that drops the packets) while both reach rank 0: every
    /// rank fails within a few seconds (rank 0, whose own links form, in the reduction), none
    /// waits out the formation timeout (60 s here) or forever.
    #[test]
    fn members_that_cannot_reach_each_other_all_fail_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let members: Vec<RingMember> =
            (0..3).map(|i| RingMember::bind(ip, &format!("m{i}"), &o).unwrap()).collect();
        assert!(members[0].form_timeout >= Duration::from_secs(30));
        let layout =
            RingLayout { generation: 1, addrs: members.iter().map(|m| m.addr()).collect() };
        let black_hole = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cut = layout.clone();
        cut.addrs[2] = black_hole.local_addr().unwrap();
        let started = std::time::Instant::now();
        let done = on_each(members, move |r, m| {
            let l = if r == 1 { &cut } else { &layout };
            let mut out = vec![0.0; 2];
            let res = m.reduce_parts(l, r, &[&[1.0, 2.0]], &mut out);
            (res, started.elapsed())
        });
        for (r, (_, (res, took))) in done.into_iter().enumerate() {
            let e = res.expect_err("a ring without the link 1 → 2 cannot sum");
            assert!(matches!(e, RingMemberError::Ring { generation: 1, .. }), "rank {r}: {e}");
            assert!(took < Duration::from_secs(15), "rank {r} took {took:?}: {e}");
        }
        drop(black_hole);
    }

    /// Three members reduce their blocks in rank order over QUIC; after one is dropped (a lost
    /// process), the survivors fail, then form generation 2 and reduce again.
    #[test]
    fn members_reduce_and_re_form_after_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let members: Vec<RingMember> =
            (0..3).map(|i| RingMember::bind(ip, &format!("m{i}"), &o).unwrap()).collect();
        let layout =
            RingLayout { generation: 1, addrs: members.iter().map(|m| m.addr()).collect() };
        let items: Vec<Vec<f32>> =
            (0..5).map(|i| vec![0.1 * i as f32 + 1e7, -1e7, i as f32]).collect();
        let mut want = items[0].clone();
        for x in &items[1..] {
            want.iter_mut().zip(x).for_each(|(a, v)| *a += v);
        }
        let blocks = [0..2, 2..2, 2..5];
        let (l, it, bl) = (layout.clone(), items.clone(), blocks.clone());
        let done = on_each(members, move |r, m| {
            let parts: Vec<&[f32]> = it[bl[r].clone()].iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; 3];
            m.reduce_parts(&l, r, &parts, &mut out).map(|_| out)
        });
        let mut members = Vec::new();
        for (m, out) in done {
            assert_eq!(out.unwrap(), want);
            members.push(m);
        }
        // Rank 1 goes away; the others' next call on generation 1 fails.
        drop(members.remove(1));
        let (l, it) = (layout.clone(), items.clone());
        let failed = on_each(members, move |r, m| {
            let mut out = vec![0.0; 3];
            m.reduce_parts(&l, r, &[&it[0]], &mut out)
        });
        let mut members = Vec::new();
        for (m, res) in failed {
            let e = res.unwrap_err();
            assert!(matches!(e, RingMemberError::Ring { generation: 1, .. }), "{e}");
            members.push(m);
        }
        let layout2 =
            RingLayout { generation: 2, addrs: members.iter().map(|m| m.addr()).collect() };
        let blocks = [0..4, 4..5];
        let done = on_each(members, move |r, m| {
            let parts: Vec<&[f32]> = items[blocks[r].clone()].iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; 3];
            m.reduce_parts(&layout2, r, &parts, &mut out).map(|_| out)
        });
        for (_, out) in done {
            assert_eq!(out.unwrap(), want, "the same bits after re-forming with two ranks");
        }
    }
}
