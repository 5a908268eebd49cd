//! Mesh identity (issue #3, first slice): the CA runs as `agent ca serve` in
//! node1's netns; agents authenticate with their node credential over mTLS
//! and get certificates only for the service accounts of their own pods.
use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use anyhow::Result;
use serde_json::Value;
use testbed::mesh::{self, Agent, MeshCa, Settings};

use crate::{World, ENROLLED, WAIT};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// `agent ca request` run in `node`'s netns with that node's credential.
fn request(w: &World, ca: &MeshCa, node: &str, id: &str, extra: &[&str]) -> Result<std::process::Output> {
    let mut cmd = w.cluster.node(node).try_command(mesh::binary("agent")?)?;
    cmd.args(["ca", "request", "--id", id, "--lifetime", "1h"])
        .args(ca.client_args(node))
        .args(extra);
    Ok(cmd.output()?)
}

fn ready_for<'a>(agent: &'a Agent, id: &str) -> impl Fn(&[Value]) -> bool + 'a {
    let id = id.to_string();
    move |_| {
        agent
            .logs()
            .iter()
            .any(|l| l["message"] == "workload certificate ready" && l["identity"] == id)
    }
}

fn serials(agent: &Agent, id: &str) -> Vec<String> {
    agent
        .logs()
        .iter()
        .filter(|l| l["message"] == "workload certificate ready" && l["identity"] == id)
        .filter_map(|l| l["serial"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn ca_issues_certificates_only_for_pods_of_the_node_and_agents_rotate_them() -> Result<()> {
    let w = World::new("ca")?;
    let ca = MeshCa::start(&w.cluster, "node1", &w.dir.join("ca"), &w.config)?;
    for key in [
        "root-key.pem",
        "ca-server-key.pem",
        "nodes/node1/key.pem",
        "nodes/node2/key.pem",
    ] {
        let mode = std::fs::metadata(ca.dir.join(key))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    // Agents fetch ahead for their enrolled pods (short lifetime: renewal at half-life).
    let start = |node: &str| -> Result<Agent> {
        let mut args = ca.client_args(node);
        args.extend(["--cert-lifetime".into(), "6s".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut a = Agent::start(&w.cluster, node, &w.config, &w.dir, &args)?;
        a.wait_for("agent ready", WAIT)?;
        Ok(a)
    };
    let a1 = start("node1")?;
    let a2 = start("node2")?;
    a1.wait_access(WAIT, ready_for(&a1, CLIENT_ID))
        .map_err(|e| e.context(ca.log()))?;
    a2.wait_access(WAIT, ready_for(&a2, SERVER_ID))?;
    assert!(serials(&a1, SERVER_ID).is_empty(), "node1 has no server pod");
    // Renewed at half-life (3 s of 6 s), with a new certificate each time.
    let first = a1
        .logs()
        .into_iter()
        .find(|l| l["identity"] == CLIENT_ID && l["message"] == "workload certificate ready");
    let renew_in = first.as_ref().and_then(|l| l["renew_in_s"].as_u64());
    assert!(
        matches!(renew_in, Some(2..=3)),
        "renewal must be due at half-life: {first:?}"
    );
    a1.wait_access(Duration::from_secs(15), |_| serials(&a1, CLIENT_ID).len() >= 2)?;
    let s = serials(&a1, CLIENT_ID);
    assert_ne!(s[0], s[1], "{s:?}");
    assert!(s.len() <= 3, "no renewal storm: {s:?}");

    // The CA refuses a node asking for a service account with no pod on it.
    let out = request(&w, &ca, "node2", CLIENT_ID, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "node2 must not get the client identity");
    assert!(
        err.contains("no pod of service account default/client runs on node node2"),
        "{err}"
    );
    // ... and another trust domain.
    let out = request(&w, &ca, "node1", "spiffe://other.domain/ns/default/sa/client", &[])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in this CA's trust domain"));

    // What it issues is what Istio's workloads carry.
    let out = request(&w, &ca, "node1", CLIENT_ID, &[])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = w.dir.join("client.pem");
    std::fs::write(&pem, &out.stdout)?;
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&pem)
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("X509v3 Subject Alternative Name: critical"), "{text}");
    assert!(text.contains(&format!("URI:{CLIENT_ID}")), "{text}");
    assert!(
        text.contains("ASN1 OID: prime256v1") && text.contains("id-ecPublicKey"),
        "{text}"
    );
    assert!(
        text.contains("Subject: \n") || text.contains("Subject:\n"),
        "empty subject: {text}"
    );
    let dates = Command::new("openssl")
        .args(["x509", "-noout", "-startdate", "-enddate", "-in"])
        .arg(&pem)
        .output()?;
    let dates = String::from_utf8_lossy(&dates.stdout).to_string();
    let epoch = |field: &str| -> Result<i64> {
        let line = dates.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default();
        let out = Command::new("date").args(["-u", "-d", line, "+%s"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let life = epoch("notAfter=")? - epoch("notBefore=")?;
    assert_eq!(life, 3600 + 300, "1 h asked, issued 5 min back-dated: {dates}");

    // A credential from another root is refused at the TLS handshake.
    let rogue = w.dir.join("rogue");
    mesh::agent_cli(&["ca", "init", "--dir", rogue.to_str().unwrap(), "--node", "node1"])?;
    let mut cmd = w.cluster.node("node1").try_command(mesh::binary("agent")?)?;
    cmd.args([
        "ca",
        "request",
        "--id",
        CLIENT_ID,
        "--ca-address",
        &ca.address,
        "--ca-root",
    ])
    .arg(ca.dir.join("root-cert.pem"))
    .arg("--node-cert")
    .arg(rogue.join("nodes/node1/cert.pem"))
    .arg("--node-key")
    .arg(rogue.join("nodes/node1/key.pem"));
    // The agents keep renewing their 6 s certificates meanwhile: count
    // only what is not theirs.
    let issued = |ca: &MeshCa| {
        ca.log()
            .lines()
            .filter(|l| {
                l.contains("certificate issued") && !l.contains("\"lifetime_s\":6,") && !l.contains("\"lifetime_s\":6}")
            })
            .count()
    };
    let before = issued(&ca);
    let out = cmd.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    // The same request with node1's own credential succeeded above: the
    // handshake itself refuses this one (the client sees the alert, or the
    // closed connection when the alert loses the race), before any request.
    assert!(
        !out.status.success() && err.contains("cannot reach the CA") && err.contains("transport error"),
        "a credential of another root must not get certificates: {err}"
    );
    assert_eq!(issued(&ca), before, "{}", ca.log());

    // When the last pod of a service account leaves, its certificate is dropped.
    mesh::write_config(&w.cluster, &w.config, &["server"], &Settings::default())?;
    a1.wait_access(WAIT, |_| {
        a1.logs().iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("workload certificate dropped"))
        })
    })?;
    mesh::write_config(&w.cluster, &w.config, ENROLLED, &Settings::default())?;
    Ok(())
}
