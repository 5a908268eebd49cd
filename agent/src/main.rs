//! `agent`: the command line. Everything else lives in the library.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use agent::{app, capture, config, netns::Netns};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "Per-node mesh agent: transparent eBPF capture of enrolled pods"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
enum CaCmd {
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
        listen: std::net::SocketAddr,
        /// Network namespace to serve in (default: the current one).
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long, default_value = "24h", value_parser = app::parse_duration)]
        max_cert_lifetime: Duration,
    },
    /// Ask the CA for one certificate as a node would and print it (never the key).
    Request {
        #[command(flatten)]
        ca: CaArgs,
        /// The workload identity, spiffe://<td>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "1h", value_parser = app::parse_duration)]
        lifetime: Duration,
        /// Also write the private key here (0600), for test peers and debugging.
        /// The agent's own workload keys are never written anywhere.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
}

/// How a node agent reaches the CA.
#[derive(Args)]
struct CaArgs {
    /// The CA, e.g. https://10.0.0.1:15012.
    #[arg(long = "ca-address", env = "AGENT_CA_ADDRESS")]
    address: Option<String>,
    /// The mesh root certificate.
    #[arg(long = "ca-root", env = "AGENT_CA_ROOT")]
    root: Option<PathBuf>,
    /// This node's credential (certificate and key), from `agent ca init`.
    #[arg(long, env = "AGENT_NODE_CERT")]
    node_cert: Option<PathBuf>,
    #[arg(long, env = "AGENT_NODE_KEY")]
    node_key: Option<PathBuf>,
    /// Authenticate with this (projected service-account) token instead of
    /// a node credential; re-read for every request (Kubernetes).
    #[arg(long, env = "AGENT_CA_TOKEN", conflicts_with_all = ["node_cert", "node_key"])]
    ca_token: Option<PathBuf>,
}

impl CaArgs {
    fn resolve(self) -> anyhow::Result<Option<mesh::ca::CaClientConfig>> {
        let Some(address) = self.address else { return Ok(None) };
        let need = |v: Option<PathBuf>, flag: &str| v.with_context(|| format!("--ca-address needs {flag}"));
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
struct KubeArgs {
    /// Learn pods, services and policies from the Kubernetes API.
    #[arg(long, env = "AGENT_KUBERNETES")]
    kubernetes: bool,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, else in-cluster).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// UID of the agent's own pod (downward API), never enrolled.
    #[arg(long, env = "AGENT_POD_UID")]
    pod_uid: Option<String>,
    /// Socket the chained CNI plugin (mesh-cni) calls to enroll new pods.
    #[arg(long, env = "AGENT_CNI_SOCKET", requires = "kubernetes")]
    cni_socket: Option<PathBuf>,
    /// The host's /proc (run the agent pod with hostPID).
    #[arg(long, env = "AGENT_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// The host's network namespace (pods sharing it use the host network).
    #[arg(long, env = "AGENT_HOST_NETNS", default_value = "/proc/1/ns/net")]
    host_netns: PathBuf,
}

#[derive(Args)]
struct PinArgs {
    /// A bpffs mount (mounted there if nothing is).
    #[arg(long, env = "AGENT_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Name of this agent's pin directory under the bpffs.
    #[arg(long, env = "AGENT_PIN_NAME", default_value = "mesh-agent")]
    pin_name: String,
}

#[derive(Args)]
struct RunArgs {
    /// This node's name; pods whose `node` matches are enrolled.
    #[arg(long, env = "AGENT_NODE")]
    node: String,
    /// Local enrolment file (YAML; see README). Either this or --kubernetes.
    #[arg(
        long,
        env = "AGENT_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    /// Network namespace of the node to join (default: the current one).
    #[arg(long, env = "AGENT_NETNS")]
    netns: Option<PathBuf>,
    /// cgroup v2 directory to attach capture at (default: the cgroup v2 mount).
    #[arg(long, env = "AGENT_CGROUP_PARENT")]
    cgroup_parent: Option<PathBuf>,
    #[command(flatten)]
    pins: PinArgs,
    /// Kernel programs to load instead of the embedded ones.
    #[arg(long, env = "AGENT_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// Log why each connection was or was not captured (the kernel programs'
    /// decisions, target `bpf`). Costs a ring-buffer write per connect: for
    /// debugging, off by default.
    #[arg(long, env = "AGENT_BPF_LOG")]
    bpf_log: bool,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = app::parse_duration)]
    drain_timeout: Duration,
    /// How often the enrolment file is re-read.
    #[arg(long, default_value = "1s", value_parser = app::parse_duration)]
    reload_interval: Duration,
    /// Data-plane threads; 0 = one thread that polls and forwards itself.
    #[arg(long, env = "AGENT_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    #[arg(long, env = "AGENT_TRUST_DOMAIN", default_value = mesh::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[command(flatten)]
    ca: CaArgs,
    /// Requested lifetime of workload certificates (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = app::parse_duration)]
    cert_lifetime: Duration,
    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Readiness (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: std::net::SocketAddr,
    /// Admin (/config_dump); keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    raise_fd_limit();
    match cli.cmd {
        Cmd::Run(a) => app::run(agent_config(*a)?),
        Cmd::Unenroll { pins, config, pod } => {
            let cfg = config::LocalConfig::load(&config)?;
            let spec = cfg
                .pods
                .iter()
                .find(|p| p.key() == pod)
                .with_context(|| format!("pod {pod} is not listed in {}", config.display()))?;
            let ips: Vec<IpAddr> = spec.ips.clone();
            let netns = spec.netns.as_ref().with_context(|| {
                format!(
                    "pod {pod} has no netns in {}: it is not captured here",
                    config.display()
                )
            })?;
            capture::unenroll_with_pins(&pins.bpffs, &pins.pin_name, &Netns::open(netns)?, &ips)?;
            tracing::info!(pod = %pod, "pod unenrolled; its traffic goes direct");
            Ok(())
        }
        Cmd::Cleanup { pins } => {
            let removed = capture::cleanup(&pins.bpffs, &pins.pin_name)?;
            tracing::info!(removed, "capture removed from this node");
            Ok(())
        }
        Cmd::Ca(cmd) => ca_command(cmd),
        Cmd::Status { pins } => {
            let s = capture::status(&pins.bpffs, &pins.pin_name)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
    }
}

fn ca_command(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init {
            dir,
            trust_domain,
            nodes,
        } => {
            mesh::ca::CaFiles::new(&dir).init(&trust_domain, &nodes)?;
            tracing::info!(dir = %dir.display(), trust_domain = %trust_domain, nodes = ?nodes, "CA created");
            Ok(())
        }
        CaCmd::Serve {
            dir,
            config,
            kubernetes,
            kubeconfig,
            agent_service_account,
            listen,
            netns,
            max_cert_lifetime,
        } => {
            if let Some(ns) = netns {
                Netns::open(&ns)?.enter_for_good()?;
            }
            let source = match config {
                Some(path) => agent::ca::PodSource::File(path),
                None if kubernetes => agent::ca::PodSource::Kubernetes {
                    kubeconfig,
                    agent_service_account,
                },
                None => anyhow::bail!("pass --config or --kubernetes"),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(agent::ca::serve(&dir, source, listen, max_cert_lifetime))
        }
        CaCmd::Request {
            ca,
            id,
            lifetime,
            key_out,
        } => {
            let cfg = ca.resolve()?.context("--ca-address is required")?;
            let id: mesh::identity::SpiffeId = id.parse()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let cert = rt.block_on(agent::ca::request(&cfg, &id, lifetime))?;
            if let Some(path) = key_out {
                use std::{io::Write, os::unix::fs::OpenOptionsExt};
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                f.write_all(cert.key.serialize_pem().as_bytes())?;
            }
            print!("{}", cert.chain.concat());
            Ok(())
        }
    }
}

fn agent_config(a: RunArgs) -> anyhow::Result<config::AgentConfig> {
    let cgroup_parent = match a.cgroup_parent {
        Some(p) => p,
        None => {
            capture::probe::cgroup2_mount().context("cgroup v2 is not mounted: mount it or pass --cgroup-parent")?
        }
    };
    let source = match a.config {
        Some(path) => config::Source::File(path),
        None => config::Source::Kubernetes(config::KubeSettings {
            kubeconfig: a.kube.kubeconfig,
            own_pod_uid: a.kube.pod_uid,
            cni_socket: a.kube.cni_socket,
            proc_root: a.kube.proc_root,
            // Pods are found below the capture's cgroup parent (they must be
            // there to be captured at all).
            cgroup_root: cgroup_parent.clone(),
            host_netns: a.kube.host_netns,
        }),
    };
    Ok(config::AgentConfig {
        node: a.node,
        source,
        node_netns: a.netns,
        cgroup_parent,
        bpffs: a.pins.bpffs,
        pin_name: a.pins.pin_name,
        bpf_object: a.bpf_object,
        bpf_log: a.bpf_log,
        drain_timeout: a.drain_timeout,
        reload_interval: a.reload_interval,
        worker_threads: a.worker_threads,
        trust_domain: a.trust_domain,
        ca: a.ca.resolve()?,
        cert_lifetime: a.cert_lifetime,
        metrics_addr: a.metrics_addr,
        readiness_addr: a.readiness_addr,
        admin_addr: a.admin_addr,
    })
}

/// Every proxied connection holds several descriptors: use all we may.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit");
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
