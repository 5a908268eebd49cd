//! `agent ca ...`: the mesh CA as a mode of the agent binary. It decides who
//! may have which identity from the same pod list the agents use: the local
//! enrolment file, or the Kubernetes API (agents then authenticate with
//! their service-account token, checked by TokenReview).
//!
//! On Kubernetes a waypoint pod authenticates itself, with its own projected
//! token (audience `mesh-ca`): it gets its own service account's identity,
//! and only if it really is a waypoint, i.e. it carries the label
//! `gateway.networking.k8s.io/gateway-name: <g>` of a Gateway `<g>` of class
//! `istio-waypoint` in its namespace and runs as that Gateway's service
//! account (named after it, as the waypoint controller makes it).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};
use mesh::{
    ca::{self, Authorizer, CaClient, CaClientConfig, CaFiles},
    identity::{SpiffeId, WorkloadCert},
};

use crate::config::LocalConfig;

/// The audience agents' projected tokens are minted for (deploy/agent.yaml).
pub const TOKEN_AUDIENCE: &str = "mesh-ca";
/// TokenReview extras of a pod-bound token: its node (Kubernetes 1.30+),
/// and the pod's name and UID (every version with bound tokens).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// The waypoint model (Gateway API, Istio's names).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
const WAYPOINT_CLASS: &str = "istio-waypoint";
/// How a waypoint caller is named where the CA names a node (node names
/// are DNS subdomains: no ':' or '/', so the two never collide).
const WAYPOINT_CALLER: &str = "waypoint:";

/// Where the CA learns which pods run where.
pub enum PodSource {
    File(PathBuf),
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// `namespace/name` of the agents' service account.
        agent_service_account: String,
    },
}

/// A node may impersonate a service account only if a pod of it runs there.
pub struct ConfigAuthorizer {
    pub config: PathBuf,
}

#[tonic::async_trait]
impl Authorizer for ConfigAuthorizer {
    async fn may_impersonate(&self, node: &str, id: &SpiffeId) -> Result<(), String> {
        // Read per request: the file is small and the answer must be current.
        let cfg = LocalConfig::load(&self.config).map_err(|e| format!("cannot read the pod list: {e}"))?;
        let found = cfg
            .mesh_pods_on(node)
            .any(|p| *p.namespace == *id.namespace && *p.service_account == *id.service_account);
        found.then_some(()).ok_or_else(|| not_on_node(node, id))
    }
}

fn not_on_node(node: &str, id: &SpiffeId) -> String {
    format!(
        "no pod of service account {}/{} runs on node {node}",
        id.namespace, id.service_account
    )
}

/// Kubernetes: tokens by TokenReview, pods from a reflector.
pub struct KubeAuthorizer {
    client: Client,
    pods: reflector::Store<Pod>,
    /// `system:serviceaccount:<ns>:<name>` of the agents.
    agent_user: String,
    /// The agents' namespace (their pods are there).
    agent_namespace: String,
}

impl KubeAuthorizer {
    /// Starts the pod watch and waits for its first list.
    pub async fn start(client: Client, agent_service_account: &str) -> anyhow::Result<Self> {
        let (ns, name) = agent_service_account
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("--agent-service-account must be namespace/name"))?;
        let (pods, writer) = reflector::store();
        let stream = watcher(Api::<Pod>::all(client.clone()), Default::default())
            .default_backoff()
            .modify(crate::k8s::model::project_pod)
            .reflect(writer);
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = futures::StreamExt::next(&mut stream).await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "pod watch failing; retrying");
                }
            }
        });
        pods.wait_until_ready().await?;
        Ok(Self {
            client,
            pods,
            agent_user: format!("system:serviceaccount:{ns}:{name}"),
            agent_namespace: ns.to_string(),
        })
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<Pod>> {
        self.pods.get(&reflector::ObjectRef::new(name).within(namespace))
    }
}

/// Why the API server did not authenticate a token, with what to fix.
fn not_authenticated(error: Option<String>) -> String {
    let error = error.unwrap_or_else(|| "no reason given".into());
    let hint = if error.contains("invalid for the target audiences") {
        format!("the agent must present a projected service-account token with audience {TOKEN_AUDIENCE} (deploy/agent.yaml), not a legacy or API-server token")
    } else if error.contains("expired") {
        "the agent's token has expired: the kubelet refreshes projected tokens, so check that the agent reads the mounted file".into()
    } else if error.contains("invalidated") || error.contains("pod UID") {
        "the pod the token was bound to is gone or was re-created: only a live agent pod's token is accepted".into()
    } else {
        "the token is not a valid service-account token of this cluster".into()
    };
    format!("the API server did not authenticate the token ({error}): {hint}")
}

/// A TokenReview answer proves the token was minted for the CA only if it
/// names the CA's audience: an authenticator that ignores audiences answers
/// with none, and would accept a token minted for any other service.
fn check_audience(audiences: &[String]) -> Result<(), String> {
    if audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Ok(());
    }
    Err(format!(
        "the TokenReview answer does not confirm the audience {TOKEN_AUDIENCE} (status.audiences {audiences:?}): \
         the API server's token authenticator ignores audiences, so a token minted for another service would pass; \
         refusing (the CA needs an audience-aware TokenReview, as kube-apiserver's own)"
    ))
}

/// Older API servers put no node in the token: the node of the pod it is
/// bound to, if that pod (same name *and* UID) is in the CA's pod list.
fn node_of_bound_pod(
    namespace: &str,
    name: &str,
    token_uid: Option<&str>,
    found: Option<&Pod>,
) -> Result<String, String> {
    bound_pod(namespace, name, token_uid, found)?
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| format!("the token's pod {namespace}/{name} is not scheduled to a node; refusing"))
}

/// A waypoint pod that presented its own token: it may have exactly its
/// service account's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WaypointCaller {
    namespace: String,
    pod: String,
    service_account: String,
}

impl WaypointCaller {
    /// As the CA service carries it (where an agent's node name goes).
    fn encode(&self) -> String {
        format!(
            "{WAYPOINT_CALLER}{}/{}/{}",
            self.namespace, self.pod, self.service_account
        )
    }

    fn decode(caller: &str) -> Option<Self> {
        let mut parts = caller.strip_prefix(WAYPOINT_CALLER)?.splitn(3, '/');
        Some(Self {
            namespace: parts.next()?.into(),
            pod: parts.next()?.into(),
            service_account: parts.next()?.into(),
        })
    }

    fn may_have(&self, id: &SpiffeId) -> Result<(), String> {
        if *id.namespace == *self.namespace && *id.service_account == *self.service_account {
            return Ok(());
        }
        Err(format!(
            "waypoint pod {}/{} may have only its own service account's identity ({}/{}), not {}/{}",
            self.namespace, self.pod, self.namespace, self.service_account, id.namespace, id.service_account
        ))
    }
}

/// The pod a token is bound to (same name *and* UID) from the CA's pod list.
fn bound_pod<'a>(
    namespace: &str,
    name: &str,
    token_uid: Option<&str>,
    found: Option<&'a Pod>,
) -> Result<&'a Pod, String> {
    let key = format!("{namespace}/{name}");
    let token_uid = token_uid.ok_or_else(|| {
        format!("the token names pod {key} but not its UID ({POD_UID_EXTRA}); refusing: use a projected service-account token")
    })?;
    let pod = found.ok_or_else(|| format!("the token's pod {key} is not in the CA's pod list (deleted?); refusing"))?;
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if uid != token_uid {
        return Err(format!(
            "the token is bound to pod {key} with UID {token_uid}, but that pod now has UID {uid} \
             (deleted and re-created); refusing a token of a pod that no longer exists"
        ));
    }
    Ok(pod)
}

/// The Gateway a token's pod is the waypoint of: the pod runs as the
/// token's service account, is not finished, and carries the gateway-name
/// label; the Gateway's service account (its name) is the pod's.
fn waypoint_gateway_of(pod: &Pod, key: &str, token_sa: &str) -> Result<String, String> {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if sa != token_sa {
        return Err(format!(
            "pod {key} runs as service account {sa}, the token is {token_sa}'s; refusing"
        ));
    }
    if mesh_cni::membership::finished(pod.status.as_ref().and_then(|s| s.phase.as_deref())) {
        return Err(format!("pod {key} has finished; refusing its token"));
    }
    let gateway = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(GATEWAY_NAME_LABEL))
        .ok_or_else(|| {
            format!(
                "pod {key} is not a waypoint (no label {GATEWAY_NAME_LABEL}): only agents and waypoint pods \
                 may ask the CA with their own token"
            )
        })?;
    if gateway != sa {
        return Err(format!(
            "pod {key} claims to be a pod of waypoint {gateway}, which runs as service account {gateway}, \
             but the pod runs as {sa}; refusing (waypoint pods are made by the waypoint controller)"
        ));
    }
    Ok(gateway.clone())
}

/// The Gateway `namespace/name` is a waypoint (`class`: its gatewayClassName, None: no such Gateway).
fn check_waypoint_class(namespace: &str, name: &str, class: Option<&str>) -> Result<(), String> {
    match class {
        Some(WAYPOINT_CLASS) => Ok(()),
        Some(other) => Err(format!(
            "Gateway {namespace}/{name} is of class {other}, not {WAYPOINT_CLASS}: its pods are not waypoints"
        )),
        None => Err(format!(
            "the pod names Gateway {namespace}/{name} (label {GATEWAY_NAME_LABEL}), which does not exist; refusing"
        )),
    }
}

impl KubeAuthorizer {
    /// The authenticated user of `token` (TokenReview, audience mesh-ca).
    async fn review(&self, token: &str) -> Result<k8s_openapi::api::authentication::v1::UserInfo, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = api
            .create(&Default::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(not_authenticated(status.error));
        }
        check_audience(status.audiences.as_deref().unwrap_or_default())?;
        Ok(status.user.unwrap_or_default())
    }

    /// The gatewayClassName of Gateway `namespace/name` (None: no such Gateway).
    async fn gateway_class(&self, namespace: &str, name: &str) -> Result<Option<String>, String> {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "gateways");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        match api.get_opt(name).await {
            Ok(gw) => Ok(gw.map(|g| {
                g.data["spec"]["gatewayClassName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })),
            // The Gateway API is not installed: no Gateway, no waypoint.
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
            Err(e) => Err(format!("cannot look up Gateway {namespace}/{name}: {e}")),
        }
    }

    /// A token of another service account than the agents': a waypoint pod's.
    async fn waypoint_caller(&self, username: &str, extra: &BTreeMap<String, Vec<String>>) -> Result<String, String> {
        let not_agent = format!("{username} is not the agents' service account {}", self.agent_user);
        let (namespace, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .ok_or_else(|| format!("{not_agent}, nor a service account"))?;
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = first(POD_NAME_EXTRA).ok_or_else(|| {
            format!("{not_agent}, and its token is not bound to a pod (a waypoint must present its projected token)")
        })?;
        let key = format!("{namespace}/{pod}");
        let found = self.pod(namespace, &pod);
        let waypoint = bound_pod(namespace, &pod, first(POD_UID_EXTRA).as_deref(), found.as_deref())
            .and_then(|p| waypoint_gateway_of(p, &key, sa))
            .map_err(|e| format!("{not_agent}, nor a waypoint's: {e}"))?;
        let class = self.gateway_class(namespace, &waypoint).await?;
        check_waypoint_class(namespace, &waypoint, class.as_deref())
            .map_err(|e| format!("{not_agent}, nor a waypoint's: {e}"))?;
        Ok(WaypointCaller {
            namespace: namespace.into(),
            pod,
            service_account: sa.into(),
        }
        .encode())
    }
}

#[tonic::async_trait]
impl Authorizer for KubeAuthorizer {
    /// An agent's token names its node; a waypoint pod's token names the
    /// waypoint (see [`WaypointCaller`]).
    async fn node_of_token(&self, token: &str) -> Result<String, String> {
        let user = self.review(token).await?;
        let username = user.username.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        if username != self.agent_user {
            return self.waypoint_caller(&username, &extra).await;
        }
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(node);
        }
        // Older API servers: the pod the token is bound to tells the node.
        let pod = first(POD_NAME_EXTRA)
            .ok_or("the token is not bound to a pod on a node (use a projected service-account token)")?;
        let found = self.pod(&self.agent_namespace, &pod);
        node_of_bound_pod(
            &self.agent_namespace,
            &pod,
            first(POD_UID_EXTRA).as_deref(),
            found.as_deref(),
        )
    }

    async fn may_impersonate(&self, node: &str, id: &SpiffeId) -> Result<(), String> {
        if let Some(waypoint) = WaypointCaller::decode(node) {
            return waypoint.may_have(id);
        }
        let found = self.pods.state().iter().any(|p| {
            let spec = p.spec.as_ref();
            p.metadata.namespace.as_deref() == Some(&id.namespace)
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == &*id.service_account
                && !mesh_cni::membership::finished(p.status.as_ref().and_then(|s| s.phase.as_deref()))
        });
        found.then_some(()).ok_or_else(|| not_on_node(node, id))
    }
}

/// Serves until SIGTERM/SIGINT.
pub async fn serve(dir: &Path, source: PodSource, listen: SocketAddr, max_lifetime: Duration) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let files = CaFiles::new(dir);
    match source {
        PodSource::File(config) => {
            ca::serve(&files, listen, ConfigAuthorizer { config }, max_lifetime, shutdown).await?
        }
        PodSource::Kubernetes {
            kubeconfig,
            agent_service_account,
        } => {
            let client = crate::k8s::client(kubeconfig.as_deref()).await?;
            let authz = KubeAuthorizer::start(client, &agent_service_account).await?;
            ca::serve(&files, listen, authz, max_lifetime, shutdown).await?
        }
    }
    Ok(())
}

/// `agent ca request`: one certificate, as a node agent would get it.
pub async fn request(cfg: &CaClientConfig, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert> {
    Ok(CaClient::new(cfg)?.fetch(id, lifetime).await?)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn pod(uid: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn audience_must_be_confirmed() {
        assert!(check_audience(&[TOKEN_AUDIENCE.into()]).is_ok());
        let e = check_audience(&[]).unwrap_err();
        assert!(e.contains("ignores audiences"), "{e}");
        let e = check_audience(&["https://kubernetes.default.svc".into()]).unwrap_err();
        assert!(e.contains("does not confirm the audience mesh-ca"), "{e}");
    }

    #[test]
    fn bound_pod_must_match_name_and_uid() {
        let p = pod("uid-a", Some("node1"));
        assert_eq!(
            node_of_bound_pod("mesh", "agent-1", Some("uid-a"), Some(&p)).unwrap(),
            "node1"
        );
        let e = node_of_bound_pod("mesh", "agent-1", Some("uid-old"), Some(&p)).unwrap_err();
        assert!(e.contains("now has UID uid-a") && e.contains("uid-old"), "{e}");
        let e = node_of_bound_pod("mesh", "agent-1", None, Some(&p)).unwrap_err();
        assert!(e.contains("not its UID"), "{e}");
        let e = node_of_bound_pod("mesh", "agent-1", Some("uid-a"), None).unwrap_err();
        assert!(e.contains("not in the CA's pod list"), "{e}");
        let e = node_of_bound_pod("mesh", "agent-1", Some("uid-a"), Some(&pod("uid-a", None))).unwrap_err();
        assert!(e.contains("not scheduled"), "{e}");
    }

    fn waypoint_pod(sa: &str, labels: &[(&str, &str)], phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                ..Default::default()
            }),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_waypoint_pod_is_labelled_with_its_gateway_and_runs_as_it() {
        let label = [(GATEWAY_NAME_LABEL, "wp")];
        let p = waypoint_pod("wp", &label, "Running");
        assert_eq!(waypoint_gateway_of(&p, "apps/wp-1", "wp").unwrap(), "wp");
        let e = waypoint_gateway_of(&waypoint_pod("web", &[], "Running"), "apps/web-1", "web").unwrap_err();
        assert!(
            e.contains("not a waypoint (no label gateway.networking.k8s.io/gateway-name)"),
            "{e}"
        );
        let e = waypoint_gateway_of(&waypoint_pod("web", &label, "Running"), "apps/web-1", "web").unwrap_err();
        assert!(
            e.contains("claims to be a pod of waypoint wp") && e.contains("runs as web"),
            "{e}"
        );
        let e = waypoint_gateway_of(&p, "apps/wp-1", "other").unwrap_err();
        assert!(e.contains("the token is other's"), "{e}");
        let e = waypoint_gateway_of(&waypoint_pod("wp", &label, "Failed"), "apps/wp-1", "wp").unwrap_err();
        assert!(e.contains("has finished"), "{e}");
        assert!(check_waypoint_class("apps", "wp", Some("istio-waypoint")).is_ok());
        let e = check_waypoint_class("apps", "wp", Some("istio")).unwrap_err();
        assert!(e.contains("of class istio, not istio-waypoint"), "{e}");
        let e = check_waypoint_class("apps", "wp", None).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn a_waypoint_caller_may_have_its_own_identity_only() {
        let w = WaypointCaller {
            namespace: "apps".into(),
            pod: "wp-1".into(),
            service_account: "wp".into(),
        };
        let encoded = w.encode();
        assert_eq!(WaypointCaller::decode(&encoded), Some(w.clone()));
        // A node name can never decode as a waypoint.
        assert_eq!(WaypointCaller::decode("node1"), None);
        let id = |ns: &str, sa: &str| SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        };
        assert!(w.may_have(&id("apps", "wp")).is_ok());
        let e = w.may_have(&id("apps", "web")).unwrap_err();
        assert!(
            e.contains("only its own service account's identity (apps/wp), not apps/web"),
            "{e}"
        );
        assert!(w.may_have(&id("other", "wp")).is_err());
    }

    #[test]
    fn refusals_say_what_to_fix() {
        let e = not_authenticated(Some(
            "[invalid bearer token, token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences [\"mesh-ca\"]]".into(),
        ));
        assert!(e.contains("audience mesh-ca"), "{e}");
        assert!(not_authenticated(Some("service account token has expired".into())).contains("refreshes"));
        assert!(not_authenticated(Some("service account token has been invalidated".into())).contains("re-created"));
    }
}
