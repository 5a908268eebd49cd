//! The agent's HTTP endpoints, on their own thread and current-thread
//! runtime so scraping never adds data-plane latency. Each listener serves
//! only its own paths (the metrics and readiness ports are reachable from the
//! network; the config dump names every workload, policy and certificate):
//! * metrics (`/metrics`, `/stats/prometheus`), default 0.0.0.0:15020
//! * readiness (`/healthz/ready`), default 0.0.0.0:15021
//! * admin (`/config_dump`), default 127.0.0.1:15000, loopback only (`cli`
//!   refuses anything else)
//!
//! All listeners use SO_REUSEPORT so an agent can start beside the one it
//! replaces (graceful handover).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::identity::CertStore;

/// Produces the config dump (JSON) on request.
pub type DumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What `/healthz/ready` answers. Ready once capture is in place *and*
/// every enrolled pod has its certificate, or the missing one has been
/// retried for longer than `cert_bound` (then ready, degraded, so a rollout
/// is not stuck behind a CA outage; the body says which and why). Once
/// ready, a later missing certificate or an unreachable source of truth
/// only degrades it: the agent serves its last good state.
pub struct Readiness {
    ready: AtomicBool,
    /// Latched the first time the agent is fully ready.
    served: AtomicBool,
    degraded: Mutex<Option<String>>,
    certs: Option<CertStore>,
    cert_bound: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new(None, Duration::ZERO)
    }
}

impl Readiness {
    pub fn new(certs: Option<CertStore>, cert_bound: Duration) -> Self {
        Self {
            ready: AtomicBool::new(false),
            served: AtomicBool::new(false),
            degraded: Mutex::new(None),
            certs,
            cert_bound,
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_degraded(&self, why: Option<String>) {
        *self.degraded.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn answer(&self) -> (StatusCode, String) {
        let degraded = self.degraded();
        if !self.ready.load(Ordering::SeqCst) {
            let why = degraded.unwrap_or_else(|| "capture is not in place yet".into());
            return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"));
        }
        let missing = self.certs.as_ref().map(CertStore::missing).unwrap_or_default();
        let describe = |m: &crate::identity::Missing| {
            format!(
                "{} (waiting {}s, {} failed attempts{})",
                m.identity,
                m.waiting_s,
                m.failures,
                m.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )
        };
        let (overdue, waiting): (Vec<_>, Vec<_>) = missing.iter().partition(|m| m.waiting >= self.cert_bound);
        if !waiting.is_empty() && !self.served.load(Ordering::SeqCst) {
            let list: Vec<String> = waiting.iter().map(|m| describe(m)).collect();
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for workload certificates: {}\n", list.join("; ")),
            );
        }
        self.served.store(true, Ordering::SeqCst);
        let mut problems: Vec<String> = degraded.into_iter().collect();
        if !missing.is_empty() {
            let list: Vec<String> = overdue.iter().chain(&waiting).map(|m| describe(m)).collect();
            problems.push(format!("no certificate yet for {}", list.join("; ")));
        }
        match problems.is_empty() {
            true => (StatusCode::OK, "ready\n".into()),
            false => (
                StatusCode::OK,
                format!(
                    "ready (degraded: serving the last good state): {}\n",
                    problems.join("; ")
                ),
            ),
        }
    }
}

#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub ready: Arc<Readiness>,
    pub dump: DumpFn,
}

#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub admin: SocketAddr,
}

impl Admin {
    /// Binds the three listeners now (so errors surface at start) and serves
    /// them on a dedicated thread.
    pub fn start(self, addrs: Addrs) -> anyhow::Result<()> {
        let listeners = [
            (addrs.metrics, Role::Metrics),
            (addrs.readiness, Role::Readiness),
            (addrs.admin, Role::Admin),
        ]
        .into_iter()
        .map(|(addr, role)| bind(addr).map(|l| (l, role)))
        .collect::<anyhow::Result<Vec<_>>>()?;
        std::thread::Builder::new().name("admin".into()).spawn(move || {
            // Its config dumps are a large string each.
            mesh::alloc::control_thread();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            rt.block_on(async move {
                for (l, role) in listeners {
                    let l = TcpListener::from_std(l).expect("tokio listener");
                    tokio::spawn(serve(l, role, self.clone()));
                }
                std::future::pending::<()>().await;
            });
        })?;
        tracing::info!(metrics = %addrs.metrics, readiness = %addrs.readiness, admin = %addrs.admin, "admin endpoints listening");
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    s.listen(128)?;
    Ok(s.into())
}

/// Which endpoint a listener is: each serves only its own paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Metrics,
    Readiness,
    Admin,
}

/// Scrapers and probes send tiny requests; a slow or stuck client must not
/// hold a connection (and a file descriptor) for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(listener: TcpListener, role: Role, admin: Admin) {
    let mut backoff = crate::proxy::AcceptBackoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted(listener.accept().await, &format!("{role:?}")).await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(role, &admin, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 3, conn).await;
        });
    }
}

/// The response for `req` on a listener of `role`.
pub fn route<B>(role: Role, admin: &Admin, req: &Request<B>) -> Response<Full<Bytes>> {
    match (role, req.uri().path()) {
        (Role::Metrics, "/metrics" | "/stats/prometheus") => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &admin.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            }
        }
        (Role::Readiness, "/healthz/ready") => {
            let (status, body) = admin.ready.answer();
            reply(status, "text/plain", body)
        }
        (Role::Admin, "/config_dump") => {
            let body = serde_json::to_string_pretty(&(admin.dump)()).unwrap_or_default();
            // The dump's tree (a few hundred bytes per workload) is freed
            // now, on this thread, whose pages nothing else reuses soon.
            mesh::alloc::release_freed();
            reply(StatusCode::OK, "application/json", body)
        }
        (role, _) => reply(StatusCode::NOT_FOUND, "text/plain", format!("{}\n", role.paths())),
    }
}

impl Role {
    fn paths(self) -> &'static str {
        match self {
            Role::Metrics => "try /metrics or /stats/prometheus",
            Role::Readiness => "try /healthz/ready",
            Role::Admin => "try /config_dump",
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(ready: Readiness) -> Admin {
        Admin {
            registry: Arc::new(Registry::default()),
            ready: Arc::new(ready),
            dump: Arc::new(|| serde_json::json!({"secret": "every workload"})),
        }
    }

    fn get(role: Role, a: &Admin, path: &str) -> (StatusCode, String) {
        let r = route(role, a, &Request::get(path).body(()).unwrap());
        let status = r.status();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let body = rt
            .block_on(http_body_util::BodyExt::collect(r.into_body()))
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn readiness_waits_for_certificates_up_to_the_bound_then_degrades() {
        let certs = CertStore::default();
        let id = mesh::identity::SpiffeId::new("cluster.local", "default", "web");
        certs.want_for_test(&id, Duration::from_secs(0), Some("CA unreachable"));
        let ready = Readiness::new(Some(certs.clone()), Duration::from_secs(60));
        assert_eq!(ready.answer().0, StatusCode::SERVICE_UNAVAILABLE, "capture first");
        ready.set_ready(true);
        let (status, body) = ready.answer();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("waiting for workload certificates")
                && body.contains("sa/web")
                && body.contains("CA unreachable"),
            "{body}"
        );
        // Retried past the bound: ready, and the body says what is missing.
        certs.want_for_test(&id, Duration::from_secs(61), Some("CA unreachable"));
        let (status, body) = ready.answer();
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("degraded")
                && body.contains("no certificate yet for spiffe://cluster.local/ns/default/sa/web"),
            "{body}"
        );
        // Once ready, a new pod's missing certificate degrades, never un-readies.
        let other = mesh::identity::SpiffeId::new("cluster.local", "default", "api");
        certs.want_for_test(&other, Duration::from_secs(0), None);
        assert_eq!(ready.answer().0, StatusCode::OK);
    }

    #[test]
    fn each_listener_serves_only_its_own_paths() {
        let ready = Readiness::default();
        ready.set_ready(true);
        let a = admin(ready);
        for role in [Role::Metrics, Role::Readiness] {
            let (status, body) = get(role, &a, "/config_dump");
            assert_eq!(status, StatusCode::NOT_FOUND, "{role:?}");
            assert!(!body.contains("every workload"), "{role:?}: {body}");
        }
        assert_eq!(get(Role::Admin, &a, "/config_dump").0, StatusCode::OK);
        assert_eq!(get(Role::Metrics, &a, "/stats/prometheus").0, StatusCode::OK);
        assert_eq!(get(Role::Readiness, &a, "/metrics").0, StatusCode::NOT_FOUND);
        assert_eq!(get(Role::Admin, &a, "/healthz/ready").0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(Role::Readiness, &a, "/healthz/ready"),
            (StatusCode::OK, "ready\n".into())
        );
    }
}
