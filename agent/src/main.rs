//! `agent`: parse the command line, set up logging, dispatch. Everything
//! else lives in the library (`agent::cli` maps flags to the configuration).
use agent::{
    app, capture,
    cli::{CaCmd, Cli, Cmd, LogFormat},
    netns::Netns,
};
use anyhow::Context;
use clap::Parser;

// mimalloc in every build, so that the benchmark measures the allocator the
// image ships: its static musl binaries would otherwise get musl's slow malloc.
// The control path's large tables get pages of their own (see the type).
#[global_allocator]
static ALLOC: mesh::alloc::Allocator = mesh::alloc::Allocator;

// The same for musl's memmove, which copies byte by byte backwards when
// source and destination are equal (rustls does that after every TLS read).
// Linked by name: nothing calls the crate, the linker resolves `memmove` to it.
extern crate memmove;

fn main() -> anyhow::Result<()> {
    mesh::alloc::no_huge_pages();
    mesh::alloc::purge_at_once();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run(a) => app::run(a.into_config()?),
        Cmd::Unenroll { pins, config, pod } => {
            agent::cli::unenroll(&pins, &config, &pod)?;
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
        Cmd::Ca(cmd) => ca_command(cmd),
    }
}

fn ca_command(cmd: CaCmd) -> anyhow::Result<()> {
    let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build();
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
            rt()?.block_on(agent::ca::serve(&dir, source, listen, max_cert_lifetime))
        }
        CaCmd::Request {
            ca,
            id,
            lifetime,
            key_out,
        } => {
            let cfg = ca.resolve()?.context("--ca-address is required")?;
            let id: mesh::identity::SpiffeId = id.parse()?;
            let cert = rt()?.block_on(agent::ca::request(&cfg, &id, lifetime))?;
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
