//! The agent's pod-local listeners and what every connection shares.
//!
//! Per enrolled pod, inside its network namespace:
//! * 127.0.0.1:15001 and [::1]:15001 receive the pod's redirected outbound
//!   connects; the original destination comes from CONN_ORIG.
//! * [::]:15006 receives inbound connections handed over by sk_lookup; the
//!   accepted socket's local address *is* the original destination.
//! * [::]:15008 terminates HBONE (with a CA).
//!
//! Every listener uses SO_REUSEPORT so a new agent can bind next to a running
//! one (graceful handover); `net.ipv4.tcp_migrate_req=1` in the pod netns moves
//! connections still queued on a closing listener to its successor.
//!
//! Each pod may have at most `max_connections_per_pod` connections (accepted
//! sockets and HBONE streams) open through the agent; more are reset and
//! counted, so one pod cannot starve the others of file descriptors.
pub mod conn;
pub mod forward;
pub mod policed;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_common::{hop, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use mesh::{
    identity::SpiffeId,
    splice::{Hooks, Read},
    tls,
};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::watch,
    task::JoinHandle,
};

use crate::{
    capture::sockmap::Reported,
    capture::ProxyMaps,
    identity::CertStore,
    metrics::{Reason, Refusals},
    netns::Netns,
    state::State,
};

/// The ports the agent listens on inside every enrolled pod. A connection to
/// one of them at the pod's own address (or loopback) would reach the
/// agent's own listener again: an endless loop that exhausts the agent.
pub const AGENT_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// Whether forwarding to `dst` from inside the pod with `pod_ips` would loop
/// back into the agent.
pub fn is_self_loop(pod_ips: &[IpAddr], dst: SocketAddr) -> bool {
    let ip = dst.ip().to_canonical();
    AGENT_POD_PORTS.contains(&dst.port()) && (ip.is_loopback() || ip.is_unspecified() || pod_ips.contains(&ip))
}

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
    /// TLS configs per certificate serial (never per connection).
    pub tls: tls::Configs,
    /// Outbound HBONE connections, shared by all pods of the node.
    pub pool: mesh::pool::Pool,
    /// How long a connection waits for its pod's certificate.
    pub cert_wait: Duration,
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
    pub refusals: Refusals,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub orig: Arc<ProxyMaps>,
    pub tracker: Arc<Tracker>,
    /// Bound on TCP connects (to apps and peers).
    pub connect_timeout: Duration,
    /// Connections open through the agent for this pod, under its cap.
    pub limit: ConnLimit,
}

/// A pod's open connections and `--max-connections-per-pod`.
pub struct ConnLimit {
    open: AtomicUsize,
    max: usize,
    /// When a refusal was last logged: once a second is enough.
    logged: Mutex<Option<Instant>>,
}

impl ConnLimit {
    pub fn new(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
            logged: Mutex::new(None),
        }
    }

    /// Counts one more, unless at the cap.
    fn take(&self) -> bool {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max).then_some(n + 1))
            .is_ok()
    }

    /// Whether to log this refusal (the first in a second).
    fn log_refusal(&self) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let due = logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            *logged = Some(Instant::now());
        }
        due
    }
}

/// One admitted connection (or HBONE stream) of a pod: counted against the
/// pod's cap and in the node's drain tracker until dropped.
pub struct Admitted {
    ctx: Arc<PodCtx>,
    _track: TrackGuard,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.ctx.limit.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PodCtx {
    /// Admits one more connection, or `None` (counted, logged at most once a
    /// second) when the pod is at its cap.
    pub fn admit(self: &Arc<Self>, dir: Direction) -> Option<Admitted> {
        if self.limit.take() {
            return Some(Admitted {
                ctx: self.clone(),
                _track: self.tracker.track(),
            });
        }
        self.refusals.count(dir.as_str(), Reason::PodLimit);
        if self.limit.log_refusal() {
            tracing::warn!(
                pod = %self.key, direction = dir.as_str(), limit = self.limit.max,
                "connection refused: the pod has reached --max-connections-per-pod"
            );
        }
        None
    }
}

/// Closes `s` with a RST (SO_LINGER 0): the client sees "connection reset"
/// at once instead of a clean end of stream it could mistake for success.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Exponential back-off for accept loops: an error such as EMFILE repeats
/// at once, and a loop that retries at once only burns the CPU.
pub struct AcceptBackoff(Duration);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff(Self::FIRST)
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    /// The accepted connection of `r`; on an error (logged with `listener`)
    /// waits, twice as long as the last time in a row, and gives `None`.
    pub async fn accepted<T>(&mut self, r: std::io::Result<T>, listener: &str) -> Option<T> {
        match r {
            Ok(conn) => {
                self.0 = Self::FIRST;
                Some(conn)
            }
            Err(e) => {
                tracing::warn!(listener, error = %e, retry_in_ms = self.0.as_millis() as u64, "accept failed");
                tokio::time::sleep(self.0).await;
                self.0 = (self.0 * 2).min(Self::MAX);
                None
            }
        }
    }
}

/// The running listeners of one pod; dropping it stops accepting.
pub struct PodProxy {
    inbound_fd: RawFd,
    stop: watch::Sender<bool>,
    _tasks: Vec<JoinHandle<()>>,
}

impl PodProxy {
    /// Creates the pod's listeners inside its netns and starts accepting on
    /// the data plane's runtime (`dp`).
    pub fn start(ctx: Arc<PodCtx>, shutdown: &watch::Receiver<bool>, dp: &Handle) -> Result<Self, ProxyError> {
        // Listeners register with the data plane's reactor, not the caller's.
        let _in_dp = dp.enter();
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
    stopped: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    let stop = stop_signal(stopped.clone(), shutdown.clone());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Some((stream, peer)) = backoff.accepted(r, &ctx.key).await else { continue };
                // The app may write at once: our end goes into SM_AGENT
                // before anything else (see capture::sockmap).
                let read = match dir {
                    Direction::Outbound => accelerate(&ctx, &stream),
                    _ => Read::Splice,
                };
                let Some(admitted) = ctx.admit(dir) else {
                    // The hooks first: what they hold refers to this socket.
                    drop(read);
                    reset(stream);
                    continue;
                };
                match dir {
                    Direction::Hbone => {
                        let drain = stop_signal(stopped.clone(), shutdown.clone());
                        tokio::spawn(conn::hbone_inbound(ctx.clone(), stream, admitted, drain))
                    }
                    _ => tokio::spawn(conn::handle(ctx.clone(), dir, stream, read, peer, admitted)),
                };
            }
            () = &mut stop => break,
        }
    }
    // Dropping the listener closes it; queued connections migrate to a
    // successor's listener (tcp_migrate_req) or are refused.
}

/// Puts the agent's end `sock` of an in-pod hop (an accepted 15001
/// connection, or the agent's connection to an app) into SM_AGENT when
/// sockmap acceleration is on; from then on the app's bytes may arrive
/// through sk_msg, so the socket must be read with recvmsg. With phase two
/// on, it also goes into SM_AGENT_TX, so what the agent writes may skip TCP.
/// Called before the agent writes to `sock`.
///
/// A failed insert does not mean the hop is on TCP: sockops may have put
/// an accepted socket in already, and an app that wrote and half-closed at
/// once leaves it in CLOSE_WAIT, where the kernel refuses the agent's own
/// insert while its bytes wait in the socket's sk_msg queue (splice would
/// read only the FIN). So the socket is read with recvmsg either way, which
/// reads both queues, until its first bytes say the hop went TCP.
pub fn accelerate(ctx: &PodCtx, sock: &TcpStream) -> Read {
    let Some(ends) = ctx.orig.sockmap() else {
        return Read::Splice;
    };
    let (Ok(app), Ok(ours)) = (sock.peer_addr(), sock.local_addr()) else {
        return Read::Splice;
    };
    if let Err(e) = ends.insert(ctx.netns_cookie, sock, app, ours) {
        tracing::debug!(pod = %ctx.key, app = %app, error = %e, "cannot insert the agent's socket into SM_AGENT: the hop is redirected only if sockops put it there");
    }
    // Phase two: the agent has not written to the app yet. A direction the
    // agent had to create (decided TCP) leaves with the connection.
    let created = ends
        .to_app(ctx.netns_cookie, sock, app, ours)
        .map(|c| ForgetOnDrop(ctx.orig.clone(), c));
    // A hop whose first byte found us missing stays on TCP: splice it
    // again after the first bytes.
    let (maps, netns) = (ctx.orig.clone(), ctx.netns_cookie);
    let settle = move || maps.sockmap().is_some_and(|e| e.release_if_tcp(netns, app, ours));
    // What the agent has read bounds what may wait in its socket: the
    // sk_msg program sends a hop back to TCP beyond it (a redirected send
    // never blocks). Reported every READ_REPORT_STEP bytes, until the hop
    // has no count any more (it fell back, went TCP or closed); after every
    // read once the hop forwards in the kernel (the app's sends switch when
    // the report covers all). Called after the bytes went on. A hop that
    // fell back is spliced again once its redirected bytes are read.
    let maps = ctx.orig.clone();
    let report = Arc::new(forward::Report::default());
    let shared = report.clone();
    let (mut read, mut reported, mut now) = (0u64, 0u64, Reported::Counting);
    let progress = move |n: usize| {
        read += n as u64;
        shared.forwarded.store(read, Ordering::SeqCst);
        let eager = shared.eager.load(Ordering::SeqCst);
        if now == Reported::Counting && (eager || read - reported >= hop::READ_REPORT_STEP) {
            reported = read;
            now = maps
                .sockmap()
                .map_or(Reported::Gone, |e| e.report_read(netns, app, ours, read));
        }
        let drained = matches!(now, Reported::FellBack { sent } if hop::read_all(sent, read));
        if drained {
            if let Some(e) = maps.sockmap() {
                e.respliced().inc();
            }
        }
        drained
    };
    Read::Recv(Hooks {
        settle: Some(Box::new(settle)),
        progress: Some(Box::new(progress)),
        hold: Some(Box::new(forward::Held {
            created,
            report,
            app,
            agent: ours,
        })),
    })
}

/// An SM_TO_APP entry the agent created for a connection, removed when the
/// agent stops reading the app's side (the hooks that hold it drop then;
/// the entry matters only while the app's socket is in SM_APP, and the
/// app's close callback removes it too).
pub struct ForgetOnDrop(Arc<ProxyMaps>, crate::capture::sockmap::CreatedTcp);

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        if let Some(ends) = self.0.sockmap() {
            ends.forget_to_app(&self.1);
        }
    }
}

/// Resolves once the pod is unenrolled (`stopped`) or the agent shuts down.
pub async fn stop_signal(mut stopped: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
    tokio::select! {
        _ = stopped.wait_for(|s| *s) => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_loops_are_the_agents_ports_at_the_pods_own_addresses() {
        let pod: Vec<IpAddr> = vec!["10.1.2.11".parse().unwrap(), "fd00:1:2::11".parse().unwrap()];
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for looping in [
            "10.1.2.11:15006",
            "10.1.2.11:15001",
            "10.1.2.11:15008",
            "[fd00:1:2::11]:15006",
            "[::ffff:10.1.2.11]:15006",
            "127.0.0.1:15006",
            "[::1]:15001",
            "0.0.0.0:15008",
        ] {
            assert!(is_self_loop(&pod, at(looping)), "{looping}");
        }
        for fine in ["10.1.2.11:8080", "10.1.2.12:15008", "10.1.2.12:15006", "127.0.0.1:9000"] {
            assert!(!is_self_loop(&pod, at(fine)), "{fine}");
        }
    }
}
