//! Compact records of the Kubernetes objects: only the fields the model
//! reads, with repeated strings (namespaces, nodes, service accounts,
//! label maps) shared through [`Interner`]. A projected `k8s_openapi::Pod`
//! occupied 2.2 KB inline before its strings; a [`PodRecord`] is about 100
//! bytes plus its IPs, its labels shared with the pods of the same app.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use ::kube::Resource;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::crd;
use crate::waypoint::{FOR_SERVICE_ACCOUNT, GATEWAY_NAME_LABEL, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, WAYPOINT_FOR};
use mesh_cni::membership::DATAPLANE_MODE;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The labels of namespaces and Services the model keeps (binding only).
pub(crate) const BINDING_LABELS: [&str; 3] = [USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, GATEWAY_NAME_LABEL];

pub type Str = Arc<str>;
pub use crate::config::Labels;

/// Namespace and name (namespace "" for cluster-scoped objects).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: Str,
    pub name: Str,
}

impl Key {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(m: &ObjectMeta) -> Option<Self> {
        Some(Self::new(m.namespace.as_deref().unwrap_or(""), m.name.as_deref()?))
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A record the model keeps in a table by its key.
pub trait Record: Clone + PartialEq {
    fn key(&self) -> &Key;
    /// Replaces repeated strings with the shared copies.
    fn intern(&mut self, _: &mut Interner) {}
}

/// Shared copies of repeated strings and label maps. Unused entries are
/// swept when the set has doubled since the last sweep.
#[derive(Default)]
pub struct Interner {
    strs: HashSet<Str>,
    labels: HashSet<Labels>,
    swept_at: usize,
}

impl Interner {
    pub fn str(&mut self, s: &mut Str) {
        match self.strs.get(s) {
            Some(shared) => *s = shared.clone(),
            None => {
                self.strs.insert(s.clone());
                self.maybe_sweep();
            }
        }
    }

    pub fn labels(&mut self, l: &mut Labels) {
        match self.labels.get(l) {
            Some(shared) => *l = shared.clone(),
            None => {
                self.labels.insert(l.clone());
                self.maybe_sweep();
            }
        }
    }

    fn maybe_sweep(&mut self) {
        let n = self.strs.len() + self.labels.len();
        if n > 2 * self.swept_at.max(512) {
            // Only the interner holds it: no record (nor a spec translated
            // from one) uses it any more.
            self.strs.retain(|s| Arc::strong_count(s) > 1);
            self.labels.retain(|l| Arc::strong_count(l) > 1);
            self.swept_at = self.strs.len() + self.labels.len();
        }
    }
}

/// What the model reads of a Namespace: the labels of membership and binding.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRecord {
    pub key: Key,
    pub labels: Labels,
}

impl Record for NamespaceRecord {
    fn key(&self) -> &Key {
        &self.key
    }
    fn intern(&mut self, i: &mut Interner) {
        i.str(&mut self.key.name);
        i.labels(&mut self.labels);
    }
}

impl NamespaceRecord {
    pub fn from_k8s(n: &Namespace) -> Option<Self> {
        let mut labels = n.metadata.labels.clone().unwrap_or_default();
        labels.retain(|k, _| k == DATAPLANE_MODE || BINDING_LABELS.contains(&k.as_str()));
        Some(Self {
            key: Key::of(&n.metadata)?,
            labels: Arc::new(labels.into()),
        })
    }
}

/// A pod's UID. Kubernetes makes them UUIDs, kept here inline (24 bytes,
/// no allocation; as an `Arc<str>` it took 16 inline and 64 allocated, for
/// every pod of the cluster); anything else as the string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    Uuid(uuid::Uuid),
    Other(Str),
}

impl Uid {
    pub fn new(s: &str) -> Self {
        match uuid::Uuid::try_parse(s) {
            // Only the form it prints back in: a UID is compared as a string.
            Ok(u) if u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == s => Self::Uuid(u),
            _ => Self::Other(s.into()),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Other(s) if s.is_empty())
    }
}

/// As the string it is (the enrolment file and the config dump).
impl serde::Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::new(&String::deserialize(d)?))
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uuid(u) => u.hyphenated().fmt(f),
            Self::Other(s) => f.write_str(s),
        }
    }
}

impl PartialEq<str> for Uid {
    fn eq(&self, other: &str) -> bool {
        match self {
            Self::Uuid(u) => u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == other,
            Self::Other(s) => **s == *other,
        }
    }
}

/// An address as the data path sees it: an IPv4-mapped IPv6 address is
/// the IPv4 one (a connection never shows the mapped form, and the
/// enrolment checks refuse it); text that is no address is skipped.
fn address(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// What the model reads of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    pub key: Key,
    pub uid: Uid,
    pub node: Option<Str>,
    pub service_account: Str,
    pub labels: Labels,
    pub host_network: bool,
    /// `status.phase` is Succeeded or Failed (all the model reads of it).
    pub finished: bool,
    pub ips: Box<[IpAddr]>,
    /// The Ready condition is True.
    pub ready: bool,
}

impl Record for PodRecord {
    fn key(&self) -> &Key {
        &self.key
    }
    fn intern(&mut self, i: &mut Interner) {
        i.str(&mut self.key.namespace);
        i.str(&mut self.service_account);
        i.labels(&mut self.labels);
        if let Some(n) = &mut self.node {
            i.str(n);
        }
    }
}

impl PodRecord {
    /// The record of a whole Pod (inputs built in code, tests); the
    /// watches decode [`super::slim::Pod`] instead.
    pub fn from_k8s(pod: &Pod) -> Option<Self> {
        Self::from_slim(&super::slim::Pod::from(pod))
    }

    pub fn from_slim(pod: &super::slim::Pod) -> Option<Self> {
        let spec = pod.spec.as_ref();
        let st = pod.status.as_ref();
        let listed: Vec<&str> = match st.and_then(|s| s.pod_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
            _ => st.and_then(|s| s.pod_ip.as_deref()).into_iter().collect(),
        };
        Some(Self {
            key: Key::of(&pod.metadata)?,
            uid: Uid::new(pod.metadata.uid.as_deref().unwrap_or("")),
            node: spec.and_then(|s| s.node_name.as_deref()).map(Into::into),
            // Kubernetes' default when unset.
            service_account: spec
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default")
                .into(),
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default().into()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: mesh_cni::membership::finished(st.and_then(|s| s.phase.as_deref())),
            ips: listed.into_iter().filter_map(address).collect(),
            ready: st
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True"),
        })
    }

    /// What the shared membership rule reads of a pod; `waypoint`: it is a
    /// pod of a waypoint Gateway.
    pub fn facts(&self, waypoint: bool) -> mesh_cni::membership::PodFacts<'_> {
        mesh_cni::membership::PodFacts {
            dataplane_mode: self.labels.get(DATAPLANE_MODE).map(String::as_str),
            host_network: self.host_network,
            finished: self.finished,
            waypoint,
        }
    }
}

/// A Service port as the model reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortRecord {
    pub name: String,
    pub port: i32,
    pub target: Option<IntOrString>,
    pub tcp: bool,
    /// The declared application protocol (the waypoint's protocol choice).
    pub app_protocol: Option<String>,
}

/// What the model reads of a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub key: Key,
    /// Binding labels only.
    pub labels: Labels,
    pub vips: Box<[IpAddr]>,
    pub ports: Box<[PortRecord]>,
    pub selector: Option<Labels>,
}

impl Record for ServiceRecord {
    fn key(&self) -> &Key {
        &self.key
    }
    fn intern(&mut self, i: &mut Interner) {
        i.str(&mut self.key.namespace);
        i.labels(&mut self.labels);
    }
}

impl ServiceRecord {
    pub fn from_k8s(svc: &Service) -> Option<Self> {
        let spec = svc.spec.as_ref();
        let listed: Vec<&String> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().collect(),
            _ => spec.and_then(|s| s.cluster_ip.as_ref()).into_iter().collect(),
        };
        let mut labels = svc.metadata.labels.clone().unwrap_or_default();
        labels.retain(|k, _| BINDING_LABELS.contains(&k.as_str()));
        Some(Self {
            key: Key::of(&svc.metadata)?,
            labels: Arc::new(labels.into()),
            // Headless and ExternalName services have none.
            vips: listed.into_iter().filter_map(|s| address(s)).collect(),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| PortRecord {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port,
                    target: p.target_port.clone(),
                    tcp: p.protocol.as_deref().is_none_or(|proto| proto == "TCP"),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            selector: spec.and_then(|s| s.selector.clone()).map(|s| Arc::new(s.into())),
        })
    }
}

/// What the model reads of an EndpointSlice: its Service, port names and
/// ready addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRecord {
    pub key: Key,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: Option<Key>,
    /// (Service port name, "" when unnamed; number).
    pub ports: Box<[(String, Option<i32>)]>,
    /// Shared with its Service's translation when it is the only slice.
    pub ready: Arc<[IpAddr]>,
}

impl Record for SliceRecord {
    fn key(&self) -> &Key {
        &self.key
    }
}

impl SliceRecord {
    /// The record of a whole EndpointSlice (inputs built in code, tests);
    /// the watches decode [`super::slim::EndpointSlice`] instead.
    pub fn from_k8s(s: &EndpointSlice) -> Option<Self> {
        Self::from_slim(&super::slim::EndpointSlice::from(s))
    }

    pub fn from_slim(s: &super::slim::EndpointSlice) -> Option<Self> {
        let key = Key::of(&s.metadata)?;
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|svc| Key {
                namespace: key.namespace.clone(),
                name: svc.as_str().into(),
            });
        Some(Self {
            service,
            ports: s
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap_or_default(), p.port))
                .collect(),
            ready: s
                .endpoints
                .iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .flat_map(|e| e.addresses.iter().filter_map(|a| address(a)))
                .collect(),
            key,
        })
    }
}

/// What the model reads of a Gateway (waypoints only matter).
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRecord {
    pub key: Key,
    /// Class `istio-waypoint`.
    pub waypoint: bool,
    /// Label `istio.io/waypoint-for`.
    pub waypoint_for: Option<String>,
    /// Annotation `istio.io/for-service-account`.
    pub for_service_account: Option<String>,
}

impl Record for GatewayRecord {
    fn key(&self) -> &Key {
        &self.key
    }
}

impl GatewayRecord {
    pub fn from_k8s(g: &crd::Gateway) -> Option<Self> {
        let m = &g.metadata;
        Some(Self {
            key: Key::of(m)?,
            waypoint: g.spec.gateway_class_name == crate::waypoint::WAYPOINT_CLASS,
            waypoint_for: m.labels.as_ref().and_then(|l| l.get(WAYPOINT_FOR)).cloned(),
            for_service_account: m.annotations.as_ref().and_then(|a| a.get(FOR_SERVICE_ACCOUNT)).cloned(),
        })
    }
}

/// An Istio policy, kept whole (few, and translated with its warnings).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRecord<P> {
    pub key: Key,
    pub policy: Arc<P>,
}

impl<P: PartialEq + Clone> Record for PolicyRecord<P> {
    fn key(&self) -> &Key {
        &self.key
    }
}

impl<P: Resource<DynamicType = crd::Version>> PolicyRecord<P> {
    pub fn from_k8s(mut p: P) -> Option<Self> {
        let m = p.meta_mut();
        m.managed_fields = None;
        m.annotations = None;
        Some(Self {
            key: Key::of(p.meta())?,
            policy: Arc::new(p),
        })
    }
}

/// Keeps only what the model reads of a pod (for a cluster-wide
/// `reflector::Store<Pod>` such as the CA's: no managed fields,
/// annotations, containers or statuses beyond IPs, phase and readiness).
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

#[cfg(test)]
mod tests {
    use super::Uid;

    /// The enrolment file and the config dump carry a pod's UID as the
    /// string it is (it was a `String` there before it was a `Uid`).
    #[test]
    fn a_uid_is_written_and_read_as_its_string() {
        let canonical = "0b5e7a1c-3f2d-4e8a-9c61-5d2f4b7a8e90";
        let upper = "0B5E7A1C-3F2D-4E8A-9C61-5D2F4B7A8E90";
        for s in [
            canonical,
            upper,
            "{0b5e7a1c-3f2d-4e8a-9c61-5d2f4b7a8e90}",
            "uid-web",
            "",
        ] {
            let uid = Uid::new(s);
            assert_eq!(serde_json::to_string(&uid).unwrap(), serde_json::to_string(s).unwrap());
            assert_eq!(
                serde_yaml::from_str::<Uid>(&serde_yaml::to_string(&uid).unwrap()).unwrap(),
                uid
            );
            assert_eq!(
                serde_json::from_str::<Uid>(&serde_json::to_string(s).unwrap())
                    .unwrap()
                    .to_string(),
                s
            );
        }
        assert!(serde_json::from_str::<Uid>("7").is_err(), "a UID is a string");
    }

    #[test]
    fn a_uid_prints_back_as_it_came_and_a_uuid_takes_no_allocation() {
        let canonical = "0b5e7a1c-3f2d-4e8a-9c61-5d2f4b7a8e90";
        for s in [canonical, "0B5E7A1C-3F2D-4E8A-9C61-5D2F4B7A8E90", "uid-web", ""] {
            let uid = Uid::new(s);
            assert_eq!(uid.to_string(), s);
            assert!(uid == *s);
            assert_eq!(uid.is_empty(), s.is_empty());
        }
        assert!(matches!(Uid::new(canonical), Uid::Uuid(_)));
        // Not canonical: kept as given, so it compares as the same string.
        assert!(matches!(
            Uid::new("0B5E7A1C-3F2D-4E8A-9C61-5D2F4B7A8E90"),
            Uid::Other(_)
        ));
        assert!(Uid::new(canonical) != *"0B5E7A1C-3F2D-4E8A-9C61-5D2F4B7A8E90");
        assert!(std::mem::size_of::<Uid>() <= 24);
    }
}
