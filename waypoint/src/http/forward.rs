//! A request's routing rule, applied: the rule chosen (`select`), its
//! faults, redirects and direct responses (`faults`, `answer`), the
//! weighted backend (`backend`), mirrors (`mirror`), and the tries with
//! retries and timeouts (`send_with_retries`).
//!
//! Tries are tower's `Retry` around one try (`TryOnce`: pick an endpoint
//! not tried yet, check L4 policy, open the pooled HBONE stream, send),
//! with tower's `Timeout` per try when the rule sets one; the rule's
//! timeout covers every try and backoff. The retry policy is Envoy's:
//! its conditions (`RetryOn`), jittered exponential backoff from 25 ms
//! (or the route's floor) capped at 250 ms, only while the body can be
//! replayed, and within a retry budget: at most 20 % of the waypoint's
//! active requests (at least 3) may be retries at once. tower's own
//! budget (`TpsBudget`) counts retries per second, not retries in flight,
//! so the budget here is Envoy's, written as [`Budget`]; tower's
//! `ExponentialBackoff` doubles a fixed delay, not Envoy's uniform draw
//! over a doubling span, so the backoff is `Retry::backoff`.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use cluster::routes::{rewrite_path, Abort, Action, Lookup, RequestView, Retry, Rule, Target, TryOutcome};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::{authority_of, authorize, conns::Key, full, handshake, BoxError, Conn, Local, ProxyBody, Record, Replay};
use crate::{
    route::{self, Endpoint, RouteError, To},
    upstream, Waypoint,
};

/// The rule a request got.
pub struct Selected {
    /// `None`: no route is attached (to the destination itself, Istio's
    /// default retries, no timeout).
    pub rule: Option<Arc<Rule>>,
    /// What the matched path prefix was (for prefix rewrites).
    pub prefix: Option<String>,
    /// The port the request came for (the CONNECT authority's).
    pub port: u16,
}

fn draw(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random::<f64>() * 100.0 < percent)
}

/// The rule for `req`: the routes of `host`, the Service called (none
/// for pod-addressed traffic), first match.
pub fn select(conn: &Conn, req: &Request<Incoming>, host: Option<&str>) -> Result<Selected, Local> {
    let port = conn.down.authority.port();
    let Some(host) = host else {
        return Ok(Selected {
            rule: None,
            prefix: None,
            port,
        });
    };
    let table = conn.wp.routes().table();
    let authority = authority_of(req).unwrap_or_default();
    let view = RequestView::of(req, &authority, port);
    match table.lookup(host, &view) {
        Lookup::Default => Ok(Selected {
            rule: None,
            prefix: None,
            port,
        }),
        Lookup::Found(e) => Ok(Selected {
            rule: Some(e.rule.clone()),
            prefix: e.m.path.as_ref().and_then(|p| p.prefix()).map(str::to_string),
            port,
        }),
        Lookup::NoMatch => Err(Local::new(StatusCode::NOT_FOUND, "NR", "route not found")),
    }
}

/// The rule's injected delay, then its abort (each on its own draw).
pub async fn faults(sel: &Selected, rec: &mut Record) -> Result<(), Local> {
    let Some(rule) = &sel.rule else { return Ok(()) };
    if let Some((delay, p)) = rule.fault.delay {
        if draw(p) {
            tokio::time::sleep(delay).await;
            rec.entry.response_flags = "DI".into();
        }
    }
    if let Some((abort, p)) = rule.fault.abort {
        if draw(p) {
            return Err(match abort {
                Abort::Http(s) => Local::new(
                    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "FI",
                    "fault filter abort",
                ),
                Abort::Grpc(code) => Local {
                    grpc: Some(code),
                    ..Local::new(StatusCode::OK, "FI", "fault filter abort")
                },
            });
        }
    }
    Ok(())
}

/// A redirect or a direct response, answered here.
pub fn answer(conn: &Conn, sel: &Selected, req: &Request<Incoming>, rec: &mut Record) -> Option<Response<ProxyBody>> {
    let rule = sel.rule.as_ref()?;
    let (status, location, body) = match &rule.action {
        Action::Forward { .. } => return None,
        Action::Respond { status, body } => (*status, None, body.clone()),
        Action::Redirect(r) => {
            let authority = authority_of(req).unwrap_or_else(|| conn.down.authority.to_string());
            let (req_host, req_port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h.to_string(), p.parse::<u16>().ok()),
                _ => (authority.clone(), None),
            };
            let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
            let host = r.host.clone().unwrap_or(req_host);
            // A scheme change without a port goes to the scheme's port.
            let port = r.port.or(if r.scheme.is_some() { None } else { req_port });
            let default_port = match scheme.as_str() {
                "https" => 443,
                _ => 80,
            };
            let path = match &r.path {
                Some(rw) => rewrite_path(rw, req.uri().path(), sel.prefix.as_deref()),
                None => req.uri().path().to_string(),
            };
            let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
            let location = match port.filter(|p| *p != default_port) {
                Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
                None => format!("{scheme}://{host}{path}{query}"),
            };
            (r.status, Some(location), String::new())
        }
    };
    rec.entry.response_code = status;
    let mut b = Response::builder().status(status);
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        b = b.header(header::LOCATION, l);
    }
    if !body.is_empty() {
        b = b.header(header::CONTENT_TYPE, "text/plain");
    }
    b.body(full(body)).ok()
}

/// The weighted choice among the rule's backends.
pub fn backend(conn: &Conn, sel: &Selected) -> Result<To, Local> {
    let Some(Action::Forward { backends, .. }) = sel.rule.as_ref().map(|r| &r.action) else {
        return Ok(To::Dest(conn.down.dest.clone()));
    };
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return Err(Local::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "-",
            "every backend of the route has weight 0",
        ));
    }
    let mut at = rand::random_range(0..total);
    let chosen = backends
        .iter()
        .find(|b| {
            if at < b.weight as u64 {
                return true;
            }
            at -= b.weight as u64;
            false
        })
        .expect("within the total");
    to(&chosen.target, sel.port)
}

fn to(target: &Target, port: u16) -> Result<To, Local> {
    match target {
        Target::Invalid { status, reason } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let flag = if status == StatusCode::SERVICE_UNAVAILABLE {
                "NC"
            } else {
                "-"
            };
            Err(Local::new(status, flag, reason.clone()))
        }
        Target::Service { host, port: p, subset } => Ok(To::Service {
            host: host.clone(),
            port: *p,
            fallback: port,
            labels: subset.as_ref().map(|s| s.labels.clone()),
        }),
    }
}

/// Active requests and the retries among them, for the retry budget.
#[derive(Default)]
pub struct Budget {
    active: AtomicUsize,
    retrying: Arc<AtomicUsize>,
}

/// Held while a request is active.
pub struct Active<'a>(&'a Budget);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held while a retry is in flight.
pub struct RetrySlot(Arc<AtomicUsize>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Budget {
    pub const PERCENT: usize = 20;
    pub const MIN: usize = 3;

    pub fn active(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self)
    }

    /// A slot for one more retry, if the budget has one.
    pub fn try_retry(&self) -> Option<RetrySlot> {
        let cap = (self.active.load(Ordering::Relaxed) * Self::PERCENT / 100).max(Self::MIN);
        self.retrying
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < cap).then_some(n + 1))
            .ok()
            .map(|_| RetrySlot(self.retrying.clone()))
    }
}

/// Why one try failed without a response.
#[derive(Debug, thiserror::Error)]
enum TryError {
    #[error("{0}")]
    Route(RouteError),
    #[error("RBAC: access denied")]
    Denied,
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream reset before response: {0}")]
    Reset(#[source] hyper::Error),
}

/// Endpoints a request's tries used, and the last one (for its labels).
#[derive(Default)]
struct Tried {
    endpoints: Vec<IpAddr>,
    last: Option<Endpoint>,
}

/// One try: an endpoint not tried yet, L4 policy, the HBONE stream, the
/// request.
#[derive(Clone)]
struct TryOnce {
    conn: Arc<Conn>,
    to: Arc<To>,
    h2: bool,
    /// An HTTP/1.1 Upgrade: its connection is taken over, never kept.
    upgrade: bool,
    tried: Arc<Mutex<Tried>>,
}

impl TryOnce {
    async fn run(self, req: Request<Replay>) -> Result<Response<Incoming>, TryError> {
        let exclude = self.tried.lock().unwrap_or_else(|e| e.into_inner()).endpoints.clone();
        let ep = route::pick(self.conn.wp.state(), &self.to, &exclude).map_err(TryError::Route)?;
        let ok = authorize(&self.conn, &ep);
        let addr = ep.addr;
        let client = self.conn.down.client;
        let key = Key {
            endpoint: addr,
            client,
            h2: self.h2,
        };
        let result = if ok {
            self.send(&ep, &key, req).await
        } else {
            Err(TryError::Denied)
        };
        let mut t = self.tried.lock().unwrap_or_else(|e| e.into_inner());
        t.endpoints.push(addr.ip());
        t.last = Some(ep);
        result
    }

    /// On a kept connection to the endpoint if there is one (again on a
    /// new one when it turns out closed before the request was written, or
    /// closed under it while the body can be replayed), else on a new one.
    async fn send(&self, ep: &Endpoint, key: &Key, mut req: Request<Replay>) -> Result<Response<Incoming>, TryError> {
        let wp = &self.conn.wp;
        let reuse = !self.upgrade;
        if let Some(mut tx) = reuse.then(|| wp.conns().take(key)).flatten() {
            let spare = req.body().reader().and_then(|b| copy(&req, b));
            match tx.send(req).await {
                Ok(resp) => {
                    wp.conns().put(key.clone(), tx);
                    return Ok(resp);
                }
                Err(mut e) => match (e.take_message(), spare) {
                    (Some(r), _) => req = r,
                    (None, Some(r)) if r.body().replayable() => {
                        tracing::debug!(endpoint = %ep.addr, error = %e.error(), "kept upstream connection failed; once more on a new one");
                        req = r;
                    }
                    (None, _) => return Err(TryError::Reset(e.into_error())),
                },
            }
        }
        let io = upstream::open(wp, ep, SocketAddr::new(key.client, 0))
            .await
            .map_err(|e| {
                tracing::warn!(endpoint = %ep.addr, error = %e, "cannot reach the endpoint");
                TryError::Connect(e.to_string())
            })?;
        let mut tx = handshake(io, self.h2, wp.limits().max_header_bytes)
            .await
            .map_err(TryError::Reset)?;
        match tx.send(req).await {
            Ok(resp) => {
                if reuse {
                    wp.conns().put(key.clone(), tx);
                }
                Ok(resp)
            }
            Err(e) => {
                tracing::debug!(endpoint = %ep.addr, error = %e.error(), "upstream reset before the response");
                Err(TryError::Reset(e.into_error()))
            }
        }
    }
}

impl Service<Request<Replay>> for TryOnce {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Replay>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.run(req).await.map_err(BoxError::from) })
    }
}

/// How a try went, for the retry conditions (`None`: never retried).
fn classify(r: &Result<Response<Incoming>, BoxError>) -> Option<TryOutcome> {
    match r {
        Ok(resp) => Some(TryOutcome::Response {
            status: resp.status().as_u16(),
            grpc: resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse().ok()),
        }),
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => Some(TryOutcome::Timeout),
        Err(e) => match e.downcast_ref::<TryError>()? {
            TryError::Connect(_) => Some(TryOutcome::ConnectFailure),
            TryError::Reset(h) if refused(h) => Some(TryOutcome::RefusedStream),
            TryError::Reset(_) => Some(TryOutcome::Reset),
            TryError::Route(_) | TryError::Denied => None,
        },
    }
}

/// An h2 REFUSED_STREAM: the endpoint never processed the request.
fn refused(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            return h.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

fn reason(o: TryOutcome) -> &'static str {
    match o {
        TryOutcome::ConnectFailure => "connect_failure",
        TryOutcome::RefusedStream => "refused_stream",
        TryOutcome::Reset => "reset",
        TryOutcome::Timeout => "timeout",
        TryOutcome::Response { .. } => "status",
    }
}

/// Envoy's retry policy over one request's tries.
#[derive(Clone)]
struct Policy {
    retry: Retry,
    retries: u32,
    wp: Waypoint,
    /// The budget slot of the retry in flight.
    slot: Option<Arc<RetrySlot>>,
}

impl tower::retry::Policy<Request<Replay>, Response<Incoming>, BoxError> for Policy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Replay>,
        result: &mut Result<Response<Incoming>, BoxError>,
    ) -> Option<Self::Future> {
        self.slot = None;
        if self.retries >= self.retry.attempts {
            return None;
        }
        let outcome = classify(result)?;
        if !self.retry.on.retries(outcome) || !req.body().replayable() {
            return None;
        }
        let Some(slot) = self.wp.budget().try_retry() else {
            self.wp.metrics().retry_budget_exhausted();
            tracing::debug!("retry budget exhausted; not retrying");
            return None;
        };
        self.slot = Some(Arc::new(slot));
        self.retries += 1;
        self.wp.metrics().retried(reason(outcome));
        Some(tokio::time::sleep(self.retry.backoff(self.retries, rand::random())))
    }

    fn clone_request(&mut self, req: &Request<Replay>) -> Option<Request<Replay>> {
        copy(req, req.body().reader()?)
    }
}

/// The request's head with another reader of its body.
fn copy(req: &Request<Replay>, body: Replay) -> Option<Request<Replay>> {
    let mut b = Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone())
        .version(req.version());
    *b.headers_mut()? = req.headers().clone();
    b.body(body).ok()
}

/// The endpoint the answer (or the last failure) came from.
pub struct Sent {
    pub result: Result<Response<Incoming>, Local>,
    pub endpoint: Option<Endpoint>,
}

/// Sends `req` to `to` with the rule's retries and timeouts.
pub async fn send_with_retries(
    conn: &Arc<Conn>,
    sel: &Selected,
    to: To,
    req: Request<Replay>,
    h2: bool,
    upgrade: bool,
) -> Sent {
    let (retry, timeout) = match &sel.rule {
        Some(r) => (r.retry.clone(), r.timeout),
        None => (Retry::istio_default(), None),
    };
    let tried = Arc::new(Mutex::new(Tried::default()));
    let once = TryOnce {
        conn: conn.clone(),
        to: Arc::new(to),
        h2,
        upgrade,
        tried: tried.clone(),
    };
    let per_try = retry.per_try_timeout;
    let policy = Policy {
        retry,
        retries: 0,
        wp: conn.wp.clone(),
        slot: None,
    };
    let svc = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .option_layer(per_try.map(tower::timeout::TimeoutLayer::new))
        .service(once);
    let call = svc.oneshot(req);
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, call)
            .await
            .unwrap_or_else(|_| Err(Box::new(Overall))),
        None => call.await,
    };
    let mut t = tried.lock().unwrap_or_else(|e| e.into_inner());
    let retried = t.endpoints.len() > 1;
    Sent {
        result: result.map_err(|e| local(&e, retried)),
        endpoint: t.last.take(),
    }
}

/// The rule's timeout passed.
#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout")]
struct Overall;

/// The local reply for a request whose tries failed.
fn local(e: &BoxError, retried: bool) -> Local {
    let urx = |f: &'static str, with: &'static str| if retried { with } else { f };
    if e.is::<Overall>() || e.is::<tower::timeout::error::Elapsed>() {
        return Local::new(StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout");
    }
    match e.downcast_ref::<TryError>() {
        Some(TryError::Route(r)) => {
            let status = match r {
                RouteError::NoRoute(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Local::new(status, r.flag(), r.to_string())
        }
        Some(TryError::Denied) => Local::new(StatusCode::FORBIDDEN, "-", "RBAC: access denied"),
        Some(e @ TryError::Connect(_)) => {
            Local::new(StatusCode::SERVICE_UNAVAILABLE, urx("UF", "UF,URX"), e.to_string())
        }
        Some(e @ TryError::Reset(_)) => Local::new(StatusCode::SERVICE_UNAVAILABLE, urx("UC", "UC,URX"), e.to_string()),
        None => Local::new(StatusCode::SERVICE_UNAVAILABLE, "UC", e.to_string()),
    }
}

/// Copies of the request to the rule's mirrors, fire-and-forget: the
/// primary never waits for them and never fails because of them.
pub fn mirror(conn: &Arc<Conn>, sel: &Selected, req: &Request<Replay>, h2: bool) {
    let Some(rule) = &sel.rule else { return };
    for m in &rule.mirrors {
        if !draw(m.percent) {
            continue;
        }
        let metrics = conn.wp.metrics();
        let Ok(to) = to(&m.target, sel.port) else {
            metrics.mirrored("failed");
            continue;
        };
        let Some(body) = req.body().reader() else {
            metrics.mirrored("skipped_body");
            continue;
        };
        let Ok(slot) = conn.wp.mirror_slots().clone().try_acquire_owned() else {
            metrics.mirrored("skipped_busy");
            continue;
        };
        let Some(mut copy) = copy(req, body) else { continue };
        shadow(&mut copy);
        let once = TryOnce {
            conn: conn.clone(),
            to: Arc::new(to),
            h2,
            upgrade: false,
            tried: Arc::default(),
        };
        let (wp, within) = (conn.wp.clone(), conn.wp.limits().mirror_timeout);
        tokio::spawn(async move {
            let r = tokio::time::timeout(within, async move {
                let resp = once.run(copy).await.ok()?;
                // Read the answer to its end so the stream is reused.
                http_body_util::BodyExt::collect(resp.into_body()).await.ok()
            })
            .await;
            wp.metrics()
                .mirrored(if matches!(r, Ok(Some(_))) { "sent" } else { "failed" });
            drop(slot);
        });
    }
}

/// `-shadow` appended to the host, as Envoy names mirrored requests.
fn shadow(req: &mut Request<Replay>) {
    let add = |a: &str| match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => format!("{h}-shadow:{p}"),
        _ => format!("{a}-shadow"),
    };
    if let Some(a) = req.uri().authority() {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = add(a.as_str()).parse().ok();
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
    if let Some(h) = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()) {
        if let Ok(v) = HeaderValue::from_str(&add(h)) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}
