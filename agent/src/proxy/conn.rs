//! One captured connection: find where it was going, connect there from
//! inside the pod's netns (marked so capture lets it pass), copy both ways,
//! and write one access-log line when it closes.
use std::{
    io::ErrorKind,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use agent_common::AGENT_MARK;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpSocket, TcpStream,
    },
};

use super::{Direction, PodCtx, TrackGuard};

/// Per-direction copy buffer.
const COPY_BUF: usize = 64 * 1024;

pub async fn handle(ctx: Arc<PodCtx>, dir: Direction, client: TcpStream, peer: SocketAddr, _guard: TrackGuard) {
    let start = Instant::now();
    let peer = canonical(peer);
    let Some(dst) = original_destination(&ctx, dir, &client, peer) else {
        // Fail closed: without the original destination the connection
        // cannot be carried, and it must never go anywhere else.
        tracing::error!(
            target: "access", pod = %ctx.key, direction = dir.as_str(), src = %peer,
            result = "no_original_destination",
            "captured connection has no recorded original destination; closing it (fail closed)"
        );
        return;
    };
    let _ = client.set_nodelay(true);
    let (result, sent, received) = match connect_from_pod(&ctx, dst).await {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            copy(client, upstream).await
        }
        Err(e) => (format!("connect_failed: {e}"), 0, 0),
    };
    tracing::info!(
        target: "access",
        pod = %ctx.key,
        direction = dir.as_str(),
        src = %peer,
        dst = %dst,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = start.elapsed().as_millis() as u64,
        result = %result,
        "connection closed"
    );
}

/// Outbound: CONN_ORIG, keyed by the client's address in the pod netns.
/// Inbound: sk_lookup kept the original destination as the local address.
fn original_destination(ctx: &PodCtx, dir: Direction, client: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    match dir {
        Direction::Outbound => ctx.orig.lookup(ctx.netns_cookie, peer),
        Direction::Inbound => client.local_addr().ok().map(canonical),
    }
}

/// IPv4 peers of dual-stack listeners as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A connection to `dst` made from inside the pod's network namespace, with
/// the agent's mark so the connect hooks let it through.
async fn connect_from_pod(ctx: &PodCtx, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = ctx.netns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking().cloexec(), None)?;
        s.set_mark(AGENT_MARK)?;
        Ok(s)
    });
    let sock = sock.map_err(std::io::Error::other)??;
    TcpSocket::from_std_stream(sock.into()).connect(dst).await
}

/// Copies both ways, passing half-closes on. Returns (result, client->server
/// bytes, server->client bytes); the counts are right even when a side resets.
async fn copy(client: TcpStream, upstream: TcpStream) -> (String, u64, u64) {
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, &sent);
    let down = pump(ur, cw, &received);
    tokio::pin!(up, down);
    // When one direction fails the connection is over: stop the other too.
    let r = tokio::select! {
        r = &mut up => match r { Ok(()) => down.await, e => e },
        r = &mut down => match r { Ok(()) => up.await, e => e },
    };
    let result = match r {
        Ok(()) => "ok".to_string(),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => "reset".to_string(),
        Err(e) => format!("error: {e}"),
    };
    (result, sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed))
}

/// One direction: read until EOF, write everything, then half-close.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, count: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}
