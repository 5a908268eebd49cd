//! The agent's side of the Kubernetes source: the cluster model comes
//! from [`cluster::kube`] (watches and one incremental translation, shared
//! with the waypoint); the node-local parts are here: this agent's own Node
//! (its addresses, for kubelet probes), the pod locator (netns and cgroup
//! of this node's pods) and the CNI socket. `app` drives them.
pub mod cni;

pub use cluster::kube::{client, crd, served_version, Health, KubeError};

/// The translation, where the agent has always had it.
pub mod model {
    pub use cluster::kube::model::*;
}

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{runtime::watcher, Api, Client};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::discover::{DiscoverError, Discoverer};
use cluster::kube::{
    model::{Change, Location, Membership},
    records::{PodRecord, Uid},
    ClusterWatch,
};

/// Why the whole model was assembled: each assembly is O(pods of the
/// cluster) on the control thread, and a CNI ADD that arrives meanwhile
/// waits for it.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    /// The first complete list.
    Start,
    /// A batch of API changes (and of CNI ADDs and DELs the model follows).
    Changes,
    /// A CNI ADD the fast path left to the whole model.
    CniAdd,
    /// The reload tick found a pod the last assembly could not locate.
    Discovery,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Changes => "changes",
            Trigger::CniAdd => "cni_add",
            Trigger::Discovery => "discovery",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    /// [`Trigger::as_str`].
    trigger: &'static str,
}

/// `mesh_agent_model_assemblies_total{trigger}` and
/// `mesh_agent_model_assembly_seconds`: how often, why and for how long
/// the control thread assembles the whole model.
#[derive(Clone)]
pub struct ModelMetrics {
    assemblies: Family<TriggerLabels, Counter>,
    seconds: Histogram,
}

impl ModelMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let assemblies = Family::<TriggerLabels, Counter>::default();
        // 0.25 ms to ~8 s.
        let seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let sub = registry.sub_registry_with_prefix("mesh_agent");
        sub.register(
            "model_assemblies",
            "Assemblies of the whole model from the Kubernetes store (O(pods of the cluster) each), by what triggered them",
            assemblies.clone(),
        );
        sub.register(
            "model_assembly_seconds",
            "Time the control thread spent per assembly of the whole model, applying it included but at start (CNI ADDs wait meanwhile)",
            seconds.clone(),
        );
        Self { assemblies, seconds }
    }

    pub fn observe(&self, trigger: Trigger, since: Instant) {
        self.assemblies
            .get_or_create(&TriggerLabels {
                trigger: trigger.as_str(),
            })
            .inc();
        self.seconds.observe(since.elapsed().as_secs_f64());
    }
}

/// The cluster watches plus this node's Node.
#[derive(Clone)]
pub struct Kube {
    pub cluster: ClusterWatch,
    pub health: Arc<Health>,
    /// The Node's InternalIP and ExternalIP addresses.
    node_addresses: Arc<Mutex<Vec<IpAddr>>>,
}

impl Kube {
    /// Starts every watch on the current runtime.
    pub fn start(client: Client, node: &str) -> Self {
        let cluster = ClusterWatch::start(client.clone());
        let node_addresses = Arc::new(Mutex::new(Vec::new()));
        let addrs = node_addresses.clone();
        cluster.watch(
            "node",
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            |n| Some(addresses_of(&n)),
            move |c| {
                *addrs.lock().unwrap_or_else(|e| e.into_inner()) = match c {
                    Change::Relisted(mut v) => v.pop().unwrap_or_default(),
                    Change::Upsert(v) => v,
                    Change::Delete(_) => Vec::new(),
                }
            },
        );
        Self {
            health: cluster.health.clone(),
            cluster,
            node_addresses,
        }
    }

    /// Resolves when something changed since the last call (cancel-safe:
    /// a change stays pending until a call completes).
    pub async fn changed(&self) {
        self.cluster.changed().await;
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        self.cluster.model().pod(namespace, name).cloned()
    }

    /// Whether `pod` belongs in the mesh (the CNI plugin's rule).
    pub fn membership(&self, pod: &PodRecord) -> Membership {
        self.cluster.model().membership(pod)
    }

    /// The node's own addresses and the host's: kubelet probes come from them.
    pub fn node_addresses(&self, host: &[IpAddr]) -> Vec<IpAddr> {
        let node = self.node_addresses.lock().unwrap_or_else(|e| e.into_inner()).clone();
        merge_addresses(node, host)
    }
}

fn addresses_of(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

fn merge_addresses(mut node: Vec<IpAddr>, host: &[IpAddr]) -> Vec<IpAddr> {
    node.extend_from_slice(host);
    node.sort();
    node.dedup();
    node
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
    /// The sandbox (`CNI_CONTAINERID`) each pod located by a CNI ADD runs
    /// in: a DEL for another one of the pod is an old sandbox's.
    sandboxes: HashMap<String, String>,
    /// The last sandbox a CNI DEL was of, per pod: an ADD of it that
    /// arrives after its DEL (it waited for the pod to reach the API while
    /// the runtime gave up and cleaned up) must not locate the pod there.
    deleted: HashMap<String, String>,
    /// Pod cgroup directories by UID from the last walk of the tree, and
    /// when it was taken: a pod outside the kubelet's usual places waits at
    /// most [`WALK_EVERY`] to be found, and a node whose scheduled pods have
    /// no cgroup yet does not walk its whole kubepods tree per translation.
    cgroups: Option<(Instant, HashMap<String, PathBuf>)>,
}

/// What a CNI DEL is to the locator.
#[derive(Debug, PartialEq, Eq)]
pub enum TearDown {
    /// Of the sandbox a CNI ADD located the pod in: the pod is torn down,
    /// never located again (until an ADD locates it).
    Removed,
    /// Of another sandbox of the pod (the kubelet repeats DELs, also for an
    /// old sandbox of a pod that runs in a new one by then): nothing
    /// changed.
    OldSandbox,
    /// No ADD of this agent located the pod (it was found by discovery, as
    /// after a restart of the agent; it was not in the mesh at its ADD; or
    /// this sandbox is torn down already): nothing changed, the caller
    /// decides by the DEL's netns ([`Locator::forget`]).
    Unrecorded,
}

/// How old the cgroup walk may be before an unlocated pod walks again.
const WALK_EVERY: Duration = Duration::from_secs(1);

impl Locator {
    pub fn new(discoverer: Discoverer) -> Self {
        Self {
            discoverer,
            found: HashMap::new(),
            cni_ips: HashMap::new(),
            torn_down: HashSet::new(),
            sandboxes: HashMap::new(),
            deleted: HashMap::new(),
            cgroups: None,
        }
    }

    /// From CNI ADD: the cgroup must already exist (kubelet creates it
    /// before the sandbox), the netns is the runtime's.
    pub fn add(&mut self, uid: &str, sandbox: &str, netns: PathBuf, ips: Vec<IpAddr>) -> Result<(), DiscoverError> {
        let cgroup = self.discoverer.pod_cgroup(uid)?;
        self.torn_down.remove(uid);
        self.sandboxes.insert(uid.to_string(), sandbox.to_string());
        self.cni_ips.insert(uid.to_string(), ips);
        self.found.insert(uid.to_string(), Location { netns, cgroup });
        Ok(())
    }

    /// From CNI DEL of `sandbox`: tears the pod down if a CNI ADD located
    /// it in that sandbox. A DEL without a sandbox ID is never taken for
    /// the recorded one (the pod stays captured: fail closed).
    pub fn remove(&mut self, uid: &str, sandbox: &str) -> TearDown {
        if !sandbox.is_empty() {
            self.deleted.insert(uid.to_string(), sandbox.to_string());
        }
        match self.sandboxes.get(uid) {
            None => TearDown::Unrecorded,
            Some(current) if *current != sandbox || sandbox.is_empty() => TearDown::OldSandbox,
            Some(_) => {
                self.forget(uid);
                TearDown::Removed
            }
        }
    }

    /// Whether a CNI DEL of `sandbox` of pod `uid` came already (its ADD is
    /// late: the sandbox is gone).
    pub fn deleted(&self, uid: &str, sandbox: &str) -> bool {
        self.deleted.get(uid).is_some_and(|s| s == sandbox)
    }

    /// The pod's sandbox is gone: never located again (until a CNI ADD
    /// locates it), so discovery cannot find it in the dying netns.
    pub fn forget(&mut self, uid: &str) {
        self.sandboxes.remove(uid);
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
        let cgroup = match self.discoverer.kubelet_pod_cgroup(uid) {
            Some(c) => c,
            None => self.walked_cgroup(uid)?,
        };
        match self.discoverer.find_in(uid, ips, cgroup) {
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

    /// `uid`'s cgroup from a walk of the tree at most [`WALK_EVERY`] old.
    fn walked_cgroup(&mut self, uid: &str) -> Option<PathBuf> {
        if self.cgroups.as_ref().is_none_or(|(at, _)| at.elapsed() >= WALK_EVERY) {
            match self.discoverer.pod_cgroups() {
                Ok(c) => self.cgroups = Some((Instant::now(), c)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot walk the pod cgroups");
                    return None;
                }
            }
        }
        let found = self.cgroups.as_ref().and_then(|(_, c)| c.get(uid)).cloned();
        if found.is_none() {
            tracing::debug!(uid, "pod not located: no cgroup on this node");
        }
        found
    }

    /// Forgets pods that left the API.
    pub fn retain(&mut self, uids: &HashSet<&Uid>) {
        let known = |u: &String| uids.contains(&Uid::new(u));
        self.found.retain(|u, _| known(u));
        self.torn_down.retain(known);
        self.sandboxes.retain(|u, _| known(u));
        self.deleted.retain(|u, _| known(u));
        self.cni_ips.retain(|u, _| known(u));
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    use super::*;

    /// The kubelet repeats DELs, also for an old sandbox of a pod that runs
    /// in a new one by then: such a DEL must leave the pod located (else its
    /// capture would go and never come back).
    #[test]
    fn a_del_of_an_old_sandbox_leaves_the_pod_located() {
        let root = std::env::temp_dir().join(format!("locator-{}", std::process::id()));
        let (uid, other) = (
            "0f1e2d3c-0000-4000-8000-000000000001",
            "0f1e2d3c-0000-4000-8000-000000000002",
        );
        for u in [uid, other] {
            std::fs::create_dir_all(root.join(format!("kubepods/burstable/pod{u}"))).unwrap();
        }
        let ips: Vec<IpAddr> = vec!["10.1.0.7".parse().unwrap()];
        let mut l = Locator::new(Discoverer::new(&root));
        l.add(uid, "sandbox-2", PathBuf::from("/run/netns/two"), ips.clone())
            .unwrap();
        assert_eq!(l.remove(uid, "sandbox-1"), TearDown::OldSandbox);
        assert_eq!(
            l.remove(uid, ""),
            TearDown::OldSandbox,
            "no sandbox ID: not taken for the recorded one"
        );
        let at = l.locate(uid, &ips).expect("still located after an old sandbox's DEL");
        assert_eq!(at.netns, Path::new("/run/netns/two"));
        assert_eq!(l.cni_ips.get(uid), Some(&ips), "its CNI IPs stay too");
        // Its own sandbox's DEL tears it down, for good; a repeat finds
        // nothing recorded.
        assert_eq!(l.remove(uid, "sandbox-2"), TearDown::Removed);
        assert_eq!(l.locate(uid, &ips), None);
        assert_eq!(l.remove(uid, "sandbox-2"), TearDown::Unrecorded);
        assert_eq!(l.remove(uid, "sandbox-1"), TearDown::Unrecorded);
        // A new sandbox's ADD locates it again.
        l.add(uid, "sandbox-3", PathBuf::from("/run/netns/three"), ips.clone())
            .unwrap();
        assert!(l.locate(uid, &ips).is_some());
        // An ADD of a sandbox whose DEL came first is late: the sandbox is
        // gone. Another sandbox's is not.
        assert!(l.deleted(uid, "sandbox-1") && !l.deleted(uid, "sandbox-3"));
        // A pod no ADD of this agent located (found by discovery after a
        // restart, or not in the mesh at its ADD): the locator alone cannot
        // tell which sandbox a DEL is of, so it keeps the pod locatable
        // (else an old sandbox's DEL would leave a running pod uncaptured
        // for good); the caller decides, and `forget` tears it down.
        assert_eq!(l.remove(other, "whatever"), TearDown::Unrecorded);
        assert!(!l.torn_down.contains(other));
        l.forget(other);
        assert!(l.torn_down.contains(other));
        assert_eq!(l.locate(other, &ips), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn node_addresses_are_internal_and_external_ips_sorted_and_deduplicated() {
        let addr = |type_: &str, address: &str| NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        let node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![
                    addr("Hostname", "node1"),
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
        let ips = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect::<Vec<IpAddr>>();
        assert_eq!(
            merge_addresses(addresses_of(&node), &ips(&["10.0.0.1", "192.0.2.1"])),
            ips(&["10.0.0.1", "10.0.0.2", "192.0.2.1", "203.0.113.5", "fd00::2"])
        );
        assert!(merge_addresses(addresses_of(&Node::default()), &[]).is_empty());
    }
}
