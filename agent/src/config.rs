//! Configuration: the agent's own settings (flags / environment, one typed
//! struct logged at start, built by `cli`). The cluster model (the local
//! YAML enrolment source and what `k8s::model` translates into) is shared
//! with the waypoint and lives in the `cluster` crate; it is re-exported
//! here.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Serialize;

pub use cluster::config::*;

/// Settings of one agent process. Every field is a flag of `agent run`
/// (`cli::RunArgs`, which documents the defaults); the whole struct is
/// logged at start.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Name of the node this agent serves; only pods with this `node` are enrolled.
    pub node: String,
    /// Where pods, services and policies come from.
    pub source: Source,
    /// Network namespace of the node (joined with setns at start); `None` = current.
    pub node_netns: Option<PathBuf>,
    /// cgroup v2 directory the cgroup programs attach to (all pods must be below it).
    pub cgroup_parent: PathBuf,
    /// A bpffs mount; pins live in `<bpffs>/<pin_name>/v1`.
    pub bpffs: PathBuf,
    pub pin_name: String,
    /// Load the kernel programs from this file instead of the embedded object.
    pub bpf_object: Option<PathBuf>,
    /// Log every capture decision of the kernel programs (aya-log, target `bpf`).
    pub bpf_log: bool,
    /// Sockmap acceleration of the in-pod hops whose reader is the agent.
    pub sockmap: bool,
    /// Phase two: the hops whose reader is the app too (needs `sockmap`).
    pub sockmap_to_app: bool,
    /// The kernel path: plain hops forwarded in the kernel (needs
    /// `sockmap_to_app`).
    pub sockmap_forward: bool,
    /// How long open connections may finish after SIGTERM.
    #[serde(serialize_with = "human")]
    pub drain_timeout: Duration,
    /// How often the enrolment file is checked for changes.
    #[serde(serialize_with = "human")]
    pub reload_interval: Duration,
    /// Data-plane threads; 0 runs the data plane on the main thread.
    pub worker_threads: usize,
    /// Trust domain of workload identities (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// The CA and this node's credential; `None` runs capture without identities.
    pub ca: Option<mesh::ca::CaClientConfig>,
    /// Requested lifetime of workload certificates (the CA may cap it).
    #[serde(serialize_with = "human")]
    pub cert_lifetime: Duration,
    /// How long a connection of a pod whose certificate is still on the way
    /// waits for it before it is refused (fail closed).
    #[serde(serialize_with = "human")]
    pub cert_wait: Duration,
    /// Readiness waits this long for every enrolled pod's certificate; past
    /// it the agent reports ready (degraded) so a rollout is not stuck.
    #[serde(serialize_with = "human")]
    pub cert_ready_timeout: Duration,
    /// Bound on each TCP connect (to an app or a peer's 15008) and each
    /// TLS + HTTP/2 handshake; a CONNECT answer may take twice as long.
    #[serde(serialize_with = "human")]
    pub connect_timeout: Duration,
    /// Connections (accepted sockets and HBONE streams) one pod may have
    /// open through the agent at once; more are refused, so no single pod
    /// can starve the others of file descriptors (default derived from the
    /// open-file limit, see `cli`).
    pub max_connections_per_pod: usize,
    /// Prometheus (`/metrics`), readiness (`/healthz/ready`), admin (`/config_dump`, loopback only).
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

fn human<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// The agent's source of truth.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A local YAML enrolment file (schema: README "Local configuration"), re-read every `reload_interval`.
    File(PathBuf),
    Kubernetes(KubeSettings),
}

/// The Kubernetes source (README "Install on a cluster").
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSettings {
    /// `None`: $KUBECONFIG, ~/.kube/config, else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// The agent's own pod (never enrolled).
    pub own_pod_uid: Option<String>,
    /// The chained CNI plugin's socket; `None` = no CNI plugin (new pods are
    /// captured once discovered, after they started).
    pub cni_socket: Option<PathBuf>,
    /// The host's /proc (the agent pod needs hostPID) and cgroup v2 mount.
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// The host's network namespace (host-network pods share it).
    pub host_netns: PathBuf,
}
