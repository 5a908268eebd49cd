//! Helpers for the end-to-end tests live in `testbed`. Here: what the checks
//! of deploy/ and of the image (tests/deploy.rs, tests/image.rs) share.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_json::Value;

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every non-empty YAML document of `text`, as JSON values.
pub fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, de)| Value::deserialize(de).unwrap_or_else(|e| panic!("{origin}: document {i}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kubectl() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL") {
        return k.into();
    }
    let default = Path::new("/usr/bin/kubectl");
    if default.exists() {
        return default.into();
    }
    "kubectl".into()
}

/// `kubectl kustomize <dir>`: the documents it renders.
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let kubectl = kubectl();
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{} kustomize` ({e}): kubectl is needed to render deploy/ (CI's image has \
             /usr/bin/kubectl; install it or point KUBECTL at one; no cluster is needed)",
                kubectl.display()
            )
        });
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(
        &String::from_utf8(out.stdout).unwrap(),
        &format!("kubectl kustomize {}", dir.display()),
    )
}
