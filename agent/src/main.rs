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
    Run(RunArgs),
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
    /// Local enrolment file (YAML; see README).
    #[arg(long, env = "AGENT_CONFIG")]
    config: PathBuf,
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
    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = app::parse_duration)]
    drain_timeout: Duration,
    /// How often the enrolment file is re-read.
    #[arg(long, default_value = "1s", value_parser = app::parse_duration)]
    reload_interval: Duration,
    /// Data-plane threads; 0 = one thread that polls and forwards itself.
    #[arg(long, env = "AGENT_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run(a) => app::run(agent_config(a)?),
        Cmd::Unenroll { pins, config, pod } => {
            let cfg = config::LocalConfig::load(&config)?;
            let spec = cfg
                .pods
                .iter()
                .find(|p| p.key() == pod)
                .with_context(|| format!("pod {pod} is not listed in {}", config.display()))?;
            let ips: Vec<IpAddr> = spec.ips.clone();
            capture::unenroll_with_pins(&pins.bpffs, &pins.pin_name, &Netns::open(&spec.netns)?, &ips)?;
            tracing::info!(pod = %pod, "pod unenrolled; its traffic goes direct");
            Ok(())
        }
        Cmd::Cleanup { pins } => {
            let removed = capture::cleanup(&pins.bpffs, &pins.pin_name)?;
            tracing::info!(removed, "capture removed from this node");
            Ok(())
        }
        Cmd::Status { pins } => {
            let s = capture::status(&pins.bpffs, &pins.pin_name)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
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
    Ok(config::AgentConfig {
        node: a.node,
        config_path: a.config,
        node_netns: a.netns,
        cgroup_parent,
        bpffs: a.pins.bpffs,
        pin_name: a.pins.pin_name,
        bpf_object: a.bpf_object,
        drain_timeout: a.drain_timeout,
        reload_interval: a.reload_interval,
        worker_threads: a.worker_threads,
    })
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
