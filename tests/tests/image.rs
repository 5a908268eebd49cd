//! The image that `cargo xtask image` writes (`target/image/ambient-mesh.tar`),
//! read as a container runtime reads it:
//!
//! * the OCI layout's index names it as deploy/ does, and every blob has the
//!   digest it is listed under;
//! * its config runs the agent; its one layer holds the shipped binaries and
//!   nothing else (no shell, no libc);
//! * each binary runs from the unpacked root file system alone (`chroot`),
//!   which a dynamically linked one cannot; the agent carries its kernel
//!   programs;
//! * every container of deploy/ finds its program in it.
//!
//! Needs root (chroot) and the archive (`cargo xtask test` builds it first).
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use e2e::{deploy_dir, kustomize};
use serde_json::Value;

const BIN_DIR: &str = "usr/local/bin";
/// The programs the manifests run.
const BINARIES: [&str; 3] = ["agent", "mesh-cni", "waypoint"];

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The archive, unpacked once per test binary into target/image/unpacked.
struct Image {
    /// `org.opencontainers.image.ref.name` of the index's one manifest.
    ref_name: String,
    config: Value,
    /// The layer's file names, as listed in it.
    files: BTreeSet<String>,
    rootfs: PathBuf,
}

fn image() -> &'static Image {
    static I: OnceLock<Image> = OnceLock::new();
    I.get_or_init(unpack)
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The blob `descriptor` points to, after checking its digest and size.
fn blob(layout: &Path, descriptor: &Value) -> PathBuf {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let sum = sh(Command::new("sha256sum").arg(&path));
    assert_eq!(
        sum.split_whitespace().next(),
        Some(hex),
        "blob {digest}: content does not match"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        descriptor["size"].as_u64().unwrap(),
        "blob {digest}: size"
    );
    path
}

fn unpack() -> Image {
    let archive = target_dir().join("image/ambient-mesh.tar");
    assert!(
        archive.is_file(),
        "{} is missing: run `cargo xtask image` (`cargo xtask test` does)",
        archive.display()
    );
    let dir = target_dir().join("image/unpacked");
    let _ = fs::remove_dir_all(&dir);
    let (layout, rootfs) = (dir.join("layout"), dir.join("rootfs"));
    fs::create_dir_all(&layout).unwrap();
    fs::create_dir_all(&rootfs).unwrap();
    sh(Command::new("tar").arg("-xf").arg(&archive).arg("-C").arg(&layout));

    assert_eq!(json(&layout.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let m = &manifests[0];
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let ref_name = m["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("the index names the image (ctr images import reads the name there)")
        .to_string();

    let manifest = json(&blob(&layout, m));
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config = json(&blob(&layout, &manifest["config"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let layer = blob(&layout, &layers[0]);
    // The runtime checks the uncompressed layer against the config's diff_id.
    let media_type = layers[0]["mediaType"].as_str().unwrap();
    let uncompressed = match media_type {
        "application/vnd.oci.image.layer.v1.tar" => sh(Command::new("sha256sum").arg(&layer)),
        "application/vnd.oci.image.layer.v1.tar+gzip" => sh(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$0\" | sha256sum")
            .arg(&layer)),
        other => panic!("layer media type {other}"),
    };
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", uncompressed.split_whitespace().next().unwrap())]),
        "diff_ids"
    );
    let files = sh(Command::new("tar").arg("-tf").arg(&layer))
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    sh(Command::new("tar").arg("-xpf").arg(&layer).arg("-C").arg(&rootfs));
    Image {
        ref_name,
        config,
        files,
        rootfs,
    }
}

/// The name that deploy/kustomization.yaml's one `images:` entry gives the
/// image is the name in the archive, so that `kind load image-archive` (or
/// `ctr -n k8s.io images import`) and `kubectl apply -k deploy/` agree.
#[test]
fn archive_names_the_image_as_deploy_does() {
    let k: Value = serde_yaml::from_str(&fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap()).unwrap();
    let entry = &k["images"][0];
    let name = format!(
        "{}:{}",
        entry["newName"].as_str().unwrap(),
        entry["newTag"].as_str().unwrap()
    );
    assert_eq!(image().ref_name, name);
    // A name with a registry part: containerd keeps it as it is, where a short
    // one would be looked up as docker.io/library/... by the kubelet.
    let (domain, _) = name.split_once('/').unwrap_or_default();
    assert!(
        domain.contains(['.', ':']) || domain == "localhost",
        "{name}: not fully qualified"
    );
}

#[test]
fn config_runs_the_agent() {
    let config = &image().config;
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/agent"]));
    assert_eq!(c["Cmd"], serde_json::json!(["--help"]));
    assert_eq!(c["Env"], serde_json::json!(["PATH=/usr/local/bin"]));
    // The manifests set the user of each container (root for the agent).
    assert!(c["User"].as_str().unwrap_or("").is_empty(), "User: {}", c["User"]);
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "ambient-mesh");
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn layer_holds_the_binaries_and_nothing_else() {
    let mut expected: BTreeSet<String> = ["usr", "usr/local", BIN_DIR].map(String::from).into();
    expected.extend(BINARIES.map(|b| format!("{BIN_DIR}/{b}")));
    assert_eq!(image().files, expected, "no shell, no libc, no certificates");
    for b in BINARIES {
        let meta = fs::metadata(image().rootfs.join(BIN_DIR).join(b)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{b}: owner");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755, "{b}: mode");
    }
}

/// In a root file system with nothing but the binaries a dynamically linked
/// one cannot start (no loader, no libc): this is the static check.
#[test]
fn binaries_run_from_the_image_alone() {
    for b in BINARIES {
        // By its path: the child's environment (and so its PATH) is empty.
        let out = Command::new("/usr/sbin/chroot")
            .arg(&image().rootfs)
            .arg(format!("/{BIN_DIR}/{b}"))
            .arg("--version")
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{b} --version` in the image: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{b} {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// The agent embeds the kernel programs at build time; without them it
/// refuses to start. The image's agent holds exactly `cargo xtask
/// build-ebpf`'s object.
#[test]
fn agent_carries_its_kernel_programs() {
    let object = fs::read(target_dir().join("bpfel-unknown-none/release/agent-ebpf")).unwrap();
    assert!(object.starts_with(b"\x7fELF"), "the eBPF object is an ELF file");
    let agent = fs::read(image().rootfs.join(BIN_DIR).join("agent")).unwrap();
    assert!(
        agent.windows(object.len()).any(|w| w == object),
        "the image's agent does not embed target/bpfel-unknown-none/release/agent-ebpf"
    );
}

/// The data-path binaries define `memmove` themselves (crate `memmove`):
/// musl's copies byte by byte backwards whenever source and destination are
/// equal, which rustls asks for after every TLS read. Musl's is assembly
/// whose symbol has no size; the crate's is a compiled function.
#[test]
fn agent_and_waypoint_replace_musls_memmove() {
    for b in ["agent", "waypoint"] {
        let symbols = sh(Command::new("readelf")
            .arg("-sW")
            .arg(image().rootfs.join(BIN_DIR).join(b)));
        let memmove: Vec<Vec<&str>> = symbols
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.get(7) == Some(&"memmove"))
            .collect();
        assert_eq!(memmove.len(), 1, "{b}: one memmove symbol, found {memmove:?}");
        assert_eq!(memmove[0][3], "FUNC", "{b}: {:?}", memmove[0]);
        assert_ne!(
            memmove[0][2], "0",
            "{b}: memmove has no size, so it is musl's assembly: is `extern crate memmove;` gone from its main.rs?"
        );
    }
}

/// Each container of deploy/ runs this image, and the program it names
/// (its `command`, else the image's entrypoint) is in it, on the image's PATH.
#[test]
fn every_container_of_deploy_finds_its_program() {
    let img = image();
    let entrypoint = img.config["config"]["Entrypoint"][0].as_str().unwrap().to_string();
    let path = img.config["config"]["Env"][0]
        .as_str()
        .and_then(|e| e.strip_prefix("PATH="))
        .unwrap()
        .to_string();
    let mut seen = 0;
    for doc in kustomize(&deploy_dir()) {
        let Some(containers) = doc.pointer("/spec/template/spec/containers").and_then(Value::as_array) else {
            continue;
        };
        for c in containers {
            let name = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let what = format!(
                "{} {}/{}",
                name(&doc["kind"]),
                name(&doc["metadata"]["name"]),
                name(&c["name"])
            );
            assert_eq!(c["image"].as_str(), Some(img.ref_name.as_str()), "{what}: image");
            let program = c["command"][0].as_str().map_or(entrypoint.clone(), str::to_string);
            let found = if let Some(absolute) = program.strip_prefix('/') {
                Some(img.rootfs.join(absolute))
            } else {
                path.split(':')
                    .map(|d| img.rootfs.join(d.trim_start_matches('/')).join(&program))
                    .find(|p| p.is_file())
            };
            assert!(
                found.is_some_and(|p| p.metadata().is_ok_and(|m| m.permissions().mode() & 0o111 != 0)),
                "{what}: `{program}` is not in the image"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "agent, install-cni, ca, controller");
}
