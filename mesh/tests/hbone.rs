//! HBONE over real TLS on loopback sockets: identities verified both ways,
//! CONNECT answered only after the destination side accepts, bytes intact;
//! the server's bounds (handshake timeout, stream and header limits) and
//! graceful drain; the pool's stream cap under racing opens.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh::{
    ca::{CaFiles, Signer},
    hbone::{self, ConnectHeaders, Inbound, Refusal, Timeouts},
    identity::{new_csr, SpiffeId, WorkloadCert},
    pool::{Pool, PoolKey},
    splice::Hooks,
    tls::{self, Roots},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

struct Pki {
    signer: Signer,
    roots: Roots,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(tag: &str, trust_domain: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("mesh-hbone-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = CaFiles::new(&dir);
        files.init(trust_domain, &[]).unwrap();
        let signer = Signer::load(&files, Duration::from_secs(3600)).unwrap();
        let roots = Roots::from_pem(&std::fs::read_to_string(files.root_cert()).unwrap()).unwrap();
        Pki { signer, roots, dir }
    }

    fn cert(&self, id: &str) -> WorkloadCert {
        let id: SpiffeId = id.parse().unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let chain = self.signer.sign(&csr, &id, Duration::from_secs(600)).unwrap();
        WorkloadCert::new(id, chain, key).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const WAIT: Duration = Duration::from_secs(10);

/// An echo application; returns its address.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A 15008-like server that answers with `refuse` or connects to the app.
struct TestServer {
    addr: SocketAddr,
    /// Every CONNECT that reached the destination side's `open`.
    seen: mpsc::UnboundedReceiver<Inbound>,
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Why `hbone::serve` failed, per failed connection.
    errors: mpsc::UnboundedReceiver<String>,
    /// Send `true` to drain every connection (GOAWAY).
    drain: watch::Sender<bool>,
    /// Connections that ended (serve returned).
    ended: Arc<AtomicUsize>,
}

async fn server(pki: &Pki, cert: &str, refuse: Option<u16>) -> TestServer {
    let cfg = tls::server_config(&pki.cert(cert), &pki.roots).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let (err_tx, errors) = mpsc::unbounded_channel();
    let (drain, drained) = watch::channel(false);
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (count, end_count) = (accepted.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (cfg, tx, err_tx, end_count) = (cfg.clone(), tx.clone(), err_tx.clone(), end_count.clone());
            let mut drained = drained.clone();
            tokio::spawn(async move {
                let open = move |i: Inbound| {
                    let tx = tx.clone();
                    async move {
                        tx.send(i.clone()).unwrap();
                        match refuse {
                            Some(code) => Err(Refusal {
                                status: http::StatusCode::from_u16(code).unwrap(),
                                reason: "test".into(),
                            }),
                            None => TcpStream::connect(i.authority)
                                .await
                                .map(|s| (s, Hooks::default(), ()))
                                .map_err(|e| Refusal {
                                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                                    reason: e.to_string(),
                                }),
                        }
                    }
                };
                // Connections accepted after the drain began are the
                // "successor's": they are not drained.
                let already = *drained.borrow();
                let drain = async move {
                    if already {
                        std::future::pending::<()>().await;
                    }
                    let _ = drained.wait_for(|d| *d).await;
                };
                if let Err(e) = hbone::serve(s, cfg, Duration::from_secs(1), drain, open, |_, _| {}).await {
                    let _ = err_tx.send(e.to_string());
                }
                end_count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    TestServer {
        addr,
        seen,
        accepted,
        errors,
        drain,
        ended,
    }
}

/// A local TCP pair: (the side the tunnel bridges, the "application client").
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (ours, _) = l.accept().await.unwrap();
    (ours, app)
}

fn headers(authority: SocketAddr) -> ConnectHeaders {
    ConnectHeaders {
        authority,
        client: "10.1.1.11:40000".parse().unwrap(),
        baggage: "k8s.namespace.name=default".into(),
    }
}

async fn dial(
    pki: &Pki,
    client: &str,
    server: SocketAddr,
    expect: &str,
    authority: SocketAddr,
) -> Result<hbone::Tunnel, hbone::HboneError> {
    let cfg = tls::client_config(&pki.cert(client), &pki.roots, vec![expect.parse().unwrap()]).unwrap();
    hbone::connect(TcpStream::connect(server).await.unwrap(), cfg, &headers(authority)).await
}

/// Sends `msg` through a bridged tunnel and returns the echo.
async fn echo_through(tunnel: hbone::Tunnel, msg: &[u8]) -> Vec<u8> {
    let (mut ours, mut app_client) = tcp_pair().await;
    let bridge = tokio::spawn(async move { tunnel.bridge(&mut ours, Hooks::default()).await });
    app_client.write_all(msg).await.unwrap();
    app_client.shutdown().await.unwrap();
    let mut echo = Vec::new();
    app_client.read_to_end(&mut echo).await.unwrap();
    drop(app_client);
    assert_eq!(bridge.await.unwrap().result, "ok");
    echo
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_half_close_and_identities() {
    let pki = Pki::new("ok", "cluster.local");
    let app = echo_app().await;
    let mut srv = server(&pki, SERVER, None).await;
    let tunnel = dial(&pki, CLIENT, srv.addr, SERVER, app).await.unwrap();
    assert_eq!(tunnel.peer.as_ref().map(ToString::to_string).as_deref(), Some(SERVER));
    let inbound = srv.seen.recv().await.unwrap();
    assert_eq!(
        inbound.peer.to_string(),
        CLIENT,
        "the destination side knows the client"
    );
    assert_eq!(inbound.authority, app);
    assert_eq!(inbound.forwarded_for.as_deref(), Some("for=\"10.1.1.11:40000\""));

    let (mut ours, mut client) = tcp_pair().await;
    let bridge = tokio::spawn(async move { tunnel.bridge(&mut ours, Hooks::default()).await });
    let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: the echo must still arrive
    };
    let mut echoed = Vec::new();
    let recv = r.read_to_end(&mut echoed);
    let (_, n) = tokio::join!(send, recv);
    assert_eq!(n.unwrap(), payload.len());
    assert!(echoed == payload, "echo differs");
    drop(client);
    let copied = bridge.await.unwrap();
    assert_eq!(
        (copied.sent, copied.received),
        (payload.len() as u64, payload.len() as u64)
    );
    assert_eq!(copied.result, "ok");
}

#[tokio::test]
async fn client_rejects_a_server_with_an_unexpected_identity() {
    let pki = Pki::new("wrongsrv", "cluster.local");
    let srv = server(&pki, "spiffe://cluster.local/ns/default/sa/impostor", None).await;
    let err = dial(&pki, CLIENT, srv.addr, SERVER, echo_app().await)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("TLS handshake") && err.contains("expected one of") && err.contains("impostor"),
        "{err}"
    );
}

#[tokio::test]
async fn server_rejects_clients_of_another_root_or_trust_domain_and_says_why() {
    let pki = Pki::new("srv", "cluster.local");
    let mut srv = server(&pki, SERVER, None).await;
    let app = echo_app().await;
    // Another root: the handshake fails (client certificate not trusted).
    let rogue = Pki::new("rogue", "cluster.local");
    let cfg = tls::client_config(&rogue.cert(CLIENT), &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    let client_err = hbone::connect(TcpStream::connect(srv.addr).await.unwrap(), cfg, &headers(app))
        .await
        .err()
        .unwrap()
        .to_string();
    let server_err = srv.errors.recv().await.unwrap();
    assert!(
        server_err.contains("TLS handshake") && server_err.contains("invalid peer certificate"),
        "the server says the client certificate is not the mesh's: {server_err}"
    );
    assert!(
        client_err.contains("received fatal alert"),
        "the client is told by an alert (in TLS 1.3, on its first read): {client_err}"
    );
    // Same root, other trust domain.
    let other = pki.cert("spiffe://other.domain/ns/default/sa/client");
    let cfg = tls::client_config(&other, &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    assert!(
        hbone::connect(TcpStream::connect(srv.addr).await.unwrap(), cfg, &headers(app))
            .await
            .is_err()
    );
    let server_err = srv.errors.recv().await.unwrap();
    assert!(
        server_err.contains("spiffe://other.domain/ns/default/sa/client is not in trust domain cluster.local"),
        "{server_err}"
    );
    assert!(
        srv.seen.try_recv().is_err(),
        "no CONNECT may reach the destination side"
    );
}

#[tokio::test]
async fn refusals_are_answered_with_their_status() {
    let pki = Pki::new("deny", "cluster.local");
    let srv = server(&pki, SERVER, Some(401)).await;
    let err = dial(&pki, CLIENT, srv.addr, SERVER, echo_app().await)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("answered CONNECT") && err.contains("401"), "{err}");
    // Upstream unreachable: 503.
    let srv = server(&pki, SERVER, None).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = dial(&pki, CLIENT, srv.addr, SERVER, closed)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("503"), "{err}");
}

#[test]
fn only_istio_cipher_suites_are_offered() {
    let pki = Pki::new("suites", "cluster.local");
    let c = tls::client_config(&pki.cert(CLIENT), &pki.roots, vec![]).unwrap();
    let names: Vec<String> = c
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    assert_eq!(names, vec!["TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256"]);
}

/// `openssl s_client` (an independent TLS stack) against the server config.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        // -ign_eof: keep reading until the server closes (its alert comes
        // after the handshake in TLS 1.3).
        .args(["s_client", "-connect", &addr.to_string(), "-alpn", "h2", "-ign_eof"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (cargo xtask setup installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_server_speaks_tls13_with_aes_gcm_and_h2_only_and_the_client_sends_no_sni() {
    let pki = Pki::new("cfg", "cluster.local");
    let c = tls::client_config(&pki.cert(CLIENT), &pki.roots, vec![]).unwrap();
    assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
    assert!(!c.enable_sni);
    let cfg = tls::server_config(&pki.cert(SERVER), &pki.roots).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    });
    // TLS 1.2 is refused outright.
    let out = s_client(addr, &["-tls1_2"]);
    assert!(out.contains("protocol version"), "{out}");
    // TLS 1.3 with AES-GCM and h2 is what the server negotiates, and it
    // insists on a client certificate.
    let out = s_client(addr, &["-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"]);
    assert!(out.contains("New, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(out.contains("certificate required"), "{out}");
    // ChaCha20 is not among the mesh's suites.
    let out = s_client(addr, &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"]);
    assert!(
        out.contains("handshake failure") && !out.contains("New, TLSv1.3"),
        "{out}"
    );
}

#[tokio::test]
async fn stalled_handshakes_are_timed_out_on_both_sides() {
    // A server that accepts and never answers: the client gives up.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let pki = Pki::new("stall", "cluster.local");
    let cfg = tls::client_config(&pki.cert(CLIENT), &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    let t = Timeouts {
        handshake: Duration::from_millis(300),
        response: Duration::from_millis(600),
    };
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, hbone::handshake(TcpStream::connect(addr).await.unwrap(), cfg, &t))
        .await
        .expect("the handshake must be bounded")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no TLS handshake within 300ms"), "{err}");
    assert!(started.elapsed() < WAIT);
    drop(silent);
    // A client that connects and never speaks: the server gives up (1 s).
    let mut srv = server(&pki, SERVER, None).await;
    let _idle = TcpStream::connect(srv.addr).await.unwrap();
    let err = tokio::time::timeout(WAIT, srv.errors.recv()).await.unwrap().unwrap();
    assert!(err.contains("no TLS handshake within 1s"), "{err}");
}

// === HTTP/2 written by hand, to break the rules h2 clients keep ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1).
fn hpack_int(first: u8, n: u8, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing.
fn hpack_literal(name: &str, value: &str, out: &mut Vec<u8>) {
    let static_index = match name {
        ":authority" => 1,
        ":method" => 2,
        _ => 0,
    };
    if static_index > 0 {
        hpack_int(0x00, 4, static_index, out);
    } else {
        out.push(0x00);
        hpack_int(0x00, 7, name.len(), out);
        out.extend_from_slice(name.as_bytes());
    }
    hpack_int(0x00, 7, value.len(), out);
    out.extend_from_slice(value.as_bytes());
}

fn connect_block(authority: SocketAddr, extra: Option<(&str, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(":method", "CONNECT", &mut b);
    hpack_literal(":authority", &authority.to_string(), &mut b);
    if let Some((n, v)) = extra {
        hpack_literal(n, v, &mut b);
    }
    b
}

/// HEADERS (+ CONTINUATION frames of at most 16 KiB) for one stream.
fn headers_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    const END_HEADERS: u8 = 0x4;
    let chunks: Vec<&[u8]> = block.chunks(16 << 10).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
        out.extend(frame(kind, flags, stream, c));
    }
    out
}

type RawTls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS with a valid client certificate, the preface and an empty SETTINGS.
async fn raw_h2(pki: &Pki, addr: SocketAddr) -> RawTls {
    let cfg = tls::client_config(&pki.cert(CLIENT), &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    tls
}

/// The next frame: (type, flags, stream, payload).
async fn read_frame(tls: &mut RawTls) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    tls.read_exact(&mut payload).await.unwrap();
    (head[3], head[4], stream, payload)
}

#[tokio::test]
async fn the_server_refuses_streams_over_its_limit() {
    let pki = Pki::new("streams", "cluster.local");
    let app = echo_app().await;
    let mut srv = server(&pki, SERVER, None).await;
    let mut tls = raw_h2(&pki, srv.addr).await;
    // One stream more than the limit, all left open (no END_STREAM).
    let over = hbone::MAX_STREAMS + 1;
    let mut frames = Vec::new();
    for i in 0..over {
        frames.extend(headers_frames(2 * i + 1, &connect_block(app, None)));
    }
    tls.write_all(&frames).await.unwrap();
    let last = 2 * (over - 1) + 1;
    let (mut answered, mut refused) = (0, Vec::new());
    let deadline = Instant::now() + WAIT;
    while answered < hbone::MAX_STREAMS || refused.is_empty() {
        assert!(Instant::now() < deadline, "answered {answered}, refused {refused:?}");
        let (kind, _, stream, payload) = tokio::time::timeout(WAIT, read_frame(&mut tls)).await.unwrap();
        match kind {
            0x1 => answered += 1,
            // RST_STREAM: the error code is the payload.
            0x3 => refused.push((stream, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
            0x7 => panic!("the server gave up on the whole connection (GOAWAY)"),
            _ => {}
        }
    }
    const REFUSED_STREAM: u32 = 7;
    assert_eq!(refused, vec![(last, REFUSED_STREAM)], "only the stream over the limit");
    assert_eq!(answered, hbone::MAX_STREAMS);
    let mut reached = 0;
    while srv.seen.try_recv().is_ok() {
        reached += 1;
    }
    assert_eq!(
        reached,
        hbone::MAX_STREAMS as usize,
        "the refused stream never reached the app"
    );
}

#[tokio::test]
async fn the_server_refuses_header_lists_over_64_kib() {
    let pki = Pki::new("headers", "cluster.local");
    let app = echo_app().await;
    let mut srv = server(&pki, SERVER, None).await;
    let mut tls = raw_h2(&pki, srv.addr).await;
    // 70 KiB of one header: over the limit, within what CONTINUATION allows.
    let big = "x".repeat(70 << 10);
    tls.write_all(&headers_frames(1, &connect_block(app, Some(("x-big", &big)))))
        .await
        .unwrap();
    // And a normal stream after it, which must still work.
    tls.write_all(&headers_frames(3, &connect_block(app, None)))
        .await
        .unwrap();
    let mut first = None;
    let mut second_answered = false;
    let deadline = Instant::now() + WAIT;
    while first.is_none() || !second_answered {
        assert!(Instant::now() < deadline);
        let (kind, flags, stream, _) = tokio::time::timeout(WAIT, read_frame(&mut tls)).await.unwrap();
        match (kind, stream) {
            (0x7, _) => panic!("GOAWAY: the whole connection was dropped"),
            // A response ending the stream (431), or a reset.
            (0x1, 1) if flags & 0x1 != 0 => first = Some("431"),
            (0x3, 1) => first = Some("reset"),
            (0x1, 3) => second_answered = true,
            _ => {}
        }
    }
    let reached: Vec<SocketAddr> = std::iter::from_fn(|| srv.seen.try_recv().ok().map(|i| i.authority)).collect();
    assert_eq!(reached, vec![app], "only the normal stream reached the app ({first:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_multiplexes_streams_dials_once_and_respects_rotation() {
    let s = PoolSetup::new("pool").await;
    // 50 concurrent first connects: one handshake, 50 streams.
    let tunnels = join_all((0..50).map(|_| s.open(&s.cert))).await;
    assert!(tunnels.iter().all(Result::is_ok));
    assert_eq!(
        s.srv.accepted.load(Ordering::SeqCst),
        1,
        "concurrent first dials share one handshake"
    );
    assert_eq!(
        tunnels[0]
            .as_ref()
            .unwrap()
            .0
            .peer
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some(SERVER)
    );
    // 150 open streams need a second connection (100 per connection).
    let more = join_all((0..100).map(|_| s.open(&s.cert))).await;
    assert!(more.iter().all(Result::is_ok));
    assert_eq!(s.srv.accepted.load(Ordering::SeqCst), 2, "100 streams per connection");
    // A rotated certificate takes a new connection; old ones keep their streams.
    let rotated = Arc::new(s.pki.cert(CLIENT));
    let (t, _g) = s.open(&rotated).await.unwrap();
    assert_eq!(s.srv.accepted.load(Ordering::SeqCst), 3);
    // The streams still carry bytes.
    assert_eq!(echo_through(t, b"pooled").await, b"pooled");
    assert_eq!(s.pool.connections(), 3);
}

/// An echo app, a server, an empty pool and the client's key and certificate.
struct PoolSetup {
    pki: Pki,
    app: SocketAddr,
    srv: TestServer,
    pool: Pool,
    key: PoolKey,
    cert: Arc<WorkloadCert>,
}

impl PoolSetup {
    async fn new(tag: &str) -> PoolSetup {
        let pki = Pki::new(tag, "cluster.local");
        let app = echo_app().await;
        let srv = server(&pki, SERVER, None).await;
        let key = PoolKey {
            src_identity: CLIENT.parse().unwrap(),
            dst_identities: vec![SERVER.parse().unwrap()],
            dst: srv.addr,
            src_ip: "127.0.0.1".parse().unwrap(),
        };
        let cert = Arc::new(pki.cert(CLIENT));
        PoolSetup {
            pki,
            app,
            srv,
            pool: Pool::default(),
            key,
            cert,
        }
    }

    /// One stream through the pool, made with `cert`.
    fn open(
        &self,
        cert: &Arc<WorkloadCert>,
    ) -> impl std::future::Future<Output = Result<(hbone::Tunnel, mesh::pool::StreamGuard), hbone::HboneError>>
           + Send
           + 'static {
        let (pool, key, cert, roots) = (
            self.pool.clone(),
            self.key.clone(),
            cert.clone(),
            self.pki.roots.clone(),
        );
        let (server, app) = (self.srv.addr, self.app);
        async move { pool_open(&pool, &key, &cert, &roots, server, app).await }
    }
}

async fn pool_open(
    pool: &Pool,
    key: &PoolKey,
    cert: &Arc<WorkloadCert>,
    roots: &Roots,
    server: SocketAddr,
    app: SocketAddr,
) -> Result<(hbone::Tunnel, mesh::pool::StreamGuard), hbone::HboneError> {
    pool.connect(key, &cert.serial, &headers(app), || async {
        let tls = tls::client_config(cert, roots, vec![SERVER.parse().unwrap()])?;
        Ok(hbone::Dialed {
            tcp: TcpStream::connect(server).await.unwrap(),
            tls,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_opens_never_put_more_than_100_streams_on_a_connection() {
    let s = PoolSetup::new("race").await;
    // Warm up one connection, then race 500 opens on it at once: each must
    // get a stream slot of its own (over 100, h2 would queue them forever).
    let first = s.open(&s.cert).await.unwrap();
    let opens = (0..500).map(|_| s.open(&s.cert));
    let all = tokio::time::timeout(WAIT, join_all(opens))
        .await
        .expect("no open may wait forever for a stream slot");
    assert!(all.iter().all(Result::is_ok));
    let streams = s.pool.streams();
    assert_eq!(streams.iter().sum::<usize>(), 501);
    assert!(streams.iter().all(|n| *n <= 100), "{streams:?}");
    assert_eq!(
        s.srv.accepted.load(Ordering::SeqCst),
        6,
        "501 streams: 6 connections ({streams:?})"
    );
    drop((first, all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_sends_goaway_and_the_pool_moves_new_streams_while_open_ones_finish() {
    let s = PoolSetup::new("drain").await;
    let (held, held_guard) = s.open(&s.cert).await.unwrap();
    let (mut ours, mut app_client) = tcp_pair().await;
    let bridge = tokio::spawn(async move { held.bridge(&mut ours, Hooks::default()).await });
    app_client.write_all(b"before ").await.unwrap();

    s.srv.drain.send(true).unwrap();
    // New streams go to a new connection (the old one said GOAWAY) and work.
    let deadline = Instant::now() + WAIT;
    while s.srv.accepted.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no new connection after GOAWAY");
        let (t, _g) = s.open(&s.cert).await.unwrap();
        assert_eq!(echo_through(t, b"new").await, b"new");
    }
    // The open stream on the draining connection still works, then ends it.
    app_client.write_all(b"after").await.unwrap();
    app_client.shutdown().await.unwrap();
    let mut echo = Vec::new();
    app_client.read_to_end(&mut echo).await.unwrap();
    assert_eq!(echo, b"before after");
    assert_eq!(bridge.await.unwrap().result, "ok");
    drop(held_guard);
    let deadline = Instant::now() + WAIT;
    while s.srv.ended.load(Ordering::SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "the drained connection must close once its stream is done"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs futures concurrently (no extra dependency for join_all).
async fn join_all<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A server on the stream API: echoes each accepted stream with plain
/// AsyncRead/AsyncWrite; refuses port 1 with 403; reports what it saw.
async fn stream_server(pki: &Pki) -> (SocketAddr, mpsc::UnboundedReceiver<hbone::ConnectRequest>) {
    let cfg = tls::server_config(&pki.cert(SERVER), &pki.roots).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (cfg, tx) = (cfg.clone(), tx.clone());
            tokio::spawn(async move {
                let handler = move |inc: hbone::Incoming| {
                    let tx = tx.clone();
                    async move {
                        tx.send(inc.request.clone()).unwrap();
                        if inc.request.authority_addr().map(|a| a.port()) == Some(1) {
                            return inc.refuse(http::StatusCode::FORBIDDEN);
                        }
                        let (mut r, mut w) = tokio::io::split(inc.accept().unwrap());
                        tokio::io::copy(&mut r, &mut w).await.unwrap();
                        w.shutdown().await.unwrap();
                    }
                };
                let _ = hbone::serve_streams(s, cfg, WAIT, std::future::pending(), handler).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_api_both_sides_are_async_read_write_and_the_handler_decides_the_status() {
    let pki = Pki::new("streams", "cluster.local");
    let (addr, mut seen) = stream_server(&pki).await;
    let pool = Pool::default();
    let key = PoolKey {
        src_identity: CLIENT.parse().unwrap(),
        dst_identities: vec![SERVER.parse().unwrap()],
        dst: addr,
        src_ip: "127.0.0.1".parse().unwrap(),
    };
    let cert = Arc::new(pki.cert(CLIENT));
    let open = |authority: &str| {
        let h = headers(authority.parse().unwrap());
        let (pool, key, cert, roots) = (pool.clone(), key.clone(), cert.clone(), pki.roots.clone());
        async move {
            pool.connect_stream(&key, &cert.serial, &h, || async {
                Ok(hbone::Dialed {
                    tcp: TcpStream::connect(addr).await.unwrap(),
                    tls: tls::client_config(&cert, &roots, vec![SERVER.parse().unwrap()])?,
                })
            })
            .await
        }
    };
    // 10 MiB: more than the stream and connection windows, so the writer
    // waits for capacity and the reader must release it.
    let payload: Vec<u8> = (0..10 << 20).map(|i| (i % 251) as u8).collect();
    let mut s = open("10.0.0.9:8080").await.unwrap();
    assert_eq!(s.peer().map(ToString::to_string).as_deref(), Some(SERVER));
    let (mut r, mut w) = tokio::io::split(&mut s);
    let write = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut echo = Vec::new();
    let read = r.read_to_end(&mut echo);
    let (_, n) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("echo completes");
    assert_eq!(n.unwrap(), payload.len());
    assert!(echo == payload, "bytes intact and in order");
    let req = seen.recv().await.unwrap();
    assert_eq!(req.authority, "10.0.0.9:8080");
    assert_eq!(req.peer.to_string(), CLIENT);
    assert_eq!(req.forwarded_for(), Some("10.1.1.11".parse().unwrap()));
    assert_eq!(req.headers.get("baggage").unwrap(), "k8s.namespace.name=default");

    let e = open("10.0.0.9:1").await.err().expect("refused by the handler");
    assert!(e.to_string().contains("403"), "{e}");
    assert_eq!(pool.connections(), 1, "one pooled connection carried both");
}

/// The leaf the server presented in a handshake of `client` with `server`.
async fn presented_leaf(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> Vec<u8> {
    let (a, b) = tcp_pair().await;
    let accept = tokio::spawn(async move { tokio_rustls::TlsAcceptor::from(server).accept(a).await.map(drop) });
    let name = rustls::pki_types::ServerName::try_from("mesh").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client).connect(name, b).await.unwrap();
    accept.await.unwrap().unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn tls_configs_are_built_once_per_serial_and_a_renewed_certificate_replaces_them() {
    let pki = Pki::new("configs", "cluster.local");
    let cache = tls::Configs::new(pki.roots.clone());
    let (server_cert, client_cert) = (pki.cert(SERVER), pki.cert(CLIENT));
    let expected: Vec<SpiffeId> = vec![SERVER.parse().unwrap()];

    let s1 = cache.server(&server_cert).unwrap();
    assert!(
        Arc::ptr_eq(&s1, &cache.server(&server_cert).unwrap()),
        "same serial: built once"
    );
    let c1 = cache.client(&client_cert, &expected).unwrap();
    assert!(Arc::ptr_eq(&c1, &cache.client(&client_cert, &expected).unwrap()));
    let other_peers = cache.client(&client_cert, &[CLIENT.parse().unwrap()]).unwrap();
    assert!(!Arc::ptr_eq(&c1, &other_peers), "another peer set is another verifier");

    let renewed = pki.cert(SERVER);
    assert_ne!(renewed.serial, server_cert.serial);
    let s2 = cache.server(&renewed).unwrap();
    assert!(!Arc::ptr_eq(&s1, &s2), "a new serial builds a new config");
    assert!(Arc::ptr_eq(&s2, &cache.server(&renewed).unwrap()));

    // The cached configs handshake for real, and the renewed one presents
    // the renewed certificate.
    let leaf = presented_leaf(c1, s2).await;
    assert_eq!(Some(leaf), mesh::identity::pem_to_der(&renewed.chain[0]));
}
