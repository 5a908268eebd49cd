//! One captured connection: find where it was going, connect there from
//! inside the pod's netns (marked so capture lets it pass), forward both ways
//! (zero-copy, see `splice`), and write one access-log line when it closes.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use agent_common::AGENT_MARK;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use mesh::splice;

use super::{Direction, PodCtx, TrackGuard};

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
            let c = splice::forward(&client, &upstream).await;
            (c.result, c.sent, c.received)
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
