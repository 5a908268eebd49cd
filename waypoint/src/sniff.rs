//! Which protocol a stream speaks: what the Service port declares
//! (`appProtocol`, else the port name's prefix, as Istio), else what the
//! client's first bytes say, waiting a bounded time so that server-first
//! protocols (MySQL, SMTP...) are not held up: no bytes in time means opaque
//! TCP. The bytes read are replayed ([`Prefixed`]).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a port declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP; HTTP/1.1 or h2 (prior knowledge) told apart by the preface.
    Http,
    /// h2 only (`http2`, `grpc`, `kubernetes.io/h2c`).
    Http2,
    /// Opaque TCP (`tcp`, `tls`, `https`, databases...).
    Tcp,
}

/// The protocol a stream is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

/// Istio's protocol selection from `appProtocol`, else the port name
/// (`<protocol>[-<suffix>]`); `None`: undeclared, sniff.
pub fn declared(app_protocol: Option<&str>, name: Option<&str>) -> Option<Declared> {
    if let Some(p) = app_protocol {
        if let Some(d) = from_word(&p.to_ascii_lowercase()) {
            return Some(d);
        }
    }
    let name = name?.to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or("");
    from_word(prefix)
}

fn from_word(w: &str) -> Option<Declared> {
    Some(match w {
        "http" => Declared::Http,
        "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c" => Declared::Http2,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws" | "kubernetes.io/wss" => {
            Declared::Tcp
        }
        _ => return None,
    })
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// The protocol the first bytes show, or `None` when more are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.starts_with(PREFACE) {
        return Some(Protocol::Http2);
    }
    let mut undecided = PREFACE.starts_with(buf);
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Protocol::Http1);
        }
        undecided |= m.starts_with(buf);
    }
    (!undecided).then_some(Protocol::Tcp)
}

/// Reads the first bytes of `io` to tell the protocol, for at most `wait`
/// (`None`: until decided or EOF). Returns the protocol and the bytes read.
pub async fn sniff<S: AsyncRead + Unpin>(io: &mut S, wait: Option<Duration>) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    let decide = async {
        loop {
            if let Some(p) = classify(&buf) {
                return Ok::<_, io::Error>(p);
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(Protocol::Tcp);
            }
        }
    };
    let p = match wait {
        Some(w) => tokio::time::timeout(w, decide).await.unwrap_or(Ok(Protocol::Tcp))?,
        None => decide.await?,
    };
    Ok((p, buf.freeze()))
}

/// `inner` with `prefix` replayed before its own bytes.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_waits_for_enough_bytes_and_decides() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS "), Some(Protocol::Http1));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp), "TLS");
        assert_eq!(classify(b"GETX"), Some(Protocol::Tcp));
    }

    #[test]
    fn declared_protocol_from_app_protocol_then_name() {
        assert_eq!(declared(Some("grpc"), Some("tcp-x")), Some(Declared::Http2));
        assert_eq!(declared(Some("kubernetes.io/h2c"), None), Some(Declared::Http2));
        assert_eq!(declared(None, Some("http-web")), Some(Declared::Http));
        assert_eq!(declared(None, Some("mysql")), Some(Declared::Tcp));
        assert_eq!(declared(Some("weird"), Some("web")), None);
        assert_eq!(declared(None, None), None);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_tcp_after_the_wait_and_bytes_are_replayed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (p, seen) = sniff(&mut a, Some(Duration::from_millis(100))).await.unwrap();
        assert_eq!((p, seen.len()), (Protocol::Tcp, 0));
        assert!(started.elapsed() >= Duration::from_millis(100));
        tokio::io::AsyncWriteExt::write_all(&mut b, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let (p, seen) = sniff(&mut a, Some(Duration::from_secs(5))).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut replay = Prefixed::new(seen, a);
        let mut first = [0u8; 4];
        replay.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET ");
    }
}
