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
//! * waypoints are Gateways of class `istio-waypoint` (the
//!   `istio.io/for-service-account` annotation and `istio.io/waypoint-for`
//!   label carried); namespace and Service labels that bind them
//!   (`istio.io/use-waypoint[-namespace]`) are carried, and the binding
//!   itself is `cluster::waypoint`'s, as for the local file. A waypoint's
//!   own pods speak HBONE and are never captured;
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
    config::{
        CaptureSettings, LocalConfig, NamespaceSpec, PodSpec, ServicePort, ServiceSpec, TunnelProtocol, WaypointSpec,
    },
    rbac,
};

pub use cluster::waypoint::{
    WaypointFor, FOR_SERVICE_ACCOUNT, GATEWAY_NAME_LABEL, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, WAYPOINT_CLASS,
    WAYPOINT_FOR,
};
pub use mesh_cni::membership::DATAPLANE_MODE;
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The labels of namespaces and Services the model keeps (binding only).
const BINDING_LABELS: [&str; 3] = [USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, GATEWAY_NAME_LABEL];

/// Everything the reflectors hold, at one moment.
#[derive(Default, Clone)]
pub struct Inputs {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<crd::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<crd::PeerAuthentication>>,
    pub gateways: Vec<Arc<crd::Gateway>>,
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
    /// Finds the netns and cgroup of an in-mesh pod of this node by UID
    /// (the netns must hold one of the given IPs).
    pub locate: &'a mut dyn FnMut(&str, &[IpAddr]) -> Option<Location>,
    /// Addresses of the host's network namespace (kubelet probes come from
    /// one of them), added to the Node's own.
    pub host_addresses: &'a [IpAddr],
}

/// The model plus what could not be translated (for logs).
pub struct Translated {
    pub model: LocalConfig,
    pub warnings: Vec<String>,
}

pub use mesh_cni::membership::{namespace_is_ambient, Membership};

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// A pod whose containers all ended (its IP may already be reused).
pub fn pod_finished(pod: &Pod) -> bool {
    mesh_cni::membership::finished(pod.status.as_ref().and_then(|s| s.phase.as_deref()))
}

/// The pod's service account (Kubernetes' default when unset).
pub fn service_account_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// What the shared membership rule reads of a pod; `waypoint`: it is a
/// pod of a waypoint Gateway ([`is_waypoint_pod`]).
pub fn pod_facts(pod: &Pod, waypoint: bool) -> mesh_cni::membership::PodFacts<'_> {
    mesh_cni::membership::PodFacts {
        labels: pod.metadata.labels.as_ref(),
        host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        phase: pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        waypoint,
    }
}

/// Whether `pod` belongs in the mesh (its namespace's labels given): the
/// rule the CNI plugin applies too ([`mesh_cni::membership`]).
pub fn membership(pod: &Pod, ns_labels: Option<&BTreeMap<String, String>>, waypoint: bool) -> Membership {
    mesh_cni::membership::membership(pod_facts(pod, waypoint), ns_labels)
}

/// Whether `gw` is a waypoint (class `istio-waypoint`).
pub fn is_waypoint(gw: &crd::Gateway) -> bool {
    gw.spec.gateway_class_name == WAYPOINT_CLASS
}

/// Whether `pod` carries the gateway-name label of a waypoint of its namespace.
pub fn is_waypoint_pod(pod: &Pod, gateways: &[Arc<crd::Gateway>]) -> bool {
    let Some(name) = pod.metadata.labels.as_ref().and_then(|l| l.get(GATEWAY_NAME_LABEL)) else {
        return false;
    };
    gateways.iter().any(|g| {
        is_waypoint(g) && g.metadata.name.as_ref() == Some(name) && g.metadata.namespace == pod.metadata.namespace
    })
}

/// Keeps only what the model reads of a Gateway (of its annotations, the
/// per-service-account binding).
pub fn project_gateway(gw: &mut crd::Gateway) {
    let m = &mut gw.metadata;
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k == FOR_SERVICE_ACCOUNT);
    }
}

fn binding_labels(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    let mut labels = labels_of(meta);
    labels.retain(|k, _| BINDING_LABELS.contains(&k.as_str()));
    labels
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
    let mut seen_ips: HashMap<IpAddr, String> = HashMap::new();
    let mut pods = Vec::new();
    for pod in &input.pods {
        let waypoint = is_waypoint_pod(pod, &input.gateways);
        if let Some(p) = pod_spec(pod, &ns_labels, waypoint, local, &mut warnings) {
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
        .filter_map(|s| service_spec(s, &input.slices, &mut warnings))
        .collect();
    let namespaces = input
        .namespaces
        .iter()
        .filter_map(|n| {
            let labels = binding_labels(&n.metadata);
            Some(NamespaceSpec {
                name: n.metadata.name.clone()?,
                labels,
            })
            .filter(|n| !n.labels.is_empty())
        })
        .collect();
    let waypoints = input
        .gateways
        .iter()
        .filter(|g| is_waypoint(g))
        .filter_map(|g| waypoint_spec(g, &mut warnings))
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
            node_addresses: node_addresses(input.node.as_deref(), local.host_addresses),
            ..Default::default()
        },
        pods,
        authorization_policies,
        peer_authentications,
        services,
        namespaces,
        waypoints,
    };
    Translated { model, warnings }
}

/// A waypoint Gateway; a bad annotation or label is warned about and
/// ignored (the binding statuses then show what is not bound).
fn waypoint_spec(g: &crd::Gateway, warnings: &mut Vec<String>) -> Option<WaypointSpec> {
    let name = g.metadata.name.clone()?;
    let namespace = g.metadata.namespace.clone()?;
    let key = format!("Gateway {namespace}/{name}");
    let for_ = match g.metadata.labels.as_ref().and_then(|l| l.get(WAYPOINT_FOR)) {
        None => WaypointFor::default(),
        Some(v) => WaypointFor::parse(v).unwrap_or_else(|| {
            warnings.push(format!(
                "{key}: label {WAYPOINT_FOR}={v} is none of service, workload, all, none; using service"
            ));
            WaypointFor::default()
        }),
    };
    let for_service_account = g
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FOR_SERVICE_ACCOUNT))
        .filter(|sa| {
            let ok = valid_name(sa);
            if !ok {
                warnings.push(format!(
                    "{key}: annotation {FOR_SERVICE_ACCOUNT}={sa} is not a service account name; ignored"
                ));
            }
            ok
        })
        .cloned();
    Some(WaypointSpec {
        name,
        namespace,
        // The controller names the waypoint's service account after it.
        service_account: None,
        for_service_account,
        for_,
        vips: Vec::new(),
    })
}

/// A DNS-1123 subdomain, as service account names are.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn pod_spec(
    pod: &Pod,
    ns_labels: &HashMap<&str, BTreeMap<String, String>>,
    waypoint: bool,
    local: &mut Local,
    warnings: &mut Vec<String>,
) -> Option<PodSpec> {
    let name = pod.metadata.name.clone()?;
    let namespace = pod.metadata.namespace.clone()?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let ns = ns_labels.get(namespace.as_str());
    let member = membership(pod, ns, waypoint);
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
    let (netns, cgroup) = match (in_mesh && node == local.node).then(|| (local.locate)(&uid, &ips)) {
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
    Some(PodSpec {
        uid: Some(uid),
        service_account: service_account_of(pod).to_string(),
        node,
        netns,
        cgroup,
        ips,
        healthy: pod_ready(pod),
        // A waypoint's pods are reached over HBONE (they terminate it)
        // but never captured (no netns above).
        tunnel: if in_mesh || member == Membership::Waypoint {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
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

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else { return vec![] };
    let listed: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    listed.into_iter().filter_map(|s| s.parse().ok()).collect()
}

fn service_spec(svc: &Service, slices: &[Arc<EndpointSlice>], warnings: &mut Vec<String>) -> Option<ServiceSpec> {
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
                // The slice names its ports after the Service's ports ("" when
                // unnamed), not after the target port name.
                .find(|sp| sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or(""))
                .filter(|_| !port_name.is_empty())
                .and_then(|sp| sp.port),
        };
        match (u16::try_from(p.port), target.map(u16::try_from)) {
            (Ok(port), Some(Ok(target_port))) if port != 0 && target_port != 0 => ports.push(ServicePort {
                port,
                target_port,
                name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
            }),
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
    Some(ServiceSpec {
        labels: binding_labels(&svc.metadata),
        hostname: None,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        endpoints: endpoints.or_else(|| spec.selector.is_none().then(Vec::new)),
        load_balancing: Default::default(),
        subject_alt_names: Vec::new(),
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
fn node_addresses(node: Option<&Node>, host: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .chain(host.iter().copied())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{
                Container, ContainerStatus, NodeAddress, NodeStatus, PodCondition, PodIP, PodSpec as K8sPodSpec,
                PodStatus, ServicePort as SvcPort, ServiceSpec as K8sServiceSpec,
            },
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta},
    };
    use kube::Resource;
    use mesh::identity::SpiffeId;

    use super::*;

    const NODE: &str = "node1";

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(Into::into),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn labelled<T: Resource>(mut o: T, kv: &[(&str, &str)]) -> T {
        o.meta_mut().labels.get_or_insert_with(Default::default).extend(map(kv));
        o
    }

    fn namespace(name: &str, kv: &[(&str, &str)]) -> Namespace {
        labelled(
            Namespace {
                metadata: meta(None, name),
                ..Default::default()
            },
            kv,
        )
    }

    fn cond(type_: &str, status: &str) -> PodCondition {
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            ..Default::default()
        }
    }

    /// A running, ready pod with UID `uid-<name>` and service account `sa-<name>`.
    fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(format!("uid-{name}")),
                ..meta(Some(ns), name)
            },
            spec: Some(K8sPodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(format!("sa-{name}")),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                conditions: Some(vec![cond("Ready", "True")]),
                ..Default::default()
            }),
        }
    }

    fn arcs<T>(v: Vec<T>) -> Vec<Arc<T>> {
        v.into_iter().map(Arc::new).collect()
    }

    fn inputs(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> Inputs {
        Inputs {
            namespaces: arcs(namespaces),
            pods: arcs(pods),
            ..Default::default()
        }
    }

    fn location(uid: &str) -> Location {
        Location {
            netns: format!("/run/netns/{uid}").into(),
            cgroup: format!("/sys/fs/cgroup/pods/{uid}").into(),
        }
    }

    /// Translates for NODE; pods whose UID starts with `uid-lost` cannot be
    /// located. Returns the result and the UIDs `locate` was asked about.
    fn run_local(
        input: &Inputs,
        own_uid: Option<&str>,
        cni_ips: &HashMap<String, Vec<IpAddr>>,
    ) -> (Translated, Vec<String>) {
        let mut asked = Vec::new();
        let mut locate = |uid: &str, _: &[IpAddr]| {
            asked.push(uid.to_string());
            (!uid.starts_with("uid-lost")).then(|| location(uid))
        };
        let t = translate(
            input,
            &mut Local {
                node: NODE,
                own_uid,
                cni_ips,
                locate: &mut locate,
                host_addresses: &[],
            },
        );
        (t, asked)
    }

    fn run(input: &Inputs) -> Translated {
        run_local(input, None, &HashMap::new()).0
    }

    fn find<'a>(t: &'a Translated, name: &str) -> Option<&'a PodSpec> {
        t.model.pods.iter().find(|p| p.name == name)
    }

    fn tunnel(t: &Translated, name: &str) -> TunnelProtocol {
        find(t, name).unwrap_or_else(|| panic!("pod {name} missing")).tunnel
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    // ---- membership ----

    #[test]
    fn ambient_namespace_label_puts_pods_in_mesh_with_hbone() {
        let t = run(&inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![pod("apps", "web", NODE, &["10.1.0.1"])],
        ));
        let p = find(&t, "web").unwrap();
        assert_eq!(p.tunnel, TunnelProtocol::Hbone);
        assert_eq!((p.namespace.as_str(), p.service_account.as_str()), ("apps", "sa-web"));
        assert_eq!(p.uid.as_deref(), Some("uid-web"));
        assert_eq!(p.netns, Some(location("uid-web").netns));
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn pod_label_none_opts_out_of_ambient_namespace() {
        let t = run(&inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![labelled(
                pod("apps", "web", NODE, &["10.1.0.1"]),
                &[(DATAPLANE_MODE, "none")],
            )],
        ));
        assert_eq!(tunnel(&t, "web"), TunnelProtocol::None);
        assert_eq!(find(&t, "web").unwrap().netns, None);
    }

    #[test]
    fn pod_label_ambient_in_unlabelled_namespace_is_hbone_unlabelled_pod_is_none() {
        let t = run(&inputs(
            vec![namespace("apps", &[])],
            vec![
                labelled(pod("apps", "web", NODE, &["10.1.0.1"]), &[(DATAPLANE_MODE, "ambient")]),
                pod("apps", "plain", NODE, &["10.1.0.2"]),
            ],
        ));
        assert_eq!(tunnel(&t, "web"), TunnelProtocol::Hbone);
        assert_eq!(tunnel(&t, "plain"), TunnelProtocol::None);
    }

    #[test]
    fn host_network_and_finished_pods_are_absent() {
        let mut host = pod("apps", "host", NODE, &["10.0.0.2"]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let finished = |name: &str, phase: &str, ip: &str| {
            let mut p = pod("apps", name, NODE, &[ip]);
            p.status.as_mut().unwrap().phase = Some(phase.into());
            p
        };
        let t = run(&inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![
                host,
                finished("done", "Succeeded", "10.1.0.2"),
                finished("crashed", "Failed", "10.1.0.3"),
                pod("apps", "live", NODE, &["10.1.0.4"]),
            ],
        ));
        let names: Vec<&str> = t.model.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["live"]);
    }

    #[test]
    fn own_pod_is_never_in_mesh() {
        let input = inputs(
            vec![namespace("mesh", &[(DATAPLANE_MODE, "ambient")])],
            vec![pod("mesh", "agent", NODE, &["10.1.0.9"])],
        );
        let (t, asked) = run_local(&input, Some("uid-agent"), &HashMap::new());
        assert_eq!(tunnel(&t, "agent"), TunnelProtocol::None);
        assert!(asked.is_empty(), "{asked:?}");
    }

    #[test]
    fn pods_without_ips_are_absent_unless_the_cni_gave_ips_on_this_node() {
        let input = inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![
                pod("apps", "new", NODE, &[]),
                pod("apps", "unknown", NODE, &[]),
                pod("apps", "elsewhere", "node2", &[]),
            ],
        );
        let cni = HashMap::from([
            ("uid-new".to_string(), ips(&["10.1.0.5"])),
            ("uid-elsewhere".to_string(), ips(&["10.2.0.5"])),
        ]);
        let (t, _) = run_local(&input, None, &cni);
        let names: Vec<&str> = t.model.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["new"]);
        assert_eq!(t.model.pods[0].ips, ips(&["10.1.0.5"]));
        assert_eq!(t.model.pods[0].tunnel, TunnelProtocol::Hbone);
    }

    // ---- location ----

    #[test]
    fn locate_is_asked_only_for_in_mesh_pods_of_this_node() {
        let input = inputs(
            vec![
                namespace("apps", &[(DATAPLANE_MODE, "ambient")]),
                namespace("plain", &[]),
            ],
            vec![
                pod("apps", "local", NODE, &["10.1.0.1"]),
                pod("apps", "remote", "node2", &["10.2.0.1"]),
                labelled(pod("apps", "out", NODE, &["10.1.0.2"]), &[(DATAPLANE_MODE, "none")]),
                pod("plain", "unlabelled", NODE, &["10.1.0.3"]),
            ],
        );
        let (t, asked) = run_local(&input, None, &HashMap::new());
        assert_eq!(asked, ["uid-local"]);
        assert_eq!(t.model.pods.len(), 4);
        let remote = find(&t, "remote").unwrap();
        assert_eq!((remote.tunnel, remote.netns.as_ref()), (TunnelProtocol::Hbone, None));
    }

    #[test]
    fn unlocated_pod_warns_and_is_not_captured() {
        let t = run(&inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![
                pod("apps", "lost", NODE, &["10.1.0.1"]),
                pod("apps", "found", NODE, &["10.1.0.2"]),
            ],
        ));
        let lost = find(&t, "lost").unwrap();
        assert_eq!((lost.netns.as_ref(), lost.cgroup.as_ref()), (None, None));
        assert_eq!(t.warnings.len(), 1);
        assert!(
            t.warnings[0].contains("apps/lost") && t.warnings[0].contains("uid-lost"),
            "{:?}",
            t.warnings
        );
        let captured: Vec<&str> = t.model.pods_on(NODE).map(|p| p.name.as_str()).collect();
        assert_eq!(captured, ["found"]);
        assert_eq!(t.model.mesh_pods_on(NODE).count(), 2);
    }

    #[test]
    fn duplicate_ip_skips_the_second_pod_with_warning() {
        let t = run(&inputs(
            vec![namespace("apps", &[])],
            vec![
                pod("apps", "first", NODE, &["10.1.0.1"]),
                pod("apps", "second", "node2", &["fd00::2", "10.1.0.1"]),
            ],
        ));
        let names: Vec<&str> = t.model.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["first"]);
        assert_eq!(t.warnings.len(), 1);
        let w = &t.warnings[0];
        assert!(
            w.contains("apps/second") && w.contains("10.1.0.1") && w.contains("apps/first"),
            "{w}"
        );
    }

    #[test]
    fn ready_condition_true_is_healthy_anything_else_unhealthy() {
        let with_conditions = |name: &str, ip: &str, conditions: Option<Vec<PodCondition>>| {
            let mut p = pod("apps", name, NODE, &[ip]);
            p.status.as_mut().unwrap().conditions = conditions;
            p
        };
        let t = run(&inputs(
            vec![namespace("apps", &[])],
            vec![
                with_conditions(
                    "ready",
                    "10.1.0.1",
                    Some(vec![cond("PodScheduled", "False"), cond("Ready", "True")]),
                ),
                with_conditions("not-ready", "10.1.0.2", Some(vec![cond("Ready", "False")])),
                with_conditions("unknown", "10.1.0.3", Some(vec![cond("Ready", "Unknown")])),
                with_conditions("other-only", "10.1.0.4", Some(vec![cond("ContainersReady", "True")])),
                with_conditions("none", "10.1.0.5", None),
            ],
        ));
        let health: Vec<(&str, bool)> = t.model.pods.iter().map(|p| (p.name.as_str(), p.healthy)).collect();
        assert_eq!(
            health,
            [
                ("ready", true),
                ("not-ready", false),
                ("unknown", false),
                ("other-only", false),
                ("none", false)
            ]
        );
    }

    // ---- services ----

    fn port(name: Option<&str>, port: i32, target: Option<IntOrString>) -> SvcPort {
        SvcPort {
            name: name.map(Into::into),
            port,
            target_port: target,
            ..Default::default()
        }
    }

    /// A ClusterIP service selecting `app: <name>`.
    fn service(ns: &str, name: &str, vip: &str, ports: Vec<SvcPort>) -> Service {
        Service {
            metadata: meta(Some(ns), name),
            spec: Some(K8sServiceSpec {
                cluster_ip: Some(vip.into()),
                cluster_ips: Some(vec![vip.into()]),
                ports: Some(ports),
                selector: Some(map(&[("app", name)])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A slice of `svc` with (port name, number) and (address, ready) entries.
    fn slice(ns: &str, svc: &str, ports: &[(&str, i32)], endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        let slice = EndpointSlice {
            metadata: meta(Some(ns), &format!("{svc}-x1")),
            address_type: "IPv4".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: endpoints
                .iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        };
        labelled(slice, &[(SERVICE_NAME_LABEL, svc)])
    }

    fn services(svcs: Vec<Service>, slices: Vec<EndpointSlice>) -> Translated {
        run(&Inputs {
            services: arcs(svcs),
            slices: arcs(slices),
            ..Default::default()
        })
    }

    fn svc_ports(t: &Translated, name: &str) -> Vec<(u16, u16)> {
        let s = t.model.services.iter().find(|s| s.name == name);
        let s = s.unwrap_or_else(|| panic!("service {name} missing; warnings: {:?}", t.warnings));
        s.ports.iter().map(|p| (p.port, p.target_port)).collect()
    }

    #[test]
    fn named_target_port_resolves_through_the_slice_port_of_the_service_port_name() {
        let named = |s: &str| Some(IntOrString::String(s.into()));
        let t = services(
            vec![service(
                "apps",
                "web",
                "10.96.0.10",
                vec![
                    port(Some("http"), 80, named("web")),
                    port(Some("admin"), 9000, named("adm")),
                ],
            )],
            vec![slice("apps", "web", &[("http", 8080)], &[("10.1.0.1", Some(true))])],
        );
        assert_eq!(svc_ports(&t, "web"), [(80, 8080)]);
        assert_eq!(t.model.services[0].vips, ips(&["10.96.0.10"]));
        assert_eq!(t.warnings.len(), 1, "unresolved admin port: {:?}", t.warnings);
        assert!(t.warnings[0].contains("apps/web") && t.warnings[0].contains("9000"));
    }

    #[test]
    fn named_target_port_of_an_unnamed_service_port_resolves() {
        let t = services(
            vec![service(
                "apps",
                "web",
                "10.96.0.10",
                vec![port(None, 80, Some(IntOrString::String("web".into())))],
            )],
            vec![slice("apps", "web", &[("", 8080)], &[("10.1.0.1", Some(true))])],
        );
        assert_eq!(svc_ports(&t, "web"), [(80, 8080)], "{:?}", t.warnings);
    }

    #[test]
    fn numeric_target_port_is_used_and_missing_target_port_is_the_port() {
        let t = services(
            vec![service(
                "apps",
                "web",
                "10.96.0.10",
                vec![
                    port(Some("a"), 80, Some(IntOrString::Int(8080))),
                    port(Some("b"), 443, None),
                ],
            )],
            vec![],
        );
        assert_eq!(svc_ports(&t, "web"), [(80, 8080), (443, 443)]);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn udp_ports_are_skipped() {
        let udp = |name: &str, n: i32| SvcPort {
            protocol: Some("UDP".into()),
            ..port(Some(name), n, None)
        };
        let tcp = SvcPort {
            protocol: Some("TCP".into()),
            ..port(Some("tcp"), 53, None)
        };
        let t = services(
            vec![
                service("apps", "dns", "10.96.0.10", vec![udp("udp", 53), tcp]),
                service("apps", "syslog", "10.96.0.11", vec![udp("syslog", 514)]),
            ],
            vec![],
        );
        assert_eq!(svc_ports(&t, "dns"), [(53, 53)]);
        assert_eq!(t.model.services.len(), 1, "a UDP-only service is absent");
    }

    #[test]
    fn headless_and_external_name_services_are_absent() {
        let headless = service("apps", "headless", "None", vec![port(None, 80, None)]);
        let mut external = service("apps", "ext", "", vec![port(None, 80, None)]);
        let spec = external.spec.as_mut().unwrap();
        (spec.type_, spec.external_name) = (Some("ExternalName".into()), Some("example.com".into()));
        (spec.cluster_ip, spec.cluster_ips, spec.selector) = (None, None, None);
        let t = services(
            vec![headless, external],
            vec![slice("apps", "headless", &[("", 80)], &[("10.1.0.1", Some(true))])],
        );
        assert!(t.model.services.is_empty());
    }

    #[test]
    fn endpoints_are_the_ready_addresses_of_the_slices() {
        let mut second = slice("apps", "web", &[("", 80)], &[("10.1.0.4", Some(true))]);
        second.metadata.name = Some("web-x2".into());
        let t = services(
            vec![service("apps", "web", "10.96.0.10", vec![port(None, 80, None)])],
            vec![
                slice(
                    "apps",
                    "web",
                    &[("", 80)],
                    &[("10.1.0.1", Some(true)), ("10.1.0.2", None), ("10.1.0.3", Some(false))],
                ),
                second,
            ],
        );
        assert_eq!(
            t.model.services[0].endpoints,
            Some(ips(&["10.1.0.1", "10.1.0.2", "10.1.0.4"]))
        );
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_ignored() {
        let t = services(
            vec![service("apps", "web", "10.96.0.10", vec![port(None, 80, None)])],
            vec![
                slice("apps", "web", &[("", 80)], &[("10.1.0.1", Some(true))]),
                slice("apps", "api", &[("", 80)], &[("10.1.0.2", Some(true))]),
                slice("other", "web", &[("", 80)], &[("10.1.0.3", Some(true))]),
            ],
        );
        assert_eq!(t.model.services[0].endpoints, Some(ips(&["10.1.0.1"])));
    }

    #[test]
    fn selectorless_service_without_slices_has_no_endpoints() {
        let mut svc = service("apps", "manual", "10.96.0.10", vec![port(None, 80, None)]);
        svc.spec.as_mut().unwrap().selector = None;
        let t = services(vec![svc], vec![]);
        assert_eq!(t.model.services[0].endpoints, Some(vec![]));
        assert!(t.model.services[0].selector.is_empty());
    }

    #[test]
    fn service_with_selector_but_no_slices_falls_back_to_the_selector() {
        let t = services(
            vec![service("apps", "web", "10.96.0.10", vec![port(None, 80, None)])],
            vec![],
        );
        assert_eq!(t.model.services[0].endpoints, None);
        assert_eq!(t.model.services[0].selector, map(&[("app", "web")]));
    }

    // ---- waypoints ----

    fn gateway(ns: &str, name: &str, class: &str) -> crd::Gateway {
        crd::Gateway::new(ns, name, class)
    }

    fn annotated(mut g: crd::Gateway, k: &str, v: &str) -> crd::Gateway {
        g.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(k.into(), v.into());
        g
    }

    fn waypoint_input(namespaces: Vec<Namespace>, pods: Vec<Pod>, gateways: Vec<crd::Gateway>) -> Inputs {
        Inputs {
            services: arcs(vec![labelled(
                service("apps", "web", "10.96.0.10", vec![port(None, 80, None)]),
                &[(USE_WAYPOINT, "wp"), ("unrelated", "x")],
            )]),
            gateways: arcs(gateways),
            ..inputs(namespaces, pods)
        }
    }

    #[test]
    fn waypoint_gateways_become_waypoints_with_their_binding_fields() {
        let gws = vec![
            annotated(
                labelled(gateway("apps", "wp", WAYPOINT_CLASS), &[(WAYPOINT_FOR, "all")]),
                FOR_SERVICE_ACCOUNT,
                "sa-web",
            ),
            labelled(gateway("apps", "typo", WAYPOINT_CLASS), &[(WAYPOINT_FOR, "everything")]),
            annotated(
                gateway("apps", "bad-sa", WAYPOINT_CLASS),
                FOR_SERVICE_ACCOUNT,
                "Not_A_Name",
            ),
            gateway("apps", "ingress", "istio"),
        ];
        let t = run(&waypoint_input(
            vec![namespace("apps", &[(USE_WAYPOINT, "wp"), (DATAPLANE_MODE, "ambient")])],
            vec![],
            gws,
        ));
        let wps: Vec<(&str, WaypointFor, Option<&str>)> = t
            .model
            .waypoints
            .iter()
            .map(|w| (w.name.as_str(), w.for_, w.for_service_account.as_deref()))
            .collect();
        assert_eq!(
            wps,
            [
                ("wp", WaypointFor::All, Some("sa-web")),
                ("typo", WaypointFor::Service, None),
                ("bad-sa", WaypointFor::Service, None)
            ],
            "another class is no waypoint"
        );
        assert_eq!(t.model.waypoints[0].service_account(), "wp", "named after the Gateway");
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("apps/typo") && t.warnings[0].contains("everything"));
        assert!(t.warnings[1].contains("apps/bad-sa") && t.warnings[1].contains("Not_A_Name"));
        assert_eq!(
            t.model.namespace_labels("apps"),
            Some(&map(&[(USE_WAYPOINT, "wp")])),
            "binding labels only"
        );
        assert_eq!(t.model.services[0].labels, map(&[(USE_WAYPOINT, "wp")]));
    }

    #[test]
    fn project_gateway_keeps_the_service_account_annotation_only() {
        let mut g = annotated(
            annotated(gateway("apps", "wp", WAYPOINT_CLASS), FOR_SERVICE_ACCOUNT, "web"),
            "kubectl.kubernetes.io/last-applied-configuration",
            "{}",
        );
        project_gateway(&mut g);
        assert_eq!(g.metadata.annotations, Some(map(&[(FOR_SERVICE_ACCOUNT, "web")])));
    }

    #[test]
    fn a_waypoints_pods_are_never_captured_even_in_an_ambient_namespace() {
        let wp_pod = labelled(pod("apps", "wp-1", NODE, &["10.1.0.9"]), &[(GATEWAY_NAME_LABEL, "wp")]);
        let ingress_pod = labelled(
            pod("apps", "gw-1", NODE, &["10.1.0.8"]),
            &[(GATEWAY_NAME_LABEL, "ingress")],
        );
        let input = waypoint_input(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![wp_pod.clone(), ingress_pod],
            vec![
                gateway("apps", "wp", WAYPOINT_CLASS),
                gateway("apps", "ingress", "istio"),
            ],
        );
        let (t, asked) = run_local(&input, None, &HashMap::new());
        assert_eq!(asked, ["uid-gw-1"], "the waypoint's pod is not even looked for");
        let wp = find(&t, "wp-1").unwrap();
        assert_eq!(
            (wp.tunnel, wp.netns.as_ref()),
            (TunnelProtocol::Hbone, None),
            "reached over HBONE, not captured"
        );
        assert_eq!(
            membership(&wp_pod, None, is_waypoint_pod(&wp_pod, &input.gateways)),
            Membership::Waypoint
        );
        let captured: Vec<&str> = t.model.pods_on(NODE).map(|p| p.name.as_str()).collect();
        assert_eq!(captured, ["gw-1"]);
    }

    #[test]
    fn translated_per_service_account_waypoint_binds_pods_and_their_service() {
        let web = |name: &str, ip: &str| {
            let mut p = labelled(pod("apps", name, NODE, &[ip]), &[("app", "web")]);
            p.spec.as_mut().unwrap().service_account_name = Some("web".into());
            p
        };
        let wp_pod = labelled(
            pod("apps", "wp-1", "node2", &["10.1.0.9"]),
            &[(GATEWAY_NAME_LABEL, "wp")],
        );
        let mut input = waypoint_input(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![web("web-1", "10.1.0.1"), web("web-2", "10.1.0.2"), wp_pod],
            vec![annotated(
                gateway("apps", "wp", WAYPOINT_CLASS),
                FOR_SERVICE_ACCOUNT,
                "web",
            )],
        );
        // Without its own label the Service is bound through its pods' account.
        input.services = arcs(vec![service("apps", "web", "10.96.0.10", vec![port(None, 80, None)])]);
        let t = run(&input);
        let b = cluster::waypoint::Bindings::compute(&t.model, "cluster.local");
        let status = |m: &BTreeMap<String, cluster::waypoint::Binding>, k: &str| m.get(k).map(|b| b.status);
        use cluster::waypoint::BindingStatus::Bound;
        assert_eq!(status(&b.workloads, "apps/web-1"), Some(Bound));
        assert_eq!(status(&b.services, "apps/web"), Some(Bound));
        assert_eq!(status(&b.workloads, "apps/wp-1"), None);
        let w = b.waypoints.values().next().unwrap();
        assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/apps/sa/wp");
        assert_eq!(w.pods, ips(&["10.1.0.9"]));
    }

    // ---- AuthorizationPolicy ----

    fn ap(action: Option<&str>, rules: Vec<crd::Rule>) -> crd::AuthorizationPolicy {
        crd::AuthorizationPolicy::new(
            "apps",
            "pol",
            crd::AuthorizationPolicySpec {
                action: action.map(Into::into),
                rules: Some(rules),
                ..Default::default()
            },
        )
    }

    fn from(source: crd::Source) -> Vec<crd::From> {
        vec![crd::From { source }]
    }

    fn to(operation: crd::Operation) -> Vec<crd::To> {
        vec![crd::To { operation }]
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn policies(ps: Vec<crd::AuthorizationPolicy>) -> Translated {
        run(&Inputs {
            authorization_policies: arcs(ps),
            ..Default::default()
        })
    }

    fn principals(list: &[&str]) -> crd::Rule {
        crd::Rule {
            from: from(crd::Source {
                principals: strings(list),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn authorization_policy_action_defaults_to_allow() {
        let t = policies(vec![ap(None, vec![principals(&["cluster.local/ns/apps/sa/client"])])]);
        let p = &t.model.authorization_policies[0];
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("apps", "pol"));
        assert_eq!(p.action, rbac::Action::Allow);
        assert_eq!(p.selector, None);
        assert_eq!(
            p.rules[0].from[0].source.principals,
            ["cluster.local/ns/apps/sa/client"]
        );
    }

    #[test]
    fn deny_policy_is_kept() {
        let rule = crd::Rule {
            from: from(crd::Source {
                namespaces: strings(&["evil"]),
                ..Default::default()
            }),
            to: to(crd::Operation {
                ports: strings(&["8080"]),
                not_ports: strings(&["22"]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = policies(vec![ap(Some("DENY"), vec![rule])]);
        let p = &t.model.authorization_policies[0];
        assert_eq!(p.action, rbac::Action::Deny);
        assert_eq!(p.rules[0].from[0].source.namespaces, ["evil"]);
        assert_eq!(p.rules[0].to[0].operation.ports, [rbac::Port(8080)]);
        assert_eq!(p.rules[0].to[0].operation.not_ports, [rbac::Port(22)]);
    }

    #[test]
    fn audit_and_custom_policies_are_skipped_with_warning() {
        let t = policies(vec![ap(Some("AUDIT"), vec![]), ap(Some("CUSTOM"), vec![])]);
        assert!(t.model.authorization_policies.is_empty());
        assert_eq!(t.warnings.len(), 2);
        assert!(t.warnings[0].contains("apps/pol") && t.warnings[0].contains("AUDIT"));
        assert!(t.warnings[1].contains("CUSTOM"));
    }

    #[test]
    fn policies_with_target_refs_are_skipped() {
        let gateway = serde_json::json!({"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"});
        let mut one = ap(Some("DENY"), vec![]);
        one.spec.target_ref = Some(gateway.clone());
        let mut many = ap(Some("DENY"), vec![]);
        many.spec.target_refs = vec![gateway];
        let t = policies(vec![one, many]);
        assert!(t.model.authorization_policies.is_empty());
    }

    /// One rule per HTTP-only attribute, each next to an otherwise-matching L4 part.
    fn l7_rules() -> Vec<crd::Rule> {
        let any = strings(&["cluster.local/ns/apps/sa/client"]);
        let op = |f: fn(&mut crd::Operation)| {
            let mut o = crd::Operation::default();
            f(&mut o);
            crd::Rule {
                to: to(o),
                ..principals(&["cluster.local/ns/apps/sa/client"])
            }
        };
        vec![
            op(|o| o.methods = strings(&["GET"])),
            op(|o| o.paths = strings(&["/admin"])),
            op(|o| o.hosts = strings(&["web.apps"])),
            crd::Rule {
                when: vec![serde_json::json!({"key": "request.headers[x-user]", "values": ["me"]})],
                ..principals(&["cluster.local/ns/apps/sa/client"])
            },
            crd::Rule {
                from: from(crd::Source {
                    principals: any,
                    request_principals: strings(&["issuer/subject"]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn allow_rules_needing_l7_are_dropped_so_the_policy_denies() {
        let t = policies(vec![ap(Some("ALLOW"), l7_rules())]);
        let p = &t.model.authorization_policies[0];
        assert_eq!(p.action, rbac::Action::Allow);
        assert!(p.rules.is_empty());
        assert_eq!(t.warnings.len(), 5, "{:?}", t.warnings);
        assert!(t.warnings[3].contains("apps/pol") && t.warnings[3].contains("rules[3]"));
        let labels = BTreeMap::new();
        let target = rbac::Target {
            namespace: "apps",
            labels: &labels,
        };
        let conn = rbac::Conn {
            principal: Some(SpiffeId::new("cluster.local", "apps", "client")),
            src_ip: "10.1.0.1".parse().unwrap(),
            dst_port: 80,
        };
        assert!(rbac::authorize(&t.model.authorization_policies, &target, &conn).is_err());
        // The same rules without their HTTP parts would have allowed it.
        let l4 = policies(vec![ap(None, vec![principals(&["cluster.local/ns/apps/sa/client"])])]);
        assert!(rbac::authorize(&l4.model.authorization_policies, &target, &conn).is_ok());
    }

    #[test]
    fn deny_rules_with_l7_fields_keep_their_l4_parts() {
        let rule = crd::Rule {
            from: from(crd::Source {
                namespaces: strings(&["evil"]),
                request_principals: strings(&["*"]),
                ..Default::default()
            }),
            to: to(crd::Operation {
                ports: strings(&["80"]),
                methods: strings(&["POST"]),
                ..Default::default()
            }),
            when: vec![serde_json::json!({"key": "request.auth.claims[group]", "values": ["x"]})],
        };
        let t = policies(vec![ap(Some("DENY"), vec![rule])]);
        let expected = rbac::Rule {
            from: vec![rbac::From {
                source: rbac::Source {
                    namespaces: strings(&["evil"]),
                    ..Default::default()
                },
            }],
            to: vec![rbac::To {
                operation: rbac::Operation {
                    ports: vec![rbac::Port(80)],
                    ..Default::default()
                },
            }],
        };
        assert_eq!(t.model.authorization_policies[0].rules, [expected]);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn bare_ips_in_ip_blocks_become_host_prefixes() {
        let rule = crd::Rule {
            from: from(crd::Source {
                ip_blocks: strings(&["10.1.2.3", "10.2.0.0/16", "fd00::1"]),
                not_ip_blocks: strings(&["192.0.2.7"]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = policies(vec![ap(None, vec![rule])]);
        let src = &t.model.authorization_policies[0].rules[0].from[0].source;
        let shown = |c: &[crate::config::Cidr]| c.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(shown(&src.ip_blocks), ["10.1.2.3/32", "10.2.0.0/16", "fd00::1/128"]);
        assert_eq!(shown(&src.not_ip_blocks), ["192.0.2.7/32"]);
    }

    #[test]
    fn bad_port_string_skips_the_policy_with_warning() {
        let rule = crd::Rule {
            to: to(crd::Operation {
                ports: strings(&["80", "http"]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = policies(vec![ap(Some("DENY"), vec![rule])]);
        assert!(t.model.authorization_policies.is_empty());
        assert_eq!(t.warnings.len(), 1);
        let w = &t.warnings[0];
        assert!(
            w.contains("apps/pol") && w.contains("`http` is not a port number") && w.contains("skipped"),
            "{w}"
        );
    }

    #[test]
    fn selector_match_labels_are_carried() {
        let mut p = ap(None, vec![]);
        p.spec.selector = Some(crd::WorkloadSelector {
            match_labels: map(&[("app", "web")]),
        });
        let t = policies(vec![p]);
        assert_eq!(t.model.authorization_policies[0].selector, Some(map(&[("app", "web")])));
    }

    // ---- PeerAuthentication ----

    fn pa(name: &str, mode: Option<Option<&str>>) -> crd::PeerAuthentication {
        crd::PeerAuthentication::new(
            "apps",
            name,
            crd::PeerAuthenticationSpec {
                mtls: mode.map(|m| crd::Mtls {
                    mode: m.map(Into::into),
                }),
                ..Default::default()
            },
        )
    }

    fn peer_auths(ps: Vec<crd::PeerAuthentication>) -> Translated {
        run(&Inputs {
            peer_authentications: arcs(ps),
            ..Default::default()
        })
    }

    #[test]
    fn peer_authentication_modes_disable_is_permissive_unset_is_skipped() {
        let t = peer_auths(vec![
            pa("strict", Some(Some("STRICT"))),
            pa("permissive", Some(Some("PERMISSIVE"))),
            pa("disable", Some(Some("DISABLE"))),
            pa("unset", Some(Some("UNSET"))),
            pa("no-mode", Some(None)),
            pa("no-mtls", None),
        ]);
        let modes: Vec<(&str, rbac::MtlsMode)> = t
            .model
            .peer_authentications
            .iter()
            .map(|p| (p.name.as_str(), p.mode.clone()))
            .collect();
        assert_eq!(
            modes,
            [
                ("strict", rbac::MtlsMode::Strict),
                ("permissive", rbac::MtlsMode::Permissive),
                ("disable", rbac::MtlsMode::Permissive)
            ]
        );
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn port_level_mtls_warns_and_the_workload_mode_applies() {
        let mut p = pa("strict", Some(Some("STRICT")));
        p.spec.port_level_mtls = Some(BTreeMap::from([(
            "8080".to_string(),
            crd::Mtls {
                mode: Some("DISABLE".into()),
            },
        )]));
        p.spec.selector = Some(crd::WorkloadSelector {
            match_labels: map(&[("app", "web")]),
        });
        let t = peer_auths(vec![p]);
        let got = &t.model.peer_authentications[0];
        assert_eq!(got.mode, rbac::MtlsMode::Strict);
        assert_eq!(got.selector, Some(map(&[("app", "web")])));
        assert_eq!(t.warnings.len(), 1);
        assert!(
            t.warnings[0].contains("apps/strict") && t.warnings[0].contains("portLevelMtls"),
            "{:?}",
            t.warnings
        );
    }

    // ---- node addresses ----

    #[test]
    fn node_addresses_are_internal_and_external_ips_sorted_and_deduplicated() {
        let addr = |type_: &str, address: &str| NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        let node = Node {
            metadata: meta(None, NODE),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    addr("Hostname", NODE),
                    addr("InternalIP", "fd00::2"),
                    addr("ExternalIP", "203.0.113.5"),
                    addr("InternalIP", "10.0.0.2"),
                    addr("InternalDNS", "node1.internal"),
                    addr("ExternalIP", "10.0.0.2"),
                    addr("InternalIP", "10.0.0.1"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = run(&Inputs {
            node: Some(Arc::new(node)),
            ..Default::default()
        });
        assert_eq!(
            t.model.capture.node_addresses,
            ips(&["10.0.0.1", "10.0.0.2", "203.0.113.5", "fd00::2"])
        );
        assert!(run(&Inputs::default()).model.capture.node_addresses.is_empty());
    }

    // ---- project_pod ----

    fn full_pod() -> Pod {
        let mut p = labelled(
            pod("apps", "web", NODE, &["10.1.0.1", "fd00::1"]),
            &[("app", "web"), (USE_WAYPOINT, "wp")],
        );
        let m = &mut p.metadata;
        m.annotations = Some(map(&[("kubectl.kubernetes.io/last-applied-configuration", "{}")]));
        m.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubelet".into()),
            ..Default::default()
        }]);
        m.finalizers = Some(strings(&["example.com/keep"]));
        m.generate_name = Some("web-".into());
        let spec = p.spec.as_mut().unwrap();
        spec.containers = vec![Container {
            name: "app".into(),
            image: Some("web:1".into()),
            ..Default::default()
        }];
        spec.host_network = Some(false);
        spec.restart_policy = Some("Always".into());
        let st = p.status.as_mut().unwrap();
        st.host_ip = Some("10.0.0.2".into());
        st.container_statuses = Some(vec![ContainerStatus {
            name: "app".into(),
            ready: true,
            ..Default::default()
        }]);
        st.conditions = Some(vec![
            cond("PodScheduled", "True"),
            cond("Ready", "True"),
            cond("ContainersReady", "True"),
        ]);
        p
    }

    #[test]
    fn project_pod_keeps_only_what_the_model_reads() {
        let full = full_pod();
        let mut p = full.clone();
        project_pod(&mut p);
        let m = &p.metadata;
        assert_eq!((m.annotations.as_ref(), m.managed_fields.as_ref()), (None, None));
        assert_eq!((m.finalizers.as_ref(), m.generate_name.as_ref()), (None, None));
        assert_eq!(
            (&m.name, &m.namespace, &m.uid),
            (&full.metadata.name, &full.metadata.namespace, &full.metadata.uid)
        );
        assert_eq!(m.labels, full.metadata.labels);
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty() && spec.restart_policy.is_none());
        assert_eq!(spec.node_name.as_deref(), Some(NODE));
        assert_eq!(spec.service_account_name.as_deref(), Some("sa-web"));
        assert_eq!(spec.host_network, Some(false));
        let st = p.status.as_ref().unwrap();
        let full_st = full.status.as_ref().unwrap();
        assert_eq!((st.host_ip.as_ref(), st.container_statuses.as_ref()), (None, None));
        assert_eq!(
            (&st.phase, &st.pod_ip, &st.pod_ips),
            (&full_st.phase, &full_st.pod_ip, &full_st.pod_ips)
        );
        assert_eq!(st.conditions, Some(vec![cond("Ready", "True")]));
    }

    #[test]
    fn translate_of_a_projected_pod_equals_the_full_pod() {
        let mut projected = full_pod();
        project_pod(&mut projected);
        let mut not_ready = full_pod();
        not_ready.metadata.name = Some("slow".into());
        not_ready.metadata.uid = Some("uid-slow".into());
        not_ready.status.as_mut().unwrap().pod_ips = None;
        not_ready.status.as_mut().unwrap().pod_ip = Some("10.1.0.2".into());
        not_ready.status.as_mut().unwrap().conditions = Some(vec![cond("Ready", "False")]);
        let mut not_ready_projected = not_ready.clone();
        project_pod(&mut not_ready_projected);
        let model = |pods: Vec<Pod>| {
            let ns = namespace("apps", &[(DATAPLANE_MODE, "ambient")]);
            run(&inputs(vec![ns], pods)).model
        };
        let full = model(vec![full_pod(), not_ready]);
        assert_eq!(model(vec![projected, not_ready_projected]), full);
        assert_eq!(full.pods.len(), 2);
        assert_eq!(full.pods[0].labels[USE_WAYPOINT], "wp");
        assert!(full.pods[0].healthy && !full.pods[1].healthy);
    }
}
