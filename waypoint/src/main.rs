//! `waypoint`: parse the command line, set up logging, run the data plane
//! (`run`), the controller (`controller`) or print manifests (`generate`).
use clap::Parser;
use waypoint::config::{Cli, Cmd, LogFormat};

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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run(args) => waypoint::app::run((*args).into_config()?),
        Cmd::Controller(args) => waypoint::controller::run(args),
        Cmd::Generate(args) => waypoint::controller::generate::print(&args),
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
