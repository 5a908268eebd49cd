//! The Kubernetes source, one for every binary that needs the cluster
//! model (the agent; the waypoint): watches over the API (kube-rs) whose
//! events update one incremental [`model::Model`].
//!
//! ```ignore
//! let client = cluster::kube::client(None).await?;
//! let watch = cluster::kube::ClusterWatch::start(client);
//! while !watch.health.synced() { watch.changed().await }
//! let model = watch.model().translate(None).model; // a LocalConfig
//! ```
//!
//! Watches (all list+watch, resumed from the last resourceVersion, re-listed
//! on 410 Gone, retried with backoff): Namespaces, Pods cluster-wide (every
//! mesh pod's IP, identity and node: an agent tunnels to it), Services,
//! EndpointSlices, Istio AuthorizationPolicy and PeerAuthentication, and
//! Gateway API Gateways (waypoints; like Istio's CRDs optional: not
//! installed is an empty list). Each event is projected into a compact
//! record at once ([`records`]); no k8s object is kept, and Pods and
//! EndpointSlices are decoded with only the fields their records read
//! ([`slim`]). A binary adds
//! watches of its own (the agent: its Node) with [`ClusterWatch::watch`],
//! sharing health and change notification.
pub mod crd;
pub mod gateway;
pub mod model;
pub mod records;
pub mod slim;

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ::kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::routes::{store::Kind as RouteKind, Document};
use model::{Change, Model};
use records::{GatewayRecord, NamespaceRecord, PodRecord, PolicyRecord, Record, ServiceRecord, SliceRecord};

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
            let kc = ::kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => ::kube::Config::infer()
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
    /// Synced before (the model holds the last good state), failing now.
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

/// Which watches [`ClusterWatch::start_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watches {
    /// Everything the model translates (the agent, the waypoint).
    All,
    /// What waypoint binding reads ([`crate::waypoint::Bindings`]):
    /// namespaces, pods, services, endpointslices and gateways, not Istio's
    /// policies, so a reader of binding status (the waypoint controller)
    /// needs no RBAC on them. The model's policy lists stay empty.
    Bindings,
}

/// The cluster watches and the model they keep.
#[derive(Clone)]
pub struct ClusterWatch {
    model: Arc<Mutex<Model>>,
    pub health: Arc<Health>,
    changed: Changes,
    client: Client,
}

/// Whether the model changed since a reader last read it. A watch says so
/// after it has applied a change to the model; readers translate the model
/// once per batch of changes (a re-list, a rollout or a node starting its
/// pods is a burst of them).
#[derive(Clone, Debug, Default)]
pub struct Changes(Arc<Notify>);

impl Changes {
    /// A watch applied a change to the model.
    fn notify(&self) {
        self.0.notify_one();
    }

    /// Resolves when something changed since the last call, or since the
    /// last [`Changes::reading`] (cancel-safe: a change stays pending until
    /// a call completes).
    pub async fn changed(&self) {
        self.0.notified().await;
    }

    /// The caller reads the model now, which holds every change notified
    /// so far (a watch notifies after it applies): a notification still
    /// pending would only start another batch, of nothing. Call it at the
    /// end of a batch's wait, before reading the model (not after: a
    /// change applied in between would be dropped).
    pub fn reading(&self) {
        use futures::FutureExt;
        let _ = self.0.notified().now_or_never();
    }
}

/// The model's changes in batches, for a reader that translates the model
/// once per batch: the first change opens a window for the rest of a burst
/// to land, and [`Batches::next`] resolves at its end. Read the model right
/// after: it holds every change notified so far, and the next batch starts
/// with the next change.
#[derive(Debug)]
pub struct Batches {
    changes: Changes,
    window: Duration,
    /// When the open window opened.
    since: Option<tokio::time::Instant>,
}

impl Batches {
    pub fn new(changes: Changes, window: Duration) -> Self {
        Self {
            changes,
            window,
            since: None,
        }
    }

    /// Opens a window with no change from the watches, if none is open: the
    /// reader changed something the model must follow (the agent: a pod a
    /// CNI ADD enrolled ahead of the model).
    pub fn follow(&mut self) {
        self.since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// The reader reads the model now, outside a batch (for a reason of its
    /// own): that read holds every change so far, so the open window, if
    /// any, and a pending notification would only bring the same model
    /// again (a whole translation, O(cluster), for nothing). Call it before
    /// reading the model, as [`Changes::reading`].
    pub fn reading_now(&mut self) {
        self.since = None;
        self.changes.reading();
    }

    /// Resolves at the end of the next batch. Cancel-safe, for `select!`
    /// loops: a change seen stays in the open window until a call
    /// completes.
    pub async fn next(&mut self) {
        loop {
            match self.since {
                None => {
                    self.changes.changed().await;
                    self.since = Some(tokio::time::Instant::now());
                }
                Some(t) => {
                    tokio::time::sleep_until(t + self.window).await;
                    self.since = None;
                    // Changes that landed meanwhile are in the model read
                    // now: their notification would start a batch of nothing.
                    self.changes.reading();
                    return;
                }
            }
        }
    }
}

impl ClusterWatch {
    /// Starts every cluster watch on the current runtime.
    pub fn start(client: Client) -> Self {
        Self::start_with(client, Watches::All)
    }

    /// Starts the cluster watches `watches` names on the current runtime.
    pub fn start_with(client: Client, watches: Watches) -> Self {
        let w = Self {
            model: Arc::default(),
            health: Arc::default(),
            changed: Changes::default(),
            client: client.clone(),
        };
        w.watch_model(
            "namespaces",
            Api::all(client.clone()),
            |n| NamespaceRecord::from_k8s(&n),
            Model::apply_namespaces,
        );
        w.watch_model(
            "pods",
            Api::all(client.clone()),
            |p: slim::Pod| PodRecord::from_slim(&p),
            Model::apply_pods,
        );
        w.watch_model(
            "services",
            Api::all(client.clone()),
            |s| ServiceRecord::from_k8s(&s),
            Model::apply_services,
        );
        w.watch_model(
            "endpointslices",
            Api::all(client.clone()),
            |s: slim::EndpointSlice| SliceRecord::from_slim(&s),
            Model::apply_slices,
        );
        if watches == Watches::All {
            w.watch_istio::<crd::AuthorizationPolicy>("authorizationpolicies", Model::apply_authorization_policies);
            w.watch_istio::<crd::PeerAuthentication>("peerauthentications", Model::apply_peer_authentications);
        }
        w.watch_model(
            "gateways",
            Api::all(client.clone()),
            |g| GatewayRecord::from_k8s(&g),
            Model::apply_gateways,
        );
        tokio::spawn(probe_while_failing(client, w.health.clone()));
        w
    }

    /// Resolves when something changed since the last call (cancel-safe:
    /// a change stays pending until a call completes).
    pub async fn changed(&self) {
        self.changed.changed().await;
    }

    /// The model's change notifications, to wait for batches of changes.
    pub fn changes(&self) -> &Changes {
        &self.changed
    }

    /// The model, locked: hold it only to read or translate, never across
    /// an await.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one more watch sharing health and change notification:
    /// `project` makes each object a record (`None`: skipped), `sink` takes
    /// the changes.
    pub fn watch<K, R>(
        &self,
        name: &'static str,
        api: Api<K>,
        cfg: watcher::Config,
        project: fn(K) -> Option<R>,
        sink: impl FnMut(Change<R>) + Send + 'static,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        R: Send + 'static,
    {
        self.health.ok(name, false);
        tokio::spawn(
            self.runner(name)
                .run(async move { api }, cfg, project, |_: &mut R| {}, sink),
        );
    }

    /// A watch of the model's own: records interned as they arrive.
    fn watch_model<K, R>(
        &self,
        name: &'static str,
        api: Api<K>,
        project: fn(K) -> Option<R>,
        apply: fn(&mut Model, Change<R>),
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        R: Record + Send + 'static,
    {
        self.health.ok(name, false);
        let (listed, sink) = (interning(&self.model), to_model(&self.model, apply));
        tokio::spawn(
            self.runner(name)
                .run(async move { api }, watcher::Config::default(), project, listed, sink),
        );
    }

    /// An Istio resource, in the version the API serves (v1, else v1beta1).
    fn watch_istio<K>(&self, name: &'static str, apply: fn(&mut Model, Change<PolicyRecord<K>>))
    where
        K: Resource<DynamicType = crd::Version> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        self.health.ok(name, false);
        let client = self.client.clone();
        let api = async move {
            let version = istio_version(&client, &K::plural(&crd::Version::default()), name).await;
            Api::all_with(client, &version)
        };
        // Policies share no strings: nothing to intern.
        let (listed, sink) = (|_: &mut PolicyRecord<K>| {}, to_model(&self.model, apply));
        tokio::spawn(
            self.runner(name)
                .run(api, watcher::Config::default(), PolicyRecord::from_k8s, listed, sink),
        );
    }

    /// Route objects of one kind (HTTPRoute, VirtualService,
    /// DestinationRule) in the first version the API serves, as the
    /// documents a routes file holds. Only the waypoint watches them.
    pub fn watch_routes(&self, kind: RouteKind, sink: impl FnMut(Change<Document>) + Send + 'static) {
        let name = kind.plural();
        self.health.ok(name, false);
        let client = self.client.clone();
        let api = async move {
            let version = discover_version(&client, kind.group(), kind.versions(), kind.plural(), name).await;
            let gvk = ::kube::api::GroupVersionKind::gvk(kind.group(), version, kind.as_str());
            let ar = ::kube::api::ApiResource::from_gvk_with_plural(&gvk, kind.plural());
            Api::<::kube::api::DynamicObject>::all_with(client, &ar)
        };
        let project: fn(::kube::api::DynamicObject) -> Option<Document> = match kind {
            RouteKind::HttpRoute => |o| Some(route_document(o, RouteKind::HttpRoute)),
            RouteKind::VirtualService => |o| Some(route_document(o, RouteKind::VirtualService)),
            RouteKind::DestinationRule => |o| Some(route_document(o, RouteKind::DestinationRule)),
        };
        tokio::spawn(
            self.runner(name)
                .run(api, watcher::Config::default(), project, |_: &mut Document| {}, sink),
        );
    }

    fn runner(&self, name: &'static str) -> Runner {
        Runner {
            name,
            health: self.health.clone(),
            changed: self.changed.clone(),
        }
    }
}

/// A route object as a document (list items may lack apiVersion and kind:
/// the watched resource's are used then).
fn route_document(o: ::kube::api::DynamicObject, kind: RouteKind) -> Document {
    let (api_version, kind_name) = match &o.types {
        Some(t) => (t.api_version.clone(), t.kind.clone()),
        None => (
            format!("{}/{}", kind.group(), kind.versions()[0]),
            kind.as_str().to_string(),
        ),
    };
    Document {
        api_version,
        kind: kind_name,
        metadata: crate::routes::store::Meta {
            name: o.metadata.name.unwrap_or_default(),
            namespace: o.metadata.namespace,
            creation_timestamp: o.metadata.creation_timestamp.map(|t| t.0.to_string()),
        },
        spec: o.data.get("spec").cloned().unwrap_or_default(),
    }
}

/// Applies a watch's changes to the model with `f`.
fn to_model<R: 'static>(
    model: &Arc<Mutex<Model>>,
    f: fn(&mut Model, Change<R>),
) -> impl FnMut(Change<R>) + Send + 'static {
    let model = model.clone();
    move |c| f(&mut model.lock().unwrap_or_else(|e| e.into_inner()), c)
}

/// Interns each record of a list as it arrives ([`Model::intern`]), unless
/// the model is busy (a translation holds it): the record is interned when
/// the list is applied then, and a list never waits on a translation.
fn interning<R: Record + 'static>(model: &Arc<Mutex<Model>>) -> impl FnMut(&mut R) + Send + 'static {
    let model = model.clone();
    move |r| match model.try_lock() {
        Ok(mut m) => m.intern(r),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().intern(r),
        Err(std::sync::TryLockError::WouldBlock) => {}
    }
}

/// One watch event in the model's terms; whether the model changed. A
/// (re-)list collects its records (each through `listed` as it arrives)
/// and hands them over whole when it is done.
fn on_event<K, R>(
    ev: watcher::Event<K>,
    listing: &mut Vec<R>,
    project: fn(K) -> Option<R>,
    listed: &mut impl FnMut(&mut R),
    sink: &mut impl FnMut(Change<R>),
) -> bool {
    match ev {
        watcher::Event::Init => {
            listing.clear();
            false
        }
        watcher::Event::InitApply(o) => {
            listing.extend(project(o).map(|mut r| {
                listed(&mut r);
                r
            }));
            false
        }
        watcher::Event::InitDone => {
            sink(Change::Relisted(std::mem::take(listing)));
            true
        }
        watcher::Event::Apply(o) => {
            if let Some(r) = project(o) {
                sink(Change::Upsert(r));
            }
            true
        }
        watcher::Event::Delete(o) => {
            if let Some(r) = project(o) {
                sink(Change::Delete(r));
            }
            true
        }
    }
}

struct Runner {
    name: &'static str,
    health: Arc<Health>,
    changed: Changes,
}

impl Runner {
    async fn run<K, R>(
        self,
        api: impl std::future::Future<Output = Api<K>>,
        cfg: watcher::Config,
        project: fn(K) -> Option<R>,
        mut listed: impl FnMut(&mut R),
        mut sink: impl FnMut(Change<R>),
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let stream = watcher(api.await, cfg).default_backoff();
        futures::pin_mut!(stream);
        let mut logged = None::<String>;
        // A (re-)list in progress: records arrive one by one and replace
        // the model's at the end, so a re-list never shows a partial state.
        let mut listing = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    let done = matches!(ev, watcher::Event::InitDone);
                    if logged.take().is_some() || done {
                        tracing::info!(watch = self.name, "watch {}", if done { "listed" } else { "resumed" });
                    }
                    self.health.ok(self.name, done);
                    if on_event(ev, &mut listing, project, &mut listed, &mut sink) {
                        self.changed.notify();
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
                        self.changed.notify();
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
pub async fn served_version(client: &Client, plural: &str) -> Result<Option<crd::Version>, ::kube::Error> {
    Ok(first_served(client, crd::GROUP, crd::VERSIONS, plural)
        .await?
        .map(crd::Version))
}

/// The first of `versions` of `group` in which the API serves `plural`.
pub async fn first_served(
    client: &Client,
    group: &str,
    versions: &[&'static str],
    plural: &str,
) -> Result<Option<&'static str>, ::kube::Error> {
    for v in versions {
        match client.list_api_group_resources(&format!("{group}/{v}")).await {
            Ok(list) if list.resources.iter().any(|r| r.name == plural) => return Ok(Some(v)),
            Ok(_) => {}
            Err(::kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Asks discovery until it answers (backing off to 30 s), and logs the
/// choice; the first version when none is served (the watch then reports
/// the resource as not installed, and picks it up if it is).
async fn discover_version(
    client: &Client,
    group: &str,
    versions: &[&'static str],
    plural: &str,
    watch: &'static str,
) -> &'static str {
    let mut delay = Duration::from_millis(500);
    let mut warned = false;
    loop {
        match first_served(client, group, versions, plural).await {
            Ok(Some(v)) => {
                tracing::info!(watch, version = v, "reading {group}/{v} {plural}");
                return v;
            }
            Ok(None) => {
                tracing::info!(
                    watch,
                    "{plural}.{group} is served in none of {versions:?}; watching {} in case it is installed",
                    versions[0]
                );
                return versions[0];
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

/// An Istio security resource's version.
async fn istio_version(client: &Client, plural: &str, watch: &'static str) -> crd::Version {
    crd::Version(discover_version(client, crd::GROUP, crd::VERSIONS, plural, watch).await)
}

fn not_installed(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(::kube::Error::Api(s)) if s.is_not_found())
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

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;
    use crate::kube::records::NamespaceRecord;

    /// A burst of changes is one batch: changes that land while a batch
    /// waits are in the model read at its end, so they start no second
    /// batch (which would translate the same model again, and hold up a
    /// CNI ADD behind it); a change after the batch starts the next; a
    /// wait dropped mid-window (a `select!` loop's other branch won) keeps
    /// its window; a reader's own change opens one; and a read outside the
    /// batches closes it.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_batch() {
        use tokio::time::{timeout, Instant};
        const WINDOW: Duration = Duration::from_millis(50);
        const LONG: Duration = Duration::from_secs(1);
        let changes = Changes::default();
        let mut batches = Batches::new(changes.clone(), WINDOW);
        changes.notify();
        let start = Instant::now();
        {
            let batch = batches.next();
            tokio::pin!(batch);
            assert!(futures::poll!(batch.as_mut()).is_pending(), "no window");
            changes.notify();
            changes.notify();
            batch.await;
        }
        assert_eq!(start.elapsed(), WINDOW, "not one window from the first change");
        assert!(
            timeout(LONG, batches.next()).await.is_err(),
            "a second batch of the same changes"
        );

        changes.notify();
        let start = Instant::now();
        assert!(
            timeout(WINDOW / 2, batches.next()).await.is_err(),
            "a batch before its window ended"
        );
        timeout(LONG, batches.next())
            .await
            .expect("a change after the batch started none");
        assert_eq!(start.elapsed(), WINDOW, "the window of a dropped wait was not kept");

        let start = Instant::now();
        batches.follow();
        timeout(LONG, batches.next())
            .await
            .expect("the reader's own change opened no window");
        assert_eq!(start.elapsed(), WINDOW);

        // A read outside a batch covers the open window and what is
        // pending; a change after it starts a batch as usual.
        changes.notify();
        {
            let batch = batches.next();
            tokio::pin!(batch);
            assert!(futures::poll!(batch.as_mut()).is_pending());
        }
        batches.follow();
        changes.notify();
        batches.reading_now();
        assert!(
            timeout(LONG, batches.next()).await.is_err(),
            "a batch of changes a read outside the batches held"
        );
        changes.notify();
        timeout(LONG, batches.next())
            .await
            .expect("a change after an outside read started no batch");
    }

    fn ns(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn project(n: Namespace) -> Option<NamespaceRecord> {
        NamespaceRecord::from_k8s(&n)
    }

    fn names(rs: &[NamespaceRecord]) -> Vec<&str> {
        rs.iter().map(|r| &*r.key.name).collect()
    }

    #[test]
    fn a_list_passes_each_record_through_listed_and_reaches_the_model_whole() {
        let mut listing = Vec::new();
        let mut seen = Vec::new();
        let mut sunk = Vec::new();
        let mut listed = |r: &mut NamespaceRecord| seen.push(r.key.name.to_string());
        let mut sink = |c: Change<NamespaceRecord>| sunk.push(c);
        let events = [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("a")),
            watcher::Event::InitApply(ns("b")),
        ];
        for ev in events {
            assert!(
                !on_event(ev, &mut listing, project, &mut listed, &mut sink),
                "a partial list changed the model"
            );
        }
        assert!(on_event(
            watcher::Event::InitDone,
            &mut listing,
            project,
            &mut listed,
            &mut sink
        ));
        assert!(on_event(
            watcher::Event::Apply(ns("c")),
            &mut listing,
            project,
            &mut listed,
            &mut sink
        ));
        assert!(on_event(
            watcher::Event::Delete(ns("a")),
            &mut listing,
            project,
            &mut listed,
            &mut sink
        ));
        assert_eq!(seen, ["a", "b"], "listed once per listed record, and only those");
        assert!(listing.is_empty());
        match &sunk[..] {
            [Change::Relisted(l), Change::Upsert(c), Change::Delete(a)] => {
                assert_eq!(names(l), ["a", "b"]);
                assert_eq!((&*c.key.name, &*a.key.name), ("c", "a"));
            }
            other => panic!("sunk {} changes, not a list, an upsert and a delete", other.len()),
        }
    }

    #[test]
    fn a_relist_starts_over() {
        let mut listing = Vec::new();
        let mut sunk = Vec::new();
        let mut sink = |c: Change<NamespaceRecord>| sunk.push(c);
        for ev in [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("old")),
            watcher::Event::Init,
            watcher::Event::InitApply(ns("new")),
            watcher::Event::InitDone,
        ] {
            on_event(ev, &mut listing, project, &mut |_| {}, &mut sink);
        }
        match &sunk[..] {
            [Change::Relisted(l)] => assert_eq!(names(l), ["new"]),
            other => panic!("sunk {} changes", other.len()),
        }
    }
}
