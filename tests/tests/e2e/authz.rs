//! L4 authorization and PeerAuthentication (issue #3), enforced by the
//! destination agent: on HBONE with the client's SPIFFE ID (denied streams
//! are answered 401), on plaintext inbound (15006) with no identity.
use anyhow::Result;
use testbed::mesh::{self, Agent, MeshCa, Server, Settings};

use crate::{agents, succeeded, World, ENROLLED, WAIT};

/// Rewrites the policy part of the enrolment file and waits until both
/// agents reloaded it.
fn set_policy(w: &World, agents: &mut [&mut Agent], yaml: &str) -> Result<()> {
    let count = |a: &Agent| {
        a.logs()
            .iter()
            .filter(|l| l["message"] == "configuration reloaded")
            .count()
    };
    let before: Vec<usize> = agents.iter().map(|a| count(a)).collect();
    let settings = Settings {
        extra: yaml.to_string(),
        ..Settings::default()
    };
    mesh::write_config(&w.cluster, &w.config, ENROLLED, &settings)?;
    for (a, n) in agents.iter().zip(before) {
        a.wait_access(WAIT, |_| count(a) > n)?;
    }
    Ok(())
}

const ALLOW_CLIENT: &str = "authorizationPolicies:
  - name: allow-client
    namespace: default
    selector: {app: server}
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
";

const DENY_DEFAULT_ON_8080: &str = "authorizationPolicies:
  - name: deny-8080
    namespace: default
    action: DENY
    rules:
      - from: [{source: {namespaces: [default]}}]
        to: [{operation: {ports: [\"8080\"]}}]
";

const ALLOW_NOBODY_HERE: &str = "authorizationPolicies:
  - name: allow-other
    namespace: default
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/other/sa/someone]}}]
";

#[test]
fn l4_policies_and_peer_authentication_are_enforced_and_rechecked() -> Result<()> {
    let w = World::new("authz")?;
    let ca = MeshCa::start(&w.cluster, "node1", &w.dir.join("ca"), &w.config)?;
    let _server = Server::start(w.cluster.pod("server"), &[8080, 9090])?;
    let (mut a1, mut a2) = agents(&w, &ca)?;
    let server = w.ip4("server");
    let ok = |from: &str, port: u16| -> Result<bool> { Ok(succeeded(&w.once(from, &server, port)?)) };

    // No policy: allowed, over HBONE (client) and plaintext (outsider).
    assert!(ok("client", 8080)? && ok("outsider", 8080)?);

    // ALLOW by principal: the client's identity gets in; plaintext has none.
    set_policy(&w, &mut [&mut a1, &mut a2], ALLOW_CLIENT)?;
    assert!(ok("client", 8080)?, "the allowed principal");
    assert!(!ok("outsider", 8080)?, "no identity, no ALLOW match");

    // DENY by namespace, scoped to one port.
    set_policy(&w, &mut [&mut a1, &mut a2], DENY_DEFAULT_ON_8080)?;
    assert!(!ok("client", 8080)?, "denied namespace on 8080");
    assert!(ok("client", 9090)?, "the DENY is port-scoped");
    let denied = a2
        .access_logs()
        .into_iter()
        .filter(|l| {
            l["result"]
                .as_str()
                .unwrap_or("")
                .contains("401: denied: denied by policy default/deny-8080")
        })
        .count();
    assert!(
        denied >= 1,
        "the destination agent answered 401 and logged why: {:?}",
        a2.access_logs()
    );

    // ALLOW policies that match nobody here deny everything.
    set_policy(&w, &mut [&mut a1, &mut a2], ALLOW_NOBODY_HERE)?;
    assert!(!ok("client", 9090)? && !ok("outsider", 9090)?);

    // A policy change closes open connections it no longer allows.
    set_policy(&w, &mut [&mut a1, &mut a2], "")?;
    let held = mesh::held_client(w.cluster.pod("client"), &server, 8080, 60)?;
    set_policy(&w, &mut [&mut a1, &mut a2], DENY_DEFAULT_ON_8080)?;
    let h = mesh::client_report(held)?;
    assert!(
        h["error"].is_string() && h["ok"].as_u64().unwrap() < 60,
        "the open connection must be closed: {h}"
    );
    assert!(a2
        .logs()
        .iter()
        .any(|l| l["message"] == "closing an open connection that policy no longer allows"));

    // PeerAuthentication: STRICT refuses plaintext, PERMISSIVE accepts it.
    set_policy(
        &w,
        &mut [&mut a1, &mut a2],
        "peerAuthentications:\n  - {name: strict, namespace: default, mode: STRICT}\n",
    )?;
    assert!(!ok("outsider", 9090)?, "STRICT: plaintext refused");
    assert!(ok("client", 9090)?, "STRICT: mTLS accepted");
    let strict = a2
        .access_logs()
        .into_iter()
        .any(|l| l["result"].as_str().unwrap_or("").contains("STRICT mTLS"));
    assert!(strict, "{:?}", a2.access_logs());
    set_policy(
        &w,
        &mut [&mut a1, &mut a2],
        "peerAuthentications:\n  - {name: permissive, namespace: default, mode: PERMISSIVE}\n",
    )?;
    assert!(ok("outsider", 9090)?, "PERMISSIVE: plaintext accepted");
    Ok(())
}
