//! Kubernetes objects -> the agent's model (the same [`LocalConfig`] the
//! local file produces), as pure functions so every rule is unit-tested.
//!
//! Rules (Istio ambient's, as ztunnel applies them):
//! * a pod is in the mesh when its `istio.io/dataplane-mode` label is
//!   `ambient`, or its namespace's is and the pod's is not `none`; never when
//!   it uses the host network, is the agent's own pod, or has finished;
//! * every other running pod is still a workload (tunnel NONE: reached with
//!   plain TCP), so services backed by it keep working;
//! * services take their endpoints from EndpointSlices (ready addresses,
//!   named target ports resolved through the slice ports);
//! * `istio.io/use-waypoint` on a pod, service or namespace names a waypoint
//!   Service of the same namespace (or `istio.io/use-waypoint-namespace`);
//! * AuthorizationPolicy: ALLOW rules that need HTTP attributes can never
//!   match at L4 (so they deny, as in ztunnel); DENY rules drop the HTTP
//!   parts (so they deny more). Policies bound with targetRefs are for
//!   waypoints and skipped.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::crd;
use crate::{
    config::{CaptureSettings, LocalConfig, PodSpec, ServicePort, ServiceSpec, TunnelProtocol, WaypointRef},
    rbac,
};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the reflectors hold, at one moment.
#[derive(Default, Clone)]
pub struct Inputs {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<crd::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<crd::PeerAuthentication>>,
    pub node: Option<Arc<Node>>,
}

/// Where a pod of this node lives (from the CNI plugin or discovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// Node-local facts the API does not have.
pub struct Local<'a> {
    pub node: &'a str,
    /// The agent's own pod, never enrolled.
    pub own_uid: Option<&'a str>,
    /// IPs the CNI plugin reported before the API has them, by pod UID.
    pub cni_ips: &'a HashMap<String, Vec<IpAddr>>,
    /// Finds the netns and cgroup of an in-mesh pod of this node by UID.
    pub locate: &'a mut dyn FnMut(&str) -> Option<Location>,
}

/// The model plus what could not be translated (for logs).
pub struct Translated {
    pub model: LocalConfig,
    pub warnings: Vec<String>,
}

/// Why a pod is or is not captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Ambient,
    NotLabelled,
    OptedOut,
    HostNetwork,
    Finished,
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// Whether `pod` belongs in the mesh (its namespace's labels given).
pub fn membership(pod: &Pod, ns_labels: Option<&BTreeMap<String, String>>) -> Membership {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Membership::HostNetwork;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Membership::Finished;
    }
    let pod_mode = pod.metadata.labels.as_ref().and_then(|l| l.get(DATAPLANE_MODE));
    match pod_mode.map(String::as_str) {
        Some("none") => Membership::OptedOut,
        Some("ambient") => Membership::Ambient,
        _ if ns_labels.and_then(|l| l.get(DATAPLANE_MODE)).map(String::as_str) == Some("ambient") => {
            Membership::Ambient
        }
        _ => Membership::NotLabelled,
    }
}

/// Keeps only what the model reads of a pod: bounded memory for a
/// cluster-wide watch (no managed fields, annotations, containers or
/// statuses beyond IPs, phase and readiness).
pub fn project_pod(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    if let Some(spec) = pod.spec.as_mut() {
        *spec = k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name.take(),
            service_account_name: spec.service_account_name.take(),
            host_network: spec.host_network.take(),
            ..Default::default()
        };
    }
    if let Some(st) = pod.status.as_mut() {
        let ready = st
            .conditions
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ == "Ready")
            .collect::<Vec<_>>();
        *st = k8s_openapi::api::core::v1::PodStatus {
            phase: st.phase.take(),
            pod_ip: st.pod_ip.take(),
            pod_ips: st.pod_ips.take(),
            conditions: Some(ready),
            ..Default::default()
        };
    }
}

/// The model for this node.
pub fn translate(input: &Inputs, local: &mut Local) -> Translated {
    let mut warnings = Vec::new();
    let ns_labels: HashMap<&str, BTreeMap<String, String>> = input
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, labels_of(&n.metadata))))
        .collect();
    let waypoints = WaypointIndex::new(&input.services);
    let mut seen_ips: HashMap<IpAddr, String> = HashMap::new();
    let mut pods = Vec::new();
    for pod in &input.pods {
        if let Some(p) = pod_spec(pod, &ns_labels, &waypoints, local, &mut warnings) {
            if let Some(ip) = p.ips.iter().find(|ip| seen_ips.contains_key(ip)) {
                warnings.push(format!(
                    "pod {} has IP {ip} of pod {}; skipped until one of them goes",
                    p.key(),
                    seen_ips[ip]
                ));
                continue;
            }
            seen_ips.extend(p.ips.iter().map(|ip| (*ip, p.key())));
            pods.push(p);
        }
    }
    let services = input
        .services
        .iter()
        .filter_map(|s| service_spec(s, &input.slices, &ns_labels, &waypoints, &mut warnings))
        .collect();
    let authorization_policies = input
        .authorization_policies
        .iter()
        .filter_map(|p| authorization_policy(p, &mut warnings))
        .collect();
    let peer_authentications = input
        .peer_authentications
        .iter()
        .filter_map(|p| peer_authentication(p, &mut warnings))
        .collect();
    let model = LocalConfig {
        capture: CaptureSettings {
            node_addresses: node_addresses(input.node.as_deref()),
            ..Default::default()
        },
        pods,
        authorization_policies,
        peer_authentications,
        services,
    };
    Translated { model, warnings }
}

fn pod_spec(
    pod: &Pod,
    ns_labels: &HashMap<&str, BTreeMap<String, String>>,
    waypoints: &WaypointIndex,
    local: &mut Local,
    warnings: &mut Vec<String>,
) -> Option<PodSpec> {
    let name = pod.metadata.name.clone()?;
    let namespace = pod.metadata.namespace.clone()?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let ns = ns_labels.get(namespace.as_str());
    let member = membership(pod, ns);
    if matches!(member, Membership::HostNetwork | Membership::Finished) {
        return None;
    }
    let mut ips = pod_ips(pod);
    if ips.is_empty() && node == local.node {
        ips = local.cni_ips.get(&uid).cloned().unwrap_or_default();
    }
    if ips.is_empty() {
        return None; // not started yet: nobody can reach it
    }
    let own = local.own_uid == Some(uid.as_str());
    let in_mesh = member == Membership::Ambient && !own;
    let (netns, cgroup) = match (in_mesh && node == local.node).then(|| (local.locate)(&uid)) {
        Some(Some(loc)) => (Some(loc.netns), Some(loc.cgroup)),
        Some(None) => {
            warnings.push(format!(
                "pod {namespace}/{name} ({uid}) is in the mesh but its network namespace was not found on this node; it is not captured yet"
            ));
            (None, None)
        }
        None => (None, None),
    };
    let labels = labels_of(&pod.metadata);
    let waypoint = waypoints.lookup(&namespace, &labels, ns, warnings);
    Some(PodSpec {
        uid: Some(uid),
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node,
        netns,
        cgroup,
        ips,
        healthy: pod_ready(pod),
        tunnel: if in_mesh {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        waypoint,
        labels,
        name,
        namespace,
    })
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = pod.status.as_ref() else { return vec![] };
    let listed: Vec<&str> = match &st.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => st.pod_ip.as_deref().into_iter().collect(),
    };
    listed.into_iter().filter_map(|s| s.parse().ok()).collect()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Waypoint names -> addresses: a waypoint is a Service of its namespace.
struct WaypointIndex(HashMap<(String, String), IpAddr>);

impl WaypointIndex {
    fn new(services: &[Arc<Service>]) -> Self {
        Self(
            services
                .iter()
                .filter_map(|s| {
                    let vip = cluster_ips(s).into_iter().next()?;
                    Some(((s.metadata.namespace.clone()?, s.metadata.name.clone()?), vip))
                })
                .collect(),
        )
    }

    /// The object's own label wins over its namespace's; `none` opts out.
    fn lookup(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        ns_labels: Option<&BTreeMap<String, String>>,
        warnings: &mut Vec<String>,
    ) -> Option<WaypointRef> {
        let from = if labels.contains_key(USE_WAYPOINT) {
            labels
        } else {
            ns_labels?
        };
        let name = from.get(USE_WAYPOINT)?;
        if name == "none" {
            return None;
        }
        let wp_ns = from.get(USE_WAYPOINT_NAMESPACE).map_or(namespace, String::as_str);
        match self.0.get(&(wp_ns.to_string(), name.clone())) {
            Some(ip) => Some(WaypointRef {
                address: *ip,
                port: agent_common::HBONE_PORT,
            }),
            None => {
                warnings.push(format!(
                    "waypoint {wp_ns}/{name} (from {USE_WAYPOINT} in {namespace}) has no Service with a cluster IP"
                ));
                None
            }
        }
    }
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else { return vec![] };
    let listed: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    listed.into_iter().filter_map(|s| s.parse().ok()).collect()
}

fn service_spec(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    ns_labels: &HashMap<&str, BTreeMap<String, String>>,
    waypoints: &WaypointIndex,
    warnings: &mut Vec<String>,
) -> Option<ServiceSpec> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc.metadata.namespace.clone()?;
    let spec = svc.spec.as_ref()?;
    let vips = cluster_ips(svc); // headless and ExternalName services have none
    if vips.is_empty() {
        return None;
    }
    let mine: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(&namespace)
                && s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(&name)
        })
        .map(|s| &**s)
        .collect();
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let target = match &p.target_port {
            None => Some(p.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(port_name)) => mine
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|sp| sp.name.as_deref() == p.name.as_deref().or(Some(port_name)))
                .and_then(|sp| sp.port),
        };
        match (u16::try_from(p.port), target.map(u16::try_from)) {
            (Ok(port), Some(Ok(target_port))) if port != 0 && target_port != 0 => {
                ports.push(ServicePort { port, target_port })
            }
            _ => warnings.push(format!(
                "service {namespace}/{name}: port {} has no resolvable target port yet",
                p.port
            )),
        }
    }
    if ports.is_empty() {
        return None;
    }
    let endpoints = (!mine.is_empty()).then(|| {
        mine.iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()))
            .collect::<Vec<_>>()
    });
    let labels = labels_of(&svc.metadata);
    Some(ServiceSpec {
        hostname: None,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        endpoints: endpoints.or_else(|| spec.selector.is_none().then(Vec::new)),
        load_balancing: Default::default(),
        subject_alt_names: Vec::new(),
        waypoint: waypoints.lookup(&namespace, &labels, ns_labels.get(namespace.as_str()), warnings),
        name,
        namespace,
    })
}

fn authorization_policy(p: &crd::AuthorizationPolicy, warnings: &mut Vec<String>) -> Option<rbac::AuthorizationPolicy> {
    let namespace = p.metadata.namespace.clone()?;
    let name = p.metadata.name.clone()?;
    let key = format!("AuthorizationPolicy {namespace}/{name}");
    if p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty() {
        return None; // bound to a waypoint or gateway
    }
    let action = match p.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => rbac::Action::Allow,
        "DENY" => rbac::Action::Deny,
        other => {
            warnings.push(format!(
                "{key}: action {other} is not enforced by the node agent; skipped"
            ));
            return None;
        }
    };
    let mut rules = Vec::new();
    // `rules: []` (ALLOW nothing) and no `rules` (same) differ from a rule
    // we drop: dropping an ALLOW rule must not turn the policy into "allow
    // all", and rbac treats an empty rule list as matching nothing.
    for (i, r) in p.spec.rules.iter().flatten().enumerate() {
        let l7 =
            !r.when.is_empty() || r.from.iter().any(|f| f.source.has_l7()) || r.to.iter().any(|t| t.operation.has_l7());
        if l7 && action == rbac::Action::Allow {
            warnings.push(format!(
                "{key}: rules[{i}] needs HTTP attributes or conditions a node agent cannot see; it never matches at L4 (use a waypoint)"
            ));
            continue;
        }
        match rule(r) {
            Ok(rule) => rules.push(rule),
            Err(e) => {
                warnings.push(format!("{key}: rules[{i}]: {e}; policy skipped"));
                return None;
            }
        }
    }
    Some(rbac::AuthorizationPolicy {
        name,
        namespace,
        selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action,
        rules,
    })
}

fn rule(r: &crd::Rule) -> Result<rbac::Rule, String> {
    let from = r
        .from
        .iter()
        .map(|f| {
            let s = &f.source;
            Ok(rbac::From {
                source: rbac::Source {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: cidrs(&s.ip_blocks)?,
                    not_ip_blocks: cidrs(&s.not_ip_blocks)?,
                },
            })
        })
        .collect::<Result<_, String>>()?;
    let to =
        r.to.iter()
            .map(|t| {
                Ok(rbac::To {
                    operation: rbac::Operation {
                        ports: ports(&t.operation.ports)?,
                        not_ports: ports(&t.operation.not_ports)?,
                    },
                })
            })
            .collect::<Result<_, String>>()?;
    Ok(rbac::Rule { from, to })
}

/// Istio accepts a bare address as a /32 (/128) block.
fn cidrs(list: &[String]) -> Result<Vec<crate::config::Cidr>, String> {
    list.iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(crate::config::Cidr {
                addr: ip,
                prefix: if ip.is_ipv4() { 32 } else { 128 },
            }),
            Err(_) => s.parse(),
        })
        .collect()
}

fn ports(list: &[String]) -> Result<Vec<rbac::Port>, String> {
    list.iter()
        .map(|s| {
            s.parse()
                .map(rbac::Port)
                .map_err(|_| format!("`{s}` is not a port number"))
        })
        .collect()
}

fn peer_authentication(p: &crd::PeerAuthentication, warnings: &mut Vec<String>) -> Option<rbac::PeerAuthentication> {
    let namespace = p.metadata.namespace.clone()?;
    let name = p.metadata.name.clone()?;
    if p.spec.port_level_mtls.is_some() {
        warnings.push(format!(
            "PeerAuthentication {namespace}/{name}: portLevelMtls is not supported by the node agent; the workload-level mode applies to every port"
        ));
    }
    let mode = match p.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
        Some("STRICT") => rbac::MtlsMode::Strict,
        // DISABLE cannot turn mTLS off between mesh pods (HBONE is always
        // mTLS); it accepts plain text like PERMISSIVE.
        Some("PERMISSIVE" | "DISABLE") => rbac::MtlsMode::Permissive,
        _ => return None, // UNSET: inherit from the wider scope
    };
    Some(rbac::PeerAuthentication {
        name,
        namespace,
        selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        mode,
    })
}

/// The node's own addresses: kubelet probes come from them.
fn node_addresses(node: Option<&Node>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}
