//! The workload model the data path consults: which IPs belong to mesh pods
//! and what identity each has. Rebuilt from the configuration on every
//! change; readers take a cheap snapshot.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use mesh::identity::SpiffeId;

use crate::config::LocalConfig;

/// A mesh workload as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: String,
    pub identity: SpiffeId,
}

#[derive(Clone, Default)]
pub struct Workloads(Arc<RwLock<Arc<HashMap<IpAddr, Workload>>>>);

impl Workloads {
    /// Every pod in the configuration is in the mesh (HBONE), on any node.
    pub fn update(&self, cfg: &LocalConfig, trust_domain: &str) {
        let index: HashMap<IpAddr, Workload> = cfg
            .pods
            .iter()
            .flat_map(|p| {
                let w = Workload {
                    key: p.key(),
                    identity: SpiffeId::new(trust_domain, &p.namespace, &p.service_account),
                };
                p.ips.iter().map(move |ip| (*ip, w.clone()))
            })
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(index);
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Workload> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip.to_canonical())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_every_ip_of_every_pod() {
        let cfg = LocalConfig::parse(
            std::path::Path::new("m.yaml"),
            "pods:\n  - {name: a, namespace: ns1, serviceAccount: sa1, node: n1, netns: /x, cgroup: /y, ips: [\"10.0.0.1\", \"fd00::1\"]}\n",
        )
        .unwrap();
        let w = Workloads::default();
        w.update(&cfg, "td");
        let id = SpiffeId::new("td", "ns1", "sa1");
        assert_eq!(w.by_ip("10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(w.by_ip("::ffff:10.0.0.1".parse().unwrap()).unwrap().identity, id);
        assert_eq!(w.by_ip("fd00::1".parse().unwrap()).unwrap().key, "ns1/a");
        assert!(w.by_ip("10.0.0.2".parse().unwrap()).is_none());
    }
}
