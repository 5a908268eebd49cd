//! Kubernetes objects for a testbed cluster as the stand-in API server
//! ([`crate::apiserver`]) serves them, and the kubelet's cgroup layout of
//! their pods (`kubepods/burstable/pod<uid>/<container>`), where the
//! agent's Kubernetes source finds them by UID. Shared by the Kubernetes
//! end-to-end tests and the soak.
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeAddress, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};

use crate::{apiserver::meta, Cluster};

/// The container directory every pod's app runs in.
const CONTAINER: &str = "cri-containerd-0a1b2c.scope";

/// A namespace, labelled for ambient mode when `ambient`.
pub fn namespace(name: &str, ambient: bool) -> Namespace {
    let labels: &[(&str, &str)] = if ambient {
        &[("istio.io/dataplane-mode", "ambient")]
    } else {
        &[]
    };
    Namespace {
        metadata: meta(None, name, labels),
        ..Default::default()
    }
}

/// The UID of pod `name` (derived from the name: the same in every run).
pub fn uid_of(name: &str) -> String {
    let n: u64 = name.bytes().map(u64::from).sum();
    format!("7e57{n:04x}-0000-4000-8000-{:012x}", name.len())
}

/// A pod of the test cluster as the API shows it (IPs only once running);
/// its service account is its name.
pub fn pod(cluster: &Cluster, name: &str, ns: &str, labels: &[(&str, &str)], running: bool) -> Pod {
    let p = cluster.pod(name);
    let mut m = meta(Some(ns), name, labels);
    m.uid = Some(uid_of(name));
    Pod {
        metadata: m,
        spec: Some(PodSpec {
            node_name: Some(p.node.clone()),
            service_account_name: Some(name.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("meshapp".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(if running { "Running" } else { "Pending" }.into()),
            pod_ip: running.then(|| p.ip4.to_string()),
            pod_ips: running.then(|| vec![PodIP { ip: p.ip4.to_string() }, PodIP { ip: p.ip6.to_string() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if running { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A node, its link address as InternalIP.
pub fn node(cluster: &Cluster, name: &str) -> Node {
    Node {
        metadata: meta(None, name, &[]),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: cluster.node(name).link_ip4.to_string(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's cgroup as a kubelet (cgroupfs driver) lays it out below its node.
pub fn pod_cgroup(cluster: &Cluster, name: &str) -> PathBuf {
    let p = cluster.pod(name);
    cluster
        .node(&p.node)
        .cgroup
        .join(format!("kubepods/burstable/pod{}", uid_of(name)))
}

/// The cgroup of the pod's (only) container, where its processes run.
pub fn container_cgroup(cluster: &Cluster, name: &str) -> PathBuf {
    pod_cgroup(cluster, name).join(CONTAINER)
}
