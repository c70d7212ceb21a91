//! Integration tests of the QUIC transport: mutual TLS, the handshake, framing faults and loss
//! detection. Everything runs on 127.0.0.1 with port 0 and short QUIC timeouts
//! (`TransportOptions::fast()`: idle 1 s, keep-alive 0.3 s).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use fusion_cluster::{
    codec,
    transport::{
        client_config, Endpoint, Hello, HelloReply, JobCredentials, NodeCredentials,
        TransportError, TransportOptions, ALPN, CLOSE_BAD_FRAME, PROTOCOL_VERSION,
    },
};
use support::transport::{bind, local, Ctl, JOB};

mod support;

fn node(dir: &Path, name: &str) -> NodeCredentials {
    JobCredentials::create_or_load(dir).unwrap().issue_node(name, &[]).unwrap()
}

/// A server endpoint for rank-0 of `JOB` with a fresh CA in a temporary folder.
fn server(dir: &Path) -> (Endpoint, SocketAddr) {
    let ep = bind(&node(dir, "rank-0"), JOB);
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

/// Waits until `cond` holds, polling every 10 ms, for at most 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects a good member `name` to `addr` and checks a round trip with the server's peer.
async fn good_member_round_trip(dir: &Path, server: &Endpoint, addr: SocketAddr, name: &str) {
    let client_ep = bind(&node(dir, name), JOB);
    let (client, accepted) = tokio::join!(client_ep.connect(addr, "localhost"), server.accept());
    let mut client = client.unwrap();
    let mut accepted = accepted.unwrap();
    assert_eq!(accepted.node_name(), name);
    client.send(&Ctl::Ping(7)).await.unwrap();
    assert_eq!(accepted.recv::<Ctl>().await.unwrap(), Ctl::Ping(7));
    accepted.send(&Ctl::Ping(8)).await.unwrap();
    assert_eq!(client.recv::<Ctl>().await.unwrap(), Ctl::Ping(8));
}

/// A raw quinn client (no handshake) with the given credentials' client config.
async fn raw_connect(creds: &NodeCredentials, addr: SocketAddr) -> quinn::Connection {
    let ep = quinn::Endpoint::client(local()).unwrap();
    let cfg = client_config(creds, &TransportOptions::fast()).unwrap();
    ep.connect_with(cfg, addr, "localhost").unwrap().await.unwrap()
}

/// Opens the control stream on a raw connection and performs the Hello/Welcome handshake by
/// hand, as a well-behaved member would.
async fn raw_handshake(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello =
        Hello { protocol_version: PROTOCOL_VERSION, job_id: JOB.into(), node_name: "raw".into() };
    codec::write_message(&mut send, &hello, 1 << 16).await.unwrap();
    let reply: HelloReply = codec::read_message(&mut recv, 1 << 16).await.unwrap().unwrap();
    assert!(matches!(reply, HelloReply::Welcome(ref h) if h.node_name == "rank-0"));
    (send, recv)
}

/// The application close code of a connection closed by the peer.
async fn close_code(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .expect("connection was not closed")
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            (close.error_code.into_inner(), String::from_utf8_lossy(&close.reason).into_owned())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn member_is_accepted_and_messages_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());
    let (recv_buf, send_buf) = server.socket_buffer_sizes();
    // Linux reports twice the granted size; the grant is capped by rmem_max / wmem_max.
    let cap = |f: &str| -> usize {
        std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(usize::MAX)
    };
    assert!(recv_buf >= (4 << 20).min(cap("/proc/sys/net/core/rmem_max")));
    assert!(send_buf >= (4 << 20).min(cap("/proc/sys/net/core/wmem_max")));

    let client_ep = bind(&node(dir.path(), "rank-1"), JOB);
    let (client, accepted) = tokio::join!(client_ep.connect(addr, "localhost"), server.accept());
    let mut client = client.unwrap();
    let mut accepted = accepted.unwrap();
    assert_eq!(client.node_name(), "rank-0");
    assert_eq!(accepted.node_name(), "rank-1");
    assert_eq!(client.remote_address(), addr);

    let grad = Ctl::Grad((0..3000).map(|i| i as f32 * 0.5).collect());
    client.send(&grad).await.unwrap();
    client.send(&Ctl::Text("done".into())).await.unwrap();
    assert_eq!(accepted.recv::<Ctl>().await.unwrap(), grad);
    assert_eq!(accepted.recv::<Ctl>().await.unwrap(), Ctl::Text("done".into()));

    // A message above max_frame_len is refused on the sending side; the connection stays up.
    let big = Ctl::Grad(vec![0.0; (16 << 20) / 4 + 1]);
    let err = client.send(&big).await.unwrap_err();
    assert!(matches!(err, TransportError::Send { .. }), "{err}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");

    // Split halves work from different tasks at the same time.
    let (mut tx, mut rx) = accepted.split();
    let echo = tokio::spawn(async move {
        for _ in 0..100 {
            let msg: Ctl = rx.recv().await.unwrap();
            tx.send(&msg).await.unwrap();
        }
        // Everything reaches the client before the halves (the connection's last handles) drop.
        tx.finish().await.unwrap();
    });
    for i in 0..100 {
        client.send(&Ctl::Ping(i)).await.unwrap();
        assert_eq!(client.recv::<Ctl>().await.unwrap(), Ctl::Ping(i));
    }
    echo.await.unwrap();
    let err = client.recv::<Ctl>().await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::StreamFinished { .. } | TransportError::ConnectionLost { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());

    let intruder = bind(&node(other.path(), "rank-1"), JOB);
    let err = intruder.connect(addr, "localhost").await.unwrap_err();
    assert!(matches!(err, TransportError::ConnectionLost { .. }), "unexpected error: {err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    eventually("the server to count the refusal", || server.refused_count() == 1).await;

    // The other direction: a member does not trust a server from another CA.
    let foreign_addr = intruder.local_addr().unwrap();
    let member = bind(&node(dir.path(), "rank-2"), JOB);
    let err = member.connect(foreign_addr, "localhost").await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // The server still accepts members.
    good_member_round_trip(dir.path(), &server, addr, "rank-3").await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());
    let ca = JobCredentials::load(dir.path()).unwrap();

    // A client that trusts the job CA (so it would accept the server) but has no certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_cert().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client(local()).unwrap();
    // Under TLS 1.3 this may still "succeed"; the refusal comes with the first round trip.
    let result = async {
        let conn = ep.connect_with(cfg, addr, "localhost")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            job_id: JOB.into(),
            node_name: "anonymous".into(),
        };
        codec::write_message(&mut send, &hello, 1 << 16).await?;
        let reply: Option<HelloReply> = codec::read_message(&mut recv, 1 << 16).await?;
        anyhow::Ok(reply)
    }
    .await;
    let err = result.expect_err("a client without a certificate got a reply");
    assert!(
        format!("{err:#}").contains("no certificates")
            || format!("{err:#}").contains("certificate"),
        "{err:#}"
    );
    eventually("the server to count the refusal", || server.refused_count() == 1).await;
    good_member_round_trip(dir.path(), &server, addr, "rank-1").await;
}

#[tokio::test]
async fn mismatched_job_id_or_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());

    // Same CA, other job id.
    let stranger = bind(&node(dir.path(), "rank-1"), "job-other");
    let err = stranger.connect(addr, "localhost").await.unwrap_err();
    match &err {
        TransportError::RefusedByPeer { reason, .. } => {
            assert!(reason.contains("job id mismatch"), "{reason}");
            assert!(reason.contains("job-other") && reason.contains(JOB), "{reason}");
        }
        other => panic!("expected RefusedByPeer, got {other}"),
    }

    // Other protocol version, spoken by hand.
    let conn = raw_connect(&node(dir.path(), "rank-2"), addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        job_id: JOB.into(),
        node_name: "future".into(),
    };
    codec::write_message(&mut send, &hello, 1 << 16).await.unwrap();
    let reply: HelloReply = codec::read_message(&mut recv, 1 << 16).await.unwrap().unwrap();
    assert!(
        matches!(&reply, HelloReply::Refused { reason } if reason.contains("protocol version")),
        "{reply:?}"
    );
    conn.close(0u32.into(), b"");

    eventually("the server to count both refusals", || server.refused_count() == 2).await;
    good_member_round_trip(dir.path(), &server, addr, "rank-3").await;
}

#[tokio::test]
async fn garbage_frames_close_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());

    // A member connected before the faults, which must survive them.
    let bystander_ep = bind(&node(dir.path(), "rank-9"), JOB);
    let (bystander, bystander_srv) =
        tokio::join!(bystander_ep.connect(addr, "localhost"), server.accept());
    let mut bystander = bystander.unwrap();
    let mut bystander_srv = bystander_srv.unwrap();

    let creds = node(dir.path(), "rank-1");

    // 1. Garbage instead of a Hello: refused during the handshake.
    let conn = raw_connect(&creds, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    codec::write_frame(&mut send, &[0xff; 32], 1 << 16).await.unwrap();
    let (code, reason) = close_code(&conn).await;
    assert_eq!(code, CLOSE_BAD_FRAME as u64);
    assert!(reason.contains("Hello"), "reason names the type: {reason}");
    eventually("the refusal count", || server.refused_count() == 1).await;

    // 2. Garbage after a proper handshake: the server's recv fails and closes the connection.
    let conn = raw_connect(&creds, addr).await;
    let ((mut send, _recv), accepted) = tokio::join!(raw_handshake(&conn), server.accept());
    let mut accepted = accepted.unwrap();
    codec::write_frame(&mut send, &[0xfe, 0xfd, 0xfc, 0xfb, 0xfa], 1 << 16).await.unwrap();
    let err = accepted.recv::<Ctl>().await.unwrap_err();
    assert!(
        matches!(&err, TransportError::BadFrame { .. }) && err.to_string().contains("Ctl"),
        "{err}"
    );
    let (code, _) = close_code(&conn).await;
    assert_eq!(code, CLOSE_BAD_FRAME as u64);
    // That peer's connection is gone for the server too.
    assert!(accepted.recv::<Ctl>().await.is_err());

    // The bystander and a newcomer are unaffected.
    bystander.send(&Ctl::Text("still here".into())).await.unwrap();
    assert_eq!(bystander_srv.recv::<Ctl>().await.unwrap(), Ctl::Text("still here".into()));
    good_member_round_trip(dir.path(), &server, addr, "rank-2").await;
}

#[tokio::test]
async fn oversized_length_header_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());
    let limit = server.options().max_frame_len;
    let creds = node(dir.path(), "rank-1");

    // 1. During the handshake: a header above the handshake limit.
    let conn = raw_connect(&creds, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let (code, reason) = close_code(&conn).await;
    assert_eq!(code, CLOSE_BAD_FRAME as u64);
    assert!(reason.contains(&u32::MAX.to_string()), "{reason}");

    // 2. After the handshake: a header one byte above max_frame_len, with no payload behind it.
    let conn = raw_connect(&creds, addr).await;
    let ((mut send, _recv), accepted) = tokio::join!(raw_handshake(&conn), server.accept());
    let mut accepted = accepted.unwrap();
    send.write_all(&((limit + 1) as u32).to_le_bytes()).await.unwrap();
    let err = accepted.recv::<Ctl>().await.unwrap_err();
    match &err {
        TransportError::BadFrame {
            source: codec::CodecError::Oversized { len, limit: l }, ..
        } => assert_eq!((*len, *l), (limit as u64 + 1, limit)),
        other => panic!("expected an oversized BadFrame, got {other}"),
    }
    let (code, reason) = close_code(&conn).await;
    assert_eq!(code, CLOSE_BAD_FRAME as u64);
    assert!(reason.contains("exceeds the limit"), "{reason}");

    good_member_round_trip(dir.path(), &server, addr, "rank-2").await;
}

#[tokio::test]
/// The close frame, not the idle timeout (which would say `TimedOut`), ends the peer's connection.
async fn closed_peer_is_detected_by_its_close_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());
    let client_ep = bind(&node(dir.path(), "rank-1"), JOB);
    let (client, accepted) = tokio::join!(client_ep.connect(addr, "localhost"), server.accept());
    let client = client.unwrap();
    let mut accepted = accepted.unwrap();
    let closed = accepted.closed();
    let start = Instant::now();
    client.close("bye");
    let reason = tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the close was not seen within 10 s: a hang");
    println!("close seen after {:?}", start.elapsed());
    assert!(matches!(reason, quinn::ConnectionError::ApplicationClosed(_)), "{reason}");
    assert!(matches!(accepted.recv::<Ctl>().await, Err(TransportError::ConnectionLost { .. })));
}

/// A SIGKILLed peer sends no close frame: the QUIC idle timeout (1 s) finds it. The time it took
/// is printed, not asserted (a loaded machine is slow, not wrong).
#[tokio::test]
async fn killed_peer_is_detected_by_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(dir.path());
    let mut child = std::process::Command::new(support::example_bin("test_transport_peer"))
        .args([addr.to_string(), dir.path().display().to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(20), server.accept()).await;
    let mut peer = match accepted {
        Ok(Some(peer)) => peer,
        _ => {
            let _ = child.kill();
            panic!("the child process never joined");
        }
    };
    assert_eq!(peer.node_name(), "child");
    assert_eq!(peer.recv::<Ctl>().await.unwrap(), Ctl::Text("ready".into()));

    let closed = peer.closed();
    child.kill().unwrap(); // SIGKILL: no CONNECTION_CLOSE is sent
    let killed_at = Instant::now();
    child.wait().unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("the loss was not detected within 20 s: a hang");
    let detected = killed_at.elapsed();
    println!("killed peer detected after {detected:?}: {reason}");
    assert!(matches!(reason, quinn::ConnectionError::TimedOut), "{reason}");
    assert!(matches!(peer.recv::<Ctl>().await, Err(TransportError::ConnectionLost { .. })));
}

#[test]
fn concurrent_creation_yields_one_ca() {
    let dir = tempfile::tempdir().unwrap();
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            let path = dir.path().join("job");
            std::thread::spawn(move || {
                barrier.wait();
                JobCredentials::create_or_load(&path).unwrap()
            })
        })
        .collect();
    let creds: Vec<JobCredentials> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for c in &creds[1..] {
        assert_eq!(c.ca_cert(), creds[0].ca_cert());
    }
    // No temporary folders left behind; only the CA.
    let entries: Vec<String> = std::fs::read_dir(dir.path().join("job"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["ca".to_string()]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join("job/ca").join(p)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode("key.pem"), 0o600);
    assert_eq!(mode(""), 0o700);
    // A CA loaded again signs certificates the first instance's nodes accept.
    let reloaded = JobCredentials::load(&dir.path().join("job")).unwrap();
    assert_eq!(reloaded.ca_cert(), creds[0].ca_cert());

    // Waiting for a CA that nobody creates times out with a clear error.
    let empty = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = JobCredentials::wait_and_load(empty.path(), Duration::from_millis(150)).unwrap_err();
    assert!(err.to_string().contains("did not appear"), "{err}");
    println!("wait_and_load(150 ms) gave up after {:?}", start.elapsed());
}

#[tokio::test]
async fn nodes_signed_by_separately_loaded_ca_instances_trust_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = JobCredentials::create_or_load(dir.path()).unwrap();
    let b = JobCredentials::load(dir.path()).unwrap();
    let server = bind(&a.issue_node("rank-0", &[]).unwrap(), JOB);
    let addr = server.local_addr().unwrap();
    let client = bind(&b.issue_node("rank-1", &["10.1.2.3".into()]).unwrap(), JOB);
    for name in ["localhost", fusion_cluster::transport::MEMBER_SERVER_NAME] {
        let (c, s) = tokio::join!(client.connect(addr, name), server.accept());
        let mut c = c.unwrap();
        let mut s = s.unwrap();
        c.send(&Ctl::Ping(3)).await.unwrap();
        assert_eq!(s.recv::<Ctl>().await.unwrap(), Ctl::Ping(3));
    }
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let options = TransportOptions {
        handshake_timeout: Duration::from_millis(300),
        ..TransportOptions::fast()
    };
    let server = Endpoint::bind(local(), &node(dir.path(), "rank-0"), JOB, options).unwrap();
    let addr = server.local_addr().unwrap();
    // Passes TLS, then never opens the control stream.
    let conn = raw_connect(&node(dir.path(), "rank-1"), addr).await;
    let start = Instant::now();
    let (code, reason) = close_code(&conn).await;
    assert_eq!(code, fusion_cluster::transport::CLOSE_HANDSHAKE_TIMEOUT as u64);
    assert!(reason.contains("Hello"), "{reason}");
    println!("silent client dropped after {:?} (handshake timeout 300 ms)", start.elapsed());
    eventually("the refusal count", || server.refused_count() == 1).await;
}

#[tokio::test]
async fn keep_alive_not_below_idle_timeout_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        TransportOptions { keep_alive: Some(Duration::from_secs(1)), ..TransportOptions::fast() };
    let err = Endpoint::bind(local(), &node(dir.path(), "rank-0"), JOB, options).unwrap_err();
    assert!(err.to_string().contains("keep-alive"), "{err}");
}

#[test]
fn handles_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Endpoint>();
    send_sync::<JobCredentials>();
    send_sync::<NodeCredentials>();
    send::<fusion_cluster::transport::Peer>();
    send::<fusion_cluster::transport::PeerSender>();
    send::<fusion_cluster::transport::PeerReceiver>();
}

#[test]
fn a_ca_key_that_does_not_match_its_certificate_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    JobCredentials::create_or_load(a.path()).unwrap();
    JobCredentials::create_or_load(b.path()).unwrap();
    std::fs::copy(b.path().join("ca/key.pem"), a.path().join("ca/key.pem")).unwrap();
    let err = JobCredentials::load(a.path()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}
