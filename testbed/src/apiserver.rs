//! A stand-in for the Kubernetes API server, for tests (no real one can run
//! on these machines). It keeps objects as the JSON the real types
//! serialize to (tests build them with k8s-openapi, never by hand) and
//! serves what the agent and the CA use:
//!
//! * list (`GET /api/v1/pods`, `/apis/<group>/<version>/...`, namespaced or
//!   not) with a `resourceVersion`, field selectors (`metadata.name`,
//!   `metadata.namespace`, `spec.nodeName`) and equality label selectors;
//! * watch (`?watch=true`): the history after the given resourceVersion,
//!   then live events, BOOKMARKs when asked for, `timeoutSeconds`, and an
//!   ERROR 410 Gone event when the version was compacted away;
//! * get of one object, `GET /version`, `GET /apis/<group>/<version>`
//!   (the resources a version serves), and TokenReview create with the
//!   real API server's rules for service-account tokens ([`SaToken`]);
//! * a CRD served under a chosen set of versions
//!   ([`ApiServer::serve_versions`]), one stored object seen under each;
//! * [`ApiServer::stop`] / [`ApiServer::start_again`] (same address) and
//!   [`ApiServer::compact`] to force re-lists;
//! * writes as a controller makes them ([`writes`]): server-side apply
//!   (`PATCH` with `application/apply-patch+yaml`, a field manager, `force`),
//!   the `status` subresource, and `DELETE` with the garbage collector's
//!   handling of ownerReferences (background, foreground, orphan);
//! * a log of every request (verb, group, resource), so RBAC rules can be
//!   compared with what the code really asks for (including the implicit
//!   `create` of an apply that creates, and `bind` on the ClusterRole a
//!   binding names, as kube-apiserver's authorizer checks them).
mod writes;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};
pub use writes::Propagation;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

type Body = BoxBody<Bytes, Infallible>;

/// Object metadata for test objects: namespace (None: cluster-scoped), name, labels.
pub fn meta(
    ns: Option<&str>,
    name: &str,
    labels: &[(&str, &str)],
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        namespace: ns.map(str::to_string),
        name: Some(name.to_string()),
        labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

/// A resource the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Res {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Writes to the object leave `status` alone; `.../status` writes only it.
    status: bool,
}

const RESOURCES: &[Res] = &[
    with_status(res("", "v1", "namespaces", "Namespace", false)),
    res("", "v1", "nodes", "Node", false),
    res("", "v1", "pods", "Pod", true),
    with_status(res("", "v1", "services", "Service", true)),
    res("", "v1", "serviceaccounts", "ServiceAccount", true),
    res("", "v1", "configmaps", "ConfigMap", true),
    res("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true),
    with_status(res("apps", "v1", "deployments", "Deployment", true)),
    with_status(res("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", true)),
    res("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
    res(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    res("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
    with_status(res("gateway.networking.k8s.io", "v1", "gateways", "Gateway", true)),
    with_status(res("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", true)),
    res(
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
    ),
    res(
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        true,
    ),
    // Istio's networking CRDs: v1, v1beta1 and v1alpha3 (one schema).
    res("networking.istio.io", "v1", "virtualservices", "VirtualService", true),
    res(
        "networking.istio.io",
        "v1beta1",
        "virtualservices",
        "VirtualService",
        true,
    ),
    res(
        "networking.istio.io",
        "v1alpha3",
        "virtualservices",
        "VirtualService",
        true,
    ),
    res("networking.istio.io", "v1", "destinationrules", "DestinationRule", true),
    res(
        "networking.istio.io",
        "v1beta1",
        "destinationrules",
        "DestinationRule",
        true,
    ),
    res(
        "networking.istio.io",
        "v1alpha3",
        "destinationrules",
        "DestinationRule",
        true,
    ),
    // Istio serves its security CRDs as v1 and v1beta1 (same schema);
    // older releases serve only v1beta1.
    res(
        "security.istio.io",
        "v1beta1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
    ),
    res(
        "security.istio.io",
        "v1beta1",
        "peerauthentications",
        "PeerAuthentication",
        true,
    ),
];

const fn res(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Res {
    Res {
        group,
        version,
        plural,
        kind,
        namespaced,
        status: false,
    }
}

const fn with_status(r: Res) -> Res {
    Res { status: true, ..r }
}

impl Res {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn of(api_version: &str, kind: &str) -> Option<&'static Res> {
        RESOURCES
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
    }

    /// The same resource in another version (one stored object for all).
    fn same(&self, other: &Res) -> bool {
        self.group == other.group && self.plural == other.plural
    }

    /// `object` as served in this version: only apiVersion changes (a CRD
    /// without a conversion webhook, as Istio's).
    fn present(&self, mut object: Value) -> Value {
        if self.group.is_empty() {
            return object;
        }
        object["apiVersion"] = json!(self.api_version());
        object
    }
}

/// A service-account token as the real API server minted it; TokenReview
/// checks it as kube-apiserver does (kubernetes `pkg/serviceaccount/jwt.go`,
/// `claims.go` and `pkg/registry/authentication/tokenreview/storage.go`):
/// * the token's audiences must intersect the requested ones (empty
///   `spec.audiences`: the API server's own, `--api-audiences`, by default
///   its issuer); `status.audiences` is that intersection; a legacy
///   Secret-based token has no audience and counts as issued for the API
///   server's audiences only;
/// * an expired token, or one bound to a pod that is gone or was
///   re-created under another UID, is not authenticated;
/// * a pod-bound token carries the extras `authentication.kubernetes.io/
///   pod-name`, `pod-uid`, from 1.30 `node-name`, `node-uid`, and
///   `credential-id` (`JTI=<id>`).
#[derive(Debug, Clone, Default)]
pub struct SaToken {
    pub namespace: String,
    pub service_account: String,
    /// `aud`; empty for a legacy token.
    pub audiences: Vec<String>,
    pub expires: Option<std::time::SystemTime>,
    /// (name, uid) of the pod the token is bound to.
    pub pod: Option<(String, String)>,
    /// (name, uid) of the pod's node; None as from an API server before
    /// 1.30, which put no node claims in pod-bound tokens.
    pub node: Option<(String, String)>,
}

impl SaToken {
    /// A projected token of a pod (what kubelet mounts), valid for an hour.
    pub fn bound(namespace: &str, sa: &str, audience: &str, pod: (&str, &str), node: Option<(&str, &str)>) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: sa.into(),
            audiences: vec![audience.into()],
            expires: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
            pod: Some((pod.0.into(), pod.1.into())),
            node: node.map(|(n, u)| (n.into(), u.into())),
        }
    }

    /// A legacy token from a `kubernetes.io/service-account-token` Secret.
    pub fn legacy(namespace: &str, sa: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: sa.into(),
            ..Default::default()
        }
    }
}

/// What TokenReview knows about a token.
#[derive(Debug, Clone)]
enum TokenKind {
    ServiceAccount(SaToken),
    /// Authenticated as this user with no audiences, as an authenticator
    /// that ignores audiences would answer (kube-apiserver itself refuses
    /// to return such an answer; other TokenReview servers may not).
    AudienceUnaware(Value),
}

/// kube-apiserver's default `--api-audiences`: its issuer.
pub const DEFAULT_API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// One request as the stand-in saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// RBAC verb: list, watch, get, create; or the HTTP method for non-resource URLs.
    pub verb: String,
    pub group: String,
    /// Plural resource name; empty for non-resource URLs.
    pub resource: String,
    pub path: String,
    pub query: String,
    pub bearer: Option<String>,
    /// Whether a write changed anything (an apply of what is stored does not).
    pub wrote: bool,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    res: &'static Res,
    kind: &'static str,
    object: Value,
    /// The object before a MODIFIED: a watch with a label selector sees an
    /// object that stops (starts) matching as DELETED (ADDED).
    old: Option<Value>,
}

#[derive(Default)]
struct Db {
    rv: u64,
    /// Watches from before this version get 410 Gone.
    floor: u64,
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// The last configuration each field manager applied, per object (and
    /// subresource): what it stops applying is removed, as server-side
    /// apply removes fields a manager no longer owns.
    applied: HashMap<writes::AppliedKey, Value>,
    /// Service cluster IPs handed out (10.96.0.0/16).
    cluster_ips: u32,
}

struct Shared {
    db: Mutex<Db>,
    live: broadcast::Sender<Change>,
    log: Mutex<Vec<Recorded>>,
    tokens: Mutex<HashMap<String, TokenKind>>,
    /// `--api-audiences`.
    api_audiences: Vec<String>,
    /// Pods as TokenReview's cache saw them when it froze (None: current).
    token_pods: Mutex<Option<BTreeMap<(String, String), Value>>>,
    /// (group, plural, version) not served (CRD versions switched off).
    unserved: Mutex<BTreeSet<(&'static str, &'static str, &'static str)>>,
    bookmark_every: Duration,
}

struct Running {
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

/// Makes the listening socket (again, after a stop).
pub type Bind = Box<dyn Fn() -> Result<std::net::TcpListener> + Send>;

pub struct ApiServer {
    shared: Arc<Shared>,
    bind: Bind,
    addr: SocketAddr,
    running: Option<Running>,
}

impl ApiServer {
    /// Serves on a socket `bind` makes (e.g. inside a test's netns).
    pub fn start(bind: Bind) -> Result<Self> {
        let listener = bind()?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            db: Mutex::default(),
            live: broadcast::channel(4096).0,
            log: Mutex::default(),
            tokens: Mutex::default(),
            api_audiences: vec![DEFAULT_API_AUDIENCE.to_string()],
            unserved: Mutex::default(),
            token_pods: Mutex::default(),
            bookmark_every: Duration::from_millis(500),
        });
        let running = Some(run(listener, shared.clone())?);
        Ok(Self {
            shared,
            bind,
            addr,
            running,
        })
    }

    /// On 127.0.0.1, any free port.
    pub fn on_loopback() -> Result<Self> {
        let port = Mutex::new(0u16);
        Self::start(Box::new(move || {
            let mut p = port.lock().unwrap();
            let l = std::net::TcpListener::bind(("127.0.0.1", *p))?;
            *p = l.local_addr()?.port();
            Ok(l)
        }))
    }

    /// On the cluster's control-plane address (reachable from every node), port 6443.
    pub fn in_cluster(cluster: &crate::Cluster) -> Result<Self> {
        let wire = std::path::PathBuf::from("/run/netns").join(cluster.wire_netns());
        let ip = cluster.control_plane_ip()?;
        Self::start(Box::new(move || {
            crate::sys::in_netns(&wire, || {
                std::net::TcpListener::bind((ip, 6443)).context("binding the stand-in API server")
            })
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server with a bearer token.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: agent\ncurrent-context: standin\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Closes the listener and every connection (watches end mid-stream).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            let _ = r.thread.join();
        }
    }

    /// Serves again on the same address, with the same objects.
    pub fn start_again(&mut self) -> Result<()> {
        if self.running.is_none() {
            let listener = (self.bind)()?;
            self.running = Some(run(listener, self.shared.clone())?);
        }
        Ok(())
    }

    /// Forgets the history: watches resuming from an older version get 410
    /// Gone and must re-list (as after etcd compaction).
    pub fn compact(&self) {
        let mut db = self.shared.db.lock().unwrap();
        db.rv += 1;
        db.floor = db.rv;
        db.history.clear();
    }

    /// Creates or replaces an object (any k8s-openapi type, or a CRD type
    /// that serializes apiVersion/kind/metadata). Replacing an object with
    /// a status subresource keeps its status, as an update of the object
    /// does (`kubectl apply` of a Service does not clear its conditions);
    /// [`ApiServer::set_status`] writes it.
    pub fn apply<T: serde::Serialize>(&self, obj: &T) -> Result<Value> {
        let mut v = serde_json::to_value(obj)?;
        let res = resource_of(&v)?;
        let (ns, name) = ns_name(&v, res)?;
        let mut db = self.shared.db.lock().unwrap();
        let rv = db.rv + 1;
        let key = (res.plural, ns.clone(), name.clone());
        let existed = db.objects.get(&key).cloned();
        if let (true, Some(old), Some(obj)) = (res.status, &existed, v.as_object_mut()) {
            match old.get("status") {
                Some(status) => obj.insert("status".into(), status.clone()),
                None => obj.remove("status"),
            };
        }
        let meta = v["metadata"].as_object_mut().context("metadata must be an object")?;
        if !meta.contains_key("uid") {
            let uid = existed
                .as_ref()
                .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
            meta.insert("uid".into(), json!(uid));
        }
        writes::store(&mut db, &self.shared.live, res, key.clone(), v, existed);
        Ok(db.objects[&key].clone())
    }

    /// Deletes an object, and its dependents as the garbage collector
    /// would (background); false when it did not exist.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<bool> {
        self.delete_with(api_version, kind, namespace, name, Propagation::Background)
    }

    /// [`ApiServer::delete`] with a propagation policy.
    pub fn delete_with(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        propagation: Propagation,
    ) -> Result<bool> {
        let res =
            Res::of(api_version, kind).with_context(|| format!("the stand-in does not serve {api_version} {kind}"))?;
        let ns = if res.namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        let mut db = self.shared.db.lock().unwrap();
        Ok(writes::delete(&mut db, &self.shared.live, res, &ns, name, propagation).is_some())
    }

    /// Sets an object's `status` (as its controller, e.g. the Deployment
    /// controller, would); false when the object does not exist.
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<bool> {
        let res =
            Res::of(api_version, kind).with_context(|| format!("the stand-in does not serve {api_version} {kind}"))?;
        let ns = if res.namespaced { namespace } else { "" };
        let mut db = self.shared.db.lock().unwrap();
        let key = (res.plural, ns.to_string(), name.to_string());
        let Some(old) = db.objects.get(&key).cloned() else {
            return Ok(false);
        };
        let mut v = old.clone();
        v["status"] = status;
        writes::store(&mut db, &self.shared.live, res, key, v, Some(old));
        Ok(true)
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::of(api_version, kind)?;
        let ns = if res.namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        self.shared
            .db
            .lock()
            .unwrap()
            .objects
            .get(&(res.plural, ns, name.to_string()))
            .cloned()
    }

    /// Mints `token` (TokenReview then checks it as the real API server would).
    pub fn issue_token(&self, token: &str, t: SaToken) {
        self.shared
            .tokens
            .lock()
            .unwrap()
            .insert(token.into(), TokenKind::ServiceAccount(t));
    }

    /// TokenReview authenticates `token` as `user` (`status.user`: username,
    /// uid, groups, extra) for any audience and says none
    /// (`status.audiences` empty), as an audience-unaware authenticator.
    pub fn audience_unaware_token(&self, token: &str, user: Value) {
        self.shared
            .tokens
            .lock()
            .unwrap()
            .insert(token.into(), TokenKind::AudienceUnaware(user));
    }

    /// kube-apiserver checks a token's bound pod in its informer cache,
    /// which can lag behind: while frozen, TokenReview sees the pods as
    /// they are now, whatever happens to them later.
    pub fn freeze_token_pod_cache(&self, frozen: bool) {
        let snapshot = frozen.then(|| {
            let db = self.shared.db.lock().unwrap();
            db.objects
                .iter()
                .filter(|((plural, _, _), _)| *plural == "pods")
                .map(|((_, ns, name), v)| ((ns.clone(), name.clone()), v.clone()))
                .collect()
        });
        *self.shared.token_pods.lock().unwrap() = snapshot;
    }

    /// Serves the resource `plural` of `group` only in `versions` (as a CRD
    /// whose other versions have `served: false`, or an older release).
    pub fn serve_versions(&self, group: &str, plural: &str, versions: &[&str]) {
        let mut off = self.shared.unserved.lock().unwrap();
        for r in RESOURCES.iter().filter(|r| r.group == group && r.plural == plural) {
            if versions.contains(&r.version) {
                off.remove(&(r.group, r.plural, r.version));
            } else {
                off.insert((r.group, r.plural, r.version));
            }
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// (group, resource, verb) of the resource requests made with `bearer`.
    pub fn verbs_seen_by(&self, bearer: &str) -> BTreeSet<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| !r.resource.is_empty() && r.bearer.as_deref() == Some(bearer))
            .map(|r| (r.group, r.resource, r.verb))
            .collect()
    }

    /// (group, resource, verb) of every resource request so far.
    pub fn verbs_seen(&self) -> BTreeSet<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| !r.resource.is_empty())
            .map(|r| (r.group, r.resource, r.verb))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn record_change(
    db: &mut Db,
    live: &broadcast::Sender<Change>,
    res: &'static Res,
    kind: &'static str,
    object: Value,
    old: Option<Value>,
) {
    let c = Change {
        rv: db.rv,
        res,
        kind,
        object,
        old,
    };
    db.history.push(c.clone());
    let _ = live.send(c);
}

fn resource_of(v: &Value) -> Result<&'static Res> {
    let (av, kind) = (v["apiVersion"].as_str().unwrap_or(""), v["kind"].as_str().unwrap_or(""));
    Res::of(av, kind).with_context(|| format!("the stand-in does not serve apiVersion {av:?} kind {kind:?}"))
}

fn ns_name(v: &Value, res: &Res) -> Result<(String, String)> {
    let name = v["metadata"]["name"].as_str().context("metadata.name is required")?;
    let ns = match (res.namespaced, v["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => ns.to_string(),
        (true, None) => bail!("{} {name} needs metadata.namespace", res.kind),
        (false, _) => String::new(),
    };
    Ok((ns, name.to_string()))
}

fn run(listener: std::net::TcpListener, shared: Arc<Shared>) -> Result<Running> {
    listener.set_nonblocking(true)?;
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new().name("apiserver".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let mut conns = tokio::task::JoinSet::new();
            let mut stopped2 = stopped.clone();
            loop {
                tokio::select! {
                    _ = stopped2.changed() => break,
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        let (shared, stopped) = (shared.clone(), stopped.clone());
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let (shared, stopped) = (shared.clone(), stopped.clone());
                                async move { Ok::<_, Infallible>(handle(req, shared, stopped).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
            // Dropping the set aborts every connection, as a crash would.
            conns.abort_all();
        });
    })?;
    Ok(Running { stop, thread })
}

/// What a path names.
struct Target {
    res: &'static Res,
    namespace: Option<String>,
    name: Option<String>,
    /// `.../<name>/status`.
    status: bool,
}

impl Target {
    /// The resource as RBAC names it (`gateways/status` for the subresource).
    fn rbac_resource(&self) -> String {
        if self.status {
            format!("{}/status", self.res.plural)
        } else {
            self.res.plural.to_string()
        }
    }
}

fn parse_path(path: &str, unserved: &BTreeSet<(&str, &str, &str)>) -> Option<(String, Target)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES.iter().find(|r| {
            r.group == group
                && r.version == version
                && r.plural == plural
                && !unserved.contains(&(r.group, r.plural, r.version))
        })
    };
    let target = |plural: &str, ns: Option<&str>, name: Option<&str>, status: bool| {
        let res = find(plural)?;
        (!status || res.status).then(|| Target {
            res,
            namespace: ns.map(str::to_string),
            name: name.map(str::to_string),
            status,
        })
    };
    let t = match rest {
        [plural] => target(plural, None, None, false)?,
        // A Namespace's own status (not a namespaced resource "status").
        ["namespaces", name, "status"] => target("namespaces", None, Some(name), true)?,
        ["namespaces", ns, plural] => target(plural, Some(ns), None, false)?,
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name), false)?,
        ["namespaces", ns, plural, name, "status"] => target(plural, Some(ns), Some(name), true)?,
        [plural, name] => target(plural, None, Some(name), false)?,
        [plural, name, "status"] => target(plural, None, Some(name), true)?,
        _ => return None,
    };
    Some((group.to_string(), t))
}

fn query_map(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Field and label selectors (equality only, as the code under test uses).
struct Filter {
    fields: Vec<(String, String)>,
    labels: Vec<(String, Option<String>)>,
    namespace: Option<String>,
}

impl Filter {
    /// The event a watch with this filter sees for `c`, if any: an object
    /// that starts (stops) matching is ADDED (DELETED) for it.
    fn event(&self, c: &Change) -> Option<&'static str> {
        let now = self.matches(&c.object);
        let before = c.old.as_ref().map(|o| self.matches(o));
        match (c.kind, before, now) {
            ("MODIFIED", Some(false), true) => Some("ADDED"),
            ("MODIFIED", Some(true), false) => Some("DELETED"),
            (_, _, true) => Some(c.kind),
            _ => None,
        }
    }

    fn new(q: &HashMap<String, String>, namespace: Option<String>) -> Result<Self, String> {
        let pairs = |s: &str| -> Vec<(String, Option<String>)> {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once("==").or_else(|| p.split_once('=')) {
                    Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                    None => (p.trim().to_string(), None),
                })
                .collect()
        };
        let mut fields = Vec::new();
        for (k, v) in pairs(q.get("fieldSelector").map(String::as_str).unwrap_or("")) {
            if !matches!(k.as_str(), "metadata.name" | "metadata.namespace" | "spec.nodeName") {
                return Err(format!("field label not supported: {k}"));
            }
            fields.push((k, v.unwrap_or_default()));
        }
        Ok(Self {
            fields,
            labels: pairs(q.get("labelSelector").map(String::as_str).unwrap_or("")),
            namespace,
        })
    }

    fn matches(&self, v: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if v["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        let field = |k: &str| match k {
            "metadata.name" => v["metadata"]["name"].as_str(),
            "metadata.namespace" => v["metadata"]["namespace"].as_str(),
            _ => v["spec"]["nodeName"].as_str(),
        };
        self.fields.iter().all(|(k, want)| field(k).unwrap_or("") == want)
            && self.labels.iter().all(|(k, want)| {
                let got = v["metadata"]["labels"][k].as_str();
                match want {
                    Some(w) => got == Some(w.as_str()),
                    None => got.is_some(),
                }
            })
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let q = query_map(&query);
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string);
    let method = req.method().clone();
    let parsed = parse_path(&path, &shared.unserved.lock().unwrap());
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &parsed) {
        (&Method::GET, Some((_, t))) if t.name.is_some() => "get",
        (&Method::GET, Some(_)) if watching => "watch",
        (&Method::GET, Some(_)) => "list",
        (&Method::POST, _) => "create",
        (&Method::PATCH, _) => "patch",
        (&Method::PUT, _) => "update",
        (&Method::DELETE, _) => "delete",
        (m, _) => m.as_str(),
    }
    .to_string();
    let (group, resource) = match (&parsed, path.as_str()) {
        (Some((g, t)), _) => (g.clone(), t.rbac_resource()),
        (None, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            ("authentication.k8s.io".into(), "tokenreviews".into())
        }
        _ => (String::new(), String::new()),
    };
    let recorded = Recorded {
        verb: verb.clone(),
        group,
        resource,
        path: path.clone(),
        query: query.clone(),
        bearer,
        wrote: false,
    };
    let writing = method == Method::PATCH || method == Method::DELETE;
    if !writing {
        shared.log.lock().unwrap().push(recorded.clone());
    }

    if path == "/version" {
        return json_reply(StatusCode::OK, &version_info());
    }
    if method == Method::GET && parsed.is_none() {
        if let Some(list) = api_resource_list(&path, &shared) {
            return list;
        }
    }
    if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return token_review(&shared, &body);
    }
    let Some((_, target)) = parsed else {
        if writing {
            shared.log.lock().unwrap().push(recorded);
        }
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    if method == Method::PATCH || method == Method::DELETE {
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let (reply, wrote) = if method == Method::PATCH {
            writes::patch(&shared, &target, &q, &content_type, &body, &recorded)
        } else {
            writes::delete_request(&shared, &target, &q, &body)
        };
        shared.log.lock().unwrap().push(Recorded { wrote, ..recorded });
        return reply;
    }
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in serves reads, server-side apply and deletes only",
        );
    }
    if target.status {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the stand-in serves status reads through the object",
        );
    }
    if let Some(name) = &target.name {
        let ns = target.namespace.clone().unwrap_or_default();
        let key = (
            target.res.plural,
            if target.res.namespaced { ns } else { String::new() },
            name.clone(),
        );
        return match shared.db.lock().unwrap().objects.get(&key) {
            Some(v) => json_reply(StatusCode::OK, &target.res.present(v.clone())),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", target.res.plural),
            ),
        };
    }
    let filter = match Filter::new(&q, target.namespace.clone()) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    if watching {
        watch_reply(&q, target.res, filter, shared, stopped)
    } else {
        list(target.res, &filter, &shared)
    }
}

fn list(res: &'static Res, filter: &Filter, shared: &Shared) -> Response<Body> {
    let db = shared.db.lock().unwrap();
    let items: Vec<Value> = db
        .objects
        .iter()
        .filter(|((plural, _, _), v)| *plural == res.plural && filter.matches(v))
        .map(|(_, v)| res.present(v.clone()))
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind),
            "metadata": {"resourceVersion": db.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch_reply(
    q: &HashMap<String, String>,
    res: &'static Res,
    filter: Filter,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) -> Response<Body> {
    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800));
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    // Subscribe before reading the history, so nothing falls in between.
    let mut live = shared.live.subscribe();
    let (backlog, gone, now) = {
        let db = shared.db.lock().unwrap();
        let backlog: Vec<Change> = if since == 0 {
            // "Any version": the current state as ADDED events.
            db.objects
                .iter()
                .filter(|((p, _, _), _)| *p == res.plural)
                .map(|(_, v)| Change {
                    rv: db.rv,
                    res,
                    kind: "ADDED",
                    object: v.clone(),
                    old: None,
                })
                .collect()
        } else {
            db.history
                .iter()
                .filter(|c| c.rv > since && c.res.same(res))
                .cloned()
                .collect()
        };
        (backlog, since != 0 && since < db.floor, db.rv)
    };
    tokio::spawn(async move {
        let send = |v: Value| {
            let mut line = serde_json::to_vec(&v).unwrap_or_default();
            line.push(b'\n');
            tx.send(Bytes::from(line))
        };
        if gone {
            let _ = send(json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {since} ({now})"), "reason": "Expired", "code": 410,
            }}))
            .await;
            return;
        }
        let mut last = since.max(if since == 0 { now } else { 0 });
        for c in &backlog {
            let Some(kind) = filter.event(c) else { continue };
            if send(json!({"type": kind, "object": res.present(c.object.clone())}))
                .await
                .is_err()
            {
                return;
            }
        }
        if let Some(c) = backlog.last() {
            last = last.max(c.rv);
        }
        let mut tick = tokio::time::interval(shared.bookmark_every);
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        loop {
            tokio::select! {
                c = live.recv() => match c {
                    Ok(c) if c.rv > last && c.res.same(res) => {
                        last = c.rv;
                        if let Some(kind) = filter.event(&c) {
                            if send(json!({"type": kind, "object": res.present(c.object)})).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = shared.db.lock().unwrap().rv.max(last);
                    let ev = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": res.api_version(), "kind": res.kind,
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if send(ev).await.is_err() {
                        return;
                    }
                }
                _ = &mut end => return,
                _ = stopped.changed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("response")
}

/// `GET /apis/<group>/<version>`: the resources served there (kube-rs
/// `Client::list_api_group_resources`), 404 when none.
fn api_resource_list(path: &str, shared: &Shared) -> Option<Response<Body>> {
    let gv = path.trim_matches('/').strip_prefix("apis/")?;
    let (group, version) = gv.split_once('/')?;
    let off = shared.unserved.lock().unwrap();
    let served: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && !off.contains(&(r.group, r.plural, r.version)))
        .map(|r| {
            json!({"name": r.plural, "singularName": "", "namespaced": r.namespaced, "kind": r.kind,
                   "verbs": ["get", "list", "watch"]})
        })
        .collect();
    if served.is_empty() {
        return None;
    }
    Some(json_reply(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": served}),
    ))
}

fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let req: k8s_openapi::api::authentication::v1::TokenReview = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("bad TokenReview: {e}")),
    };
    let token = req.spec.token.clone().unwrap_or_default();
    if token.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "token is required for TokenReview in authentication",
        );
    }
    // Empty spec.audiences: the API server's own (storage.go).
    let wanted = match req.spec.audiences.clone().unwrap_or_default() {
        a if a.is_empty() => shared.api_audiences.clone(),
        a => a,
    };
    let known = shared.tokens.lock().unwrap().get(&token).cloned();
    let status_v = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(TokenKind::AudienceUnaware(user)) => json!({"authenticated": true, "user": user}),
        Some(TokenKind::ServiceAccount(t)) => match review(shared, &t, &wanted) {
            Ok((user, audiences)) => json!({"authenticated": true, "user": user, "audiences": audiences}),
            // The union of authenticators reports every failure, the bearer
            // token one first.
            Err(e) => json!({"authenticated": false, "error": format!("[invalid bearer token, {e}]")}),
        },
    };
    json_reply(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {}, "spec": req.spec, "status": status_v,
        }),
    )
}

/// Go's `%q` of a string slice, as kube-apiserver prints audiences.
fn go_quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

/// kube-apiserver's checks of a service-account token, in its order:
/// audiences (jwt.go), then expiry and the bound pod (claims.go).
fn review(shared: &Shared, t: &SaToken, wanted: &[String]) -> Result<(Value, Vec<String>), String> {
    // "only apiserver audiences are allowed for legacy tokens"
    let token_auds = if t.audiences.is_empty() {
        shared.api_audiences.clone()
    } else {
        t.audiences.clone()
    };
    let audiences: Vec<String> = token_auds.iter().filter(|a| wanted.contains(a)).cloned().collect();
    if audiences.is_empty() {
        return Err(format!(
            "token audiences {} is invalid for the target audiences {}",
            go_quoted(&token_auds),
            go_quoted(wanted)
        ));
    }
    if t.expires.is_some_and(|e| e <= std::time::SystemTime::now()) {
        return Err("service account token has expired".into());
    }
    let mut extra = serde_json::Map::new();
    if let Some((pod, uid)) = &t.pod {
        let found = match &*shared.token_pods.lock().unwrap() {
            Some(cache) => cache.get(&(t.namespace.clone(), pod.clone())).cloned(),
            None => {
                let key = ("pods", t.namespace.clone(), pod.clone());
                shared.db.lock().unwrap().objects.get(&key).cloned()
            }
        };
        let Some(found) = found else {
            return Err("service account token has been invalidated".into());
        };
        let now = found["metadata"]["uid"].as_str().unwrap_or_default();
        if now != uid {
            return Err(format!(
                "pod UID ({now}) does not match service account pod ref claim ({uid})"
            ));
        }
        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        if let Some((node, node_uid)) = &t.node {
            extra.insert("authentication.kubernetes.io/node-name".into(), json!([node]));
            extra.insert("authentication.kubernetes.io/node-uid".into(), json!([node_uid]));
        }
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([format!("JTI={pod}-{uid}")]),
        );
    }
    let user = json!({
        "username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
        "uid": format!("sa-{}-{}", t.namespace, t.service_account),
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
        "extra": extra,
    });
    Ok((user, audiences))
}

fn version_info() -> Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::version::Info {
        major: "1".into(),
        minor: "33".into(),
        git_version: "v1.33.0-standin".into(),
        git_commit: "0".into(),
        git_tree_state: "clean".into(),
        build_date: "2026-01-01T00:00:00Z".into(),
        go_version: "go1.24".into(),
        compiler: "gc".into(),
        platform: "linux/amd64".into(),
        ..Default::default()
    })
    .unwrap_or_default()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn json_reply(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())).boxed())
        .expect("response")
}
