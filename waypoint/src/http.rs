//! The per-request proxy. hyper serves HTTP/1.1 or h2 on the CONNECT
//! stream; every request is routed on its own (an endpoint per request),
//! checked against L4 policy with the caller's identity, and sent over its
//! own pooled HBONE stream to the endpoint (h2 upstream when the downstream
//! is h2, HTTP/1.1 otherwise). Upgrades (WebSocket) pass through.
//!
//! Routing rules (HTTPRoute, VirtualService) pick the rule, backend,
//! retries, timeouts, faults and mirrors (`forward`); bodies stream, and
//! only their first bytes are kept so that a retry or a mirror can replay
//! them (`replay`).
//!
//! Hardening: header block size and count, h2 concurrent streams and
//! reset-flood limits, header-read and idle timeouts, request framing
//! (`smuggling`), graceful drain, and a bound on replayed bodies.
mod conns;
mod forward;
mod replay;

pub use conns::Conns;
pub use forward::Budget;
use replay::Replay;
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cluster::rbac;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    accesslog::{self, Entry},
    inbound::Downstream,
    metrics::{Outcome, Peer, RequestLabels, ServiceLabels},
    route::{self, Endpoint},
    smuggling::{self, Verdicts},
    sniff::Protocol,
    trace, upstream, Waypoint,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// h2 keepalive towards the downstream (dead peers are found).
const H2_PING: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded as they are.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// One downstream HTTP connection's shared parts.
struct Conn {
    wp: Waypoint,
    down: Arc<Downstream>,
    protocol: Protocol,
    /// Requests in flight (a connection with some is never idle).
    inflight: AtomicUsize,
    /// When the last request started or ended.
    activity: Activity,
    /// HTTP/1.1 framing verdicts of the request heads, in order.
    verdicts: Verdicts,
    /// Set when a request must be the connection's last (h1).
    closing: std::sync::atomic::AtomicBool,
}

/// Serves HTTP on one CONNECT stream until the client is done, the idle
/// timeout passes, or the drain completes.
pub async fn serve<IO>(wp: Waypoint, down: Arc<Downstream>, protocol: Protocol, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = wp.limits().clone();
    let conn = Arc::new(Conn {
        wp: wp.clone(),
        down,
        protocol,
        inflight: AtomicUsize::new(0),
        activity: Activity::default(),
        verdicts: Verdicts::default(),
        closing: false.into(),
    });
    let svc = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| handle(conn.clone(), req))
    };
    match protocol {
        Protocol::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_pending_accept_reset_streams(limits.max_pending_reset_streams)
                .max_local_error_reset_streams(limits.max_local_error_resets)
                .max_header_list_size(limits.max_header_bytes as u32)
                .keep_alive_interval(H2_PING)
                .keep_alive_timeout(H2_PING_TIMEOUT);
            let c = b.serve_connection(TokioIo::new(io), svc);
            drive(c, &wp, &conn).await;
        }
        _ => {
            let io = smuggling::Guard::new(io, conn.verdicts.clone(), limits.max_header_bytes);
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes)
                .max_headers(limits.max_headers);
            let c = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
            drive(c, &wp, &conn).await;
        }
    }
}

/// hyper's connections that can say GOAWAY / close after this response.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S> Graceful for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Runs the connection; on drain or idleness asks it to finish gracefully.
async fn drive<C: Graceful>(c: C, wp: &Waypoint, conn: &Conn) {
    tokio::pin!(c);
    let drain = wp.drain().signaled();
    tokio::pin!(drain);
    let idle = idle_for(wp.limits().idle_timeout, conn);
    tokio::pin!(idle);
    let mut finishing = false;
    loop {
        tokio::select! {
            r = c.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, remote = %conn.down.remote, "HTTP connection ended with an error");
                }
                return;
            }
            () = &mut drain, if !finishing => {
                c.as_mut().graceful();
                finishing = true;
            }
            () = &mut idle, if !finishing => {
                tracing::debug!(remote = %conn.down.remote, "idle HTTP connection closed");
                c.as_mut().graceful();
                finishing = true;
            }
        }
    }
}

/// When a connection last started or finished a request (ms since
/// `base`). Requests, not bytes: h2 PINGs must not keep an idle
/// connection open.
#[derive(Clone)]
struct Activity {
    base: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: Arc::default(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Resolves once the connection has had no request in flight for
/// `timeout`.
async fn idle_for(timeout: Duration, conn: &Conn) {
    loop {
        let deadline = conn.activity.last() + timeout;
        tokio::time::sleep_until(deadline.into()).await;
        let busy = conn.inflight.load(Ordering::SeqCst) > 0;
        if !busy && conn.activity.last() + timeout <= Instant::now() {
            return;
        }
        if busy {
            // Look again one timeout later.
            conn.activity.touch();
        }
    }
}

/// Counts a request in flight until dropped.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What is known about one request, recorded once when it ends.
struct Record {
    wp: Waypoint,
    started: Instant,
    entry: Entry,
    src: Peer,
    dst: Peer,
    svc: ServiceLabels,
    request_bytes: Arc<AtomicU64>,
    /// The endpoint counts the request as active (least-connections)
    /// until it is recorded.
    active: Option<cluster::state::ActiveGuard>,
    done: bool,
}

impl Record {
    fn new(conn: &Conn, req: &Request<Incoming>) -> Self {
        let h = |n: header::HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let grpc = is_grpc(req.headers());
        let down = &conn.down;
        Record {
            wp: conn.wp.clone(),
            started: Instant::now(),
            entry: Entry {
                start_time: accesslog::now(),
                protocol: if grpc { "grpc" } else { "http" },
                method: req.method().to_string(),
                path: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                authority: authority_of(req).unwrap_or_default(),
                response_flags: "-".into(),
                downstream_remote_address: down.remote.to_string(),
                source_principal: down.caller.to_string(),
                user_agent: h(header::USER_AGENT),
                x_forwarded_for: h(header::HeaderName::from_static("x-forwarded-for")),
                connect_authority: down.authority.to_string(),
                ..Entry::default()
            },
            src: Peer::of(down.source.as_ref(), Some(down.caller.to_string())),
            dst: Peer::of(None, None),
            svc: ServiceLabels::default(),
            request_bytes: Arc::default(),
            active: None,
            done: false,
        }
    }

    /// The Service the client called, until an endpoint names its own:
    /// local answers (404 NR, faults, redirects) are labelled with it.
    fn called(&mut self, svc: Option<&ServiceLabels>) {
        if let Some(svc) = svc {
            self.entry.destination_service = svc.host.clone();
            self.svc = svc.clone();
        }
    }

    fn endpoint(&mut self, ep: &Endpoint) {
        self.entry.upstream_host = ep.addr.to_string();
        let principal = ep.workload.as_ref().map(|w| w.identity.to_string());
        self.entry.destination_principal = principal.clone().unwrap_or_default();
        self.dst = Peer::of(ep.workload.as_ref(), principal);
        if let Some(s) = &ep.service {
            self.entry.destination_service = s.hostname.clone();
            self.svc = ServiceLabels {
                host: s.hostname.clone(),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            };
        }
    }

    /// Metrics and the access-log line (once).
    fn finish(&mut self, response_bytes: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let e = &mut self.entry;
        e.bytes_received = self.request_bytes.load(Ordering::Relaxed);
        e.bytes_sent = response_bytes;
        let elapsed = self.started.elapsed();
        e.duration_ms = elapsed.as_millis() as u64;
        let labels = RequestLabels::new(
            &self.src,
            &self.dst,
            &self.svc,
            &Outcome {
                protocol: e.protocol,
                code: e.response_code,
                grpc_status: &e.grpc_status,
                flags: &e.response_flags,
            },
        );
        self.wp.metrics().request(
            &labels,
            elapsed.as_secs_f64() * 1000.0,
            e.bytes_received,
            response_bytes,
        );
        self.wp.access().log(e);
        self.active = None;
    }
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The request's authority: the URI's (h2, absolute-form), else `Host`.
pub fn authority_of<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok().map(str::to_string))
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    conn.inflight.fetch_add(1, Ordering::SeqCst);
    conn.activity.touch();
    let busy = Busy(conn.clone());
    let _active = conn.wp.budget().active();
    let mut rec = Record::new(&conn, &req);
    let resp = match proxy(&conn, req, &mut rec).await {
        Ok(resp) => resp,
        Err(local) => local.reply(&mut rec),
    };
    let mut resp = resp;
    if conn.closing.load(Ordering::SeqCst) && conn.protocol != Protocol::Http2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(observe(resp, rec, busy))
}

/// A reply made by the waypoint itself.
struct Local {
    status: StatusCode,
    flags: &'static str,
    body: String,
    /// Also close the connection (HTTP/1.1) after it.
    close: bool,
    /// For gRPC callers: this status instead of one mapped from `status`.
    grpc: Option<u32>,
}

impl Local {
    fn new(status: StatusCode, flags: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            flags,
            body: body.into(),
            close: false,
            grpc: None,
        }
    }

    fn reply(self, rec: &mut Record) -> Response<ProxyBody> {
        rec.entry.response_flags = self.flags.into();
        if rec.entry.protocol == "grpc" {
            return self.grpc_reply(rec);
        }
        rec.entry.response_code = self.status.as_u16();
        let mut b = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "text/plain");
        if self.close {
            b = b.header(header::CONNECTION, "close");
        }
        b.body(full(self.body)).expect("valid response")
    }
}

impl Local {
    /// gRPC clients read errors from `grpc-status`, not the HTTP status:
    /// a trailers-only answer, HTTP 200, the status mapped as Envoy maps
    /// its local replies.
    fn grpc_reply(self, rec: &mut Record) -> Response<ProxyBody> {
        let code = self.grpc.unwrap_or(match self.status {
            StatusCode::BAD_REQUEST => 13,                    // INTERNAL
            StatusCode::FORBIDDEN => 7,                       // PERMISSION_DENIED
            StatusCode::NOT_FOUND => 12,                      // UNIMPLEMENTED
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => 8, // RESOURCE_EXHAUSTED
            _ => 14,                                          // UNAVAILABLE
        });
        rec.entry.response_code = 200;
        rec.entry.grpc_status = code.to_string();
        let message: String = self
            .body
            .chars()
            .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
            .collect();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code.to_string())
            .header("grpc-message", message)
            .body(full(Bytes::new()))
            .expect("valid response")
    }
}

fn full(s: impl Into<Bytes>) -> ProxyBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

/// Checks, routes and forwards one request.
async fn proxy(conn: &Arc<Conn>, mut req: Request<Incoming>, rec: &mut Record) -> Result<Response<ProxyBody>, Local> {
    check(conn, &req)?;
    // One look-up of the Service called serves the labels and the routes.
    let called = called_service(conn);
    rec.called(called.as_ref());
    let sel = forward::select(conn, &req, called.as_ref().map(|s| s.host.as_str()))?;
    forward::faults(&sel, rec).await?;
    if let Some(resp) = forward::answer(conn, &sel, &req, rec) {
        return Ok(resp);
    }
    let to = forward::backend(conn, &sel)?;
    let upgrade = is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let h2 = conn.protocol == Protocol::Http2 && !upgrade;
    let out = outbound(conn, req, h2, rec, &sel)?;
    forward::mirror(conn, &sel, &out, h2);
    let sent = forward::send_with_retries(conn, &sel, to, out, h2, upgrade).await;
    if let Some(ep) = &sent.endpoint {
        rec.endpoint(ep);
    }
    let mut resp = sent.result?;
    rec.active = sent.endpoint.and_then(|e| e._active);
    rec.entry.response_code = resp.status().as_u16();
    if let Some(s) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
        rec.entry.grpc_status = s.to_string();
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = on_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            // Counted as open: a drain waits for it (up to its timeout).
            let open = conn.wp.drain().open();
            tokio::spawn(async move {
                tunnel(down, up).await;
                drop(open);
            });
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    if let Some(rule) = &sel.rule {
        rule.response_headers.apply(resp.headers_mut());
    }
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
}

/// The Service the CONNECT's VIP names now (none for pod-addressed
/// traffic, or a VIP gone since).
fn called_service(conn: &Conn) -> Option<ServiceLabels> {
    let route::Dest::Service { vip, .. } = &conn.down.dest else {
        return None;
    };
    let snap = conn.wp.state().snapshot();
    let spec = &snap.services[*snap.vips.get(&vip.ip().to_canonical())?].spec;
    Some(ServiceLabels {
        host: spec.hostname(),
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
    })
}

/// Limits and framing rules hyper does not enforce itself.
fn check(conn: &Conn, req: &Request<Incoming>) -> Result<(), Local> {
    let bad = |reason: String| {
        conn.closing.store(true, Ordering::SeqCst);
        tracing::warn!(remote = %conn.down.remote, caller = %conn.down.caller, reason = %reason, "request rejected");
        Err(Local {
            close: true,
            ..Local::new(StatusCode::BAD_REQUEST, "-", reason)
        })
    };
    if conn.protocol != Protocol::Http2 {
        if let Some(reason) = conn.verdicts.next() {
            return bad(reason);
        }
    }
    if req.headers().len() > conn.wp.limits().max_headers {
        return Err(Local::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "-",
            "too many request headers",
        ));
    }
    if let Some(reason) = smuggling::check_headers(req.headers()) {
        return bad(reason);
    }
    Ok(())
}

/// L4 policy of the endpoint's workload, with the caller's identity.
fn authorize(conn: &Conn, ep: &Endpoint) -> bool {
    let snap = conn.wp.state().snapshot();
    let c = rbac::Conn {
        principal: Some(conn.down.caller.clone()),
        src_ip: conn.down.client,
        dst_port: ep.addr.port(),
    };
    match snap.authorize(ep.addr.ip(), &c) {
        Ok(()) => true,
        Err(d) => {
            tracing::info!(caller = %conn.down.caller, endpoint = %ep.addr, reason = %d.0, "request denied by policy");
            false
        }
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for n in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// The request as sent to the endpoint: hop-by-hop headers out,
/// forwarding headers in, the rule's rewrites and header changes applied.
fn outbound(
    conn: &Conn,
    req: Request<Incoming>,
    h2: bool,
    rec: &Record,
    sel: &forward::Selected,
) -> Result<Request<Replay>, Local> {
    let rule = sel.rule.as_deref();
    let rewrite = match rule.map(|r| &r.action) {
        Some(cluster::routes::Action::Forward { rewrite, .. }) => Some(rewrite),
        _ => None,
    };
    let authority = rewrite
        .and_then(|r| r.host.clone())
        .or_else(|| authority_of(&req))
        .unwrap_or_else(|| conn.down.authority.to_string());
    let upgrade = is_upgrade(&req);
    let (mut parts, body) = req.into_parts();
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if upgrade {
        // Keep Upgrade and Connection: upgrade, drop the rest.
        let up = parts.headers.remove(header::UPGRADE);
        strip_hop_by_hop(&mut parts.headers);
        if let Some(up) = up {
            parts.headers.insert(header::UPGRADE, up);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    } else {
        strip_hop_by_hop(&mut parts.headers);
    }
    if te_trailers {
        // gRPC needs it; it is the one TE value allowed in h2.
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let path = match rewrite.and_then(|r| r.path.as_ref()) {
        Some(rw) => {
            let p = cluster::routes::rewrite_path(rw, parts.uri.path(), sel.prefix.as_deref());
            match parts.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            }
        }
        None => parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
    };
    let bad_uri = || Local::new(StatusCode::BAD_REQUEST, "-", "invalid request target");
    if h2 {
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
            .map_err(|_| bad_uri())?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = path.parse().map_err(|_| bad_uri())?;
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    trace::append_xff(&mut parts.headers, conn.down.client);
    let tp = trace::next_traceparent(parts.headers.get("traceparent"));
    if let Ok(v) = HeaderValue::from_str(&tp) {
        parts.headers.insert("traceparent", v);
    }
    if !parts.headers.contains_key("baggage") {
        if let Some(b) = &conn.down.baggage {
            parts.headers.insert("baggage", b.clone());
        }
    }
    if let Some(rule) = rule {
        rule.request_headers.apply(&mut parts.headers);
    }
    parts.extensions = http::Extensions::new();
    let body = Replay::new(body, conn.wp.limits().max_replay_body_bytes, rec.request_bytes.clone());
    Ok(Request::from_parts(parts, body))
}

/// hyper's client on an upstream stream: the connection runs in its own
/// task; the sender is kept for later requests (`conns`).
async fn handshake(io: upstream::Upstream, h2: bool, max_header_bytes: usize) -> Result<conns::Tx, hyper::Error> {
    let io = TokioIo::new(io);
    // Responses are bounded as requests are: a broken or hostile endpoint
    // cannot make the waypoint buffer an endless header block.
    if h2 {
        let (tx, c) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(max_header_bytes as u32)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = c.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(conns::Tx::H2(tx))
    } else {
        let (tx, c) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(max_header_bytes)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = c.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(conns::Tx::H1(tx))
    }
}

/// Copies an upgraded connection (WebSocket...) both ways.
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return tracing::debug!("upgrade did not complete");
    };
    let (mut d, mut u) = (TokioIo::new(down), TokioIo::new(up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

/// The response with its body observed: bytes counted, gRPC status taken
/// from trailers, the request recorded when the body ends (or is dropped:
/// the client went away, flag DC).
fn observe(resp: Response<ProxyBody>, rec: Record, busy: Busy) -> Response<ProxyBody> {
    let (parts, inner) = resp.into_parts();
    let body = Observed {
        inner,
        rec: Mutex::new(rec),
        bytes: 0,
        _busy: busy,
    };
    if body.inner.is_end_stream() {
        let mut b = body;
        b.end();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    Response::from_parts(parts, body.boxed())
}

struct Observed {
    inner: ProxyBody,
    // Mutex only for Sync (BoxBody needs Send + Sync); never contended.
    rec: Mutex<Record>,
    bytes: u64,
    _busy: Busy,
}

impl Observed {
    fn end(&mut self) {
        let bytes = self.bytes;
        self.rec.get_mut().unwrap_or_else(|e| e.into_inner()).finish(bytes);
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        let s = s.to_string();
                        self.rec.get_mut().unwrap_or_else(|e| e.into_inner()).entry.grpc_status = s;
                    }
                }
                if self.inner.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.rec
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry
                    .response_flags = "UPE".into();
                self.end();
            }
            Poll::Ready(None) => self.end(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let rec = self.rec.get_mut().unwrap_or_else(|e| e.into_inner());
        if !rec.done {
            // The response did not finish: the downstream went away.
            rec.entry.response_flags = "DC".into();
            let bytes = self.bytes;
            rec.finish(bytes);
        }
    }
}
