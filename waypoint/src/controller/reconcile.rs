//! The control loop: every waypoint Gateway's objects applied (server-side
//! apply, forced, one field manager), its status written, and bindings of
//! deleted Gateways removed.
//!
//! Triggers: the Gateway itself and every owned object (ownerReferences with
//! `controller: true`), watched with the managed label, so an edited,
//! unlabelled or deleted object brings its Gateway back here and is applied
//! again. An apply that changes nothing changes nothing on the API server
//! (no new version, no event), so re-applying on every event converges.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::ClusterRoleBinding,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        controller::{self, Action, Controller},
        reflector::ObjectRef,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{
    gateway::{Gateway, GatewayAddress, GatewayStatus, GATEWAY_NAME_LABEL, HBONE_PORT},
    objects::{self, Settings, GATEWAY_NAMESPACE_LABEL, MANAGED_LABEL, MANAGED_VALUE},
};

/// The field manager of every write (server-side apply).
pub const FIELD_MANAGER: &str = "ambient-mesh-waypoint-controller";
/// Backoff after a failed reconcile of one Gateway: doubling from the
/// first, capped at the last (so a broken Gateway costs one try a minute).
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A full re-apply now and then, in case an event was missed.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot apply {kind} {namespace}/{name}: {source} (check the controller's RBAC: deploy/waypoint-controller.yaml)")]
    Apply {
        kind: String,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot write the status of Gateway {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

pub struct Ctx {
    pub client: Client,
    pub settings: Settings,
    /// Consecutive failures per Gateway (for the backoff).
    failures: Mutex<HashMap<ObjectRef<Gateway>, u32>>,
}

impl Ctx {
    pub fn new(client: Client, settings: Settings) -> Self {
        Self {
            client,
            settings,
            failures: Mutex::default(),
        }
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(client: Client, settings: Settings) {
    let managed = watcher::Config::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}"));
    let ctx = Arc::new(Ctx::new(client.clone(), settings));
    let bindings_of_deleted = tokio::spawn(remove_orphan_bindings(client.clone()));
    let c = client;
    Controller::new(Api::<Gateway>::all(c.clone()), watcher::Config::default())
        .owns(Api::<ServiceAccount>::all(c.clone()), managed.clone())
        .owns(Api::<ConfigMap>::all(c.clone()), managed.clone())
        .owns(Api::<Service>::all(c.clone()), managed.clone())
        .owns(Api::<PodDisruptionBudget>::all(c.clone()), managed.clone())
        .owns(Api::<Deployment>::all(c.clone()), managed.clone())
        .watches(Api::<ClusterRoleBinding>::all(c.clone()), managed, |b| {
            gateway_of_binding(&b)
        })
        .with_config(
            controller::Config::default()
                .debounce(Duration::from_millis(100))
                .concurrency(4),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                match e {
                    // Reconcile errors are logged (once per try) in error_policy.
                    controller::Error::ReconcilerFailed(..) => {}
                    e => tracing::warn!(error = %e, "controller watch failing; retrying"),
                }
            }
        })
        .await;
    bindings_of_deleted.abort();
}

/// The binding's Gateway (labels), so a changed or deleted binding is re-applied.
fn gateway_of_binding(b: &ClusterRoleBinding) -> Option<ObjectRef<Gateway>> {
    let labels = b.metadata.labels.as_ref()?;
    let ns = labels.get(GATEWAY_NAMESPACE_LABEL)?;
    let name = labels.get(GATEWAY_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(ns))
}

async fn reconcile(gw: Arc<Gateway>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    if !gw.is_waypoint() || gw.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let status = match gw.listener_problem() {
        Some(problem) => not_accepted(&gw, &problem),
        None => {
            let d = objects::desired(&gw, &ctx.settings);
            let (c, ns) = (&ctx.client, gw.namespace());
            apply(Api::namespaced(c.clone(), ns), &d.service_account).await?;
            apply(Api::namespaced(c.clone(), ns), &d.ca_root).await?;
            apply_binding(Api::all(c.clone()), &d.binding).await?;
            let service = apply(Api::namespaced(c.clone(), ns), &d.service).await?;
            apply(Api::namespaced(c.clone(), ns), &d.pdb).await?;
            let deployment = apply(Api::namespaced(c.clone(), ns), &d.deployment).await?;
            programmed(&gw, &service, &deployment)
        }
    };
    write_status(&ctx.client, &gw, status).await?;
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&ObjectRef::from_obj(gw.as_ref()));
    Ok(Action::requeue(RESYNC))
}

fn error_policy(gw: Arc<Gateway>, error: &ReconcileError, ctx: Arc<Ctx>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(ObjectRef::from_obj(gw.as_ref())).or_default();
    *n = n.saturating_add(1);
    let delay = RETRY_FIRST.saturating_mul(1 << (*n - 1).min(16)).min(RETRY_MAX);
    tracing::warn!(gateway = %format!("{}/{}", gw.namespace(), gw.name()), attempt = *n, retry_in_ms = delay.as_millis() as u64, error = %error, "reconcile failed");
    Action::requeue(delay)
}

/// Server-side apply of one object (created if missing, drift reverted).
async fn apply<K>(api: Api<K>, obj: &K) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(|source| ReconcileError::Apply {
            kind: K::kind(&()).into_owned(),
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name,
            source,
        })
}

/// [`apply`] for the binding, whose roleRef the API server never changes:
/// bound to another role (a new --waypoint-cluster-role), it is re-created.
async fn apply_binding(api: Api<ClusterRoleBinding>, binding: &ClusterRoleBinding) -> Result<(), ReconcileError> {
    match apply(api.clone(), binding).await {
        Err(ReconcileError::Apply {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 422 => {
            let name = binding.metadata.name.as_deref().unwrap_or_default();
            tracing::info!(binding = name, role = %binding.role_ref.name, "re-creating the binding for another role");
            delete_binding(&api, name).await;
            apply(api, binding).await.map(drop)
        }
        r => r.map(drop),
    }
}

/// One condition, keeping the transition time of the current one when
/// its status did not change (else every reconcile would change the
/// status, and the change would trigger the next reconcile).
fn condition(gw: &Gateway, type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    let status = if ok { "True" } else { "False" };
    let previous = gw
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_ && c.status == status);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: gw.metadata.generation,
        last_transition_time: previous
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now())),
    }
}

fn not_accepted(gw: &Gateway, problem: &str) -> GatewayStatus {
    GatewayStatus {
        addresses: Vec::new(),
        conditions: vec![
            condition(gw, "Accepted", false, "ListenersNotValid", problem.to_string()),
            condition(
                gw,
                "Programmed",
                false,
                "Invalid",
                "not deployed: the Gateway is not accepted".into(),
            ),
        ],
    }
}

/// Accepted, and Programmed once the Service has an address and the
/// Deployment a ready pod (agents fail closed until then).
fn programmed(gw: &Gateway, service: &Service, deployment: &Deployment) -> GatewayStatus {
    let ips: Vec<String> = service
        .spec
        .as_ref()
        .map(|s| {
            s.cluster_ips
                .clone()
                .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
                .unwrap_or_default()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect();
    let want = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let (ns, name) = (gw.namespace(), gw.name());
    let (ok, reason, message) = if ips.is_empty() {
        (
            false,
            "AddressNotAssigned",
            format!("Service {ns}/{name} has no cluster IP yet"),
        )
    } else if ready == 0 {
        (
            false,
            "NoResources",
            format!("Deployment {ns}/{name} has no available replica yet (0 of {want}); traffic bound to this waypoint is refused until one is ready"),
        )
    } else {
        (
            true,
            "Programmed",
            format!("Resource programmed, assigned to service(s) {name}.{ns}.svc.cluster.local:{HBONE_PORT}"),
        )
    };
    GatewayStatus {
        addresses: ips
            .into_iter()
            .map(|value| GatewayAddress {
                type_: Some("IPAddress".into()),
                value,
            })
            .collect(),
        conditions: vec![
            condition(gw, "Accepted", true, "Accepted", "Resource accepted".into()),
            condition(gw, "Programmed", ok, reason, message),
        ],
    }
}

/// Whether the Gateway shows `status` already: its addresses, and our
/// conditions, by type, beside other writers' (the binding summary of
/// `bindings`, written under its own field manager).
fn shows(gw: &Gateway, status: &GatewayStatus) -> bool {
    let Some(now) = &gw.status else { return false };
    let ours = |c: &&Condition| status.conditions.iter().any(|s| s.type_ == c.type_);
    now.addresses == status.addresses && now.conditions.iter().filter(ours).eq(status.conditions.iter())
}

/// Writes the status when it differs from the Gateway's.
async fn write_status(client: &Client, gw: &Gateway, status: GatewayStatus) -> Result<(), ReconcileError> {
    if shows(gw, &status) {
        return Ok(());
    }
    let api: Api<Gateway> = Api::namespaced(client.clone(), gw.namespace());
    let patch = serde_json::json!({
        "apiVersion": cluster::kube::gateway::API_VERSION,
        "kind": cluster::kube::gateway::KIND,
        "metadata": {"name": gw.name(), "namespace": gw.namespace()},
        "status": status,
    });
    api.patch_status(
        gw.name(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| ReconcileError::Status {
        namespace: gw.namespace().into(),
        name: gw.name().into(),
        source,
    })?;
    tracing::info!(gateway = %format!("{}/{}", gw.namespace(), gw.name()), conditions = ?status.conditions.iter().map(|c| format!("{}={} ({})", c.type_, c.status, c.reason)).collect::<Vec<_>>(), "gateway status");
    Ok(())
}

/// ClusterRoleBindings cannot be owned by a Gateway (cluster-scoped
/// dependents of a namespaced owner are never collected), so they are
/// deleted here: when their Gateway is deleted, and at start (and after
/// every re-list) those whose Gateway is gone.
async fn remove_orphan_bindings(client: Client) {
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let stream = watcher(Api::<Gateway>::all(client), watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing = BTreeSet::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(gw)) => {
                if gw.is_waypoint() {
                    listing.insert(objects::binding_name(gw.namespace(), gw.name()));
                }
            }
            Ok(watcher::Event::InitDone) => sweep(&bindings, &listing).await,
            Ok(watcher::Event::Delete(gw)) if gw.is_waypoint() => {
                delete_binding(&bindings, &objects::binding_name(gw.namespace(), gw.name())).await
            }
            Ok(watcher::Event::Delete(_)) => {}
            Ok(watcher::Event::Apply(_)) => {}
            Err(e) => tracing::warn!(error = %e, "gateway watch (binding cleanup) failing; retrying"),
        }
    }
}

async fn sweep(bindings: &Api<ClusterRoleBinding>, keep: &BTreeSet<String>) {
    let lp = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}"));
    match bindings.list(&lp).await {
        Ok(list) => {
            for b in list.items {
                let name = b.metadata.name.unwrap_or_default();
                if !keep.contains(&name) {
                    delete_binding(bindings, &name).await;
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list waypoint ClusterRoleBindings; orphans stay until the next re-list")
        }
    }
}

async fn delete_binding(bindings: &Api<ClusterRoleBinding>, name: &str) {
    match bindings.delete(name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(binding = name, "removed the ClusterRoleBinding of a deleted waypoint"),
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => {
            tracing::warn!(binding = name, error = %e, "cannot remove the ClusterRoleBinding of a deleted waypoint")
        }
    }
}
