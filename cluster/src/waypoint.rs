//! Waypoint binding: which destinations must be reached through which
//! waypoint, computed from the cluster model (one rule for the agent, the
//! waypoint and the controller).
//!
//! * Workload-addressed traffic (destination = pod IP) goes through a
//!   waypoint when the pod is bound *as a workload*: `istio.io/use-waypoint`
//!   on the pod, else a waypoint `forServiceAccount` its service account,
//!   else the namespace's `istio.io/use-waypoint`; the label forms count
//!   only when the waypoint's `for` is `workload` or `all`.
//! * Service (VIP) traffic goes through a waypoint when the Service is
//!   bound: its own label, else a `forServiceAccount` waypoint when every
//!   pod behind it runs as that account (mixed: not bound, status
//!   `MixedServiceAccounts`), else the namespace label; the label forms
//!   count only when `for` is `service` or `all`.
//! * `none` as a label value opts out at that level. A waypoint's own pods
//!   are never bound.
//! * A label naming a waypoint that does not exist binds anyway (status
//!   `WaypointMissing`: traffic is refused, never sent direct): for a label
//!   on the pod or Service itself as if `for` were `all`, for a namespace
//!   label as the default `service` would.
use std::{
    cell::OnceCell,
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use mesh::identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::{
    config::{LocalConfig, PodSpec, ServiceSpec, WaypointSpec},
    labels::LabelGet,
};

/// Selects a waypoint (namespace, service or pod label); `none` opts out.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint `istio.io/use-waypoint` names (default: the object's).
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint (Gateway label): which traffic it takes.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a waypoint (Gateway annotation): the service account it serves.
pub const FOR_SERVICE_ACCOUNT: &str = "istio.io/for-service-account";
/// On a waypoint's pods (and Service): the Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The Gateway class of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Pod label: `off` lets a workload bound as a workload accept connections
/// that did not come through its waypoint.
pub const ENFORCEMENT_LABEL: &str = "ambient-mesh.io/waypoint-enforcement";

/// `istio.io/waypoint-for`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    #[default]
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "service" => Some(Self::Service),
            "workload" => Some(Self::Workload),
            "all" => Some(Self::All),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    pub fn workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }

    pub fn services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }
}

/// `namespace/name` of a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WaypointKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WaypointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a binding is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Pod-addressed traffic to a workload.
    Workload,
    /// VIP traffic to a Service.
    Service,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Workload => "workload",
            Self::Service => "service",
        }
    }
}

/// Where a binding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BindingSource {
    /// `istio.io/use-waypoint` on the pod or Service itself.
    OwnLabel,
    /// The waypoint's `forServiceAccount`.
    ServiceAccount,
    /// `istio.io/use-waypoint` on the namespace.
    NamespaceLabel,
}

/// Whether a binding works, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum BindingStatus {
    /// Traffic goes through the waypoint.
    Bound,
    /// The named waypoint does not exist: traffic is refused.
    WaypointMissing,
    /// The waypoint has no ready pod: traffic is refused.
    NoReadyPod,
    /// A Service whose pods run as several service accounts is not bound
    /// as a whole to a per-service-account waypoint (its VIP traffic goes
    /// direct; each pod's own binding still applies).
    MixedServiceAccounts,
    /// The pod's label names a waypoint whose `for` excludes workloads.
    NotForWorkloads,
    /// The Service's label names a waypoint whose `for` excludes services.
    NotForServices,
}

impl BindingStatus {
    /// Traffic to the target must go through the waypoint (or be refused).
    pub fn steers(self) -> bool {
        matches!(self, Self::Bound | Self::WaypointMissing | Self::NoReadyPod)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bound => "Bound",
            Self::WaypointMissing => "WaypointMissing",
            Self::NoReadyPod => "NoReadyPod",
            Self::MixedServiceAccounts => "MixedServiceAccounts",
            Self::NotForWorkloads => "NotForWorkloads",
            Self::NotForServices => "NotForServices",
        }
    }
}

/// One binding of a workload or Service to a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Binding {
    pub kind: TargetKind,
    /// `namespace/name` of the pod or Service.
    pub target: String,
    pub waypoint: WaypointKey,
    pub source: BindingSource,
    pub status: BindingStatus,
}

/// A waypoint as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaypointInfo {
    pub key: WaypointKey,
    pub for_: WaypointFor,
    /// The identity its pods present (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    #[serde(serialize_with = "display")]
    pub identity: SpiffeId,
    /// Ready pods' addresses (healthy pods with its gateway-name label).
    pub pods: Vec<IpAddr>,
}

/// Every waypoint and binding of a model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bindings {
    pub waypoints: BTreeMap<WaypointKey, WaypointInfo>,
    /// By pod key (`namespace/name`); every record, steering or not.
    pub workloads: BTreeMap<String, Binding>,
    /// By Service `namespace/name`.
    pub services: BTreeMap<String, Binding>,
}

impl Bindings {
    /// Computes waypoints and bindings of `cfg`.
    pub fn compute(cfg: &LocalConfig, trust_domain: &str) -> Self {
        let waypoints: BTreeMap<WaypointKey, WaypointInfo> = cfg
            .waypoints
            .iter()
            .map(|w| (key(&w.namespace, &w.name), info(cfg, w, trust_domain)))
            .collect();
        let mut per_sa: HashMap<(&str, &str), &WaypointSpec> = HashMap::new();
        // Sorted by name: with two waypoints for one account (possible on
        // Kubernetes, refused in the file), the first name wins everywhere.
        let mut sorted: Vec<&WaypointSpec> = cfg.waypoints.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in sorted.into_iter().filter(|w| w.for_ != WaypointFor::None) {
            if let Some(sa) = &w.for_service_account {
                per_sa.entry((&w.namespace, sa)).or_insert(w);
            }
        }
        let ctx = Ctx {
            cfg,
            waypoints: &waypoints,
            per_sa,
            pods_by_ip: OnceCell::new(),
        };
        let workloads = cfg
            .pods
            .iter()
            .filter(|p| !cfg.is_waypoint_pod(p))
            .filter_map(|p| Some((ctx.workload(p)?, p)))
            .map(|(b, p)| (p.key(), b))
            .collect();
        let services = cfg
            .services
            .iter()
            .filter(|s| !s.labels.contains_key(GATEWAY_NAME_LABEL))
            .filter_map(|s| Some((format!("{}/{}", s.namespace, s.name), ctx.service(s)?)))
            .collect();
        Bindings {
            waypoints,
            workloads,
            services,
        }
    }

    /// Every binding, workloads then Services, each sorted by target.
    pub fn all(&self) -> impl Iterator<Item = &Binding> {
        self.workloads.values().chain(self.services.values())
    }

    /// What differs from `old`: bindings new or changed (`Set`), and
    /// targets no longer bound (`Removed`), for a log line each.
    pub fn changes_from<'a>(&'a self, old: &'a Bindings) -> Vec<Change<'a>> {
        let mut out = Vec::new();
        for (new, old) in [(&self.workloads, &old.workloads), (&self.services, &old.services)] {
            out.extend(
                new.iter()
                    .filter(|(t, b)| old.get(*t) != Some(b))
                    .map(|(_, b)| Change::Set(b)),
            );
            out.extend(
                old.iter()
                    .filter(|(t, _)| !new.contains_key(*t))
                    .map(|(_, b)| Change::Removed(b)),
            );
        }
        out
    }

    /// The bindings that name `waypoint` (for its status).
    pub fn of<'a>(&'a self, waypoint: &'a WaypointKey) -> impl Iterator<Item = &'a Binding> + 'a {
        self.all().filter(move |b| &b.waypoint == waypoint)
    }

    /// Each namespace of `cfg` whose own `istio.io/use-waypoint` label
    /// names a waypoint (not `none`), with whether that waypoint can take
    /// what the label sends it: `Bound`, `WaypointMissing`, `NoReadyPod`,
    /// or `NotForServices` for a waypoint whose `for` is `none` (it takes
    /// nothing). A label that binds nothing (no Service, no pod) is still
    /// a label someone may have mistyped, so it gets a status of its own.
    pub fn namespace_labels<'a>(&'a self, cfg: &'a LocalConfig) -> impl Iterator<Item = NamespaceBinding> + 'a {
        cfg.namespaces.iter().filter_map(move |ns| {
            let waypoint = use_waypoint(&ns.labels, &ns.name)??;
            let status = match self.waypoints.get(&waypoint) {
                None => BindingStatus::WaypointMissing,
                Some(w) if w.for_ == WaypointFor::None => BindingStatus::NotForServices,
                Some(w) if w.pods.is_empty() => BindingStatus::NoReadyPod,
                Some(_) => BindingStatus::Bound,
            };
            Some(NamespaceBinding {
                namespace: ns.name.clone(),
                waypoint,
                status,
            })
        })
    }
}

/// A namespace's `istio.io/use-waypoint` label and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceBinding {
    pub namespace: String,
    pub waypoint: WaypointKey,
    pub status: BindingStatus,
}

/// One difference between two [`Bindings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    Set(&'a Binding),
    Removed(&'a Binding),
}

fn display<S: serde::Serializer>(v: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn key(namespace: &str, name: &str) -> WaypointKey {
    WaypointKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

fn info(cfg: &LocalConfig, w: &WaypointSpec, trust_domain: &str) -> WaypointInfo {
    let pods = cfg
        .pods
        .iter()
        .filter(|p| p.healthy && *p.namespace == *w.namespace)
        .filter(|p| p.labels.get(GATEWAY_NAME_LABEL) == Some(&w.name))
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    WaypointInfo {
        key: key(&w.namespace, &w.name),
        for_: w.for_,
        identity: SpiffeId::new(trust_domain, &w.namespace, w.service_account()),
        pods,
    }
}

struct Ctx<'a> {
    cfg: &'a LocalConfig,
    waypoints: &'a BTreeMap<WaypointKey, WaypointInfo>,
    per_sa: HashMap<(&'a str, &'a str), &'a WaypointSpec>,
    /// Built for the first Service of a namespace with a per-service-account
    /// waypoint; a cluster without one never needs it.
    pods_by_ip: OnceCell<PodsByIp<'a>>,
}

/// The waypoint a `use-waypoint` label (and `use-waypoint-namespace`) on an
/// object of `namespace` names: `None` when absent, `Some(None)` for `none`.
pub fn use_waypoint(labels: &(impl LabelGet + ?Sized), namespace: &str) -> Option<Option<WaypointKey>> {
    let name = labels.label(USE_WAYPOINT)?;
    if name == "none" {
        return Some(None);
    }
    let ns = labels.label(USE_WAYPOINT_NAMESPACE).map_or(namespace, String::as_str);
    Some(Some(key(ns, name)))
}

impl Ctx<'_> {
    fn binding(
        &self,
        kind: TargetKind,
        target: String,
        waypoint: WaypointKey,
        source: BindingSource,
    ) -> Option<Binding> {
        let status = match self.waypoints.get(&waypoint) {
            None if source == BindingSource::NamespaceLabel && kind == TargetKind::Workload => return None,
            None => BindingStatus::WaypointMissing,
            Some(w) => {
                let takes = match (source, kind) {
                    (BindingSource::ServiceAccount, _) => true,
                    (_, TargetKind::Workload) => w.for_.workloads(),
                    (_, TargetKind::Service) => w.for_.services(),
                };
                match (takes, source, kind) {
                    (true, _, _) if w.pods.is_empty() => BindingStatus::NoReadyPod,
                    (true, _, _) => BindingStatus::Bound,
                    // A namespace-wide waypoint for the other kind: nothing to say.
                    (false, BindingSource::NamespaceLabel, _) => return None,
                    (false, _, TargetKind::Workload) => BindingStatus::NotForWorkloads,
                    (false, _, TargetKind::Service) => BindingStatus::NotForServices,
                }
            }
        };
        Some(Binding {
            kind,
            target,
            waypoint,
            source,
            status,
        })
    }

    /// Pod label > per service account > namespace label.
    fn workload(&self, p: &PodSpec) -> Option<Binding> {
        let kind = TargetKind::Workload;
        if let Some(choice) = use_waypoint(&*p.labels, &p.namespace) {
            return self.binding(kind, p.key(), choice?, BindingSource::OwnLabel);
        }
        if let Some(w) = self.per_sa.get(&(&*p.namespace, &*p.service_account)) {
            let wp = key(&w.namespace, &w.name);
            return self.binding(kind, p.key(), wp, BindingSource::ServiceAccount);
        }
        let ns = self.cfg.namespace_labels(&p.namespace)?;
        self.binding(
            kind,
            p.key(),
            use_waypoint(ns, &p.namespace)??,
            BindingSource::NamespaceLabel,
        )
    }

    /// Service label > per service account (all its pods) > namespace label.
    fn service(&self, s: &ServiceSpec) -> Option<Binding> {
        let kind = TargetKind::Service;
        let target = format!("{}/{}", s.namespace, s.name);
        if let Some(choice) = use_waypoint(&s.labels, &s.namespace) {
            return self.binding(kind, target, choice?, BindingSource::OwnLabel);
        }
        // Only a waypoint of the Service's own namespace can bind it by
        // service account: elsewhere its pods' accounts are not needed.
        // (Looking them up for every Service of every batch scanned every
        // pod per Service: 40 % of the control thread at 10,000 pods.)
        let accounts = if self.per_sa.keys().any(|(ns, _)| *ns == &*s.namespace) {
            let pods = self.pods_by_ip.get_or_init(|| PodsByIp::new(self.cfg));
            accounts(self.cfg, pods, s)
        } else {
            Vec::new()
        };
        let mut bound = accounts
            .iter()
            .filter_map(|sa| self.per_sa.get(&(s.namespace.as_str(), sa.as_str())));
        if let Some(w) = bound.next() {
            let wp = key(&w.namespace, &w.name);
            if accounts.len() == 1 {
                return self.binding(kind, target, wp, BindingSource::ServiceAccount);
            }
            return Some(Binding {
                kind,
                target,
                waypoint: wp,
                source: BindingSource::ServiceAccount,
                status: BindingStatus::MixedServiceAccounts,
            });
        }
        let ns = self.cfg.namespace_labels(&s.namespace)?;
        self.binding(
            kind,
            target,
            use_waypoint(ns, &s.namespace)??,
            BindingSource::NamespaceLabel,
        )
    }
}

/// The service accounts of the pods behind `s` (its explicit endpoints'
/// pods, else those its selector picks, ready or not), sorted and
/// deduplicated: what decides whether a per-service-account waypoint binds
/// `s` as a whole (and what a `MixedServiceAccounts` status names).
pub fn service_accounts(cfg: &LocalConfig, s: &ServiceSpec) -> Vec<String> {
    accounts(cfg, &PodsByIp::new(cfg), s)
}

/// [`service_accounts`] with the pods already indexed by IP.
fn accounts(cfg: &LocalConfig, pods: &PodsByIp, s: &ServiceSpec) -> Vec<String> {
    let mut out: Vec<String> = match &s.endpoints {
        Some(eps) => eps
            .iter()
            .filter_map(|ip| pods.0.get(ip))
            .map(|p| p.service_account.to_string())
            .collect(),
        None => cfg
            .pods
            .iter()
            .filter(|p| *p.namespace == *s.namespace)
            .filter(|p| p.labels.has_all(&*s.selector))
            .map(|p| p.service_account.to_string())
            .collect(),
    };
    out.sort();
    out.dedup();
    out
}

/// The pods by IP. An IP is one pod's: the file's checks refuse a second
/// pod with it, and the translation from Kubernetes skips one.
struct PodsByIp<'a>(HashMap<IpAddr, &'a PodSpec>);

impl<'a> PodsByIp<'a> {
    fn new(cfg: &'a LocalConfig) -> Self {
        Self(
            cfg.pods
                .iter()
                .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::Path};

    use super::*;
    use crate::state::{State, Via};

    /// ns `apps`: web-1/web-2 (sa web, app web), api (sa api, app web2),
    /// two pods of waypoint `wp` (sa wp); services web (app web), both
    /// (app: shared, mixed accounts). `extra` is appended to the file.
    fn model(extra: &str) -> LocalConfig {
        let text = format!(
            r#"
pods:
  - {{name: web-1, namespace: apps, serviceAccount: web, node: n1, ips: ["10.0.0.1", "fd00::1"], labels: {{app: web, tier: shared}}}}
  - {{name: web-2, namespace: apps, serviceAccount: web, node: n2, ips: ["10.0.0.2"], labels: {{app: web, tier: shared}}}}
  - {{name: api, namespace: apps, serviceAccount: api, node: n2, ips: ["10.0.0.3"], labels: {{app: api, tier: shared}}}}
  - {{name: wp-a, namespace: apps, serviceAccount: wp, node: n1, ips: ["10.0.9.1"], labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
  - {{name: wp-b, namespace: apps, serviceAccount: wp, node: n2, ips: ["10.0.9.2"], labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
services:
  - {{name: web, namespace: apps, vips: ["10.96.0.1"], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web}}}}
  - {{name: both, namespace: apps, vips: ["10.96.0.2"], ports: [{{port: 80, targetPort: 8080}}], selector: {{tier: shared}}}}
{extra}"#
        );
        LocalConfig::parse(Path::new("m.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn bindings(extra: &str) -> Bindings {
        Bindings::compute(&model(extra), "td")
    }

    /// (waypoint, source, status) of a workload or service binding.
    fn of(b: &Bindings, kind: TargetKind, target: &str) -> Option<(String, BindingSource, BindingStatus)> {
        let map = match kind {
            TargetKind::Workload => &b.workloads,
            TargetKind::Service => &b.services,
        };
        map.get(target).map(|b| (b.waypoint.to_string(), b.source, b.status))
    }

    use BindingSource::*;
    use BindingStatus::*;
    use TargetKind::{Service as Svc, Workload as Wl};

    const WP: &str = "waypoints:\n  - {name: wp, namespace: apps}\n";

    fn with_for(f: &str) -> String {
        format!("waypoints:\n  - {{name: wp, namespace: apps, for: {f}}}\n")
    }

    #[test]
    fn per_service_account_binds_its_workloads_and_services_made_only_of_them() {
        let b = bindings("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n");
        let bound = Some(("apps/wp".into(), ServiceAccount, Bound));
        assert_eq!(of(&b, Wl, "apps/web-1"), bound);
        assert_eq!(of(&b, Wl, "apps/web-2"), bound);
        assert_eq!(of(&b, Wl, "apps/api"), None, "another account");
        assert_eq!(of(&b, Svc, "apps/web"), bound, "every pod of web runs as web");
        assert_eq!(
            of(&b, Svc, "apps/both"),
            Some(("apps/wp".into(), ServiceAccount, MixedServiceAccounts)),
            "web and api pods: not bound as a whole"
        );
        assert_eq!(of(&b, Wl, "apps/wp-a"), None, "a waypoint's own pod is never bound");
        let w = &b.waypoints[&key("apps", "wp")];
        assert_eq!(w.identity.to_string(), "spiffe://td/ns/apps/sa/wp");
        assert_eq!(
            w.pods,
            ["10.0.9.1".parse::<IpAddr>().unwrap(), "10.0.9.2".parse().unwrap()]
        );
    }

    #[test]
    fn per_service_account_reads_the_pods_of_listed_endpoints() {
        let mut cfg = model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n");
        let ips = |l: &[&str]| Some(l.iter().map(|ip| ip.parse().unwrap()).collect());
        // As EndpointSlices list them: the selector is not read then. An
        // address that is no pod's names no account.
        cfg.services[0].endpoints = ips(&["10.0.0.1", "fd00::1", "10.0.0.2", "10.7.7.7"]);
        cfg.services[1].endpoints = ips(&["10.0.0.2", "10.0.0.3"]);
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(of(&b, Svc, "apps/web"), Some(("apps/wp".into(), ServiceAccount, Bound)));
        assert_eq!(
            of(&b, Svc, "apps/both"),
            Some(("apps/wp".into(), ServiceAccount, MixedServiceAccounts))
        );
        assert_eq!(service_accounts(&cfg, &cfg.services[0]), ["web"]);
        assert_eq!(service_accounts(&cfg, &cfg.services[1]), ["api", "web"]);
        // Listed endpoints of the web pods only: bound as a whole.
        cfg.services[1].endpoints = ips(&["10.0.0.1"]);
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Svc, "apps/both"),
            Some(("apps/wp".into(), ServiceAccount, Bound))
        );
    }

    #[test]
    fn namespace_label_binds_by_the_waypoints_for() {
        let ns = "namespaces:\n  - {name: apps, labels: {istio.io/use-waypoint: wp}}\n";
        let service = bindings(&format!("{ns}{WP}"));
        assert_eq!(
            of(&service, Svc, "apps/web"),
            Some(("apps/wp".into(), NamespaceLabel, Bound))
        );
        assert_eq!(
            of(&service, Wl, "apps/web-1"),
            None,
            "default for: service leaves pods direct"
        );
        let workload = bindings(&format!("{ns}{}", with_for("workload")));
        assert_eq!(
            of(&workload, Wl, "apps/web-1"),
            Some(("apps/wp".into(), NamespaceLabel, Bound))
        );
        assert_eq!(of(&workload, Svc, "apps/web"), None);
        let all = bindings(&format!("{ns}{}", with_for("all")));
        assert!(of(&all, Wl, "apps/api").is_some() && of(&all, Svc, "apps/both").is_some());
        let none = bindings(&format!("{ns}{}", with_for("none")));
        assert!(none.workloads.is_empty() && none.services.is_empty());
    }

    #[test]
    fn own_labels_win_and_none_opts_out() {
        let text = "namespaces:\n  - {name: apps, labels: {istio.io/use-waypoint: wp}}\nwaypoints:\n  - {name: wp, namespace: apps, for: all, forServiceAccount: api}\n  - {name: other, namespace: apps, for: all}\n";
        let mut cfg = model(text);
        std::sync::Arc::make_mut(&mut cfg.pods[0].labels).insert(USE_WAYPOINT.into(), "other".into());
        std::sync::Arc::make_mut(&mut cfg.pods[1].labels).insert(USE_WAYPOINT.into(), "none".into());
        cfg.services[0].labels.insert(USE_WAYPOINT.into(), "none".into());
        cfg.services[1].labels.insert(USE_WAYPOINT.into(), "other".into());
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Wl, "apps/web-1"),
            Some(("apps/other".into(), OwnLabel, NoReadyPod))
        );
        assert_eq!(of(&b, Wl, "apps/web-2"), None, "pod label none beats the namespace");
        assert_eq!(
            of(&b, Wl, "apps/api"),
            Some(("apps/wp".into(), ServiceAccount, Bound)),
            "per SA beats the namespace"
        );
        assert_eq!(of(&b, Svc, "apps/web"), None, "service label none");
        assert_eq!(
            of(&b, Svc, "apps/both"),
            Some(("apps/other".into(), OwnLabel, NoReadyPod))
        );
    }

    #[test]
    fn pod_label_beats_per_service_account_and_wrong_for_is_reported() {
        let mut cfg = model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n  - {name: svc-only, namespace: apps}\n");
        std::sync::Arc::make_mut(&mut cfg.pods[0].labels).insert(USE_WAYPOINT.into(), "svc-only".into());
        cfg.services[0].labels.insert(USE_WAYPOINT.into(), "svc-only".into());
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Wl, "apps/web-1"),
            Some(("apps/svc-only".into(), OwnLabel, NotForWorkloads))
        );
        assert!(!b.workloads["apps/web-1"].status.steers());
        assert_eq!(
            of(&b, Wl, "apps/web-2"),
            Some(("apps/wp".into(), ServiceAccount, Bound))
        );
        assert_eq!(
            of(&b, Svc, "apps/web"),
            Some(("apps/svc-only".into(), OwnLabel, NoReadyPod))
        );
        let mut cfg = model(&with_for("workload"));
        cfg.services[0].labels.insert(USE_WAYPOINT.into(), "wp".into());
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Svc, "apps/web"),
            Some(("apps/wp".into(), OwnLabel, NotForServices))
        );
    }

    #[test]
    fn a_missing_waypoint_binds_and_says_so() {
        let mut cfg = model("namespaces:\n  - {name: apps, labels: {istio.io/use-waypoint: typo}}\n");
        std::sync::Arc::make_mut(&mut cfg.pods[0].labels).insert(USE_WAYPOINT.into(), "gone".into());
        std::sync::Arc::make_mut(&mut cfg.pods[0].labels).insert(USE_WAYPOINT_NAMESPACE.into(), "infra".into());
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Wl, "apps/web-1"),
            Some(("infra/gone".into(), OwnLabel, WaypointMissing))
        );
        assert_eq!(
            of(&b, Svc, "apps/web"),
            Some(("apps/typo".into(), NamespaceLabel, WaypointMissing))
        );
        assert_eq!(
            of(&b, Wl, "apps/web-2"),
            None,
            "a namespace label binds pods only for workload waypoints"
        );
        assert!(b.workloads["apps/web-1"].status.steers(), "fail closed");
    }

    #[test]
    fn namespace_labels_say_whether_the_waypoint_they_name_can_take_traffic() {
        let text = "namespaces:\n  - {name: apps, labels: {istio.io/use-waypoint: wp}}\n  - {name: typo, labels: {istio.io/use-waypoint: wq}}\n  - {name: remote, labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: apps}}\n  - {name: off, labels: {istio.io/use-waypoint: none}}\n  - {name: plain}\nwaypoints:\n  - {name: wp, namespace: apps}\n";
        let cfg = model(text);
        let b = Bindings::compute(&cfg, "td");
        let got: Vec<(String, String, BindingStatus)> = b
            .namespace_labels(&cfg)
            .map(|n| (n.namespace, n.waypoint.to_string(), n.status))
            .collect();
        assert_eq!(
            got,
            [
                ("apps".into(), "apps/wp".into(), Bound),
                ("typo".into(), "typo/wq".into(), WaypointMissing),
                ("remote".into(), "apps/wp".into(), Bound),
            ],
            "`none` and unlabelled namespaces have no status"
        );
        let mut cfg = model(&format!(
            "namespaces:\n  - {{name: apps, labels: {{istio.io/use-waypoint: wp}}}}\n{}",
            with_for("none")
        ));
        let status = |cfg: &LocalConfig| {
            Bindings::compute(cfg, "td")
                .namespace_labels(cfg)
                .next()
                .map(|n| n.status)
        };
        assert_eq!(status(&cfg), Some(NotForServices), "for: none takes nothing");
        cfg.waypoints[0].for_ = WaypointFor::Workload;
        cfg.pods
            .iter_mut()
            .filter(|p| p.name.starts_with("wp-"))
            .for_each(|p| p.healthy = false);
        assert_eq!(status(&cfg), Some(NoReadyPod));
    }

    #[test]
    fn no_ready_pod_when_the_waypoints_pods_are_unhealthy() {
        let mut cfg = model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n");
        cfg.pods
            .iter_mut()
            .filter(|p| p.name.starts_with("wp-"))
            .for_each(|p| p.healthy = false);
        let b = Bindings::compute(&cfg, "td");
        assert_eq!(
            of(&b, Wl, "apps/web-1"),
            Some(("apps/wp".into(), ServiceAccount, NoReadyPod))
        );
    }

    #[test]
    fn steering_spreads_over_ready_pods_with_the_original_destination_as_authority() {
        let s = State::default();
        s.update(
            &model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web, serviceAccount: wp-sa}\n"),
            "td",
        );
        let snap = s.snapshot();
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        let vias: Vec<Via> = (0..4)
            .map(|_| snap.steer(at("10.96.0.1:80")).unwrap().unwrap())
            .collect();
        let pods: Vec<SocketAddr> = vias.iter().map(|v| v.pod).collect();
        assert_eq!(
            pods,
            [
                at("10.0.9.1:15008"),
                at("10.0.9.2:15008"),
                at("10.0.9.1:15008"),
                at("10.0.9.2:15008")
            ]
        );
        assert_eq!(vias[0].authority, at("10.96.0.1:80"), "the VIP, not an endpoint");
        assert_eq!(vias[0].identity.to_string(), "spiffe://td/ns/apps/sa/wp-sa");
        let pod = snap.steer(at("10.0.0.2:8080")).unwrap().unwrap();
        assert_eq!(pod.authority, at("10.0.0.2:8080"));
        assert!(snap.steer(at("10.96.0.2:80")).is_none(), "mixed accounts: not bound");
        assert!(snap.steer(at("10.0.0.3:8080")).is_none(), "api is not bound");
        assert!(snap.steer(at("10.0.9.1:15008")).is_none(), "the waypoint itself");
        // IPv6 destination, IPv4-only waypoint: any family rather than none.
        assert!(snap.steer(at("[fd00::1]:8080")).unwrap().is_ok());
    }

    #[test]
    fn steering_to_an_unavailable_waypoint_is_an_error() {
        let s = State::default();
        let mut cfg = model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n");
        cfg.pods
            .iter_mut()
            .filter(|p| p.name.starts_with("wp-"))
            .for_each(|p| p.healthy = false);
        s.update(&cfg, "td");
        let e = s
            .snapshot()
            .steer("10.0.0.1:8080".parse().unwrap())
            .unwrap()
            .unwrap_err();
        assert_eq!(e.status, NoReadyPod);
        assert!(
            e.to_string().contains("workload apps/web-1") && e.to_string().contains("apps/wp"),
            "{e}"
        );
        cfg.waypoints.clear();
        cfg.services[0].labels.insert(USE_WAYPOINT.into(), "wp".into());
        s.update(&cfg, "td");
        let e = s
            .snapshot()
            .steer("10.96.0.1:80".parse().unwrap())
            .unwrap()
            .unwrap_err();
        assert_eq!(e.status, WaypointMissing);
    }

    #[test]
    fn a_workload_bound_as_a_workload_accepts_only_its_waypoint() {
        let s = State::default();
        let mut cfg = model("waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n");
        std::sync::Arc::make_mut(&mut cfg.pods[1].labels).insert(ENFORCEMENT_LABEL.into(), "off".into());
        s.update(&cfg, "td");
        let snap = s.snapshot();
        let id = |sa: &str| SpiffeId::new("td", "apps", sa);
        let web1: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(snap.check_waypoint(web1, Some(&id("wp"))).is_ok());
        let e = snap.check_waypoint(web1, Some(&id("api"))).unwrap_err();
        assert!(
            e.to_string().starts_with("bypassed waypoint") && e.to_string().contains("sa/api"),
            "{e}"
        );
        assert_eq!(snap.check_waypoint(web1, None).unwrap_err().peer, "plaintext");
        assert!(
            snap.check_waypoint("10.0.0.2".parse().unwrap(), Some(&id("api")))
                .is_ok(),
            "opted out"
        );
        assert!(
            snap.check_waypoint("10.0.0.3".parse().unwrap(), Some(&id("web")))
                .is_ok(),
            "not bound"
        );
        // A service-only binding does not restrict pod traffic.
        s.update(
            &model(&format!(
                "namespaces:\n  - {{name: apps, labels: {{istio.io/use-waypoint: wp}}}}\n{WP}"
            )),
            "td",
        );
        assert!(s.snapshot().check_waypoint(web1, Some(&id("api"))).is_ok());
    }

    #[test]
    fn changes_list_new_changed_and_removed_bindings() {
        let per_sa = "waypoints:\n  - {name: wp, namespace: apps, forServiceAccount: web}\n";
        let old = bindings(per_sa);
        assert!(old.changes_from(&old).is_empty());
        let mut cfg = model(per_sa);
        cfg.pods
            .iter_mut()
            .filter(|p| p.name.starts_with("wp-"))
            .for_each(|p| p.healthy = false);
        cfg.pods.retain(|p| &*p.name != "web-2");
        let new = Bindings::compute(&cfg, "td");
        let changes = new.changes_from(&old);
        let set: Vec<(&str, BindingStatus)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Set(b) => Some((b.target.as_str(), b.status)),
                Change::Removed(_) => None,
            })
            .collect();
        assert_eq!(set, [("apps/web-1", NoReadyPod), ("apps/web", NoReadyPod)]);
        assert!(changes.contains(&Change::Removed(&old.workloads["apps/web-2"])));
        assert_eq!(changes.len(), 3);
    }

    #[test]
    fn waypoint_pods_are_never_captured() {
        let cfg = LocalConfig::parse(
            Path::new("m.yaml"),
            "pods:\n  - {name: wp-a, namespace: apps, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.9.1\"], labels: {gateway.networking.k8s.io/gateway-name: wp}}\n  - {name: gw, namespace: apps, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.9.2\"], labels: {gateway.networking.k8s.io/gateway-name: ingress}}\nwaypoints:\n  - {name: wp, namespace: apps}\n",
        )
        .unwrap();
        let captured: Vec<&str> = cfg.pods_on("n1").map(|p| &*p.name).collect();
        assert_eq!(captured, ["gw"], "only pods of a listed waypoint are exempt");
        assert_eq!(
            cfg.mesh_pods_on("n1").count(),
            2,
            "the waypoint pod's node may fetch its identity"
        );
    }
}
