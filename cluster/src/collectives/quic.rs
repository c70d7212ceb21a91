//! The ring collectives over the QUIC transport: [`RingSend`]/[`RingRecv`] on dedicated
//! unidirectional streams, and the formation of a ring of processes.
//!
//! # Links
//!
//! Rank `r` connects to rank `r + 1 (mod n)` with [`Endpoint::connect`] (mutual TLS and the
//! Hello/Welcome handshake, see [`crate::transport`]), opens one unidirectional stream on that
//! connection and writes a [`RingHello`] (ring id, its rank, ring size) as the stream's first frame.
//! Rank `r + 1` accepts the connection, reads the hello, checks it against what it expects (same
//! ring id and size, rank `r`), and answers [`RingReply::Accepted`] (or `Refused` with a reason)
//! on the connection's control stream. After that, every ring message is one codec frame
//! (`u32` LE length, then the bytes; [`crate::codec::write_frame`]) on the unidirectional stream,
//! checked against [`RING_MAX_FRAME_LEN`] before it is read. A ring of `n` ranks uses `n`
//! connections (each rank takes part in two), independent of any control connection to a coordinator.
//!
//! # Failure and shutdown
//!
//! A lost neighbour (killed process, cut link) makes the blocked read or write fail once QUIC's
//! idle timeout fires (about 1.1 s with [`crate::transport::TransportOptions::fast`]). The failing
//! rank's [`Ring`] then drops its links, and dropping a [`QuicSend`] or [`QuicRecv`] closes its
//! connection at once with [`CLOSE_RING_ABORTED`], so the failure runs around the ring within a few
//! round trips instead of each rank waiting for its own timeout. The same holds while a ring
//! forms ([`form_ring`]): a rank whose formation fails drops the link it already has, and the
//! neighbour on that link gives up at once.
//!
//! Because a dropped link aborts its connection, data still in flight would be lost: end a healthy
//! ring with [`QuicRing::shutdown`], which closes the link from the previous rank (everything from
//! it has been received once the last collective returned) and waits until the next rank has done
//! the same, i.e. has received everything.

use std::{
    net::SocketAddr,
    ops::{Deref, DerefMut},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{ring::CollectiveError, LinkError, Ring, RingConfig, RingRecv, RingSend};
use crate::{
    codec::{self, CodecError},
    transport::{
        Endpoint, Peer, TransportError, CLOSE_BAD_FRAME, CLOSE_NORMAL, MEMBER_SERVER_NAME,
    },
};

/// Application close code of a ring link dropped before [`QuicRing::shutdown`] (a failed
/// collective, or a ring dropped without shutting down).
pub const CLOSE_RING_ABORTED: u32 = 16;

/// Application close code of a ring link whose hello did not match (another ring, size or rank).
pub const CLOSE_RING_REFUSED: u32 = 17;

/// Largest ring message accepted or sent, in bytes: the transport's default frame limit. Chunks
/// are capped to fit it (see [`QuicRing::from_links`]).
pub const RING_MAX_FRAME_LEN: usize = codec::DEFAULT_MAX_FRAME_LEN;

/// Header bytes of a ring message (see [`super::ring`]), subtracted from the frame limit when the
/// chunk size is capped.
const RING_HEADER_LEN: usize = 24;

/// Largest [`RingHello`] / [`RingReply`] frame, in bytes.
const MAX_RING_HANDSHAKE_LEN: usize = 4 << 10;

/// Where a rank sits in a ring; every member of one ring must agree on `ring_id` and `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingHello {
    /// Identifies this ring among others on the same endpoints (e.g. a generation number that
    /// grows each time the ring is rebuilt without a lost member).
    pub ring_id: u64,
    /// The sender's rank.
    pub rank: u32,
    /// Number of ranks in the ring.
    pub size: u32,
}

/// The accepting rank's answer to a [`RingHello`], on the connection's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingReply {
    /// The link is up.
    Accepted,
    /// The hello did not match; the connection is closed with [`CLOSE_RING_REFUSED`] next.
    Refused {
        /// Why, in words.
        reason: String,
    },
}

/// Errors while forming a ring over QUIC.
#[derive(Debug, thiserror::Error)]
pub enum QuicRingError {
    /// `rank` must be below the number of addresses, and there must be at least one.
    #[error("invalid ring position: rank {rank} of {size} addresses")]
    InvalidRank {
        /// The rank given.
        rank: usize,
        /// The number of addresses given.
        size: usize,
    },
    /// Connecting to the next rank, or its handshake, failed.
    #[error("ring link to the next rank ({addr}): {source}")]
    Transport {
        /// The next rank's address.
        addr: SocketAddr,
        /// The transport's reason.
        #[source]
        source: TransportError,
    },
    /// A ring stream could not be opened, written or read during formation.
    #[error("ring link with {addr}: {reason}")]
    Link {
        /// The remote address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The next rank refused our hello (another ring id or size, or we are not its previous rank).
    #[error("the next rank ({addr}) refused the ring link: {reason}")]
    Refused {
        /// The next rank's address.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The endpoint was closed while waiting for the previous rank.
    #[error("the endpoint closed while waiting for the previous rank to connect")]
    EndpointClosed,
    /// The ring did not form within the timeout (a rank did not start, or cannot be reached).
    #[error("the ring did not form within {0:?}; check that every rank started and is reachable")]
    Timeout(Duration),
    /// The ring could not be built from the links (see [`Ring::new`]).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// The sending half of a ring link: a unidirectional QUIC stream to the next rank.
///
/// Dropping it closes the connection to the next rank with [`CLOSE_RING_ABORTED`].
#[derive(Debug)]
pub struct QuicSend {
    link: Option<(Peer, quinn::SendStream)>,
}

/// The receiving half of a ring link: a unidirectional QUIC stream from the previous rank.
///
/// Dropping it closes the connection from the previous rank with [`CLOSE_RING_ABORTED`].
#[derive(Debug)]
pub struct QuicRecv {
    link: Option<(Peer, quinn::RecvStream)>,
}

impl QuicSend {
    fn connection(&self) -> Option<&quinn::Connection> {
        self.link.as_ref().map(|(peer, _)| peer.connection())
    }
}

impl QuicRecv {
    fn connection(&self) -> Option<&quinn::Connection> {
        self.link.as_ref().map(|(peer, _)| peer.connection())
    }
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        if let Some((peer, _)) = &self.link {
            abort(peer.connection());
        }
    }
}

impl Drop for QuicRecv {
    fn drop(&mut self) {
        if let Some((peer, _)) = &self.link {
            abort(peer.connection());
        }
    }
}

fn abort(conn: &quinn::Connection) {
    if conn.close_reason().is_none() {
        conn.close(CLOSE_RING_ABORTED.into(), b"ring link dropped");
    }
}

/// A link error from a stream failure: `Closed` when the connection is gone, else `Failed`.
fn link_error(conn: &quinn::Connection, what: &str, e: impl std::fmt::Display) -> LinkError {
    let addr = conn.remote_address();
    match conn.close_reason() {
        Some(reason) => LinkError::Closed(format!("{what} {addr}: connection lost: {reason}")),
        None => LinkError::Failed(format!("{what} {addr}: {e}")),
    }
}

impl RingSend for QuicSend {
    async fn send_next(&mut self, bytes: Vec<u8>) -> Result<(), LinkError> {
        let Some((peer, stream)) = self.link.as_mut() else {
            return Err(LinkError::Failed("a ring of one rank has no next rank".into()));
        };
        codec::write_frame(stream, &bytes, RING_MAX_FRAME_LEN).await.map_err(|e| match e {
            CodecError::Io(io) => link_error(peer.connection(), "sending to next rank", io),
            other => LinkError::Failed(format!("sending to next rank: {other}")),
        })
    }
}

impl RingRecv for QuicRecv {
    async fn recv_prev(&mut self) -> Result<Vec<u8>, LinkError> {
        let Some((peer, stream)) = self.link.as_mut() else {
            return Err(LinkError::Failed("a ring of one rank has no previous rank".into()));
        };
        let conn = peer.connection();
        match codec::read_frame(stream, RING_MAX_FRAME_LEN).await {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(match conn.close_reason() {
                Some(_) => link_error(conn, "receiving from previous rank", ""),
                None => LinkError::Closed(format!(
                    "previous rank {} finished its ring stream",
                    conn.remote_address()
                )),
            }),
            Err(CodecError::Io(io)) => Err(link_error(conn, "receiving from previous rank", io)),
            Err(other) => {
                warn!(peer = %conn.remote_address(), error = %other, "bad ring frame");
                conn.close(CLOSE_BAD_FRAME.into(), b"bad ring frame");
                Err(LinkError::Failed(format!("bad frame from previous rank: {other}")))
            }
        }
    }
}

/// Opens the ring link to the next rank over an established `peer`: a unidirectional stream
/// starting with `hello`, then waits for the next rank's [`RingReply`].
pub async fn link_to_next(mut peer: Peer, hello: RingHello) -> Result<QuicSend, QuicRingError> {
    let addr = peer.remote_address();
    let link_err = |reason: String| QuicRingError::Link { addr, reason };
    let conn = peer.connection().clone();
    let mut stream = conn.open_uni().await.map_err(|e| link_err(e.to_string()))?;
    codec::write_message(&mut stream, &hello, MAX_RING_HANDSHAKE_LEN)
        .await
        .map_err(|e| link_err(format!("sending the ring hello: {e}")))?;
    match peer.recv::<RingReply>().await {
        Ok(RingReply::Accepted) => {}
        Ok(RingReply::Refused { reason }) => return Err(QuicRingError::Refused { addr, reason }),
        Err(source) => return Err(QuicRingError::Transport { addr, source }),
    }
    debug!(next = %addr, rank = hello.rank, "ring link to the next rank is up");
    Ok(QuicSend { link: Some((peer, stream)) })
}

/// Accepts the ring link from the previous rank over an established `peer`: reads the hello on
/// the first unidirectional stream it opens (within `timeout`), checks it against `expected`
/// (ring id, size and rank), and answers. A mismatch refuses the peer, closes its connection with
/// [`CLOSE_RING_REFUSED`] and returns [`QuicRingError::Refused`].
pub async fn link_from_prev(
    mut peer: Peer,
    expected: RingHello,
    timeout: Duration,
) -> Result<QuicRecv, QuicRingError> {
    let addr = peer.remote_address();
    let link_err = |reason: String| QuicRingError::Link { addr, reason };
    let conn = peer.connection().clone();
    let first = async {
        let mut stream = conn.accept_uni().await.map_err(|e| link_err(e.to_string()))?;
        let hello = codec::read_message::<_, RingHello>(&mut stream, MAX_RING_HANDSHAKE_LEN)
            .await
            .map_err(|e| link_err(format!("reading the ring hello: {e}")))?
            .ok_or_else(|| link_err("the ring stream ended before its hello".into()))?;
        Ok::<_, QuicRingError>((stream, hello))
    };
    let (stream, hello) = tokio::time::timeout(timeout, first)
        .await
        .map_err(|_| QuicRingError::Timeout(timeout))??;
    if hello != expected {
        let reason = format!("expected ring hello {expected:?}, got {hello:?}");
        let _ = peer.send(&RingReply::Refused { reason: reason.clone() }).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), peer.finish()).await;
        conn.close(CLOSE_RING_REFUSED.into(), b"ring hello mismatch");
        return Err(QuicRingError::Refused { addr, reason });
    }
    peer.send(&RingReply::Accepted)
        .await
        .map_err(|source| QuicRingError::Transport { addr, source })?;
    debug!(prev = %addr, rank = hello.rank, "ring link from the previous rank is up");
    Ok(QuicRecv { link: Some((peer, stream)) })
}

/// A ring of processes over QUIC: derefs to the [`Ring`] (all-reduce, broadcast, barrier).
#[derive(Debug)]
pub struct QuicRing {
    ring: Ring<QuicSend, QuicRecv>,
    next: Option<quinn::Connection>,
    prev: Option<quinn::Connection>,
}

impl Deref for QuicRing {
    type Target = Ring<QuicSend, QuicRecv>;
    fn deref(&self) -> &Self::Target {
        &self.ring
    }
}

impl DerefMut for QuicRing {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ring
    }
}

impl QuicRing {
    /// A ring of one rank (no links; every collective returns at once).
    pub fn single(config: RingConfig) -> Result<Self, CollectiveError> {
        let (send, recv) = (QuicSend { link: None }, QuicRecv { link: None });
        Ok(Self { ring: Ring::new(0, 1, send, recv, config)?, next: None, prev: None })
    }

    /// A ring from the two links of this rank; the chunk size is capped so that one message fits
    /// [`RING_MAX_FRAME_LEN`].
    pub fn from_links(
        rank: usize,
        size: usize,
        send: QuicSend,
        recv: QuicRecv,
        config: RingConfig,
    ) -> Result<Self, CollectiveError> {
        let next = send.link.as_ref().map(|(p, _)| p.connection().clone());
        let prev = recv.link.as_ref().map(|(p, _)| p.connection().clone());
        Ok(Self { ring: Ring::new(rank, size, send, recv, capped(config))?, next, prev })
    }

    /// The underlying ring.
    pub fn ring(&mut self) -> &mut Ring<QuicSend, QuicRecv> {
        &mut self.ring
    }

    /// Resolves once either link's connection is closed (by a neighbour that gave up on the
    /// ring, by its idle timeout, or here), with the reason; never for a ring of one. A rank
    /// blocked receiving does not notice that its link to the next rank closed: race a
    /// collective against this to fail it then (and drop the ring, so the previous rank sees
    /// the failure too).
    pub fn closed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let wait = |conn: Option<quinn::Connection>, what: &'static str| async move {
            match conn {
                Some(c) => format!("{what} {} closed: {}", c.remote_address(), c.closed().await),
                None => std::future::pending().await,
            }
        };
        let (next, prev) = (self.next.clone(), self.prev.clone());
        async move {
            tokio::select! {
                reason = wait(next, "the link to the next rank") => reason,
                reason = wait(prev, "the link from the previous rank") => reason,
            }
        }
    }

    /// Ends a healthy ring without losing data in flight: closes the link from the previous rank
    /// (all its data was received when the last collective returned), then waits up to `timeout`
    /// for the next rank to close ours, i.e. to have received everything we sent. Every rank must
    /// call it after its last collective; a lost next rank shows as its idle timeout.
    pub async fn shutdown(self, timeout: Duration) {
        if let Some(prev) = &self.prev {
            prev.close(CLOSE_NORMAL.into(), b"ring shut down");
        }
        if let Some(next) = &self.next {
            if tokio::time::timeout(timeout, next.closed()).await.is_err() {
                warn!(next = %next.remote_address(), ?timeout, "the next rank did not close the ring");
            }
        }
    }
}

/// Caps the chunk size so one ring message fits the frame limit.
fn capped(config: RingConfig) -> RingConfig {
    let max_chunk = (RING_MAX_FRAME_LEN - RING_HEADER_LEN) / 4;
    RingConfig { chunk_floats: config.chunk_floats.min(max_chunk), ..config }
}

/// Forms rank `rank`'s place in the ring of `addrs.len()` processes whose endpoints listen on
/// `addrs` (indexed by rank): connects to rank `rank + 1` (server name
/// [`MEMBER_SERVER_NAME`]) while accepting rank `rank − 1` on `endpoint`, all within `timeout`.
///
/// If one of the two links is up and its neighbour closes it before the other link is (the
/// neighbour's own formation failed: say it cannot reach its next rank), this fails at once with
/// [`QuicRingError::Link`] instead of waiting out `timeout`, so one unreachable pair of ranks
/// fails every rank's formation within about the transport's handshake timeout.
///
/// Every rank calls it with the same `addrs` and `ring_id`. While it runs, it takes every peer that
/// connects to `endpoint`: a peer that does not open a ring stream with the expected hello is
/// refused and closed. Use [`link_to_next`] and [`link_from_prev`] to form a ring on an endpoint
/// that also accepts other connections.
pub async fn form_ring(
    endpoint: &Endpoint,
    rank: usize,
    addrs: &[SocketAddr],
    ring_id: u64,
    config: RingConfig,
    timeout: Duration,
) -> Result<QuicRing, QuicRingError> {
    let n = addrs.len();
    if rank >= n {
        return Err(QuicRingError::InvalidRank { rank, size: n });
    }
    if n == 1 {
        return Ok(QuicRing::single(config)?);
    }
    let (size, me) = (n as u32, rank as u32);
    let prev_rank = ((rank + n - 1) % n) as u32;
    let next_addr = addrs[(rank + 1) % n];
    let outgoing = async {
        match endpoint.connect(next_addr, MEMBER_SERVER_NAME).await {
            Ok(peer) => link_to_next(peer, RingHello { ring_id, rank: me, size }).await,
            Err(source) => Err(QuicRingError::Transport { addr: next_addr, source }),
        }
    };
    let incoming = async {
        let expected = RingHello { ring_id, rank: prev_rank, size };
        loop {
            let Some(peer) = endpoint.accept().await else {
                return Err(QuicRingError::EndpointClosed);
            };
            let addr = peer.remote_address();
            match link_from_prev(peer, expected, timeout).await {
                Ok(link) => return Ok(link),
                Err(e @ QuicRingError::Timeout(_)) => return Err(e),
                Err(e) => warn!(peer = %addr, error = %e, "not our previous ring rank; refused"),
            }
        }
    };
    // A link that is up while the other is still forming is watched: a neighbour that gave up
    // on this ring closes it, and then this ring cannot form either. Without the watch, a rank
    // whose previous rank cannot reach it (a firewall between two workers) would wait out the
    // whole timeout after its neighbours had failed.
    let both = async {
        tokio::pin!(outgoing, incoming);
        tokio::select! {
            send = &mut outgoing => {
                let send = send?;
                let recv = unless_closed(send.connection(), incoming).await?;
                Ok::<_, QuicRingError>((send, recv))
            }
            recv = &mut incoming => {
                let recv = recv?;
                let send = unless_closed(recv.connection(), outgoing).await?;
                Ok((send, recv))
            }
        }
    };
    let (send, recv) = tokio::time::timeout(timeout, both)
        .await
        .map_err(|_| QuicRingError::Timeout(timeout))??;
    info!(rank, size = n, ring_id, "ring formed");
    Ok(QuicRing::from_links(rank, n, send, recv, config)?)
}

/// `link` (the other half of a forming ring), unless `up` (the connection of the half already
/// formed) closes first: then [`QuicRingError::Link`] with the close reason.
async fn unless_closed<T>(
    up: Option<&quinn::Connection>,
    link: impl std::future::Future<Output = Result<T, QuicRingError>>,
) -> Result<T, QuicRingError> {
    let Some(conn) = up else { return link.await };
    tokio::select! {
        out = link => out,
        reason = conn.closed() => Err(QuicRingError::Link {
            addr: conn.remote_address(),
            reason: format!("closed while the ring was forming (the neighbour gave up): {reason}"),
        }),
    }
}
