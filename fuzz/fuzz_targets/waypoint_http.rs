//! The waypoint's HTTP/1.1 request path as far as it is pure: the
//! protocol sniff (`sniff::classify`), the request-framing guard
//! (`smuggling::Guard`) in front of hyper's parser, exactly as
//! `waypoint::http::serve` stacks them, and for each request hyper
//! delivers the framing checks (`smuggling::check_headers`) and the route
//! lookup of the waypoint's test routes (waypoint/tests/routes.yaml).
//! Properties:
//! * the sniff decision, once made, holds for every longer prefix;
//! * the guard judges the same heads however the stream is split into
//!   reads (TCP segments are the client's choice), byte by byte or at a
//!   point the input picks.
//!
//! Not covered: h2 (hyper's and h2's own fuzzing), the upstream side
//! (needs endpoints), and timeouts.
#![no_main]

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use cluster::routes::{rewrite_path, store::Kind, Action, Document, Lookup, RequestView, RouteStore, RouteTable};
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use waypoint::{
    smuggling::{check_headers, Guard, Verdicts},
    sniff::classify,
};

/// The waypoint's defaults (`--max-header-bytes`, `--max-headers`).
const MAX_HEADER_BYTES: usize = 60 << 10;
const MAX_HEADERS: usize = 100;
const HOSTS: [&str; 2] = ["web.default.svc.cluster.local", "web-v.default.svc.cluster.local"];

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let docs = Document::parse_all(include_str!("../../waypoint/tests/routes.yaml")).expect("the test routes");
        let mut store = RouteStore::new(None);
        store.replace(&Kind::ALL, docs);
        store.table().0
    })
}

fuzz_target!(|data: &[u8]| {
    sniff(data);
    let whole = judged(data, &[data.len().max(1)]);
    assert_eq!(judged(data, &[1]), whole, "byte by byte");
    let cut = data.first().map_or(1, |b| *b as usize % data.len().max(1) + 1);
    assert_eq!(
        judged(data, &[cut, data.len().max(1)]),
        whole,
        "split after {cut} bytes"
    );
    serve(data);
});

fn sniff(data: &[u8]) {
    let Some((at, decided)) = (0..=data.len().min(64)).find_map(|n| classify(&data[..n]).map(|p| (n, p))) else {
        return;
    };
    for n in at..=data.len().min(64) {
        assert_eq!(classify(&data[..n]), Some(decided), "{n} bytes");
    }
}

/// The guard's verdicts on `data` read in chunks of these sizes (the
/// last size repeats).
fn judged(data: &[u8], sizes: &[usize]) -> Vec<Option<String>> {
    let verdicts = Verdicts::default();
    let mut guard = Guard::new(
        Chunks {
            data: Bytes::copy_from_slice(data),
            sizes: sizes.to_vec(),
        },
        verdicts.clone(),
        MAX_HEADER_BYTES,
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = [0u8; 8192];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {}
            other => panic!("an in-memory read: {other:?}"),
        }
    }
    verdicts.pending()
}

/// hyper's HTTP/1.1 server behind the guard, on the input as one stream.
fn serve(data: &[u8]) {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    }
    let verdicts = Verdicts::default();
    let io = Guard::new(
        Chunks {
            data: Bytes::copy_from_slice(data),
            sizes: vec![4096],
        },
        verdicts.clone(),
        MAX_HEADER_BYTES,
    );
    let svc = hyper::service::service_fn(move |req| handle(req, verdicts.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    RT.with(|rt| {
        let _ = rt.block_on(conn);
    });
}

/// What `waypoint::http` does with a request before it goes upstream.
async fn handle(req: Request<Incoming>, verdicts: Verdicts) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = verdicts.next();
    let _ = check_headers(req.headers());
    let authority = waypoint::http::authority_of(&req).unwrap_or_default();
    let view = RequestView::of(&req, &authority, 80);
    for host in HOSTS {
        if let Lookup::Found(e) = table().lookup(host, &view) {
            if let Action::Forward { rewrite, .. } = &e.rule.action {
                if let Some(rw) = &rewrite.path {
                    let prefix = e.m.path.as_ref().and_then(|p| p.prefix());
                    let p = rewrite_path(rw, req.uri().path(), prefix);
                    assert!(p.starts_with('/'), "rewritten to {p:?}");
                }
            }
        }
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

/// `data` as a stream read in chunks of `sizes` (the last repeats);
/// writes go nowhere.
struct Chunks {
    data: Bytes,
    sizes: Vec<usize>,
}

impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let size = if self.sizes.len() > 1 {
            self.sizes.remove(0)
        } else {
            self.sizes[0]
        };
        let n = size.min(buf.remaining()).min(self.data.len());
        let chunk = self.data.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunks {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
