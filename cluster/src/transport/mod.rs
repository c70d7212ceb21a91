//! QUIC transport with mutual TLS against a per-job CA.
//!
//! Every process of a job runs one [`Endpoint`], which is both a server and a client: quinn 0.11
//! over UDP (send/recv buffers raised to 4 MiB), TLS 1.3 only, ALPN [`ALPN`], and *mutual* TLS:
//! both sides present a certificate signed by the job's CA and verify the other's against it.
//! A process without the job's credentials is refused at the TLS handshake.
//!
//! # How a job's processes get their credentials
//!
//! The job's output folder is on a filesystem every process of the job can reach (the Slurm
//! job's working directory, a shared scratch folder, or a local folder for one-host runs). It must
//! be readable only by the job's user: whoever can read the CA key can join the job.
//!
//! 1. Every process calls [`JobCredentials::create_or_load`] on that folder at start-up. The
//!    first one to get there generates the job CA (an ECDSA P-256 key and a self-signed CA
//!    certificate, made with rcgen) into a private temporary folder, then renames that folder to
//!    `<job dir>/ca/` (`cert.pem` mode 0644, `key.pem` mode 0600, folder 0700). A rename onto an
//!    existing, non-empty folder fails, so exactly one CA wins even when all processes start at
//!    once; the others discard theirs and load the winner's. Nothing ever sees a half-written CA.
//!    Processes that must not create the CA (e.g. all but rank 0) call
//!    [`JobCredentials::wait_and_load`] instead, which waits for `ca/cert.pem` with a timeout.
//!    The CA can also be made in advance, e.g. in an sbatch prologue, by the same call.
//! 2. Each process then calls [`JobCredentials::issue_node`] with its node name (e.g. `rank-3`).
//!    This signs a fresh key pair for that process only (SANs: the node name, the host name,
//!    `localhost`, [`MEMBER_SERVER_NAME`], 127.0.0.1 and ::1, plus any extra names or IPs given;
//!    extended key usage server + client, so one certificate serves both directions). The node
//!    key stays in memory and is never written anywhere.
//! 3. [`Endpoint::bind`] takes those [`NodeCredentials`], the job id and [`TransportOptions`].
//!    A requeued job that reuses its output folder reuses its CA.
//!
//! ```no_run
//! use fusion_cluster::transport::{Endpoint, JobCredentials, TransportOptions};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let job_dir = std::path::Path::new("/shared/outputs/job-1234");
//! let ca = JobCredentials::create_or_load(job_dir)?; // every process; one CA wins
//! let node = ca.issue_node("rank-3", &[])?; // this process's own certificate
//! let endpoint = Endpoint::bind("0.0.0.0:0".parse()?, &node, "job-1234", TransportOptions::default())?;
//! let mut coordinator = endpoint.connect("10.0.0.1:4433".parse()?, "node001").await?;
//! coordinator.send(&("ready", 3u32)).await?;
//! let reply: String = coordinator.recv().await?;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! # Trust
//!
//! Under TLS 1.3 a client whose certificate the server refuses still sees `connect()` succeed;
//! the refusal arrives with the first round trip. So a connection is returned as a [`Peer`] only
//! after an application handshake on its control stream (one long-lived bidirectional stream):
//! the client sends [`Hello`] (protocol version, job id, node name), the server checks both and
//! answers [`HelloReply::Welcome`] (checked the same way by the client) or
//! [`HelloReply::Refused`] with a reason, then closes the connection with [`CLOSE_REFUSED`].
//!
//! After that, typed control messages travel as codec frames ([`crate::codec`]) on that stream.
//! Every frame's length is checked against [`TransportOptions::max_frame_len`] before it is read;
//! a frame that is oversized, truncated or undecodable closes *that* connection with
//! [`CLOSE_BAD_FRAME`] and a reason, and the endpoint goes on accepting others.
//!
//! Loss of a peer (killed process, cut network) shows as an error from [`Peer::recv`] and as the
//! end of [`Peer::closed`]: keep-alives are on, so a silent peer is detected after the idle
//! timeout (about 1.1 s with idle 1 s / keep-alive 0.3 s).

mod credentials;
mod endpoint;
mod peer;

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

pub use credentials::{CredentialsError, JobCredentials, NodeCredentials};
pub use endpoint::{client_config, server_config, Endpoint};
pub use peer::{Peer, PeerReceiver, PeerSender};

use crate::codec::CodecError;

/// ALPN protocol identifier of fusion_bench's transport; a peer speaking anything else is refused
/// by the TLS handshake.
pub const ALPN: &[u8] = b"fusion-bench/1";

/// Version of the handshake and control protocol. Peers with a different version are refused.
/// Version 2: the runtime's assignments and results carry a round number
/// ([`crate::runtime::wire::Wire`]); version 3: an assignment is a list of items.
pub const PROTOCOL_VERSION: u32 = 3;

/// A DNS name every node certificate carries, so a process can connect to any member by address
/// with this server name when it does not know (or trust DNS for) the member's host name.
pub const MEMBER_SERVER_NAME: &str = "member.fusion-bench";

/// Application close code: normal shutdown.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the handshake refused the peer (job id or protocol version mismatch).
pub const CLOSE_REFUSED: u32 = 1;
/// Application close code: a frame was oversized, truncated or undecodable.
pub const CLOSE_BAD_FRAME: u32 = 2;
/// Application close code: the peer did not complete the handshake in time.
pub const CLOSE_HANDSHAKE_TIMEOUT: u32 = 3;

/// Largest handshake frame accepted ([`Hello`] / [`HelloReply`]), in bytes.
pub const MAX_HANDSHAKE_FRAME_LEN: usize = 64 << 10;

/// Settings of an [`Endpoint`] and its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// A connection with no traffic for this long is closed as lost. The effective value is the
    /// minimum of both peers' settings. Default 10 s.
    pub idle_timeout: Duration,
    /// Interval of QUIC keep-alive pings; must be below `idle_timeout`. `None` turns keep-alives
    /// off (then an idle but healthy connection times out). Default 2 s.
    pub keep_alive: Option<Duration>,
    /// Largest control frame payload accepted or sent, in bytes (capped at
    /// [`crate::codec::MAX_FRAME_LEN_CEILING`]). Default 16 MiB.
    pub max_frame_len: usize,
    /// Requested UDP send and receive buffer size, in bytes. Default 4 MiB; the kernel caps it at
    /// `net.core.rmem_max` / `wmem_max` (a warning is logged when it does).
    pub socket_buffer_bytes: usize,
    /// Time allowed for connecting plus the Hello/Welcome exchange. Default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Some(Duration::from_secs(2)),
            max_frame_len: crate::codec::DEFAULT_MAX_FRAME_LEN,
            socket_buffer_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TransportOptions {
    /// Short timeouts for tests: idle 1 s, keep-alive 0.3 s, handshake 2 s.
    pub fn fast() -> Self {
        Self {
            idle_timeout: Duration::from_secs(1),
            keep_alive: Some(Duration::from_millis(300)),
            handshake_timeout: Duration::from_secs(2),
            ..Self::default()
        }
    }
}

/// First message on a new connection's control stream, from the connecting side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The job the sender belongs to.
    pub job_id: String,
    /// The sender's node name (e.g. `rank-3`).
    pub node_name: String,
}

/// The accepting side's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The peer is accepted; the accepting side introduces itself the same way.
    Welcome(Hello),
    /// The peer is refused; the connection is closed with [`CLOSE_REFUSED`] next.
    Refused {
        /// Why, in words.
        reason: String,
    },
}

/// Checks a peer's introduction against our job id; returns the refusal reason if it does not fit.
pub(crate) fn check_hello(hello: &Hello, job_id: &str) -> Result<(), String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: peer {:?} speaks {}, we speak {}",
            hello.node_name, hello.protocol_version, PROTOCOL_VERSION
        ));
    }
    if hello.job_id != job_id {
        return Err(format!(
            "job id mismatch: peer {:?} belongs to job {:?}, we are job {:?}",
            hello.node_name, hello.job_id, job_id
        ));
    }
    Ok(())
}

/// What went wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Credentials could not be created or loaded.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The TLS or QUIC configuration could not be built from the credentials and options.
    #[error("invalid transport configuration ({what}): {reason}")]
    Config {
        /// Which part of the configuration.
        what: &'static str,
        /// The underlying error, in words.
        reason: String,
    },
    /// The UDP socket could not be created, configured or bound.
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The address being bound.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A connection could not even be started (bad server name, endpoint closed, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection failed or was lost: refused by TLS (no or foreign certificate), timed out,
    /// or closed by the peer or by us.
    #[error("connection with {addr} lost: {source}")]
    ConnectionLost {
        /// The remote address.
        addr: SocketAddr,
        /// quinn's reason (for a TLS refusal: a crypto error with the TLS alert).
        #[source]
        source: quinn::ConnectionError,
    },
    /// The remote side refused our [`Hello`] or [`HelloReply`] (job id or version mismatch).
    #[error("refused by {addr}: {reason}")]
    RefusedByPeer {
        /// The remote address.
        addr: SocketAddr,
        /// The reason the peer gave.
        reason: String,
    },
    /// We refused the remote side's introduction (job id or version mismatch).
    #[error("refused peer {addr}: {reason}")]
    RefusedPeer {
        /// The remote address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The handshake did not complete within [`TransportOptions::handshake_timeout`].
    #[error("handshake with {addr} did not complete within {after:?}")]
    HandshakeTimeout {
        /// The remote address.
        addr: SocketAddr,
        /// The timeout in force.
        after: Duration,
    },
    /// The peer sent a frame that is oversized, truncated or undecodable; we closed the
    /// connection with [`CLOSE_BAD_FRAME`].
    #[error("bad frame from {addr}, connection closed: {source}")]
    BadFrame {
        /// The remote address.
        addr: SocketAddr,
        /// What was wrong with the frame.
        #[source]
        source: CodecError,
    },
    /// A message of ours could not be sent (too large for `max_frame_len`, or not encodable).
    /// The connection stays open.
    #[error("cannot send to {addr}: {source}")]
    Send {
        /// The remote address.
        addr: SocketAddr,
        /// What was wrong.
        #[source]
        source: CodecError,
    },
    /// The peer finished its side of the control stream: it will send nothing more.
    #[error("peer {addr} finished its control stream")]
    StreamFinished {
        /// The remote address.
        addr: SocketAddr,
    },
    /// The control stream failed without the connection being closed (e.g. the peer reset it).
    #[error("control stream with {addr}: {source}")]
    Stream {
        /// The remote address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Installs rustls' ring crypto provider as the process default, if none is installed yet.
/// Idempotent. (The transport passes ring explicitly to every configuration it builds; this only
/// protects other rustls users in the same process from the "could not determine the
/// process-level CryptoProvider" panic when another crate enables aws-lc-rs.)
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Truncates a close reason so it fits a CONNECTION_CLOSE frame comfortably.
pub(crate) fn close_reason_bytes(reason: &str) -> &[u8] {
    const MAX: usize = 200;
    if reason.len() <= MAX {
        return reason.as_bytes();
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}
