//! The QUIC endpoint: TLS configuration, the UDP socket, connecting and accepting.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{crypto::CryptoProvider, RootCertStore};
use tokio::{
    sync::{mpsc, Mutex},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    check_hello, close_reason_bytes,
    peer::{close_bad_frame, lost_or},
    Hello, HelloReply, NodeCredentials, Peer, TransportError, TransportOptions, ALPN,
    CLOSE_HANDSHAKE_TIMEOUT, CLOSE_REFUSED, MAX_HANDSHAKE_FRAME_LEN, PROTOCOL_VERSION,
};
use crate::codec::{self, CodecError};

/// How many handshaken peers may wait for [`Endpoint::accept`] before handshakes pause.
const ACCEPT_QUEUE: usize = 64;

/// How long a refusing side waits for the refused peer to read the reason and close.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

fn config_err(what: &'static str) -> impl FnOnce(String) -> TransportError {
    move |reason| TransportError::Config { what, reason }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(node: &NodeCredentials) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(node.ca_cert().clone())
        .map_err(|e| config_err("job CA certificate")(e.to_string()))?;
    Ok(Arc::new(roots))
}

fn transport_config(
    options: &TransportOptions,
) -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let idle = quinn::IdleTimeout::try_from(options.idle_timeout)
        .map_err(|e| config_err("idle timeout")(e.to_string()))?;
    if let Some(keep_alive) = options.keep_alive {
        if keep_alive >= options.idle_timeout {
            return Err(config_err("keep-alive")(format!(
                "keep-alive interval {keep_alive:?} must be below the idle timeout {:?}, or \
                 healthy idle connections time out",
                options.idle_timeout
            )));
        }
    }
    let mut config = quinn::TransportConfig::default();
    config.max_idle_timeout(Some(idle)).keep_alive_interval(options.keep_alive);
    Ok(Arc::new(config))
}

/// The quinn server configuration: TLS 1.3, ALPN [`ALPN`], a client certificate signed by the
/// job CA required, and `options`' timeouts.
pub fn server_config(
    node: &NodeCredentials,
    options: &TransportOptions,
) -> Result<quinn::ServerConfig, TransportError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(node)?, provider())
            .build()
            .map_err(|e| config_err("client certificate verifier")(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("TLS server")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(node.cert_chain().to_vec(), node.private_key())
        .map_err(|e| config_err("TLS server certificate")(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| config_err("QUIC server")(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(options)?);
    Ok(config)
}

/// The quinn client configuration: TLS 1.3, ALPN [`ALPN`], trusting only the job CA, presenting
/// the node's certificate, and `options`' timeouts.
pub fn client_config(
    node: &NodeCredentials,
    options: &TransportOptions,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("TLS client")(e.to_string()))?
        .with_root_certificates(roots(node)?)
        .with_client_auth_cert(node.cert_chain().to_vec(), node.private_key())
        .map_err(|e| config_err("TLS client certificate")(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| config_err("QUIC client")(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(options)?);
    Ok(config)
}

/// Creates and binds the UDP socket with the requested buffer sizes; returns the socket and the
/// sizes the kernel granted (receive, send).
fn udp_socket(
    addr: SocketAddr,
    buffer: usize,
) -> Result<(std::net::UdpSocket, (usize, usize)), TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TransportError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        warn!(error = %e, buffer, "cannot set the UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        warn!(error = %e, buffer, "cannot set the UDP send buffer size");
    }
    socket.bind(&addr.into()).map_err(err)?;
    let granted =
        (socket.recv_buffer_size().map_err(err)?, socket.send_buffer_size().map_err(err)?);
    if granted.0 < buffer || granted.1 < buffer {
        warn!(
            requested = buffer,
            recv = granted.0,
            send = granted.1,
            "the kernel granted smaller UDP buffers than requested; raise net.core.rmem_max and \
             net.core.wmem_max, or expect packet loss under load"
        );
    }
    Ok((socket.into(), granted))
}

/// What the accept loop and the handshakes share.
#[derive(Debug)]
struct Shared {
    job_id: String,
    node_name: String,
    options: TransportOptions,
    refused: AtomicU64,
}

impl Shared {
    fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            job_id: self.job_id.clone(),
            node_name: self.node_name.clone(),
        }
    }
}

/// A QUIC endpoint that both accepts and opens connections with mutual TLS, and hands out
/// [`Peer`]s only after the Hello/Welcome handshake.
///
/// Incoming connections are handshaken concurrently in the background; a failed or refused one
/// is logged and counted ([`Endpoint::refused_count`]) and never reaches [`Endpoint::accept`].
#[derive(Debug)]
pub struct Endpoint {
    quinn: quinn::Endpoint,
    shared: Arc<Shared>,
    accepted: Mutex<mpsc::Receiver<Peer>>,
    acceptor: JoinHandle<()>,
    buffer_sizes: (usize, usize),
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Endpoint {
    /// Binds an endpoint on `addr` (port 0 picks a free port) for node `node` of job `job_id`.
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        node: &NodeCredentials,
        job_id: &str,
        options: TransportOptions,
    ) -> Result<Self, TransportError> {
        super::install_crypto_provider();
        let server = server_config(node, &options)?;
        let client = client_config(node, &options)?;
        let (socket, buffer_sizes) = udp_socket(addr, options.socket_buffer_bytes)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| config_err("runtime")("no async runtime (call inside tokio)".into()))?;
        let mut quinn =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
                .map_err(|source| TransportError::Socket { addr, source })?;
        quinn.set_default_client_config(client);
        let shared = Arc::new(Shared {
            job_id: job_id.to_string(),
            node_name: node.node_name().to_string(),
            options,
            refused: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let acceptor = tokio::spawn(accept_loop(quinn.clone(), shared.clone(), tx));
        info!(
            addr = ?quinn.local_addr().ok(),
            node = %shared.node_name,
            job = %shared.job_id,
            "transport endpoint bound"
        );
        Ok(Self { quinn, shared, accepted: Mutex::new(rx), acceptor, buffer_sizes })
    }

    /// The local UDP address (with the port chosen when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.quinn.local_addr().map_err(|source| TransportError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// The UDP (receive, send) buffer sizes the kernel granted, as it reports them (Linux
    /// reports twice the usable size).
    pub fn socket_buffer_sizes(&self) -> (usize, usize) {
        self.buffer_sizes
    }

    /// The options this endpoint was bound with.
    pub fn options(&self) -> &TransportOptions {
        &self.shared.options
    }

    /// How many incoming connections failed TLS or the handshake so far.
    pub fn refused_count(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// The underlying quinn endpoint.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.quinn
    }

    /// Connects to `addr`, verifying its certificate against the job CA for `server_name` (the
    /// host name, `localhost`, or [`super::MEMBER_SERVER_NAME`]), then runs the handshake.
    /// Returns the peer only once it has welcomed us and its own introduction checked out.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Peer, TransportError> {
        let connecting = self
            .quinn
            .connect(addr, server_name)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let after = self.shared.options.handshake_timeout;
        let shared = &self.shared;
        let attempt = async move {
            let conn = connecting
                .await
                .map_err(|source| TransportError::ConnectionLost { addr, source })?;
            match client_handshake(&conn, shared).await {
                Ok(peer) => Ok(peer),
                Err(e) => {
                    if conn.close_reason().is_none() {
                        conn.close(CLOSE_REFUSED.into(), close_reason_bytes(&e.to_string()));
                    }
                    Err(e)
                }
            }
        };
        match tokio::time::timeout(after, attempt).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::HandshakeTimeout { addr, after }),
        }
    }

    /// The next peer that passed mutual TLS and the handshake; `None` once the endpoint is
    /// closed.
    pub async fn accept(&self) -> Option<Peer> {
        self.accepted.lock().await.recv().await
    }

    /// Closes every connection (with `reason`) and stops accepting.
    pub fn close(&self, reason: &str) {
        self.acceptor.abort();
        self.quinn.close(super::CLOSE_NORMAL.into(), close_reason_bytes(reason));
    }

    /// Waits until every connection is closed and its close has been sent.
    pub async fn wait_idle(&self) {
        self.quinn.wait_idle().await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, tx: mpsc::Sender<Peer>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match server_handshake(incoming, &shared).await {
                Ok(peer) => {
                    info!(peer = %addr, node = %peer.node_name(), "peer joined");
                    if tx.send(peer).await.is_err() {
                        debug!(peer = %addr, "endpoint dropped; discarding the new peer");
                    }
                }
                Err(e) => {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %addr, error = %e, "incoming connection refused");
                }
            }
        });
    }
}

/// Client side: open the control stream, send Hello, check the reply.
async fn client_handshake(
    conn: &quinn::Connection,
    shared: &Shared,
) -> Result<Peer, TransportError> {
    let addr = conn.remote_address();
    let (mut send, mut recv) =
        conn.open_bi().await.map_err(|source| TransportError::ConnectionLost { addr, source })?;
    codec::write_message(&mut send, &shared.hello(), MAX_HANDSHAKE_FRAME_LEN)
        .await
        .map_err(|e| handshake_io(conn, e))?;
    let reply = codec::read_message::<_, HelloReply>(&mut recv, MAX_HANDSHAKE_FRAME_LEN)
        .await
        .map_err(|e| handshake_io(conn, e))?;
    match reply {
        Some(HelloReply::Welcome(hello)) => match check_hello(&hello, &shared.job_id) {
            Ok(()) => Ok(Peer::new(
                conn.clone(),
                send,
                recv,
                hello.node_name,
                shared.options.max_frame_len,
            )),
            Err(reason) => {
                conn.close(CLOSE_REFUSED.into(), close_reason_bytes(&reason));
                Err(TransportError::RefusedPeer { addr, reason })
            }
        },
        Some(HelloReply::Refused { reason }) => {
            conn.close(CLOSE_REFUSED.into(), close_reason_bytes(&reason));
            Err(TransportError::RefusedByPeer { addr, reason })
        }
        None => Err(lost_or(conn, || TransportError::StreamFinished { addr })),
    }
}

/// A codec failure during the handshake: the connection's fate if it is gone (e.g. refused by
/// TLS), else a bad frame (which closes the connection).
fn handshake_io(conn: &quinn::Connection, e: CodecError) -> TransportError {
    let addr = conn.remote_address();
    match e {
        CodecError::Io(source) => lost_or(conn, || TransportError::Stream { addr, source }),
        other => close_bad_frame(conn, other),
    }
}

/// Server side: finish TLS, accept the control stream, read Hello, answer.
async fn server_handshake(
    incoming: quinn::Incoming,
    shared: &Shared,
) -> Result<Peer, TransportError> {
    let addr = incoming.remote_address();
    let after = shared.options.handshake_timeout;
    let conn = match tokio::time::timeout(after, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(source)) => return Err(TransportError::ConnectionLost { addr, source }),
        Err(_) => return Err(TransportError::HandshakeTimeout { addr, after }),
    };
    let exchange = async {
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|source| TransportError::ConnectionLost { addr, source })?;
        let hello = match codec::read_message::<_, Hello>(&mut recv, MAX_HANDSHAKE_FRAME_LEN).await
        {
            Ok(Some(hello)) => hello,
            Ok(None) => {
                return Err(close_bad_frame(
                    &conn,
                    CodecError::Truncated {
                        part: "header",
                        got: 0,
                        expected: codec::FRAME_HEADER_LEN,
                    },
                ))
            }
            Err(e) => return Err(handshake_io(&conn, e)),
        };
        if let Err(reason) = check_hello(&hello, &shared.job_id) {
            let refusal = HelloReply::Refused { reason: reason.clone() };
            // Best effort: let the peer read why, then close.
            if codec::write_message(&mut send, &refusal, MAX_HANDSHAKE_FRAME_LEN).await.is_ok() {
                let _ = send.finish();
                let _ = tokio::time::timeout(REFUSAL_LINGER, conn.closed()).await;
            }
            conn.close(CLOSE_REFUSED.into(), close_reason_bytes(&reason));
            return Err(TransportError::RefusedPeer { addr, reason });
        }
        codec::write_message(
            &mut send,
            &HelloReply::Welcome(shared.hello()),
            MAX_HANDSHAKE_FRAME_LEN,
        )
        .await
        .map_err(|e| handshake_io(&conn, e))?;
        Ok(Peer::new(conn.clone(), send, recv, hello.node_name, shared.options.max_frame_len))
    };
    match tokio::time::timeout(after, exchange).await {
        Ok(result) => result,
        Err(_) => {
            conn.close(
                CLOSE_HANDSHAKE_TIMEOUT.into(),
                b"no complete Hello within the handshake timeout",
            );
            Err(TransportError::HandshakeTimeout { addr, after })
        }
    }
}
