//! The soak's cluster, on the Kubernetes source end to end: the stand-in
//! API server on the wire, the CA (TokenReview, pods from the API) on
//! node1, one agent per node with HBONE, and the load:
//!
//! ```text
//!  node1: c1..cK (ambient, soak clients), late (ambient, applied after the
//!         API server restart), outsider (no Pod object: the wire check's control)
//!  node2: srv1 (ambient, the checksumming echo of c1, c3, ...), backend
//!         (no Pod object: the control's echo)
//!  node3: srv2 (ambient, the echo of c2, c4, ...)
//! ```
//!
//! Two destination nodes because a destination agent holds two sockets per
//! carried connection: 10,000 through one would need more than the 20,000
//! descriptors this machine's containers may have (the hard limit cannot be
//! raised without CAP_SYS_RESOURCE).
//!
//! Every payload carries [`MARKER`]; the control pair (neither in the mesh)
//! sends [`CONTROL`] in plaintext so the wire capture provably sees payloads.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use testbed::{
    apiserver::ApiServer,
    kube,
    mesh::{self, Agent, MeshCa},
    wire::Capture,
    Cluster, ClusterSpec, NodeSpec,
};

use crate::{
    worker::{EchoServer, Worker},
    Opts,
};

pub const NS: &str = "soak";
pub const NODES: [&str; 3] = ["node1", "node2", "node3"];
pub const SERVERS: [&str; 2] = ["srv1", "srv2"];
pub const PORT: u16 = 7070;
pub const MARKER: &str = "SOAK-PLAINTEXT-5e1f0c";
pub const CONTROL: &str = "SOAK-CONTROL-PLAINTEXT-9b2d";
/// Held connections per client pod: below the default per-pod cap of a
/// 20,000-descriptor host, and the pod's ephemeral ports are plenty.
pub const PER_POD: usize = 2000;
const READY: Duration = Duration::from_secs(60);

pub struct Soak {
    pub clients: Vec<Worker>,
    pub control: Worker,
    pub agents: Vec<Agent>,
    pub ca: MeshCa,
    pub api: ApiServer,
    pub capture: Capture,
    pub extra: Vec<String>,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    _servers: Vec<EchoServer>,
    pub cluster: Cluster,
}

/// The echo of client `i` (0-based): the servers take turns.
pub fn server_addr(cluster: &Cluster, i: usize) -> String {
    format!("{}:{PORT}", cluster.pod(SERVERS[i % SERVERS.len()]).ip4)
}

pub fn client_names(connections: usize) -> Vec<String> {
    (1..=connections.div_ceil(PER_POD).max(1))
        .map(|i| format!("c{i}"))
        .collect()
}

pub fn identity(pod: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{pod}")
}

impl Soak {
    pub fn build(opts: &Opts) -> Result<Soak> {
        let names = client_names(opts.connections);
        let mut node1: Vec<&str> = names.iter().map(String::as_str).collect();
        node1.extend(["late", "outsider"]);
        let spec = ClusterSpec::new(vec![
            NodeSpec::new("node1", &node1),
            NodeSpec::new("node2", &["srv1", "backend"]),
            NodeSpec::new("node3", &["srv2"]),
        ]);
        let cluster = Cluster::create("soak", &spec)?;
        let dir = cluster.scratch_dir()?;
        let api = ApiServer::in_cluster(&cluster)?;
        let kubeconfig = dir.join("agent.kubeconfig");
        api.write_kubeconfig(&kubeconfig, "agent-token")?;
        let ca_kubeconfig = dir.join("ca.kubeconfig");
        api.write_kubeconfig(&ca_kubeconfig, "ca-token")?;
        api.apply(&kube::namespace(NS, true))?;
        for n in NODES {
            api.apply(&kube::node(&cluster, n))?;
        }
        for p in names.iter().map(String::as_str).chain(SERVERS) {
            api.apply(&kube::pod(&cluster, p, NS, &[("app", p)], true))?;
        }
        // The wire is watched before any payload moves.
        let capture = Capture::start(&cluster, dir.join("wire.pcap"))?;
        let mut servers = vec![EchoServer::start(
            cluster.pod("backend"),
            &cluster.pod("backend").cgroup,
            PORT,
        )?];
        for srv in SERVERS {
            servers.push(EchoServer::start(
                cluster.pod(srv),
                &kube::container_cgroup(&cluster, srv),
                PORT,
            )?);
        }
        // The pods' processes exist before the agents look for them.
        let mut clients = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let cg = kube::container_cgroup(&cluster, name);
            let log = dir.join(format!("client-{name}.log"));
            let addr = server_addr(&cluster, i);
            clients.push(Worker::start(cluster.pod(name), &cg, &addr, MARKER, &log)?);
        }
        let backend = format!("{}:{PORT}", cluster.pod("backend").ip4);
        let outsider = cluster.pod("outsider");
        let control = Worker::start(outsider, &outsider.cgroup, &backend, CONTROL, &dir.join("control.log"))?;
        let ca = MeshCa::start_kube(&cluster, "node1", &dir.join("ca"), &ca_kubeconfig)?;
        let extra = vec![
            "--cert-lifetime".to_string(),
            format!("{}s", opts.cert_lifetime_s),
            // srv1 takes most of the held connections (above the default
            // cap of a quarter of 20,000 descriptors): said explicitly.
            "--max-connections-per-pod".to_string(),
            (opts.connections + 4000).to_string(),
        ];
        let mut soak_agents = Vec::new();
        for node in NODES {
            soak_agents.push(start_agent(&cluster, &kubeconfig, &dir, &ca, &extra, node)?);
        }
        let soak = Soak {
            clients,
            control,
            agents: soak_agents,
            ca,
            api,
            capture,
            extra,
            kubeconfig,
            dir,
            _servers: servers,
            cluster,
        };
        for a in 0..soak.agents.len() {
            soak.wait_certs(a, READY)?;
        }
        Ok(soak)
    }

    /// The identities the agent `i` holds certificates for: its node's pods
    /// that the API server knows.
    pub fn identities_of(&self, i: usize) -> Vec<String> {
        self.cluster
            .pods_on(&self.agents[i].node)
            .filter(|p| self.api.get("v1", "Pod", NS, &p.name).is_some())
            .map(|p| identity(&p.name))
            .collect()
    }

    /// Waits until agent `i` has enrolled each of its pods and holds a
    /// certificate for each.
    pub fn wait_certs(&self, i: usize, timeout: Duration) -> Result<()> {
        let want = self.identities_of(i);
        let node = self.agents[i].node.clone();
        let pods: Vec<String> = want
            .iter()
            .filter_map(|id| id.rsplit('/').next())
            .map(|p| format!("{NS}/{p}"))
            .collect();
        mesh::poll(timeout, || {
            let Some(dump) = config_dump(&self.cluster, &node)? else {
                return Ok(None);
            };
            let held = dump["certificates"].as_array().cloned().unwrap_or_default();
            let enrolled = dump["enrolled"].as_array().cloned().unwrap_or_default();
            let certs = want.iter().all(|id| held.iter().any(|c| c["identity"] == id.as_str()));
            let pods = pods.iter().all(|p| enrolled.iter().any(|e| e == p.as_str()));
            Ok((certs && pods).then_some(()))
        })
        .with_context(|| {
            format!(
                "agent on {node} has not enrolled and certified each of {want:?}: {:?}\nCA log:\n{}",
                config_dump(&self.cluster, &node),
                self.ca.log()
            )
        })
    }

    /// Starts a new agent on the node of agent `i` (a handover or a restart).
    pub fn start_agent(&self, i: usize) -> Result<Agent> {
        let node = self.agents[i].node.clone();
        start_agent(&self.cluster, &self.kubeconfig, &self.dir, &self.ca, &self.extra, &node)
    }

    /// Sends `op` to every client, then collects every reply.
    pub fn all(&mut self, op: Value, timeout: Duration) -> Result<Vec<Value>> {
        let ids = self
            .clients
            .iter_mut()
            .map(|w| w.send(op.clone()))
            .collect::<Result<Vec<_>>>()?;
        self.clients
            .iter_mut()
            .zip(ids)
            .map(|(w, id)| w.wait(id, timeout))
            .collect()
    }

    /// Starts a connect loop on every client; [`Soak::stop_loops`] ends them.
    pub fn start_loops(&mut self, interval_ms: u64) -> Result<Vec<u64>> {
        let op = json!({"op": "loop", "interval_ms": interval_ms, "max": u64::MAX});
        self.clients.iter_mut().map(|w| w.send(op.clone())).collect()
    }

    pub fn stop_loops(&mut self, ids: Vec<u64>) -> Result<Vec<Value>> {
        self.all(json!({"op": "stop"}), Duration::from_secs(10))?;
        self.clients
            .iter_mut()
            .zip(ids)
            .map(|(w, id)| w.wait(id, Duration::from_secs(60)))
            .collect()
    }

    /// The agents' VmRSS and VmHWM in KiB, by node.
    pub fn rss(&self) -> Value {
        let mut out = json!({});
        for a in &self.agents {
            let Some(pid) = a.pid() else { continue };
            out[&a.node] = json!({
                "rss_kb": testbed::procfs::status_kb(pid, "VmRSS").unwrap_or(0),
                "hwm_kb": testbed::procfs::status_kb(pid, "VmHWM").unwrap_or(0),
                "fds": std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
            });
        }
        out
    }
}

fn start_agent(
    cluster: &Cluster,
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
    ca: &MeshCa,
    extra: &[String],
    node: &str,
) -> Result<Agent> {
    let mut args = ca.client_args(node);
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Agent::start_kube(cluster, node, kubeconfig, dir, &args)?;
    a.wait_for("agent ready", READY)?;
    Ok(a)
}

/// The config dump of the agent of `node`, if it answers.
pub fn config_dump(cluster: &Cluster, node: &str) -> Result<Option<Value>> {
    let (body, code) = mesh::node_get(cluster, node, "http://127.0.0.1:15000/config_dump")?;
    if code != "200" {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&body).context("config dump")?))
}

/// The certificates the agent of `node` holds (identity, serial, expires_in_s).
pub fn certificates(cluster: &Cluster, node: &str) -> Result<Vec<Value>> {
    Ok(config_dump(cluster, node)?
        .and_then(|d| d["certificates"].as_array().cloned())
        .unwrap_or_default())
}

/// The agent's log lines containing `needle`, parsed (logs of a soak are
/// long: only the matching lines are parsed).
pub fn log_lines(agent: &Agent, needle: &str) -> Vec<Value> {
    std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls (every 200 ms, the logs are long) until `f` yields.
pub fn poll_slow<T>(timeout: Duration, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    testbed::mesh::poll_every(Duration::from_millis(200), timeout, f)
}
