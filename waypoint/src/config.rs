//! The command line and the one typed configuration it resolves to
//! (validated, logged at start). Names and defaults are the constants here.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mesh::{
    ca::{CaAuth, CaClientConfig},
    identity::{SpiffeId, DEFAULT_TRUST_DOMAIN},
};

pub const DEFAULT_LISTEN: &str = "[::]:15008";
pub const DEFAULT_METRICS: &str = "[::]:15020";
/// Istio's status port: readiness only (what the kubelet probes).
pub const DEFAULT_READINESS: &str = "[::]:15021";
/// See `--worker-threads`.
pub const DEFAULT_WORKER_THREADS: usize = 0;
const MAX_WORKER_THREADS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--ca-address needs {0}")]
    CaMissing(&'static str),
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

#[derive(Parser, Debug)]
#[command(
    name = "waypoint",
    version,
    about = "L7 waypoint proxy: terminates HBONE, routes each HTTP request (or opaque TCP) to an endpoint over its own HBONE"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "WAYPOINT_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the waypoint's data plane.
    Run(Box<RunArgs>),
    /// Create and reconcile the objects of every waypoint Gateway.
    Controller(crate::controller::ControllerArgs),
    /// Print a waypoint Gateway (and with --resources what the controller makes of it).
    Generate(crate::controller::generate::Args),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The enrolment file the agents read (services, pods, policies);
    /// or `--kubernetes`.
    #[arg(
        long,
        env = "WAYPOINT_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// Watch the Kubernetes API instead (the same translation the agents
    /// use); in a pod, with its service account (the controller binds it to
    /// the read-only waypoint ClusterRole).
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig for `--kubernetes` (default: $KUBECONFIG, ~/.kube/config,
    /// else the pod's service account).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Routing rules with `--config`: a file of Kubernetes documents
    /// (HTTPRoute, VirtualService, DestinationRule, as applied to a
    /// cluster; other kinds are skipped), re-read when it changes. With
    /// `--kubernetes` they come from the API.
    #[arg(long, env = "WAYPOINT_ROUTES", conflicts_with = "kubernetes")]
    pub routes: Option<PathBuf>,
    /// The waypoint's own Gateway (in --namespace): HTTPRoutes whose
    /// parentRef is this Gateway apply to every Service it carries.
    #[arg(long, env = "GATEWAY_NAME")]
    pub gateway_name: Option<String>,
    /// The waypoint's own namespace (its identity's `ns`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The waypoint's own service account (its identity's `sa`).
    #[arg(long, env = "WAYPOINT_SERVICE_ACCOUNT")]
    pub service_account: String,
    #[arg(long, env = "WAYPOINT_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[command(flatten)]
    pub ca: CaArgs,
    /// Requested lifetime of the waypoint's certificate (renewed at half-life).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_lifetime: Duration,
    /// HBONE listener.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`) and readiness
    /// (`/healthz/ready`).
    #[arg(long, default_value = DEFAULT_METRICS)]
    pub metrics_addr: SocketAddr,
    /// Readiness only (`/healthz/ready`), Istio's status port.
    #[arg(long, default_value = DEFAULT_READINESS)]
    pub readiness_addr: SocketAddr,
    /// Port the endpoints' agents take HBONE on.
    #[arg(long, default_value_t = mesh::hbone::HBONE_PORT)]
    pub upstream_hbone_port: u16,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// One JSON line per request on stdout.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Data-plane threads; 0 = one thread that polls and forwards itself
    /// (as the agent's default): no cross-thread wake-ups between a
    /// request's tasks. More threads serve more than one core's worth.
    #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS)]
    pub worker_threads: usize,
}

/// Where the CA is and how the waypoint proves who it is (as the agent).
#[derive(Args, Debug)]
pub struct CaArgs {
    /// `https://host:port` of the mesh CA.
    #[arg(long = "ca-address", env = "WAYPOINT_CA_ADDRESS")]
    pub address: String,
    /// The mesh root certificate.
    #[arg(long = "ca-root", env = "WAYPOINT_CA_ROOT")]
    pub root: PathBuf,
    /// A node credential (certificate and key) from `agent ca init`.
    #[arg(long, env = "WAYPOINT_NODE_CERT")]
    pub node_cert: Option<PathBuf>,
    #[arg(long, env = "WAYPOINT_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// Authenticate with this (projected service-account) token instead.
    #[arg(long, env = "WAYPOINT_CA_TOKEN")]
    pub ca_token: Option<PathBuf>,
}

impl CaArgs {
    fn resolve(self) -> Result<CaClientConfig, ConfigError> {
        let auth = match (self.ca_token, self.node_cert, self.node_key) {
            (Some(token), _, _) => CaAuth::Token(token),
            (None, Some(cert), Some(key)) => CaAuth::NodeCert { cert, key },
            (None, None, _) => return Err(ConfigError::CaMissing("--node-cert and --node-key (or --ca-token)")),
            (None, Some(_), None) => return Err(ConfigError::CaMissing("--node-key with --node-cert")),
        };
        Ok(CaClientConfig {
            address: self.address,
            root_cert: self.root,
            auth,
        })
    }
}

/// Every bound on what a peer can make the waypoint hold or wait for.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct LimitArgs {
    /// TLS + HTTP/2 handshakes of HBONE (each), and dialling endpoints.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// How long to wait for a client's first bytes on a port that declares
    /// no protocol before treating it as opaque TCP (server-first protocols).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    #[serde(with = "humantime_serde_compat")]
    pub sniff_timeout: Duration,
    /// Time to receive a request's headers, counted from when the
    /// connection is ready for the next request (slowloris).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// An HTTP connection without requests in flight and without bytes
    /// moving for this long is closed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// On SIGTERM: how long in-flight requests and connections may take
    /// to finish after GOAWAY.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
    /// Largest request header block (bytes), HTTP/1.1 and h2.
    #[arg(long, default_value_t = 60 << 10)]
    pub max_header_bytes: usize,
    /// Most request headers.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// HBONE connections served at once; more wait in the kernel's accept
    /// queue.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// h2: streams one downstream connection may have open at once.
    #[arg(long, default_value_t = 100)]
    pub max_concurrent_streams: u32,
    /// h2: streams reset by the client before we accepted them (rapid
    /// reset, CVE-2023-44487) before the connection is closed.
    #[arg(long, default_value_t = 20)]
    pub max_pending_reset_streams: usize,
    /// h2: streams we had to reset for the client's errors before the
    /// connection is closed (CVE-2024-27316 style floods).
    #[arg(long, default_value_t = 1024)]
    pub max_local_error_resets: usize,
    /// A request is retried (or mirrored with its body) only if its body
    /// fits in this many bytes, kept while it streams.
    #[arg(long, default_value_t = 64 << 10)]
    pub max_replay_body_bytes: usize,
    /// Mirrored requests in flight at once; a mirror beyond it is skipped
    /// (and counted), never queued.
    #[arg(long, default_value_t = 256)]
    pub max_mirrors_in_flight: usize,
    /// A mirrored request is abandoned after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    #[serde(with = "humantime_serde_compat")]
    pub mirror_timeout: Duration,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(30),
            max_header_bytes: 60 << 10,
            max_headers: 100,
            max_connections: 10_000,
            max_concurrent_streams: 100,
            max_pending_reset_streams: 20,
            max_replay_body_bytes: 64 << 10,
            max_mirrors_in_flight: 256,
            mirror_timeout: Duration::from_secs(10),
            max_local_error_resets: 1024,
        }
    }
}

/// Durations as humantime strings in the logged configuration.
mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// The waypoint's source of truth, as the agent's.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// The enrolment file, re-read when it changes.
    File(PathBuf),
    /// The Kubernetes API (`cluster::kube`).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The resolved configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Where services, endpoints, workloads and policies come from.
    pub source: Source,
    /// The routes file (with a file source).
    pub routes: Option<PathBuf>,
    /// The waypoint's own Gateway (namespace, name).
    pub gateway: Option<(String, String)>,
    pub identity: String,
    #[serde(skip)]
    pub id: SpiffeId,
    pub ca: CaClientConfig,
    #[serde(serialize_with = "humantime_serde_compat::serialize")]
    pub cert_lifetime: Duration,
    pub listen: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub upstream_hbone_port: u16,
    pub limits: LimitArgs,
    pub access_log: bool,
    pub worker_threads: usize,
}

impl RunArgs {
    /// Checks and resolves the flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let id: SpiffeId = format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
        .parse()
        .map_err(|e: mesh::identity::IdentityError| ConfigError::Invalid {
            flag: "--trust-domain/--namespace/--service-account",
            message: e.to_string(),
        })?;
        self.limits.validate()?;
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid {
                flag: "--worker-threads",
                message: format!("at most {MAX_WORKER_THREADS} (0 = one thread)"),
            });
        }
        Ok(Config {
            source: match self.config {
                Some(file) => Source::File(file),
                None => Source::Kubernetes {
                    kubeconfig: self.kubeconfig,
                },
            },
            routes: self.routes,
            gateway: self.gateway_name.map(|g| (self.namespace.clone(), g)),
            identity: id.to_string(),
            id,
            ca: self.ca.resolve()?,
            cert_lifetime: self.cert_lifetime,
            listen: self.listen,
            metrics_addr: self.metrics_addr,
            readiness_addr: self.readiness_addr,
            upstream_hbone_port: self.upstream_hbone_port,
            limits: self.limits,
            access_log: self.access_log,
            worker_threads: self.worker_threads,
        })
    }
}

impl LimitArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |flag, message: &str| {
            Err(ConfigError::Invalid {
                flag,
                message: message.to_string(),
            })
        };
        // hyper's HTTP/1.1 read buffer cannot be smaller than 8 KiB.
        if self.max_header_bytes < 8192 {
            return bad("--max-header-bytes", "must be at least 8192");
        }
        if self.max_headers == 0 || self.max_concurrent_streams == 0 || self.max_connections == 0 {
            return bad(
                "--max-headers/--max-concurrent-streams/--max-connections",
                "must be at least 1",
            );
        }
        for (flag, d) in [
            ("--connect-timeout", self.connect_timeout),
            ("--sniff-timeout", self.sniff_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return bad(flag, "must be more than zero");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec![
            "waypoint",
            "run",
            "--config",
            "/etc/mesh.yaml",
            "--namespace",
            "default",
            "--service-account",
            "web-waypoint",
            "--ca-address",
            "https://ca:15012",
            "--ca-root",
            "/root.pem",
        ];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        let Cmd::Run(a) = cli.cmd else {
            return Err("not `waypoint run`".into());
        };
        a.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_identity() {
        let c = parse(&["--ca-token", "/token"]).unwrap();
        assert_eq!(c.identity, "spiffe://cluster.local/ns/default/sa/web-waypoint");
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.limits.sniff_timeout, Duration::from_secs(1));
        let logged = serde_json::to_string(&c).unwrap();
        assert!(logged.contains("\"sniff_timeout\":\"1s\""), "{logged}");
    }

    #[test]
    fn the_controllers_command_line_runs_the_waypoint_on_kubernetes() {
        // What deploy/waypoint-controller.yaml passes as --waypoint-arg (the
        // namespace and service account come from the pod's environment).
        let cli = Cli::try_parse_from([
            "waypoint",
            "run",
            "--kubernetes",
            "--ca-address",
            "https://mesh-ca.mesh-system.svc:15012",
            "--ca-root",
            "/etc/mesh/ca-root/root-cert.pem",
            "--ca-token",
            "/var/run/secrets/mesh/token",
            "--namespace",
            "apps",
            "--service-account",
            "wp",
        ])
        .unwrap();
        let Cmd::Run(a) = cli.cmd else { panic!("run") };
        let c = a.into_config().unwrap();
        assert!(
            matches!(c.source, Source::Kubernetes { kubeconfig: None }),
            "{:?}",
            c.source
        );
        assert_eq!(c.readiness_addr.port(), 15021);
        // One source: a file and the API together is an error naming both.
        let e = parse(&["--kubernetes", "--ca-token", "/t"]).unwrap_err();
        assert!(e.contains("--kubernetes") && e.contains("--config"), "{e}");
    }

    #[test]
    fn errors_name_the_flag_to_fix() {
        let e = parse(&[]).unwrap_err();
        assert!(e.contains("--node-cert"), "{e}");
        let e = parse(&["--ca-token", "/t", "--max-header-bytes", "100"]).unwrap_err();
        assert!(e.contains("--max-header-bytes"), "{e}");
        let e = parse(&["--ca-token", "/t", "--sniff-timeout", "0s"]).unwrap_err();
        assert!(e.contains("--sniff-timeout"), "{e}");
        let e = parse(&["--ca-token", "/t", "--namespace", "Bad/ns"]).unwrap_err();
        assert!(e.contains("--namespace"), "{e}");
    }
}
