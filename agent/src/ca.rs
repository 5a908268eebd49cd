//! `agent ca ...`: the mesh CA as a mode of the agent binary. It decides who
//! may have which identity from the same pod list the agents use: the local
//! enrolment file, or the Kubernetes API (agents then authenticate with
//! their service-account token, checked by TokenReview).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
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
            .any(|p| p.namespace == id.namespace && p.service_account == id.service_account);
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
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| format!("the token's pod {key} is not scheduled to a node; refusing"))
}

#[tonic::async_trait]
impl Authorizer for KubeAuthorizer {
    async fn node_of_token(&self, token: &str) -> Result<String, String> {
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
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.agent_user {
            return Err(format!(
                "{username} is not the agents' service account {}",
                self.agent_user
            ));
        }
        let extra = user.extra.unwrap_or_default();
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
        let found = self.pods.state().iter().any(|p| {
            let spec = p.spec.as_ref();
            p.metadata.namespace.as_deref() == Some(&id.namespace)
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == id.service_account
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
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
