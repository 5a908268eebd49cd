//! Where traffic goes: the CONNECT's `:authority` names a destination (a
//! Service VIP:port or a workload's pod IP:port); each request (or the one
//! opaque connection) then picks an endpoint of it, from the current
//! snapshot, so config changes apply from the next request on; each try of
//! a request avoids the endpoints its earlier tries used. Routing rules
//! (`crate::http::forward`) may send it to another Service instead.
use std::net::{IpAddr, SocketAddr};

use cluster::state::{ActiveGuard, Pick, PickError, Resolved, State, Workload};
use mesh::identity::SpiffeId;

use crate::sniff::{self, Declared};

/// What an authority names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Service {
        vip: SocketAddr,
        declared: Option<Declared>,
    },
    Workload {
        addr: SocketAddr,
    },
}

/// The Service a request went to (for labels and logs).
#[derive(Debug, Clone, Default)]
pub struct ServiceInfo {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

/// One endpoint picked for one request or connection.
pub struct Endpoint {
    /// `pod ip:target port`.
    pub addr: SocketAddr,
    pub workload: Option<Workload>,
    /// Identities the endpoint may present.
    pub identities: Vec<SpiffeId>,
    pub service: Option<ServiceInfo>,
    /// Counted as active on the endpoint (least-connections) until dropped.
    pub _active: Option<ActiveGuard>,
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    /// The destination is gone (Envoy's NR: 404 for HTTP).
    #[error("no route: {0}")]
    NoRoute(String),
    /// The destination has no ready endpoint (Envoy's UH: 503).
    #[error("no healthy upstream: {0}")]
    NoHealthyUpstream(String),
    /// A route's backend names no Service or port (Envoy's NC, no cluster).
    #[error("no such backend: {0}")]
    NoCluster(String),
}

impl RouteError {
    /// Envoy's response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            RouteError::NoRoute(_) => "NR",
            RouteError::NoHealthyUpstream(_) => "UH",
            RouteError::NoCluster(_) => "NC",
        }
    }
}

/// The destination `authority` names now, if any.
pub fn destination(state: &State, authority: SocketAddr) -> Option<Dest> {
    let snap = state.snapshot();
    let ip = authority.ip().to_canonical();
    if let Some(&i) = snap.vips.get(&ip) {
        let port = snap.services[i]
            .spec
            .ports
            .iter()
            .find(|p| p.port == authority.port())?;
        return Some(Dest::Service {
            vip: authority,
            declared: sniff::declared(port.app_protocol.as_deref(), port.name.as_deref()),
        });
    }
    snap.workloads
        .contains_key(&ip)
        .then_some(Dest::Workload { addr: authority })
}

/// Where one request goes: the CONNECT's destination itself (no route, or
/// pod-addressed), or a route's backend Service.
#[derive(Debug, Clone)]
pub enum To {
    Dest(Dest),
    Service {
        host: String,
        /// The Service port; `None`: `fallback` if it has it, else its only port.
        port: Option<u16>,
        fallback: u16,
        /// A subset's labels.
        labels: Option<std::collections::BTreeMap<String, String>>,
    },
}

/// An endpoint of `to` for one try, avoiding `tried` while others exist.
pub fn pick(state: &State, to: &To, tried: &[IpAddr]) -> Result<Endpoint, RouteError> {
    let service = |r: Resolved, state: &State| {
        let workload = state.by_ip(r.endpoint.ip());
        let mut identities: Vec<SpiffeId> = workload.iter().map(|w| (*w.identity).clone()).collect();
        identities.extend(r.extra_sans.iter().cloned());
        Endpoint {
            addr: r.endpoint,
            workload,
            identities,
            service: Some(ServiceInfo {
                hostname: r.hostname.clone(),
                name: r.name.clone(),
                namespace: r.namespace.clone(),
            }),
            _active: Some(r._active),
        }
    };
    match to {
        To::Dest(Dest::Service { vip, .. }) => {
            let snap = state.snapshot();
            let i = snap
                .vips
                .get(&vip.ip().to_canonical())
                .ok_or_else(|| RouteError::NoRoute(format!("{vip} is no service VIP any more")))?;
            let host = snap.services[*i].spec.hostname();
            let want = Pick {
                port: Some(vip.port()),
                v4: vip.ip().to_canonical().is_ipv4(),
                exclude: tried.to_vec(),
                ..Pick::default()
            };
            let r = state
                .pick(&host, &want)
                .map_err(|e| RouteError::NoHealthyUpstream(e.to_string()))?;
            Ok(service(r, state))
        }
        To::Dest(Dest::Workload { addr }) => {
            let w = state
                .by_ip(addr.ip())
                .ok_or_else(|| RouteError::NoRoute(format!("{} is no workload any more", addr.ip())))?;
            Ok(Endpoint {
                addr: *addr,
                identities: vec![(*w.identity).clone()],
                workload: Some(w),
                service: None,
                _active: None,
            })
        }
        To::Service {
            host,
            port,
            fallback,
            labels,
        } => {
            let want = Pick {
                port: *port,
                fallback_port: Some(*fallback),
                labels: labels.clone(),
                exclude: tried.to_vec(),
                v4: true,
            };
            let r = match state.pick(host, &want) {
                // An IPv6-only Service.
                Err(PickError::NoEndpoint(_)) => state.pick(host, &Pick { v4: false, ..want }),
                r => r,
            }
            .map_err(|e| match e {
                PickError::NoEndpoint(_) => RouteError::NoHealthyUpstream(e.to_string()),
                e => RouteError::NoCluster(e.to_string()),
            })?;
            Ok(service(r, state))
        }
    }
}
