//! The agent's HTTP endpoints, on their own thread and current-thread
//! runtime so scraping never adds data-plane latency:
//! * metrics (`/metrics`, `/stats/prometheus`), default 0.0.0.0:15020
//! * readiness (`/healthz/ready`), default 0.0.0.0:15021
//! * admin (`/config_dump`), default 127.0.0.1:15000, localhost only
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
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Produces the config dump (JSON) on request.
pub type DumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What `/healthz/ready` answers: ready once capture is in place; a ready
/// agent whose source of truth is unreachable stays ready (it serves its
/// last good state) and says so in the body.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    degraded: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_degraded(&self, why: Option<String>) {
        *self.degraded.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn answer(&self) -> (StatusCode, String) {
        match (self.ready.load(Ordering::SeqCst), self.degraded()) {
            (true, None) => (StatusCode::OK, "ready\n".into()),
            (true, Some(why)) => (
                StatusCode::OK,
                format!("ready (degraded: serving the last good state): {why}\n"),
            ),
            (false, Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            (false, None) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: capture is not in place yet\n".into(),
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
        let listeners = [addrs.metrics, addrs.readiness, addrs.admin].map(bind);
        let listeners: Vec<std::net::TcpListener> = listeners.into_iter().collect::<Result<_, _>>()?;
        std::thread::Builder::new().name("admin".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            rt.block_on(async move {
                for l in listeners {
                    let l = TcpListener::from_std(l).expect("tokio listener");
                    tokio::spawn(serve(l, self.clone()));
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

async fn serve(listener: TcpListener, admin: Admin) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let local = req.uri().path();
    match local {
        "/metrics" | "/stats/prometheus" => {
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
        "/healthz/ready" => {
            let (status, body) = admin.ready.answer();
            reply(status, "text/plain", body)
        }
        "/config_dump" => {
            let body = serde_json::to_string_pretty(&(admin.dump)()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz/ready or /config_dump\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}
