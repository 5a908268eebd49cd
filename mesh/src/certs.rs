//! Workload certificates (the agent: its pods' identities; the waypoint:
//! its own), shared by both: fetched ahead from the
//! CA, renewed at half-life, retried with backoff (0.5 s up to 150 s) while
//! the still-valid certificate stays in use, and dropped when the last pod of
//! the service account leaves. Keys live only in memory.
//!
//! The store also says which wanted identities have no valid certificate
//! yet (for readiness and the config dump), and lets a connection wait,
//! bounded, for a certificate that is on the way.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    ca::{until, CaClient},
    identity::{SpiffeId, WorkloadCert},
};
use tokio::{sync::Notify, task::JoinHandle};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(150);

/// One wanted identity.
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    /// Since when a pod of this node has needed it.
    wanted_since: Instant,
    /// Failed fetches since the last success, and why the last one failed.
    failures: u32,
    last_error: Option<String>,
}

impl Slot {
    /// Wanted since `since`, no certificate yet.
    fn wanted(since: Instant) -> Self {
        Slot {
            cert: None,
            wanted_since: since,
            failures: 0,
            last_error: None,
        }
    }
}

#[derive(Default)]
struct Shared {
    slots: RwLock<HashMap<SpiffeId, Slot>>,
    /// Woken whenever a certificate arrives.
    arrived: Notify,
}

/// Read access to the current certificates, for the data path, readiness
/// and the config dump.
#[derive(Clone, Default)]
pub struct CertStore(Arc<Shared>);

/// A wanted identity without a valid certificate.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Missing {
    pub identity: String,
    #[serde(skip)]
    pub waiting: Duration,
    pub waiting_s: u64,
    pub failures: u32,
    pub last_error: Option<String>,
}

impl CertStore {
    /// The identity's certificate, if it has one that is valid now.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let slots = self.0.slots.read().unwrap_or_else(|e| e.into_inner());
        let cert = slots.get(id)?.cert.as_ref()?;
        // An expired certificate (the CA was away for its whole second half)
        // is no identity: fail closed rather than present it.
        (cert.not_after > SystemTime::now()).then(|| cert.clone())
    }

    /// The certificate, waiting up to `within` for one that is on the way.
    pub async fn wait(&self, id: &SpiffeId, within: Duration) -> Option<Arc<WorkloadCert>> {
        // Every connection asks: the common case takes only the read lock.
        if let Some(c) = self.get(id) {
            return Some(c);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so an arrival in between is not lost.
            let arrived = self.0.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(c) = self.get(id) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.get(id);
            }
        }
    }

    /// Wanted identities without a valid certificate, longest waiting first.
    pub fn missing(&self) -> Vec<Missing> {
        let now = SystemTime::now();
        let slots = self.0.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Missing> = slots
            .iter()
            .filter(|(_, s)| s.cert.as_ref().is_none_or(|c| c.not_after <= now))
            .map(|(id, s)| Missing {
                identity: id.to_string(),
                waiting: s.wanted_since.elapsed(),
                waiting_s: s.wanted_since.elapsed().as_secs(),
                failures: s.failures,
                last_error: s.last_error.clone(),
            })
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.waiting));
        out
    }

    /// What the config dump shows: identity, serial, expiry; never keys.
    pub fn dump(&self) -> Vec<CertInfo> {
        let slots = self.0.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CertInfo> = slots
            .values()
            .filter_map(|s| s.cert.as_ref())
            .map(|c| CertInfo {
                identity: c.id.to_string(),
                serial: c.serial.clone(),
                expires_in_s: until(c.not_after).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Marks `id` wanted for `waiting`, without a certificate (tests of
    /// the store's readers, here and in the agent's readiness).
    #[doc(hidden)]
    pub fn want_for_test(&self, id: &SpiffeId, waiting: Duration, last_error: Option<&str>) {
        let mut slot = Slot::wanted(Instant::now() - waiting);
        slot.failures = u32::from(last_error.is_some());
        slot.last_error = last_error.map(str::to_string);
        self.0.slots.write().unwrap().insert(id.clone(), slot);
    }

    fn update(&self, id: &SpiffeId, f: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.0.slots.write().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            f(slot);
        }
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
    store: CertStore,
    tasks: HashMap<SpiffeId, JoinHandle<()>>,
}

impl SecretManager {
    pub fn new(client: CaClient, lifetime: Duration) -> Self {
        Self {
            client,
            lifetime,
            store: CertStore::default(),
            tasks: HashMap::new(),
        }
    }

    /// Keeps certificates for exactly `ids` (tasks run on the caller's
    /// runtime: the control path's).
    pub fn set_wanted(&mut self, ids: &BTreeSet<SpiffeId>) {
        let shared = &self.store.0;
        self.tasks.retain(|id, task| {
            let keep = ids.contains(id);
            if !keep {
                task.abort();
                shared.slots.write().unwrap_or_else(|e| e.into_inner()).remove(id);
                tracing::info!(identity = %id, "workload certificate dropped: no pod of it is left on this node");
            }
            keep
        });
        for id in ids {
            if !self.tasks.contains_key(id) {
                shared
                    .slots
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), Slot::wanted(Instant::now()));
                let task = tokio::spawn(keep_fresh(
                    self.client.clone(),
                    id.clone(),
                    self.lifetime,
                    self.store.clone(),
                ));
                self.tasks.insert(id.clone(), task);
            }
        }
    }

    /// A handle on the certificates for the data path.
    pub fn store(&self) -> CertStore {
        self.store.clone()
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
async fn keep_fresh(client: CaClient, id: SpiffeId, lifetime: Duration, store: CertStore) {
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
                store.update(&id, |s| {
                    s.cert = Some(Arc::new(cert));
                    s.failures = 0;
                    s.last_error = None;
                });
                store.0.arrived.notify_waiters();
                backoff = BACKOFF_START;
                tokio::time::sleep(refresh.max(Duration::from_millis(100))).await;
            }
            Err(e) => {
                let valid = store.get(&id).is_some();
                store.update(&id, |s| {
                    s.failures += 1;
                    s.last_error = Some(e.to_string());
                });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(id: &SpiffeId) -> WorkloadCert {
        let dir = std::env::temp_dir().join(format!("identity-{}-{}", id.service_account, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = crate::ca::CaFiles::new(&dir);
        files.init(&id.trust_domain, &[]).unwrap();
        let signer = crate::ca::Signer::load(&files, Duration::from_secs(3600)).unwrap();
        let (key, csr) = crate::identity::new_csr(id).unwrap();
        let chain = signer.sign(&csr, id, Duration::from_secs(600)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        WorkloadCert::new(id.clone(), chain, key).unwrap()
    }

    fn wanted(store: &CertStore, id: &SpiffeId) {
        store.want_for_test(id, Duration::ZERO, None);
    }

    fn arrive(store: &CertStore, c: WorkloadCert) {
        let id = c.id.clone();
        store.update(&id, |s| s.cert = Some(Arc::new(c)));
        store.0.arrived.notify_waiters();
    }

    #[tokio::test]
    async fn a_connection_waits_for_a_certificate_on_the_way_but_not_forever() {
        let id = SpiffeId::new("cluster.local", "default", "web");
        let store = CertStore::default();
        wanted(&store, &id);
        let started = Instant::now();
        assert!(store.wait(&id, Duration::from_millis(200)).await.is_none());
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "it waited the whole bound"
        );

        let c = cert(&id);
        let serial = c.serial.clone();
        let waiter = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move { store.wait(&id, Duration::from_secs(10)).await }
        });
        // Let the waiter park, then deliver: it wakes at once.
        tokio::task::yield_now().await;
        arrive(&store, c);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.unwrap().serial, serial);
    }

    #[test]
    fn missing_says_who_waits_and_why_and_expired_certificates_count_as_missing() {
        let id = SpiffeId::new("cluster.local", "default", "api");
        let store = CertStore::default();
        wanted(&store, &id);
        store.update(&id, |s| {
            s.failures = 3;
            s.last_error = Some("CA unreachable".into());
        });
        let m = store.missing();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].identity.as_str(), m[0].failures), (id.to_string().as_str(), 3));
        assert_eq!(m[0].last_error.as_deref(), Some("CA unreachable"));

        let mut c = cert(&id);
        arrive(&store, {
            c.not_after = SystemTime::now() - Duration::from_secs(1);
            c
        });
        assert!(store.get(&id).is_none(), "an expired certificate is no identity");
        assert_eq!(store.missing().len(), 1);
        arrive(&store, cert(&id));
        assert!(store.get(&id).is_some() && store.missing().is_empty());
    }
}
