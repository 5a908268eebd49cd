//! Binding status: a typo in a binding must not be a silent blackhole.
//! From the agents' own model and rule (`cluster::kube::ClusterWatch`
//! with [`Watches::Bindings`], then `cluster::waypoint::Bindings`: no
//! second translation), the controller writes each binding's status where
//! `kubectl` shows it:
//!
//! * every Service a waypoint binds (its own `istio.io/use-waypoint`
//!   label, its namespace's, or a per-service-account waypoint) gets
//!   Istio's condition `istio.io/WaypointBound` in `status.conditions`,
//!   with Istio's reasons where Istio has one (`WaypointAccepted`,
//!   `WaypointIsNotReady`, `UnsupportedTrafficType`) and ours where we can
//!   say more (`WaypointNotFound`: Istio reports a missing Gateway as not
//!   ready; `MixedServiceAccounts`); a Service no longer bound loses it;
//! * every Namespace whose `istio.io/use-waypoint` label names a waypoint
//!   gets the same condition type (`kubectl describe namespace` prints
//!   namespace conditions; it prints no events);
//! * every waypoint Gateway gets a summary, `ambient-mesh.io/WaypointBindings`
//!   (how many Services and workloads it has bound, which bindings naming
//!   it are broken and why), beside the Accepted and Programmed conditions
//!   its reconcile writes (`kubectl describe gateway` prints them all).
//!
//! Writes are server-side applies of the status subresource, only for
//! objects whose condition differs from what the API shows (watches of
//! Services, Namespaces and Gateways projected to this one condition), so
//! an unchanged model writes nothing and a condition someone removed is
//! put back. Services and Namespaces are written with the controller's
//! field manager; the Gateway summary with its own ([`SUMMARY_MANAGER`]),
//! because the reconcile applies the Gateway's other conditions with the
//! controller's, and one manager applying two sets would remove each with
//! the other (conditions are a list keyed by type: each manager owns its
//! own entries). Failed writes are retried with backoff; changes are
//! batched for [`DEBOUNCE`].
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use cluster::{
    config::LocalConfig,
    kube::{model::Change, ClusterWatch, Watches},
    waypoint::{self, Binding, BindingSource, BindingStatus, Bindings, TargetKind, WaypointKey},
};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Service},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::watcher,
    Api, Client,
};

use super::{gateway::Gateway, reconcile::FIELD_MANAGER};

/// Istio's condition on a Service (and ours on a Namespace) that uses a waypoint.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";
/// Our summary on a waypoint Gateway (Gateway API: implementation-specific
/// condition types carry a domain prefix).
pub const WAYPOINT_BINDINGS: &str = "ambient-mesh.io/WaypointBindings";
/// The field manager of the Gateway summary (the reconcile's is
/// [`FIELD_MANAGER`]).
pub const SUMMARY_MANAGER: &str = "ambient-mesh-waypoint-controller-bindings";
/// Changes arriving within this are handled together (it also bounds how
/// often one object's status can be written).
const DEBOUNCE: Duration = Duration::from_millis(200);
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// At most this many broken bindings are named in a Gateway's summary.
const LISTED: usize = 5;
/// Concurrent status writes.
const WRITERS: usize = 4;
/// Bindings carry each waypoint's identity, which no status shows: any
/// trust domain will do.
const TRUST_DOMAIN: &str = "cluster.local";

/// One condition as this controller states it (status, reason, message;
/// the transition time is kept from the API's when the status is the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

/// Our condition on an object as the API shows it.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    cond: Cond,
    since: Option<Time>,
    /// Its `observedGeneration` (Gateway summaries).
    observed: Option<i64>,
}

/// An object that carries one of our conditions: [`WAYPOINT_BOUND`] on a
/// Service or Namespace, [`WAYPOINT_BINDINGS`] on a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Service { namespace: String, name: String },
    Namespace(String),
    Gateway(WaypointKey),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Service { namespace, name } => write!(f, "Service {namespace}/{name}"),
            Target::Namespace(name) => write!(f, "Namespace {name}"),
            Target::Gateway(k) => write!(f, "Gateway {k}"),
        }
    }
}

impl Target {
    fn kind(&self) -> Kind {
        match self {
            Target::Service { .. } => Kind::Service,
            Target::Namespace(_) => Kind::Namespace,
            Target::Gateway(_) => Kind::Gateway,
        }
    }

    fn condition_type(&self) -> &'static str {
        match self {
            Target::Gateway(_) => WAYPOINT_BINDINGS,
            _ => WAYPOINT_BOUND,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    Namespace,
    Gateway,
}

/// What every status should be, from the model: [`WAYPOINT_BOUND`] of
/// every Service and Namespace that has one, [`WAYPOINT_BINDINGS`] of
/// every waypoint Gateway.
#[derive(Debug, Default)]
pub struct Desired {
    pub conditions: BTreeMap<Target, Cond>,
}

impl Desired {
    pub fn of(cfg: &LocalConfig, bindings: &Bindings) -> Self {
        let mut conditions = BTreeMap::new();
        for b in bindings.services.values() {
            let Some((namespace, name)) = b.target.split_once('/') else {
                continue;
            };
            let target = Target::Service {
                namespace: namespace.into(),
                name: name.into(),
            };
            conditions.insert(target, service_condition(cfg, bindings, b));
        }
        for n in bindings.namespace_labels(cfg) {
            let cond = namespace_condition(bindings, &n);
            conditions.insert(Target::Namespace(n.namespace), cond);
        }
        for k in bindings.waypoints.keys() {
            conditions.insert(Target::Gateway(k.clone()), summary(bindings, k));
        }
        Desired { conditions }
    }
}

fn cond(ok: bool, reason: &str, message: String) -> Cond {
    Cond {
        ok,
        reason: reason.into(),
        message,
    }
}

/// How a binding came about, for its message.
fn source(b: &Binding, for_service_account: Option<&str>) -> String {
    let ns = b.target.split_once('/').map_or("", |(ns, _)| ns);
    match b.source {
        BindingSource::OwnLabel => format!("the Service's label {}", waypoint::USE_WAYPOINT),
        BindingSource::NamespaceLabel => format!("namespace {ns}'s label {}", waypoint::USE_WAYPOINT),
        BindingSource::ServiceAccount => format!(
            "the waypoint's annotation {}={}",
            waypoint::FOR_SERVICE_ACCOUNT,
            for_service_account.unwrap_or_default()
        ),
    }
}

fn for_str(f: waypoint::WaypointFor) -> &'static str {
    match f {
        waypoint::WaypointFor::Service => "service",
        waypoint::WaypointFor::Workload => "workload",
        waypoint::WaypointFor::All => "all",
        waypoint::WaypointFor::None => "none",
    }
}

fn missing(wp: &WaypointKey, via: &str, what: &str) -> Cond {
    cond(
        false,
        "WaypointNotFound",
        format!(
            "waypoint {wp} does not exist: there is no Gateway {wp} of class {} (named by {via}); \
             {what} refused until it exists: fix the label, or create the waypoint (waypoint generate)",
            waypoint::WAYPOINT_CLASS
        ),
    )
}

fn not_ready(wp: &WaypointKey, what: &str) -> Cond {
    // Istio's reason and the start of its message.
    cond(
        false,
        "WaypointIsNotReady",
        format!("waypoint \"{wp}\" is not ready: it has no ready pod; {what} refused until one is"),
    )
}

/// [`WAYPOINT_BOUND`] of a Service from its binding.
pub fn service_condition(cfg: &LocalConfig, bindings: &Bindings, b: &Binding) -> Cond {
    let wp = &b.waypoint;
    let spec = cfg
        .waypoints
        .iter()
        .find(|w| w.namespace == wp.namespace && w.name == wp.name);
    let sa = spec.and_then(|w| w.for_service_account.as_deref());
    let via = source(b, sa);
    let traffic = "traffic to this Service is";
    match b.status {
        // Istio's reason and message, and how the binding came about.
        BindingStatus::Bound => cond(
            true,
            "WaypointAccepted",
            format!("Successfully attached to waypoint {wp} (by {via})"),
        ),
        BindingStatus::WaypointMissing => missing(wp, &via, traffic),
        BindingStatus::NoReadyPod => not_ready(wp, traffic),
        BindingStatus::MixedServiceAccounts => {
            let accounts = cfg
                .services
                .iter()
                .find(|s| format!("{}/{}", s.namespace, s.name) == b.target)
                .map(|s| waypoint::service_accounts(cfg, s).join(", "))
                .unwrap_or_default();
            cond(
                false,
                "MixedServiceAccounts",
                format!(
                    "not bound as a whole: the pods behind this Service run as service accounts {accounts}, \
                     and waypoint {wp} serves only {} ({}); its VIP traffic goes direct (each pod's own \
                     binding still applies). Bind it with the label {}, or run its pods as one service account",
                    sa.unwrap_or_default(),
                    waypoint::FOR_SERVICE_ACCOUNT,
                    waypoint::USE_WAYPOINT
                ),
            )
        }
        BindingStatus::NotForServices | BindingStatus::NotForWorkloads => {
            let for_ = bindings.waypoints.get(wp).map_or("?", |w| for_str(w.for_));
            // Istio's reason and the start of its message.
            cond(
                false,
                "UnsupportedTrafficType",
                format!(
                    "attempting to bind to traffic type \"service\" which the waypoint \"{wp}\" does not support \
                     (its label {} is {for_}; named by {via}); traffic to this Service goes direct",
                    waypoint::WAYPOINT_FOR
                ),
            )
        }
    }
}

/// [`WAYPOINT_BOUND`] of a Namespace from its label.
pub fn namespace_condition(bindings: &Bindings, n: &waypoint::NamespaceBinding) -> Cond {
    let wp = &n.waypoint;
    let via = format!("this namespace's label {}", waypoint::USE_WAYPOINT);
    let what = "traffic it binds to the waypoint is";
    match n.status {
        BindingStatus::Bound => {
            let takes = match bindings.waypoints.get(wp).map(|w| w.for_) {
                Some(waypoint::WaypointFor::Workload) => "its pods' traffic",
                Some(waypoint::WaypointFor::All) => "its Services' and pods' traffic",
                _ => "its Services' traffic",
            };
            cond(
                true,
                "WaypointAccepted",
                format!(
                    "Successfully attached to waypoint {wp}: it takes {takes} (a Service's or pod's own label, \
                     or a waypoint for its service account, comes first)"
                ),
            )
        }
        BindingStatus::WaypointMissing => missing(wp, &via, what),
        BindingStatus::NoReadyPod => not_ready(wp, what),
        _ => cond(
            false,
            "UnsupportedTrafficType",
            format!(
                "waypoint \"{wp}\" takes no traffic (its label {} is none): this label binds nothing",
                waypoint::WAYPOINT_FOR
            ),
        ),
    }
}

/// [`WAYPOINT_BINDINGS`] of waypoint `wp`: what it has bound, and which
/// bindings naming it are broken (the first [`LISTED`]).
pub fn summary(bindings: &Bindings, wp: &WaypointKey) -> Cond {
    let all: Vec<&Binding> = bindings.of(wp).collect();
    let bound = |kind| {
        all.iter()
            .filter(|b| b.kind == kind && b.status == BindingStatus::Bound)
            .count()
    };
    let (services, workloads) = (bound(TargetKind::Service), bound(TargetKind::Workload));
    let mut message = format!(
        "bound: {services} Service{}, {workloads} workload{}",
        plural(services),
        plural(workloads)
    );
    let broken: Vec<&&Binding> = all.iter().filter(|b| b.status != BindingStatus::Bound).collect();
    if broken.is_empty() {
        return cond(true, "AllBound", message);
    }
    let _ = write!(message, "; not bound ({}):", broken.len());
    for b in broken.iter().take(LISTED) {
        let _ = write!(message, " {} {} ({}),", b.kind.as_str(), b.target, b.status.as_str());
    }
    message.pop();
    if broken.len() > LISTED {
        let _ = write!(message, " and {} more", broken.len() - LISTED);
    }
    message.push_str(&format!(
        "; each Service's condition {WAYPOINT_BOUND} and the agents' log and metric mesh_agent_waypoint_bindings say why"
    ));
    cond(false, "SomeNotBound", message)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Our conditions as the API shows them, and the Gateways' generations.
#[derive(Default)]
struct Seen {
    shown: HashMap<Target, Shown>,
    generations: HashMap<Target, i64>,
}

/// Records of the extra watches: an object, our condition on it, its generation.
struct Observed {
    target: Target,
    shown: Option<Shown>,
    generation: Option<i64>,
}

/// Ours of one object's conditions, by type.
struct Raw<'a> {
    type_: &'a str,
    status: &'a str,
    reason: Option<&'a str>,
    message: Option<&'a str>,
    since: Option<&'a Time>,
    observed: Option<i64>,
}

fn shown<'a>(target: &Target, conditions: impl IntoIterator<Item = Raw<'a>>) -> Option<Shown> {
    conditions
        .into_iter()
        .find(|c| c.type_ == target.condition_type())
        .map(|c| Shown {
            cond: Cond {
                ok: c.status == "True",
                reason: c.reason.unwrap_or_default().into(),
                message: c.message.unwrap_or_default().into(),
            },
            since: c.since.cloned(),
            observed: c.observed,
        })
}

fn meta_conditions(
    list: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> impl Iterator<Item = Raw<'_>> {
    list.iter().map(|c| Raw {
        type_: &c.type_,
        status: &c.status,
        reason: Some(&c.reason),
        message: Some(&c.message),
        since: Some(&c.last_transition_time),
        observed: c.observed_generation,
    })
}

fn observe_service(s: Service) -> Option<Observed> {
    let target = Target::Service {
        namespace: s.metadata.namespace?,
        name: s.metadata.name?,
    };
    let list = s.status.and_then(|st| st.conditions).unwrap_or_default();
    Some(Observed {
        shown: shown(&target, meta_conditions(&list)),
        target,
        generation: None,
    })
}

fn observe_namespace(n: Namespace) -> Option<Observed> {
    let target = Target::Namespace(n.metadata.name?);
    let list = n.status.and_then(|st| st.conditions).unwrap_or_default();
    let raw = list.iter().map(|c| Raw {
        type_: &c.type_,
        status: &c.status,
        reason: c.reason.as_deref(),
        message: c.message.as_deref(),
        since: c.last_transition_time.as_ref(),
        observed: None,
    });
    Some(Observed {
        shown: shown(&target, raw),
        target,
        generation: None,
    })
}

fn observe_gateway(g: Gateway) -> Option<Observed> {
    if !g.is_waypoint() {
        return None;
    }
    let target = Target::Gateway(WaypointKey {
        namespace: g.namespace().into(),
        name: g.name().into(),
    });
    let list = g.status.map(|st| st.conditions).unwrap_or_default();
    Some(Observed {
        shown: shown(&target, meta_conditions(&list)),
        target,
        generation: g.metadata.generation,
    })
}

impl Seen {
    fn set(&mut self, o: Observed) {
        match o.shown {
            Some(s) => self.shown.insert(o.target.clone(), s),
            None => self.shown.remove(&o.target),
        };
        match o.generation {
            Some(g) => self.generations.insert(o.target, g),
            None => self.generations.remove(&o.target),
        };
    }

    fn forget(&mut self, t: &Target) {
        self.shown.remove(t);
        self.generations.remove(t);
    }
}

/// One more watch of `watch` (sharing its health and wake-ups), keeping
/// the [`Seen`] of one kind.
fn observe<K>(
    watch: &ClusterWatch,
    seen: &Arc<Mutex<Seen>>,
    name: &'static str,
    api: Api<K>,
    project: fn(K) -> Option<Observed>,
    kind: Kind,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watch.watch(name, api, watcher::Config::default(), project, sink(seen, kind));
}

/// Keeps [`Seen`] of one kind from its watch.
fn sink(seen: &Arc<Mutex<Seen>>, kind: Kind) -> impl FnMut(Change<Observed>) + Send + 'static {
    let seen = seen.clone();
    move |c| {
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match c {
            Change::Relisted(all) => {
                s.shown.retain(|t, _| t.kind() != kind);
                s.generations.retain(|t, _| t.kind() != kind);
                all.into_iter().for_each(|o| s.set(o));
            }
            Change::Upsert(o) => s.set(o),
            Change::Delete(o) => s.forget(&o.target),
        }
    }
}

/// One status write: the object and the condition it gets (`None`: ours removed).
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub target: Target,
    pub cond: Option<Cond>,
    /// The transition time to keep (the status did not change).
    since: Option<Time>,
    /// The Gateway's generation (its summary's `observedGeneration`).
    generation: Option<i64>,
}

/// The writes that make the API show `desired`: objects whose condition
/// differs (or that carry ours and should not). A Gateway's summary waits
/// until its generation is known (its watch may lag the model's).
fn plan(desired: &BTreeMap<Target, Cond>, seen: &Seen) -> Vec<Write> {
    let mut out: Vec<Write> = desired
        .iter()
        .filter_map(|(t, c)| {
            let shown = seen.shown.get(t);
            let generation = seen.generations.get(t).copied();
            if t.kind() == Kind::Gateway && generation.is_none() {
                return None;
            }
            let same = shown.is_some_and(|s| &s.cond == c && s.observed == generation);
            (!same).then(|| Write {
                target: t.clone(),
                cond: Some(c.clone()),
                since: shown.filter(|s| s.cond.ok == c.ok).and_then(|s| s.since.clone()),
                generation,
            })
        })
        .collect();
    let mut gone: Vec<&Target> = seen.shown.keys().filter(|t| !desired.contains_key(*t)).collect();
    gone.sort();
    out.extend(gone.into_iter().map(|t| Write {
        target: t.clone(),
        cond: None,
        since: None,
        generation: None,
    }));
    out
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the binding status of {target}: {source} (check the controller's RBAC for services/status, namespaces/status and gateways/status: deploy/waypoint-controller.yaml)")]
struct WriteError {
    target: Target,
    source: kube::Error,
}

/// Server-side apply of `w`'s condition (only ours: other managers'
/// conditions stay); what the API shows afterwards (`None`: the object is
/// gone, or carries no condition of ours).
async fn apply(client: &Client, w: &Write) -> Result<Option<Shown>, WriteError> {
    let conditions: Vec<serde_json::Value> = w
        .cond
        .iter()
        .map(|c| {
            let mut v = serde_json::json!({
                "type": w.target.condition_type(),
                "status": if c.ok { "True" } else { "False" },
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": w.since.clone().unwrap_or_else(|| Time(Timestamp::now())),
            });
            if let Some(g) = w.generation {
                v["observedGeneration"] = g.into();
            }
            v
        })
        .collect();
    let (av, kind, namespace, name, manager) = match &w.target {
        Target::Service { namespace, name } => ("v1", "Service", Some(namespace), name, FIELD_MANAGER),
        Target::Namespace(name) => ("v1", "Namespace", None, name, FIELD_MANAGER),
        Target::Gateway(k) => (
            super::gateway::API_VERSION,
            super::gateway::KIND,
            Some(&k.namespace),
            &k.name,
            SUMMARY_MANAGER,
        ),
    };
    let mut patch = serde_json::json!({
        "apiVersion": av, "kind": kind,
        "metadata": {"name": name},
        "status": {"conditions": conditions},
    });
    if let Some(ns) = namespace {
        patch["metadata"]["namespace"] = ns.as_str().into();
    }
    let pp = PatchParams::apply(manager).force();
    let patch = Patch::Apply(&patch);
    let result = match &w.target {
        Target::Service { namespace, name } => Api::<Service>::namespaced(client.clone(), namespace)
            .patch_status(name, &pp, &patch)
            .await
            .map(observe_service),
        Target::Namespace(name) => Api::<Namespace>::all(client.clone())
            .patch_status(name, &pp, &patch)
            .await
            .map(observe_namespace),
        Target::Gateway(k) => Api::<Gateway>::namespaced(client.clone(), &k.namespace)
            .patch_status(&k.name, &pp, &patch)
            .await
            .map(observe_gateway),
    };
    match result {
        Ok(observed) => {
            log(w);
            Ok(observed.and_then(|o| o.shown))
        }
        // Deleted meanwhile (its watch event is on the way): nothing to show.
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
        Err(source) => Err(WriteError {
            target: w.target.clone(),
            source,
        }),
    }
}

/// Runs until the process stops, keeping every binding's status.
pub async fn run(client: Client) {
    let watch = ClusterWatch::start_with(client.clone(), Watches::Bindings);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let c = || client.clone();
    observe(
        &watch,
        &seen,
        "service conditions",
        Api::all(c()),
        observe_service,
        Kind::Service,
    );
    observe(
        &watch,
        &seen,
        "namespace conditions",
        Api::all(c()),
        observe_namespace,
        Kind::Namespace,
    );
    observe(
        &watch,
        &seen,
        "gateway conditions",
        Api::all(c()),
        observe_gateway,
        Kind::Gateway,
    );
    let mut retry: Option<Duration> = None;
    let mut batches = cluster::kube::Batches::new(watch.changes().clone(), DEBOUNCE);
    loop {
        match retry {
            None => batches.next().await,
            // A failed write is retried after `delay` with or without a
            // change; a batch open then stays open for the next turn.
            Some(delay) => {
                tokio::select! {
                    _ = batches.next() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        if !watch.health.synced() {
            continue;
        }
        let desired = {
            let model = watch.model().translate(None).model;
            Desired::of(&model, &Bindings::compute(&model, TRUST_DOMAIN))
        };
        let writes = plan(&desired.conditions, &seen.lock().unwrap_or_else(|e| e.into_inner()));
        let results: Vec<(Write, Result<Option<Shown>, WriteError>)> = futures::stream::iter(writes)
            .map(|w| {
                let client = client.clone();
                async move {
                    let r = apply(&client, &w).await;
                    (w, r)
                }
            })
            .buffer_unordered(WRITERS)
            .collect()
            .await;
        let mut failed = false;
        for (w, r) in results {
            match r {
                // What the API answered is what it shows now (the watch's
                // copy of it may still be on the way).
                Ok(now) => {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match now {
                        Some(shown) => s.shown.insert(w.target, shown),
                        None => s.shown.remove(&w.target),
                    };
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(error = %e, "binding status not written; retrying");
                }
            }
        }
        retry = failed.then(|| retry.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX)));
    }
}

fn log(w: &Write) {
    let object = w.target.to_string();
    let condition = w.target.condition_type();
    match &w.cond {
        Some(c) if c.ok => {
            tracing::info!(object, condition, status = "True", reason = %c.reason, message = %c.message, "binding status")
        }
        Some(c) => {
            tracing::warn!(object, condition, status = "False", reason = %c.reason, message = %c.message, "binding status")
        }
        None => tracing::info!(object, condition, "binding status removed (no longer bound)"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// ns `apps` (label `labels`): web-1 (sa web) behind Service web, api
    /// (sa api), both behind Service both; waypoint wp (`wp_fields`) with a
    /// ready pod; `extra` appended.
    fn model(ns_labels: &str, wp_fields: &str, extra: &str) -> LocalConfig {
        let text = format!(
            r#"
pods:
  - {{name: web-1, namespace: apps, serviceAccount: web, node: n1, ips: ["10.0.0.1"], labels: {{app: web, tier: t}}}}
  - {{name: api, namespace: apps, serviceAccount: api, node: n1, ips: ["10.0.0.3"], labels: {{app: api, tier: t}}}}
  - {{name: wp-a, namespace: apps, serviceAccount: wp, node: n1, ips: ["10.0.9.1"], labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
services:
  - {{name: web, namespace: apps, vips: ["10.96.0.1"], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web}}}}
  - {{name: both, namespace: apps, vips: ["10.96.0.2"], ports: [{{port: 80, targetPort: 8080}}], selector: {{tier: t}}}}
namespaces:
  - {{name: apps, labels: {{{ns_labels}}}}}
waypoints:
  - {{name: wp, namespace: apps, {wp_fields}}}
{extra}"#
        );
        LocalConfig::parse(Path::new("m.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn desired(cfg: &LocalConfig) -> Desired {
        Desired::of(cfg, &Bindings::compute(cfg, TRUST_DOMAIN))
    }

    fn svc(name: &str) -> Target {
        Target::Service {
            namespace: "apps".into(),
            name: name.into(),
        }
    }

    #[test]
    fn services_get_istios_condition_with_the_reason_and_what_to_do() {
        let d = desired(&model("istio.io/use-waypoint: wp", "for: service", ""));
        let web = &d.conditions[&svc("web")];
        assert!(web.ok, "{web:?}");
        assert_eq!(web.reason, "WaypointAccepted");
        assert!(
            web.message.starts_with(
                "Successfully attached to waypoint apps/wp (by namespace apps's label istio.io/use-waypoint)"
            ),
            "{web:?}"
        );
        assert!(d.conditions[&Target::Namespace("apps".into())].ok);

        // A typo in the namespace label: every Service it binds, and the
        // namespace itself, say which Gateway is missing.
        let d = desired(&model("istio.io/use-waypoint: wq", "for: service", ""));
        for t in [svc("web"), svc("both"), Target::Namespace("apps".into())] {
            let c = &d.conditions[&t];
            assert_eq!((c.ok, c.reason.as_str()), (false, "WaypointNotFound"), "{t}");
            assert!(
                c.message.starts_with(
                    "waypoint apps/wq does not exist: there is no Gateway apps/wq of class istio-waypoint"
                ),
                "{c:?}"
            );
        }

        // Per service account: web is bound, `both` (web and api) is mixed.
        let d = desired(&model("", "forServiceAccount: web", ""));
        assert_eq!(d.conditions[&svc("web")].reason, "WaypointAccepted");
        assert!(d.conditions[&svc("web")]
            .message
            .contains("istio.io/for-service-account=web"));
        let both = &d.conditions[&svc("both")];
        assert_eq!((both.ok, both.reason.as_str()), (false, "MixedServiceAccounts"));
        assert!(
            both.message.contains("run as service accounts api, web") && both.message.contains("serves only web"),
            "{both:?}"
        );
        assert!(
            !d.conditions.contains_key(&Target::Namespace("apps".into())),
            "no namespace label, no namespace condition"
        );

        // A Service label naming a workload-only waypoint: Istio's reason.
        let mut cfg = model("", "for: workload", "");
        cfg.services[0]
            .labels
            .insert(waypoint::USE_WAYPOINT.into(), "wp".into());
        let c = &desired(&cfg).conditions[&svc("web")];
        assert_eq!((c.ok, c.reason.as_str()), (false, "UnsupportedTrafficType"));
        assert!(c.message.contains("istio.io/waypoint-for is workload"), "{c:?}");

        // No ready pod.
        let mut cfg = model("istio.io/use-waypoint: wp", "for: service", "");
        cfg.pods.retain(|p| &*p.name != "wp-a");
        let c = &desired(&cfg).conditions[&svc("web")];
        assert_eq!((c.ok, c.reason.as_str()), (false, "WaypointIsNotReady"));
        assert!(c.message.starts_with("waypoint \"apps/wp\" is not ready"), "{c:?}");
    }

    fn gw() -> Target {
        Target::Gateway(WaypointKey {
            namespace: "apps".into(),
            name: "wp".into(),
        })
    }

    #[test]
    fn the_gateway_summary_counts_what_is_bound_and_names_what_is_not() {
        let d = desired(&model("", "forServiceAccount: web", ""));
        let s = &d.conditions[&gw()];
        assert_eq!((s.ok, s.reason.as_str()), (false, "SomeNotBound"));
        assert!(
            s.message
                .starts_with("bound: 1 Service, 1 workload; not bound (1): service apps/both (MixedServiceAccounts);"),
            "{s:?}"
        );
        let d = desired(&model("istio.io/use-waypoint: wp", "for: all", ""));
        let s = &d.conditions[&gw()];
        assert_eq!(
            (s.ok, s.reason.as_str(), s.message.as_str()),
            (true, "AllBound", "bound: 2 Services, 2 workloads")
        );
    }

    #[test]
    fn only_objects_whose_condition_differs_are_written() {
        let d = desired(&model("istio.io/use-waypoint: wp", "for: service", ""));
        let mut seen = Seen::default();
        let targets = |writes: &[Write]| -> Vec<String> { writes.iter().map(|w| w.target.to_string()).collect() };
        assert_eq!(
            targets(&plan(&d.conditions, &seen)),
            ["Service apps/both", "Service apps/web", "Namespace apps"],
            "the Gateway's summary waits for its generation"
        );
        seen.generations.insert(gw(), 1);
        let writes = plan(&d.conditions, &seen);
        assert_eq!(
            targets(&writes),
            [
                "Service apps/both",
                "Service apps/web",
                "Namespace apps",
                "Gateway apps/wp"
            ]
        );
        assert_eq!(writes[3].generation, Some(1));
        // The API shows them (with an old transition time): nothing to write.
        let since = Time(Timestamp::UNIX_EPOCH);
        for w in &writes {
            let shown = Shown {
                cond: w.cond.clone().unwrap(),
                since: Some(since.clone()),
                observed: w.generation,
            };
            seen.shown.insert(w.target.clone(), shown);
        }
        assert!(plan(&d.conditions, &seen).is_empty());
        // A new generation of the Gateway: its summary says it has seen it.
        seen.generations.insert(gw(), 2);
        let writes = plan(&d.conditions, &seen);
        assert_eq!(targets(&writes), ["Gateway apps/wp"]);
        assert_eq!(
            (writes[0].generation, writes[0].since.clone()),
            (Some(2), Some(since.clone()))
        );
        seen.generations.insert(gw(), 1);

        // web's waypoint loses its pod: only web's and the namespace's
        // conditions change (status False, a new transition time); a
        // Service no longer bound (opted out) loses ours.
        let opt_out = |cfg: &mut LocalConfig| {
            cfg.services[1]
                .labels
                .insert(waypoint::USE_WAYPOINT.into(), "none".into());
        };
        let mut cfg = model("istio.io/use-waypoint: wp", "for: service", "");
        cfg.pods.retain(|p| &*p.name != "wp-a");
        opt_out(&mut cfg);
        let writes = plan(&desired(&cfg).conditions, &seen);
        let got: Vec<(String, Option<bool>, bool)> = writes
            .iter()
            .map(|w| (w.target.to_string(), w.cond.as_ref().map(|c| c.ok), w.since.is_some()))
            .collect();
        assert_eq!(
            got,
            [
                ("Service apps/web".into(), Some(false), false),
                ("Namespace apps".into(), Some(false), false),
                ("Gateway apps/wp".into(), Some(false), false),
                ("Service apps/both".into(), None, false),
            ]
        );
        // A changed message with the same status keeps the transition time.
        let mut cfg = model("istio.io/use-waypoint: wp", "for: all", "");
        opt_out(&mut cfg);
        let writes = plan(&desired(&cfg).conditions, &seen);
        let ns = writes
            .iter()
            .find(|w| w.target == Target::Namespace("apps".into()))
            .unwrap();
        assert_eq!(ns.since, Some(since), "{writes:?}");
    }
}
