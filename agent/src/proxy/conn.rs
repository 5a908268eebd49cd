//! One captured connection: find where it was going, carry it there from
//! inside the pod's netns (marked so capture lets it pass), and write one
//! access-log line when it closes.
//!
//! * Outbound to a destination bound to a waypoint (a Service VIP, or a pod
//!   bound as a workload): HBONE to one of the waypoint's ready pods
//!   (round robin) with `:authority` = the original destination, accepting
//!   only the waypoint's identity. A missing waypoint or one without a
//!   ready pod refuses the connection (never direct).
//! * Outbound to a mesh pod: HBONE to `<pod IP>:15008` with the source pod's
//!   identity, accepting only the destination pod's identity.
//! * Outbound elsewhere, plaintext inbound (15006), or no CA configured:
//!   plain TCP, forwarded zero-copy (splice).
//! * HBONE inbound (15008): TLS with the destination pod's identity, CONNECT
//!   checked (a pod bound as a workload accepts only its waypoint's
//!   identity: others get 401, "bypassed waypoint"), then the application is
//!   dialled inside the pod.
//!
//! Never forwarded: a destination that is one of the agent's own ports at
//! the pod's own address or loopback (a self-loop); such a connection is
//! reset (HBONE: 400). Every connection that is not carried is counted in
//! `mesh_agent_connections_refused_total` and logged with its reason.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use agent_common::{AGENT_MARK, FORWARD_MARK, HBONE_PORT};
use http::StatusCode;
use mesh::{
    hbone::{self, ConnectHeaders, HboneError, Inbound, Refusal},
    pool::PoolKey,
    splice::{self, Copied, Read},
};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{is_self_loop, reset, Admitted, Direction, MeshCtx, PodCtx};
use crate::{
    metrics::{Reason, Side, TcpLabels},
    rbac,
    state::{Resolved, Via},
};

/// Istio's default cluster name (`k8s.cluster.name` in `baggage`).
const CLUSTER_NAME: &str = "Kubernetes";

/// How a connection was carried, for the access log.
struct Outcome {
    protocol: &'static str,
    peer_identity: Option<String>,
    copied: Copied,
    /// Set when the connection was not carried.
    refused: Option<Reason>,
    /// The waypoint it was sent through (or refused for).
    waypoint: Option<String>,
}

impl Outcome {
    /// Not carried: `result` is `<reason>: <detail>` in the access log.
    fn refused(protocol: &'static str, reason: Reason, detail: impl std::fmt::Display) -> Self {
        Outcome {
            protocol,
            peer_identity: None,
            copied: Copied::failed(format!("{}: {detail}", reason.as_str())),
            refused: Some(reason),
            waypoint: None,
        }
    }

    fn through(mut self, waypoint: impl ToString) -> Self {
        self.waypoint = Some(waypoint.to_string());
        self
    }

    fn carried(protocol: &'static str, peer_identity: Option<String>, copied: Copied) -> Self {
        Outcome {
            protocol,
            peer_identity,
            copied,
            refused: None,
            waypoint: None,
        }
    }
}

/// Where an outbound connection goes.
struct Route {
    /// What is dialled: the destination, or the endpoint a VIP resolved to.
    target: SocketAddr,
    service: Option<Resolved>,
    /// Through this waypoint instead.
    via: Option<Via>,
}

/// The waypoint `dst` (a VIP or a pod) is bound to; else a VIP's endpoint,
/// through the endpoint's waypoint when that pod is bound as a workload
/// (its agent accepts nothing else); else `dst` itself.
fn route(ctx: &PodCtx, dst: SocketAddr) -> Result<Route, Outcome> {
    let snap = ctx.state.snapshot();
    let steered = |s: Result<Via, crate::state::Unavailable>| {
        s.map_err(|e| {
            tracing::warn!(pod = %ctx.key, dst = %dst, waypoint = %e.waypoint, status = e.status.as_str(), "connection refused: waypoint unavailable");
            Outcome::refused("tcp", Reason::WaypointUnavailable, &e).through(&e.waypoint)
        })
    };
    if let Some(s) = snap.steer(dst) {
        return Ok(Route {
            target: dst,
            service: None,
            via: Some(steered(s)?),
        });
    }
    let (target, service) = match ctx.state.resolve(dst) {
        None => {
            return Ok(Route {
                target: dst,
                service: None,
                via: None,
            })
        }
        Some(Ok(r)) => (r.endpoint, r),
        // Fail closed: a VIP is no address to connect to by itself.
        Some(Err(e)) => return Err(Outcome::refused("tcp", Reason::NoEndpoint, e)),
    };
    let via = snap.steer(target).map(steered).transpose()?;
    Ok(Route {
        target,
        service: Some(service),
        via,
    })
}

/// `read`: how `client` must be read ([`Read::Recv`] when it is our end of
/// a sockmap-accelerated hop).
pub async fn handle(
    ctx: Arc<PodCtx>,
    dir: Direction,
    mut client: TcpStream,
    read: Read,
    peer: SocketAddr,
    _admitted: Admitted,
) {
    let start = Instant::now();
    let peer = canonical(peer);
    let Some(dst) = original_destination(&ctx, dir, &client, peer) else {
        // Fail closed: without the original destination the connection
        // cannot be carried, and it must never go anywhere else.
        let o = Outcome::refused("tcp", Reason::NoOriginalDestination, "capture recorded none");
        return finish(&ctx, dir, Some(client), peer, peer, None, &o, start);
    };
    tune(&client);
    let Route { target, service, via } = match dir {
        Direction::Outbound => match route(&ctx, dst) {
            Ok(r) => r,
            Err(o) => return finish(&ctx, dir, Some(client), peer, dst, None, &o, start),
        },
        _ => Route {
            target: dst,
            service: None,
            via: None,
        },
    };
    if is_self_loop(&ctx.ips, target) {
        let o = Outcome::refused(
            "tcp",
            Reason::SelfLoop,
            format!("{target} is the agent's own listener in this pod"),
        );
        return finish(&ctx, dir, Some(client), peer, dst, None, &o, start);
    }
    // A steered connection's peer is the waypoint pod (its identity, mTLS
    // to it); the service it is for stays in the service labels.
    let peer_ip = via.as_ref().map_or(target.ip(), |v| v.pod.ip());
    let mut labels = labels(&ctx, dir, peer.ip(), peer_ip, None);
    let svc = matches!(dir, Direction::Outbound)
        .then(|| ctx.state.snapshot().service_at(dst.ip()).cloned())
        .flatten();
    if let Some(svc) = &svc {
        labels.destination_service = svc.hostname();
        labels.destination_service_name = svc.name.clone();
        labels.destination_service_namespace = svc.namespace.clone();
    }
    // The access log's endpoint: the waypoint pod, else what was dialled.
    let endpoint = via.as_ref().map_or(target, |v| v.pod);
    let hostname = svc.as_ref().map(|s| s.hostname()).unwrap_or_default();
    let logged = (svc.is_some() || via.is_some()).then_some((hostname.as_str(), endpoint));
    ctx.metrics.opened(&labels);
    // `client` comes back from every branch but a plain inbound one the
    // kernel path took (refused connections are reset through it).
    let (outcome, client) = match (dir, &ctx.mesh, via) {
        (Direction::Outbound, Some(mesh), Some(v)) => (
            tunnel(
                &ctx,
                mesh,
                &mut client,
                read,
                peer,
                v.authority,
                v.pod,
                vec![v.identity],
            )
            .await
            .through(&v.waypoint),
            Some(client),
        ),
        (Direction::Outbound, None, Some(v)) => (
            Outcome::refused(
                "tcp",
                Reason::WaypointUnavailable,
                format!(
                    "{} is bound to waypoint {}, reached only over HBONE (no --ca-address); not sent direct",
                    v.authority, v.waypoint
                ),
            )
            .through(&v.waypoint),
            Some(client),
        ),
        (Direction::Outbound, Some(mesh), None) => match ctx.state.by_ip(target.ip()).filter(|w| w.hbone) {
            Some(w) => {
                // The endpoint's own identity, or one the service vouches for.
                let mut expected = vec![(*w.identity).clone()];
                expected.extend(service.iter().flat_map(|r| r.extra_sans.iter().cloned()));
                let hbone_dst = SocketAddr::new(target.ip(), HBONE_PORT);
                let o = tunnel(&ctx, mesh, &mut client, read, peer, target, hbone_dst, expected).await;
                (o, Some(client))
            }
            None => plain(&ctx, client, read, target, None).await,
        },
        (Direction::Outbound, None, None) => plain(&ctx, client, read, target, None).await,
        _ => {
            // Plaintext inbound: no identity, so the waypoint binding,
            // PeerAuthentication and authorization decide with principal = none.
            let conn = rbac::Conn {
                principal: None,
                src_ip: peer.ip(),
                dst_port: dst.port(),
            };
            let snap = ctx.state.snapshot();
            match snap.check_waypoint(dst.ip(), None) {
                Err(b) => (bypassed(&ctx, b), Some(client)),
                Ok(()) => match snap.authorize(dst.ip(), &conn) {
                    Ok(()) => plain(&ctx, client, read, dst, Some(conn)).await,
                    Err(denied) => (Outcome::refused("tcp", Reason::Denied, denied.0), Some(client)),
                },
            }
        }
    };
    ctx.metrics
        .closed(&labels, outcome.copied.sent, outcome.copied.received);
    drop(service);
    finish(&ctx, dir, client, peer, dst, logged, &outcome, start);
}

/// Refuses an inbound connection that did not come through the
/// destination's waypoint.
fn bypassed(ctx: &PodCtx, b: crate::state::Bypass) -> Outcome {
    tracing::warn!(pod = %ctx.key, peer = %b.peer, waypoint = %b.waypoint, "connection refused: bypassed waypoint");
    let waypoint = b.waypoint.clone();
    Outcome::refused("tcp", Reason::BypassedWaypoint, b).through(waypoint)
}

/// Ends a connection: a refused one is reset (so the client sees an error,
/// never a clean end it could take for success) and counted; every one is
/// logged.
#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &PodCtx,
    dir: Direction,
    client: Option<TcpStream>,
    src: SocketAddr,
    dst: SocketAddr,
    via: Option<(&str, SocketAddr)>,
    o: &Outcome,
    start: Instant,
) {
    if let Some(reason) = o.refused {
        ctx.refusals.count(dir.as_str(), reason);
        // Refused connections always come back (see `handle`).
        if let Some(client) = client {
            reset(client);
        }
    }
    log_access(ctx, dir, src, dst, via, o, start);
}

/// Istio's metric labels for a connection this agent carries: as the source
/// (outbound) or as the destination (inbound; `mtls_peer` for HBONE).
fn labels(ctx: &PodCtx, dir: Direction, src_ip: IpAddr, dst_ip: IpAddr, mtls_peer: Option<String>) -> TcpLabels {
    let snap = ctx.state.snapshot();
    let by_ip = |ip: IpAddr| snap.workloads.get(&ip.to_canonical());
    let own = ctx.ips.first().and_then(|ip| by_ip(*ip));
    let own_principal = ctx.mesh.as_ref().map(|_| ctx.identity.to_string());
    match dir {
        Direction::Outbound => {
            let peer = by_ip(dst_ip);
            let mtls = ctx.mesh.is_some() && peer.is_some();
            let peer_principal = peer.filter(|_| mtls).map(|w| w.identity.to_string());
            TcpLabels::new(
                "source",
                Side {
                    workload: own,
                    principal: own_principal,
                },
                Side {
                    workload: peer,
                    principal: peer_principal,
                },
                mtls,
            )
        }
        Direction::Inbound | Direction::Hbone => TcpLabels::new(
            "destination",
            Side {
                workload: by_ip(src_ip),
                principal: mtls_peer.clone(),
            },
            Side {
                workload: own,
                principal: own_principal,
            },
            mtls_peer.is_some(),
        ),
    }
}

/// One line per connection. `dst` is what the client dialled; `via` the
/// service and the endpoint it was sent to, when `dst` was a service VIP.
fn log_access(
    ctx: &PodCtx,
    dir: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    via: Option<(&str, SocketAddr)>,
    o: &Outcome,
    start: Instant,
) {
    // Outbound: the peer is the destination; inbound: the source.
    let (src_identity, dst_identity) = match dir {
        Direction::Outbound => (Some(ctx.identity.to_string()), o.peer_identity.clone()),
        _ => (o.peer_identity.clone(), Some(ctx.identity.to_string())),
    };
    tracing::info!(
        target: "access",
        pod = %ctx.key,
        direction = dir.as_str(),
        protocol = o.protocol,
        src = %src,
        dst = %dst,
        service = via.map_or("", |v| v.0),
        endpoint = %via.map_or(dst, |v| v.1),
        waypoint = o.waypoint.as_deref().unwrap_or(""),
        src_identity = src_identity.as_deref().unwrap_or(""),
        dst_identity = dst_identity.as_deref().unwrap_or(""),
        // Mutual TLS with a verified peer (a refused tunnel had none).
        mtls = o.protocol == "hbone" && o.peer_identity.is_some(),
        bytes_sent = o.copied.sent,
        bytes_received = o.copied.received,
        duration_ms = start.elapsed().as_millis() as u64,
        result = %o.copied.result,
        "connection closed"
    );
}

/// Plain TCP; an authorized inbound connection (`policed`) is made with the
/// client's source address and stays registered for policy re-checks.
/// `read`: how `client` must be read (see [`handle`]). Gives `client` back
/// unless the kernel path took it (inbound, its socket to the peer is the
/// one it watches).
async fn plain(
    ctx: &PodCtx,
    client: TcpStream,
    read: Read,
    dst: SocketAddr,
    policed: Option<rbac::Conn>,
) -> (Outcome, Option<TcpStream>) {
    // Inbound (policed) connections reach the app with the client's address.
    let upstream = match &policed {
        Some(c) => connect_to_app(ctx, c.src_ip, dst).await,
        None => connect_from_pod(ctx, dst).await.map(|s| (s, Read::Splice)),
    };
    match upstream {
        Ok((upstream, upstream_read)) => {
            tune(&upstream);
            let inbound = policed.is_some();
            let _registration = policed.map(|c| ctx.open.register(&ctx.key, dst.ip(), c, &[&client, &upstream]));
            let kernel = ctx.orig.sockmap().is_some_and(|e| e.forwarding());
            let (copied, client) = match (kernel, inbound) {
                (false, _) => (
                    splice::forward_reading(&client, read, &upstream, upstream_read).await,
                    Some(client),
                ),
                // The in-pod hop is the client's side outbound, the
                // upstream's inbound.
                (true, false) => (
                    super::forward::forward(ctx, Direction::Outbound, &client, read, upstream, upstream_read).await,
                    Some(client),
                ),
                (true, true) => (
                    super::forward::forward(ctx, Direction::Inbound, &upstream, upstream_read, client, read).await,
                    None,
                ),
            };
            (Outcome::carried("tcp", None, copied), client)
        }
        Err(e) => (
            Outcome::refused("tcp", Reason::Unreachable, format!("connect failed: {e}")),
            Some(client),
        ),
    }
}

/// HBONE to `hbone_dst` (the destination pod's, or a waypoint pod's, HBONE
/// port) with CONNECT `dst`, as this pod's identity, accepting only
/// `expected` identities.
/// `read`: how `client` is read (see [`handle`]); the bridge reads it
/// with recvmsg either way, and calls its hooks.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    ctx: &PodCtx,
    mesh: &MeshCtx,
    client: &mut TcpStream,
    read: Read,
    peer: SocketAddr,
    dst: SocketAddr,
    hbone_dst: SocketAddr,
    expected: Vec<mesh::identity::SpiffeId>,
) -> Outcome {
    // A new pod's first connections may come before its certificate: wait
    // for it, bounded, then fail closed (no identity means no mTLS, and no
    // plaintext either).
    let Some(cert) = mesh.certs.wait(&ctx.identity, mesh.cert_wait).await else {
        return Outcome::refused(
            "hbone",
            Reason::NoCertificate,
            format!(
                "{} has no certificate after {:?} (fail closed)",
                ctx.identity, mesh.cert_wait
            ),
        );
    };
    let headers = ConnectHeaders {
        authority: dst,
        client: SocketAddr::new(pod_ip_like(ctx, dst.ip()), peer.port()),
        baggage: {
            let own = ctx.ips.first().and_then(|ip| ctx.state.by_ip(*ip));
            let label = |k: &str| own.as_ref().and_then(|w| w.labels.get(k).cloned());
            let app = label("app").unwrap_or_else(|| pod_name(&ctx.key).to_string());
            let version = label("version").unwrap_or_else(|| "unknown".into());
            hbone::baggage(CLUSTER_NAME, &ctx.identity.namespace, &app, &app, &version)
        },
    };
    let key = PoolKey {
        src_identity: ctx.identity.clone(),
        dst_identities: expected.clone(),
        dst: hbone_dst,
        src_ip: pod_ip_like(ctx, hbone_dst.ip()),
    };
    let dial = || async {
        let tls = mesh.tls.client(&cert, &expected)?;
        let tcp = connect_from_pod(ctx, hbone_dst)
            .await
            .map_err(|source| HboneError::Connect {
                peer: hbone_dst,
                source,
            })?;
        tune(&tcp);
        Ok(hbone::Dialed { tcp, tls })
    };
    match mesh.pool.connect(&key, &cert.serial, &headers, dial).await {
        Ok((t, _stream)) => {
            let peer_identity = t.peer.as_ref().map(ToString::to_string);
            Outcome::carried("hbone", peer_identity, t.bridge(client, read.into_hooks()).await)
        }
        Err(HboneError::Status { status, .. }) if status == StatusCode::BAD_REQUEST => {
            Outcome::refused("hbone", Reason::BadRequest, format!("{hbone_dst} answered 400"))
        }
        Err(HboneError::Status { status, .. }) if status == StatusCode::UNAUTHORIZED => Outcome::refused(
            "hbone",
            Reason::Denied,
            format!("{hbone_dst} answered 401 (denied by its policy)"),
        ),
        Err(e) => Outcome::refused("hbone", Reason::Unreachable, format!("tunnel failed: {e}")),
    }
}

fn pod_name(key: &str) -> &str {
    key.split_once('/').map_or(key, |(_, n)| n)
}

/// The pod's own address of the same family as `like` (for `forwarded`).
fn pod_ip_like(ctx: &PodCtx, like: IpAddr) -> IpAddr {
    ctx.ips
        .iter()
        .copied()
        .find(|i| i.is_ipv4() == like.is_ipv4())
        .unwrap_or(like)
}

/// Terminates HBONE on this pod's 15008 listener; `drain` starts a graceful
/// shutdown (GOAWAY) of the connection.
pub async fn hbone_inbound(
    ctx: Arc<PodCtx>,
    tcp: TcpStream,
    _admitted: Admitted,
    drain: impl Future<Output = ()> + Send + 'static,
) {
    let Some(mesh) = ctx.mesh.clone() else { return };
    // The peer's handshake waits while a new pod's certificate is on the way.
    let Some(cert) = mesh.certs.wait(&ctx.identity, mesh.cert_wait).await else {
        ctx.refusals.count(Direction::Hbone.as_str(), Reason::NoCertificate);
        tracing::error!(pod = %ctx.key, identity = %ctx.identity, "HBONE connection refused: no certificate (fail closed)");
        return reset(tcp);
    };
    let cfg = match mesh.tls.server(&cert) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(pod = %ctx.key, error = %e, "HBONE connection refused");
            return reset(tcp);
        }
    };
    tune(&tcp);
    let open = {
        let ctx = ctx.clone();
        move |i: Inbound| {
            let ctx = ctx.clone();
            async move { open_stream(&ctx, &i).await }
        }
    };
    let done = {
        let ctx = ctx.clone();
        move |i: Inbound, r: Result<Copied, Refusal>| stream_done(&ctx, i, r)
    };
    if let Err(e) = hbone::serve(tcp, cfg, ctx.connect_timeout, drain, open, done).await {
        tracing::warn!(pod = %ctx.key, error = %e, "HBONE connection failed");
    }
}

/// Refuses a CONNECT: counted here, answered with `status` by the server.
fn refuse(ctx: &PodCtx, reason: Reason, status: StatusCode, detail: impl std::fmt::Display) -> Refusal {
    ctx.refusals.count(Direction::Hbone.as_str(), reason);
    Refusal {
        status,
        reason: format!("{}: {detail}", reason.as_str()),
    }
}

/// One CONNECT: checks, then the connection to the application. The guard
/// keeps the stream in the policy registry and under the pod's cap.
async fn open_stream(
    ctx: &Arc<PodCtx>,
    i: &Inbound,
) -> Result<
    (
        TcpStream,
        splice::Hooks,
        (crate::proxy::policed::Registration, Admitted),
    ),
    Refusal,
> {
    // Only connections for this pod: never a relay to elsewhere.
    if !ctx.ips.contains(&i.authority.ip().to_canonical()) {
        let detail = format!("{} is not an address of pod {}", i.authority, ctx.key);
        return Err(refuse(ctx, Reason::BadRequest, StatusCode::BAD_REQUEST, detail));
    }
    if is_self_loop(&ctx.ips, i.authority) {
        let detail = format!("{} is the agent's own listener in this pod", i.authority);
        return Err(refuse(ctx, Reason::SelfLoop, StatusCode::BAD_REQUEST, detail));
    }
    let Some(admitted) = ctx.admit(Direction::Hbone) else {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("{}: the pod is at its connection limit", Reason::PodLimit.as_str()),
        });
    };
    let conn = rbac::Conn {
        principal: Some(i.peer.clone()),
        src_ip: i.remote.ip().to_canonical(),
        dst_port: i.authority.port(),
    };
    let snap = ctx.state.snapshot();
    if let Err(b) = snap.check_waypoint(i.authority.ip(), Some(&i.peer)) {
        tracing::warn!(pod = %ctx.key, peer = %b.peer, waypoint = %b.waypoint, "connection refused: bypassed waypoint");
        return Err(refuse(ctx, Reason::BypassedWaypoint, StatusCode::UNAUTHORIZED, b));
    }
    if let Err(denied) = snap.authorize(i.authority.ip(), &conn) {
        return Err(refuse(ctx, Reason::Denied, StatusCode::UNAUTHORIZED, denied.0));
    }
    // The HBONE bridge reads the app with recvmsg whatever `accelerate`
    // says; it calls its hooks.
    let (upstream, read) = connect_to_app(ctx, i.remote.ip(), i.authority)
        .await
        .map_err(|e| refuse(ctx, Reason::Unreachable, StatusCode::SERVICE_UNAVAILABLE, e))?;
    tune(&upstream);
    // Registered while the stream lasts, for policy re-checks.
    let registration = ctx.open.register(&ctx.key, i.authority.ip(), conn, &[&upstream]);
    ctx.metrics.opened(&labels(
        ctx,
        Direction::Hbone,
        i.remote.ip(),
        i.authority.ip(),
        Some(i.peer.to_string()),
    ));
    Ok((upstream, read.into_hooks(), (registration, admitted)))
}

/// Metrics and the access-log line of a finished (or refused) stream.
fn stream_done(ctx: &PodCtx, i: Inbound, r: Result<Copied, Refusal>) {
    let copied = match r {
        // The bridge counts app -> tunnel as sent; the access log
        // counts client -> server, as for every other connection.
        Ok(c) => {
            let l = labels(
                ctx,
                Direction::Hbone,
                i.remote.ip(),
                i.authority.ip(),
                Some(i.peer.to_string()),
            );
            ctx.metrics.closed(&l, c.received, c.sent);
            Copied {
                result: c.result,
                sent: c.received,
                received: c.sent,
            }
        }
        Err(refusal) => Copied::failed(format!("{}: {}", refusal.status.as_u16(), refusal.reason)),
    };
    let outcome = Outcome::carried("hbone", Some(i.peer.to_string()), copied);
    log_access(
        ctx,
        Direction::Hbone,
        canonical(i.remote),
        i.authority,
        None,
        &outcome,
        i.started,
    );
}

/// Outbound: CONN_ORIG, keyed by the client's address in the pod netns.
/// Inbound: sk_lookup kept the original destination as the local address.
fn original_destination(ctx: &PodCtx, dir: Direction, client: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    match dir {
        Direction::Outbound => ctx.orig.lookup(ctx.netns_cookie, peer),
        Direction::Inbound | Direction::Hbone => client.local_addr().ok().map(canonical),
    }
}

/// IPv4 peers of dual-stack listeners as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A connection to the application at `dst` inside the pod that carries the
/// client's address `client` as its source, so the app sees who is calling.
/// Falls back to an ordinary connection when the pod netns is not prepared
/// or the families differ. The app's replies are the agent's to read: the
/// connection is a sockmap hop (see [`super::accelerate`]), inserted before
/// the agent writes the first byte the app could answer; the [`Read`] says
/// how to read it.
async fn connect_to_app(ctx: &PodCtx, client: IpAddr, dst: SocketAddr) -> std::io::Result<(TcpStream, Read)> {
    let s = connect_to_app_tcp(ctx, client, dst).await?;
    let read = super::accelerate(ctx, &s);
    Ok((s, read))
}

async fn connect_to_app_tcp(ctx: &PodCtx, client: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let client = client.to_canonical();
    if !ctx.transparent || client.is_ipv4() != dst.is_ipv4() || ctx.ips.contains(&client) {
        return connect_from_pod(ctx, dst).await;
    }
    let sock = ctx.netns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking().cloexec(), None)?;
        s.set_mark(FORWARD_MARK)?;
        if client.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(client, 0).into())?;
        Ok(s)
    });
    let sock = sock.map_err(std::io::Error::other)??;
    let src = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("no local address"))?;
    // sk_lookup must not take this connection for a new inbound one.
    ctx.orig.allow_forward(src).map_err(std::io::Error::other)?;
    let r = bounded_connect(ctx, sock, dst).await;
    ctx.orig.forget_forward(src);
    r
}

/// connect(2) bounded by `--connect-timeout`.
async fn bounded_connect(ctx: &PodCtx, sock: Socket, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let connect = TcpSocket::from_std_stream(sock.into()).connect(dst);
    tokio::time::timeout(ctx.connect_timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {dst} within {:?}", ctx.connect_timeout),
            ))
        })
}

/// TCP_NODELAY (latency) and keepalive (dead peers) on a data-path socket.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = socket2::SockRef::from(s).set_keepalive(true);
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
    bounded_connect(ctx, sock, dst).await
}
