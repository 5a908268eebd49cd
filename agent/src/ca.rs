//! `agent ca ...`: the mesh CA as a mode of the agent binary. It decides who
//! may have which identity from the same pod list the agents use (the local
//! enrolment file now; the Kubernetes API later).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh::{
    ca::{self, Authorizer, CaClient, CaClientConfig, CaFiles},
    identity::{SpiffeId, WorkloadCert},
};

use crate::config::LocalConfig;

/// A node may impersonate a service account only if a pod of it runs there.
pub struct ConfigAuthorizer {
    pub config: PathBuf,
}

impl Authorizer for ConfigAuthorizer {
    fn may_impersonate(&self, node: &str, id: &SpiffeId) -> Result<(), String> {
        // Read per request: the file is small and the answer must be current.
        let cfg = LocalConfig::load(&self.config).map_err(|e| format!("cannot read the pod list: {e}"))?;
        let found = cfg
            .pods_on(node)
            .any(|p| p.namespace == id.namespace && p.service_account == id.service_account);
        if found {
            Ok(())
        } else {
            Err(format!(
                "no pod of service account {}/{} runs on node {node}",
                id.namespace, id.service_account
            ))
        }
    }
}

/// Serves until SIGTERM/SIGINT.
pub async fn serve(dir: &Path, config: PathBuf, listen: SocketAddr, max_lifetime: Duration) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    ca::serve(
        &CaFiles::new(dir),
        listen,
        ConfigAuthorizer { config },
        max_lifetime,
        shutdown,
    )
    .await?;
    Ok(())
}

/// `agent ca request`: one certificate, as a node agent would get it.
pub async fn request(cfg: &CaClientConfig, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert> {
    Ok(CaClient::new(cfg)?.fetch(id, lifetime).await?)
}
