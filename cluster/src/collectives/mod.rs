//! Collectives: all-reduce (sum), broadcast and barrier.
//!
//! The algorithms live in [`ring`] and run over two abstract halves of a ring link: [`RingSend`]
//! (a byte stream to the next rank) and [`RingRecv`] (a byte stream from the previous rank). The
//! QUIC transport implements them with one unidirectional stream per direction; [`memory_ring`]
//! implements them with tokio channels, for tests and for ranks in one process.
//!
//! Determinism: every element of an all-reduce is summed in rank order,
//! `(((x₀ + x₁) + x₂) + …) + x_{n−1}` in `f32`, by rank n−1, which then distributes the finished
//! bits to every rank (see [`ring`] for the message schedule). The result therefore never depends
//! on message timing, and all ranks hold bit-identical buffers.

use std::future::Future;

use tokio::sync::mpsc;

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod quic;
pub mod ring;

pub use ring::{Ring, RingConfig};

/// Failure of one half of a ring link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the link or went away; the collective cannot finish. Rebuild the ring
    /// without it (membership declares it lost).
    #[error("ring link closed: {0}")]
    Closed(String),
    /// The transport failed (I/O, a reset stream, a message over the size limit).
    #[error("ring link failed: {0}")]
    Failed(String),
}

/// The sending half of a ring link: bytes to the next rank, delivered in order.
pub trait RingSend: Send {
    /// Sends one message to the next rank. Completes when the transport accepted it (it may
    /// wait for flow control, never for the peer's application to read it in full).
    fn send_next(&mut self, bytes: Vec<u8>) -> impl Future<Output = Result<(), LinkError>> + Send;
}

/// The receiving half of a ring link: messages from the previous rank, in the order sent.
pub trait RingRecv: Send {
    /// Receives the next message from the previous rank.
    fn recv_prev(&mut self) -> impl Future<Output = Result<Vec<u8>, LinkError>> + Send;
}

/// Sending half of an in-memory ring link (a bounded tokio channel).
#[derive(Debug)]
pub struct MemorySend(mpsc::Sender<Vec<u8>>);

/// Receiving half of an in-memory ring link (a bounded tokio channel).
#[derive(Debug)]
pub struct MemoryRecv(mpsc::Receiver<Vec<u8>>);

impl RingSend for MemorySend {
    async fn send_next(&mut self, bytes: Vec<u8>) -> Result<(), LinkError> {
        self.0
            .send(bytes)
            .await
            .map_err(|_| LinkError::Closed("next rank dropped its receiver".into()))
    }
}

impl RingRecv for MemoryRecv {
    async fn recv_prev(&mut self) -> Result<Vec<u8>, LinkError> {
        self.0
            .recv()
            .await
            .ok_or_else(|| LinkError::Closed("previous rank dropped its sender".into()))
    }
}

/// The links of an `n`-rank ring in one process: element `r` is rank `r`'s (send to `r+1`,
/// receive from `r−1`) pair. Each channel holds at most `capacity` messages (at least 1), so
/// back-pressure is exercised as over a real transport.
pub fn memory_ring(n: usize, capacity: usize) -> Vec<(MemorySend, MemoryRecv)> {
    let (mut sends, mut recvs): (Vec<_>, Vec<_>) =
        (0..n).map(|_| mpsc::channel::<Vec<u8>>(capacity.max(1))).unzip();
    // Channel r carries rank r → rank r+1, so rank r+1 receives on channel r.
    recvs.rotate_right(1);
    sends.drain(..).zip(recvs).map(|(s, r)| (MemorySend(s), MemoryRecv(r))).collect()
}
