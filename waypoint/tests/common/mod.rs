//! The world the waypoint tests run in: the waypoint with real TLS, real
//! HBONE and the real proxy; clients open HBONE CONNECTs to it (as a
//! source agent does); the "pods" behind it are HBONE servers (the
//! destination agent's role, `mesh::hbone::serve`) in front of the
//! testbed's echo backend, counting keyed requests in one [`Counters`].
#![allow(dead_code, unused_imports)]
pub use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use bytes::Bytes;
pub use cluster::{
    config::{LocalConfig, PodSpec, ServicePort, ServiceSpec},
    state::State,
};
pub use http::{Request, Response, StatusCode};
pub use http_body_util::{BodyExt, Full};
pub use hyper::body::Incoming;
pub use hyper_util::rt::{TokioExecutor, TokioIo};
pub use mesh::{
    ca::{CaFiles, Signer},
    hbone::{self, ConnectHeaders, HboneError, Inbound, Refusal, Tunnel},
    identity::{new_csr, SpiffeId, WorkloadCert},
    tls::{self, Roots},
};
pub use prometheus_client::registry::Registry;
pub use testbed::echo::{Counters, Echoed};
pub use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
pub use waypoint::{
    accesslog::AccessLog,
    config::LimitArgs,
    inbound::{Certs, Parts},
    metrics::Metrics,
    routes::{RouteMetrics, RouteSource, Routes},
    Waypoint,
};

pub const TD: &str = "cluster.local";
pub const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/web-waypoint";
pub const WAIT: Duration = Duration::from_secs(10);
/// The web Service: VIP, port (undeclared), port declared HTTP, port
/// declared TCP, and the pods' target port.
pub const VIP: &str = "10.96.0.10";
pub const TARGET: u16 = 8080;
/// The client pod's address (`forwarded: for=`).
pub const CLIENT_IP: &str = "10.1.1.11";

pub struct Pki {
    pub signer: Signer,
    pub roots: Roots,
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("waypoint-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = CaFiles::new(&dir);
        files.init(TD, &[]).unwrap();
        let signer = Signer::load(&files, Duration::from_secs(3600)).unwrap();
        let roots = Roots::from_pem(&std::fs::read_to_string(files.root_cert()).unwrap()).unwrap();
        Pki { signer, roots, dir }
    }

    pub fn cert(&self, id: &str) -> WorkloadCert {
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

/// What a pod's HBONE server saw: (authority, caller identity).
pub type Seen = Arc<Mutex<Vec<(SocketAddr, String)>>>;

/// A backend pod: the echo backend behind an HBONE server on `ip:port`.
pub async fn pod(pki: &Pki, ip: IpAddr, port: u16, name: &str, seen: Seen) -> std::io::Result<u16> {
    pod_counting(pki, ip, port, name, seen, Counters::default()).await
}

/// As [`pod`], its echo backend counting keyed requests in `counters`.
pub async fn pod_counting(
    pki: &Pki,
    ip: IpAddr,
    port: u16,
    name: &str,
    seen: Seen,
    counters: Counters,
) -> std::io::Result<u16> {
    let echo = testbed::echo::spawn_counting("127.0.0.1:0".parse().unwrap(), name, counters).await?;
    hbone_pod(pki, ip, port, name, seen, echo).await
}

/// An HBONE server on `ip:port` (identity `sa/<name>`) that carries
/// CONNECTs for port TARGET to `backend`.
pub async fn hbone_pod(
    pki: &Pki,
    ip: IpAddr,
    port: u16,
    name: &str,
    seen: Seen,
    echo: SocketAddr,
) -> std::io::Result<u16> {
    let l = TcpListener::bind((ip, port)).await?;
    let port = l.local_addr()?.port();
    let cfg = tls::server_config(&pki.cert(&format!("spiffe://{TD}/ns/default/sa/{name}")), &pki.roots).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (cfg, seen) = (cfg.clone(), seen.clone());
            tokio::spawn(async move {
                let open = move |i: Inbound| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push((i.authority, i.peer.to_string()));
                        if i.authority.port() != TARGET {
                            return Err(Refusal {
                                status: StatusCode::SERVICE_UNAVAILABLE,
                                reason: "no such port".into(),
                            });
                        }
                        TcpStream::connect(echo)
                            .await
                            .map(|s| (s, mesh::splice::Hooks::default(), ()))
                            .map_err(|e| Refusal {
                                status: StatusCode::SERVICE_UNAVAILABLE,
                                reason: e.to_string(),
                            })
                    }
                };
                let _ = hbone::serve(s, cfg, WAIT, std::future::pending(), open, |_, _| {}).await;
            });
        }
    });
    Ok(port)
}

pub fn pod_spec(name: &str, ip: &str, sa: &str, app: &str) -> PodSpec {
    PodSpec {
        uid: None,
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        node: "node1".into(),
        netns: None,
        cgroup: None,
        ips: vec![ip.parse().unwrap()],
        labels: std::sync::Arc::new(
            BTreeMap::from([("app".to_string(), app.to_string()), ("version".into(), "v1".into())]).into(),
        ),
        healthy: true,
        tunnel: Default::default(),
    }
}

pub fn port(port: u16, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        port,
        target_port: TARGET,
        name: None,
        app_protocol: app_protocol.map(str::to_string),
    }
}

/// The cluster: pods web-a, web-b (127.0.0.2, .3) behind Service web, and
/// the client pod; `extra` edits it.
pub fn cluster(extra: impl FnOnce(&mut LocalConfig)) -> LocalConfig {
    let mut c = LocalConfig {
        pods: vec![
            pod_spec("web-a", "127.0.0.2", "web-a", "web"),
            pod_spec("web-b", "127.0.0.3", "web-b", "web"),
            pod_spec("client", CLIENT_IP, "client", "client"),
        ],
        services: vec![ServiceSpec {
            name: "web".into(),
            namespace: "default".into(),
            hostname: None,
            vips: vec![VIP.parse().unwrap()],
            ports: vec![
                port(80, None),
                port(81, Some("http")),
                port(82, Some("tcp")),
                port(83, Some("grpc")),
            ],
            selector: std::sync::Arc::new(BTreeMap::from([("app".to_string(), "web".to_string())]).into()),
            endpoints: None,
            load_balancing: Default::default(),
            subject_alt_names: vec![],
            labels: Default::default(),
        }],
        ..LocalConfig::default()
    };
    extra(&mut c);
    c
}

pub struct World {
    pub pki: Pki,
    pub wp: Waypoint,
    pub addr: SocketAddr,
    pub state: State,
    pub registry: Registry,
    pub access: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<String>>>,
    /// Every CONNECT the pods saw.
    pub seen: Seen,
    /// Keyed requests the pods' echo backends saw (`?key=`).
    pub counters: Counters,
    pub routes: RouteSource,
    /// The port every pod's HBONE server listens on.
    pub upstream_port: u16,
}

impl World {
    pub async fn new(tag: &str, limits: LimitArgs) -> World {
        Self::with(tag, limits, |_| {}).await
    }

    pub async fn with(tag: &str, limits: LimitArgs, edit: impl FnOnce(&mut LocalConfig)) -> World {
        let pki = Pki::new(tag);
        let seen: Seen = Arc::default();
        let counters = Counters::default();
        // Both pods listen on one port (the waypoint dials ip:port for every
        // endpoint, as it dials ip:15008 in a cluster).
        let mut upstream_port = 0;
        for _ in 0..20 {
            let p = pod_counting(
                &pki,
                "127.0.0.2".parse().unwrap(),
                0,
                "web-a",
                seen.clone(),
                counters.clone(),
            )
            .await
            .unwrap();
            if pod_counting(
                &pki,
                "127.0.0.3".parse().unwrap(),
                p,
                "web-b",
                seen.clone(),
                counters.clone(),
            )
            .await
            .is_ok()
            {
                upstream_port = p;
                break;
            }
        }
        assert_ne!(upstream_port, 0, "no common port for both pods");
        let state = State::default();
        state.update(&cluster(edit), TD);
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (access, lines) = AccessLog::channel();
        let routes = Routes::default();
        let route_source = RouteSource::new(
            Some(("default".into(), "web-waypoint".into())),
            routes.clone(),
            RouteMetrics::register(&mut registry),
        );
        let wp = Waypoint::new(Parts {
            id: WAYPOINT.parse().unwrap(),
            certs: Certs::Fixed(Arc::new(pki.cert(WAYPOINT))),
            roots: pki.roots.clone(),
            state: state.clone(),
            limits,
            upstream_port,
            metrics,
            access,
            routes,
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn({
            let wp = wp.clone();
            async move { wp.serve(l).await }
        });
        World {
            pki,
            wp,
            addr,
            state,
            registry,
            access: Arc::new(std::sync::Mutex::new(lines)),
            seen,
            counters,
            routes: route_source,
            upstream_port,
        }
    }

    /// Puts these route documents in force (as the routes file would).
    pub fn set_routes(&mut self, yaml: &str) {
        self.routes.load_text(yaml).unwrap()
    }

    /// A CONNECT to the waypoint for `authority`, as the client's agent.
    pub async fn connect(&self, authority: &str) -> Result<Tunnel, HboneError> {
        let cfg = tls::client_config(&self.pki.cert(CLIENT), &self.pki.roots, vec![WAYPOINT.parse().unwrap()]).unwrap();
        let headers = ConnectHeaders {
            authority: authority.parse().unwrap(),
            client: format!("{CLIENT_IP}:40000").parse().unwrap(),
            baggage: hbone::baggage("Kubernetes", "default", "client", "client", "v1"),
        };
        hbone::connect(TcpStream::connect(self.addr).await.unwrap(), cfg, &headers).await
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// The next access-log line.
    pub async fn access_line(&mut self) -> serde_json::Value {
        let rx = self.access.clone();
        let line = tokio::task::spawn_blocking(move || rx.lock().unwrap().recv_timeout(WAIT))
            .await
            .unwrap()
            .expect("an access-log line");
        serde_json::from_str(&line).unwrap()
    }
}

pub fn vip(port: u16) -> String {
    format!("{VIP}:{port}")
}

pub type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
pub type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

pub async fn h1(t: Tunnel) -> H1 {
    let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(t)).await.unwrap();
    tokio::spawn(c.with_upgrades());
    tx
}

pub async fn h2(t: Tunnel) -> H2 {
    let (tx, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(t))
        .await
        .unwrap();
    tokio::spawn(c);
    tx
}

/// hyper's client needs the connection ready again between keep-alive
/// requests.
pub async fn send<T: Sender>(tx: &mut T, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
    tx.send(req).await
}

pub trait Sender {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>>;
}

impl Sender for H1 {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.ready().await?;
        self.send_request(req).await
    }
}

impl Sender for H2 {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.ready().await?;
        self.send_request(req).await
    }
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", "web.default.svc.cluster.local")
        .body(Full::default())
        .unwrap()
}

pub async fn json(resp: Response<Incoming>) -> (StatusCode, Echoed) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body))),
    )
}

pub async fn text(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `cond` (a counter or state the code under test changes) until true.
pub async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs a test inside a network namespace of its own (this thread's, with
/// loopback up): every address the test uses is its own, and the
/// namespace goes away with the thread.
pub fn in_netns<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (run the tests as root)");
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2)");
    assert!(up.success(), "ip link set lo up");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f());
}

/// One client connection through the waypoint, HTTP/1.1 keep-alive or h2.
pub enum Client {
    H1(H1),
    H2(H2),
}

impl Client {
    pub async fn open(w: &World, authority: &str, h2: bool) -> Client {
        let t = w.connect(authority).await.unwrap();
        if h2 {
            Client::H2(self::h2(t).await)
        } else {
            Client::H1(h1(t).await)
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        match self {
            Client::H1(tx) => Sender::send(tx, req).await,
            Client::H2(tx) => Sender::send(tx, req).await,
        }
        .unwrap()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Client::H1(_) => "HTTP/1.1",
            Client::H2(_) => "h2",
        }
    }
}
