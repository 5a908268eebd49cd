//! The routing rules in force, and where they come from: a file of
//! Kubernetes documents (`--routes`, re-read when it changes) or the API's
//! HTTPRoutes, VirtualServices and DestinationRules (`--kubernetes`). Both
//! feed one `cluster::routes::RouteStore`, so the YAML a user tests locally
//! is the YAML they apply.
//!
//! Every change is logged per object ("route accepted" / "route
//! rejected" naming the object and the field); a rejected object keeps
//! its last good version, and the data path swaps to the new table from
//! its next request on.
use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use cluster::{
    filewatch::{FileWatch, Polled},
    kube::{model::Change, ClusterWatch},
    routes::{store::Kind, store::Outcome, Document, RouteStore, RouteTable},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// The table the data path reads (swapped whole on every change).
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<Arc<RouteTable>>>);

impl Routes {
    pub fn table(&self) -> Arc<RouteTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, t: RouteTable) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Route configuration metrics.
#[derive(Clone, Default)]
pub struct RouteMetrics {
    /// Route objects in force.
    objects: Gauge,
    /// Objects whose current version was rejected (an older one, or none, is in force).
    rejected: Gauge,
    /// Object changes by result.
    changes: Family<ResultLabels, Counter>,
}

impl RouteMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "waypoint_route_objects",
            "HTTPRoutes and VirtualServices in force",
            m.objects.clone(),
        );
        registry.register(
            "waypoint_route_objects_rejected",
            "Route objects whose current version does not translate (the last good version stays in force)",
            m.rejected.clone(),
        );
        registry.register(
            "waypoint_route_changes",
            "Route object changes by result (accepted, rejected, removed, invalid)",
            m.changes.clone(),
        );
        m
    }
}

/// The store and what publishes it.
pub struct RouteSource {
    store: RouteStore,
    routes: Routes,
    metrics: RouteMetrics,
}

impl RouteSource {
    /// `gateway`: the waypoint's own Gateway (namespace, name), for routes
    /// attached to it.
    pub fn new(gateway: Option<(String, String)>, routes: Routes, metrics: RouteMetrics) -> Self {
        Self {
            store: RouteStore::new(gateway),
            routes,
            metrics,
        }
    }

    /// Logs what changed, then publishes the new table.
    fn publish(&mut self, outcomes: Vec<Outcome>) {
        for o in &outcomes {
            let result = match o {
                Outcome::Accepted(k) => {
                    tracing::info!(object = %k, "route accepted");
                    "accepted"
                }
                Outcome::Rejected { key, error, kept } => {
                    tracing::error!(object = %key, field = %error.field, error = %error.message, kept_previous = kept, "route rejected: {o}");
                    "rejected"
                }
                Outcome::Removed(k) => {
                    tracing::info!(object = %k, "route removed");
                    "removed"
                }
                Outcome::Invalid(m) => {
                    tracing::error!(error = %m, "route document rejected");
                    "invalid"
                }
                Outcome::Unchanged(_) => continue,
            };
            self.metrics.changes.get_or_create(&ResultLabels { result }).inc();
        }
        let (table, conflicts) = self.store.table();
        for c in &conflicts {
            tracing::warn!(conflict = %c, "route conflict");
        }
        self.metrics.objects.set(table.objects as i64);
        self.metrics.rejected.set(self.store.errors().count() as i64);
        tracing::debug!(objects = table.objects, hosts = table.hosts(), "route table published");
        self.routes.set(table);
    }

    /// Every route object of a multi-document YAML text (what a routes
    /// file holds); `Err` when it does not parse at all (nothing changed).
    pub fn load_text(&mut self, text: &str) -> Result<(), String> {
        let docs = Document::parse_all(text)?;
        let outcomes = self.store.replace(&Kind::ALL, docs);
        self.publish(outcomes);
        Ok(())
    }

    fn apply(&mut self, kind: Kind, change: Change<Document>) {
        let outcomes = self.store.apply(kind, change);
        if outcomes.iter().all(|o| matches!(o, Outcome::Unchanged(_))) && !outcomes.is_empty() {
            return;
        }
        self.publish(outcomes);
    }
}

/// How often the routes file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Re-reads the routes file when it changes (a change is taken once it
/// has settled, see `FileWatch`); an unreadable file keeps everything as
/// it was.
pub async fn watch_file(mut file: FileWatch, source: Arc<Mutex<RouteSource>>) {
    loop {
        tokio::time::sleep(FILE_POLL).await;
        let path = file.path().to_owned();
        let r = match file.poll() {
            Ok(Polled::Nothing) => continue,
            Ok(Polled::Taken(text)) => source.lock().unwrap_or_else(|e| e.into_inner()).load_text(text),
            Ok(Polled::RefusedEmpty) => {
                Err("the file is empty (to drop every route, leave a comment in it: `# no routes`)".into())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            tracing::error!(file = %path.display(), error = %e, "routes file not reloaded; every route stays as it was");
        }
    }
}

/// Adds the route watches to the cluster watch.
pub fn watch_kubernetes(watch: &ClusterWatch, source: Arc<Mutex<RouteSource>>) {
    for kind in Kind::ALL {
        let source = source.clone();
        watch.watch_routes(kind, move |c| {
            source.lock().unwrap_or_else(|e| e.into_inner()).apply(kind, c)
        });
    }
}
