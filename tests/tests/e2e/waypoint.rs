//! The real waypoint between real agents (issue #9): a client pod's
//! connections to Service `web` (and to a web pod) are steered by its agent
//! to the waypoint bound to web's service account, which routes every
//! HTTP/1.1, h2 and gRPC request on its own to one of web's two pods over
//! its own HBONE, and reports Istio's request metrics. Its two pods run in
//! the ambient namespace and are never captured; a rolling restart of them
//! fails no request.
//!
//!   node1: client (enrolled), wp1 (waypoint pod), web1 (enrolled, sa web)
//!   node2: web2 (enrolled, sa web), wp2 (waypoint pod)
use std::{fmt::Write as _, fs, path::Path, process::Stdio, time::Duration};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::{
    mesh::{self, Agent, MeshCa, Server},
    waypoint::WaypointPod,
    Cluster, ClusterSpec, NodeSpec,
};

use crate::{agent_with_ca, steering::wait_binding, World, APP_PORT, WAIT};

const VIP: &str = "10.96.0.10";
const WP_ID: &str = "spiffe://cluster.local/ns/default/sa/wp";
const WEB_PODS: [&str; 2] = ["web1", "web2"];

fn world(label: &str) -> Result<World> {
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["client", "wp1", "web1"]),
        NodeSpec::new("node2", &["web2", "wp2"]),
    ]);
    let cluster = Cluster::create(label, &spec)?;
    let dir = cluster.scratch_dir()?;
    let config = dir.join("mesh.yaml");
    let w = World {
        cluster,
        dir,
        config,
        extra: vec![],
    };
    write_mesh(&w, &["wp1", "wp2"])?;
    Ok(w)
}

/// The enrolment file: client; web1 and web2 (service account `web`)
/// behind Service `web` (VIP:80 declared `http` -> 8080); waypoint `wp`
/// for service account `web`, whose pods `ready` are healthy (all listed,
/// with their netns, as pods of the ambient namespace).
fn write_mesh(w: &World, ready: &[&str]) -> Result<()> {
    let mut y = String::new();
    for (name, sa, labels) in [
        ("web1", "web", "app: web".to_string()),
        ("web2", "web", "app: web".to_string()),
        ("wp1", "wp", "gateway.networking.k8s.io/gateway-name: wp".to_string()),
        ("wp2", "wp", "gateway.networking.k8s.io/gateway-name: wp".to_string()),
    ] {
        let p = w.cluster.pod(name);
        let healthy = !name.starts_with("wp") || ready.contains(&name);
        let _ = write!(
            y,
            "  - name: {name}\n    namespace: default\n    serviceAccount: {sa}\n    node: {}\n    netns: {}\n    cgroup: {}\n    ips: [\"{}\", \"{}\"]\n    labels: {{{labels}}}\n    healthy: {healthy}\n",
            p.node,
            p.netns_path.display(),
            p.cgroup.display(),
            p.ip4,
            p.ip6,
        );
    }
    let _ = write!(
        y,
        "services:\n  - {{name: web, namespace: default, vips: [\"{VIP}\"], ports: [{{port: 80, targetPort: {APP_PORT}, name: http}}], selector: {{app: web}}}}\nnamespaces:\n  - {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\nwaypoints:\n  - {{name: wp, namespace: default, forServiceAccount: web}}\n"
    );
    let settings = mesh::Settings {
        extra: y,
        ..Default::default()
    };
    mesh::write_config(&w.cluster, &w.config, &["client"], &settings)
}

/// CA, agents, echo backends and both waypoint pods, with every binding bound.
struct Mesh {
    agents: Vec<Agent>,
    waypoints: Vec<WaypointPod>,
    _echo: Vec<Server>,
    ca: MeshCa,
}

fn start(w: &World) -> Result<Mesh> {
    let ca = MeshCa::start(&w.cluster, "node1", &w.dir.join("ca"), &w.config)?;
    let agents = vec![
        agent_with_ca(w, "node1", "client", &ca.client_args("node1"), &[])?,
        agent_with_ca(w, "node2", "web", &ca.client_args("node2"), &[])?,
    ];
    let echo = WEB_PODS
        .iter()
        .map(|p| Server::echo(w.cluster.pod(p), APP_PORT))
        .collect::<Result<_>>()?;
    let waypoints = ["wp1", "wp2"]
        .iter()
        .map(|p| WaypointPod::start(&w.cluster, p, "wp", &w.config, &ca, &w.dir, 0))
        .collect::<Result<_>>()?;
    wait_binding(&agents[0], "default/web", "Bound")?;
    wait_binding(&agents[0], "default/web1", "Bound")?;
    Ok(Mesh {
        agents,
        waypoints,
        _echo: echo,
        ca,
    })
}

/// curl in the client pod (captured): one connection, the URLs one after
/// the other on it; each answer as the echo's JSON, and how many
/// connections curl opened.
pub(crate) fn curl(cluster: &Cluster, extra: &[&str], urls: &[String]) -> Result<(Vec<Value>, u64)> {
    let out = cluster
        .pod("client")
        .try_command("curl")?
        .args(["-s", "-m", "10", "-w", "\n%{num_connects} %{http_code}\n"])
        .args(extra)
        .args(urls)
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(out.status.success(), "curl {urls:?}: {}: {text}", out.status);
    let (mut answers, mut connects) = (Vec::new(), 0);
    let mut lines = text.lines();
    while let (Some(body), Some(tail)) = (lines.next(), lines.next()) {
        let (n, code) = tail.split_once(' ').context("curl's -w line")?;
        ensure!(code == "200", "{code}: {body}");
        connects += n.parse::<u64>()?;
        answers.push(serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?);
    }
    ensure!(
        answers.len() == urls.len(),
        "{} answers to {} URLs: {text}",
        answers.len(),
        urls.len()
    );
    Ok((answers, connects))
}

/// Whether `node`'s agent opened a connection from `principal` (as the
/// destination). Counted at open: the waypoint keeps its upstream
/// connections, so they may not have closed (and been logged) yet.
pub(crate) fn opened_from(cluster: &Cluster, node: &str, principal: &str) -> Result<bool> {
    let (text, _) = crate::node_get(cluster, node, "http://127.0.0.1:15020/metrics")?;
    Ok(text.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains(&format!("source_principal=\"{principal}\""))
    }))
}

fn pods_of(answers: &[Value]) -> Vec<String> {
    let mut pods: Vec<String> = answers
        .iter()
        .map(|a| a["pod"].as_str().unwrap_or("").to_string())
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

/// `istio_requests_total` of both waypoint pods, summed over the series
/// that carry every `name="value"` of `labels`.
pub(crate) fn requests(waypoints: &[WaypointPod], labels: &[&str]) -> Result<u64> {
    let mut n = 0;
    for wp in waypoints {
        n += wp
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && labels.iter().all(|kv| l.contains(kv)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(n)
}

#[test]
fn waypoint_routes_h1_h2_and_grpc_per_request_and_reports_istio_metrics() -> Result<()> {
    let w = world("wpl7")?;
    let m = start(&w)?;

    // The waypoint pods are in the ambient namespace, listed with their
    // netns, and neither agent captures them.
    for a in &m.agents {
        let ready = a
            .logs()
            .into_iter()
            .find(|l| l["message"] == "agent ready")
            .context("ready")?;
        ensure!(
            !ready.to_string().contains("wp1") && !ready.to_string().contains("wp2"),
            "{ready}"
        );
    }

    // HTTP/1.1 keep-alive: one connection, every request routed on its own
    // across both web pods; the waypoint adds x-forwarded-for and a trace.
    let urls: Vec<String> = (0..6).map(|i| format!("http://{VIP}/h1/{i}")).collect();
    let (answers, connects) = curl(&w.cluster, &[], &urls)?;
    ensure!(connects == 1, "keep-alive: {connects} connections");
    ensure!(
        pods_of(&answers) == WEB_PODS,
        "per-request routing over h1: {answers:?}"
    );
    for a in &answers {
        ensure!(a["version"] == "HTTP/1.1" && a["host"] == VIP, "{a}");
        ensure!(
            a["headers"]["x-forwarded-for"].to_string().contains(&w.ip4("client")),
            "{a}"
        );
        ensure!(a["headers"]["traceparent"].is_array(), "{a}");
    }

    // h2 (prior knowledge; hyper as the client, curl 7.88 cannot reuse a
    // prior-knowledge connection): one connection, streams routed on their own.
    let paths: Vec<String> = (0..6).map(|i| format!("/h2/{i}")).collect();
    let out = w
        .cluster
        .pod("client")
        .try_command(mesh::binary("mesh-echo")?)?
        .args(["h2-get", "--addr", &format!("{VIP}:80")])
        .args(&paths)
        .output()?;
    ensure!(out.status.success(), "h2: {}", String::from_utf8_lossy(&out.stderr));
    let answers = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            ensure!(v["status"] == 200, "{v}");
            Ok(serde_json::from_str(v["body"].as_str().unwrap_or(""))?)
        })
        .collect::<Result<Vec<Value>>>()?;
    ensure!(answers.len() == paths.len(), "{answers:?}");
    ensure!(
        pods_of(&answers) == WEB_PODS,
        "per-request routing over h2: {answers:?}"
    );
    ensure!(answers.iter().all(|a| a["version"] == "HTTP/2.0"), "{answers:?}");

    // gRPC with a real client (tonic) through the waypoint.
    let out = w
        .cluster
        .pod("client")
        .try_command(mesh::binary("mesh-echo")?)?
        .args(["grpc-client", "--addr", &format!("{VIP}:80"), "--message", "through"])
        .output()?;
    ensure!(out.status.success(), "grpc: {}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        reply["message"] == "through" && WEB_PODS.contains(&reply["pod"].as_str().unwrap_or("")),
        "{reply}"
    );

    // Pod-addressed traffic to a workload of the bound service account goes
    // through the waypoint too, to that pod.
    let (answers, _) = curl(&w.cluster, &[], &[format!("http://{}:{APP_PORT}/pod", w.ip4("web2"))])?;
    ensure!(answers[0]["pod"] == "web2", "{answers:?}");

    // Every request is in the waypoints' access logs, with the caller as
    // source principal and the VIP (or pod) as authority; both waypoint
    // pods took connections.
    let logs: Vec<Vec<Value>> = mesh::poll(WAIT, || {
        let logs: Vec<Vec<Value>> = m.waypoints.iter().map(WaypointPod::access_logs).collect();
        Ok((logs.iter().map(Vec::len).sum::<usize>() >= 14).then_some(logs))
    })?;
    let all: Vec<&Value> = logs.iter().flatten().collect();
    ensure!(
        all.iter()
            .all(|l| l["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"),
        "{all:?}"
    );
    ensure!(
        all.iter()
            .any(|l| l["connect_authority"] == format!("{}:{APP_PORT}", w.ip4("web2"))),
        "{all:?}"
    );
    ensure!(
        logs.iter().all(|l| !l.is_empty()),
        "connections spread over both waypoint pods: {logs:?}"
    );

    // Istio's request metrics, reported by the waypoint.
    let ok = requests(
        &m.waypoints,
        &[
            "reporter=\"waypoint\"",
            "source_workload=\"client\"",
            "destination_service_name=\"web\"",
            "response_code=\"200\"",
        ],
    )?;
    ensure!(ok >= 13, "istio_requests_total for web: {ok}");
    let grpc = requests(
        &m.waypoints,
        &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""],
    )?;
    ensure!(grpc == 1, "gRPC requests: {grpc}");
    // The source agent reports the waypoint as its mTLS peer, for Service web.
    let (text, _) = crate::node_get(&w.cluster, "node1", "http://127.0.0.1:15020/metrics")?;
    ensure!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("destination_principal=\"{WP_ID}\""))
                && l.contains("destination_service_name=\"web\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{text}"
    );
    // The destination agent saw the waypoint's identity, never the client's
    // (counted when opened: the waypoint keeps its upstream connections).
    ensure!(
        opened_from(&w.cluster, "node2", WP_ID)?,
        "the destination never saw the waypoint"
    );
    ensure!(
        !opened_from(&w.cluster, "node2", "spiffe://cluster.local/ns/default/sa/client")?,
        "the destination saw the client"
    );
    let _ = &m.ca;
    Ok(())
}

/// A bounded loop of requests (a new connection each) in the client pod,
/// until `stop` exists: prints `ok` or `fail <code>` per request.
fn request_loop(w: &World, stop: &Path) -> Result<std::process::Child> {
    let script = format!(
        "for i in $(seq 3000); do [ -e {stop} ] && break; c=$(curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{VIP}/roll); if [ \"$c\" = 200 ]; then echo ok; else echo \"fail $c\"; fi; done",
        stop = stop.display()
    );
    Ok(w.cluster
        .pod("client")
        .try_command("sh")?
        .args(["-c", &script])
        .stdout(fs::File::create(w.dir.join("roll.out"))?)
        .stderr(Stdio::null())
        .spawn()?)
}

fn roll_results(w: &World) -> (usize, Vec<String>) {
    let text = fs::read_to_string(w.dir.join("roll.out")).unwrap_or_default();
    let ok = text.lines().filter(|l| *l == "ok").count();
    let failed = text.lines().filter(|l| *l != "ok").map(str::to_string).collect();
    (ok, failed)
}

/// Waits until `n` more requests of the loop succeeded.
fn wait_progress(w: &World, n: usize) -> Result<()> {
    let start = roll_results(w).0;
    mesh::poll(WAIT, || Ok((roll_results(w).0 >= start + n).then_some(())))
        .with_context(|| format!("the request loop made no progress: {:?}", roll_results(w)))
}

#[test]
fn a_rolling_restart_of_the_waypoint_fails_no_request() -> Result<()> {
    let w = world("wproll")?;
    let mut m = start(&w)?;
    let stop = w.dir.join("stop");
    let mut client = request_loop(&w, &stop)?;
    let result = (|| -> Result<()> {
        wait_progress(&w, 5)?;
        // One pod after the other, as a Deployment with maxUnavailable 0
        // does: the old pod leaves the endpoints (not ready), then drains
        // on SIGTERM; its successor starts and becomes ready.
        for (i, name) in ["wp1", "wp2"].iter().enumerate() {
            let others: Vec<&str> = ["wp1", "wp2"].into_iter().filter(|p| p != name).collect();
            let before: Vec<usize> = m.agents.iter().map(reloads).collect();
            write_mesh(&w, &others)?;
            wait_reloaded(&m.agents, &before)?;
            let status = m.waypoints[i].terminate(Duration::from_secs(40))?;
            ensure!(status.success(), "{name} drained and exited: {status}");
            wait_progress(&w, 5)?;
            m.waypoints[i] = WaypointPod::start(&w.cluster, name, "wp", &w.config, &m.ca, &w.dir, 1)?;
            let before: Vec<usize> = m.agents.iter().map(reloads).collect();
            write_mesh(&w, &["wp1", "wp2"])?;
            wait_reloaded(&m.agents, &before)?;
            wait_progress(&w, 5)?;
        }
        Ok(())
    })();
    fs::write(&stop, "")?;
    let _ = mesh::wait_bounded(&mut client, WAIT);
    result?;
    let (ok, failed) = roll_results(&w);
    ensure!(
        failed.is_empty(),
        "{} requests failed during the roll ({ok} ok): {failed:?}",
        failed.len()
    );
    ensure!(ok >= 30, "only {ok} requests");
    // The new pods took requests.
    let served: usize = m.waypoints.iter().map(|wp| wp.access_logs().len()).sum();
    ensure!(served > 0, "the restarted waypoint pods served nothing");
    Ok(())
}

fn reloads(a: &Agent) -> usize {
    a.logs()
        .iter()
        .filter(|l| l["message"] == "configuration reloaded")
        .count()
}

fn wait_reloaded(agents: &[Agent], before: &[usize]) -> Result<()> {
    mesh::poll(WAIT, || {
        Ok(agents.iter().zip(before).all(|(a, n)| reloads(a) > *n).then_some(()))
    })
    .context("the agents did not reload the enrolment file")
}
