//! A trusted peer: a QUIC connection whose control-stream handshake succeeded.

use std::{future::Future, net::SocketAddr};

use serde::{de::DeserializeOwned, Serialize};
use tracing::warn;

use super::{close_reason_bytes, TransportError, CLOSE_BAD_FRAME, CLOSE_NORMAL};
use crate::codec::{self, CodecError};

/// A peer that passed mutual TLS and the Hello/Welcome handshake, with its control stream.
///
/// Send and receive typed messages with [`Peer::send`] / [`Peer::recv`], or [`Peer::split`] the
/// control stream to send and receive from different tasks. Extra streams (e.g. one
/// unidirectional stream per bulk payload) can be opened on [`Peer::connection`].
#[derive(Debug)]
pub struct Peer {
    sender: PeerSender,
    receiver: PeerReceiver,
    node_name: String,
}

/// The sending half of a peer's control stream.
#[derive(Debug)]
pub struct PeerSender {
    conn: quinn::Connection,
    send: quinn::SendStream,
    max_frame_len: usize,
}

/// The receiving half of a peer's control stream.
#[derive(Debug)]
pub struct PeerReceiver {
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    max_frame_len: usize,
}

/// Maps a stream-level I/O failure to the connection's fate, when the connection is gone.
pub(super) fn lost_or(
    conn: &quinn::Connection,
    other: impl FnOnce() -> TransportError,
) -> TransportError {
    match conn.close_reason() {
        Some(source) => TransportError::ConnectionLost { addr: conn.remote_address(), source },
        None => other(),
    }
}

/// Closes `conn` because of a bad frame and returns the matching error.
pub(super) fn close_bad_frame(conn: &quinn::Connection, source: CodecError) -> TransportError {
    let addr = conn.remote_address();
    warn!(peer = %addr, error = %source, "bad frame; closing the connection");
    conn.close(CLOSE_BAD_FRAME.into(), close_reason_bytes(&source.to_string()));
    TransportError::BadFrame { addr, source }
}

impl Peer {
    pub(super) fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        node_name: String,
        max_frame_len: usize,
    ) -> Self {
        Self {
            sender: PeerSender { conn: conn.clone(), send, max_frame_len },
            receiver: PeerReceiver { conn, recv, max_frame_len },
            node_name,
        }
    }

    /// The node name the peer introduced itself with (checked against nothing but its
    /// certificate's CA: every holder of the job's credentials is equally trusted).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.receiver.conn.remote_address()
    }

    /// The underlying QUIC connection, e.g. to open bulk streams.
    pub fn connection(&self) -> &quinn::Connection {
        &self.receiver.conn
    }

    /// Sends one control message (see [`PeerSender::send`]).
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), TransportError> {
        self.sender.send(msg).await
    }

    /// Receives one control message (see [`PeerReceiver::recv`]).
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, TransportError> {
        self.receiver.recv().await
    }

    /// Resolves when the connection is closed or lost, with the reason (see
    /// [`PeerReceiver::closed`]).
    pub fn closed(&self) -> impl Future<Output = quinn::ConnectionError> + Send + 'static {
        self.receiver.closed()
    }

    /// Finishes our side of the control stream and waits until the peer has acknowledged every
    /// byte sent on it (see [`PeerSender::finish`]).
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.sender.finish().await
    }

    /// Closes the connection at once, normally ([`super::CLOSE_NORMAL`]) with `reason`. Data not
    /// yet delivered is lost; call [`Peer::finish`] first to make sure it arrived. Dropping the
    /// last handle of a connection (a `Peer`, or both halves of a split one) closes it the same
    /// way.
    pub fn close(&self, reason: &str) {
        self.receiver.conn.close(CLOSE_NORMAL.into(), close_reason_bytes(reason));
    }

    /// Splits the control stream into a sender and a receiver, which can live in different
    /// tasks. Both keep the connection alive.
    pub fn split(self) -> (PeerSender, PeerReceiver) {
        (self.sender, self.receiver)
    }
}

impl PeerSender {
    /// Closes the connection at once, normally ([`super::CLOSE_NORMAL`]), with `reason` (the
    /// peer sees it in its [`TransportError::ConnectionLost`]).
    pub fn close(&self, reason: &str) {
        self.conn.close(CLOSE_NORMAL.into(), close_reason_bytes(reason));
    }

    /// Encodes `msg` and writes it as one frame on the control stream.
    ///
    /// A message larger than `max_frame_len` is refused ([`TransportError::Send`]) before
    /// anything is written, and the connection stays usable. A lost connection yields
    /// [`TransportError::ConnectionLost`].
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), TransportError> {
        let addr = self.conn.remote_address();
        let payload = codec::encode(msg).map_err(|source| TransportError::Send { addr, source })?;
        if payload.len() > self.max_frame_len {
            return Err(TransportError::Send {
                addr,
                source: CodecError::Oversized {
                    len: payload.len() as u64,
                    limit: self.max_frame_len,
                },
            });
        }
        codec::write_frame(&mut self.send, &payload, self.max_frame_len).await.map_err(
            |e| match e {
                CodecError::Io(source) => {
                    lost_or(&self.conn, || TransportError::Stream { addr, source })
                }
                source => TransportError::Send { addr, source },
            },
        )
    }

    /// Finishes the control stream (the peer's next [`PeerReceiver::recv`] after our last
    /// message yields [`TransportError::StreamFinished`]) and waits until the peer has
    /// acknowledged every byte of it, so that closing or dropping the connection afterwards
    /// loses nothing. Nothing can be sent on the control stream afterwards.
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        let addr = self.conn.remote_address();
        // Err only if already finished: then waiting below is still right.
        let _ = self.send.finish();
        match self.send.stopped().await {
            Ok(_) => Ok(()),
            Err(e) => {
                Err(lost_or(&self.conn, || TransportError::Stream { addr, source: e.into() }))
            }
        }
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

impl PeerReceiver {
    /// Receives one control message of type `T`.
    ///
    /// The frame's length is checked against `max_frame_len` before its payload is read. A frame
    /// that is oversized, truncated or does not decode as a `T` closes the connection with
    /// [`CLOSE_BAD_FRAME`] and yields [`TransportError::BadFrame`]. A lost or closed connection
    /// yields [`TransportError::ConnectionLost`]; a peer that finished its control stream yields
    /// [`TransportError::StreamFinished`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, TransportError> {
        let addr = self.conn.remote_address();
        match codec::read_message::<_, T>(&mut self.recv, self.max_frame_len).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(lost_or(&self.conn, || TransportError::StreamFinished { addr })),
            Err(CodecError::Io(source)) => {
                Err(lost_or(&self.conn, || TransportError::Stream { addr, source }))
            }
            Err(e) => Err(close_bad_frame(&self.conn, e)),
        }
    }

    /// Resolves when the connection is closed or lost, with the reason: an application close
    /// from either side, a TLS or protocol error, or `TimedOut` when the peer went silent for the
    /// idle timeout (keep-alives make that mean "lost").
    pub fn closed(&self) -> impl Future<Output = quinn::ConnectionError> + Send + 'static {
        let conn = self.conn.clone();
        async move { conn.closed().await }
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}
