//! HBONE: one HTTP/2 `CONNECT` stream per proxied TCP connection, inside
//! mutual TLS to port 15008, wire-compatible with Istio's ztunnel.
//!
//! `:authority` is the final destination `ip:port`; the response is 200 only
//! after the destination side authorized the peer and reached the
//! application (400 malformed or not for this pod, 401 denied, 503 upstream
//! unreachable); then bytes flow as DATA frames, END_STREAM is a half-close.
//!
//! Bounds (a peer is anyone who can reach 15008): TLS and HTTP/2 handshakes
//! and the wait for a CONNECT answer are timed out ([`Timeouts`]); a header
//! list may be at most 64 KiB and a connection carries at most 100 streams
//! at once (the server refuses more with REFUSED_STREAM); h2's own limits
//! bound resets. A draining server sends GOAWAY, so peers move new streams
//! to a new connection (a successor agent) while open ones finish. An idle
//! stream is never timed out (as in ztunnel): idle database and long-poll
//! connections stay up; pooled *connections* are released by the pool.
//!
//! Server API: [`serve_streams`] hands each CONNECT to a handler as an
//! [`Incoming`] (peer SPIFFE ID, remote address, `:authority`, headers);
//! the handler answers a status and, on 200, gets an [`H2Stream`]
//! (AsyncRead + AsyncWrite) to serve as it likes (the waypoint runs hyper
//! on it). [`serve`] is the agent's bridge-to-a-socket built on it. Client
//! side, a [`Tunnel`] (and a pooled `mesh::pool::PooledStream`) is
//! AsyncRead + AsyncWrite too.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::{pki_types::ServerName, ClientConfig, ServerConfig};
use std::{
    pin::Pin,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use crate::{
    identity::SpiffeId,
    splice::{both, Copied, Hooks},
    tls,
};

pub const HBONE_PORT: u16 = 15008;

// Flow-control windows and frame size, as ztunnel uses. Measured against
// the alternatives (README, "HTTP/2 frame and window sizes"): h2's default
// 16 KiB frames cost 1.6x the agents' CPU per GB, 64 KiB frames 1.15x;
// larger windows gained nothing.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// Streams one connection carries at most at once (ztunnel's default),
/// announced in SETTINGS and enforced by the server.
pub const MAX_STREAMS: u32 = 100;
/// Largest header list accepted (ztunnel's limit), both directions.
pub const MAX_HEADER_LIST: u32 = 64 << 10;
/// Read buffers start small and grow with the stream (ztunnel's steps). A
/// 1 MiB top step measured worse, 64 KiB too (README, as above).
const BUF_STEPS: [(u64, usize); 3] = [(0, 1 << 10), (128 << 10, 16 << 10), (10 << 20, 256 << 10)];

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot connect to {peer}: {source} (is port 15008 reachable, e.g. not blocked by a NetworkPolicy?)")]
    Connect { peer: SocketAddr, source: io::Error },
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls { peer: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {peer}: {source}")]
    H2 { peer: SocketAddr, source: h2::Error },
    #[error("{peer} answered CONNECT {authority} with {status}")]
    Status {
        peer: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("{peer}: no {what} within {after:?}")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    #[error("{0}")]
    Tls2(#[from] tls::TlsError),
    #[error("cannot build the CONNECT request for {authority}: {source}")]
    Request { authority: SocketAddr, source: http::Error },
}

impl HboneError {
    /// The peer did not process the stream (GOAWAY, or REFUSED_STREAM at its
    /// stream limit): it is safe to open it again on another connection.
    pub fn unprocessed(&self) -> bool {
        matches!(self, HboneError::H2 { source, .. }
            if source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM))
    }
}

/// How long the tunnel's setup may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The TLS handshake, and the HTTP/2 handshake after it (each).
    pub handshake: Duration,
    /// From asking for a stream to the CONNECT answer (the destination side
    /// authorizes and connects to the application in between).
    pub response: Duration,
}

impl Timeouts {
    /// Handshakes bounded by `connect`, CONNECT answers by twice that (the
    /// destination's own connect to the app must fit in it).
    pub fn from_connect(connect: Duration) -> Self {
        Self {
            handshake: connect,
            response: connect * 2,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::from_connect(Duration::from_secs(10))
    }
}

/// `f`, or a [`HboneError::Timeout`] after `after`.
async fn bounded<T>(
    peer: SocketAddr,
    what: &'static str,
    after: Duration,
    f: impl Future<Output = Result<T, HboneError>>,
) -> Result<T, HboneError> {
    tokio::time::timeout(after, f)
        .await
        .unwrap_or(Err(HboneError::Timeout { peer, what, after }))
}

/// What the source side puts on a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectHeaders {
    /// Final destination (`:authority`).
    pub authority: SocketAddr,
    /// The original client, for `forwarded: for="..."`.
    pub client: SocketAddr,
    /// `baggage`: see [`baggage`].
    pub baggage: String,
}

/// An open tunnel stream (client side). It is AsyncRead + AsyncWrite, so
/// an HTTP client (hyper) can run on it; [`Tunnel::bridge`] copies it to a
/// socket without copying buffers.
pub struct Tunnel {
    io: H2Stream,
    /// The server's verified identity.
    pub peer: Option<SpiffeId>,
}

/// A TCP connection to a peer's 15008 and the TLS config to use on it.
pub struct Dialed {
    pub tcp: TcpStream,
    pub tls: Arc<ClientConfig>,
}

type ClientConn = h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>;

/// The future that drives an HTTP/2 client connection (poll it until done).
pub struct Driver {
    pub conn: ClientConn,
}

impl Driver {
    pub fn ping_pong(&mut self) -> Option<h2::PingPong> {
        self.conn.ping_pong()
    }
}

/// A fresh client connection: its verified peer and its driver.
pub struct Handshaken {
    pub identity: Option<SpiffeId>,
    pub driver: Driver,
}

/// TLS and HTTP/2 handshakes over `tcp` (each bounded by
/// `t.handshake`); streams are opened with [`open_stream`].
pub async fn handshake(
    tcp: TcpStream,
    tls: Arc<ClientConfig>,
    t: &Timeouts,
) -> Result<(SendRequest<Bytes>, Handshaken), HboneError> {
    let peer = tcp.peer_addr().map_err(|source| HboneError::Tls {
        peer: "0.0.0.0:0".parse().expect("addr"),
        source,
    })?;
    // No SNI is sent (enable_sni = false); the name only satisfies the API.
    let name = ServerName::IpAddress(peer.ip().into());
    let stream = bounded(peer, "TLS handshake", t.handshake, async {
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| HboneError::Tls { peer, source })
    })
    .await?;
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| tls::peer_identity(c));
    let (send, conn) = bounded(peer, "HTTP/2 handshake", t.handshake, async {
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|source| HboneError::H2 { peer, source })
    })
    .await?;
    Ok((
        send,
        Handshaken {
            identity,
            driver: Driver { conn },
        },
    ))
}

/// One CONNECT stream on an established connection; Ok once answered 200,
/// within `t.response`.
pub async fn open_stream(
    send: SendRequest<Bytes>,
    headers: &ConnectHeaders,
    t: &Timeouts,
) -> Result<Tunnel, HboneError> {
    bounded(headers.authority, "CONNECT answer", t.response, request(send, headers)).await
}

async fn request(send: SendRequest<Bytes>, headers: &ConnectHeaders) -> Result<Tunnel, HboneError> {
    let peer = headers.authority;
    let h2err = |source| HboneError::H2 { peer, source };
    let mut send = send.ready().await.map_err(h2err)?;
    let req = connect_request(headers)?;
    let (response, stream) = send.send_request(req, false).map_err(h2err)?;
    let response = response.await.map_err(h2err)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status {
            peer,
            authority: headers.authority,
            status: response.status(),
        });
    }
    Ok(Tunnel {
        io: H2Stream::new(stream, response.into_body()),
        peer: None,
    })
}

/// A dedicated connection with one CONNECT stream (no pooling).
pub async fn connect(tcp: TcpStream, tls: Arc<ClientConfig>, headers: &ConnectHeaders) -> Result<Tunnel, HboneError> {
    let t = Timeouts::default();
    let (send, shaken) = handshake(tcp, tls, &t).await?;
    let conn = shaken.driver.conn;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HBONE connection ended");
        }
    });
    let mut tunnel = open_stream(send, headers, &t).await?;
    tunnel.peer = shaken.identity;
    Ok(tunnel)
}

/// The CONNECT request the source side sends for `headers`.
pub fn connect_request(headers: &ConnectHeaders) -> Result<Request<()>, HboneError> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(headers.authority.to_string())
        .header("forwarded", format!("for=\"{}\"", headers.client))
        .header("baggage", &headers.baggage)
        .header("traceparent", traceparent())
        .body(())
        .map_err(|source| HboneError::Request {
            authority: headers.authority,
            source,
        })
}

/// Istio's `baggage` header describing the source workload. The values
/// (pod labels, names) are percent-encoded as W3C baggage requires, so a
/// label holding `,` or `=` cannot add members and a control character
/// cannot make the header invalid.
pub fn baggage(cluster: &str, namespace: &str, workload: &str, service: &str, version: &str) -> String {
    let members = [
        ("k8s.cluster.name", cluster),
        ("k8s.namespace.name", namespace),
        ("k8s.deployment.name", workload),
        ("service.name", service),
        ("service.version", version),
    ];
    let encoded: Vec<String> = members
        .iter()
        .map(|(k, v)| format!("{k}={}", baggage_value(v)))
        .collect();
    encoded.join(",")
}

/// Bytes outside W3C `baggage-octet`, and `%` itself.
const NOT_BAGGAGE_OCTET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b',')
    .add(b';')
    .add(b'\\')
    .add(b'%');

/// A W3C baggage value (non-ASCII bytes are encoded too).
fn baggage_value(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, NOT_BAGGAGE_OCTET).to_string()
}

/// `00-<trace id>-<span id>-00`, fresh per connection.
fn traceparent() -> String {
    let (t, s): (u128, u64) = (rand::random(), rand::random());
    format!("00-{t:032x}-{s:016x}-00")
}

impl Tunnel {
    /// Copies between the tunnel and `tcp` until both directions are done.
    /// `sent` counts tcp -> tunnel bytes. `hooks`: see [`Hooks`].
    pub async fn bridge(self, tcp: &mut TcpStream, hooks: Hooks) -> Copied {
        self.io.bridge(tcp, hooks).await
    }

    /// The stream as plain AsyncRead + AsyncWrite.
    pub fn into_stream(self) -> H2Stream {
        self.io
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One CONNECT stream's bytes as AsyncRead + AsyncWrite (both sides of the
/// tunnel): DATA frames in, DATA frames out, shutdown = END_STREAM.
/// Received capacity is released as soon as a frame is taken, so at most
/// one frame (<= 1 MiB) is buffered here.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame.
    unread: Bytes,
    shut: bool,
}

impl H2Stream {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
        }
    }

    /// Copies between the stream and `tcp` until both directions are done
    /// (buffers handed to h2 without a copy). `sent` counts tcp -> stream.
    /// `tcp` is read with recvmsg, its `hooks` called (see [`Hooks`]).
    pub async fn bridge(self, tcp: &mut TcpStream, hooks: Hooks) -> Copied {
        let H2Stream { send, recv, unread, .. } = self;
        if !unread.is_empty() {
            if let Err(e) = tcp.write_all(&unread).await {
                return Copied::failed(format!("error: {e}"));
            }
        }
        bridge(send, recv, tcp, hooks).await
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match std::task::ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.unread = chunk;
                }
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        // h2 may report a zero grant once (capacity assigned then taken);
        // polling again registers the waker.
        for _ in 0..2 {
            match std::task::ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection is driven; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

async fn bridge(send: SendStream<Bytes>, recv: RecvStream, tcp: &mut TcpStream, hooks: Hooks) -> Copied {
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let (rd, wr) = tcp.split();
    let r = both(tcp_to_h2(rd, send, &sent, hooks), h2_to_tcp(recv, wr, &received)).await;
    Copied::new(r, &sent, &received)
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2"))
    } else if e.reason() == Some(h2::Reason::CANCEL) || e.reason() == Some(h2::Reason::CONNECT_ERROR) {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

/// TCP -> DATA frames; the read buffer is handed to h2 without a copy.
/// `hooks` are called as [`Hooks`] says; a hop that settled on TCP leaves
/// the sockmap, and its progress hook stops.
async fn tcp_to_h2(
    mut rd: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    count: &AtomicU64,
    mut hooks: Hooks,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        let total = count.load(Ordering::Relaxed);
        let size = BUF_STEPS
            .iter()
            .rev()
            .find(|(after, _)| total >= *after)
            .map_or(1 << 10, |s| s.1);
        buf.reserve(size);
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        // The tunnel reads into user space either way.
        let _ = hooks.read(n);
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "tunnel stream closed"))?
                .map_err(h2_io)?;
            let part = chunk.split_to(granted.min(chunk.len()));
            let len = part.len() as u64;
            send.send_data(part, false).map_err(h2_io)?;
            count.fetch_add(len, Ordering::Relaxed);
        }
        hooks.settled();
    }
}

/// DATA frames -> TCP; END_STREAM becomes a half-close.
async fn h2_to_tcp(mut recv: RecvStream, mut wr: WriteHalf<'_>, count: &AtomicU64) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        wr.write_all(&chunk).await?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    wr.shutdown().await
}

/// One CONNECT as the server sees it, before it is answered.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The client's verified SPIFFE ID.
    pub peer: SpiffeId,
    /// The TCP peer (the source node/pod address).
    pub remote: SocketAddr,
    /// `:authority` as sent (normally `ip:port`).
    pub authority: String,
    /// The request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub headers: http::HeaderMap,
    /// When the CONNECT arrived.
    pub started: std::time::Instant,
}

/// A request on 15008 that is not a CONNECT (answered 400).
#[derive(Debug, thiserror::Error)]
#[error("method {0} is not CONNECT")]
pub struct NotConnect(pub Method);

impl ConnectRequest {
    /// The CONNECT `parts` as the server sees them (h2 has checked the
    /// header syntax): `:authority` and the headers are kept as sent and
    /// read by [`Self::authority_addr`] and [`Self::forwarded_for`].
    pub fn parse(peer: SpiffeId, remote: SocketAddr, parts: http::request::Parts) -> Result<Self, NotConnect> {
        if parts.method != Method::CONNECT {
            return Err(NotConnect(parts.method));
        }
        Ok(ConnectRequest {
            peer,
            remote,
            authority: parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default(),
            headers: parts.headers,
            started: std::time::Instant::now(),
        })
    }

    /// `:authority` as `ip:port`, if it is one.
    pub fn authority_addr(&self) -> Option<SocketAddr> {
        self.authority.parse().ok()
    }

    /// The `forwarded` header, if given.
    pub fn forwarded(&self) -> Option<&str> {
        self.headers.get("forwarded").and_then(|v| v.to_str().ok())
    }

    /// The original client's address from `forwarded: for="ip:port"` (or
    /// `for=ip`), if given and well formed.
    pub fn forwarded_for(&self) -> Option<std::net::IpAddr> {
        let v = self.forwarded()?;
        let f = v.split(';').find_map(|p| p.trim().strip_prefix("for="))?;
        let f = f.trim_matches('"');
        f.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| f.trim_start_matches('[').trim_end_matches(']').parse())
            .ok()
    }
}

/// A CONNECT stream waiting for the handler's answer: [`Incoming::accept`]
/// answers 200 and yields the stream, [`Incoming::refuse`] answers another
/// status and ends it. Dropped unanswered, the stream is reset.
pub struct Incoming {
    pub request: ConnectRequest,
    respond: h2::server::SendResponse<Bytes>,
    body: RecvStream,
}

impl Incoming {
    /// Answers 200: bytes may flow.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let send = self
            .respond
            .send_response(status(StatusCode::OK), false)
            .map_err(|source| HboneError::H2 {
                peer: self.request.remote,
                source,
            })?;
        Ok(H2Stream::new(send, self.body))
    }

    /// Answers `code` (not 200) and ends the stream.
    pub fn refuse(mut self, code: StatusCode) {
        let _ = self.respond.send_response(status(code), true);
    }
}

/// Terminates TLS on an accepted 15008 connection and hands each CONNECT
/// stream to `handler` (spawned, one task per stream), which decides the
/// answer. Requests that are not CONNECT get 400 here. The TLS and HTTP/2
/// handshakes are bounded by `handshake_timeout`; at most [`MAX_STREAMS`]
/// streams run at once (more are refused with REFUSED_STREAM) and header
/// lists are at most [`MAX_HEADER_LIST`]. When `drain` resolves the
/// connection is shut down gracefully: GOAWAY, open streams finish, then
/// it closes and this returns.
pub async fn serve_streams<H, F>(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    handshake_timeout: Duration,
    drain: impl Future<Output = ()>,
    handler: H,
) -> Result<(), HboneError>
where
    H: Fn(Incoming) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let remote = tcp.peer_addr().map_err(|source| HboneError::Tls {
        peer: "0.0.0.0:0".parse().expect("addr"),
        source,
    })?;
    let stream = bounded(remote, "TLS handshake", handshake_timeout, async {
        tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .map_err(|source| HboneError::Tls { peer: remote, source })
    })
    .await?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| tls::peer_identity(c))
        .ok_or_else(|| HboneError::Tls {
            peer: remote,
            source: io::Error::other("client has no SPIFFE identity"),
        })?;
    let mut conn = bounded(remote, "HTTP/2 handshake", handshake_timeout, async {
        h2::server::Builder::new()
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|source| HboneError::H2 { peer: remote, source })
    })
    .await?;
    tokio::pin!(drain);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut drain, if !draining => {
                // GOAWAY now; accept() keeps driving the open streams and
                // ends once they are done.
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        let (req, mut respond) = match next {
            None => return Ok(()),
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return Err(HboneError::H2 {
                    peer: remote,
                    source: e,
                })
            }
        };
        let (parts, body) = req.into_parts();
        let request = match ConnectRequest::parse(peer.clone(), remote, parts) {
            Ok(r) => r,
            Err(e) => {
                let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                tracing::warn!(remote = %remote, reason = %e, "bad HBONE request");
                continue;
            }
        };
        tokio::spawn(handler(Incoming { request, respond, body }));
    }
}

/// What the destination side learns about an incoming CONNECT.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub authority: SocketAddr,
    /// The client's verified SPIFFE ID.
    pub peer: SpiffeId,
    /// The TCP peer (the source node/pod address).
    pub remote: SocketAddr,
    /// `forwarded: for=` if given.
    pub forwarded_for: Option<String>,
    /// When the CONNECT arrived.
    pub started: std::time::Instant,
}

/// Why a CONNECT was refused: the status to answer and a reason to log.
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

/// Terminates TLS on an accepted 15008 connection and serves its CONNECT
/// streams by bridging each to a socket (the agent's inbound role; built
/// on [`serve_streams`], same bounds and drain). For each, `open`
/// authorizes and connects to the application, returning the upstream
/// socket, its reader's hooks (see [`Hooks`]) and a
/// guard kept until the stream ends; `done` gets the outcome when the
/// stream ends.
pub async fn serve<O, F, G, D>(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    handshake_timeout: Duration,
    drain: impl Future<Output = ()>,
    open: O,
    done: D,
) -> Result<(), HboneError>
where
    O: Fn(Inbound) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(TcpStream, Hooks, G), Refusal>> + Send + 'static,
    G: Send + 'static,
    D: Fn(Inbound, Result<Copied, Refusal>) + Clone + Send + Sync + 'static,
{
    serve_streams(tcp, tls, handshake_timeout, drain, move |incoming| {
        bridge_task(incoming, open.clone(), done.clone())
    })
    .await
}

/// One CONNECT stream of [`serve`]: parse, `open`, answer, bridge, report.
async fn bridge_task<O, F, G, D>(incoming: Incoming, open: O, done: D)
where
    O: Fn(Inbound) -> F,
    F: Future<Output = Result<(TcpStream, Hooks, G), Refusal>>,
    D: Fn(Inbound, Result<Copied, Refusal>),
{
    let r = &incoming.request;
    let Some(authority) = r.authority_addr() else {
        tracing::warn!(remote = %r.remote, reason = %format!("authority `{}` is not ip:port", r.authority), "bad HBONE request");
        incoming.refuse(StatusCode::BAD_REQUEST);
        return;
    };
    let inbound = Inbound {
        authority,
        peer: r.peer.clone(),
        remote: r.remote,
        forwarded_for: r.forwarded().map(str::to_string),
        started: r.started,
    };
    match open(inbound.clone()).await {
        Ok((mut upstream, hooks, guard)) => match incoming.accept() {
            Ok(stream) => {
                let copied = stream.bridge(&mut upstream, hooks).await;
                drop(guard);
                done(inbound, Ok(copied));
            }
            Err(e) => done(
                inbound,
                Err(Refusal {
                    status: StatusCode::OK,
                    reason: format!("stream reset: {e}"),
                }),
            ),
        },
        Err(refusal) => {
            incoming.refuse(refusal.status);
            done(inbound, Err(refusal));
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    Response::builder().status(code).body(()).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Caught by the `hbone_connect` fuzz target's round trip: a pod label
    /// with a control character made the CONNECT request invalid (the
    /// agent's connection task panicked building it), and one with `,`
    /// added baggage members of its own.
    #[test]
    fn labels_can_neither_break_nor_extend_the_baggage() {
        let b = baggage(
            "Kubernetes",
            "default",
            "web\napp",
            "web,k8s.namespace.name=evil",
            "v1 é%",
        );
        assert_eq!(
            b,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=web%0Aapp,\
             service.name=web%2Ck8s.namespace.name=evil,service.version=v1%20%C3%A9%25"
        );
        let h = ConnectHeaders {
            authority: "10.96.0.10:80".parse().unwrap(),
            client: "[fd00::11]:33000".parse().unwrap(),
            baggage: b.clone(),
        };
        let (parts, ()) = connect_request(&h).expect("a valid request").into_parts();
        let id = SpiffeId::new("td", "default", "web");
        let r = ConnectRequest::parse(id.clone(), "10.1.1.11:40000".parse().unwrap(), parts).unwrap();
        assert_eq!(r.headers["baggage"], b.as_str());
        assert_eq!(r.authority_addr(), Some(h.authority));
        assert_eq!(r.forwarded_for(), Some(h.client.ip()));
        let get = Request::get("/").body(()).unwrap().into_parts().0;
        let e = ConnectRequest::parse(id, "10.1.1.11:40000".parse().unwrap(), get).unwrap_err();
        assert_eq!(e.to_string(), "method GET is not CONNECT");
    }
}
