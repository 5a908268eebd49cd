//! The waypoint's own connections to endpoints: a pooled HBONE stream to
//! the endpoint's agent (port 15008) under the waypoint's identity,
//! expecting the endpoint's workload identity; plain TCP only for workloads
//! outside the mesh (tunnel NONE), as Istio.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use mesh::{
    hbone::{self, ConnectHeaders, HboneError},
    pool::{PoolKey, PooledStream},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{route::Endpoint, Waypoint};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the waypoint has no valid certificate for {0} (is the CA reachable?)")]
    NoCertificate(String),
    #[error("{0}")]
    Hbone(#[from] HboneError),
    #[error("cannot connect to {addr} (workload outside the mesh): {source}")]
    Plain { addr: SocketAddr, source: io::Error },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
}

/// A byte stream to an endpoint.
pub enum Upstream {
    Hbone(Box<PooledStream>),
    Plain(TcpStream),
}

/// Opens a stream to `ep` for the original client `client`.
pub async fn open(wp: &Waypoint, ep: &Endpoint, client: SocketAddr) -> Result<Upstream, UpstreamError> {
    let in_mesh = ep.workload.as_ref().is_none_or(|w| w.hbone);
    if !in_mesh {
        let t = wp.limits().connect_timeout;
        return match tokio::time::timeout(t, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(Upstream::Plain(s))
            }
            Ok(Err(source)) => Err(UpstreamError::Plain { addr: ep.addr, source }),
            Err(_) => Err(UpstreamError::Timeout(ep.addr)),
        };
    }
    let cert = wp
        .certs()
        .current()
        .ok_or_else(|| UpstreamError::NoCertificate(wp.id().to_string()))?;
    let dst = SocketAddr::new(ep.addr.ip(), wp.upstream_port());
    let key = PoolKey {
        src_identity: wp.id().clone(),
        dst_identities: ep.identities.clone(),
        dst,
        src_ip: std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let headers = ConnectHeaders {
        authority: ep.addr,
        client,
        baggage: wp.baggage().to_string(),
    };
    let connect_timeout = wp.limits().connect_timeout;
    let dial = || {
        let tls = wp.tls().client(&cert, &ep.identities);
        async move {
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(dst))
                .await
                .map_err(|_| HboneError::Timeout {
                    peer: dst,
                    what: "TCP connect",
                    after: connect_timeout,
                })?
                .map_err(|source| HboneError::Connect { peer: dst, source })?;
            let _ = tcp.set_nodelay(true);
            Ok(hbone::Dialed { tcp, tls: tls? })
        }
    };
    let s = wp.pool().connect_stream(&key, &cert.serial, &headers, dial).await?;
    Ok(Upstream::Hbone(Box::new(s)))
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
