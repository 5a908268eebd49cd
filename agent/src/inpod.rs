//! In-pod enrolment: turns the desired set of pods into listeners inside each
//! pod's netns plus capture map entries, and applies changes as diffs.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use tokio::sync::watch;

use crate::{
    capture::{Capture, CaptureError, ProxyMaps},
    config::{AgentConfig, LocalConfig, PodSpec},
    netns::{NetSysctls, Netns},
    proxy::{policed::OpenConns, ConnLimit, MeshCtx, PodCtx, PodProxy, Tracker},
    state::State,
};

struct Enrolled {
    spec: PodSpec,
    /// Its id in the capture maps (POD_IPS values, ENROLLED_NETNS).
    pod_id: u32,
    netns_cookie: u64,
    /// The last [`InPod::apply`] pass that wanted it.
    seen: u64,
    _proxy: PodProxy,
}

/// What every pod's data path shares.
pub struct DataPlane {
    /// The data plane's runtime: pod listeners are created and served there.
    pub runtime: tokio::runtime::Handle,
    /// `None`: capture only, no identities.
    pub mesh: Option<Arc<MeshCtx>>,
    pub state: State,
    pub metrics: crate::metrics::TcpMetrics,
    pub refusals: crate::metrics::Refusals,
}

/// The pods this agent currently captures.
pub struct InPod {
    node: String,
    cgroup_parent: std::path::PathBuf,
    capture: Capture,
    orig: Arc<ProxyMaps>,
    tracker: Arc<Tracker>,
    shutdown: watch::Receiver<bool>,
    dp: DataPlane,
    open: Arc<OpenConns>,
    trust_domain: String,
    connect_timeout: std::time::Duration,
    max_conns: usize,
    pods: BTreeMap<String, Enrolled>,
    /// Counts [`Self::apply`] passes (see [`Enrolled::seen`]).
    pass: u64,
    /// Pod ids are issued from `first_id` on (see `Capture::retain`).
    first_id: u32,
    next_id: u32,
    /// Last error per pod that could not be enrolled, to log changes only.
    failures: BTreeMap<String, String>,
}

impl InPod {
    pub fn new(
        cfg: &AgentConfig,
        capture: Capture,
        orig: ProxyMaps,
        tracker: Arc<Tracker>,
        shutdown: watch::Receiver<bool>,
        dp: DataPlane,
    ) -> Self {
        // Random, not 1: an agent handing over shares the pinned maps with
        // its successor, and entries are removed only under ids of their
        // own agent (`Capture::unenroll`, `Capture::retain`).
        let first_id = rand::random();
        Self {
            node: cfg.node.clone(),
            cgroup_parent: cfg.cgroup_parent.clone(),
            capture,
            orig: Arc::new(orig),
            tracker,
            shutdown,
            dp,
            open: Arc::default(),
            trust_domain: cfg.trust_domain.clone(),
            connect_timeout: cfg.connect_timeout,
            max_conns: cfg.max_connections_per_pod,
            pods: BTreeMap::new(),
            pass: 0,
            first_id,
            next_id: first_id,
            failures: BTreeMap::new(),
        }
    }

    /// Why the pod could not be enrolled at the last attempt.
    pub fn failure(&self, key: &str) -> Option<&str> {
        if self.capture.is_superseded() {
            return Some("a newer agent runs the capture on this node and enrols its pods now");
        }
        self.failures.get(key).map(String::as_str)
    }

    /// The node this agent captures pods of.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The network namespace (its cookie) pod `uid` is captured in.
    pub fn netns_cookie(&self, uid: &cluster::kube::records::Uid) -> Option<u64> {
        self.pods
            .values()
            .find(|e| e.spec.uid.as_ref() == Some(uid))
            .map(|e| e.netns_cookie)
    }

    pub fn enrolled(&self) -> impl Iterator<Item = &str> {
        self.pods.keys().map(String::as_str)
    }

    /// The identities of the enrolled pods.
    pub fn identities(&self) -> std::collections::BTreeSet<mesh::identity::SpiffeId> {
        self.pods
            .values()
            .map(|e| e.spec.identity(&self.trust_domain))
            .collect()
    }

    /// Closes open connections the current policy no longer allows.
    pub fn recheck_open_connections(&self) {
        let closed = self.open.recheck(&self.dp.state.snapshot());
        if closed > 0 {
            tracing::info!(closed, "policy change closed open connections");
        }
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// Makes the captured pods and settings match `cfg`: unenrolls pods that
    /// left (or changed), enrolls new ones, and drops stale pinned state a
    /// previous agent left behind. Pods that cannot be enrolled are retried on
    /// the next call.
    pub fn apply(&mut self, cfg: &LocalConfig) -> Result<(), CaptureError> {
        if self.capture.superseded() {
            return Ok(());
        }
        self.capture.apply_settings(&cfg.capture)?;
        // One pass over the wanted pods, keyed in a reused buffer: this runs
        // on every change of the model, O(pods of the node), and a map of
        // every wanted pod's key per pass cost about a millisecond at 1,000.
        self.pass = self.pass.wrapping_add(1);
        let mut key = String::new();
        let mut new: Vec<&PodSpec> = Vec::new();
        let mut still_failing = HashSet::new();
        for spec in cfg.pods_on(&self.node) {
            spec.key_into(&mut key);
            match self.pods.get_mut(key.as_str()) {
                Some(e) if same_capture(spec, &e.spec) => {
                    e.seen = self.pass;
                    // Most passes change one pod: clone only what changed.
                    if e.spec != *spec {
                        e.spec = spec.clone();
                    }
                }
                // New, or captured differently: an enrolled one stays
                // unseen, so it is unenrolled below and enrolled again.
                _ => new.push(spec),
            }
            if self.failures.contains_key(key.as_str()) {
                still_failing.insert(key.clone());
            }
        }
        let pass = self.pass;
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| e.seen != pass)
            .map(|(k, _)| k.clone())
            .collect();
        // The maps hold exactly the enrolled pods' entries unless a pod left
        // or failed half-way, or the first complete pass (which also drops
        // what a previous agent left) is still to come: only then is a
        // sweep over every map and link worth its O(pods) syscalls.
        let mut sweep = !gone.is_empty() || self.capture.needs_sweep();
        for key in gone {
            let e = self.pods.remove(&key).expect("listed above");
            self.capture.unenroll(e.pod_id, e.netns_cookie, &e.spec.ips);
            tracing::info!(pod = %key, "pod unenrolled");
        }
        self.failures.retain(|k, _| still_failing.contains(k));
        for spec in new {
            if let Err(err) = self.enroll_one(spec) {
                if matches!(err, CaptureError::Superseded) {
                    // Superseded under way: the maps are the successor's.
                    return Ok(());
                }
                sweep = true;
                let msg = err.to_string();
                let key = spec.key();
                if self.failures.get(&key) != Some(&msg) {
                    tracing::error!(pod = %key, error = %msg, "cannot enroll pod; will retry");
                    self.failures.insert(key, msg);
                }
            }
        }

        if sweep {
            let cookies: HashSet<u64> = self.pods.values().map(|e| e.netns_cookie).collect();
            let ips: Vec<IpAddr> = self.pods.values().flat_map(|e| e.spec.ips.iter().copied()).collect();
            let (first, next) = (self.first_id, self.next_id);
            self.capture.retain(&cookies, &ips, |id| issued(first, next, id));
        }
        Ok(())
    }

    /// A successor superseded us and is gone again (see
    /// [`Capture::successor_gone`]): this agent must step down.
    pub fn successor_gone(&mut self) -> bool {
        self.capture.successor_gone()
    }

    /// The last [`Self::apply`] left nothing to retry: every pod it wanted
    /// is enrolled and no map needs a sweep.
    pub fn settled(&self) -> bool {
        self.failures.is_empty() && !self.capture.needs_sweep()
    }

    /// Captures one pod (for `apply`, and for a CNI ADD ahead of the next
    /// `apply`, which stays the judge: it unenrolls the pod if the whole
    /// model disagrees). `Ok(false)`: already enrolled, nothing done. On
    /// error nothing is recorded: `apply` records it, retries and sweeps
    /// what a half-done enrolment left.
    pub fn enroll_one(&mut self, spec: &PodSpec) -> Result<bool, CaptureError> {
        if self.capture.superseded() {
            return Err(CaptureError::Superseded);
        }
        let key = spec.key();
        if self.pods.contains_key(&key) {
            return Ok(false);
        }
        let e = self.enroll(spec)?;
        tracing::info!(pod = %key, netns = ?spec.netns, ips = ?spec.ips, "pod enrolled");
        self.failures.remove(&key);
        self.pods.insert(key, e);
        Ok(true)
    }

    fn enroll(&mut self, spec: &PodSpec) -> Result<Enrolled, CaptureError> {
        let pod_err = |message: String| CaptureError::Pod {
            pod: spec.key(),
            message,
        };
        let (Some(netns), Some(cgroup)) = (&spec.netns, &spec.cgroup) else {
            return Err(pod_err(
                "its network namespace and cgroup are not known (yet): set netns and cgroup, or wait for discovery"
                    .into(),
            ));
        };
        if !cgroup.starts_with(&self.cgroup_parent) {
            return Err(pod_err(format!(
                "its cgroup {} is not below the agent's --cgroup-parent {}, so capture would not see its sockets",
                cgroup.display(),
                self.cgroup_parent.display()
            )));
        }
        if !cgroup.is_dir() {
            return Err(pod_err(format!("its cgroup {} does not exist", cgroup.display())));
        }
        let netns = Netns::open(netns)?;
        let netns_cookie = netns.cookie()?;
        let (transparent, migration) = netns.run(prepare_pod_netns)?;
        if let Err(e) = migration {
            tracing::warn!(pod = %spec.key(), error = %e, "cannot enable tcp_migrate_req; connections queued during an agent handover may be reset");
        }
        let transparent = match transparent {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pod = %spec.key(), error = %e, "cannot set up transparent forwarding; the app will see the agent's address as the client");
                false
            }
        };
        let ctx = Arc::new(PodCtx {
            key: spec.key(),
            identity: spec.identity(&self.trust_domain),
            ips: spec.ips.iter().map(|ip| ip.to_canonical()).collect(),
            mesh: self.dp.mesh.clone(),
            state: self.dp.state.clone(),
            transparent,
            open: self.open.clone(),
            metrics: self.dp.metrics.clone(),
            refusals: self.dp.refusals.clone(),
            netns,
            netns_cookie,
            orig: self.orig.clone(),
            tracker: self.tracker.clone(),
            connect_timeout: self.connect_timeout,
            limit: ConnLimit::new(self.max_conns),
        });
        let proxy =
            PodProxy::start(ctx.clone(), &self.shutdown, &self.dp.runtime).map_err(|e| pod_err(e.to_string()))?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.capture.enroll(id, &ctx.netns, netns_cookie, &spec.ips, &proxy)?;
        Ok(Enrolled {
            spec: spec.clone(),
            pod_id: id,
            netns_cookie,
            seen: self.pass,
            _proxy: proxy,
        })
    }
}

/// In the pod netns, what its capture needs there, each on its own (either
/// may fail alone): transparent forwarding (replies to the agent's
/// transparent forwards inherit their mark, `tcp_fwmark_accept` for the
/// app's packets, `fwmark_reflect` for the kernel's own RSTs and ICMP,
/// e.g. when the port is closed, and are routed back locally: rtnl), and
/// listener migration (`tcp_migrate_req`: without it a closing listener
/// resets the connections in its accept queue even when a successor
/// exists). One [`NetSysctls`] for all four (see there for why).
fn prepare_pod_netns() -> (std::io::Result<()>, std::io::Result<()>) {
    let sysctls = NetSysctls::open();
    let transparent = ["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect", "ipv6/fwmark_reflect"]
        .into_iter()
        .try_for_each(|path| sysctls.write(path, "1"))
        .and_then(|()| crate::rtnl::add_forward_routing());
    (transparent, sysctls.write("ipv4/tcp_migrate_req", "1"))
}

/// Whether two specs capture the same way (labels and the like may change
/// in place; a new service account means a new identity, so re-enroll).
fn same_capture(a: &PodSpec, b: &PodSpec) -> bool {
    a.netns == b.netns && a.cgroup == b.cgroup && a.ips == b.ips && a.service_account == b.service_account
}

/// Whether `id` is one of the pod ids issued from `first` up to `next`
/// (exclusive), wrapping past `u32::MAX`.
fn issued(first: u32, next: u32, id: u32) -> bool {
    id.wrapping_sub(first) < next.wrapping_sub(first)
}

#[cfg(test)]
mod tests {
    use super::issued;

    #[test]
    fn issued_ids_wrap_past_the_top() {
        assert!(!issued(7, 7, 7), "none issued yet");
        assert!(issued(7, 9, 7) && issued(7, 9, 8) && !issued(7, 9, 9) && !issued(7, 9, 6));
        let first = u32::MAX - 1;
        let next = first.wrapping_add(4); // MAX-1, MAX, 0, 1
        for id in [u32::MAX - 1, u32::MAX, 0, 1] {
            assert!(issued(first, next, id), "{id}");
        }
        assert!(!issued(first, next, 2) && !issued(first, next, u32::MAX - 2));
    }
}
