//! The Kubernetes source: reflectors over the API (kube-rs) feeding the same
//! model the local file produces, the node-local pod locator, and the CNI
//! socket. `app` drives them.
//!
//! Watches (all list+watch, resumed from the last resourceVersion, re-listed
//! on 410 Gone, retried with backoff): Namespaces, Pods cluster-wide (a
//! minimal projection: the agent must know every mesh pod's IP, identity and
//! node to tunnel to it), Services, EndpointSlices, Istio AuthorizationPolicy
//! and PeerAuthentication, Gateway API Gateways (waypoints; like Istio's
//! CRDs optional: not installed is an empty list), and this agent's own Node
//! (its addresses, for kubelet probes).
pub mod cni;
pub mod crd;
pub mod model;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::discover::{DiscoverError, Discoverer};
use model::{Inputs, Location};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {message}", path = path.display())]
    Kubeconfig { path: PathBuf, message: String },
    #[error(
        "cannot find the Kubernetes API: {0} (in a pod, mount the service account token; elsewhere pass --kubeconfig)"
    )]
    Infer(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// A client from `--kubeconfig`, else `$KUBECONFIG`/~/.kube/config, else the
/// in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |e: &dyn std::fmt::Display| KubeError::Kubeconfig {
                path: path.to_owned(),
                message: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// State of one watch, for readiness and logs.
#[derive(Debug, Clone)]
enum WatchState {
    Listing,
    Synced,
    /// Synced before (its store holds the last good state), failing now.
    Failing {
        since: Instant,
        error: String,
    },
    /// Failing before its first list completed.
    NeverSynced {
        error: String,
    },
}

/// How the watches are doing.
#[derive(Default)]
pub struct Health(Mutex<BTreeMap<&'static str, WatchState>>);

impl Health {
    fn set(&self, name: &'static str, f: impl FnOnce(Option<&WatchState>) -> WatchState) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let next = f(m.get(name));
        m.insert(name, next);
    }

    fn ok(&self, name: &'static str, synced_now: bool) {
        self.set(name, |prev| match prev {
            _ if synced_now => WatchState::Synced,
            Some(WatchState::Listing | WatchState::NeverSynced { .. }) | None => WatchState::Listing,
            _ => WatchState::Synced,
        });
    }

    fn failed(&self, name: &'static str, error: String) {
        self.set(name, |prev| match prev {
            Some(WatchState::Synced) => WatchState::Failing {
                since: Instant::now(),
                error,
            },
            Some(WatchState::Failing { since, .. }) => WatchState::Failing { since: *since, error },
            _ => WatchState::NeverSynced { error },
        });
    }

    /// A resource whose CRD is not installed is an empty, synced list.
    fn absent(&self, name: &'static str) {
        self.set(name, |_| WatchState::Synced);
    }

    /// Whether every watch has listed once (the model is complete).
    pub fn synced(&self) -> bool {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Every watch registers itself (Listing) when it is spawned.
        !m.is_empty()
            && m.values()
                .all(|s| matches!(s, WatchState::Synced | WatchState::Failing { .. }))
    }

    /// `None` when all is well; else what readiness and the config dump say.
    pub fn problem(&self) -> Option<String> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let failing: Vec<String> = m
            .iter()
            .filter_map(|(name, s)| match s {
                WatchState::Failing { since, error } => {
                    Some(format!("{name}: failing for {}s: {error}", since.elapsed().as_secs()))
                }
                WatchState::NeverSynced { error } => Some(format!("{name}: not listed yet: {error}")),
                WatchState::Listing => Some(format!("{name}: listing")),
                WatchState::Synced => None,
            })
            .collect();
        (!failing.is_empty()).then(|| failing.join("; "))
    }

    fn failing(&self) -> bool {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.values().any(|s| matches!(s, WatchState::Failing { .. }))
    }

    /// The API answered again: watches that resumed without news are fine.
    fn recovered(&self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for s in m.values_mut() {
            if matches!(s, WatchState::Failing { .. }) {
                *s = WatchState::Synced;
            }
        }
    }
}

/// The reflectors' stores.
#[derive(Clone)]
pub struct Kube {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    authz: Store<crd::AuthorizationPolicy>,
    peer_auth: Store<crd::PeerAuthentication>,
    gateways: Store<crd::Gateway>,
    node: Store<Node>,
    pub health: Arc<Health>,
    changed: Arc<Notify>,
}

impl Kube {
    /// Starts every watch on the current runtime.
    pub fn start(client: Client, node: &str) -> Self {
        let health = Arc::new(Health::default());
        let changed = Arc::new(Notify::new());
        let w = |n| Watch {
            name: n,
            health: health.clone(),
            changed: changed.clone(),
        };
        let all = watcher::Config::default;
        let kube = Self {
            namespaces: w("namespaces").spawn(Api::all(client.clone()), all(), strip_meta),
            pods: w("pods").spawn(Api::all(client.clone()), all(), model::project_pod),
            services: w("services").spawn(Api::all(client.clone()), all(), strip_meta),
            slices: w("endpointslices").spawn(Api::all(client.clone()), all(), strip_meta),
            authz: w("authorizationpolicies").spawn_istio(client.clone()),
            peer_auth: w("peerauthentications").spawn_istio(client.clone()),
            gateways: w("gateways").spawn(Api::all(client.clone()), all(), model::project_gateway),
            node: w("node").spawn(
                Api::all(client.clone()),
                all().fields(&format!("metadata.name={node}")),
                strip_meta,
            ),
            health: health.clone(),
            changed,
        };
        tokio::spawn(probe_while_failing(client, health));
        kube
    }

    /// Resolves when something changed since the last call (cancel-safe:
    /// a change stays pending until a call completes).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn inputs(&self) -> Inputs {
        Inputs {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            authorization_policies: self.authz.state(),
            peer_authentications: self.peer_auth.state(),
            gateways: self.gateways.state(),
            node: self.node.state().into_iter().next(),
        }
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Whether `pod` is a pod of a waypoint Gateway (never captured).
    pub fn is_waypoint_pod(&self, pod: &Pod) -> bool {
        model::is_waypoint_pod(pod, &self.gateways.state())
    }

    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&reflector::ObjectRef::new(name))
            .and_then(|n| n.metadata.labels.clone())
    }
}

fn strip_meta<K: Resource>(obj: &mut K) {
    let m = obj.meta_mut();
    m.managed_fields = None;
    m.annotations = None;
}

struct Watch {
    name: &'static str,
    health: Arc<Health>,
    changed: Arc<Notify>,
}

impl Watch {
    fn spawn<K>(self, api: Api<K>, cfg: watcher::Config, project: fn(&mut K)) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (reader, writer) = reflector::store();
        self.health.ok(self.name, false);
        tokio::spawn(self.run(async move { api }, cfg, project, writer));
        reader
    }

    /// An Istio resource, in the version the API serves (v1, else v1beta1).
    /// The store's keys carry the default version whatever is read; only
    /// its `state()` is used.
    fn spawn_istio<K>(self, client: Client) -> Store<K>
    where
        K: Resource<DynamicType = crd::Version> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        self.health.ok(self.name, false);
        let name = self.name;
        let api = async move {
            let version = istio_version(&client, &K::plural(&crd::Version::default()), name).await;
            Api::all_with(client, &version)
        };
        tokio::spawn(self.run(api, watcher::Config::default(), strip_meta, writer));
        reader
    }

    async fn run<K>(
        self,
        api: impl std::future::Future<Output = Api<K>>,
        cfg: watcher::Config,
        project: fn(&mut K),
        writer: reflector::store::Writer<K>,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let stream = watcher(api.await, cfg)
            .default_backoff()
            .modify(project)
            .reflect(writer);
        futures::pin_mut!(stream);
        let mut logged = None::<String>;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    let done = matches!(ev, watcher::Event::InitDone);
                    if logged.take().is_some() || done {
                        tracing::info!(watch = self.name, "watch {}", if done { "listed" } else { "resumed" });
                    }
                    self.health.ok(self.name, done);
                    if !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        self.changed.notify_one();
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if not_installed(&e) {
                        // Istio's and Gateway API's CRDs are optional: no
                        // policies or waypoints then.
                        if logged.as_deref() != Some(&msg) {
                            tracing::warn!(
                                watch = self.name,
                                "resource not served by the API (CRD not installed?); treating it as empty"
                            );
                        }
                        self.health.absent(self.name);
                        self.changed.notify_one();
                    } else {
                        if logged.as_deref() != Some(&msg) {
                            tracing::warn!(watch = self.name, error = %msg, "watch failing; keeping the last good state and retrying");
                        }
                        self.health.failed(self.name, msg.clone());
                    }
                    logged = Some(msg);
                }
            }
        }
    }
}

/// The first of [`crd::VERSIONS`] in which the API serves `plural`
/// (`None`: in neither, e.g. Istio's CRDs are not installed).
pub async fn served_version(client: &Client, plural: &str) -> Result<Option<crd::Version>, kube::Error> {
    for v in crd::VERSIONS {
        match client.list_api_group_resources(&format!("{}/{v}", crd::GROUP)).await {
            Ok(list) if list.resources.iter().any(|r| r.name == plural) => return Ok(Some(crd::Version(v))),
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Asks discovery until it answers (backing off to 30 s), and logs the choice.
async fn istio_version(client: &Client, plural: &str, watch: &'static str) -> crd::Version {
    let mut delay = Duration::from_millis(500);
    let mut warned = false;
    loop {
        match served_version(client, plural).await {
            Ok(Some(v)) => {
                tracing::info!(watch, version = v.0, "reading {}/{} {plural}", crd::GROUP, v.0);
                return v;
            }
            Ok(None) => {
                tracing::info!(
                    watch,
                    "{plural}.{} is served in none of {:?}; watching {} in case it is installed",
                    crd::GROUP,
                    crd::VERSIONS,
                    crd::VERSION
                );
                return crd::Version::default();
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(watch, error = %e, "cannot ask the API which version of {plural} it serves; retrying");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn not_installed(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found())
}

/// A watch that resumes without news emits nothing: ask the API directly
/// whether it is back, so readiness stops reporting it as down.
async fn probe_while_failing(client: Client, health: Arc<Health>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if health.failing() && client.apiserver_version().await.is_ok() {
            health.recovered();
        }
    }
}

/// Every non-loopback address of the host's network namespace: kubelet
/// probes (and anything else from the host) come from one of them. With a
/// bridge CNI that is the bridge's address, which the Node object does not
/// list, so the Node's addresses alone would capture (and, under STRICT,
/// refuse) the probes.
pub fn host_addresses(host_netns: &Path) -> Result<Vec<IpAddr>, String> {
    crate::discover::addresses_in(host_netns)
}

/// Finds pods of this node: the CNI plugin's netns (new pods), else
/// discovery through the cgroup tree and /proc (pods that predate the agent).
/// Found locations stick for the pod's lifetime, so capture is never
/// re-done because a path changed.
pub struct Locator {
    pub discoverer: Discoverer,
    found: HashMap<String, Location>,
    /// IPs the CNI plugin gave (the API has them only later).
    pub cni_ips: HashMap<String, Vec<IpAddr>>,
    /// Pods whose sandbox is gone (CNI DEL): never located again.
    torn_down: HashSet<String>,
}

impl Locator {
    pub fn new(discoverer: Discoverer) -> Self {
        Self {
            discoverer,
            found: HashMap::new(),
            cni_ips: HashMap::new(),
            torn_down: HashSet::new(),
        }
    }

    /// From CNI ADD: the cgroup must already exist (kubelet creates it
    /// before the sandbox), the netns is the runtime's.
    pub fn add(&mut self, uid: &str, netns: PathBuf, ips: Vec<IpAddr>) -> Result<(), DiscoverError> {
        let cgroup = self.discoverer.pod_cgroup(uid)?;
        self.torn_down.remove(uid);
        self.cni_ips.insert(uid.to_string(), ips);
        self.found.insert(uid.to_string(), Location { netns, cgroup });
        Ok(())
    }

    /// From CNI DEL.
    pub fn remove(&mut self, uid: &str) {
        self.found.remove(uid);
        self.cni_ips.remove(uid);
        self.torn_down.insert(uid.to_string());
    }

    /// `ips`: the pod's, which its netns must hold.
    pub fn locate(&mut self, uid: &str, ips: &[IpAddr]) -> Option<Location> {
        if uid.is_empty() || self.torn_down.contains(uid) {
            return None;
        }
        if let Some(l) = self.found.get(uid) {
            return Some(l.clone());
        }
        match self.discoverer.find(uid, ips) {
            Ok(loc) => {
                let l = Location {
                    netns: loc.netns,
                    cgroup: loc.cgroup,
                };
                self.found.insert(uid.to_string(), l.clone());
                Some(l)
            }
            Err(e) => {
                tracing::debug!(uid, error = %e, "pod not located");
                None
            }
        }
    }

    /// Forgets pods that left the API.
    pub fn retain(&mut self, uids: &HashSet<&str>) {
        self.found.retain(|u, _| uids.contains(u.as_str()));
        self.torn_down.retain(|u| uids.contains(u.as_str()));
        self.cni_ips.retain(|u, _| uids.contains(u.as_str()));
    }
}
