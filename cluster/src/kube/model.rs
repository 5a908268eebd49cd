//! Kubernetes objects -> the cluster model (the same [`LocalConfig`] the
//! local file produces), kept incrementally: [`Model`] holds compact
//! records ([`super::records`]) and the translation of each, and a change
//! re-translates only what it touches:
//! * a pod: that pod (the services that select it take their endpoints from
//!   the model's pods when they are read, in `state`);
//! * an EndpointSlice: the Service(s) it belonged to and belongs to;
//! * a Service or policy: itself;
//! * a Namespace: itself, and its pods only when its dataplane-mode label
//!   changed;
//! * a Gateway: itself, and only when it became or stopped being a
//!   waypoint, the pods carrying its gateway-name label.
//!
//! [`Model::translate`] assembles the [`LocalConfig`]; the node-local facts
//! (where a pod of this node lives, IPs the CNI plugin gave, the agent's
//! own pod, the node's addresses) come from the caller through [`Local`];
//! without one (a waypoint) no pod is located.
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
//!
//! Routes (HTTPRoute, the routing issue) get a table of their own here,
//! keyed like the others and re-translated on their own changes.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    crd,
    records::{
        GatewayRecord, Interner, Key, NamespaceRecord, PodRecord, PolicyRecord, Record, ServiceRecord, SliceRecord,
        Str, BINDING_LABELS,
    },
};
use crate::{
    config::{
        CaptureSettings, LocalConfig, NamespaceSpec, PodSpec, ServicePort, ServiceSpec, TunnelProtocol, WaypointSpec,
    },
    labels::LabelMap,
    rbac,
};

pub use super::records::{project_pod, SERVICE_NAME_LABEL};
pub use crate::waypoint::{
    WaypointFor, FOR_SERVICE_ACCOUNT, GATEWAY_NAME_LABEL, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, WAYPOINT_CLASS,
    WAYPOINT_FOR,
};
pub use mesh_cni::membership::{Membership, DATAPLANE_MODE};

/// What a watch delivers to the model.
#[derive(Debug)]
pub enum Change<R> {
    /// A complete list (the first, or after the watch lost its place).
    Relisted(Vec<R>),
    Upsert(R),
    Delete(R),
}

/// Where a pod of this node lives (from the CNI plugin or discovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// Node-local facts the API does not have (the agent's).
pub struct Local<'a> {
    pub node: &'a str,
    /// The agent's own pod, never enrolled.
    pub own_uid: Option<&'a str>,
    /// IPs the CNI plugin reported before the API has them, by pod UID.
    pub cni_ips: &'a HashMap<String, Vec<IpAddr>>,
    /// Finds the netns and cgroup of an in-mesh pod of this node by UID
    /// (the netns must hold one of the given IPs).
    pub locate: &'a mut dyn FnMut(&str, &[IpAddr]) -> Option<Location>,
    /// The node's own addresses (kubelet probes come from them).
    pub node_addresses: &'a [IpAddr],
}

/// The model plus what could not be translated (for logs).
pub struct Translated {
    pub model: LocalConfig,
    pub warnings: Vec<String>,
}

/// How many records were translated (again), by kind: what a change cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retranslated {
    pub namespaces: u64,
    pub pods: u64,
    pub services: u64,
    pub gateways: u64,
    pub policies: u64,
}

/// A translation with what it could not translate.
struct Out<T> {
    value: Option<T>,
    warnings: Vec<String>,
}

impl<T> Default for Out<T> {
    fn default() -> Self {
        Self {
            value: None,
            warnings: Vec::new(),
        }
    }
}

struct Row<R, O> {
    /// Arrival order: the model lists objects as they came (the first of
    /// two pods claiming an IP keeps it). 32 bits, renumbered when they run
    /// out ([`Table::renumber`]): with 64, a pod's row and key took 168
    /// bytes, and the table's B-tree nodes (eleven each) a 2 KiB allocation
    /// where 1,792 bytes now do.
    seq: u32,
    record: R,
    out: O,
}

/// Records by key (namespace first: a namespace's rows are one range),
/// each with its translation and its arrival order. A B-tree: a hash map
/// rounds its buckets up to a power of two, and with a second index for
/// the order the pods' table took 40 % more than the rows.
struct Table<R, O> {
    next: u32,
    rows: BTreeMap<Key, Row<R, O>>,
}

impl<R, O> Default for Table<R, O> {
    fn default() -> Self {
        Self {
            next: 0,
            rows: BTreeMap::new(),
        }
    }
}

/// A record that changed: its key and what it was (`None`: new).
type Touched<R> = Vec<(Key, Option<R>)>;

impl<R: Record, O: Default> Table<R, O> {
    fn get(&self, key: &Key) -> Option<&Row<R, O>> {
        self.rows.get(key)
    }

    /// In arrival order (sorted here: a translation walks every row anyway).
    fn iter(&self) -> impl Iterator<Item = &Row<R, O>> {
        let mut rows: Vec<(u32, &Row<R, O>)> = self.rows.values().map(|r| (r.seq, r)).collect();
        rows.sort_unstable_by_key(|(seq, _)| *seq);
        rows.into_iter().map(|(_, r)| r)
    }

    /// The keys of the rows of one namespace.
    fn keys_in(&self, namespace: &Str) -> impl Iterator<Item = &Key> {
        let namespace = namespace.clone();
        let from = Key {
            namespace: namespace.clone(),
            name: "".into(),
        };
        self.rows
            .range(from..)
            .map(|(k, _)| k)
            .take_while(move |k| k.namespace == namespace)
    }

    fn set(&mut self, key: &Key, out: O) {
        if let Some(row) = self.rows.get_mut(key) {
            row.out = out;
        }
    }

    fn apply(&mut self, change: Change<R>, interner: &mut Interner) -> Touched<R> {
        match change {
            Change::Upsert(r) => self.upsert(r, interner).into_iter().collect(),
            Change::Delete(r) => self.remove(r.key()).into_iter().collect(),
            Change::Relisted(list) => {
                let keep: HashSet<&Key> = list.iter().map(Record::key).collect();
                let gone: Vec<Key> = self.rows.keys().filter(|k| !keep.contains(k)).cloned().collect();
                let mut touched: Touched<R> = gone.iter().filter_map(|k| self.remove(k)).collect();
                touched.extend(list.into_iter().filter_map(|r| self.upsert(r, interner)));
                touched
            }
        }
    }

    fn upsert(&mut self, mut r: R, interner: &mut Interner) -> Option<(Key, Option<R>)> {
        if let Some(row) = self.rows.get_mut(r.key()) {
            if row.record == r {
                return None; // a resync or a field the model does not read
            }
            r.intern(interner);
            let old = std::mem::replace(&mut row.record, r);
            return Some((old.key().clone(), Some(old)));
        }
        r.intern(interner);
        let key = r.key().clone();
        if self.next == u32::MAX {
            self.renumber();
        }
        let seq = self.next;
        self.next += 1;
        self.rows.insert(
            key.clone(),
            Row {
                seq,
                record: r,
                out: O::default(),
            },
        );
        Some((key, None))
    }

    /// Numbers the rows 0, 1, ... in their arrival order again: 2^32
    /// arrivals (pods created over the agent's life) would wrap the count.
    fn renumber(&mut self) {
        let mut rows: Vec<&mut Row<R, O>> = self.rows.values_mut().collect();
        rows.sort_unstable_by_key(|r| r.seq);
        for (seq, row) in (0..).zip(rows) {
            row.seq = seq;
        }
        // Fewer rows than 2^32: each has a key of its own.
        self.next = u32::try_from(self.rows.len()).expect("fewer than 2^32 rows");
    }

    fn remove(&mut self, key: &Key) -> Option<(Key, Option<R>)> {
        let row = self.rows.remove(key)?;
        Some((key.clone(), Some(row.record)))
    }
}

type Authz = PolicyRecord<crd::AuthorizationPolicy>;
type PeerAuth = PolicyRecord<crd::PeerAuthentication>;

/// The cluster as the mesh sees it, kept up to date change by change.
#[derive(Default)]
pub struct Model {
    interner: Interner,
    namespaces: Table<NamespaceRecord, Option<NamespaceSpec>>,
    pods: Table<PodRecord, Option<Membership>>,
    services: Table<ServiceRecord, Out<ServiceSpec>>,
    slices: Table<SliceRecord, ()>,
    /// Sorted, each once. A list, not a set: a Service has one slice or a
    /// few, and a B-tree set took a 400-byte node for one key.
    slices_by_service: HashMap<Key, Vec<Key>>,
    gateways: Table<GatewayRecord, Out<WaypointSpec>>,
    authz: Table<Authz, Out<rbac::AuthorizationPolicy>>,
    peer_auth: Table<PeerAuth, Out<rbac::PeerAuthentication>>,
    retranslated: Retranslated,
    /// Pods deleted or replaced by one with another UID, ever.
    pods_gone: u64,
}

impl Model {
    /// What the changes so far cost.
    pub fn retranslated(&self) -> Retranslated {
        self.retranslated
    }

    /// Shares `r`'s repeated strings and labels with the model's records.
    /// A watch calls it on each record of a list as it arrives: interned
    /// only when the list is applied, the copies freed then were scattered
    /// over the pages of the records kept (a third more resident memory).
    pub fn intern<R: Record>(&mut self, r: &mut R) {
        r.intern(&mut self.interner);
    }

    pub fn apply_namespaces(&mut self, c: Change<NamespaceRecord>) {
        for (key, old) in self.namespaces.apply(c, &mut self.interner) {
            let now = self.namespaces.get(&key).map(|r| r.record.labels.clone());
            if let Some(labels) = &now {
                self.retranslated.namespaces += 1;
                let binding = labels.to_map_of(|k| BINDING_LABELS.contains(&k));
                let spec = (!binding.is_empty()).then(|| NamespaceSpec {
                    name: key.name.to_string(),
                    labels: binding,
                });
                self.namespaces.set(&key, spec);
            }
            let mode = |l: Option<&LabelMap>| l.and_then(|l| l.get(DATAPLANE_MODE)).cloned();
            if mode(old.as_ref().map(|o| &*o.labels)) != mode(now.as_deref()) {
                let pods: Vec<Key> = self.pods.keys_in(&key.name).cloned().collect();
                pods.iter().for_each(|p| self.translate_pod(p));
            }
        }
    }

    pub fn apply_pods(&mut self, c: Change<PodRecord>) {
        for (key, old) in self.pods.apply(c, &mut self.interner) {
            let now = self.pods.get(&key).map(|r| &r.record.uid);
            if old.is_some_and(|o| now != Some(&o.uid)) {
                self.pods_gone += 1;
            }
            if now.is_some() {
                self.translate_pod(&key);
            }
        }
    }

    pub fn apply_services(&mut self, c: Change<ServiceRecord>) {
        for (key, _) in self.services.apply(c, &mut self.interner) {
            self.translate_service(&key);
        }
    }

    pub fn apply_slices(&mut self, c: Change<SliceRecord>) {
        for (key, old) in self.slices.apply(c, &mut self.interner) {
            let now = self.slices.get(&key).and_then(|r| r.record.service.clone());
            let before = old.and_then(|o| o.service);
            if let Some(svc) = &before {
                if let Some(list) = self.slices_by_service.get_mut(svc) {
                    if let Ok(i) = list.binary_search(&key) {
                        list.remove(i);
                    }
                    if list.is_empty() {
                        self.slices_by_service.remove(svc);
                    }
                }
            }
            if let Some(svc) = &now {
                let list = self.slices_by_service.entry(svc.clone()).or_default();
                if let Err(i) = list.binary_search(&key) {
                    list.insert(i, key.clone());
                }
            }
            let services: BTreeSet<Key> = before.into_iter().chain(now).collect();
            services.iter().for_each(|s| self.translate_service(s));
        }
    }

    pub fn apply_gateways(&mut self, c: Change<GatewayRecord>) {
        for (key, old) in self.gateways.apply(c, &mut self.interner) {
            let now = self.gateways.get(&key).map(|r| r.record.waypoint);
            if now.is_some() {
                self.retranslated.gateways += 1;
                let mut out = Out::default();
                let record = &self.gateways.get(&key).expect("just applied").record;
                out.value = record.waypoint.then(|| waypoint_spec(record, &mut out.warnings));
                self.gateways.set(&key, out);
            }
            // Its pods are never captured while it is a waypoint.
            if old.is_some_and(|o| o.waypoint) != now.unwrap_or(false) {
                let pods: Vec<Key> = self
                    .pods
                    .keys_in(&key.namespace)
                    .filter(|p| {
                        let labels = &self.pods.get(p).expect("indexed").record.labels;
                        labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(&*key.name)
                    })
                    .cloned()
                    .collect();
                pods.iter().for_each(|p| self.translate_pod(p));
            }
        }
    }

    pub fn apply_authorization_policies(&mut self, c: Change<Authz>) {
        for (key, _) in self.authz.apply(c, &mut self.interner) {
            if let Some(row) = self.authz.get(&key) {
                self.retranslated.policies += 1;
                let mut out = Out::default();
                out.value = authorization_policy(&row.record.policy, &mut out.warnings);
                self.authz.set(&key, out);
            }
        }
    }

    pub fn apply_peer_authentications(&mut self, c: Change<PeerAuth>) {
        for (key, _) in self.peer_auth.apply(c, &mut self.interner) {
            if let Some(row) = self.peer_auth.get(&key) {
                self.retranslated.policies += 1;
                let mut out = Out::default();
                out.value = peer_authentication(&row.record.policy, &mut out.warnings);
                self.peer_auth.set(&key, out);
            }
        }
    }

    /// Counts pods that left (deleted, or replaced by one with another
    /// UID): what holds per-pod state by UID needs pruning only when it
    /// moved (pruning walks every pod).
    pub fn pods_gone(&self) -> u64 {
        self.pods_gone
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.pods.get(&Key::new(namespace, name)).map(|r| &r.record)
    }

    /// Every pod, by namespace and name (not in arrival order: no sort of
    /// every row, for callers that only collect a set).
    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.rows.values().map(|r| &r.record)
    }

    /// Whether the pod belongs in the mesh (the rule the CNI plugin applies
    /// too, [`mesh_cni::membership`]).
    pub fn membership(&self, pod: &PodRecord) -> Membership {
        let waypoint = pod.labels.get(GATEWAY_NAME_LABEL).is_some_and(|gw| {
            let key = Key {
                namespace: pod.key.namespace.clone(),
                name: gw.as_str().into(),
            };
            self.gateways.get(&key).is_some_and(|g| g.record.waypoint)
        });
        let ns = self
            .namespaces
            .get(&Key {
                namespace: "".into(),
                name: pod.key.namespace.clone(),
            })
            .and_then(|n| n.record.labels.get(DATAPLANE_MODE));
        mesh_cni::membership::membership(pod.facts(waypoint), ns.map(String::as_str))
    }

    fn translate_pod(&mut self, key: &Key) {
        let Some(row) = self.pods.get(key) else { return };
        self.retranslated.pods += 1;
        let m = self.membership(&row.record);
        self.pods.set(key, Some(m));
    }

    fn translate_service(&mut self, key: &Key) {
        let Some(row) = self.services.get(key) else { return };
        self.retranslated.services += 1;
        let slices: Vec<&SliceRecord> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.get(s).map(|r| &r.record))
            .collect();
        let mut out = Out::default();
        out.value = service_spec(&row.record, &slices, &mut out.warnings);
        self.services.set(key, out);
    }

    /// One pod's spec as [`Self::translate`] gives it, for a pod to enroll
    /// before the next whole translation (a CNI ADD waits on it). `None`:
    /// unknown, not translated yet, or nothing to list (no IPs, host
    /// network, finished). Whether its IPs are another pod's is the whole
    /// translation's call: the caller checks that itself.
    pub fn pod_spec(&self, namespace: &str, name: &str, local: &mut Local) -> Option<PodSpec> {
        let row = self.pods.get(&Key::new(namespace, name))?;
        pod_spec(&row.record, row.out?, Some(local), &mut Vec::new())
    }

    /// The model (for `local`'s node when given: its in-mesh pods located).
    pub fn translate(&self, mut local: Option<&mut Local>) -> Translated {
        let mut warnings = Vec::new();
        // By index into `pods`: a key per pod was an allocation per pod.
        let mut seen_ips: HashMap<IpAddr, usize> = HashMap::new();
        // Sized once: grown by doubling, the list of 10,000 pods took
        // 16,384 specs' room for a moment.
        let mut pods: Vec<PodSpec> = Vec::with_capacity(self.pods.rows.len());
        for row in self.pods.iter() {
            let Some(member) = row.out else { continue };
            if let Some(p) = pod_spec(&row.record, member, local.as_deref_mut(), &mut warnings) {
                if let Some(ip) = p.ips.iter().find(|ip| seen_ips.contains_key(ip)) {
                    warnings.push(format!(
                        "pod {} has IP {ip} of pod {}; skipped until one of them goes",
                        p.key(),
                        pods[seen_ips[ip]].key()
                    ));
                    continue;
                }
                seen_ips.extend(p.ips.iter().map(|ip| (*ip, pods.len())));
                pods.push(p);
            }
        }
        let services = own_vips(collect(&self.services, &mut warnings), &seen_ips, &pods, &mut warnings);
        let model = LocalConfig {
            capture: CaptureSettings {
                node_addresses: local.map(|l| l.node_addresses.to_vec()).unwrap_or_default(),
                ..Default::default()
            },
            pods,
            authorization_policies: collect(&self.authz, &mut warnings),
            peer_authentications: collect(&self.peer_auth, &mut warnings),
            services,
            namespaces: self.namespaces.iter().filter_map(|r| r.out.clone()).collect(),
            waypoints: collect(&self.gateways, &mut warnings),
        };
        Translated { model, warnings }
    }

    /// A model of these objects, as the watches would build it.
    pub fn from_inputs(input: &Inputs) -> Self {
        fn records<K, R>(list: &[Arc<K>], f: impl Fn(&K) -> Option<R>) -> Change<R> {
            Change::Relisted(list.iter().filter_map(|o| f(o)).collect())
        }
        let mut m = Model::default();
        m.apply_namespaces(records(&input.namespaces, NamespaceRecord::from_k8s));
        m.apply_gateways(records(&input.gateways, GatewayRecord::from_k8s));
        m.apply_pods(records(&input.pods, PodRecord::from_k8s));
        m.apply_slices(records(&input.slices, SliceRecord::from_k8s));
        m.apply_services(records(&input.services, ServiceRecord::from_k8s));
        m.apply_authorization_policies(records(&input.authorization_policies, |p| {
            PolicyRecord::from_k8s(p.clone())
        }));
        m.apply_peer_authentications(records(&input.peer_authentications, |p| {
            PolicyRecord::from_k8s(p.clone())
        }));
        m
    }
}

fn collect<R: Record, T: Clone>(table: &Table<R, Out<T>>, warnings: &mut Vec<String>) -> Vec<T> {
    table
        .iter()
        .filter_map(|r| {
            warnings.extend(r.out.warnings.iter().cloned());
            r.out.value.clone()
        })
        .collect()
}

/// The services whose VIPs are their own: one whose VIP is a pod's address
/// or an earlier service's (or twice its own) is skipped with a warning
/// until one of them goes. The API allocates cluster IPs uniquely; the
/// model must hold up without it (found by the `kube_translate` fuzz
/// target: the enrolment checks refuse such a model).
fn own_vips(
    services: Vec<ServiceSpec>,
    pod_ips: &HashMap<IpAddr, usize>,
    pods: &[PodSpec],
    warnings: &mut Vec<String>,
) -> Vec<ServiceSpec> {
    let mut taken: HashMap<IpAddr, String> = HashMap::new();
    services
        .into_iter()
        .filter(|s| {
            let key = format!("{}/{}", s.namespace, s.name);
            let mut mine = HashSet::new();
            let clash = s.vips.iter().find_map(|v| match (pod_ips.get(v), taken.get(v)) {
                (Some(&pod), _) => Some(format!("{v} is the address of pod {}", pods[pod].key())),
                (_, Some(other)) => Some(format!("{v} is a VIP of service {other}")),
                _ if !mine.insert(*v) => Some(format!("{v} is listed twice")),
                _ => None,
            });
            if let Some(why) = clash {
                warnings.push(format!("service {key} skipped until one of them goes: {why}"));
                return false;
            }
            taken.extend(s.vips.iter().map(|v| (*v, key.clone())));
            true
        })
        .collect()
}

/// Objects as k8s types, for a one-shot translation (tests, tools).
#[derive(Default, Clone)]
pub struct Inputs {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<crd::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<crd::PeerAuthentication>>,
    pub gateways: Vec<Arc<crd::Gateway>>,
}

/// The model of `input` for `local`'s node, translated from scratch.
pub fn translate(input: &Inputs, local: &mut Local) -> Translated {
    Model::from_inputs(input).translate(Some(local))
}

/// A waypoint Gateway; a bad annotation or label is warned about and
/// ignored (the binding statuses then show what is not bound).
fn waypoint_spec(g: &GatewayRecord, warnings: &mut Vec<String>) -> WaypointSpec {
    let key = format!("Gateway {}", g.key);
    let for_ = match g.waypoint_for.as_deref() {
        None => WaypointFor::default(),
        Some(v) => WaypointFor::parse(v).unwrap_or_else(|| {
            warnings.push(format!(
                "{key}: label {WAYPOINT_FOR}={v} is none of service, workload, all, none; using service"
            ));
            WaypointFor::default()
        }),
    };
    let for_service_account = g
        .for_service_account
        .as_ref()
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
    WaypointSpec {
        name: g.key.name.to_string(),
        namespace: g.key.namespace.to_string(),
        // The controller names the waypoint's service account after it.
        service_account: None,
        for_service_account,
        for_,
        vips: Vec::new(),
    }
}

/// A DNS-1123 subdomain, as service account names are.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn pod_spec(
    pod: &PodRecord,
    member: Membership,
    local: Option<&mut Local>,
    warnings: &mut Vec<String>,
) -> Option<PodSpec> {
    let node = pod.node.as_ref()?;
    if matches!(member, Membership::HostNetwork | Membership::Finished) {
        return None;
    }
    let (namespace, name) = (&*pod.key.namespace, &*pod.key.name);
    let local = local.filter(|l| l.node == &**node);
    let mut ips = pod.ips.to_vec();
    if let (true, Some(l)) = (ips.is_empty(), &local) {
        ips = l.cni_ips.get(pod.uid.to_string().as_str()).cloned().unwrap_or_default();
    }
    ips = usable_ips(ips, &pod.key, warnings);
    if ips.is_empty() {
        return None; // not started yet: nobody can reach it
    }
    let uid = &pod.uid;
    let own = local.as_ref().is_some_and(|l| l.own_uid.is_some_and(|o| *uid == *o));
    let in_mesh = member == Membership::Ambient && !own;
    // The UID as text only for this node's pods in the mesh.
    let (netns, cgroup) = match local.filter(|_| in_mesh).map(|l| (l.locate)(&uid.to_string(), &ips)) {
        Some(Some(loc)) => (Some(loc.netns), Some(loc.cgroup)),
        Some(None) => {
            warnings.push(format!(
                "pod {namespace}/{name} ({uid}) is in the mesh but its network namespace was not found on this node; it is not captured yet"
            ));
            (None, None)
        }
        None => (None, None),
    };
    Some(PodSpec {
        uid: Some(uid.clone()),
        service_account: pod.service_account.clone(),
        node: node.clone(),
        netns,
        cgroup,
        ips,
        healthy: pod.ready,
        // A waypoint's pods are reached over HBONE (they terminate it)
        // but never captured (no netns above).
        tunnel: if in_mesh || member == Membership::Waypoint {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        labels: pod.labels.clone(),
        name: pod.key.name.clone(),
        namespace: pod.key.namespace.clone(),
    })
}

/// A pod's addresses the mesh can use, each once and in IPv4 form when
/// mapped: one nothing can reach
/// (loopback, multicast, unspecified: the API does not refuse them, the
/// enrolment checks do) is skipped with a warning, found by the
/// `kube_translate` fuzz target.
fn usable_ips(mut ips: Vec<IpAddr>, pod: &Key, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    let mut i = 0;
    while i < ips.len() {
        // The records fold mapped addresses already; the CNI plugin's
        // come as the runtime reported them.
        ips[i] = ips[i].to_canonical();
        let ip = ips[i];
        if !crate::config::usable_pod_address(&ip) {
            warnings.push(format!(
                "pod {pod}: {ip} cannot be a pod address (loopback, multicast or unspecified); ignored"
            ));
            ips.remove(i);
        } else if ips[..i].contains(&ip) {
            // A pod has one or two addresses: a scan, no set.
            ips.remove(i);
        } else {
            i += 1;
        }
    }
    ips
}

fn service_spec(svc: &ServiceRecord, mine: &[&SliceRecord], warnings: &mut Vec<String>) -> Option<ServiceSpec> {
    let (namespace, name) = (&svc.key.namespace, &svc.key.name);
    if svc.vips.is_empty() {
        return None; // headless and ExternalName services
    }
    let mut ports = Vec::new();
    for p in svc.ports.iter().filter(|p| p.tcp) {
        let target = match &p.target {
            None => Some(p.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(port_name)) => mine
                .iter()
                .flat_map(|s| s.ports.iter())
                // The slice names its ports after the Service's ports ("" when
                // unnamed), not after the target port name.
                .find(|(sp_name, _)| *sp_name == p.name)
                .filter(|_| !port_name.is_empty())
                .and_then(|(_, port)| *port),
        };
        match (u16::try_from(p.port), target.map(u16::try_from)) {
            (Ok(port), Some(Ok(target_port))) if port != 0 && target_port != 0 => ports.push(ServicePort {
                port,
                target_port,
                name: (!p.name.is_empty()).then(|| p.name.clone()),
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
    let endpoints: Option<Arc<[IpAddr]>> = match mine {
        [] => None,
        // The usual case (up to 100 endpoints): the slice's list itself.
        [one] => Some(one.ready.clone()),
        many => Some(many.iter().flat_map(|s| s.ready.iter().copied()).collect()),
    };
    Some(ServiceSpec {
        labels: svc.labels.to_map_of(|_| true),
        hostname: None,
        vips: svc.vips.to_vec(),
        ports,
        selector: svc.selector.clone().unwrap_or_default(),
        endpoints: endpoints.or_else(|| svc.selector.is_none().then(|| Arc::from([]))),
        load_balancing: Default::default(),
        subject_alt_names: Vec::new(),
        name: name.to_string(),
        namespace: namespace.to_string(),
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

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{
                Container, ContainerStatus, PodCondition, PodIP, PodSpec as K8sPodSpec, PodStatus,
                ServicePort as SvcPort, ServiceSpec as K8sServiceSpec,
            },
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta},
    };
    use kube::Resource;
    use mesh::identity::SpiffeId;

    use super::*;

    const NODE: &str = "node1";

    #[test]
    fn a_pods_row_keeps_the_tables_nodes_in_a_smaller_size_class() {
        // A B-tree leaf: parent pointer, index and length, eleven keys and
        // eleven values. 1,864 bytes took mimalloc's 2 KiB class: at
        // 10,000 pods, 3.1 of the 12 MB the agent held for the cluster.
        let entry = std::mem::size_of::<Key>() + std::mem::size_of::<Row<PodRecord, Option<Membership>>>();
        assert!(
            8 + 4 + 11 * entry <= 1792,
            "a leaf of pod rows takes {} bytes",
            12 + 11 * entry
        );
    }

    #[test]
    fn arrival_numbers_that_run_out_are_renumbered_in_order() {
        let mut t: Table<NamespaceRecord, ()> = Table::default();
        let mut interner = Interner::default();
        let ns = |name: &str| NamespaceRecord {
            key: Key::new("", name),
            labels: Default::default(),
        };
        for name in ["c", "a"] {
            t.upsert(ns(name), &mut interner);
        }
        t.next = u32::MAX - 1;
        for name in ["b", "d", "e"] {
            t.upsert(ns(name), &mut interner);
        }
        t.remove(&Key::new("", "a"));
        let order: Vec<&str> = t.iter().map(|r| &*r.record.key.name).collect();
        assert_eq!(order, ["c", "b", "d", "e"], "arrival order kept");
        // b took the last number; d found none left: c, a, b became 0, 1, 2.
        assert_eq!(t.rows[&Key::new("", "b")].seq, 2);
        assert_eq!((t.rows[&Key::new("", "e")].seq, t.next), (4, 5));
    }

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
                node_addresses: &[],
            },
        );
        (t, asked)
    }

    fn run(input: &Inputs) -> Translated {
        run_local(input, None, &HashMap::new()).0
    }

    fn find<'a>(t: &'a Translated, name: &str) -> Option<&'a PodSpec> {
        t.model.pods.iter().find(|p| &*p.name == name)
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
        assert_eq!((&*p.namespace, &*p.service_account), ("apps", "sa-web"));
        assert_eq!(p.uid.as_ref().map(ToString::to_string).as_deref(), Some("uid-web"));
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
        let names: Vec<&str> = t.model.pods.iter().map(|p| &*p.name).collect();
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
        let names: Vec<&str> = t.model.pods.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["new"]);
        assert_eq!(t.model.pods[0].ips, ips(&["10.1.0.5"]));
        assert_eq!(t.model.pods[0].tunnel, TunnelProtocol::Hbone);
    }

    // ---- location ----

    /// `apps` (ambient) and `plain` (no label).
    fn ambient_and_plain() -> Vec<Namespace> {
        vec![
            namespace("apps", &[(DATAPLANE_MODE, "ambient")]),
            namespace("plain", &[]),
        ]
    }

    #[test]
    fn locate_is_asked_only_for_in_mesh_pods_of_this_node() {
        let input = inputs(
            ambient_and_plain(),
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
    fn one_pods_spec_is_the_whole_translations() {
        let input = inputs(
            ambient_and_plain(),
            vec![
                pod("apps", "local", NODE, &["10.1.0.1"]),
                pod("apps", "remote", "node2", &["10.2.0.1"]),
                pod("apps", "lost", NODE, &["10.1.0.2"]),
                pod("plain", "unlabelled", NODE, &["10.1.0.3"]),
                pod("apps", "cni-only", NODE, &[]),
                pod("apps", "never-started", NODE, &[]),
            ],
        );
        let cni_ips = HashMap::from([("uid-cni-only".to_string(), ips(&["10.1.0.9"]))]);
        let (whole, _) = run_local(&input, None, &cni_ips);
        let model = Model::from_inputs(&input);
        let mut locate = |uid: &str, _: &[IpAddr]| (!uid.starts_with("uid-lost")).then(|| location(uid));
        let mut local = Local {
            node: NODE,
            own_uid: None,
            cni_ips: &cni_ips,
            locate: &mut locate,
            node_addresses: &[],
        };
        for (ns, name) in [
            ("apps", "local"),
            ("apps", "remote"),
            ("apps", "lost"),
            ("plain", "unlabelled"),
            ("apps", "cni-only"),
        ] {
            let one = model.pod_spec(ns, name, &mut local);
            assert_eq!(one.as_ref(), find(&whole, name), "{ns}/{name}");
            assert!(one.is_some(), "{ns}/{name}");
        }
        assert_eq!(model.pod_spec("apps", "never-started", &mut local), None);
        assert_eq!(model.pod_spec("apps", "unknown", &mut local), None);
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
        let captured: Vec<&str> = t.model.pods_on(NODE).map(|p| &*p.name).collect();
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
        let names: Vec<&str> = t.model.pods.iter().map(|p| &*p.name).collect();
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
        let health: Vec<(&str, bool)> = t.model.pods.iter().map(|p| (&*p.name, p.healthy)).collect();
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

    /// Found by the `kube_translate` fuzz target: two Services with one
    /// cluster IP made a model the enrolment checks refuse.
    #[test]
    fn a_vip_that_is_not_the_services_own_skips_the_service_with_a_warning() {
        let http = || vec![port(Some("http"), 80, None)];
        let input = Inputs {
            namespaces: arcs(vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])]),
            pods: arcs(vec![pod("apps", "p", NODE, &["10.1.0.1"])]),
            services: arcs(vec![
                service("apps", "web", "10.96.0.10", http()),
                service("other", "web", "10.96.0.10", http()),
                service("apps", "on-a-pod", "10.1.0.1", http()),
                service("apps", "db", "10.96.0.11", http()),
            ]),
            ..Default::default()
        };
        let t = run(&input);
        let names: Vec<String> = t
            .model
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        assert_eq!(names, ["apps/web", "apps/db"]);
        for w in [
            "service other/web skipped until one of them goes: 10.96.0.10 is a VIP of service apps/web",
            "service apps/on-a-pod skipped until one of them goes: 10.1.0.1 is the address of pod apps/p",
        ] {
            assert!(t.warnings.iter().any(|x| x == w), "no `{w}` in {:?}", t.warnings);
        }
        let yaml = serde_yaml::to_string(&t.model).unwrap();
        LocalConfig::parse(std::path::Path::new("translated.yaml"), &yaml).expect("the enrolment checks accept it");
    }

    /// Found by the `kube_translate` fuzz target (CI, 2026-12-04): a pod
    /// listing a multicast address made a model the enrolment checks
    /// refuse. Unusable addresses are skipped with a warning, a mapped one
    /// is the IPv4 address, each address counts once; a pod left with none
    /// is not listed (as one not started).
    #[test]
    fn a_pod_address_nothing_can_reach_is_skipped_with_a_warning() {
        let input = inputs(
            vec![namespace("apps", &[(DATAPLANE_MODE, "ambient")])],
            vec![
                pod("apps", "multi", NODE, &["10.1.0.1", "ff00:1:1::11", "10.1.0.1"]),
                pod("apps", "mapped", "node2", &["::ffff:10.1.0.2", "fd00::2"]),
                pod("apps", "none", "node2", &["127.0.0.1", "0.0.0.0", "224.0.0.1"]),
            ],
        );
        let t = run(&input);
        assert_eq!(find(&t, "multi").unwrap().ips, ips(&["10.1.0.1"]));
        assert_eq!(find(&t, "mapped").unwrap().ips, ips(&["10.1.0.2", "fd00::2"]));
        assert!(find(&t, "none").is_none());
        for w in [
            "pod apps/multi: ff00:1:1::11 cannot be a pod address (loopback, multicast or unspecified); ignored",
            "pod apps/none: 127.0.0.1 cannot be a pod address (loopback, multicast or unspecified); ignored",
            "pod apps/none: 224.0.0.1 cannot be a pod address (loopback, multicast or unspecified); ignored",
        ] {
            assert!(t.warnings.iter().any(|x| x == w), "no `{w}` in {:?}", t.warnings);
        }
        let yaml = serde_yaml::to_string(&t.model).unwrap();
        LocalConfig::parse(std::path::Path::new("translated.yaml"), &yaml).expect("the enrolment checks accept it");
        // Addresses from the CNI plugin (the API has none yet) alike.
        let mut input = input;
        input.pods = arcs(vec![pod("apps", "cni", NODE, &[])]);
        let cni = HashMap::from([("uid-cni".to_string(), ips(&["::ffff:10.1.0.9", "ff02::1"]))]);
        let (t, _) = run_local(&input, None, &cni);
        assert_eq!(find(&t, "cni").unwrap().ips, ips(&["10.1.0.9"]));
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
            Some(ips(&["10.1.0.1", "10.1.0.2", "10.1.0.4"]).into())
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
        assert_eq!(t.model.services[0].endpoints, Some(ips(&["10.1.0.1"]).into()));
    }

    #[test]
    fn selectorless_service_without_slices_has_no_endpoints() {
        let mut svc = service("apps", "manual", "10.96.0.10", vec![port(None, 80, None)]);
        svc.spec.as_mut().unwrap().selector = None;
        let t = services(vec![svc], vec![]);
        assert_eq!(t.model.services[0].endpoints, Some(Vec::new().into()));
        assert!(t.model.services[0].selector.is_empty());
    }

    #[test]
    fn service_with_selector_but_no_slices_falls_back_to_the_selector() {
        let t = services(
            vec![service("apps", "web", "10.96.0.10", vec![port(None, 80, None)])],
            vec![],
        );
        assert_eq!(t.model.services[0].endpoints, None);
        assert_eq!(*t.model.services[0].selector, map(&[("app", "web")]));
    }

    // ---- waypoints ----

    fn gateway(ns: &str, name: &str, class: &str) -> crd::Gateway {
        crd::Gateway::of_class(ns, name, class)
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
    fn gateway_record_keeps_the_service_account_annotation_only() {
        let mut g = annotated(
            annotated(gateway("apps", "wp", WAYPOINT_CLASS), FOR_SERVICE_ACCOUNT, "web"),
            "kubectl.kubernetes.io/last-applied-configuration",
            "{}",
        );
        g.metadata.labels = Some(map(&[(WAYPOINT_FOR, "all"), ("app", "x")]));
        let r = GatewayRecord::from_k8s(&g).unwrap();
        assert_eq!(r.for_service_account.as_deref(), Some("web"));
        assert_eq!((r.waypoint, r.waypoint_for.as_deref()), (true, Some("all")));
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
            Model::from_inputs(&input).membership(&PodRecord::from_k8s(&wp_pod).unwrap()),
            Membership::Waypoint
        );
        let captured: Vec<&str> = t.model.pods_on(NODE).map(|p| &*p.name).collect();
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
        let b = crate::waypoint::Bindings::compute(&t.model, "cluster.local");
        let status = |m: &BTreeMap<String, crate::waypoint::Binding>, k: &str| m.get(k).map(|b| b.status);
        use crate::waypoint::BindingStatus::Bound;
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
        // Two objects: a model keys them by namespace and name, as the API does.
        let mut custom = ap(Some("CUSTOM"), vec![]);
        custom.metadata.name = Some("pol-custom".into());
        let t = policies(vec![ap(Some("AUDIT"), vec![]), custom]);
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
        let labels = LabelMap::default();
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

    // ---- incremental ----

    fn delta(after: Retranslated, before: Retranslated) -> Retranslated {
        Retranslated {
            namespaces: after.namespaces - before.namespaces,
            pods: after.pods - before.pods,
            services: after.services - before.services,
            gateways: after.gateways - before.gateways,
            policies: after.policies - before.policies,
        }
    }

    /// Sorted by key, warnings too: arrival order is the only difference
    /// allowed between a model kept change by change and one built at once.
    fn normalized(mut t: Translated) -> (LocalConfig, Vec<String>) {
        let m = &mut t.model;
        m.pods.sort_by_key(|p| p.key());
        m.services
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        m.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        m.waypoints
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        t.warnings.sort();
        (t.model, t.warnings)
    }

    fn pod_record(p: &Pod) -> PodRecord {
        PodRecord::from_k8s(p).unwrap()
    }

    /// Namespace `a` (ambient) and `b`, 50 pods each (app x or y), the
    /// service `a/x` with a slice, and the gateway `a/wp` (not a waypoint).
    fn small_cluster() -> (Model, Inputs) {
        let pods = ["a", "b"]
            .iter()
            .enumerate()
            .flat_map(|(n, ns)| {
                (0..50).map(move |i| {
                    let app = if i % 2 == 0 { "x" } else { "y" };
                    let mut p = labelled(
                        pod(ns, &format!("p{i}"), NODE, &[&format!("10.{n}.0.{i}")]),
                        &[("app", app)],
                    );
                    if i < 2 {
                        p = labelled(p, &[(GATEWAY_NAME_LABEL, "wp")]);
                    }
                    p
                })
            })
            .collect();
        let input = Inputs {
            namespaces: arcs(vec![
                namespace("a", &[(DATAPLANE_MODE, "ambient")]),
                namespace("b", &[]),
            ]),
            pods: arcs(pods),
            services: arcs(vec![service(
                "a",
                "x",
                "10.96.0.1",
                vec![port(Some("http"), 80, Some(IntOrString::String("web".into())))],
            )]),
            slices: arcs(vec![slice("a", "x", &[("http", 8080)], &[("10.0.0.0", Some(true))])]),
            gateways: arcs(vec![gateway("a", "wp", "istio")]),
            ..Default::default()
        };
        (Model::from_inputs(&input), input)
    }

    #[test]
    fn a_record_interned_as_it_is_listed_keeps_its_shared_copies() {
        let (mut m, _) = small_cluster();
        let mut r = pod_record(&labelled(pod("a", "new", NODE, &["10.0.9.9"]), &[("app", "x")]));
        let own = r.labels.clone();
        m.intern(&mut r);
        let p2 = m.pod("a", "p2").unwrap().clone();
        assert!(!Arc::ptr_eq(&r.labels, &own), "interned: the record's own copy goes");
        assert!(Arc::ptr_eq(&r.labels, &p2.labels));
        assert!(Arc::ptr_eq(&r.key.namespace, &p2.key.namespace));
        let labels = r.labels.clone();
        m.apply_pods(Change::Upsert(r));
        assert!(Arc::ptr_eq(&m.pod("a", "new").unwrap().labels, &labels));
    }

    /// A translation (one per batch of changes, over every pod of the
    /// cluster) lends the records' strings: copied, their churn left the
    /// records' pages partly empty (bench-kube, README "Memory").
    #[test]
    fn a_translated_pod_shares_the_records_strings() {
        let (m, _) = small_cluster();
        let t = m.translate(None);
        assert!(!t.model.pods.is_empty());
        for p in &t.model.pods {
            let r = m.pod(&p.namespace, &p.name).unwrap();
            assert!(Arc::ptr_eq(&p.name, &r.key.name), "{}", p.key());
            assert!(Arc::ptr_eq(&p.namespace, &r.key.namespace), "{}", p.key());
            assert!(Arc::ptr_eq(&p.service_account, &r.service_account), "{}", p.key());
            assert!(Arc::ptr_eq(&p.node, r.node.as_ref().unwrap()), "{}", p.key());
            assert_eq!(p.uid.as_ref(), Some(&r.uid));
        }
    }

    #[test]
    fn a_services_only_slice_lends_its_endpoint_list_to_the_spec_and_the_data_plane() {
        let (m, _) = small_cluster();
        let (a, b) = (m.translate(None), m.translate(None));
        let listed = |t: &Translated| t.model.services[0].endpoints.clone().unwrap();
        let slice = &m.slices.iter().next().unwrap().record;
        assert!(Arc::ptr_eq(&listed(&a), &slice.ready));
        assert!(Arc::ptr_eq(&listed(&a), &listed(&b)));
        let state = crate::state::State::default();
        state.update(&a.model, "td");
        assert!(Arc::ptr_eq(&state.snapshot().services[0].endpoints, &slice.ready));
    }

    #[test]
    fn a_namespace_change_retranslates_its_own_pods_not_those_of_a_namespace_it_prefixes() {
        let mut m = Model::default();
        for ns in ["a", "a-1", "a0", "b"] {
            m.apply_namespaces(Change::Upsert(NamespaceRecord::from_k8s(&namespace(ns, &[])).unwrap()));
            for i in 0..3 {
                let p = pod(ns, &format!("p{i}"), NODE, &[&format!("10.{}.0.{i}", ns.len())]);
                m.apply_pods(Change::Upsert(pod_record(&p)));
            }
        }
        let before = m.retranslated();
        let ambient = namespace("a", &[(DATAPLANE_MODE, "ambient")]);
        m.apply_namespaces(Change::Upsert(NamespaceRecord::from_k8s(&ambient).unwrap()));
        assert_eq!(delta(m.retranslated(), before).pods, 3);
        let t = m.translate(None);
        let mut meshed: Vec<String> = t
            .model
            .pods
            .iter()
            .filter(|p| p.tunnel == TunnelProtocol::Hbone)
            .map(|p| p.key())
            .collect();
        meshed.sort();
        assert_eq!(meshed, ["a/p0", "a/p1", "a/p2"]);
    }

    #[test]
    fn pods_gone_counts_deleted_and_replaced_pods_only() {
        let mut m = Model::default();
        let p = pod("a", "p", "n1", &["10.0.0.1"]);
        m.apply_pods(Change::Upsert(pod_record(&p)));
        let mut relabelled = p.clone();
        relabelled.metadata.labels = Some(BTreeMap::from([("app".into(), "v2".into())]));
        m.apply_pods(Change::Upsert(pod_record(&relabelled)));
        assert_eq!(m.pods_gone(), 0, "a pod that changed is not gone");
        let mut replaced = relabelled.clone();
        replaced.metadata.uid = Some("uid-p-again".into());
        m.apply_pods(Change::Upsert(pod_record(&replaced)));
        assert_eq!(m.pods_gone(), 1, "same name, another UID: the first pod is gone");
        m.apply_pods(Change::Delete(pod_record(&replaced)));
        assert_eq!(m.pods_gone(), 2);
        m.apply_pods(Change::Relisted(vec![pod_record(&p)]));
        m.apply_pods(Change::Relisted(vec![]));
        assert_eq!(m.pods_gone(), 3, "a re-list without the pod");
    }

    #[test]
    fn a_change_retranslates_only_what_it_touches() {
        let (mut m, mut input) = small_cluster();
        let step = |m: &mut Model, f: &mut dyn FnMut(&mut Model)| {
            let before = m.retranslated();
            f(m);
            delta(m.retranslated(), before)
        };
        let pods = |n| Retranslated {
            pods: n,
            ..Default::default()
        };
        // A pod: that pod only; the same object again (a resync): nothing.
        let mut p3 = (*input.pods[3]).clone();
        p3.status.as_mut().unwrap().conditions = Some(vec![cond("Ready", "False")]);
        assert_eq!(
            step(&mut m, &mut |m| m.apply_pods(Change::Upsert(pod_record(&p3)))),
            pods(1)
        );
        assert_eq!(
            step(&mut m, &mut |m| m.apply_pods(Change::Upsert(pod_record(&p3)))),
            pods(0)
        );
        input.pods[3] = Arc::new(p3);
        // A slice: its service.
        let s = slice(
            "a",
            "x",
            &[("http", 8081)],
            &[("10.0.0.0", Some(true)), ("10.0.0.2", Some(true))],
        );
        let got = step(&mut m, &mut |m| {
            m.apply_slices(Change::Upsert(SliceRecord::from_k8s(&s).unwrap()))
        });
        assert_eq!(
            got,
            Retranslated {
                services: 1,
                ..Default::default()
            }
        );
        input.slices = arcs(vec![s]);
        // A namespace's binding label: the namespace, not its pods.
        let a = namespace("a", &[(DATAPLANE_MODE, "ambient"), (USE_WAYPOINT, "wp")]);
        let got = step(&mut m, &mut |m| {
            m.apply_namespaces(Change::Upsert(NamespaceRecord::from_k8s(&a).unwrap()))
        });
        assert_eq!(
            got,
            Retranslated {
                namespaces: 1,
                ..Default::default()
            }
        );
        // Its dataplane mode: the namespace and its 50 pods, not b's.
        let b = namespace("b", &[(DATAPLANE_MODE, "ambient")]);
        let got = step(&mut m, &mut |m| {
            m.apply_namespaces(Change::Upsert(NamespaceRecord::from_k8s(&b).unwrap()))
        });
        assert_eq!(
            got,
            Retranslated {
                namespaces: 1,
                pods: 50,
                ..Default::default()
            }
        );
        input.namespaces = arcs(vec![a, b]);
        // A gateway becoming a waypoint: it and the 2 pods labelled with it.
        let wp = gateway("a", "wp", WAYPOINT_CLASS);
        let got = step(&mut m, &mut |m| {
            m.apply_gateways(Change::Upsert(GatewayRecord::from_k8s(&wp).unwrap()))
        });
        assert_eq!(
            got,
            Retranslated {
                gateways: 1,
                pods: 2,
                ..Default::default()
            }
        );
        input.gateways = arcs(vec![wp]);
        // A pod deleted: nothing to translate.
        let gone = input.pods.remove(60);
        assert_eq!(
            step(&mut m, &mut |m| m.apply_pods(Change::Delete(pod_record(&gone)))),
            pods(0)
        );
        // And the result is the one a translation from scratch gives.
        assert_eq!(
            normalized(m.translate(None)),
            normalized(Model::from_inputs(&input).translate(None))
        );
        let t = m.translate(None).model;
        assert_eq!(t.pods.len(), 99);
        assert_eq!(t.services[0].endpoints, Some(ips(&["10.0.0.0", "10.0.0.2"]).into()));
        assert_eq!(
            t.services[0].ports,
            [ServicePort {
                port: 80,
                target_port: 8081,
                name: Some("http".into()),
                app_protocol: None,
            }]
        );
        assert!(t
            .pods
            .iter()
            .filter(|p| &*p.namespace == "b")
            .all(|p| p.tunnel == TunnelProtocol::Hbone));
        let wp_pod = t.pods.iter().find(|p| p.key() == "a/p0").unwrap();
        assert_eq!((wp_pod.tunnel, wp_pod.netns.as_ref()), (TunnelProtocol::Hbone, None));
    }

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
    }

    /// The objects of the random test, by kind and key.
    #[derive(Default)]
    struct World {
        namespaces: BTreeMap<String, Namespace>,
        pods: BTreeMap<String, Pod>,
        services: BTreeMap<String, Service>,
        slices: BTreeMap<String, EndpointSlice>,
        gateways: BTreeMap<String, crd::Gateway>,
    }

    impl World {
        fn inputs(&self) -> Inputs {
            let all = |m: &BTreeMap<String, _>| arcs(m.values().cloned().collect());
            Inputs {
                namespaces: all(&self.namespaces),
                pods: arcs(self.pods.values().cloned().collect()),
                services: arcs(self.services.values().cloned().collect()),
                slices: arcs(self.slices.values().cloned().collect()),
                gateways: arcs(self.gateways.values().cloned().collect()),
                ..Default::default()
            }
        }
    }

    const NSS: [&str; 2] = ["a", "b"];

    fn random_namespace(r: &mut Rng) -> Namespace {
        let ns = r.pick(&NSS);
        let mode = r.pick(&["", "ambient", "none"]);
        let wp = r.pick(&["", "g0", "none"]);
        let labels: Vec<(&str, &str)> = [
            (DATAPLANE_MODE, mode),
            (USE_WAYPOINT, wp),
            ("team", r.pick(&["t1", "t2"])),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        namespace(ns, &labels)
    }

    fn random_pod(r: &mut Rng) -> Pod {
        let (n, i) = (r.below(2), r.below(8));
        let node = r.pick(&[NODE, "node2"]);
        let ip = format!("10.{n}.0.{i}"); // one per key: no two pods claim an IP
        let mut p = pod(NSS[n], &format!("p{i}"), node, &[&ip]);
        let mut labels = vec![("app", r.pick(&["x", "y"]))];
        let mode = r.pick(&["", "", "ambient", "none"]);
        if !mode.is_empty() {
            labels.push((DATAPLANE_MODE, mode));
        }
        if r.below(3) == 0 {
            labels.push((GATEWAY_NAME_LABEL, r.pick(&["g0", "g1"])));
        }
        p = labelled(p, &labels);
        let st = p.status.as_mut().unwrap();
        st.phase = Some(r.pick(&["Running", "Running", "Pending", "Succeeded"]).into());
        st.conditions = Some(vec![cond("Ready", r.pick(&["True", "False"]))]);
        if r.below(5) == 0 {
            st.pod_ips = None;
            st.pod_ip = None;
        }
        p.spec.as_mut().unwrap().host_network = Some(r.below(10) == 0);
        p
    }

    fn random_service(r: &mut Rng) -> Service {
        let (n, i) = (r.below(2), r.below(3));
        let target = match r.below(3) {
            0 => None,
            1 => Some(IntOrString::Int(9000)),
            _ => Some(IntOrString::String("web".into())),
        };
        let vip = if r.below(6) == 0 {
            "None".to_string()
        } else {
            format!("10.96.{n}.{i}")
        };
        let mut s = service(
            NSS[n],
            &format!("s{i}"),
            &vip,
            vec![port(Some(r.pick(&["http", "grpc"])), 80, target)],
        );
        if r.below(4) == 0 {
            s.spec.as_mut().unwrap().selector = None;
        }
        if r.below(3) == 0 {
            s = labelled(s, &[(USE_WAYPOINT, r.pick(&["g0", "g1"]))]);
        }
        s
    }

    fn random_slice(r: &mut Rng) -> EndpointSlice {
        let (n, i) = (r.below(2), r.below(4));
        let svc = format!("s{}", r.below(3));
        let ready = [Some(true), Some(false), None][r.below(3)];
        let ep = format!("10.{n}.1.{}", r.below(4));
        let mut s = slice(
            NSS[n],
            &svc,
            &[(r.pick(&["http", "grpc"]), 8000 + r.below(3) as i32)],
            &[(&ep, ready)],
        );
        s.metadata.name = Some(format!("e{i}"));
        s
    }

    fn random_gateway(r: &mut Rng) -> crd::Gateway {
        let mut g = gateway(
            r.pick(&NSS),
            r.pick(&["g0", "g1"]),
            r.pick(&[WAYPOINT_CLASS, WAYPOINT_CLASS, "istio"]),
        );
        if r.below(2) == 0 {
            g = annotated(g, FOR_SERVICE_ACCOUNT, r.pick(&["sa-p1", "Bad_Name"]));
        }
        if r.below(2) == 0 {
            g.metadata.labels = Some(map(&[(WAYPOINT_FOR, r.pick(&["workload", "all", "everything"]))]));
        }
        g
    }

    fn key_of<T: Resource>(o: &T) -> String {
        format!(
            "{}/{}",
            o.meta().namespace.as_deref().unwrap_or(""),
            o.meta().name.as_deref().unwrap_or("")
        )
    }

    /// Upsert (2 in 3), delete, or re-list one kind of `world`; the same
    /// change applied to `m`.
    fn random_step<T: Resource + Clone>(
        r: &mut Rng,
        world: &mut BTreeMap<String, T>,
        new: fn(&mut Rng) -> T,
        apply: &mut dyn FnMut(Change<&T>),
    ) {
        match r.below(6) {
            0..=3 => {
                let o = new(r);
                world.insert(key_of(&o), o.clone());
                apply(Change::Upsert(&o));
            }
            4 => {
                let Some(k) = world.keys().nth(r.below(world.len().max(1))).cloned() else {
                    return;
                };
                let o = world.remove(&k).unwrap();
                apply(Change::Delete(&o));
            }
            _ => {
                // A re-list after missed events: some gone, one changed.
                if let Some(k) = world.keys().next().cloned() {
                    world.remove(&k);
                }
                let o = new(r);
                world.insert(key_of(&o), o);
                let list: Vec<&T> = world.values().collect();
                apply(Change::Relisted(list));
            }
        }
    }

    fn map_change<T, R>(c: Change<&T>, f: fn(&T) -> Option<R>) -> Change<R> {
        match c {
            Change::Upsert(o) => Change::Upsert(f(o).unwrap()),
            Change::Delete(o) => Change::Delete(f(o).unwrap()),
            Change::Relisted(l) => Change::Relisted(l.into_iter().filter_map(f).collect()),
        }
    }

    #[test]
    fn a_model_kept_change_by_change_equals_a_translation_from_scratch() {
        for seed in 1..=25u64 {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (mut world, mut m) = (World::default(), Model::default());
            for step in 0..150 {
                match r.below(5) {
                    0 => random_step(&mut r, &mut world.namespaces, random_namespace, &mut |c| {
                        m.apply_namespaces(map_change(c, NamespaceRecord::from_k8s))
                    }),
                    1 => random_step(&mut r, &mut world.pods, random_pod, &mut |c| {
                        m.apply_pods(map_change(c, PodRecord::from_k8s))
                    }),
                    2 => random_step(&mut r, &mut world.services, random_service, &mut |c| {
                        m.apply_services(map_change(c, ServiceRecord::from_k8s))
                    }),
                    3 => random_step(&mut r, &mut world.slices, random_slice, &mut |c| {
                        m.apply_slices(map_change(c, SliceRecord::from_k8s))
                    }),
                    _ => random_step(&mut r, &mut world.gateways, random_gateway, &mut |c| {
                        m.apply_gateways(map_change(c, GatewayRecord::from_k8s))
                    }),
                }
                let scratch = Model::from_inputs(&world.inputs()).translate(None);
                assert_eq!(
                    normalized(m.translate(None)),
                    normalized(scratch),
                    "seed {seed}, step {step}"
                );
            }
        }
    }
}
