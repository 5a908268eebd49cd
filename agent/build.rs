//! Embeds the kernel programs built by `cargo xtask build-ebpf`.
//!
//! The object is looked up at `$AGENT_EBPF_OBJECT` or, by default,
//! `<workspace>/target/bpfel-unknown-none/release/agent-ebpf` (with the
//! `next-layout` feature: `agent-ebpf-next`, the upgrade test's variant). When it is
//! missing an empty object is embedded so user-space builds (and clippy) still
//! work; the agent then refuses to start with an error naming
//! `cargo xtask build-ebpf` (or pass `--bpf-object <path>` at run time).
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let name = if env::var_os("CARGO_FEATURE_NEXT_LAYOUT").is_some() {
        "agent-ebpf-next"
    } else {
        "agent-ebpf"
    };
    let object = env::var_os("AGENT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpfel-unknown-none/release").join(name));
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("agent-ebpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=eBPF object {} not found: run `cargo xtask build-ebpf` (the agent will refuse to start without it)",
            object.display()
        );
    }
    fs::write(&out, bytes).expect("write OUT_DIR/agent-ebpf.o");
}
