//! Istio's standard request metrics, reported as `reporter="waypoint"`, so
//! Istio's Grafana dashboards and Kiali work unchanged:
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (histograms with Envoy's
//! default buckets, which Istio uses for all four) and, for opaque TCP,
//! `istio_tcp_*`. Plus `waypoint_connect_refused_total{reason}`,
//! `waypoint_retries_total{reason}`, `waypoint_retry_budget_exhausted_total`
//! and `waypoint_mirrors_total{reason}`.
use cluster::state::Workload;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Envoy's default histogram buckets (ms for durations, bytes for sizes).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

pub const REPORTER: &str = "waypoint";
/// Istio's default cluster id.
pub const CLUSTER: &str = "Kubernetes";
const UNKNOWN: &str = "unknown";

/// Istio's standard label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// A workload as the labels name it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Peer {
    /// Istio's derivation: workload name, `app`/`version` labels, canonical
    /// name/revision labels falling back to those.
    pub fn of(w: Option<&Workload>, principal: Option<String>) -> Self {
        let principal = principal.unwrap_or_else(|| UNKNOWN.into());
        let Some(w) = w else {
            return Peer {
                workload: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                principal,
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                cluster: UNKNOWN.into(),
            };
        };
        let name = w.key.split_once('/').map_or(&*w.key, |(_, n)| n).to_string();
        let label = |k: &str| w.labels.get(k).cloned();
        let app = label("app").unwrap_or_else(|| UNKNOWN.into());
        let version = label("version").unwrap_or_else(|| UNKNOWN.into());
        Peer {
            canonical_service: label("service.istio.io/canonical-name")
                .or_else(|| label("app"))
                .unwrap_or_else(|| name.clone()),
            canonical_revision: label("service.istio.io/canonical-revision")
                .or_else(|| label("version"))
                .unwrap_or_else(|| "latest".into()),
            workload: label("app").unwrap_or(name),
            namespace: w.identity.namespace.to_string(),
            principal,
            app,
            version,
            cluster: CLUSTER.into(),
        }
    }
}

/// The destination Service as the labels name it (`unknown` when the
/// traffic was addressed to a workload).
#[derive(Clone, Debug)]
pub struct ServiceLabels {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        Self {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

/// The outcome of one request.
pub struct Outcome<'a> {
    pub protocol: &'static str,
    pub code: u16,
    pub grpc_status: &'a str,
    pub flags: &'a str,
}

impl RequestLabels {
    pub fn new(src: &Peer, dst: &Peer, svc: &ServiceLabels, o: &Outcome) -> Self {
        RequestLabels {
            reporter: REPORTER,
            source_workload: src.workload.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: src.principal.clone(),
            source_app: src.app.clone(),
            source_version: src.version.clone(),
            source_canonical_service: src.canonical_service.clone(),
            source_canonical_revision: src.canonical_revision.clone(),
            source_cluster: src.cluster.clone(),
            destination_workload: dst.workload.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            destination_principal: dst.principal.clone(),
            destination_app: dst.app.clone(),
            destination_version: dst.version.clone(),
            destination_service: svc.host.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            destination_canonical_service: dst.canonical_service.clone(),
            destination_canonical_revision: dst.canonical_revision.clone(),
            destination_cluster: dst.cluster.clone(),
            request_protocol: o.protocol,
            response_code: o.code.to_string(),
            grpc_response_status: o.grpc_status.to_string(),
            response_flags: o.flags.to_string(),
            connection_security_policy: "mutual_tls",
        }
    }
}

/// Istio's TCP label set: the request set without `response_code` and
/// `grpc_response_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

impl From<RequestLabels> for TcpLabels {
    fn from(r: RequestLabels) -> Self {
        TcpLabels {
            reporter: r.reporter,
            source_workload: r.source_workload,
            source_workload_namespace: r.source_workload_namespace,
            source_principal: r.source_principal,
            source_app: r.source_app,
            source_version: r.source_version,
            source_canonical_service: r.source_canonical_service,
            source_canonical_revision: r.source_canonical_revision,
            source_cluster: r.source_cluster,
            destination_workload: r.destination_workload,
            destination_workload_namespace: r.destination_workload_namespace,
            destination_principal: r.destination_principal,
            destination_app: r.destination_app,
            destination_version: r.destination_version,
            destination_service: r.destination_service,
            destination_service_name: r.destination_service_name,
            destination_service_namespace: r.destination_service_namespace,
            destination_canonical_service: r.destination_canonical_service,
            destination_canonical_revision: r.destination_canonical_revision,
            destination_cluster: r.destination_cluster,
            request_protocol: r.request_protocol,
            response_flags: r.response_flags,
            connection_security_policy: r.connection_security_policy,
        }
    }
}

type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
    tcp: mesh::metrics::IstioTcp<TcpLabels>,
    refused: Family<ReasonLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Counter,
    mirrors: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Registers under `istio_` and `waypoint_` (counters get `_total`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            request_bytes: Family::new_with_constructor(histogram),
            response_bytes: Family::new_with_constructor(histogram),
            tcp: mesh::metrics::IstioTcp::register(registry),
            refused: Family::default(),
            retries: Family::default(),
            budget_exhausted: Counter::default(),
            mirrors: Family::default(),
        };
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests", m.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            m.duration.clone(),
        );
        istio.register("request_bytes", "Request body sizes in bytes", m.request_bytes.clone());
        istio.register(
            "response_bytes",
            "Response body sizes in bytes",
            m.response_bytes.clone(),
        );
        registry.sub_registry_with_prefix("waypoint").register(
            "connect_refused",
            "HBONE CONNECTs the waypoint refused, by reason",
            m.refused.clone(),
        );
        let wp = registry.sub_registry_with_prefix("waypoint");
        wp.register(
            "retries",
            "Requests retried, by the condition of the failed try (connect_failure, reset, refused_stream, timeout, status)",
            m.retries.clone(),
        );
        wp.register(
            "retry_budget_exhausted",
            "Retries not made because 20% of active requests (at least 3) were retries already",
            m.budget_exhausted.clone(),
        );
        wp.register(
            "mirrors",
            "Mirrored requests by outcome (sent, failed, skipped_busy, skipped_body)",
            m.mirrors.clone(),
        );
        m
    }

    pub fn retried(&self, reason: &'static str) {
        self.retries.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn retry_budget_exhausted(&self) {
        self.budget_exhausted.inc();
    }

    pub fn mirrored(&self, outcome: &'static str) {
        self.mirrors.get_or_create(&ReasonLabels { reason: outcome }).inc();
    }

    /// One finished request.
    pub fn request(&self, l: &RequestLabels, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.get_or_create(l).inc();
        self.duration.get_or_create(l).observe(duration_ms);
        self.request_bytes.get_or_create(l).observe(request_bytes as f64);
        self.response_bytes.get_or_create(l).observe(response_bytes as f64);
    }

    pub fn tcp_opened(&self, l: &TcpLabels) {
        self.tcp.opened(l);
    }

    pub fn tcp_closed(&self, l: &TcpLabels, request_bytes: u64, response_bytes: u64) {
        self.tcp.closed(l, request_bytes, response_bytes);
    }

    pub fn connect_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Serves `/metrics` and `/stats/prometheus` (the registry, if given: the
/// status port serves readiness only) and `/healthz/ready` (200 when
/// `ready()`), HTTP/1.1, until the task ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Option<std::sync::Arc<Registry>>,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) {
    use http_body_util::Full;
    use hyper::{body::Bytes, Response, StatusCode};
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (registry, ready) = (registry.clone(), ready.clone());
            async move {
                let (status, body) = match req.uri().path() {
                    "/metrics" | "/stats/prometheus" if registry.is_some() => {
                        let mut out = String::new();
                        let registry = registry.as_deref().expect("checked");
                        match prometheus_client::encoding::text::encode(&mut out, registry) {
                            Ok(()) => (StatusCode::OK, out),
                            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                        }
                    }
                    "/healthz/ready" if ready() => (StatusCode::OK, "ready\n".into()),
                    "/healthz/ready" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no certificate for the waypoint's identity yet\n".into(),
                    ),
                    _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                };
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(body)))
                    .expect("valid response");
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = b.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
        });
    }
}
