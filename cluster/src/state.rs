//! The model the data path consults: which IPs belong to mesh pods, their
//! identities and labels, the authorization policies and the waypoint
//! bindings. Rebuilt from the configuration on every change; readers take a
//! cheap snapshot.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
};

use mesh::identity::SpiffeId;

use crate::{
    config::{LoadBalancing, LocalConfig, ServiceSpec},
    rbac::{self, AuthorizationPolicy, PeerAuthentication},
    waypoint::{Binding, BindingStatus, Bindings, WaypointKey, ENFORCEMENT_LABEL},
};

/// A mesh workload as the data path needs it: one per mesh pod of the
/// cluster (see [`Workloads`]), cloned per connection, so its fields are
/// shared (48 bytes; a map of the owned strings took 390 bytes per pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `namespace/name`.
    pub key: Arc<str>,
    /// Shared by the pods of one service account.
    pub identity: Arc<SpiffeId>,
    pub labels: crate::config::Labels,
    /// Reached over HBONE (else plain TCP).
    pub hbone: bool,
    /// Its binding as a workload (pod-addressed traffic), if any.
    pub waypoint: Option<Arc<Binding>>,
    /// Bound as a workload: accepts only its waypoint's identity (unless
    /// the pod opts out with `ambient-mesh.io/waypoint-enforcement: off`).
    pub enforce_waypoint: bool,
}

/// A service and the pods that back it.
pub struct Service {
    /// Without its endpoints and selector (`endpoints` is `None` here even
    /// for a Service with listed endpoints): they are read once, into
    /// [`Self::endpoints`].
    pub spec: Arc<ServiceSpec>,
    /// Healthy endpoints' addresses (each pod once per family).
    pub endpoints: Arc<[IpAddr]>,
    /// Its binding (VIP traffic), if any.
    pub waypoint: Option<Binding>,
    next: AtomicUsize,
}

/// Where a connection to a service VIP goes.
pub struct Resolved {
    pub endpoint: SocketAddr,
    /// Identities the endpoint may present besides its own.
    pub extra_sans: Vec<SpiffeId>,
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    /// Counts the connection for least-connections until dropped.
    pub _active: ActiveGuard,
}

/// The workloads by IP. Each is stored once, however many IPs its pod has
/// (two in a dual-stack cluster), and the map holds an index. A map of the
/// 48-byte workloads themselves, its buckets rounded up to a power of two,
/// takes 239 bytes per dual-stack pod at 10,000 pods (120 single-stack);
/// this takes 130 (89), by the same arithmetic. `bench-kube` (single-stack)
/// cannot tell 31 bytes per pod from its noise.
#[derive(Debug, Default)]
pub struct Workloads {
    by_ip: HashMap<IpAddr, u32>,
    list: Vec<Workload>,
}

impl Workloads {
    pub fn get(&self, ip: &IpAddr) -> Option<&Workload> {
        self.by_ip.get(ip).map(|&i| &self.list[i as usize])
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.by_ip.contains_key(ip)
    }

    /// Every (IP, workload), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Workload)> {
        self.by_ip.iter().map(|(ip, &i)| (ip, &self.list[i as usize]))
    }

    /// How many IPs.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

impl<'a> FromIterator<(Workload, &'a [IpAddr])> for Workloads {
    /// A workload listed with no IP is dropped.
    fn from_iter<I: IntoIterator<Item = (Workload, &'a [IpAddr])>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut list = Vec::with_capacity(iter.size_hint().0);
        let mut by_ip = HashMap::new();
        for (w, ips) in iter {
            if ips.is_empty() {
                continue;
            }
            // Bounded by the pods a LocalConfig can list, far below 2^32.
            let i = u32::try_from(list.len()).expect("fewer than 2^32 workloads");
            list.push(w);
            by_ip.extend(ips.iter().map(|ip| (*ip, i)));
        }
        list.shrink_to_fit();
        Self { by_ip, list }
    }
}

/// The same workload at every IP, whatever the order they were listed in.
impl PartialEq for Workloads {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(ip, w)| other.get(ip) == Some(w))
    }
}

impl Eq for Workloads {}

impl std::ops::Index<&IpAddr> for Workloads {
    type Output = Workload;
    fn index(&self, ip: &IpAddr) -> &Workload {
        self.get(ip).expect("no workload at this IP")
    }
}

/// One consistent view of workloads, services and policies.
#[derive(Default)]
pub struct Snapshot {
    pub workloads: Workloads,
    pub services: Vec<Service>,
    pub vips: HashMap<IpAddr, usize>,
    /// Services by hostname (`name.namespace.svc.cluster.local`).
    pub hosts: HashMap<String, usize>,
    pub policies: Vec<AuthorizationPolicy>,
    pub peer_auths: Vec<PeerAuthentication>,
    /// Waypoints and every binding (with its status).
    pub bindings: Bindings,
    /// Round-robin cursors over each waypoint's pods.
    cursors: HashMap<WaypointKey, AtomicUsize>,
}

/// A connection a waypoint must carry: tunnel to `pod` (its HBONE port),
/// CONNECT to `authority`, expect `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub waypoint: WaypointKey,
    pub identity: SpiffeId,
    pub pod: SocketAddr,
    /// The original destination: VIP:port or pod IP:port.
    pub authority: SocketAddr,
}

/// A bound destination whose waypoint cannot take traffic: the connection
/// is refused, never sent direct.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{target} is bound to waypoint {waypoint}, which is unavailable ({status}); refused, not sent direct", status = status.as_str())]
pub struct Unavailable {
    pub target: String,
    pub waypoint: WaypointKey,
    pub status: BindingStatus,
}

/// A connection that did not come through the destination's waypoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bypassed waypoint: {target} is bound to waypoint {waypoint} and accepts only {expected}, not {peer}")]
pub struct Bypass {
    pub target: String,
    pub waypoint: WaypointKey,
    /// The waypoint's identity (`unknown` when the waypoint is missing).
    pub expected: String,
    /// The peer's identity, or `plaintext`.
    pub peer: String,
}

impl Snapshot {
    /// Whether a connection to `dst` must go through a waypoint: a bound
    /// Service's VIP, or a pod bound as a workload. `None`: not bound.
    pub fn steer(&self, dst: SocketAddr) -> Option<Result<Via, Unavailable>> {
        let ip = dst.ip().to_canonical();
        let binding = match self.vips.get(&ip) {
            Some(i) => self.services[*i].waypoint.as_ref(),
            None => self.workloads.get(&ip).and_then(|w| w.waypoint.as_deref()),
        }
        .filter(|b| b.status.steers())?;
        let unavailable = |status| Unavailable {
            target: format!("{} {}", binding.kind.as_str(), binding.target),
            waypoint: binding.waypoint.clone(),
            status,
        };
        let Some(w) = self.bindings.waypoints.get(&binding.waypoint) else {
            return Some(Err(unavailable(BindingStatus::WaypointMissing)));
        };
        // Same family as the destination when the waypoint has one.
        let family = |p: &&IpAddr| p.is_ipv4() == ip.is_ipv4();
        let same = w.pods.iter().filter(family).count();
        let n = self
            .cursors
            .get(&w.key)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        let pod = match same {
            0 => w.pods.get(n % w.pods.len().max(1)),
            _ => w.pods.iter().filter(family).nth(n % same),
        };
        let Some(pod) = pod else {
            return Some(Err(unavailable(BindingStatus::NoReadyPod)));
        };
        Some(Ok(Via {
            waypoint: w.key.clone(),
            identity: w.identity.clone(),
            pod: SocketAddr::new(*pod, mesh::hbone::HBONE_PORT),
            authority: SocketAddr::new(ip, dst.port()),
        }))
    }

    /// The Service whose VIP `ip` is (as [`Service::spec`]: its endpoints
    /// are [`Service::endpoints`], its selector is not kept).
    pub fn service_at(&self, ip: IpAddr) -> Option<&Arc<ServiceSpec>> {
        self.vips.get(&ip.to_canonical()).map(|i| &self.services[*i].spec)
    }

    /// Whether the workload at `dst_ip` accepts a connection from `peer`
    /// (`None`: plaintext): one bound as a workload only from its
    /// waypoint's identity, unless it opted out.
    pub fn check_waypoint(&self, dst_ip: IpAddr, peer: Option<&SpiffeId>) -> Result<(), Bypass> {
        let Some(w) = self.workloads.get(&dst_ip.to_canonical()) else {
            return Ok(());
        };
        let Some(b) = w.waypoint.as_ref().filter(|b| w.enforce_waypoint && b.status.steers()) else {
            return Ok(());
        };
        let expected = self.bindings.waypoints.get(&b.waypoint).map(|wp| &wp.identity);
        if expected.is_some() && expected == peer {
            return Ok(());
        }
        Err(Bypass {
            target: w.key.to_string(),
            waypoint: b.waypoint.clone(),
            expected: expected.map_or_else(|| "unknown".into(), ToString::to_string),
            peer: peer.map_or_else(|| "plaintext".into(), ToString::to_string),
        })
    }
    /// Whether `conn` may reach the workload at `dst_ip`: PeerAuthentication
    /// first (STRICT needs an identity), then authorization policies.
    pub fn authorize(&self, dst_ip: IpAddr, conn: &rbac::Conn) -> Result<(), rbac::Denied> {
        let Some(w) = self.workloads.get(&dst_ip.to_canonical()) else {
            return Err(rbac::Denied(format!("{dst_ip} is not a known workload")));
        };
        let target = rbac::Target {
            namespace: &w.identity.namespace,
            labels: &w.labels,
        };
        if conn.principal.is_none() && rbac::mtls_mode(&self.peer_auths, &target) == rbac::MtlsMode::Strict {
            return Err(rbac::Denied(
                "STRICT mTLS: plaintext connections are not accepted".into(),
            ));
        }
        rbac::authorize(&self.policies, &target, conn)
    }
}

/// Whether `kept` (a snapshot's copy: no endpoints, no selector) is `spec`
/// apart from those two.
fn same_service(kept: &ServiceSpec, spec: &ServiceSpec) -> bool {
    // Every field named: a new one must be decided on here.
    let ServiceSpec {
        name,
        namespace,
        hostname,
        vips,
        ports,
        selector: _,
        endpoints: _,
        load_balancing,
        subject_alt_names,
        labels,
    } = spec;
    (&kept.name, &kept.namespace, &kept.hostname, &kept.vips, &kept.ports) == (name, namespace, hostname, vips, ports)
        && (&kept.load_balancing, &kept.subject_alt_names, &kept.labels) == (load_balancing, subject_alt_names, labels)
}

/// Active connections per endpoint (for least-connections).
#[derive(Clone, Default)]
pub struct Active(Arc<Mutex<HashMap<IpAddr, usize>>>);

pub struct ActiveGuard(Active, IpAddr);

impl Active {
    fn count(&self, ip: IpAddr) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
    fn track(&self, ip: IpAddr) -> ActiveGuard {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(ip).or_default() += 1;
        ActiveGuard(self.clone(), ip)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Snapshot {
    /// Picks an endpoint for a connection to a service VIP (port mapped to
    /// the target port), or `None` when `dst` is no VIP. A VIP without a
    /// healthy endpoint yields `Some(Err)`.
    pub fn resolve(&self, dst: SocketAddr, active: &Active) -> Option<Result<Resolved, String>> {
        let i = *self.vips.get(&dst.ip().to_canonical())?;
        let want = Pick {
            port: Some(dst.port()),
            v4: dst.ip().to_canonical().is_ipv4(),
            ..Pick::default()
        };
        Some(self.pick_in(i, &want, active).map_err(|e| e.to_string()))
    }

    /// Picks an endpoint of the Service named `host` (a route's backend).
    pub fn pick(&self, host: &str, want: &Pick, active: &Active) -> Result<Resolved, PickError> {
        let i = *self
            .hosts
            .get(host)
            .ok_or_else(|| PickError::NoService(host.to_string()))?;
        self.pick_in(i, want, active)
    }

    fn pick_in(&self, i: usize, want: &Pick, active: &Active) -> Result<Resolved, PickError> {
        let svc = &self.services[i];
        let name = format!("{}/{}", svc.spec.namespace, svc.spec.name);
        let port = match want.port {
            Some(p) => svc.spec.ports.iter().find(|x| x.port == p),
            None => svc
                .spec
                .ports
                .iter()
                .find(|x| Some(x.port) == want.fallback_port)
                .or(svc.spec.ports.first().filter(|_| svc.spec.ports.len() == 1)),
        }
        .ok_or_else(|| PickError::NoPort {
            service: name.clone(),
            port: want.port.or(want.fallback_port).unwrap_or(0),
        })?;
        let labels_ok = |ip: &IpAddr| {
            want.labels
                .as_ref()
                .is_none_or(|l| self.workloads.get(ip).is_some_and(|w| w.labels.has_all(l)))
        };
        let family: Vec<IpAddr> = svc
            .endpoints
            .iter()
            .copied()
            .filter(|e| e.is_ipv4() == want.v4 && labels_ok(e))
            .collect();
        if family.is_empty() {
            return Err(PickError::NoEndpoint(name));
        }
        // An endpoint not tried yet; when every one was, another than the
        // last one tried.
        let mut candidates: Vec<IpAddr> = family.iter().copied().filter(|e| !want.exclude.contains(e)).collect();
        if candidates.is_empty() {
            candidates = family
                .iter()
                .copied()
                .filter(|e| Some(e) != want.exclude.last())
                .collect();
        }
        if candidates.is_empty() {
            candidates = family;
        }
        let ip = match svc.spec.load_balancing {
            LoadBalancing::RoundRobin => candidates[svc.next.fetch_add(1, Ordering::Relaxed) % candidates.len()],
            LoadBalancing::Random => candidates[rand::random_range(0..candidates.len())],
            LoadBalancing::LeastConnections => *candidates
                .iter()
                .min_by_key(|ip| active.count(**ip))
                .expect("not empty"),
        };
        Ok(Resolved {
            endpoint: SocketAddr::new(ip, port.target_port),
            extra_sans: svc
                .spec
                .subject_alt_names
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            hostname: svc.spec.hostname(),
            name: svc.spec.name.clone(),
            namespace: svc.spec.namespace.clone(),
            _active: active.track(ip),
        })
    }
}

/// What [`Snapshot::pick`] should pick.
#[derive(Debug, Clone, Default)]
pub struct Pick {
    /// The Service port; `None`: `fallback_port` if the Service has it,
    /// else its only port.
    pub port: Option<u16>,
    pub fallback_port: Option<u16>,
    /// Only endpoints whose pods carry these labels (a subset).
    pub labels: Option<BTreeMap<String, String>>,
    /// Endpoints already tried (avoided while others exist).
    pub exclude: Vec<IpAddr>,
    pub v4: bool,
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no service {0}")]
    NoService(String),
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {0} has no healthy endpoint")]
    NoEndpoint(String),
}

#[derive(Clone, Default)]
pub struct State(Arc<RwLock<Arc<Snapshot>>>, Active);

impl State {
    /// Every pod in the configuration is in the mesh (HBONE), on any node.
    pub fn update(&self, cfg: &LocalConfig, trust_domain: &str) {
        let bindings = Bindings::compute(cfg, trust_domain);
        // What did not change is shared with the previous snapshot: a
        // translation (one per batch of changes) allocates nothing per pod
        // that stayed as it was, so it neither churns nor scatters the heap.
        let old = self.snapshot();
        let mut identities: HashMap<(&str, &str), Arc<SpiffeId>> = HashMap::new();
        // One copy of the trust domain for every identity (the last
        // snapshot's while it names the same one).
        let td: Arc<str> = match old.workloads.iter().next() {
            Some((_, w)) if *w.identity.trust_domain == *trust_domain => w.identity.trust_domain.clone(),
            _ => trust_domain.into(),
        };
        let mut key = String::new();
        let workloads: Workloads = cfg
            .pods
            .iter()
            .map(|p| {
                p.key_into(&mut key);
                let was = p.ips.first().and_then(|ip| old.workloads.get(ip));
                let identity = identities
                    .entry((&p.namespace, &p.service_account))
                    .or_insert_with(|| match was.map(|w| &w.identity) {
                        Some(id)
                            if (&*id.trust_domain, &*id.namespace, &*id.service_account)
                                == (trust_domain, &*p.namespace, &*p.service_account) =>
                        {
                            id.clone()
                        }
                        _ => Arc::new(SpiffeId::shared(&td, &p.namespace, &p.service_account)),
                    })
                    .clone();
                let waypoint = match (bindings.workloads.get(&key), was.and_then(|w| w.waypoint.as_ref())) {
                    (Some(b), Some(kept)) if **kept == *b => Some(kept.clone()),
                    (b, _) => b.cloned().map(Arc::new),
                };
                let w = Workload {
                    waypoint,
                    key: match was {
                        Some(w) if *w.key == key => w.key.clone(),
                        _ => key.as_str().into(),
                    },
                    identity,
                    labels: p.labels.clone(),
                    hbone: p.tunnel == crate::config::TunnelProtocol::Hbone,
                    enforce_waypoint: p.labels.get(ENFORCEMENT_LABEL).map(String::as_str) != Some("off"),
                };
                (w, &p.ips[..])
            })
            .collect();
        let kept: HashMap<(&str, &str), &Service> = old
            .services
            .iter()
            .map(|o| ((&*o.spec.namespace, &*o.spec.name), o))
            .collect();
        // The healthy pods by namespace, for the Services whose selector
        // picks their endpoints; built at the first such Service (those from
        // Kubernetes list their endpoints). Scanning every pod per Service
        // cost Services x pods per batch.
        let by_namespace = std::cell::OnceCell::new();
        let healthy_in = |ns: &str| -> &[&crate::config::PodSpec] {
            by_namespace
                .get_or_init(|| {
                    let mut m: HashMap<&str, Vec<&crate::config::PodSpec>> = HashMap::new();
                    for p in cfg.pods.iter().filter(|p| p.healthy) {
                        m.entry(&p.namespace).or_default().push(p);
                    }
                    m
                })
                .get(ns)
                .map_or(&[], Vec::as_slice)
        };
        let services: Vec<Service> = cfg
            .services
            .iter()
            .map(|spec| {
                let picked = || -> Vec<IpAddr> {
                    healthy_in(&spec.namespace)
                        .iter()
                        .filter(|p| p.labels.has_all(&*spec.selector))
                        .flat_map(|p| p.ips.iter().copied())
                        .collect()
                };
                // The same Service as before: its copies are kept.
                let was = kept.get(&(&*spec.namespace, &*spec.name));
                Service {
                    spec: match was {
                        Some(o) if same_service(&o.spec, spec) => o.spec.clone(),
                        _ => Arc::new(ServiceSpec {
                            endpoints: None,
                            selector: Default::default(),
                            ..spec.clone()
                        }),
                    },
                    // Listed (the model's, shared), else picked by the
                    // selector (the last copy while it picks the same).
                    endpoints: match &spec.endpoints {
                        Some(listed) => listed.clone(),
                        None => {
                            let picked = picked();
                            match was {
                                Some(o) if *o.endpoints == *picked => o.endpoints.clone(),
                                _ => picked.into(),
                            }
                        }
                    },
                    waypoint: bindings
                        .services
                        .get(&format!("{}/{}", spec.namespace, spec.name))
                        .cloned(),
                    next: AtomicUsize::new(0),
                }
            })
            .collect();
        let vips = services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.spec.vips.iter().map(move |v| (*v, i)))
            .collect();
        let hosts = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.hostname(), i))
            .collect();
        let snap = Snapshot {
            workloads,
            services,
            vips,
            hosts,
            policies: cfg.authorization_policies.clone(),
            peer_auths: cfg.peer_authentications.clone(),
            cursors: bindings
                .waypoints
                .keys()
                .map(|k| (k.clone(), AtomicUsize::new(0)))
                .collect(),
            bindings,
        };
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Workload> {
        self.snapshot().workloads.get(&ip.to_canonical()).cloned()
    }

    /// See [`Snapshot::resolve`].
    pub fn resolve(&self, dst: SocketAddr) -> Option<Result<Resolved, String>> {
        self.snapshot().resolve(dst, &self.1)
    }

    /// See [`Snapshot::pick`].
    pub fn pick(&self, host: &str, want: &Pick) -> Result<Resolved, PickError> {
        self.snapshot().pick(host, want, &self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.0.1\", \"fd00::1\"], labels: {app: a}}\npeerAuthentications:\n  - {name: s, namespace: ns1, mode: STRICT}\n";

    #[test]
    fn indexes_every_ip_of_every_pod() {
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), CFG).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let id = SpiffeId::new("td", "ns1", "sa1");
        assert_eq!(*s.by_ip("10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(*s.by_ip("::ffff:10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(&*s.by_ip("fd00::1".parse().unwrap()).unwrap().key, "ns1/a");
        assert!(s.by_ip("10.0.0.2".parse().unwrap()).is_none());
    }

    #[test]
    fn workloads_of_one_service_account_share_its_identity() {
        let text = "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, ips: [\"10.0.0.1\", \"fd00::1\"]}\n  - {name: b, namespace: ns1, serviceAccount: sa1, node: n2, ips: [\"10.0.0.2\"]}\n  - {name: c, namespace: ns2, serviceAccount: sa1, node: n2, ips: [\"10.0.0.3\"]}\n";
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), text).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let id = |ip: &str| s.by_ip(ip.parse().unwrap()).unwrap().identity;
        assert!(Arc::ptr_eq(&id("10.0.0.1"), &id("10.0.0.2")));
        assert!(Arc::ptr_eq(&id("10.0.0.1"), &id("fd00::1")));
        assert!(!Arc::ptr_eq(&id("10.0.0.1"), &id("10.0.0.3")));
        assert_eq!(*id("10.0.0.3"), SpiffeId::new("td", "ns2", "sa1"));
        // One per mesh pod of the cluster, cloned per connection: its
        // fields stay shared.
        assert!(std::mem::size_of::<Workload>() <= 48);
    }

    #[test]
    fn identities_hold_no_copy_of_the_specs_strings() {
        let text = "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, ips: [\"10.0.0.1\"]}\n  - {name: c, namespace: ns2, serviceAccount: sa2, node: n2, ips: [\"10.0.0.3\"]}\n";
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), text).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let id = |ip: &str| s.by_ip(ip.parse().unwrap()).unwrap().identity;
        let (a, c) = (id("10.0.0.1"), id("10.0.0.3"));
        // The namespace and service account are the spec's own strings
        // (the Kubernetes model's records lend them to the spec) ...
        assert!(Arc::ptr_eq(&a.namespace, &cfg.pods[0].namespace));
        assert!(Arc::ptr_eq(&a.service_account, &cfg.pods[0].service_account));
        // ... and every identity shares one trust domain, kept across updates.
        assert!(Arc::ptr_eq(&a.trust_domain, &c.trust_domain));
        s.update(&LocalConfig::parse(std::path::Path::new("m.yaml"), text).unwrap(), "td");
        assert!(Arc::ptr_eq(&id("10.0.0.3").trust_domain, &a.trust_domain));
        s.update(&cfg, "other.td");
        assert_eq!(id("10.0.0.1").to_string(), "spiffe://other.td/ns/ns1/sa/sa1");
    }

    #[test]
    fn a_pod_with_two_ips_is_one_workload_found_by_either() {
        let text = "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, ips: [\"10.0.0.1\", \"fd00::1\"]}\n  - {name: b, namespace: ns1, serviceAccount: sa1, node: n2, ips: [\"10.0.0.2\"]}\n";
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), text).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let snap = s.snapshot();
        let w = |ip: &str| snap.workloads.get(&ip.parse().unwrap()).unwrap();
        assert!(std::ptr::eq(w("10.0.0.1"), w("fd00::1")), "stored twice");
        assert_eq!(&*w("10.0.0.2").key, "ns1/b");
        assert_eq!(snap.workloads.len(), 3, "one entry per IP");
        assert_eq!(snap.workloads.list.len(), 2, "one workload per pod");
        let mut listed: Vec<(String, &str)> = snap.workloads.iter().map(|(ip, w)| (ip.to_string(), &*w.key)).collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("10.0.0.1".into(), "ns1/a"),
                ("10.0.0.2".into(), "ns1/b"),
                ("fd00::1".into(), "ns1/a")
            ]
        );
        assert!(snap.workloads.get(&"10.0.0.9".parse().unwrap()).is_none());
        // Equal whatever the order the pods were listed in; not with a
        // workload changed.
        let reordered = "pods:\n  - {name: b, namespace: ns1, serviceAccount: sa1, node: n2, ips: [\"10.0.0.2\"]}\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, ips: [\"10.0.0.1\", \"fd00::1\"]}\n";
        let other = State::default();
        other.update(
            &LocalConfig::parse(std::path::Path::new("m.yaml"), reordered).unwrap(),
            "td",
        );
        assert!(other.snapshot().workloads == snap.workloads);
        other.update(
            &LocalConfig::parse(std::path::Path::new("m.yaml"), &reordered.replace("sa1", "sa2")).unwrap(),
            "td",
        );
        assert!(other.snapshot().workloads != snap.workloads);
    }

    #[test]
    fn an_update_keeps_the_copies_of_what_did_not_change() {
        let s = with_service("ROUND_ROBIN");
        let before = s.snapshot();
        let text = "pods:\n  - {name: a, namespace: ns1, node: n1, ips: [\"10.0.0.1\", \"fd00::1\"], labels: {app: web}}\n  - {name: b, namespace: ns1, serviceAccount: other, node: n2, ips: [\"10.0.0.2\"], labels: {app: web}}\nservices:\n  - {name: web, namespace: ns1, vips: [\"10.96.0.1\", \"fd96::1\"], ports: [{port: 80, targetPort: 8080}], selector: {app: web}, loadBalancing: ROUND_ROBIN}\n";
        s.update(&LocalConfig::parse(std::path::Path::new("m.yaml"), text).unwrap(), "td");
        let after = s.snapshot();
        let w = |snap: &Snapshot, ip: &str| snap.workloads[&ip.parse::<IpAddr>().unwrap()].clone();
        let (a0, a1) = (w(&before, "10.0.0.1"), w(&after, "10.0.0.1"));
        assert!(Arc::ptr_eq(&a0.key, &a1.key) && Arc::ptr_eq(&a0.identity, &a1.identity));
        // b changed its service account: a new identity, the same key.
        let (b0, b1) = (w(&before, "10.0.0.2"), w(&after, "10.0.0.2"));
        assert!(Arc::ptr_eq(&b0.key, &b1.key) && !Arc::ptr_eq(&b0.identity, &b1.identity));
        assert_eq!(&*b1.identity.service_account, "other");
        // The Service is the same, and so are the endpoints its selector
        // picks (c is unhealthy, d in another namespace): both kept.
        assert!(Arc::ptr_eq(&before.services[0].spec, &after.services[0].spec));
        assert!(Arc::ptr_eq(&before.services[0].endpoints, &after.services[0].endpoints));
        assert_eq!(
            *after.services[0].endpoints,
            ["10.0.0.1", "fd00::1", "10.0.0.2"].map(|ip| ip.parse::<IpAddr>().unwrap())
        );
        // Another port: a new copy.
        s.update(
            &LocalConfig::parse(std::path::Path::new("m.yaml"), &text.replace("8080", "9090")).unwrap(),
            "td",
        );
        let again = s.snapshot();
        assert!(!Arc::ptr_eq(&after.services[0].spec, &again.services[0].spec));
        assert_eq!(again.services[0].spec.ports[0].target_port, 9090);
        assert!(Arc::ptr_eq(&after.services[0].endpoints, &again.services[0].endpoints));
    }

    fn with_service(lb: &str) -> State {
        let text = format!(
            "pods:\n  - {{name: a, namespace: ns1, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.0.1\", \"fd00::1\"], labels: {{app: web}}}}\n  - {{name: b, namespace: ns1, node: n2, netns: /x, cgroup: /y, ips: [\"10.0.0.2\"], labels: {{app: web}}}}\n  - {{name: c, namespace: ns1, node: n2, netns: /x, cgroup: /y, ips: [\"10.0.0.3\"], labels: {{app: web}}, healthy: false}}\n  - {{name: d, namespace: ns2, node: n2, netns: /x, cgroup: /y, ips: [\"10.0.0.4\"], labels: {{app: web}}}}\nservices:\n  - {{name: web, namespace: ns1, vips: [\"10.96.0.1\", \"fd96::1\"], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web}}, loadBalancing: {lb}}}\n"
        );
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), &text).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        s
    }

    #[test]
    fn round_robin_over_healthy_endpoints_of_the_namespace_with_port_mapping() {
        let s = with_service("ROUND_ROBIN");
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| s.resolve("10.96.0.1:80".parse().unwrap()).unwrap().unwrap().endpoint)
            .collect();
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(
            picks,
            vec![a, b, a, b],
            "unhealthy c and other-namespace d are no endpoints"
        );
        let v6 = s.resolve("[fd96::1]:80".parse().unwrap()).unwrap().unwrap();
        assert_eq!(v6.endpoint, "[fd00::1]:8080".parse().unwrap(), "same family as the VIP");
        assert_eq!(v6.hostname, "web.ns1.svc.cluster.local");
        assert!(v6.extra_sans.is_empty());
        assert!(
            s.resolve("10.96.0.1:81".parse().unwrap()).unwrap().is_err(),
            "no such port"
        );
        assert!(s.resolve("10.0.0.1:80".parse().unwrap()).is_none(), "not a VIP");
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint() {
        let s = with_service("LEAST_CONNECTIONS");
        let first = s.resolve("10.96.0.1:80".parse().unwrap()).unwrap().unwrap();
        for _ in 0..3 {
            let next = s.resolve("10.96.0.1:80".parse().unwrap()).unwrap().unwrap();
            assert_ne!(
                next.endpoint, first.endpoint,
                "the busy endpoint is avoided while its connection is open"
            );
        }
        drop(first);
    }

    #[test]
    fn random_spreads_over_every_healthy_endpoint_and_nothing_else() {
        let s = with_service("RANDOM");
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        const PICKS: usize = 400;
        for _ in 0..PICKS {
            let r = s.resolve("10.96.0.1:80".parse().unwrap()).unwrap().unwrap();
            *seen.entry(r.endpoint).or_default() += 1;
        }
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(
            seen.keys().copied().collect::<std::collections::BTreeSet<_>>(),
            [a, b].into()
        );
        // Fair coin, 400 flips: outside 120..=280 has probability ~1e-15.
        for n in seen.values() {
            assert!((120..=280).contains(n), "{seen:?}");
        }
    }

    #[test]
    fn picks_by_hostname_avoid_tried_endpoints_and_honour_subsets() {
        let s = with_service("RANDOM");
        let host = "web.ns1.svc.cluster.local";
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let pick = |exclude: Vec<IpAddr>, labels: Option<&[(&str, &str)]>| {
            let want = Pick {
                port: Some(80),
                v4: true,
                exclude,
                labels: labels.map(|l| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Pick::default()
            };
            s.pick(host, &want).map(|r| r.endpoint.ip())
        };
        for _ in 0..20 {
            // A retry goes to an endpoint not tried yet...
            assert_eq!(pick(vec![a], None), Ok(b));
            // ...and when all were tried, to another than the last one.
            assert_eq!(pick(vec![b, a], None), Ok(b));
        }
        // A subset's labels: only pods that carry them.
        assert_eq!(pick(vec![], Some(&[("app", "web")])).map(|_| ()), Ok(()));
        assert_eq!(
            pick(vec![], Some(&[("version", "v9")])),
            Err(PickError::NoEndpoint("ns1/web".into()))
        );
        assert_eq!(
            s.pick("nope.ns1.svc.cluster.local", &Pick::default())
                .map(|r| r.endpoint),
            Err(PickError::NoService("nope.ns1.svc.cluster.local".into()))
        );
    }

    #[test]
    fn tunnel_protocol_is_carried() {
        let text = CFG.replace("labels: {app: a}}", "labels: {app: a}, tunnel: NONE}");
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), &text).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let w = s.by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert!(!w.hbone, "NONE: reached with plain TCP");
        let bad = CFG.replace("labels: {app: a}}", "labels: {app: a}, tunnel: IPSEC}");
        let e = LocalConfig::parse(std::path::Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pods[0].tunnel") && e.contains("HBONE"), "{e}");
    }

    #[test]
    fn strict_denies_plaintext_and_unknown_destinations_are_denied() {
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), CFG).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let snap = s.snapshot();
        let plain = rbac::Conn {
            principal: None,
            src_ip: "10.9.9.9".parse().unwrap(),
            dst_port: 80,
        };
        assert!(snap
            .authorize("10.0.0.1".parse().unwrap(), &plain)
            .unwrap_err()
            .0
            .contains("STRICT"));
        let mtls = rbac::Conn {
            principal: Some(SpiffeId::new("td", "ns2", "x")),
            ..plain
        };
        assert!(snap.authorize("10.0.0.1".parse().unwrap(), &mtls).is_ok());
        assert!(snap.authorize("10.0.0.7".parse().unwrap(), &mtls).is_err());
    }
}
