//! Wires the agent together. Two runtimes, as ztunnel has them:
//!
//! * the **data plane** (accept loops, forwarding, HBONE) on the main thread's
//!   runtime (`--worker-threads`; 0 = one thread that polls and forwards);
//! * the **control path** (enrolment source, Kubernetes watches and
//!   translation, CNI socket, CA client, applying changes) on its own thread
//!   and current-thread runtime, so a re-list, a model rebuild or a slow CA
//!   never delays a packet. It creates pod listeners inside the data plane's
//!   runtime through its handle.
//!
//! Metrics, readiness and admin run on a third thread (`admin`). On SIGTERM
//! the control path stops the listeners and hands the data plane the open
//! connections to drain.
use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use cluster::filewatch::{FileWatch, Polled};
use tokio::{
    runtime::Handle,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    admin::{Addrs, Admin, DumpFn, Readiness},
    capture::Capture,
    config::{AgentConfig, KubeSettings, LocalConfig, PodSpec, Source},
    discover::Discoverer,
    identity::{CertStore, SecretManager},
    inpod::{DataPlane, InPod},
    k8s::{self, cni::CniEvent, Kube, Locator},
    metrics::{Refusals, TcpMetrics, WaypointBindings},
    netns::Netns,
    proxy::{MeshCtx, Tracker},
    state::State,
};
use cluster::waypoint::{BindingStatus, Bindings, Change};
use mesh::tls::{self, Roots};

/// How long a batch of Kubernetes changes waits after its first for the
/// rest to land before the model is translated (a re-list, a rollout or a
/// node starting its pods is a burst of changes).
const MODEL_BATCH: Duration = Duration::from_millis(50);

/// The kernel programs, embedded by build.rs (empty when not built).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

/// What the control path hands the data plane when it stops.
struct Drain {
    tracker: Arc<Tracker>,
    timeout: Duration,
}

/// The longest drain of an agent stepping down (see `capture::beacon`).
const STEP_DOWN_DRAIN: Duration = Duration::from_secs(2);

/// Runs the agent until SIGTERM/SIGINT and a drain.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    raise_fd_limit();
    // setns affects only the calling thread: do it before any thread exists
    // so every thread (data plane, control, admin) lives in the node's netns.
    if let Some(ns) = &cfg.node_netns {
        Netns::open(ns)?.enter_for_good()?;
    }
    // 0: one thread that polls epoll and runs the ready task itself.
    let data_plane =
        mesh::runtime::data_plane(cfg.worker_threads, "data-plane").context("cannot start the data-plane runtime")?;
    let (stopped, drain) = oneshot::channel();
    let dp = data_plane.handle().clone();
    let control = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || -> anyhow::Result<()> {
            mesh::alloc::control_thread();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the control runtime")?;
            rt.block_on(control(cfg, dp, stopped))
        })
        .context("cannot start the control thread")?;
    // The data plane runs here until the control path hands over the drain
    // (or fails before it could start anything).
    let left = data_plane.block_on(async move {
        let d: Drain = drain.await.ok()?;
        Some(d.tracker.drain(d.timeout).await)
    });
    let result = control
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the control thread panicked")));
    if let Some(left) = left {
        tracing::info!(left_open = left, "agent stopped");
    }
    result
}

/// The control path: source, capture, identities, admin; applies changes
/// until a signal, then stops the listeners and hands over the drain.
async fn control(cfg: AgentConfig, dp: Handle, stopped: oneshot::Sender<Drain>) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg)?, "agent starting");
    // The built-in object is read in place (it is part of the binary); a
    // file's copy is freed once loaded.
    let object: std::borrow::Cow<'static, [u8]> = match &cfg.bpf_object {
        Some(p) => std::fs::read(p)
            .map_err(|source| crate::capture::CaptureError::ReadObject {
                path: p.clone(),
                source,
            })?
            .into(),
        None => EBPF_OBJECT.into(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    // Read the source before touching the kernel, so a bad file fails fast.
    let mut source = match &cfg.source {
        Source::File(path) => Watched::File(Box::new(FileSource::open(path)?)),
        Source::Kubernetes(k) => Watched::Kube(KubeSource::start(&cfg.node, k, &mut registry).await?),
    };
    let (mut capture, orig) = Capture::start(
        &object,
        &cfg.bpffs,
        &cfg.pin_name,
        &cfg.cgroup_parent,
        cfg.bpf_log,
        crate::capture::sockmap::Phases {
            on: cfg.sockmap,
            to_app: cfg.sockmap_to_app,
            forward: cfg.sockmap_forward,
        },
    )?;
    drop(object);
    if let Source::Kubernetes(k) = &cfg.source {
        // Agent pods have network namespaces of their own.
        capture.set_beacon_netns(k.host_netns.clone());
    }

    let (shutdown_tx, shutdown) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    let state = State::default();
    let (secrets, mesh_ctx) = match &cfg.ca {
        Some(ca) => {
            let secrets = SecretManager::new(mesh::ca::CaClient::new(ca)?, cfg.cert_lifetime);
            let roots = std::fs::read_to_string(&ca.root_cert)
                .with_context(|| format!("cannot read --ca-root {}", ca.root_cert.display()))?;
            let mesh_ctx = MeshCtx {
                certs: secrets.store(),
                tls: tls::Configs::new(Roots::from_pem(&roots)?),
                pool: mesh::pool::Pool::new(mesh::hbone::Timeouts::from_connect(cfg.connect_timeout)),
                cert_wait: cfg.cert_wait,
            };
            (Some(secrets), Some(Arc::new(mesh_ctx)))
        }
        None => {
            tracing::warn!("no --ca-address: capture only; connections are forwarded as plain TCP without mTLS");
            (None, None)
        }
    };
    let metrics = TcpMetrics::register(&mut registry);
    let refusals = Refusals::register(&mut registry);
    let binding_metric = WaypointBindings::register(&mut registry);
    if capture.sockmap_stats().is_some() {
        crate::metrics::SockmapCounters::register(&mut registry, capture.pins().clone());
    }
    if let Some(ends) = orig.sockmap() {
        registry.sub_registry_with_prefix("mesh_agent").register(
            "sockmap_fallback",
            "Redirected in-pod hops sent back to TCP because bytes piled up in the agent's socket",
            ends.fallbacks().clone(),
        );
        registry.sub_registry_with_prefix("mesh_agent").register(
            "sockmap_respliced",
            "In-pod hops sent back to TCP whose redirected bytes were all read, spliced from then on",
            ends.respliced().clone(),
        );
    }
    let certs = secrets.as_ref().map(SecretManager::store);
    let ready = Arc::new(Readiness::new(certs.clone(), cfg.cert_ready_timeout));
    let enrolled = Arc::new(RwLock::new(Vec::<String>::new()));
    let dump = config_dump(cfg.node.clone(), state.clone(), certs, enrolled.clone(), ready.clone());
    Admin {
        registry: Arc::new(registry),
        ready: ready.clone(),
        dump,
    }
    .start(Addrs {
        metrics: cfg.metrics_addr,
        readiness: cfg.readiness_addr,
        admin: cfg.admin_addr,
    })?;

    let data_plane = DataPlane {
        runtime: dp,
        mesh: mesh_ctx,
        state: state.clone(),
        metrics,
        refusals,
    };
    let inpod = InPod::new(&cfg, capture, orig, tracker.clone(), shutdown, data_plane);
    let mut node = NodeState {
        inpod,
        state,
        binding_metric,
        secrets,
        enrolled,
        trust_domain: cfg.trust_domain.clone(),
        current: LocalConfig::default(),
        digest_keys: std::hash::RandomState::new(),
        applied: None,
        settled: false,
        freed: false,
    };
    // The first model must be complete (a partial one would unenroll pods a
    // previous agent captured): the Kubernetes source waits for its lists.
    node.apply(source.first(&ready).await);
    ready.set_ready(true);
    tracing::info!(node = %cfg.node, enrolled = ?node.inpod.enrolled().collect::<Vec<_>>(), "agent ready");
    // Loading the eBPF objects and the first translation were the burst.
    mesh::alloc::release_freed();
    let mut startup = StartupCode::new(cfg.cert_ready_timeout);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.reload_interval);
    // After a stall, one tick late rather than a burst of back-to-back ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stepped_down = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if node.inpod.successor_gone() {
                    tracing::error!("the agent that took this node's capture over is gone (its programs stay pinned, nobody enrols pods): stepping down so this one is restarted and takes the capture back");
                    stepped_down = true;
                    break;
                }
                source.tick(&mut node, &ready);
                node.inpod.capture().keep_counts();
                node.release_freed();
                let secrets = node.secrets.as_ref();
                startup.release_when_over(|| secrets.is_none_or(|s| s.store().missing().is_empty()));
            }
            ev = source.event() => source.handle(ev, &mut node),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    ready.set_ready(false);
    // Stop accepting (queued connections migrate to a successor agent, if
    // any; HBONE peers get GOAWAY), let open connections finish, leave every
    // pin in place so capture and fail-closed stay in force.
    let _ = shutdown_tx.send(true);
    tracing::info!(open = tracker.open(), stats = ?node.inpod.capture().stats(), "draining");
    drop(node);
    let _ = stopped.send(Drain {
        tracker,
        // Stepping down, no agent accepts new connections until this one is
        // back: a short drain, then the restart.
        timeout: match stepped_down {
            true => cfg.drain_timeout.min(STEP_DOWN_DRAIN),
            false => cfg.drain_timeout,
        },
    });
    anyhow::ensure!(
        !stepped_down,
        "stepped down: the agent that superseded this one is gone; restart this one to take the capture back"
    );
    Ok(())
}

/// The code that only start-up runs, unmapped once start-up is over: the
/// agent is ready and its pods' first certificates are in (or
/// `cert_ready_timeout` passed). Most of it never runs again (flags,
/// configuration, loading the eBPF objects, the first CSRs), yet it held
/// most of an idle agent's RSS (see [`mesh::alloc::release_startup_code`]).
struct StartupCode {
    until: std::time::Instant,
    done: bool,
}

impl StartupCode {
    fn new(cert_ready_timeout: Duration) -> Self {
        Self {
            until: std::time::Instant::now() + cert_ready_timeout,
            done: false,
        }
    }

    /// Unmaps the start-up code once, the first time it is called with the
    /// certificates in or after the timeout; says whether it did now.
    fn release_when_over(&mut self, certs_in: impl FnOnce() -> bool) -> bool {
        if self.done || !(std::time::Instant::now() >= self.until || certs_in()) {
            return false;
        }
        self.done = true;
        mesh::alloc::startup_over();
        true
    }
}

/// Every proxied connection holds several descriptors: use all we may.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// The pods, workloads and identities this node serves.
struct NodeState {
    inpod: InPod,
    state: State,
    /// `mesh_agent_waypoint_bindings`.
    binding_metric: WaypointBindings,
    secrets: Option<SecretManager>,
    enrolled: Arc<RwLock<Vec<String>>>,
    trust_domain: String,
    /// What the capture follows of the model: [`node_part`] (with pods a
    /// CNI ADD enrolled ahead of it, see [`Self::enroll_now`]).
    current: LocalConfig,
    /// Keys of [`LocalConfig::workload_digest`].
    digest_keys: std::hash::RandomState,
    /// The digest of the last model `state` was built from; `None` when
    /// `state` lags `current` (a CNI ADD patched `current` only).
    applied: Option<u64>,
    /// The capture matches `current` (every pod enrolled, nothing to
    /// sweep): a retry has nothing to do. A diff of every pod of the node,
    /// done on each reload tick, held up the CNI ADDs behind it.
    settled: bool,
    /// A change was applied since the last [`Self::release_freed`].
    freed: bool,
}

impl NodeState {
    /// Makes the data plane match `model`.
    fn apply(&mut self, model: LocalConfig) {
        let digest = model.workload_digest(&self.digest_keys);
        let rebuild = self.applied != Some(digest);
        if rebuild {
            let before = self.state.snapshot();
            self.state.update(&model, &self.trust_domain);
            let after = self.state.snapshot();
            log_binding_changes(&before.bindings, &after.bindings);
            self.binding_metric.set(&after.bindings);
            self.applied = Some(digest);
            // Policies, labels or identities may have changed what is allowed.
            self.inpod.recheck_open_connections();
            self.freed = true;
        }
        let model = node_part(model, self.inpod.node());
        if rebuild || model != self.current {
            self.current = model;
            self.settled = false;
        }
        self.retry();
    }

    /// Hands what the last changes freed back to the kernel (at most once
    /// per reload tick: a burst of changes is one collect).
    fn release_freed(&mut self) {
        if std::mem::take(&mut self.freed) {
            mesh::alloc::release_freed();
        }
    }

    /// Enrolls what the current model wants (pods that failed before are
    /// retried) and fetches the identities of the enrolled pods.
    fn retry(&mut self) {
        if self.settled {
            return;
        }
        let applied = match self.inpod.apply(&self.current) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot apply configuration");
                false
            }
        };
        self.settled = applied && self.inpod.settled();
        self.publish_enrolled();
    }

    /// A CNI ADD: captures `spec`'s pod now, before the whole model is
    /// assembled again (O(pods of the cluster) per change; the kubelet
    /// waits on this). `None`: nothing done, the whole model decides (the
    /// pod is not captured here, one of its IPs is another workload's, it
    /// was enrolled already, or enrolling failed). `Some(true)`: the whole
    /// model must follow soon, because `State` does not know the pod as
    /// this workload yet (typically its IPs came from the CNI plugin, not
    /// the API): until it does, connections to it are refused (fail
    /// closed), never let through. `Some(false)`: the model listed the
    /// pod already and only its location is new, which `State` never reads.
    fn enroll_now(&mut self, spec: PodSpec, node: &str) -> Option<bool> {
        let key = spec.key();
        let taken = {
            let snap = self.state.snapshot();
            spec.ips
                .iter()
                .any(|ip| snap.workloads.get(&ip.to_canonical()).is_some_and(|w| *w.key != *key))
        };
        if taken || !self.current.captures(node, &spec) {
            return None;
        }
        match self.inpod.enroll_one(&spec) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(pod = %key, error = %e, "CNI ADD: cannot enroll ahead of the model; the model retries");
                return None;
            }
        }
        let known = self.current.upsert_pod(spec);
        if !known {
            self.applied = None;
        }
        self.publish_enrolled();
        Some(!known)
    }

    /// Whether pod `uid` is captured in the network namespace at `netns` (a
    /// CNI DEL's; empty or gone: no); `None`: it is not captured.
    fn captured_in(&self, uid: &str, netns: &str) -> Option<bool> {
        let cookie = self.inpod.netns_cookie(&cluster::kube::records::Uid::new(uid))?;
        let del = (!netns.is_empty())
            .then(|| Netns::open(std::path::Path::new(netns)).and_then(|n| n.cookie()).ok())
            .flatten();
        Some(del == Some(cookie))
    }

    /// A CNI DEL tore pod `uid`'s sandbox down: out of the capture now,
    /// before the whole model follows.
    fn tear_down(&mut self, uid: &str) {
        let uid = cluster::kube::records::Uid::new(uid);
        let before = self.current.pods.len();
        self.current.pods.retain(|p| p.uid.as_ref() != Some(&uid));
        if self.current.pods.len() != before {
            self.settled = false;
            self.retry();
        }
    }

    /// The enrolled pods' identities to the certificate fetcher, their keys
    /// to the config dump.
    fn publish_enrolled(&mut self) {
        if let Some(s) = &mut self.secrets {
            s.set_wanted(&self.inpod.identities());
        }
        *self.enrolled.write().unwrap_or_else(|e| e.into_inner()) = self.inpod.enrolled().map(str::to_string).collect();
    }
}

/// What of `model` the capture (`InPod`) and the CNI ADD path read: the
/// capture settings, the waypoints and the pods of `node`. The rest only
/// `State` reads, and it keeps what it needs: a second copy of every pod
/// of the cluster was a fifth of the agent's memory.
fn node_part(mut model: LocalConfig, node: &str) -> LocalConfig {
    model.pods.retain(|p| *p.node == *node);
    // Kept until the next change: without this the list kept the capacity
    // of every pod of the cluster (176 bytes each, the pages written).
    model.pods.shrink_to_fit();
    LocalConfig {
        services: Vec::new(),
        authorization_policies: Vec::new(),
        peer_authentications: Vec::new(),
        namespaces: Vec::new(),
        ..model
    }
}

/// One line per binding that appeared, changed or went away: a binding that
/// refuses traffic (or was meant to steer and does not) is never silent.
fn log_binding_changes(before: &Bindings, after: &Bindings) {
    for change in after.changes_from(before) {
        match change {
            Change::Set(b) if b.status == BindingStatus::Bound => tracing::info!(
                kind = b.kind.as_str(), object = %b.target, waypoint = %b.waypoint,
                source = ?b.source, status = b.status.as_str(), "waypoint binding"
            ),
            Change::Set(b) => tracing::warn!(
                kind = b.kind.as_str(), object = %b.target, waypoint = %b.waypoint, source = ?b.source,
                status = b.status.as_str(),
                traffic = if b.status.steers() { "refused" } else { "direct" },
                "waypoint binding"
            ),
            Change::Removed(b) => tracing::info!(
                kind = b.kind.as_str(), object = %b.target, waypoint = %b.waypoint,
                status = "Unbound", "waypoint binding"
            ),
        }
    }
}

enum Watched {
    File(Box<FileSource>),
    Kube(Box<KubeSource>),
}

/// Something the source needs handled in the main loop.
enum Event {
    Changed,
    Cni(CniEvent),
}

impl Watched {
    async fn first(&mut self, ready: &Readiness) -> LocalConfig {
        match self {
            Watched::File(f) => std::mem::take(&mut f.initial),
            Watched::Kube(k) => k.first(ready).await,
        }
    }

    async fn event(&mut self) -> Event {
        match self {
            Watched::File(_) => std::future::pending().await,
            Watched::Kube(k) => k.event().await,
        }
    }

    fn handle(&mut self, ev: Event, node: &mut NodeState) {
        if let Watched::Kube(k) = self {
            k.handle(ev, node);
        }
    }

    fn tick(&mut self, node: &mut NodeState, ready: &Readiness) {
        match self {
            Watched::File(f) => f.reload(node),
            Watched::Kube(k) => {
                ready.set_degraded(k.kube.health.problem());
                // Retry pods not enrolled yet; assemble the model again only
                // once a pod of this node that was not located is found now
                // (assembly is O(cluster): done every second while a node's
                // pods await their CNI ADDs, it held those ADDs up).
                if k.locate_unlocated() {
                    k.apply_model(node, k8s::Trigger::Discovery);
                } else {
                    node.retry();
                }
            }
        }
    }
}

/// The local enrolment file.
struct FileSource {
    /// The text last taken (the last good configuration is the node's).
    watch: FileWatch,
    /// The configuration read at start, until the main loop takes it.
    initial: LocalConfig,
}

impl FileSource {
    fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let watch = FileWatch::open(path).map_err(|source| crate::config::ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            initial: LocalConfig::parse(path, watch.text())?,
            watch,
        })
    }

    /// Re-reads the file (a change is taken once it has settled, see
    /// `FileWatch`); a bad file is reported and the last good configuration
    /// stays in force. Unchanged files still retry failed pods.
    fn reload(&mut self, node: &mut NodeState) {
        let path = self.watch.path().to_owned();
        let text = match self.watch.poll() {
            Ok(Polled::Taken(t)) => t,
            Ok(Polled::Nothing) => return node.retry(),
            Ok(Polled::RefusedEmpty) => {
                tracing::error!(path = %path.display(), "config file is empty; keeping the last good configuration (to unenroll every pod write `pods: []`)");
                return node.retry();
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read config; keeping the last good configuration");
                return;
            }
        };
        match LocalConfig::parse(&path, text) {
            Ok(new) => {
                node.apply(new);
                // Logged once applied: tests and operators wait on it.
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!(error = %e, "invalid configuration; keeping the last good configuration"),
        }
    }
}

/// The Kubernetes API (plus the node-local locator and the CNI socket).
struct KubeSource {
    kube: Kube,
    node: String,
    own_uid: Option<String>,
    locator: Locator,
    cni: Option<mpsc::Receiver<CniEvent>>,
    /// Last translation warnings, to log each once.
    warned: HashSet<String>,
    /// In-mesh pods of this node the last translation could not locate
    /// (UID and IPs).
    unlocated: Vec<(String, Vec<std::net::IpAddr>)>,
    /// The model's [`k8s::model::Model::pods_gone`] when the locator was
    /// last pruned.
    pods_gone: u64,
    /// The model's changes in batches of [`MODEL_BATCH`] (also a pod a CNI
    /// ADD enrolled ahead of the model, and sandboxes CNI DELs tore down).
    batches: cluster::kube::Batches,
    metrics: k8s::ModelMetrics,
}

impl KubeSource {
    async fn start(
        node: &str,
        k: &KubeSettings,
        registry: &mut prometheus_client::registry::Registry,
    ) -> anyhow::Result<Box<Self>> {
        let client = k8s::client(k.kubeconfig.as_deref()).await?;
        let kube = Kube::start(client, node);
        let cni = match &k.cni_socket {
            Some(path) => {
                let listener = k8s::cni::bind(path)
                    .with_context(|| format!("cannot listen on the CNI socket {}", path.display()))?;
                let (tx, rx) = mpsc::channel(64);
                let metrics = k8s::cni::CniMetrics::register(registry);
                tokio::spawn(k8s::cni::serve(
                    listener,
                    kube.clone(),
                    k.own_pod_uid.clone(),
                    tx,
                    metrics,
                ));
                tracing::info!(socket = %path.display(), "CNI socket listening");
                Some(rx)
            }
            None => None,
        };
        let discoverer = Discoverer {
            cgroup_root: k.cgroup_root.clone(),
            proc_root: k.proc_root.clone(),
            host_netns: k.host_netns.clone(),
            ..Discoverer::new(&k.cgroup_root)
        };
        let batches = cluster::kube::Batches::new(kube.cluster.changes().clone(), MODEL_BATCH);
        let metrics = k8s::ModelMetrics::register(registry);
        Ok(Box::new(Self {
            kube,
            node: node.to_string(),
            own_uid: k.own_pod_uid.clone(),
            locator: Locator::new(discoverer),
            cni,
            warned: HashSet::new(),
            unlocated: Vec::new(),
            pods_gone: 0,
            batches,
            metrics,
        }))
    }

    async fn first(&mut self, ready: &Readiness) -> LocalConfig {
        let mut last_log = std::time::Instant::now();
        while !self.kube.health.synced() {
            let problem = self.kube.health.problem();
            if last_log.elapsed() > Duration::from_secs(10) {
                tracing::warn!(problem = ?problem, "still waiting for the first complete list from the Kubernetes API; capture state of a previous agent stays in force");
                last_log = std::time::Instant::now();
            }
            ready.set_degraded(problem);
            let _ = tokio::time::timeout(Duration::from_millis(200), self.kube.changed()).await;
        }
        ready.set_degraded(None);
        tracing::info!("Kubernetes state listed");
        self.batches.reading_now();
        let started = std::time::Instant::now();
        let model = self.model();
        self.metrics.observe(k8s::Trigger::Start, started);
        model
    }

    /// The end of a batch of model changes, or a CNI request (at once).
    /// Cancel-safe (the main loop drops it when another branch wins): a
    /// seen change stays in its batch until that is delivered.
    async fn event(&mut self) -> Event {
        let cni = async {
            match &mut self.cni {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.batches.next() => Event::Changed,
            Some(ev) = cni => Event::Cni(ev),
        }
    }

    /// Whether a pod the last translation could not locate is found now
    /// (its netns appeared without a CNI ADD, as for pods started while
    /// no agent ran).
    fn locate_unlocated(&mut self) -> bool {
        let locator = &mut self.locator;
        self.unlocated
            .iter()
            .any(|(uid, ips)| locator.locate(uid, ips).is_some())
    }

    /// One pod's spec from the model, located (for a CNI ADD).
    fn pod_spec(&mut self, key: &str) -> Option<PodSpec> {
        let (namespace, name) = key.split_once('/')?;
        // Lent to `Local` while the locator is borrowed for `locate`.
        let cni_ips = std::mem::take(&mut self.locator.cni_ips);
        let locator = &mut self.locator;
        let mut locate = |uid: &str, ips: &[std::net::IpAddr]| locator.locate(uid, ips);
        let spec = self.kube.cluster.model().pod_spec(
            namespace,
            name,
            &mut k8s::model::Local {
                node: &self.node,
                own_uid: self.own_uid.as_deref(),
                cni_ips: &cni_ips,
                locate: &mut locate,
                node_addresses: &[],
            },
        );
        self.locator.cni_ips = cni_ips;
        spec
    }

    /// Assembles the whole model and makes the node match it. The read
    /// holds every change so far, so it closes the open batch too (for an
    /// ADD left to the model or a pod discovery found: the batch would only
    /// assemble the same model again).
    fn apply_model(&mut self, node: &mut NodeState, trigger: k8s::Trigger) {
        let started = std::time::Instant::now();
        self.batches.reading_now();
        node.apply(self.model());
        self.metrics.observe(trigger, started);
    }

    /// The model (and the locator for pods of this node).
    fn model(&mut self) -> LocalConfig {
        let cni_ips = std::mem::take(&mut self.locator.cni_ips);
        let mut warnings = Vec::new();
        let host_addresses = k8s::host_addresses(&self.locator.discoverer.host_netns).unwrap_or_else(|e| {
            warnings.push(format!(
                "cannot read the host's addresses ({e}): kubelet probes from them may be captured"
            ));
            Vec::new()
        });
        let node_addresses = self.kube.node_addresses(&host_addresses);
        let locator = &mut self.locator;
        let mut unlocated = Vec::new();
        let mut locate = |uid: &str, ips: &[std::net::IpAddr]| {
            let found = locator.locate(uid, ips);
            if found.is_none() {
                unlocated.push((uid.to_string(), ips.to_vec()));
            }
            found
        };
        let model = self.kube.cluster.model();
        let t = model.translate(Some(&mut k8s::model::Local {
            node: &self.node,
            own_uid: self.own_uid.as_deref(),
            cni_ips: &cni_ips,
            locate: &mut locate,
            node_addresses: &node_addresses,
        }));
        self.unlocated = unlocated;
        self.locator.cni_ips = cni_ips;
        // Forget pods that left the API (a set of every pod's UID: only
        // when one left since the last time).
        if model.pods_gone() != self.pods_gone {
            self.pods_gone = model.pods_gone();
            let uids: HashSet<&cluster::kube::records::Uid> =
                model.pods().map(|p| &p.uid).filter(|u| !u.is_empty()).collect();
            self.locator.retain(&uids);
        }
        drop(model);
        let now: HashSet<String> = t.warnings.into_iter().chain(warnings).collect();
        for w in now.difference(&self.warned) {
            tracing::warn!(warning = %w, "Kubernetes object not (fully) applied");
        }
        self.warned = now;
        t.model
    }

    fn handle(&mut self, ev: Event, node: &mut NodeState) {
        match ev {
            Event::Changed => self.apply_model(node, k8s::Trigger::Changes),
            Event::Cni(CniEvent::TornDown {
                key,
                uid,
                sandbox,
                netns,
                done,
            }) => {
                // The DEL's reply waits for this: the runtime frees the
                // pod's IPs once it has it.
                let outcome = self.cni_del(&key, &uid, &sandbox, &netns, node);
                let _ = done.send(outcome);
            }
            Event::Cni(CniEvent::Enroll {
                key,
                uid,
                sandbox,
                netns,
                ips,
                reply,
            }) => {
                let r = self.cni_add(&key, &uid, &sandbox, netns, ips, node);
                let _ = reply.send(r);
            }
        }
    }

    /// A CNI DEL of pod `uid`'s sandbox `sandbox` (in `netns`): out of the
    /// capture at once if that is the sandbox it is captured in; what was
    /// done, for the reply.
    fn cni_del(&mut self, key: &str, uid: &str, sandbox: &str, netns: &str, node: &mut NodeState) -> &'static str {
        let torn = match self.locator.remove(uid, sandbox) {
            k8s::TearDown::Removed => true,
            k8s::TearDown::OldSandbox => false,
            // No ADD of ours recorded its sandbox: the DEL tears the pod
            // down only when its netns is the one the pod is captured in.
            // Unsure (the netns is gone, or the pod is captured elsewhere),
            // it stays captured until the model drops it (fail closed): an
            // old sandbox's DEL must not leave a running pod uncaptured for
            // good.
            k8s::TearDown::Unrecorded => match node.captured_in(uid, netns) {
                Some(true) => {
                    self.locator.forget(uid);
                    true
                }
                Some(false) => false,
                None => {
                    tracing::debug!(pod = %key, sandbox = %sandbox, "CNI DEL of a pod not captured: nothing to do");
                    return "not captured";
                }
            },
        };
        if !torn {
            tracing::info!(pod = %key, sandbox = %sandbox, "CNI DEL of a sandbox the pod no longer runs in: ignored");
            return "another sandbox of the pod: ignored";
        }
        // Out of the capture at once (O(pods of the node)): a new pod may
        // take its IPs as soon as we reply. The model follows with the next
        // batch (at most 50 ms on): a node stopping its pods sends a burst
        // of DELs, and each assembly is O(cluster) and holds up the ADDs
        // behind it.
        node.tear_down(uid);
        self.batches.follow();
        match node.inpod.netns_cookie(&cluster::kube::records::Uid::new(uid)) {
            None => "out of the capture",
            // `InPod::apply` failed (logged); it is retried.
            Some(_) => "out of the model; the capture follows (see the agent's logs)",
        }
    }

    /// A CNI ADD: locates the pod in its sandbox and captures it, ahead of
    /// the model where it can; the reply says whether it is captured.
    fn cni_add(
        &mut self,
        key: &str,
        uid: &str,
        sandbox: &str,
        netns: std::path::PathBuf,
        ips: Vec<std::net::IpAddr>,
        node: &mut NodeState,
    ) -> mesh_cni::proto::Reply {
        if self.locator.deleted(uid, sandbox) {
            // It waited for the pod to reach the API while the runtime gave
            // up and tore the sandbox down: never locate the pod there.
            return k8s::cni::failure(format!(
                "cannot enroll {key}: its sandbox {sandbox} was torn down (CNI DEL) before this ADD reached the agent; the kubelet makes a new one"
            ));
        }
        if let Err(e) = self.locator.add(uid, sandbox, netns, ips) {
            return k8s::cni::failure(format!("cannot enroll {key}: {e}"));
        }
        match self.pod_spec(key).and_then(|spec| node.enroll_now(spec, &self.node)) {
            Some(model_follows) => {
                // Located now: a reload tick must not take it for a pod
                // discovery found and re-assemble the model.
                self.unlocated.retain(|(u, _)| *u != uid);
                // The model follows with the next batch of changes (at most
                // 50 ms on): a burst of ADDs, as a node starting its pods
                // sends, is modelled once.
                if model_follows {
                    self.batches.follow();
                }
                tracing::info!(pod = %key, ahead_of_model = true, model_follows, "pod enrolled before start (CNI)");
                k8s::cni::ok(true, "captured")
            }
            None => self.enroll_with_model(key, node),
        }
    }

    /// A CNI ADD the fast path left to the whole model: it enrolls or
    /// says why not.
    fn enroll_with_model(&mut self, key: &str, node: &mut NodeState) -> mesh_cni::proto::Reply {
        self.apply_model(node, k8s::Trigger::CniAdd);
        match node.inpod.enrolled().any(|k| k == key) {
            true => {
                tracing::info!(pod = %key, "pod enrolled before start (CNI)");
                k8s::cni::ok(true, "captured")
            }
            false => k8s::cni::failure(format!(
                "cannot enroll {key}: {}",
                node.inpod.failure(key).unwrap_or("it is not in this node's model")
            )),
        }
    }
}

/// The admin `/config_dump`: workloads, policies, enrolled pods and
/// certificates with their expiry (never keys).
fn config_dump(
    node: String,
    state: State,
    certs: Option<CertStore>,
    enrolled: Arc<RwLock<Vec<String>>>,
    ready: Arc<Readiness>,
) -> DumpFn {
    Arc::new(move || {
        let snap = state.snapshot();
        let mut workloads: Vec<serde_json::Value> = snap
            .workloads
            .iter()
            .map(|(ip, w)| {
                serde_json::json!({
                    "ip": ip, "pod": &*w.key, "identity": w.identity.to_string(), "labels": *w.labels,
                    "tunnel": if w.hbone { "HBONE" } else { "NONE" }, "waypoint": w.waypoint.as_deref(),
                    "waypointEnforced": w.enforce_waypoint && w.waypoint.as_ref().is_some_and(|b| b.status.steers()),
                })
            })
            .collect();
        workloads.sort_by_key(|w| w["ip"].to_string());
        serde_json::json!({
            "node": node,
            "degraded": ready.degraded(),
            "enrolled": *enrolled.read().unwrap_or_else(|e| e.into_inner()),
            "workloads": workloads,
            "services": snap.services.iter().map(|s| serde_json::json!({
                "hostname": s.spec.hostname(), "vips": s.spec.vips, "ports": s.spec.ports,
                "endpoints": &*s.endpoints, "loadBalancing": s.spec.load_balancing, "waypoint": s.waypoint,
            })).collect::<Vec<_>>(),
            "waypoints": snap.bindings.waypoints.values().collect::<Vec<_>>(),
            "bindings": snap.bindings.all().collect::<Vec<_>>(),
            "authorizationPolicies": snap.policies,
            "peerAuthentications": snap.peer_auths,
            "certificates": certs.as_ref().map(CertStore::dump).unwrap_or_default(),
            "certificatesMissing": certs.as_ref().map(CertStore::missing).unwrap_or_default(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_code_is_released_once_when_the_certificates_are_in_or_time_is_up() {
        let mut waiting = StartupCode::new(Duration::from_secs(3600));
        assert!(!waiting.release_when_over(|| false), "released before the certificates");
        assert!(
            waiting.release_when_over(|| true),
            "not released with the certificates in"
        );
        assert!(!waiting.release_when_over(|| true), "released twice");
        // A CA that never answers does not keep it mapped for good.
        let mut overdue = StartupCode::new(Duration::ZERO);
        assert!(overdue.release_when_over(|| false), "not released after the timeout");
    }

    const MODEL: &str = r#"
capture:
  excludePorts: [22]
pods:
  - {name: client, namespace: default, node: node1, netns: /run/netns/c, cgroup: /sys/fs/cgroup/c, ips: [10.1.1.11], labels: {app: client}}
  - name: wp
    namespace: default
    node: node1
    netns: /run/netns/wp
    cgroup: /sys/fs/cgroup/wp
    ips: [10.1.1.12]
    labels: {gateway.networking.k8s.io/gateway-name: wp}
  - {name: server, namespace: default, node: node2, ips: [10.1.2.11], labels: {app: server}}
services:
  - {name: web, namespace: default, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: server}}
authorizationPolicies:
  - {name: deny, namespace: default, action: DENY}
waypoints:
  - {name: wp, namespace: default}
"#;

    /// `InPod` and the CNI ADD path must decide alike from the node's part
    /// as from the whole model: a waypoint's pod is never captured.
    #[test]
    fn node_part_keeps_what_the_capture_reads() {
        let model = LocalConfig::parse(std::path::Path::new("model.yaml"), MODEL).unwrap();
        let part = node_part(model.clone(), "node1");
        let keys = |c: &LocalConfig| c.pods_on("node1").map(PodSpec::key).collect::<Vec<_>>();
        assert_eq!(keys(&part), ["default/client"]);
        assert_eq!(keys(&part), keys(&model));
        for pod in &model.pods {
            assert_eq!(
                part.captures("node1", pod),
                model.captures("node1", pod),
                "{}",
                pod.key()
            );
        }
        assert_eq!(part.capture, model.capture);
        assert_eq!(part.pods.len(), 2, "only node1's pods: {:?}", part.pods);
        assert!(part.services.is_empty() && part.authorization_policies.is_empty());
    }

    /// The part is kept until the next change: it must not keep the room
    /// of every pod of the cluster (bench-kube: 0.3 MB per 1,000 pods).
    #[test]
    fn node_part_keeps_no_room_for_the_clusters_pods() {
        let mut model = LocalConfig::parse(std::path::Path::new("model.yaml"), MODEL).unwrap();
        let remote = model.pods.iter().find(|p| &*p.node == "node2").unwrap().clone();
        model.pods.extend(std::iter::repeat_n(remote, 1000));
        let part = node_part(model, "node1");
        assert_eq!(part.pods.len(), 2);
        assert!(part.pods.capacity() < 10, "room for {} pods kept", part.pods.capacity());
    }
}
