//! `cargo xtask <command>`: every set-up and build step the project needs,
//! idempotent, so a fresh Debian machine (as root) needs nothing by hand.
//!
//! * `setup`       install what is missing (apt packages, nightly rust-src, bpf-linker)
//! * `build-ebpf`  build the kernel programs (setup first), and the upgrade
//!   test's "next release" variant of them
//! * `build-next`  the upgrade test's second agent binary (`target/debug/agent-next`)
//! * `demo`        build everything and run the local mesh demo
//! * `image`       the static (musl) release binaries the manifests run, in an
//!   image `FROM scratch` built with buildah, written as an OCI archive
//!   (`target/image/ambient-mesh.tar`, for `ctr images import` and `kind load
//!   image-archive`)
//! * `test`        fmt, clippy, the image, unit and end-to-end tests (the CI command)
//! * `bench`       L4: direct vs plain capture vs HBONE: latency, throughput,
//!   connections/s, CPU, memory; L7: HTTP direct, through the mesh, the mesh
//!   and a waypoint, and nginx (README numbers); `--only l4|l7`, `--mode
//!   plain|hbone|all`; installs its own tools (nginx-light, oha) first. It
//!   runs the image's binaries (and `demo` and `bench-kube` do too)
//! * `fuzz`        build the fuzz targets, run each `--time SECS` (30); part of `test` (fixed seed, fresh corpus)
//! * `soak`        the soak run (`--quick` for a smoke run; `soak.rs`)
mod fuzz;
mod soak;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Debian packages: LLVM 22 for bpf-linker (it must match rustc's LLVM), the
/// tools the tests, demo and benchmark drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "python3",
    "procps",
    "curl",
    "tcpdump",
    "bpftool",
    "protobuf-compiler",
    "libprotobuf-dev",
    "openssl",
    "iperf3",
    "sockperf",
];
/// Only the benchmark's L7 half needs these, so neither setup nor CI
/// installs them: nginx as the "one L7 proxy" yardstick, and oha (below)
/// as the load generator.
const BENCH_APT_PACKAGES: &[&str] = &["nginx-light"];
/// Pinned: oha 1.16.0 needs Rust 1.88 and builds with the image's 1.95
/// from its own Cargo.lock. The benchmark records the version it ran.
const OHA_VERSION: &str = "1.16.0";
const BPF_LINKER_VERSION: &str = "0.13.0";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The shipped binaries' target: static, so that the image holds nothing else.
const SHIP_TARGET: &str = "x86_64-unknown-linux-musl";
/// The programs the manifests run (deploy/), each its own package's binary.
const SHIP_BINARIES: &[&str] = &["agent", "mesh-cni", "waypoint"];
/// musl-gcc for the C parts (ring, mimalloc) of the musl build; buildah for the image.
const IMAGE_APT_PACKAGES: &[&str] = &["musl-tools", "buildah"];
/// The image's name; deploy/kustomization.yaml's one `images:` entry gives
/// the manifests the same (tests/tests/image.rs checks that they agree).
const IMAGE_NAME: &str = "localhost/ambient-mesh";

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    match cmd {
        "setup" => setup(),
        "build-ebpf" => build_ebpf(),
        "build-next" => build_agent_next(),
        "demo" => demo(rest),
        "image" => image(),
        "test" => test(rest),
        "bench" => bench(rest),
        "bench-kube" => bench_kube(rest),
        "fuzz" => fuzz::fuzz(rest),
        "soak" => soak::soak(rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|build-ebpf|build-next|demo|image|test|fuzz|bench|bench-kube|soak> [args]"
            );
            if cmd == "help" {
                Ok(())
            } else {
                bail!("unknown command `{cmd}`")
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(c: &mut Command) -> Result<()> {
    eprintln!("+ {c:?}");
    let status = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed with {status}");
    }
    Ok(())
}

/// Runs `c` and returns its stdout, trimmed.
fn output(c: &mut Command) -> Result<String> {
    eprintln!("+ {c:?}");
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn succeeds(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Debian `packages` that are missing; does nothing when all are there.
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Installs whatever is missing; does nothing when all is there.
fn setup() -> Result<()> {
    apt_install(APT_PACKAGES)?;
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the `nightly` toolchain is missing: the image ships one; `rustup toolchain install nightly` where a download is possible");
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        // The default feature wants LLVM 23; without LLVM_PREFIX it looks in /usr.
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    // The independent HBONE peer of the interop test (testbed/apps/hbone_peer.py).
    if !succeeds(Command::new("python3").args(["-c", "import h2"])) {
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "h2"]))?;
    }
    Ok(())
}

/// The kernel object, where build.rs of the agent looks for it.
fn ebpf_object() -> PathBuf {
    root().join("target").join(EBPF_TARGET).join("release/agent-ebpf")
}

/// The upgrade test's "next release" object (feature `next-layout`), beside it.
fn ebpf_next_object() -> PathBuf {
    ebpf_object().with_file_name("agent-ebpf-next")
}

/// Builds the kernel programs twice: the release object and the upgrade
/// test's "next release" variant. The variant reuses every dependency build
/// (core, aya-ebpf): only agent-common and agent-ebpf compile again. It is
/// built first and copied aside, because both builds write the same
/// `release/agent-ebpf`; the second build then puts the release object back.
fn build_ebpf() -> Result<()> {
    setup()?;
    build_ebpf_with(&["--features", "next-layout"])?;
    std::fs::copy(ebpf_object(), ebpf_next_object())
        .with_context(|| format!("cannot copy the next-layout object to {}", ebpf_next_object().display()))?;
    build_ebpf_with(&[])?;
    for obj in [ebpf_object(), ebpf_next_object()] {
        if !obj.is_file() {
            bail!("the eBPF build finished but {} is missing", obj.display());
        }
        eprintln!("eBPF object: {}", obj.display());
    }
    Ok(())
}

fn build_ebpf_with(features: &[&str]) -> Result<()> {
    let dir = root().join("agent-ebpf");
    let mut c = Command::new("cargo");
    c.current_dir(&dir)
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            EBPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .args(features)
        .arg("--target-dir")
        .arg(root().join("target"))
        // Flags meant for the host build must not leak into the BPF build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    run(&mut c)
}

/// The upgrade test's second agent: the same sources with `next-layout`
/// (it embeds `agent-ebpf-next`), as `target/debug/agent-next`. Only
/// agent-common and the agent crate compile again; every dependency build is
/// reused. Both builds write `target/debug/agent`: the variant is copied
/// aside, then the release build (fresh, from cargo's cache) is put back.
fn build_agent_next() -> Result<()> {
    let agent = root().join("target/debug/agent");
    let next = agent.with_file_name("agent-next");
    run(cargo().args(["build", "-p", "agent", "--features", "next-layout", "--bin", "agent"]))?;
    std::fs::copy(&agent, &next).with_context(|| format!("cannot copy {} to {}", agent.display(), next.display()))?;
    run(cargo().args(["build", "-p", "agent", "--bin", "agent"]))?;
    eprintln!("upgrade test agent: {}", next.display());
    Ok(())
}

/// Where the shipped binaries are built: the release profile of the musl
/// target. The benchmark, the demo and bench-kube run from here too, so
/// `mesh::binary` finds the image's binaries beside them.
fn ship_dir() -> PathBuf {
    root().join("target").join(SHIP_TARGET).join("release")
}

/// The OCI archive `cargo xtask image` writes.
fn image_archive() -> PathBuf {
    root().join("target/image/ambient-mesh.tar")
}

/// Builds the shipped binaries (the eBPF object must be built first: the
/// agent embeds it). Always this one command, so that the image and the
/// benchmark get the same build: other packages in it would change the
/// features of shared dependencies.
fn build_shipped() -> Result<()> {
    apt_install(IMAGE_APT_PACKAGES)?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t == SHIP_TARGET) {
        run(Command::new("rustup").args(["target", "add", SHIP_TARGET]))?;
    }
    let mut c = cargo();
    c.args(["build", "--release", "--target", SHIP_TARGET, "--bins"]);
    for package in SHIP_BINARIES {
        c.args(["-p", package]);
    }
    run(musl_cc(&mut c))
}

/// cc-rs would fall back to the host's glibc gcc where musl-gcc is missing.
/// Every musl build sets it alike: ring's build script reruns when it
/// changes, and with it everything above ring (a bench-kube run rebuilt
/// ring, rustls and kube twice, flipping between the two builds).
fn musl_cc(c: &mut Command) -> &mut Command {
    c.env(format!("CC_{}", SHIP_TARGET.replace('-', "_")), "musl-gcc")
}

/// The shipped binaries, then the benchmark's and the demo's own programs
/// beside them (a build of their own, see [`build_shipped`]).
fn build_release() -> Result<()> {
    build_ebpf()?;
    build_shipped()?;
    run(musl_cc(cargo().args([
        "build",
        "--release",
        "--target",
        SHIP_TARGET,
        "-p",
        "testbed",
        "--bins",
    ])))
}

fn demo(args: &[String]) -> Result<()> {
    build_release()?;
    run(Command::new(ship_dir().join("mesh-demo"))
        .args(args)
        .current_dir(root()))
}

fn bench(args: &[String]) -> Result<()> {
    build_release()?;
    let only_l4 = args.windows(2).any(|w| w[0] == "--only" && w[1] == "l4") || args.iter().any(|a| a == "--only=l4");
    if !only_l4 {
        bench_tools()?;
    }
    run(Command::new(ship_dir().join("mesh-bench"))
        .args(args)
        .current_dir(root()))
}

fn image() -> Result<()> {
    build_ebpf()?;
    build_shipped()?;
    pack_image()
}

/// The shipped binaries in an image `FROM scratch`, written as an OCI
/// archive whose `org.opencontainers.image.ref.name` is the full name (what
/// `ctr images import` and `kind load image-archive` name the image).
/// buildah keeps its storage under target/image and it is removed again,
/// so nothing is left outside the target dir.
fn pack_image() -> Result<()> {
    let dir = image_archive().parent().expect("in target/image").to_owned();
    let storage = dir.join("buildah");
    let bins = dir.join("bin");
    let _ = std::fs::remove_dir_all(&storage);
    let _ = std::fs::remove_file(image_archive());
    std::fs::create_dir_all(&bins)?;
    // Without the release profile's line tables (a fifth of the size); the
    // code is the benchmarked binaries' byte for byte, the symbols stay.
    for b in SHIP_BINARIES {
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(bins.join(b))
            .arg(ship_dir().join(b)))?;
    }
    let buildah = || {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    };
    let name = format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"));
    let packed = (|| {
        let ctr = output(buildah().args(["from", "scratch"]))?;
        run(buildah()
            .args(["copy", "--chown", "0:0", "--chmod", "0755", &ctr])
            .args(SHIP_BINARIES.iter().map(|b| bins.join(b)))
            .arg("/usr/local/bin/"))?;
        run(buildah().args([
            "config",
            "--os",
            "linux",
            "--arch",
            "amd64",
            "--env",
            "PATH=/usr/local/bin",
            "--entrypoint",
            r#"["/usr/local/bin/agent"]"#,
            "--cmd",
            r#"["--help"]"#,
            "--created-by",
            "cargo xtask image",
            "--label",
            "org.opencontainers.image.title=ambient-mesh",
            "--label",
            "org.opencontainers.image.description=agent, mesh-cni and waypoint (static, FROM scratch)",
            "--label",
            &format!("org.opencontainers.image.version={}", env!("CARGO_PKG_VERSION")),
            "--label",
            &format!("org.opencontainers.image.licenses={}", env!("CARGO_PKG_LICENSE")),
            &ctr,
        ]))?;
        // The layer's file times and the image's creation time: the last
        // commit's, so that unchanged binaries give the same image digest.
        let mut commit = buildah();
        commit.args(["commit", "--rm", "--format", "oci"]);
        if let Ok(t) = output(
            Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .current_dir(root()),
        ) {
            commit.args(["--timestamp", &t]);
        }
        run(commit.args([&ctr, &name]))?;
        let dest = format!("oci-archive:{}:{name}", image_archive().display());
        run(buildah().args(["push", &name, &dest]))
    })();
    let _ = std::fs::remove_dir_all(&storage);
    packed?;
    eprintln!("image {name}: {}", image_archive().display());
    Ok(())
}

/// The L7 half's tools, idempotent: nginx-light from Debian, and oha
/// (pinned, with its own Cargo.lock) into `target/tools`, outside PATH and
/// outside every other build. Its default features stay: oha 1.16.0 does
/// not compile without a TLS stack, although the load is plain HTTP.
fn bench_tools() -> Result<()> {
    apt_install(BENCH_APT_PACKAGES)?;
    let tools = root().join("target/tools");
    let installed = Command::new(tools.join("bin/oha")).arg("--version").output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(OHA_VERSION)) {
        run(cargo()
            .args(["install", "oha", "--locked", "--version", OHA_VERSION, "--root"])
            .arg(&tools))?;
    }
    Ok(())
}

/// The Kubernetes source at scale: agent memory per 1,000 pods.
fn bench_kube(args: &[String]) -> Result<()> {
    build_release()?;
    run(Command::new(ship_dir().join("kube-scale"))
        .args(args)
        .current_dir(root()))
}

/// The CI command: formatting, lints, then every test (unit and end-to-end).
fn test(args: &[String]) -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The kernel programs are a workspace of their own.
    run(cargo()
        .args(["fmt", "--all", "--manifest-path"])
        .arg(root().join("agent-ebpf/Cargo.toml"))
        .args(["--", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The end-to-end tests start the binaries from the shared target dir.
    run(cargo().args([
        "build", "-p", "agent", "-p", "mesh-cni", "-p", "testbed", "-p", "waypoint", "--bins",
    ]))?;
    build_agent_next()?;
    // tests/tests/image.rs checks the image the manifests run.
    build_shipped()?;
    pack_image()?;
    fuzz::ci()?;
    run(cargo().args(["test", "--workspace"]).args(args))
}
