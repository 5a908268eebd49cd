//! Waypoint binding and steering (issue #9) with real agents: connections
//! to a bound destination go to a waypoint pod over HBONE (`:authority` =
//! the original VIP:port or pod IP:port, the waypoint's identity expected),
//! spread over its pods; a bypass is refused by the destination (401,
//! "bypassed waypoint"); a missing or unready waypoint fails closed; a
//! `service` waypoint leaves pod-addressed traffic direct; `none` opts out.
//!
//! Here the waypoint's pods are `hbone_peer.py server`s (an independent
//! HBONE terminator that records each CONNECT's `:authority` and the
//! caller's identity, so the agents' side is checked on its own) with a
//! certificate of the waypoint's service account, in the network
//! namespaces of the unenrolled pods `outsider` (node1) and `backend`
//! (node2). `waypoint.rs` runs the real waypoint.
use std::{fmt::Write as _, fs, path::PathBuf};

use anyhow::{ensure, Result};
use serde_json::Value;
use testbed::mesh::{self, Agent, MeshCa, Server};

use crate::{
    agents,
    hardening::{metric, refused},
    interop::{peer_client, plain_client_at, PeerServer},
    node_get, succeeded, World, APP_PORT, ENROLLED, WAIT,
};

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The waypoint `wp`'s identity (its service account defaults to its name).
pub const WP_ID: &str = "spiffe://cluster.local/ns/default/sa/wp";
/// Service `web` (port 80 -> 8080, selecting `server`).
pub const VIP: &str = "10.96.0.10";
pub const VIP_PORT: u16 = 80;

/// A waypoint in the enrolment file.
pub struct Waypoint<'a> {
    pub name: &'a str,
    /// More fields of its `waypoints:` entry, e.g. `forServiceAccount: server`.
    pub fields: &'a str,
    /// Unenrolled testbed pods whose network namespaces host its pods
    /// (named `<name>-<host>`, service account `wp`... its name).
    pub hosts: &'a [&'a str],
    /// Whether its pods are ready.
    pub ready: bool,
}

/// Binding labels, each as YAML flow-map contents (e.g.
/// `istio.io/use-waypoint: wp`).
#[derive(Default, Clone, Copy)]
pub struct Labels<'a> {
    /// Namespace `default`.
    pub namespace: &'a str,
    /// Service `web`.
    pub service: &'a str,
    /// Pod `server` (besides `app: server`).
    pub server: &'a str,
}

/// The enrolment file: the World's enrolled pods, the waypoint's pods,
/// Service `web`, namespace `default` and the waypoint, with `labels`.
pub fn write_mesh(w: &World, wp: Option<&Waypoint>, labels: Labels) -> Result<()> {
    let mut y = String::new();
    for wp in wp.iter() {
        for host in wp.hosts {
            let p = w.cluster.pod(host);
            let _ = write!(
                y,
                "  - name: {name}-{host}\n    namespace: default\n    serviceAccount: {name}\n    node: {node}\n    netns: {netns}\n    cgroup: {cgroup}\n    ips: [\"{ip4}\", \"{ip6}\"]\n    labels: {{gateway.networking.k8s.io/gateway-name: {name}}}\n    healthy: {ready}\n",
                name = wp.name,
                node = p.node,
                netns = p.netns_path.display(),
                cgroup = p.cgroup.display(),
                ip4 = p.ip4,
                ip6 = p.ip6,
                ready = wp.ready,
            );
        }
    }
    let _ = write!(
        y,
        "services:\n  - {{name: web, namespace: default, vips: [\"{VIP}\"], ports: [{{port: {VIP_PORT}, targetPort: {APP_PORT}}}], selector: {{app: server}}, labels: {{{}}}}}\nnamespaces:\n  - {{name: default, labels: {{{}}}}}\n",
        labels.service, labels.namespace
    );
    if let Some(wp) = wp {
        let _ = writeln!(
            y,
            "waypoints:\n  - {{name: {}, namespace: default, {}}}",
            wp.name, wp.fields
        );
    }
    let settings = mesh::Settings {
        extra: y,
        ..Default::default()
    };
    mesh::write_config(&w.cluster, &w.config, ENROLLED, &settings)?;
    if !labels.server.is_empty() {
        let text = fs::read_to_string(&w.config)?;
        let with = text.replacen(
            "labels: {app: server}",
            &format!("labels: {{app: server, {}}}", labels.server),
            1,
        );
        ensure!(with != text, "no `labels: {{app: server}}` in the enrolment file");
        let tmp = w.config.with_extension("tmp");
        fs::write(&tmp, with)?;
        fs::rename(&tmp, &w.config)?;
    }
    Ok(())
}

/// Waits for the agent's "waypoint binding" line for `target` with `status`.
pub fn wait_binding(a: &Agent, target: &str, status: &str) -> Result<Value> {
    mesh::poll(WAIT, || {
        Ok(a.logs()
            .into_iter()
            .find(|l| l["message"] == "waypoint binding" && l["object"] == target && l["status"] == status))
    })
    .map_err(|e| e.context(format!("no `waypoint binding` {target} {status}:\n{}", a.raw_log())))
}

/// Waits until the agent has logged `message` `n` times (e.g. the n-th reload).
fn wait_count(a: &Agent, message: &str, n: usize) -> Result<()> {
    mesh::poll(WAIT, || {
        Ok((a.logs().iter().filter(|l| l["message"] == message).count() >= n).then_some(()))
    })
}

/// `mesh_agent_waypoint_bindings` of `node` for one waypoint, kind and status.
fn bindings(w: &World, node: &str, waypoint: &str, kind: &str, status: &str) -> Result<u64> {
    metric(
        w,
        node,
        &format!("mesh_agent_waypoint_bindings{{waypoint=\"{waypoint}\",kind=\"{kind}\",status=\"{status}\"}}"),
    )
}

/// The waypoint stand-ins' finished CONNECT streams with this authority.
fn streams_to<'a>(lines: &'a [Value], authority: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["authority"] == authority).collect()
}

/// Certificates and stand-ins of waypoint `wp` on outsider and backend.
struct Stand {
    root: PathBuf,
    servers: Vec<PeerServer>,
}

fn waypoint_stand_ins(w: &World, ca: &MeshCa) -> Result<Stand> {
    let root = ca.dir.join("root-cert.pem");
    // node1 hosts wp-outsider: its credential may fetch the waypoint's identity.
    let (chain, key) = ca.request(&w.cluster, "node1", WP_ID, &w.dir)?;
    let servers = ["outsider", "backend"]
        .iter()
        .map(|pod| PeerServer::start(w, pod, &chain, &key, &root))
        .collect::<Result<_>>()?;
    Ok(Stand { root, servers })
}

#[test]
fn per_service_account_waypoint_takes_vip_and_pod_traffic_and_a_bypass_is_refused() -> Result<()> {
    let w = World::new("steer")?;
    let wp = Waypoint {
        name: "wp",
        fields: "forServiceAccount: server",
        hosts: &["outsider", "backend"],
        ready: true,
    };
    write_mesh(&w, Some(&wp), Labels::default())?;
    let ca = MeshCa::start(&w.cluster, "node1", &w.dir.join("ca"), &w.config)?;
    let (mut a1, a2) = agents(&w, &ca)?;
    let _server = Server::start(w.cluster.pod("server"), &[APP_PORT])?;
    let mut stand = waypoint_stand_ins(&w, &ca)?;
    wait_binding(&a1, "default/web", "Bound")?;
    wait_binding(&a1, "default/server", "Bound")?;

    // The waypoint's pods are listed with a netns on each node, and neither
    // agent captures them.
    let ready = a1.wait_for("agent ready", WAIT)?;
    ensure!(!ready["enrolled"].to_string().contains("wp-"), "{ready}");

    // VIP traffic: to the waypoint with the VIP as :authority, as the
    // client, spread over both pods.
    const N: usize = 6;
    let vip = format!("{VIP}:{VIP_PORT}");
    for i in 0..N {
        let r = plain_client_at(&w, "client", VIP, VIP_PORT, &format!("vip-{i}"), 1)?;
        ensure!(succeeded(&r), "connection {i} through the waypoint: {r}");
    }
    for s in &mut stand.servers {
        s.wait_lines(|l| !streams_to(l, &vip).is_empty())?;
    }
    let per_pod: Vec<Vec<Value>> = stand.servers.iter().map(PeerServer::lines).collect();
    let total: usize = per_pod.iter().map(|l| streams_to(l, &vip).len()).sum();
    ensure!(total == N, "{N} streams with authority {vip}: {per_pod:?}");
    for lines in &per_pod {
        for l in streams_to(lines, &vip) {
            ensure!(l["peer_id"] == CLIENT_ID && l["status"] == 200, "{l}");
        }
    }

    // Pod-addressed traffic to a workload of that service account: its own
    // IP:port as :authority.
    let pod_dst = format!("{}:{APP_PORT}", w.ip4("server"));
    let r = plain_client_at(&w, "client", &w.ip4("server"), APP_PORT, "to-the-pod", 1)?;
    ensure!(succeeded(&r), "{r}");
    mesh::poll(WAIT, || {
        Ok(stand
            .servers
            .iter()
            .any(|s| !streams_to(&s.lines(), &pod_dst).is_empty())
            .then_some(()))
    })?;
    let steered = a1.wait_access(WAIT, |l| {
        l.iter()
            .filter(|l| l["waypoint"] == "default/wp" && l["dst"] == vip)
            .count()
            == N
    })?;
    let line = steered.iter().find(|l| l["dst"] == vip).expect("waited for");
    ensure!(
        line["dst_identity"] == WP_ID
            && line["protocol"] == "hbone"
            && line["service"] == "web.default.svc.cluster.local",
        "{line}"
    );

    // A bypass: the client's own identity straight to the server's agent.
    let (chain, key) = ca.request(&w.cluster, "node1", CLIENT_ID, &w.dir)?;
    let hbone = format!("{}:15008", w.ip4("server"));
    let args = [
        "--connect",
        &hbone,
        "--authority",
        &pod_dst,
        "--expect-id",
        SERVER_ID,
        "--message",
        "bypass",
    ];
    let (report, code) = peer_client(&w, "outsider", [&chain, &key, &stand.root], &args)?;
    ensure!(report["status"] == 401 && code == Some(1), "{report} {code:?}");
    mesh::poll(WAIT, || {
        Ok(a2
            .logs()
            .iter()
            .any(|l| l["message"] == "connection refused: bypassed waypoint" && l["peer"] == CLIENT_ID)
            .then_some(()))
    })?;
    ensure!(refused(&w, "node2", "inbound", "bypassed_waypoint")? == 1);
    // Plaintext from outside the mesh bypasses it too.
    let r = w.once("outsider", &w.ip4("server"), APP_PORT)?;
    ensure!(!succeeded(&r), "plaintext bypass carried: {r}");
    ensure!(refused(&w, "node2", "inbound", "bypassed_waypoint")? == 2);
    ensure!(bindings(&w, "node1", "default/wp", "service", "Bound")? == 1);
    ensure!(bindings(&w, "node1", "default/wp", "workload", "Bound")? == 1);

    // A waypoint that presents another identity than the binding expects
    // is refused (and nothing goes direct).
    let before = refused(&w, "node1", "outbound", "unreachable")?;
    write_mesh(
        &w,
        Some(&Waypoint {
            fields: "forServiceAccount: server, serviceAccount: imposter",
            ..wp
        }),
        Labels::default(),
    )?;
    wait_count(&a1, "configuration reloaded", 1)?;
    let r = plain_client_at(&w, "client", VIP, VIP_PORT, "wrong-id", 1);
    let last = a1.access_logs().pop();
    ensure!(
        r.as_ref().map_or(true, |r| !succeeded(r)),
        "a waypoint with the wrong identity carried it: {r:?} {last:?}"
    );
    ensure!(
        refused(&w, "node1", "outbound", "unreachable")? == before + 1,
        "{last:?}"
    );
    let total_after: usize = stand.servers.iter().map(|s| streams_to(&s.lines(), &vip).len()).sum();
    ensure!(total_after == N, "no stream reached a waypoint pod");
    Ok(())
}

#[test]
fn missing_waypoint_fails_closed_service_waypoint_leaves_pods_direct_and_none_opts_out() -> Result<()> {
    let w = World::new("steer-closed")?;
    write_mesh(
        &w,
        None,
        Labels {
            service: "istio.io/use-waypoint: nope",
            ..Default::default()
        },
    )?;
    let a1 = w.agent("node1")?;
    let _a2 = w.agent("node2")?;
    let _server = Server::start(w.cluster.pod("server"), &[APP_PORT])?;

    // A typo: the binding says so, and the VIP is refused, not sent direct.
    let line = wait_binding(&a1, "default/web", "WaypointMissing")?;
    ensure!(
        line["waypoint"] == "default/nope" && line["traffic"] == "refused",
        "{line}"
    );
    ensure!(bindings(&w, "node1", "default/nope", "service", "WaypointMissing")? == 1);
    let (dump, _) = node_get(&w.cluster, "node1", "http://127.0.0.1:15000/config_dump")?;
    let dump: Value = serde_json::from_str(&dump)?;
    ensure!(
        dump["bindings"].as_array().is_some_and(|b| b
            .iter()
            .any(|b| b["target"] == "default/web" && b["status"] == "WaypointMissing")),
        "{}",
        dump["bindings"]
    );
    let r = w.once("client", VIP, VIP_PORT)?;
    ensure!(
        !succeeded(&r) && r["error"].as_str().unwrap_or("").contains("ConnectionReset"),
        "carried (or not reset) despite the missing waypoint: {r}"
    );
    mesh::poll(WAIT, || {
        Ok(a1
            .logs()
            .iter()
            .any(|l| l["message"] == "connection refused: waypoint unavailable" && l["status"] == "WaypointMissing")
            .then_some(()))
    })?;
    ensure!(refused(&w, "node1", "outbound", "waypoint_unavailable")? == 1);
    let access = a1.wait_access(WAIT, |l| l.iter().any(|l| l["dst"] == format!("{VIP}:{VIP_PORT}")))?;
    let line = access
        .iter()
        .find(|l| l["dst"] == format!("{VIP}:{VIP_PORT}"))
        .expect("waited for");
    ensure!(
        line["result"]
            .as_str()
            .unwrap_or("")
            .starts_with("waypoint_unavailable")
            && line["waypoint"] == "default/nope",
        "{line}"
    );

    // A namespace-wide `service` waypoint without a ready pod: the VIP is
    // refused, pod-addressed traffic (a headless Service or StatefulSet's
    // pod, a metrics scrape) goes direct, both families.
    let wp = Waypoint {
        name: "wp",
        fields: "",
        hosts: &["outsider"],
        ready: false,
    };
    let ns = Labels {
        namespace: "istio.io/use-waypoint: wp",
        ..Default::default()
    };
    write_mesh(&w, Some(&wp), ns)?;
    let line = wait_binding(&a1, "default/web", "NoReadyPod")?;
    ensure!(line["source"] == "NamespaceLabel", "{line}");
    ensure!(!succeeded(&w.once("client", VIP, VIP_PORT)?));
    ensure!(refused(&w, "node1", "outbound", "waypoint_unavailable")? == 2);
    for ip in [w.ip4("server"), w.ip6("server")] {
        let r = w.once("client", &ip, APP_PORT)?;
        ensure!(succeeded(&r), "pod-addressed traffic to {ip}: {r}");
    }

    // `none` on the Service opts it out of the namespace's waypoint.
    write_mesh(
        &w,
        Some(&wp),
        Labels {
            service: "istio.io/use-waypoint: none",
            ..ns
        },
    )?;
    wait_binding(&a1, "default/web", "Unbound")?;
    let r = w.once("client", VIP, VIP_PORT)?;
    ensure!(succeeded(&r), "opted out: direct to an endpoint: {r}");
    ensure!(refused(&w, "node1", "outbound", "waypoint_unavailable")? == 2);
    ensure!(fs::read_to_string(&w.config)?.contains("use-waypoint: none"));
    Ok(())
}

/// The authority of the stand-in's next new stream after `seen` streams.
fn next_authority(stand: &mut PeerServer, seen: usize) -> Result<String> {
    let lines = stand.wait_lines(|l| l.iter().filter(|l| l.get("authority").is_some()).count() > seen)?;
    let streams: Vec<&Value> = lines.iter().filter(|l| l.get("authority").is_some()).collect();
    ensure!(streams.len() == seen + 1, "one new stream: {streams:?}");
    Ok(streams[seen]["authority"].as_str().unwrap_or_default().to_string())
}

#[test]
fn service_pod_and_namespace_labels_steer_by_the_waypoints_for() -> Result<()> {
    let w = World::new("steer-kinds")?;
    let wp = |fields| Waypoint {
        name: "wp",
        fields,
        hosts: &["outsider"],
        ready: true,
    };
    let service = Labels {
        service: "istio.io/use-waypoint: wp",
        ..Default::default()
    };
    write_mesh(&w, Some(&wp("")), service)?;
    let ca = MeshCa::start(&w.cluster, "node1", &w.dir.join("ca"), &w.config)?;
    let (a1, _a2) = agents(&w, &ca)?;
    let _server = Server::start(w.cluster.pod("server"), &[APP_PORT])?;
    let root = ca.dir.join("root-cert.pem");
    let (chain, key) = ca.request(&w.cluster, "node1", WP_ID, &w.dir)?;
    let mut stand = PeerServer::start(&w, "outsider", &chain, &key, &root)?;
    let vip = format!("{VIP}:{VIP_PORT}");
    let pod = format!("{}:{APP_PORT}", w.ip4("server"));
    let through = |host: &str, port: u16| -> Result<()> {
        let r = plain_client_at(&w, "client", host, port, "steered", 1)?;
        ensure!(succeeded(&r), "{host}:{port} through the waypoint: {r}");
        Ok(())
    };
    let direct = |host: &str, port: u16| -> Result<()> {
        let r = w.once("client", host, port)?;
        ensure!(
            succeeded(&r) && r["server"]["server_local"] == pod,
            "{host}:{port} direct to the server: {r}"
        );
        Ok(())
    };

    // Service label, `for: service`: the VIP through the waypoint, the pod direct.
    wait_binding(&a1, "default/web", "Bound")?;
    through(VIP, VIP_PORT)?;
    ensure!(next_authority(&mut stand, 0)? == vip);
    direct(&w.ip4("server"), APP_PORT)?;

    // Pod label, `for: workload`: the pod through the waypoint; the VIP is
    // not bound, but its endpoint is, so it goes there too (with the
    // endpoint as :authority: the server's agent accepts nothing else).
    let pod_label = Labels {
        server: "istio.io/use-waypoint: wp",
        ..Default::default()
    };
    write_mesh(&w, Some(&wp("for: workload")), pod_label)?;
    wait_binding(&a1, "default/server", "Bound")?;
    wait_binding(&a1, "default/web", "Unbound")?;
    through(&w.ip4("server"), APP_PORT)?;
    ensure!(next_authority(&mut stand, 1)? == pod);
    through(VIP, VIP_PORT)?;
    ensure!(next_authority(&mut stand, 2)? == pod);

    // Namespace label, `for: all`: both, each with its own authority.
    let ns = Labels {
        namespace: "istio.io/use-waypoint: wp",
        ..Default::default()
    };
    write_mesh(&w, Some(&wp("for: all")), ns)?;
    for object in ["default/web", "default/server"] {
        mesh::poll(WAIT, || {
            Ok(a1
                .logs()
                .iter()
                .any(|l| l["message"] == "waypoint binding" && l["object"] == object && l["source"] == "NamespaceLabel")
                .then_some(()))
        })?;
    }
    through(VIP, VIP_PORT)?;
    ensure!(next_authority(&mut stand, 3)? == vip);
    through(&w.ip4("server"), APP_PORT)?;
    ensure!(next_authority(&mut stand, 4)? == pod);
    Ok(())
}
