//! End-to-end tests: real agents, real eBPF programs, real TLS, real sockets
//! in throwaway network namespaces and cgroups (root needed). One binary so
//! the slow tests share one build and one harness.
//!
//! Every test builds its own cluster:
//!   node1: client (enrolled), outsider (not enrolled)
//!   node2: server (enrolled), backend (not enrolled)
//! and tears it down (namespaces, cgroups, pins, processes) even on failure.
mod authz;
mod bpf_log;
mod capture;
mod controller;
mod discover;
mod hardening;
mod hbone;
mod identity;
mod interop;
mod kube;
mod sockmap;
mod steering;
mod upgrade;
mod waypoint;
mod waypoint_kube;
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use serde_json::Value;
use testbed::{
    mesh::{self, Agent, Settings},
    Cluster, ClusterSpec, NodeSpec,
};

pub const ENROLLED: &[&str] = &["client", "server"];
pub const APP_PORT: u16 = 8080;
pub const WAIT: Duration = Duration::from_secs(10);

pub struct World {
    pub cluster: Cluster,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Extra `agent run` flags of every agent the test starts
    /// ([`Accel::flags`] for the sockmap runs of the sockmap-sensitive tests).
    pub extra: Vec<&'static str>,
}

/// How a run accelerates the in-pod hops: the capture, restart, handover
/// and wire tests run every way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// No sockmap.
    Off,
    /// `--sockmap`: phase one (the hops whose reader is the agent).
    Sockmap,
    /// `--sockmap --sockmap-to-app`: phase two too (agent to app).
    ToApp,
    /// `--sockmap --sockmap-to-app --sockmap-forward`: the kernel path too
    /// (plain hops forwarded in the kernel).
    Forward,
}

impl Accel {
    /// The `agent run` flags.
    pub fn flags(self) -> Vec<&'static str> {
        match self {
            Accel::Off => vec![],
            Accel::Sockmap => vec!["--sockmap"],
            Accel::ToApp => vec!["--sockmap", "--sockmap-to-app"],
            Accel::Forward => vec!["--sockmap", "--sockmap-to-app", "--sockmap-forward"],
        }
    }

    /// A label suffix (labels name netns and pins).
    fn suffix(self) -> &'static str {
        match self {
            Accel::Off => "",
            Accel::Sockmap => "sm",
            Accel::ToApp => "s2",
            Accel::Forward => "sk",
        }
    }
}

impl World {
    /// [`World::new`] whose agents accelerate as `accel` says.
    pub fn with_sockmap(label: &str, accel: Accel) -> Result<World> {
        let mut w = World::new(&format!("{label}{}", accel.suffix()))?;
        w.extra = accel.flags();
        Ok(w)
    }

    pub fn new(label: &str) -> Result<World> {
        let spec = ClusterSpec::new(vec![
            NodeSpec::new("node1", &["client", "outsider"]),
            NodeSpec::new("node2", &["server", "backend"]),
        ]);
        let cluster = Cluster::create(label, &spec)?;
        let dir = cluster.scratch_dir()?;
        let config = dir.join("mesh.yaml");
        mesh::write_config(&cluster, &config, ENROLLED, &Settings::default())?;
        Ok(World {
            cluster,
            dir,
            config,
            extra: vec![],
        })
    }

    pub fn agent(&self, node: &str) -> Result<Agent> {
        let mut a = Agent::start(&self.cluster, node, &self.config, &self.dir, &self.extra)?;
        a.wait_for("agent ready", WAIT)?;
        Ok(a)
    }

    pub fn ip4(&self, pod: &str) -> String {
        self.cluster.pod(pod).ip4.to_string()
    }

    pub fn ip6(&self, pod: &str) -> String {
        self.cluster.pod(pod).ip6.to_string()
    }

    pub fn once(&self, from: &str, host: &str, port: u16) -> Result<Value> {
        mesh::client(self.cluster.pod(from), "once", host, port, &[])
    }
}

/// An agent on `node` with CA flags `ca_args` (plus `extra`), once ready and
/// holding the certificate of service account `sa`.
pub fn agent_with_ca(w: &World, node: &str, sa: &str, ca_args: &[String], extra: &[&str]) -> Result<Agent> {
    let mut args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let mut a = Agent::start(&w.cluster, node, &w.config, &w.dir, &args)?;
    a.wait_for("agent ready", WAIT)?;
    wait_certificate(&a, sa)?;
    Ok(a)
}

/// Waits (bounded) until `a` has the certificate of service account `sa`
/// (namespace `default`).
pub fn wait_certificate(a: &Agent, sa: &str) -> Result<()> {
    let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
    a.wait_access(WAIT, |_| {
        a.logs()
            .iter()
            .any(|l| l["message"] == "workload certificate ready" && l["identity"] == id)
    })?;
    Ok(())
}

/// Agents on node1 (client's certificate) and node2 (server's) with the CA
/// (and the world's extra flags).
pub fn agents(w: &World, ca: &mesh::MeshCa) -> Result<(Agent, Agent)> {
    Ok((
        agent_with_ca(w, "node1", "client", &ca.client_args("node1"), &w.extra)?,
        agent_with_ca(w, "node2", "server", &ca.client_args("node2"), &w.extra)?,
    ))
}

/// Established TCP connections from `pod` to `dst_ip`:15008, counted in the
/// pod's netns (the tunnel sockets the agent made there).
pub fn hbone_connections(w: &World, pod: &str, dst_ip: &str) -> Result<usize> {
    let ss = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &w.cluster.pod(pod).netns,
            "ss",
            "-Htn",
            "state",
            "established",
        ])
        .arg(format!("dst {dst_ip}:15008"))
        .output()?;
    Ok(String::from_utf8_lossy(&ss.stdout).lines().count())
}

pub use testbed::mesh::node_get;

/// The sum of every sample of `series` (a metric name, or a name plus the
/// start of its label set) in Prometheus text.
pub fn sum_samples(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn succeeded(r: &Value) -> bool {
    r["echo_ok"] == true
}

pub fn access_to(logs: &[Value], dst: &str) -> Vec<Value> {
    logs.iter().filter(|l| l["dst"] == dst).cloned().collect()
}

/// Messages the sk_msg program redirected into `agent`'s sockets: the
/// sockmap-on runs check that they really took the accelerated path.
pub fn sockmap_redirected(agent: &Agent) -> Result<u64> {
    Ok(agent.status()?["sockmap"]["redirected"].as_u64().unwrap_or(0))
}

/// Sends of `agent` that the sk_msg program redirected into an app's
/// socket (phase two): the `Accel::ToApp` runs check them.
pub fn to_app_redirected(agent: &Agent) -> Result<u64> {
    Ok(agent.status()?["sockmap_to_app"]["redirected"].as_u64().unwrap_or(0))
}

/// What the kernel path moved without the agents, on `agent`'s node: the
/// apps' sends and the segments moved into the apps (`Accel::Forward`).
pub fn forward_moved(agent: &Agent) -> Result<u64> {
    let s = agent.status()?;
    Ok(["sent", "received"]
        .iter()
        .map(|k| s["sockmap_forward"][k].as_u64().unwrap_or(0))
        .sum())
}

pub fn stat(status: &Value, name: &str) -> u64 {
    status["stats"][name].as_u64().unwrap_or(0)
}
