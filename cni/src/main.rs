//! `mesh-cni`: a chained CNI plugin when run by a container runtime (`CNI_COMMAND` set), and
//! its own installer otherwise (`mesh-cni install|uninstall ...`).

mod api;
mod install;
mod plugin;

use std::io::{Read, Write};

// mimalloc in every build, so that the benchmark measures the allocator the
// image ships: its static musl binaries would otherwise get musl's slow malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let env = plugin::CniEnv::from_process();
        let mut stdin = Vec::new();
        // VERSION may come without stdin; a read error is reported as undecodable config.
        if env.command != "VERSION" {
            let _ = std::io::stdin().read_to_end(&mut stdin);
        }
        let outcome = plugin::run(&env, &stdin);
        if let Some(out) = outcome.stdout {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{out}");
            let _ = stdout.flush();
        }
        std::process::exit(outcome.status);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-V" | "--version")) {
        println!("mesh-cni {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("{}", install::USAGE);
        std::process::exit(if args.is_empty() { 2 } else { 0 });
    }
    std::process::exit(install::main(&args));
}
