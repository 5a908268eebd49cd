//! HBONE over real TLS on loopback sockets: identities verified both ways,
//! CONNECT answered only after the destination side accepts, bytes intact.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use mesh::{
    ca::{CaFiles, Signer},
    hbone::{self, ConnectHeaders, Inbound, Refusal},
    identity::{new_csr, SpiffeId, WorkloadCert},
    tls::{self, Roots},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
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
async fn hbone_server(pki: &Pki, cert: &str, refuse: Option<u16>) -> (SocketAddr, mpsc::UnboundedReceiver<Inbound>) {
    let (addr, rx, _) = counting_server(pki, cert, refuse).await;
    (addr, rx)
}

/// Also counts the TCP connections it accepted.
async fn counting_server(
    pki: &Pki,
    cert: &str,
    refuse: Option<u16>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Inbound>, Arc<AtomicUsize>) {
    let cfg = tls::server_config(&pki.cert(cert), &pki.roots).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (cfg, tx) = (cfg.clone(), tx.clone());
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
                                .map(|s| (s, ()))
                                .map_err(|e| Refusal {
                                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                                    reason: e.to_string(),
                                }),
                        }
                    }
                };
                let _ = hbone::serve(s, cfg, open, |_, _| {}).await;
            });
        }
    });
    (addr, rx, accepted)
}

/// A local TCP pair: (the side the tunnel bridges, the "application client").
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (ours, _) = l.accept().await.unwrap();
    (ours, app)
}

async fn dial(
    pki: &Pki,
    client: &str,
    server: SocketAddr,
    expect: &str,
    authority: SocketAddr,
) -> Result<hbone::Tunnel, hbone::HboneError> {
    let cfg = tls::client_config(&pki.cert(client), &pki.roots, vec![expect.parse().unwrap()]).unwrap();
    let headers = ConnectHeaders {
        authority,
        client: "10.1.1.11:40000".parse().unwrap(),
        baggage: "k8s.namespace.name=default".into(),
    };
    hbone::connect(TcpStream::connect(server).await.unwrap(), cfg, &headers).await
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_half_close_and_identities() {
    let pki = Pki::new("ok", "cluster.local");
    let app = echo_app().await;
    let (server, mut seen) = hbone_server(&pki, SERVER, None).await;
    let tunnel = dial(&pki, CLIENT, server, SERVER, app).await.unwrap();
    assert_eq!(tunnel.peer.as_ref().map(ToString::to_string).as_deref(), Some(SERVER));
    let inbound = seen.recv().await.unwrap();
    assert_eq!(
        inbound.peer.to_string(),
        CLIENT,
        "the destination side knows the client"
    );
    assert_eq!(inbound.authority, app);
    assert_eq!(inbound.forwarded_for.as_deref(), Some("for=\"10.1.1.11:40000\""));

    let (ours, mut client) = tcp_pair().await;
    let bridge = tokio::spawn(tunnel.bridge(ours));
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
    let (server, _seen) = hbone_server(&pki, "spiffe://cluster.local/ns/default/sa/impostor", None).await;
    let err = dial(&pki, CLIENT, server, SERVER, echo_app().await)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("expected one of") && err.contains("impostor"), "{err}");
}

#[tokio::test]
async fn server_rejects_clients_of_another_root_or_trust_domain() {
    let pki = Pki::new("srv", "cluster.local");
    let (server, mut seen) = hbone_server(&pki, SERVER, None).await;
    // Another root: the handshake fails (client certificate not trusted).
    let rogue = Pki::new("rogue", "cluster.local");
    let cfg = tls::client_config(&rogue.cert(CLIENT), &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    let headers = ConnectHeaders {
        authority: echo_app().await,
        client: "10.0.0.1:1".parse().unwrap(),
        baggage: String::new(),
    };
    assert!(hbone::connect(TcpStream::connect(server).await.unwrap(), cfg, &headers)
        .await
        .is_err());
    // Same root, other trust domain.
    let other = pki.cert("spiffe://other.domain/ns/default/sa/client");
    let cfg = tls::client_config(&other, &pki.roots, vec![SERVER.parse().unwrap()]).unwrap();
    assert!(hbone::connect(TcpStream::connect(server).await.unwrap(), cfg, &headers)
        .await
        .is_err());
    assert!(seen.try_recv().is_err(), "no CONNECT may reach the destination side");
}

#[tokio::test]
async fn refusals_are_answered_with_their_status() {
    let pki = Pki::new("deny", "cluster.local");
    let (server, _seen) = hbone_server(&pki, SERVER, Some(401)).await;
    let err = dial(&pki, CLIENT, server, SERVER, echo_app().await)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("401"), "{err}");
    // Upstream unreachable: 503.
    let (server, _seen) = hbone_server(&pki, SERVER, None).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = dial(&pki, CLIENT, server, SERVER, closed)
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

#[test]
fn keys_and_configs_are_tls13_only_with_h2() {
    let pki = Pki::new("cfg", "cluster.local");
    let c = tls::client_config(&pki.cert(CLIENT), &pki.roots, vec![]).unwrap();
    assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
    assert!(!c.enable_sni);
    let s = tls::server_config(&pki.cert(SERVER), &pki.roots).unwrap();
    assert_eq!(s.alpn_protocols, vec![b"h2".to_vec()]);
    let _ = Arc::clone(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_multiplexes_streams_dials_once_and_respects_rotation() {
    use mesh::pool::{Pool, PoolKey};
    let pki = Pki::new("pool", "cluster.local");
    let app = echo_app().await;
    let (server, _seen, accepted) = counting_server(&pki, SERVER, None).await;
    let pool = Pool::default();
    let key = PoolKey {
        src_identity: CLIENT.parse().unwrap(),
        dst_identities: vec![SERVER.parse().unwrap()],
        dst: server,
        src_ip: "127.0.0.1".parse().unwrap(),
    };
    let cert = Arc::new(pki.cert(CLIENT));
    let headers = ConnectHeaders {
        authority: app,
        client: "10.0.0.1:1".parse().unwrap(),
        baggage: String::new(),
    };
    let open = |serial: String, cert: Arc<WorkloadCert>| {
        let (pool, key, headers, roots) = (pool.clone(), key.clone(), headers.clone(), pki.roots.clone());
        async move {
            pool.connect(&key, &serial, &headers, || async move {
                let tls = tls::client_config(&cert, &roots, vec![SERVER.parse().unwrap()])?;
                Ok(hbone::Dialed {
                    tcp: TcpStream::connect(server).await.unwrap(),
                    tls,
                })
            })
            .await
        }
    };
    // 50 concurrent first connects: one handshake, 50 streams.
    let tunnels = futures_join_all((0..50).map(|_| open(cert.serial.clone(), cert.clone()))).await;
    assert!(tunnels.iter().all(Result::is_ok));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
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
    let more = futures_join_all((0..100).map(|_| open(cert.serial.clone(), cert.clone()))).await;
    assert!(more.iter().all(Result::is_ok));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "100 streams per connection");
    // A rotated certificate takes a new connection; old ones keep their streams.
    let rotated = Arc::new(pki.cert(CLIENT));
    let (t, _g) = open(rotated.serial.clone(), rotated.clone()).await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // The streams still carry bytes.
    let (ours, mut app_client) = tcp_pair().await;
    let bridge = tokio::spawn(t.bridge(ours));
    app_client.write_all(b"pooled").await.unwrap();
    app_client.shutdown().await.unwrap();
    let mut echo = Vec::new();
    app_client.read_to_end(&mut echo).await.unwrap();
    assert_eq!(echo, b"pooled");
    drop(app_client);
    assert_eq!(bridge.await.unwrap().result, "ok");
    assert_eq!(pool.connections(), 3);
}

/// Runs futures concurrently (no extra dependency for join_all).
async fn futures_join_all<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
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
