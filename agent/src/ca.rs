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
/// TokenReview extra carrying the node of a pod-bound token (Kubernetes 1.30+).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

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

    fn node_of_pod(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .get(&reflector::ObjectRef::new(name).within(namespace))
            .and_then(|p| p.spec.as_ref()?.node_name.clone())
    }
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
            return Err(status.error.unwrap_or_else(|| "not authenticated".into()));
        }
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
        first(POD_NAME_EXTRA)
            .and_then(|pod| self.node_of_pod(&self.agent_namespace, &pod))
            .ok_or_else(|| "the token is not bound to a pod on a node (use a projected service-account token)".into())
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
