//! Where traffic goes: the CONNECT's `:authority` names a destination (a
//! Service VIP:port or a workload's pod IP:port); each request (or the one
//! opaque connection) then picks an endpoint of it, from the current
//! snapshot, so config changes apply from the next request on. One backend
//! per Service until routing rules come.
use std::net::SocketAddr;

use cluster::state::{ActiveGuard, State, Workload};
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
}

impl RouteError {
    /// Envoy's response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            RouteError::NoRoute(_) => "NR",
            RouteError::NoHealthyUpstream(_) => "UH",
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

/// An endpoint of `dest` for one request.
pub fn pick(state: &State, dest: &Dest) -> Result<Endpoint, RouteError> {
    match dest {
        Dest::Service { vip, .. } => {
            let r = state
                .resolve(*vip)
                .ok_or_else(|| RouteError::NoRoute(format!("{vip} is no service VIP any more")))?
                .map_err(RouteError::NoHealthyUpstream)?;
            let workload = state.by_ip(r.endpoint.ip());
            let mut identities: Vec<SpiffeId> = workload.iter().map(|w| w.identity.clone()).collect();
            identities.extend(r.extra_sans.iter().cloned());
            Ok(Endpoint {
                addr: r.endpoint,
                workload,
                identities,
                service: Some(ServiceInfo {
                    hostname: r.hostname.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                }),
                _active: Some(r._active),
            })
        }
        Dest::Workload { addr } => {
            let w = state
                .by_ip(addr.ip())
                .ok_or_else(|| RouteError::NoRoute(format!("{} is no workload any more", addr.ip())))?;
            Ok(Endpoint {
                addr: *addr,
                identities: vec![w.identity.clone()],
                workload: Some(w),
                service: None,
                _active: None,
            })
        }
    }
}
