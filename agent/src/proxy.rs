//! The agent's pod-local listeners and the (for now plain TCP) forward.
//!
//! Per enrolled pod, inside its network namespace:
//! * 127.0.0.1:15001 and [::1]:15001 receive the pod's redirected outbound
//!   connects; the original destination comes from CONN_ORIG.
//! * [::]:15006 receives inbound connections handed over by sk_lookup; the
//!   accepted socket's local address *is* the original destination.
//!
//! Every listener uses SO_REUSEPORT so a new agent can bind next to a running
//! one (graceful handover); `net.ipv4.tcp_migrate_req=1` in the pod netns moves
//! connections still queued on a closing listener to its successor.
//! The HBONE issue replaces `forward` with the mTLS tunnel.
pub mod conn;
pub mod policed;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use agent_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use mesh::{identity::SpiffeId, tls::Roots};
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{capture::ProxyMaps, identity::CertStore, netns::Netns, state::State};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// Open connections, for draining on shutdown.
#[derive(Default)]
pub struct Tracker {
    open: AtomicUsize,
    idle: tokio::sync::Notify,
}

pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        TrackGuard(self.clone())
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    /// Waits until no connection is open or `timeout` passes; returns how many remain.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open() > 0 {
            if tokio::time::timeout_at(deadline, self.idle.notified()).await.is_err() {
                break;
            }
        }
        self.open()
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Mesh identity for the data path: present when the agent has a CA.
pub struct MeshCtx {
    pub certs: CertStore,
    pub roots: Roots,
    /// Outbound HBONE connections, shared by all pods of the node.
    pub pool: mesh::pool::Pool,
}

/// What a connection handler needs to know about its pod.
pub struct PodCtx {
    pub key: String,
    pub identity: SpiffeId,
    pub ips: Vec<std::net::IpAddr>,
    /// `None`: capture only (no --ca-address), connections are forwarded as plain TCP.
    pub mesh: Option<Arc<MeshCtx>>,
    /// Workloads and policies.
    pub state: State,
    /// Whether the pod netns routes replies of transparent forwards back to
    /// the agent (then the app sees the real client address).
    pub transparent: bool,
    /// Open inbound connections, re-checked when policy changes.
    pub open: Arc<policed::OpenConns>,
    pub metrics: crate::metrics::TcpMetrics,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub orig: Arc<ProxyMaps>,
    pub tracker: Arc<Tracker>,
}

/// The running listeners of one pod; dropping it stops accepting.
pub struct PodProxy {
    inbound_fd: RawFd,
    stop: watch::Sender<bool>,
    _tasks: Vec<JoinHandle<()>>,
}

impl PodProxy {
    /// Creates the pod's listeners inside its netns and starts accepting.
    pub fn start(ctx: Arc<PodCtx>, shutdown: &watch::Receiver<bool>) -> Result<Self, ProxyError> {
        enable_listener_migration(&ctx.netns);
        let out4 = listen(&ctx.netns, SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?;
        let out6 = listen(&ctx.netns, SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)))?;
        let inbound = listen(&ctx.netns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PORT)))?;
        let inbound_fd = inbound.as_raw_fd();
        let mut listeners = vec![
            (out4, Direction::Outbound),
            (out6, Direction::Outbound),
            (inbound, Direction::Inbound),
        ];
        if ctx.mesh.is_some() {
            let hbone = listen(&ctx.netns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT)))?;
            listeners.push((hbone, Direction::Hbone));
        }
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        for (l, dir) in listeners {
            tasks.push(tokio::spawn(accept_loop(
                l,
                dir,
                ctx.clone(),
                stopped.clone(),
                shutdown.clone(),
            )));
        }
        Ok(Self {
            inbound_fd,
            stop,
            _tasks: tasks,
        })
    }
}

/// The pod's 15006 listener, for the INBOUND sockhash.
impl AsRawFd for PodProxy {
    fn as_raw_fd(&self) -> RawFd {
        self.inbound_fd
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        // Accept loops exit on the stop signal; open connections keep running.
        let _ = self.stop.send(true);
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Outbound,
    /// Plaintext inbound (15006).
    Inbound,
    /// HBONE inbound (15008).
    Hbone,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound | Direction::Hbone => "inbound",
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    dir: Direction,
    ctx: Arc<PodCtx>,
    mut stopped: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let guard = ctx.tracker.track();
                    match dir {
                        Direction::Hbone => tokio::spawn(conn::hbone_inbound(ctx.clone(), stream, guard)),
                        _ => tokio::spawn(conn::handle(ctx.clone(), dir, stream, peer, guard)),
                    };
                }
                Err(e) => {
                    tracing::warn!(pod = %ctx.key, direction = dir.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => break,
            _ = shutdown.changed() => break,
        }
    }
    // Dropping the listener closes it; queued connections migrate to a
    // successor's listener (tcp_migrate_req) or are refused.
}

/// A listening socket created inside `netns`.
fn listen(netns: &Netns, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Listen {
        addr,
        netns: netns.path().display().to_string(),
        source,
    };
    let sock = netns
        .run(|| -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() {
                // [::]:15006 takes IPv4 too; [::1]:15001 only IPv6.
                s.set_only_v6(!addr.ip().is_unspecified())?;
            }
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(s)
        })?
        .map_err(err)?;
    TcpListener::from_std(std::net::TcpListener::from(sock)).map_err(err)
}

/// `net.ipv4.tcp_migrate_req` is per netns; without it a closing listener
/// resets the connections in its accept queue even when a successor exists.
fn enable_listener_migration(netns: &Netns) {
    let r = netns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"));
    if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        tracing::warn!(netns = %netns.path().display(), error = %e, "cannot enable tcp_migrate_req; connections queued during an agent handover may be reset");
    }
}
