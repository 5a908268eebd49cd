//! The command line: flags (each also an environment variable), their
//! documented defaults, and their mapping to [`AgentConfig`]. Kept in the
//! library so the mapping and its checks are unit-tested; `main.rs` only
//! parses, sets up logging and dispatches.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    capture,
    config::{AgentConfig, KubeSettings, Source},
};

/// Why the flags do not make a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--ca-address needs {0}")]
    CaMissing(&'static str),
    #[error("--admin-addr {0} is not a loopback address: the admin endpoint shows every workload, policy and certificate; bind it to 127.0.0.1 or [::1] and use port-forward")]
    AdminNotLoopback(SocketAddr),
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("cgroup v2 is not mounted: mount it or pass --cgroup-parent")]
    NoCgroup2,
}

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "Per-node mesh agent: transparent eBPF capture of enrolled pods, HBONE mTLS, L4 policy"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Capture the enrolled pods of this node and carry their traffic.
    Run(Box<RunArgs>),
    /// Stop capturing one pod at once, with or without a running agent.
    Unenroll {
        #[command(flatten)]
        pins: PinArgs,
        /// The enrolment file that lists the pod.
        #[arg(long, env = "AGENT_CONFIG")]
        config: PathBuf,
        /// The pod, as namespace/name.
        #[arg(long)]
        pod: String,
    },
    /// Remove all capture of this agent instance from the node (every pin, link and map).
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print the pinned capture state and counters as JSON.
    Status {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// The mesh certificate authority (Istio's certificate API over mTLS).
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create a root, the CA's serving certificate and a credential per node (keys 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = mesh::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// A node to create a credential for (repeat).
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
    /// Serve certificates to node agents for the pods on their node.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// The pod list (enrolment file) that says which pods run on which node.
        #[arg(
            long,
            env = "AGENT_CONFIG",
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Authenticate agents by their service-account token (TokenReview)
        /// and check pods' nodes against the Kubernetes API.
        #[arg(long)]
        kubernetes: bool,
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// The agents' service account, namespace/name: only its tokens are accepted.
        #[arg(long, default_value = "mesh-system/mesh-agent")]
        agent_service_account: String,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Network namespace to serve in (default: the current one).
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        max_cert_lifetime: Duration,
    },
    /// Ask the CA for one certificate as a node would and print it (never the key).
    Request {
        #[command(flatten)]
        ca: CaArgs,
        /// The workload identity, spiffe://<td>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Also write the private key here (0600), for test peers and debugging.
        /// The agent's own workload keys are never written anywhere.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
}

/// How a node agent reaches the CA.
#[derive(Args)]
pub struct CaArgs {
    /// The CA, e.g. https://10.0.0.1:15012.
    #[arg(long = "ca-address", env = "AGENT_CA_ADDRESS")]
    pub address: Option<String>,
    /// The mesh root certificate.
    #[arg(long = "ca-root", env = "AGENT_CA_ROOT")]
    pub root: Option<PathBuf>,
    /// This node's credential (certificate and key), from `agent ca init`.
    #[arg(long, env = "AGENT_NODE_CERT")]
    pub node_cert: Option<PathBuf>,
    #[arg(long, env = "AGENT_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// Authenticate with this (projected service-account) token instead of
    /// a node credential; re-read for every request (Kubernetes).
    #[arg(long, env = "AGENT_CA_TOKEN", conflicts_with_all = ["node_cert", "node_key"])]
    pub ca_token: Option<PathBuf>,
}

impl CaArgs {
    /// `None` without `--ca-address` (capture only).
    pub fn resolve(self) -> Result<Option<mesh::ca::CaClientConfig>, CliError> {
        let Some(address) = self.address else { return Ok(None) };
        let need = |v: Option<PathBuf>, flag| v.ok_or(CliError::CaMissing(flag));
        let auth = match self.ca_token {
            Some(token) => mesh::ca::CaAuth::Token(token),
            None => mesh::ca::CaAuth::NodeCert {
                cert: need(self.node_cert, "--node-cert (or --ca-token)")?,
                key: need(self.node_key, "--node-key")?,
            },
        };
        Ok(Some(mesh::ca::CaClientConfig {
            address,
            root_cert: need(self.root, "--ca-root")?,
            auth,
        }))
    }
}

/// The Kubernetes source.
#[derive(Args)]
pub struct KubeArgs {
    /// Learn pods, services and policies from the Kubernetes API.
    #[arg(long, env = "AGENT_KUBERNETES")]
    pub kubernetes: bool,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, else in-cluster).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// UID of the agent's own pod (downward API), never enrolled.
    #[arg(long, env = "AGENT_POD_UID")]
    pub pod_uid: Option<String>,
    /// Socket the chained CNI plugin (mesh-cni) calls to enroll new pods.
    #[arg(long, env = "AGENT_CNI_SOCKET", requires = "kubernetes")]
    pub cni_socket: Option<PathBuf>,
    /// The host's /proc (run the agent pod with hostPID).
    #[arg(long, env = "AGENT_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// The host's network namespace (pods sharing it use the host network).
    #[arg(long, env = "AGENT_HOST_NETNS", default_value = "/proc/1/ns/net")]
    pub host_netns: PathBuf,
}

#[derive(Args)]
pub struct PinArgs {
    /// A bpffs mount (mounted there if nothing is).
    #[arg(long, env = "AGENT_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Name of this agent's pin directory under the bpffs.
    #[arg(long, env = "AGENT_PIN_NAME", default_value = "mesh-agent")]
    pub pin_name: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// This node's name; pods whose `node` matches are enrolled.
    #[arg(long, env = "AGENT_NODE")]
    pub node: String,
    /// Local enrolment file (YAML; see README). Either this or --kubernetes.
    #[arg(
        long,
        env = "AGENT_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Network namespace of the node to join (default: the current one).
    #[arg(long, env = "AGENT_NETNS")]
    pub netns: Option<PathBuf>,
    /// cgroup v2 directory to attach capture at (default: the cgroup v2 mount).
    #[arg(long, env = "AGENT_CGROUP_PARENT")]
    pub cgroup_parent: Option<PathBuf>,
    #[command(flatten)]
    pub pins: PinArgs,
    /// Kernel programs to load instead of the embedded ones.
    #[arg(long, env = "AGENT_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// Log why each connection was or was not captured (the kernel programs'
    /// decisions, target `bpf`). Costs a ring-buffer write per connect: for
    /// debugging, off by default.
    #[arg(long, env = "AGENT_BPF_LOG")]
    pub bpf_log: bool,
    /// Sockmap acceleration of the in-pod hops the agent reads (app to
    /// 15001, the app's replies to the agent): sk_msg moves the app's bytes
    /// into the agent's socket instead of through TCP on the pod's `lo`.
    /// Probed at start (off, with the reason logged, where the kernel
    /// cannot). Off by default until the benchmark shows a gain.
    #[arg(long, env = "AGENT_SOCKMAP")]
    pub sockmap: bool,
    /// Phase two of the sockmap acceleration (needs --sockmap): the
    /// agent's writes to an app move straight into the app's socket too.
    /// Off by default: an app that reads with splice(2) never sees those
    /// bytes, and a blocking recv may fail with EAGAIN (ARCHITECTURE.md).
    #[arg(long, env = "AGENT_SOCKMAP_TO_APP", requires = "sockmap")]
    pub sockmap_to_app: bool,
    /// The sockmap kernel path (needs --sockmap-to-app): a plain hop (no
    /// HBONE) whose both in-pod directions are redirected is forwarded in
    /// the kernel, the app's sends straight to the agent's other socket and
    /// what arrives there straight into the app's socket; the agent only
    /// opens, polices, counts and closes. Off by default, with phase two's
    /// caveats (ARCHITECTURE.md, "The kernel path").
    #[arg(long, env = "AGENT_SOCKMAP_FORWARD", requires = "sockmap_to_app")]
    pub sockmap_forward: bool,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, env = "AGENT_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How often the control loop's periodic work runs: the enrolment
    /// file is re-read, pods that failed to enroll are retried, and phase
    /// two's read count is checked to be this agent's.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// Data-plane threads; 0 = one thread that polls and forwards itself.
    #[arg(long, env = "AGENT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    #[arg(long, env = "AGENT_TRUST_DOMAIN", default_value = mesh::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[command(flatten)]
    pub ca: CaArgs,
    /// Requested lifetime of workload certificates (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,
    /// How long a pod's connection waits for the pod's certificate while it
    /// is on the way; refused after that (fail closed).
    #[arg(long, env = "AGENT_CERT_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cert_wait: Duration,
    /// Readiness waits at most this long for every enrolled pod's
    /// certificate, then reports ready (degraded) with the reason.
    #[arg(long, env = "AGENT_CERT_READY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cert_ready_timeout: Duration,
    /// Bound on TCP connects and TLS/HTTP2 handshakes (a CONNECT answer: twice this).
    #[arg(long, env = "AGENT_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Connections one pod may have open through the agent at once
    /// (default: what a quarter of the open-file limit can carry, at most 16384).
    #[arg(long, env = "AGENT_MAX_CONNECTIONS_PER_POD")]
    pub max_connections_per_pod: Option<usize>,
    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Admin (/config_dump): loopback only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
}

impl RunArgs {
    /// The validated configuration these flags describe.
    pub fn into_config(self) -> Result<AgentConfig, CliError> {
        self.check()?;
        let cgroup_parent = match self.cgroup_parent {
            Some(p) => p,
            None => capture::probe::cgroup2_mount().ok_or(CliError::NoCgroup2)?,
        };
        let source = match self.config {
            Some(path) => Source::File(path),
            None => Source::Kubernetes(KubeSettings {
                kubeconfig: self.kube.kubeconfig,
                own_pod_uid: self.kube.pod_uid,
                cni_socket: self.kube.cni_socket,
                proc_root: self.kube.proc_root,
                // Pods are found below the capture's cgroup parent (they must be
                // there to be captured at all).
                cgroup_root: cgroup_parent.clone(),
                host_netns: self.kube.host_netns,
            }),
        };
        Ok(AgentConfig {
            node: self.node,
            source,
            node_netns: self.netns,
            cgroup_parent,
            bpffs: self.pins.bpffs,
            pin_name: self.pins.pin_name,
            bpf_object: self.bpf_object,
            bpf_log: self.bpf_log,
            sockmap: self.sockmap,
            sockmap_to_app: self.sockmap_to_app,
            sockmap_forward: self.sockmap_forward,
            drain_timeout: self.drain_timeout,
            reload_interval: self.reload_interval,
            worker_threads: self.worker_threads,
            trust_domain: self.trust_domain,
            ca: self.ca.resolve()?,
            cert_lifetime: self.cert_lifetime,
            cert_wait: self.cert_wait,
            cert_ready_timeout: self.cert_ready_timeout,
            connect_timeout: self.connect_timeout,
            max_connections_per_pod: self.max_connections_per_pod.unwrap_or_else(default_per_pod_cap),
            metrics_addr: self.metrics_addr,
            readiness_addr: self.readiness_addr,
            admin_addr: self.admin_addr,
        })
    }

    fn check(&self) -> Result<(), CliError> {
        if !self.admin_addr.ip().is_loopback() {
            return Err(CliError::AdminNotLoopback(self.admin_addr));
        }
        for (flag, zero) in [
            ("--reload-interval", self.reload_interval.is_zero()),
            ("--connect-timeout", self.connect_timeout.is_zero()),
            ("--max-connections-per-pod", self.max_connections_per_pod == Some(0)),
        ] {
            if zero {
                return Err(CliError::Zero { flag });
            }
        }
        Ok(())
    }
}

/// Descriptors a carried connection holds: its socket and the upstream one
/// (an HBONE stream needs one, a spliced plain-TCP forward also holds two
/// pipes, six in all).
const FDS_PER_CONNECTION: u64 = 2;

/// The connections a quarter of the open-file limit (hard limit: the agent
/// raises its soft limit to it) can carry, between 64 and 16384: one pod
/// cannot take the descriptors the other pods need (a pod of spliced
/// connections at most three quarters of them).
fn default_per_pod_cap() -> usize {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    (hard / FDS_PER_CONNECTION / 4).clamp(64, 16384) as usize
}

/// `agent unenroll`: the pod's netns and IPs from the enrolment file, then
/// the pins (works with or without a running agent).
pub fn unenroll(pins: &PinArgs, config: &Path, pod: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let cfg = crate::config::LocalConfig::load(config)?;
    let spec = cfg
        .pods
        .iter()
        .find(|p| p.key() == pod)
        .with_context(|| format!("pod {pod} is not listed in {}", config.display()))?;
    let netns = spec.netns.as_ref().with_context(|| {
        format!(
            "pod {pod} has no netns in {}: it is not captured here",
            config.display()
        )
    })?;
    let netns = crate::netns::Netns::open(netns)?;
    capture::unenroll_with_pins(&pins.bpffs, &pins.pin_name, &netns, &spec.ips)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "agent",
            "run",
            "--node",
            "n1",
            "--config",
            "/m.yaml",
            "--cgroup-parent",
            "/cg",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.cmd {
            Cmd::Run(a) => Ok(*a),
            _ => unreachable!("run parses as run"),
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = run_args(&[]).unwrap().into_config().unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.cert_wait, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!(
            c.max_connections_per_pod as u64 * 2 * 4 <= hard.max(64 * 8),
            "{}",
            c.max_connections_per_pod
        );
        assert!((64..=16384).contains(&c.max_connections_per_pod));
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert!(c.ca.is_none());
        let logged = serde_json::to_value(&c).unwrap();
        assert_eq!(
            logged["drainTimeout"], "30s",
            "durations are logged as people write them"
        );
    }

    #[test]
    fn durations_are_humantime() {
        let c = run_args(&["--drain-timeout", "1m 30s", "--cert-wait", "250ms"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.cert_wait, Duration::from_millis(250));
        let e = run_args(&["--drain-timeout", "3 fortnights"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--drain-timeout"), "{e}");
    }

    #[test]
    fn admin_must_stay_on_loopback() {
        let e = run_args(&["--admin-addr", "0.0.0.0:15000"])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a loopback address") && e.contains("127.0.0.1"), "{e}");
        assert!(run_args(&["--admin-addr", "[::1]:15000"])
            .unwrap()
            .into_config()
            .is_ok());
    }

    #[test]
    fn ca_flags_come_together_and_zero_bounds_are_refused() {
        let e = run_args(&["--ca-address", "https://ca:15012", "--ca-root", "/r.pem"])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--node-cert"), "{e}");
        let e = run_args(&["--max-connections-per-pod", "0"])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-connections-per-pod"), "{e}");
    }
}
