//! The echo backend for L7 tests (waypoint, routing): HTTP/1.1 and h2 on one
//! port (auto-detected), answering each request with the request as JSON
//! ([`Echoed`]: pod, method, path, host, headers...), plus a gRPC echo
//! service on the same port and a small gRPC client.
//!
//! * `/status/NNN` answers status NNN.
//! * `/bytes/N` answers N bytes of `x` (at most [`MAX_BYTES`]) instead of
//!   the JSON, as httpbin's `/bytes/N`: a response of a known size that
//!   costs the backend no serialising (the L7 benchmark asks for 1 KB).
//! * `?delay=<ms>` waits that long first (at most [`MAX_DELAY`]).
//! * `?fail=<n>&key=<k>` answers 503 (or `&fail_status=NNN`) to the first
//!   n requests with key k, then 200 ("fail N times then succeed", for
//!   retry tests). Backends spawned with one [`Counters`] share the count,
//!   so "N times" holds across a Service's pods; every request with a key
//!   is counted there (`hits`).
//! * A request with `Upgrade` (WebSocket) gets 101 and then an echo of the
//!   raw bytes.
//! * Request bodies are read (at most [`MAX_BODY`]) and counted.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};

pub mod pb {
    tonic::include_proto!("mesh.echo");
}

/// Longest `?delay=` honoured.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Largest request body read.
pub const MAX_BODY: usize = 16 << 20;
/// Largest `/bytes/N` answered.
pub const MAX_BYTES: usize = 16 << 20;

/// What the backend answers: the request it saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Echoed {
    pub pod: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Header name -> values (in order).
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_bytes: usize,
}

impl Echoed {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.first()).map(String::as_str)
    }
}

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Requests per `?key=`.
#[derive(Clone, Default)]
pub struct Counters(Arc<Mutex<HashMap<String, Count>>>);

#[derive(Default)]
struct Count {
    failed: u32,
    hits: u32,
    /// The `Host` of each request (the first 100).
    hosts: Vec<String>,
    /// The pod that answered each request (the first 100).
    pods: Vec<String>,
}

impl Counters {
    /// Requests seen with `key`.
    pub fn hits(&self, key: &str) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map_or(0, |c| c.hits)
    }

    /// The pods that answered the requests with `key`, in order.
    pub fn pods(&self, key: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|c| c.pods.clone())
            .unwrap_or_default()
    }

    /// The hosts requests with `key` came for.
    pub fn hosts(&self, key: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|c| c.hosts.clone())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct Backend {
    pod: Arc<str>,
    /// `?fail=` counters per key (bounded by the test's own keys).
    counters: Counters,
}

/// Serves the echo backend on `listener` as pod `pod` until the task is
/// dropped.
pub async fn serve(listener: TcpListener, pod: &str) {
    serve_counting(listener, pod, Counters::default()).await
}

/// As [`serve`], counting keyed requests in `counters`.
pub async fn serve_counting(listener: TcpListener, pod: &str, counters: Counters) {
    let backend = Backend {
        pod: pod.into(),
        counters,
    };
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_conn(tcp, backend.clone()));
    }
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn spawn(addr: SocketAddr, pod: &str) -> std::io::Result<SocketAddr> {
    spawn_counting(addr, pod, Counters::default()).await
}

/// As [`spawn`], counting keyed requests in `counters`.
pub async fn spawn_counting(addr: SocketAddr, pod: &str, counters: Counters) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    let pod = pod.to_string();
    tokio::spawn(async move { serve_counting(l, &pod, counters).await });
    Ok(bound)
}

/// Serves one connection (any AsyncRead + AsyncWrite, e.g. an HBONE
/// stream): HTTP/1.1 or h2, detected from the first bytes.
async fn serve_conn<IO>(io: IO, backend: Backend)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| handle(req, backend.clone()));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "echo connection ended");
    }
}

async fn handle(req: Request<Incoming>, backend: Backend) -> Result<Response<Body>, Infallible> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return Ok(grpc_call(req, &backend).await);
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        return Ok(upgrade(req));
    }
    Ok(echo(req, &backend).await)
}

async fn grpc_call(req: Request<Incoming>, backend: &Backend) -> Response<Body> {
    use tonic::codegen::Service;
    let mut svc = pb::echo_server::EchoServer::new(GrpcEcho {
        pod: backend.pod.clone(),
    });
    match svc.call(req).await {
        Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed_unsync()),
        Err(never) => match never {},
    }
}

/// 101, then the raw bytes are echoed back.
fn upgrade(req: Request<Incoming>) -> Response<Body> {
    let proto = req.headers().get(http::header::UPGRADE).cloned();
    tokio::spawn(async move {
        if let Ok(up) = hyper::upgrade::on(req).await {
            let io = TokioIo::new(up);
            let (mut r, mut w) = tokio::io::split(io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade");
    if let Some(p) = proto {
        resp = resp.header(http::header::UPGRADE, p);
    }
    resp.body(empty()).expect("valid response")
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed_unsync()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
}

async fn echo(req: Request<Incoming>, backend: &Backend) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let mut status = req
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if let Some(key) = query_param(&query, "key") {
        let fail = query_param(&query, "fail")
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        let fail_status = query_param(&query, "fail_status")
            .and_then(|v| v.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut counters = backend.counters.0.lock().unwrap_or_else(|e| e.into_inner());
        let c = counters.entry(key.to_string()).or_default();
        c.hits += 1;
        if c.hosts.len() < 100 {
            c.hosts.push(host.clone());
            c.pods.push(backend.pod.to_string());
        }
        if c.failed < fail {
            c.failed += 1;
            status = fail_status;
        }
    }
    // After counting: a request abandoned during its delay was still seen.
    if let Some(ms) = query_param(&query, "delay").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let (parts, body) = req.into_parts();
    let body_bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the echo's limit"),
    };
    if let Some(n) = parts.uri.path().strip_prefix("/bytes/") {
        return match n.parse::<usize>() {
            Ok(n) if n <= MAX_BYTES => Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(
                    Full::new(Bytes::from(vec![b'x'; n]))
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                )
                .expect("valid response"),
            _ => plain(StatusCode::BAD_REQUEST, "/bytes/N: N is a size of at most 16 MiB"),
        };
    }
    let echoed = Echoed {
        pod: backend.pod.to_string(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        host,
        version: format!("{:?}", parts.version),
        headers,
        body_bytes,
    };
    let json = serde_json::to_vec(&echoed).expect("serializable");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(json)).map_err(|e| match e {}).boxed_unsync())
        .expect("valid response")
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(
            Full::new(Bytes::from_static(msg.as_bytes()))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

struct GrpcEcho {
    pod: Arc<str>,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for GrpcEcho {
    async fn echo(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        let metadata = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let req = req.into_inner();
        if req.fail_code != 0 {
            return Err(tonic::Status::new(tonic::Code::from(req.fail_code), "failed as asked"));
        }
        Ok(tonic::Response::new(pb::EchoReply {
            message: req.message,
            pod: self.pod.to_string(),
            metadata,
        }))
    }
}

/// The gRPC client mode: a client on an already open connection `io`
/// (TCP, or an HBONE stream to a waypoint), speaking h2.
pub async fn grpc_client<IO>(
    io: IO,
) -> Result<pb::echo_client::EchoClient<tonic::transport::Channel>, tonic::transport::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Arc::new(Mutex::new(Some(io)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let io = io.lock().unwrap_or_else(|e| e.into_inner()).take();
        async move {
            io.map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the gRPC client's connection was used already"))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://echo.test")
        .connect_with_connector(connector)
        .await?;
    Ok(pb::echo_client::EchoClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET `path` on a fresh HTTP/1.1 connection to `addr`: status and body.
    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Bytes) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, "echo.test")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn bytes_answers_that_many_bytes_and_refuses_too_many() {
        let addr = spawn("127.0.0.1:0".parse().unwrap(), "p").await.unwrap();
        for n in [0, 1, 1024] {
            let (status, body) = get(addr, &format!("/bytes/{n}")).await;
            assert_eq!((status, body.len()), (StatusCode::OK, n));
            assert!(body.iter().all(|b| *b == b'x'));
        }
        // Over the limit or not a size: 400; any other path is still the JSON echo.
        let (status, body) = get(addr, "/bytes/16777217").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        let (status, body) = get(addr, "/bytes/many").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        let (status, body) = get(addr, "/other").await;
        assert_eq!(status, StatusCode::OK);
        let echoed: Echoed = serde_json::from_slice(&body).unwrap();
        assert_eq!(echoed.path, "/other");
    }
}
