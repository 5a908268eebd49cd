//! The data path's metrics.
//!
//! * Istio-standard TCP metrics, so existing dashboards work unchanged:
//!   `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total` (response direction, server -> client) and
//!   `istio_tcp_received_bytes_total` (request direction, client -> server),
//!   with Istio's label set (`destination_service*` is `unknown` when the
//!   destination was not a service).
//! * `mesh_agent_connections_refused_total{direction, reason}`: connections
//!   of enrolled pods the agent did not carry (fail closed), by reason.
//! * `mesh_agent_waypoint_bindings{waypoint, kind, status}`: how many
//!   workloads and Services are bound to each waypoint, by binding status
//!   (anything but `Bound` means refused or direct traffic: a typo in a
//!   binding shows here, not as a silent blackhole).
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::state::Workload;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

/// One side of a connection as the labels describe it.
pub struct Side<'a> {
    pub workload: Option<&'a Workload>,
    /// SPIFFE ID if known (mTLS, or our own pod).
    pub principal: Option<String>,
}

fn name_ns_app_version(w: Option<&Workload>) -> (String, String, String, String) {
    match w {
        None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        Some(w) => {
            // Istio's canonical name: the `app` label, else the workload name.
            let name = w.key.split_once('/').map_or(&*w.key, |(_, n)| n);
            let app = w.labels.get("app").cloned().unwrap_or_else(|| name.to_string());
            let version = w.labels.get("version").cloned().unwrap_or_else(|| UNKNOWN.into());
            (app.clone(), w.identity.namespace.to_string(), app, version)
        }
    }
}

impl TcpLabels {
    pub fn new(reporter: &'static str, src: Side, dst: Side, mtls: bool) -> Self {
        let (sw, sns, sapp, sver) = name_ns_app_version(src.workload);
        let (dw, dns, dapp, dver) = name_ns_app_version(dst.workload);
        TcpLabels {
            reporter,
            source_workload: sw,
            source_workload_namespace: sns,
            source_principal: src.principal.unwrap_or_else(|| UNKNOWN.into()),
            source_app: sapp,
            source_version: sver,
            destination_service: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_workload: dw,
            destination_workload_namespace: dns,
            destination_principal: dst.principal.unwrap_or_else(|| UNKNOWN.into()),
            destination_app: dapp,
            destination_version: dver,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN },
        }
    }
}

/// Istio's TCP metrics with the agent's label set (`mesh::metrics`).
pub type TcpMetrics = mesh::metrics::IstioTcp<TcpLabels>;

/// Why the agent did not carry a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// To one of the agent's own ports at the pod's own address.
    SelfLoop,
    /// The pod is at `--max-connections-per-pod`.
    PodLimit,
    /// Capture recorded no original destination.
    NoOriginalDestination,
    /// The pod has no workload certificate (yet).
    NoCertificate,
    /// A service VIP (port) without a healthy endpoint.
    NoEndpoint,
    /// Authorization policy or STRICT mTLS.
    Denied,
    /// A malformed HBONE request, or one for another destination.
    BadRequest,
    /// The application or the peer could not be reached.
    Unreachable,
    /// The destination is bound to a waypoint that is missing or has no
    /// ready pod (never sent direct instead).
    WaypointUnavailable,
    /// The destination is bound to a waypoint and the connection did not
    /// come from it.
    BypassedWaypoint,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SelfLoop => "self_loop",
            Reason::PodLimit => "pod_limit",
            Reason::NoOriginalDestination => "no_original_destination",
            Reason::NoCertificate => "no_certificate",
            Reason::NoEndpoint => "no_endpoint",
            Reason::Denied => "denied",
            Reason::BadRequest => "bad_request",
            Reason::Unreachable => "unreachable",
            Reason::WaypointUnavailable => "waypoint_unavailable",
            Reason::BypassedWaypoint => "bypassed_waypoint",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    direction: &'static str,
    reason: &'static str,
}

/// Connections refused (not carried), by direction and reason.
#[derive(Default, Clone)]
pub struct Refusals(Family<RefusalLabels, Counter>);

impl Refusals {
    /// Registers `mesh_agent_connections_refused_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.sub_registry_with_prefix("mesh_agent").register(
            "connections_refused",
            "Connections of enrolled pods the agent refused to carry (fail closed), by reason",
            m.0.clone(),
        );
        m
    }

    pub fn count(&self, direction: &'static str, reason: Reason) {
        self.0
            .get_or_create(&RefusalLabels {
                direction,
                reason: reason.as_str(),
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindingLabels {
    waypoint: String,
    kind: &'static str,
    status: &'static str,
}

/// Bindings per waypoint, kind and status (set from the whole model on
/// every change).
#[derive(Default, Clone)]
pub struct WaypointBindings(Family<BindingLabels, Gauge>);

impl WaypointBindings {
    /// Registers `mesh_agent_waypoint_bindings`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.sub_registry_with_prefix("mesh_agent").register(
            "waypoint_bindings",
            "Workloads and Services bound to each waypoint, by binding status (not Bound: refused or direct)",
            m.0.clone(),
        );
        m
    }

    /// Replaces every series with the counts of `bindings`.
    pub fn set(&self, bindings: &cluster::waypoint::Bindings) {
        self.0.clear();
        for b in bindings.all() {
            self.0
                .get_or_create(&BindingLabels {
                    waypoint: b.waypoint.to_string(),
                    kind: b.kind.as_str(),
                    status: b.status.as_str(),
                })
                .inc();
        }
    }
}

/// The kernel's sockmap counters (SM_STATS), read at each scrape:
/// `mesh_agent_sockmap_<slot>_total`; phase two's (SM_TO_APP_STATS) as
/// `mesh_agent_sockmap_to_app_<slot>_total`; the kernel path's
/// (SM_FWD_STATS) as `mesh_agent_sockmap_forward_<slot>_total`.
#[derive(Debug)]
pub struct SockmapCounters(crate::capture::Pins);

impl SockmapCounters {
    /// Registers the collector (only when acceleration is on).
    pub fn register(registry: &mut Registry, pins: crate::capture::Pins) {
        registry
            .sub_registry_with_prefix("mesh_agent")
            .register_collector(Box::new(SockmapCounters(pins)));
    }

    fn help(slot: &str) -> &'static str {
        match slot {
            "redirected" => "Messages (sendmsg calls) of applications moved by sk_msg straight into the agent's socket",
            "peer_missing" => {
                "In-pod hops left on TCP: their first message found no agent socket in SM_AGENT, or their first bytes reached TCP without sk_msg (TCP Fast Open)"
            }
            "peer_gone" => "Messages of redirected hops passed to TCP because the agent's socket had closed",
            "app_inserted" => "Application sockets put into SM_APP by sockops",
            "app_insert_failed" => {
                "Application sockets sockops could not put into SM_APP (maps full): they stay on TCP"
            }
            _ => "sockmap counter",
        }
    }

    fn to_app_help(slot: &str) -> &'static str {
        match slot {
            "redirected" => "Agent sends moved by sk_msg straight into the application's socket (phase two)",
            "peer_missing" => {
                "Agent-to-app directions left on TCP: the first send found no app socket in SM_APP, or the app's own direction had gone TCP"
            }
            "fallback" => {
                "Redirected agent-to-app directions sent back to TCP: bytes piled up unread in the application's socket"
            }
            "peer_gone" => "Agent sends of redirected directions passed to TCP because the application's socket had closed",
            _ => "sockmap phase two counter",
        }
    }

    fn forward_help(slot: &str) -> &'static str {
        match slot {
            "sent" => "Application sends of forwarded hops moved by sk_msg straight to the agent's other socket (kernel path)",
            "received" => "Segments of forwarded hops moved by the sk_skb verdict straight into the application's socket (kernel path)",
            "passed" => {
                "Forwarded hops whose incoming bytes the verdict left to the agent: unread bytes piled up in the application's socket, or it closed"
            }
            _ => "sockmap kernel path counter",
        }
    }
}

impl prometheus_client::collector::Collector for SockmapCounters {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric, metrics::counter::ConstCounter};
        for (slot, value) in crate::capture::sockmap::pinned_stats(&self.0) {
            let counter = ConstCounter::new(value);
            let name = format!("sockmap_{slot}");
            let metric = encoder.encode_descriptor(&name, Self::help(slot), None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (slot, value) in crate::capture::sockmap::pinned_to_app_stats(&self.0) {
            let counter = ConstCounter::new(value);
            let name = format!("sockmap_to_app_{slot}");
            let metric = encoder.encode_descriptor(&name, Self::to_app_help(slot), None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (slot, value) in crate::capture::sockmap::pinned_fwd_stats(&self.0) {
            let counter = ConstCounter::new(value);
            let name = format!("sockmap_forward_{slot}");
            let metric = encoder.encode_descriptor(&name, Self::forward_help(slot), None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn refusals_are_counted_by_direction_and_reason() {
        let mut reg = Registry::default();
        let r = Refusals::register(&mut reg);
        r.count("inbound", Reason::SelfLoop);
        r.count("inbound", Reason::SelfLoop);
        r.count("outbound", Reason::PodLimit);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("mesh_agent_connections_refused_total{direction=\"inbound\",reason=\"self_loop\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("mesh_agent_connections_refused_total{direction=\"outbound\",reason=\"pod_limit\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn waypoint_bindings_are_counted_per_waypoint_kind_and_status() {
        let cfg = cluster::config::LocalConfig::parse(
            std::path::Path::new("m.yaml"),
            "pods:\n  - {name: a, namespace: ns, node: n, ips: [\"10.0.0.1\"], labels: {istio.io/use-waypoint: wp}}\n  - {name: b, namespace: ns, node: n, ips: [\"10.0.0.2\"], labels: {istio.io/use-waypoint: wp}}\n",
        )
        .unwrap();
        let mut reg = Registry::default();
        let m = WaypointBindings::register(&mut reg);
        m.set(&cluster::waypoint::Bindings::compute(&cfg, "td"));
        m.set(&cluster::waypoint::Bindings::compute(&cfg, "td"));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(
                "mesh_agent_waypoint_bindings{waypoint=\"ns/wp\",kind=\"workload\",status=\"WaypointMissing\"} 2"
            ),
            "set twice, counted once: {out}"
        );
        m.set(&cluster::waypoint::Bindings::default());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(!out.contains("WaypointMissing"), "gone bindings leave no series: {out}");
    }

    #[test]
    fn encodes_istio_names_and_labels() {
        let mut reg = Registry::default();
        let m = TcpMetrics::register(&mut reg);
        let w = Workload {
            key: "default/client-abc".into(),
            identity: mesh::identity::SpiffeId::new("cluster.local", "default", "client").into(),
            labels: std::sync::Arc::new(
                BTreeMap::from([("app".into(), "client".into()), ("version".into(), "v1".into())]).into(),
            ),
            hbone: true,
            waypoint: None,
            enforce_waypoint: true,
        };
        let l = TcpLabels::new(
            "destination",
            Side {
                workload: Some(&w),
                principal: Some(w.identity.to_string()),
            },
            Side {
                workload: None,
                principal: None,
            },
            true,
        );
        m.opened(&l);
        m.closed(&l, 10, 20);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for want in [
            "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
            "source_version=\"v1\"",
            "connection_security_policy=\"mutual_tls\"} 1",
            "istio_tcp_received_bytes_total{",
            "} 10",
            "istio_tcp_sent_bytes_total{",
            "} 20",
        ] {
            assert!(out.contains(want), "missing {want} in\n{out}");
        }
    }
}
