//! HBONE termination and per-CONNECT dispatch. Each CONNECT's `:authority`
//! must name a Service VIP:port or a workload (else 503); the stream is then
//! served as HTTP (declared, or sniffed) or forwarded as opaque TCP.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ::http::StatusCode;
use cluster::state::{State, Workload};
use mesh::{
    certs::CertStore,
    hbone::{self, Incoming},
    identity::{SpiffeId, WorkloadCert},
    pool::Pool,
    tls::{self, Roots},
};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    accesslog::AccessLog,
    config::LimitArgs,
    drain::Drain,
    http,
    metrics::Metrics,
    route::{self, Dest},
    routes::Routes,
    sniff::{self, Declared, Prefixed, Protocol},
    tcp,
};

/// Where the waypoint's own certificate comes from.
#[derive(Clone)]
pub enum Certs {
    /// Fetched from the CA and kept fresh (production).
    Store { store: CertStore, id: SpiffeId },
    /// A fixed certificate (tests, or a certificate from a file).
    Fixed(Arc<WorkloadCert>),
}

impl Certs {
    /// The certificate to present now, if there is a valid one.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        match self {
            Certs::Store { store, id } => store.get(id),
            Certs::Fixed(c) => (c.not_after > std::time::SystemTime::now()).then(|| c.clone()),
        }
    }
}

/// What the waypoint is made of.
pub struct Parts {
    pub id: SpiffeId,
    pub certs: Certs,
    pub roots: Roots,
    pub state: State,
    pub limits: LimitArgs,
    /// Port of the endpoints' HBONE listeners (15008).
    pub upstream_port: u16,
    pub metrics: Metrics,
    pub access: AccessLog,
    /// The routing rules in force.
    pub routes: Routes,
}

struct Shared {
    parts: Parts,
    pool: Pool,
    drain: Drain,
    budget: http::Budget,
    /// Upstream HTTP connections kept for later requests.
    conns: http::Conns,
    /// Mirrored requests in flight.
    mirror_slots: Arc<tokio::sync::Semaphore>,
    /// `baggage` on the waypoint's own CONNECTs.
    baggage: String,
    /// TLS configs of the current certificate (by serial).
    tls: tls::Configs,
}

/// The waypoint's data plane (cheap to clone).
#[derive(Clone)]
pub struct Waypoint(Arc<Shared>);

impl Waypoint {
    pub fn new(parts: Parts) -> Self {
        let timeouts = hbone::Timeouts::from_connect(parts.limits.connect_timeout);
        let baggage = hbone::baggage(
            "Kubernetes",
            &parts.id.namespace,
            &parts.id.service_account,
            &parts.id.service_account,
            "latest",
        );
        let mirror_slots = Arc::new(tokio::sync::Semaphore::new(parts.limits.max_mirrors_in_flight));
        Waypoint(Arc::new(Shared {
            pool: Pool::new(timeouts),
            drain: Drain::default(),
            budget: http::Budget::default(),
            conns: http::Conns::default(),
            mirror_slots,
            baggage,
            tls: tls::Configs::new(parts.roots.clone()),
            parts,
        }))
    }

    pub fn id(&self) -> &SpiffeId {
        &self.0.parts.id
    }
    pub fn certs(&self) -> &Certs {
        &self.0.parts.certs
    }
    /// TLS configs built once per certificate serial.
    pub fn tls(&self) -> &tls::Configs {
        &self.0.tls
    }
    pub fn state(&self) -> &State {
        &self.0.parts.state
    }
    pub fn limits(&self) -> &LimitArgs {
        &self.0.parts.limits
    }
    pub fn upstream_port(&self) -> u16 {
        self.0.parts.upstream_port
    }
    pub fn metrics(&self) -> &Metrics {
        &self.0.parts.metrics
    }
    pub fn access(&self) -> &AccessLog {
        &self.0.parts.access
    }
    pub fn pool(&self) -> &Pool {
        &self.0.pool
    }
    pub fn drain(&self) -> &Drain {
        &self.0.drain
    }
    pub fn baggage(&self) -> &str {
        &self.0.baggage
    }
    pub fn routes(&self) -> &Routes {
        &self.0.parts.routes
    }
    pub fn budget(&self) -> &http::Budget {
        &self.0.budget
    }
    pub fn conns(&self) -> &http::Conns {
        &self.0.conns
    }
    pub fn mirror_slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.0.mirror_slots
    }

    /// Accepts HBONE connections until draining starts, at most
    /// `max_connections` at once (further clients wait in the accept queue).
    pub async fn serve(&self, listener: TcpListener) {
        let stop = self.drain().signaled();
        tokio::pin!(stop);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.limits().max_connections));
        loop {
            let accepted = tokio::select! {
                a = async {
                    let slot = slots.clone().acquire_owned().await.expect("never closed");
                    listener.accept().await.map(|(tcp, _)| (tcp, slot))
                } => a,
                () = &mut stop => return,
            };
            match accepted {
                Ok((tcp, slot)) => {
                    let _ = tcp.set_nodelay(true);
                    let wp = self.clone();
                    tokio::spawn(async move {
                        connection(wp, tcp).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors or the like: back off, bounded.
                    tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Drains: no new connections or streams, GOAWAY on every connection,
    /// in-flight requests finish; returns when all are done or `within`
    /// has passed (then the rest is cut).
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.drain().start();
        tokio::time::timeout(within, self.drain().closed()).await.is_ok()
    }

    /// The server TLS config for the current certificate.
    fn server_tls(&self) -> Option<Arc<ServerConfig>> {
        let cert = self.certs().current()?;
        self.tls()
            .server(&cert)
            .inspect_err(|e| tracing::error!(error = %e, "cannot build the waypoint's TLS server config"))
            .ok()
    }
}

/// One HBONE connection.
async fn connection(wp: Waypoint, tcp: TcpStream) {
    let _open = wp.drain().open();
    let remote = tcp.peer_addr().ok();
    let Some(tls) = wp.server_tls() else {
        tracing::warn!(remote = ?remote, identity = %wp.id(), "no valid certificate yet; connection closed");
        return;
    };
    let drain = wp.drain().signaled();
    let handshake = wp.limits().connect_timeout;
    let per_stream = wp.clone();
    let r = hbone::serve_streams(tcp, tls, handshake, drain, move |inc| stream(per_stream.clone(), inc)).await;
    if let Err(e) = r {
        tracing::debug!(remote = ?remote, error = %e, "HBONE connection ended");
    }
}

/// The downstream side of one CONNECT, shared by its requests.
pub struct Downstream {
    /// The caller's verified identity (TLS peer).
    pub caller: SpiffeId,
    /// The TCP peer (the source agent or pod).
    pub remote: SocketAddr,
    /// The original client (from `forwarded: for=`, else the TCP peer).
    pub client: IpAddr,
    /// The source workload, when the client is a known pod.
    pub source: Option<Workload>,
    pub authority: SocketAddr,
    pub dest: Dest,
    /// The CONNECT's `baggage` (the source's peer metadata).
    pub baggage: Option<::http::HeaderValue>,
}

/// One CONNECT: find the destination, answer, then serve it.
async fn stream(wp: Waypoint, inc: Incoming) {
    let _open = wp.drain().open();
    let req = inc.request.clone();
    let Some(authority) = req.authority_addr() else {
        tracing::warn!(remote = %req.remote, authority = %req.authority, "CONNECT authority is not ip:port");
        return inc.refuse(StatusCode::BAD_REQUEST);
    };
    let Some(dest) = route::destination(wp.state(), authority) else {
        tracing::warn!(remote = %req.remote, caller = %req.peer, authority = %authority, "unknown authority: no service VIP:port or workload");
        wp.metrics().connect_refused("unknown_authority");
        return inc.refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    let client = req.forwarded_for().unwrap_or(req.remote.ip());
    let down = Arc::new(Downstream {
        caller: req.peer.clone(),
        remote: req.remote,
        client,
        source: wp.state().by_ip(client),
        authority,
        baggage: req.headers.get("baggage").cloned(),
        dest: dest.clone(),
    });
    let declared = match dest {
        Dest::Service { declared, .. } => declared,
        Dest::Workload { .. } => None,
    };
    let mut io = match inc.accept() {
        Ok(io) => io,
        Err(e) => return tracing::debug!(error = %e, "CONNECT stream reset before the answer"),
    };
    let (protocol, seen) = match declared {
        Some(Declared::Tcp) => (Protocol::Tcp, bytes::Bytes::new()),
        Some(Declared::Http2) => (Protocol::Http2, bytes::Bytes::new()),
        // Declared HTTP: h1 or h2 by the preface; a silent client meets the
        // header-read timeout (as any HTTP client would).
        Some(Declared::Http) => match sniff::sniff(&mut io, Some(wp.limits().header_read_timeout)).await {
            Ok((Protocol::Http2, seen)) => (Protocol::Http2, seen),
            Ok((_, seen)) => (Protocol::Http1, seen),
            Err(e) => return tracing::debug!(error = %e, "stream failed before its first bytes"),
        },
        None => match sniff::sniff(&mut io, Some(wp.limits().sniff_timeout)).await {
            Ok(r) => r,
            Err(e) => return tracing::debug!(error = %e, "stream failed before its first bytes"),
        },
    };
    let io = Prefixed::new(seen, io);
    match protocol {
        Protocol::Tcp => tcp::forward(wp, down, io).await,
        p => http::serve(wp, down, p, io).await,
    }
}
