//! The model the data path consults: which IPs belong to mesh pods, their
//! identities and labels, and the authorization policies. Rebuilt from the
//! configuration on every change; readers take a cheap snapshot.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use mesh::identity::SpiffeId;

use crate::{
    config::LocalConfig,
    rbac::{self, AuthorizationPolicy, PeerAuthentication},
};

/// A mesh workload as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: String,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
}

/// One consistent view of workloads and policies.
#[derive(Default)]
pub struct Snapshot {
    pub workloads: HashMap<IpAddr, Workload>,
    pub policies: Vec<AuthorizationPolicy>,
    pub peer_auths: Vec<PeerAuthentication>,
}

impl Snapshot {
    /// Whether `conn` may reach the workload at `dst_ip`: PeerAuthentication
    /// first (STRICT needs an identity), then authorization policies.
    pub fn authorize(&self, dst_ip: IpAddr, conn: &rbac::Conn) -> Result<(), rbac::Denied> {
        let Some(w) = self.workloads.get(&dst_ip.to_canonical()) else {
            return Err(rbac::Denied(format!("{dst_ip} is not a known workload")));
        };
        let target = rbac::Target {
            namespace: &w.identity.namespace,
            labels: &w.labels,
        };
        if conn.principal.is_none() && rbac::mtls_mode(&self.peer_auths, &target) == rbac::MtlsMode::Strict {
            return Err(rbac::Denied(
                "STRICT mTLS: plaintext connections are not accepted".into(),
            ));
        }
        rbac::authorize(&self.policies, &target, conn)
    }
}

#[derive(Clone, Default)]
pub struct State(Arc<RwLock<Arc<Snapshot>>>);

impl State {
    /// Every pod in the configuration is in the mesh (HBONE), on any node.
    pub fn update(&self, cfg: &LocalConfig, trust_domain: &str) {
        let workloads: HashMap<IpAddr, Workload> = cfg
            .pods
            .iter()
            .flat_map(|p| {
                let w = Workload {
                    key: p.key(),
                    identity: SpiffeId::new(trust_domain, &p.namespace, &p.service_account),
                    labels: p.labels.clone(),
                };
                p.ips.iter().map(move |ip| (*ip, w.clone()))
            })
            .collect();
        let snap = Snapshot {
            workloads,
            policies: cfg.authorization_policies.clone(),
            peer_auths: cfg.peer_authentications.clone(),
        };
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Workload> {
        self.snapshot().workloads.get(&ip.to_canonical()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.0.1\", \"fd00::1\"], labels: {app: a}}\npeerAuthentications:\n  - {name: s, namespace: ns1, mode: STRICT}\n";

    #[test]
    fn indexes_every_ip_of_every_pod() {
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), CFG).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let id = SpiffeId::new("td", "ns1", "sa1");
        assert_eq!(s.by_ip("10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(s.by_ip("::ffff:10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(s.by_ip("fd00::1".parse().unwrap()).unwrap().key, "ns1/a");
        assert!(s.by_ip("10.0.0.2".parse().unwrap()).is_none());
    }

    #[test]
    fn strict_denies_plaintext_and_unknown_destinations_are_denied() {
        let cfg = LocalConfig::parse(std::path::Path::new("m.yaml"), CFG).unwrap();
        let s = State::default();
        s.update(&cfg, "td");
        let snap = s.snapshot();
        let plain = rbac::Conn {
            principal: None,
            src_ip: "10.9.9.9".parse().unwrap(),
            dst_port: 80,
        };
        assert!(snap
            .authorize("10.0.0.1".parse().unwrap(), &plain)
            .unwrap_err()
            .0
            .contains("STRICT"));
        let mtls = rbac::Conn {
            principal: Some(SpiffeId::new("td", "ns2", "x")),
            ..plain
        };
        assert!(snap.authorize("10.0.0.1".parse().unwrap(), &mtls).is_ok());
        assert!(snap.authorize("10.0.0.7".parse().unwrap(), &mtls).is_err());
    }
}
