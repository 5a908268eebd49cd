//! Workload certificates for the pods on this node: fetched ahead from the
//! CA, renewed at half-life, retried with backoff (0.5 s up to 150 s) while
//! the still-valid certificate stays in use, and dropped when the last pod of
//! the service account leaves. Keys live only in memory.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use mesh::{
    ca::{until, CaClient},
    identity::{SpiffeId, WorkloadCert},
};
use tokio::task::JoinHandle;

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(150);

type Store = Arc<RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>>;

/// Read access to the current certificates, for the data path.
#[derive(Clone, Default)]
pub struct CertStore(Store);

impl CertStore {
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// What the config dump shows: identity, serial, expiry; never keys.
    pub fn dump(&self) -> Vec<CertInfo> {
        let certs = self.0.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CertInfo> = certs
            .values()
            .map(|c| CertInfo {
                identity: c.id.to_string(),
                serial: c.serial.clone(),
                expires_in_s: until(c.not_after).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// What the config dump shows of a certificate (never the key).
#[derive(Debug, serde::Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    pub expires_in_s: u64,
}

pub struct SecretManager {
    client: CaClient,
    lifetime: Duration,
    certs: Store,
    tasks: HashMap<SpiffeId, JoinHandle<()>>,
}

impl SecretManager {
    pub fn new(client: CaClient, lifetime: Duration) -> Self {
        Self {
            client,
            lifetime,
            certs: Store::default(),
            tasks: HashMap::new(),
        }
    }

    /// Keeps certificates for exactly `ids`.
    pub fn set_wanted(&mut self, ids: &BTreeSet<SpiffeId>) {
        self.tasks.retain(|id, task| {
            let keep = ids.contains(id);
            if !keep {
                task.abort();
                self.certs.write().unwrap_or_else(|e| e.into_inner()).remove(id);
                tracing::info!(identity = %id, "workload certificate dropped: no pod of it is left on this node");
            }
            keep
        });
        for id in ids {
            if !self.tasks.contains_key(id) {
                let task = tokio::spawn(keep_fresh(
                    self.client.clone(),
                    id.clone(),
                    self.lifetime,
                    self.certs.clone(),
                ));
                self.tasks.insert(id.clone(), task);
            }
        }
    }

    /// A handle on the certificates for the data path.
    pub fn store(&self) -> CertStore {
        CertStore(self.certs.clone())
    }
}

impl Drop for SecretManager {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

/// Fetches `id`'s certificate and keeps it fresh until aborted.
async fn keep_fresh(client: CaClient, id: SpiffeId, lifetime: Duration, certs: Store) {
    let mut backoff = BACKOFF_START;
    loop {
        match client.fetch(&id, lifetime).await {
            Ok(cert) => {
                let refresh = until(cert.refresh_at());
                tracing::info!(
                    identity = %id,
                    serial = %cert.serial,
                    expires_in_s = until(cert.not_after).as_secs(),
                    renew_in_s = refresh.as_secs(),
                    "workload certificate ready"
                );
                certs
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), Arc::new(cert));
                backoff = BACKOFF_START;
                tokio::time::sleep(refresh.max(Duration::from_millis(100))).await;
            }
            Err(e) => {
                let valid = certs
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .is_some_and(|c| c.not_after > SystemTime::now());
                tracing::warn!(
                    identity = %id, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    still_valid_certificate = valid,
                    "cannot get a workload certificate; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
