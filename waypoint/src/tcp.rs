//! Opaque TCP: after L4 policy (the caller's identity against the
//! endpoint's workload), bytes are copied to an endpoint over the
//! waypoint's own HBONE. Counted in `istio_tcp_*` and logged once.
use std::{sync::Arc, time::Instant};

use cluster::rbac;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    accesslog::{self, Entry},
    inbound::Downstream,
    metrics::{Outcome, Peer, RequestLabels, ServiceLabels, TcpLabels},
    route, upstream, Waypoint,
};

/// Forwards `io` (the accepted CONNECT stream) to an endpoint of the
/// destination, or closes it (the reason is logged and counted).
pub async fn forward<IO>(wp: Waypoint, down: Arc<Downstream>, mut io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut entry = Entry {
        start_time: accesslog::now(),
        protocol: "tcp",
        connect_authority: down.authority.to_string(),
        downstream_remote_address: down.remote.to_string(),
        source_principal: down.caller.to_string(),
        response_flags: "-".into(),
        ..Entry::default()
    };
    let src = Peer::of(down.source.as_ref(), Some(down.caller.to_string()));
    let flags = match connect(&wp, &down, &mut entry).await {
        Ok((up, dst, svc)) => {
            let labels = labels(&src, &dst, &svc, "-");
            wp.metrics().tcp_opened(&labels);
            let mut up = up;
            let (sent, received) = match tokio::io::copy_bidirectional(&mut io, &mut up).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "opaque TCP connection ended with an error");
                    (0, 0)
                }
            };
            entry.bytes_received = sent;
            entry.bytes_sent = received;
            wp.metrics().tcp_closed(&labels, sent, received);
            "-"
        }
        Err((dst, svc, flags)) => {
            let labels = labels(&src, &dst, &svc, flags);
            wp.metrics().tcp_opened(&labels);
            wp.metrics().tcp_closed(&labels, 0, 0);
            flags
        }
    };
    entry.response_flags = flags.into();
    entry.duration_ms = started.elapsed().as_millis() as u64;
    wp.access().log(&entry);
}

fn labels(src: &Peer, dst: &Peer, svc: &ServiceLabels, flags: &str) -> TcpLabels {
    RequestLabels::new(
        src,
        dst,
        svc,
        &Outcome {
            protocol: "tcp",
            code: 0,
            grpc_status: "",
            flags,
        },
    )
    .into()
}

type Failed = (Peer, ServiceLabels, &'static str);

/// Picks an endpoint, checks policy, opens the upstream.
async fn connect(
    wp: &Waypoint,
    down: &Downstream,
    entry: &mut Entry,
) -> Result<(upstream::Upstream, Peer, ServiceLabels), Failed> {
    let ep = route::pick(wp.state(), &route::To::Dest(down.dest.clone()), &[]).map_err(|e| {
        tracing::warn!(authority = %down.authority, error = %e, "opaque TCP connection closed");
        (Peer::of(None, None), ServiceLabels::default(), e.flag())
    })?;
    let dst = Peer::of(
        ep.workload.as_ref(),
        ep.workload.as_ref().map(|w| w.identity.to_string()),
    );
    let svc = ep
        .service
        .as_ref()
        .map(|s| ServiceLabels {
            host: s.hostname.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        })
        .unwrap_or_default();
    entry.upstream_host = ep.addr.to_string();
    entry.destination_service = svc.host.clone();
    entry.destination_principal = dst.principal.clone();
    let conn = rbac::Conn {
        principal: Some(down.caller.clone()),
        src_ip: down.client,
        dst_port: ep.addr.port(),
    };
    if let Err(d) = wp.state().snapshot().authorize(ep.addr.ip(), &conn) {
        tracing::info!(caller = %down.caller, endpoint = %ep.addr, reason = %d.0, "opaque TCP denied by policy");
        return Err((dst, svc, "-"));
    }
    match upstream::open(wp, &ep, std::net::SocketAddr::new(down.client, 0)).await {
        Ok(up) => Ok((up, dst, svc)),
        Err(e) => {
            tracing::warn!(endpoint = %ep.addr, error = %e, "cannot reach the endpoint");
            Err((dst, svc, "UF"))
        }
    }
}
