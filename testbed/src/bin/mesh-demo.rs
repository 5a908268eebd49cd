//! `cargo xtask demo`: a local mesh on this machine.
//!
//! Builds two "nodes" joined by a link and four "pods" (network namespaces
//! with their own cgroup v2 directories), starts the mesh CA and one real
//! agent per node, enrolls `client` and `web` but not `legacy` and `db`,
//! sends real traffic between them with ordinary tools (curl, Python
//! sockets), prints how each agent carried each flow (HBONE mTLS with the
//! identities both sides saw, or plain TCP), then binds a waypoint to web's
//! service account and shows client's HTTP requests to web going through
//! it with Istio's request metrics, and tears everything down (also on
//! Ctrl-C or failure).
use std::{process::Stdio, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testbed::{
    mesh::{self, Agent, MeshCa, Server, Settings},
    waypoint::WaypointPod,
    Cluster, ClusterSpec, NodeSpec,
};

// The shipped binaries' allocator (see agent/src/main.rs), here too, so that
// the benchmark's own load and echo processes are not slowed by musl's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    testbed::signals::teardown_on_signal("the local mesh");
    let code = match demo() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            1
        }
    };
    // Everything the demo made is gone by now (Drop); make sure of it.
    if let Err(e) = testbed::teardown_all() {
        eprintln!("teardown: {e:#}");
    }
    std::process::exit(code);
}

struct Flow {
    what: &'static str,
    from: &'static str,
    to: &'static str,
    ipv6: bool,
    tool: Tool,
}

#[derive(Clone, Copy)]
enum Tool {
    /// curl to the `web` service's VIP (10.96.0.10:80), not to the pod.
    CurlService,
    Curl,
    Python,
}

/// The `web` service: a VIP in front of the web pod's port 8080.
const SERVICE_VIP: &str = "10.96.0.10";
const SERVICE: &str = "services:
  - name: web
    namespace: default
    vips: [\"10.96.0.10\"]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
";

const FLOWS: &[Flow] = &[
    Flow {
        what: "enrolled -> service VIP -> enrolled pod (cross-node)",
        from: "client",
        to: "web",
        ipv6: false,
        tool: Tool::CurlService,
    },
    Flow {
        what: "enrolled -> enrolled (cross-node)",
        from: "client",
        to: "web",
        ipv6: false,
        tool: Tool::Curl,
    },
    Flow {
        what: "enrolled -> enrolled over IPv6",
        from: "client",
        to: "web",
        ipv6: true,
        tool: Tool::Curl,
    },
    Flow {
        what: "enrolled -> not enrolled",
        from: "client",
        to: "db",
        ipv6: false,
        tool: Tool::Python,
    },
    Flow {
        what: "not enrolled -> enrolled",
        from: "legacy",
        to: "web",
        ipv6: false,
        tool: Tool::Curl,
    },
    Flow {
        what: "not enrolled -> not enrolled",
        from: "legacy",
        to: "db",
        ipv6: false,
        tool: Tool::Python,
    },
];

fn demo() -> Result<()> {
    testbed::sweep_stale()?;
    println!("== building a local cluster: node1 {{client, legacy, wp}}, node2 {{web, web2, db}}");
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["client", "legacy", "wp"]),
        NodeSpec::new("node2", &["web", "web2", "db"]),
    ]);
    let cluster = Cluster::create("demo", &spec)?;
    run(&cluster, &cluster.scratch_dir()?)
}

fn run(cluster: &Cluster, dir: &std::path::Path) -> Result<()> {
    for p in cluster.pods() {
        println!("   pod {:<7} on {}  {} / {}", p.name, p.node, p.ip4, p.ip6);
    }
    let config = dir.join("mesh.yaml");
    let settings = Settings {
        extra: SERVICE.into(),
        ..Settings::default()
    };
    mesh::write_config(cluster, &config, &["client", "web"], &settings)?;
    println!("   service web: VIP {SERVICE_VIP}:80 -> pods with app=web, port 8080");
    println!("== starting the mesh CA on node1 (agent ca init + agent ca serve)");
    let ca = MeshCa::start(cluster, "node1", &dir.join("ca"), &config)?;
    println!(
        "   root, CA serving certificate and one credential per node in {}",
        ca.dir.display()
    );
    println!(
        "== enrolling client and web (config {}), starting one agent per node",
        config.display()
    );
    let agents = [
        start_agent(cluster, &ca, "node1", "client", &config, dir)?,
        start_agent(cluster, &ca, "node2", "web", &config, dir)?,
    ];

    // An HTTP server (python's http.server) in web, an echo server in db.
    let web = cluster.pod("web");
    let mut http = web
        .try_command("python3")?
        .args(["-m", "http.server", "8080", "--bind", "::", "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _db = Server::start(cluster.pod("db"), &[5432])?;
    wait_http(cluster, web.ip4.to_string())?;

    println!("== sending traffic");
    let mut failures = 0;
    for f in FLOWS {
        let before: Vec<usize> = agents.iter().map(|a| a.access_logs().len()).collect();
        let (ok, detail, dst) = send(cluster, f)?;
        let captured = wait_captured(&agents, &before, &dst);
        println!("\n-- {} : {} -> {} ({})", f.what, f.from, f.to, dst);
        println!("   result: {} {}", if ok { "OK" } else { "FAILED" }, detail);
        if captured.is_empty() {
            println!("   captured by: nobody (direct)");
        }
        for (node, l) in &captured {
            let how = if l["protocol"] == "hbone" {
                "HBONE, mutual TLS"
            } else {
                "plain TCP"
            };
            if let Some(svc) = l["service"].as_str().filter(|s| !s.is_empty()) {
                println!(
                    "   {node} agent: service {svc} -> endpoint {}",
                    l["endpoint"].as_str().unwrap_or("?")
                );
            }
            println!(
                "   captured by {node} agent: {} {} -> {}  via {how}; sent {} B, received {} B, {}",
                l["direction"].as_str().unwrap_or("?"),
                l["src"].as_str().unwrap_or("?"),
                l["dst"].as_str().unwrap_or("?"),
                l["bytes_sent"],
                l["bytes_received"],
                l["result"].as_str().unwrap_or("?"),
            );
            for (side, key) in [("source", "src_identity"), ("destination", "dst_identity")] {
                if let Some(id) = l[key].as_str().filter(|s| !s.is_empty()) {
                    println!("      {side} identity: {id}");
                }
            }
        }
        failures += usize::from(!ok);
    }
    let scene = waypoint_scene(cluster, &ca, &agents, &config, dir);
    let _ = http.kill();
    let _ = http.wait();
    scene?;

    println!("\n== Istio metrics each agent exports (curl http://127.0.0.1:15020/metrics in the node)");
    for a in &agents {
        print_metrics(cluster, &a.node)?;
    }

    println!("\n== what the kernel programs counted (agent status, from the pinned maps)");
    for a in &agents {
        let s = a.status()?;
        println!("   {}: {}", a.node, s["stats"]);
    }
    println!("\n== tearing down (namespaces, cgroups, pins, processes)");
    if failures > 0 {
        bail!("{failures} flow(s) failed");
    }
    Ok(())
}

/// The waypoint scene: waypoint `web-waypoint` (Gateway annotation
/// `istio.io/for-service-account: web` in Kubernetes terms) in pod `wp`;
/// the agents steer client's connections to web through it, and it routes
/// each HTTP request and reports Istio's request metrics.
fn waypoint_scene(
    cluster: &Cluster,
    ca: &MeshCa,
    agents: &[Agent],
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Result<()> {
    println!("\n== L7: a waypoint for service account web (pod wp on node1, never captured)");
    let wp = cluster.pod("wp");
    let extra = format!(
        "  - {{name: wp, namespace: default, serviceAccount: web-waypoint, node: node1, ips: [\"{}\"], labels: {{gateway.networking.k8s.io/gateway-name: web-waypoint}}}}\nwaypoints:\n  - {{name: web-waypoint, namespace: default, forServiceAccount: web}}\n",
        wp.ip4
    );
    // The waypoint pod is listed among the pods; the service's port now
    // declares HTTP.
    let settings = Settings {
        extra: format!(
            "{extra}{}",
            SERVICE.replace("targetPort: 8080}", "targetPort: 8080, name: http}")
        ),
        ..Settings::default()
    };
    mesh::write_config(cluster, config, &["client", "web"], &settings)?;
    let mut waypoint = WaypointPod::start(cluster, "wp", "web-waypoint", config, ca, dir, 0)?;
    let routes = WaypointPod::routes_file(dir, "wp");
    println!("   waypoint ready with identity spiffe://cluster.local/ns/default/sa/web-waypoint");
    mesh::poll(Duration::from_secs(20), || {
        Ok(agents[0]
            .logs()
            .iter()
            .any(|l| l["message"] == "waypoint binding" && l["object"] == "default/web" && l["status"] == "Bound")
            .then_some(()))
    })
    .context("the agent did not bind service web to the waypoint")?;
    println!("   node1 agent: service default/web and its pods are bound to waypoint default/web-waypoint");
    for path in ["/", "/mesh.yaml", "/missing"] {
        let out = cluster
            .pod("client")
            .try_command("curl")?
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{SERVICE_VIP}{path}"))
            .output()?;
        println!(
            "   client: GET http://{SERVICE_VIP}{path} -> {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let lines = mesh::poll(Duration::from_secs(10), || {
        let l = waypoint.access_logs();
        Ok((l.len() >= 3).then_some(l))
    })
    .context("the waypoint logged no requests")?;
    for l in &lines {
        println!(
            "   waypoint: {} {} {} -> {} ({}) from {} in {} ms",
            l["method"].as_str().unwrap_or("?"),
            l["path"].as_str().unwrap_or("?"),
            l["response_code"],
            l["upstream_host"].as_str().unwrap_or("?"),
            l["destination_service"].as_str().unwrap_or("?"),
            l["source_principal"].as_str().unwrap_or("?"),
            l["duration_ms"],
        );
    }
    println!("   waypoint metrics (istio_requests_total, reporter=waypoint):");
    for line in waypoint
        .metrics()?
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let label = |k: &str| label_of(line, k);
        println!(
            "     {} -> {} code {}: {}",
            label("source_workload"),
            label("destination_service"),
            label("response_code"),
            line.rsplit(' ').next().unwrap_or("?"),
        );
    }
    routing_scene(cluster, config, &settings, &waypoint, &routes)?;
    let status = waypoint.terminate(Duration::from_secs(20))?;
    println!("   waypoint drained and exited ({status})");
    Ok(())
}

/// The value of label `k` in a Prometheus text line.
fn label_of(line: &str, k: &str) -> String {
    line.split(&format!("{k}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_string()
}

/// The routes of the L7 scene: a VirtualService on web as a platform team
/// writes it (the same YAML works on a cluster).
const DEMO_ROUTES: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /flaky}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: web-v2}}]
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: web-v2}}]
  - route:
    - {destination: {host: web-v1}, weight: 90}
    - {destination: {host: web-v2}, weight: 10}
";

/// web v1 (pod web, python's http.server) and v2 (pod web2, the echo
/// backend) behind Services web-v1 and web-v2; the waypoint splits web's
/// traffic 90/10, retries a flaky v2, injects a fault.
fn routing_scene(
    cluster: &Cluster,
    config: &std::path::Path,
    settings: &Settings,
    waypoint: &WaypointPod,
    routes: &std::path::Path,
) -> Result<()> {
    println!("\n== L7 routing: a VirtualService splits web 90/10 between v1 (pod web) and v2 (pod web2), retries a flaky v2, injects a fault");
    let _v2 = Server::echo(cluster.pod("web2"), 8080)?;
    let versions = "  - {name: web-v1, namespace: default, vips: [\"10.96.0.11\"], ports: [{port: 80, targetPort: 8080, name: http}], selector: {app: web}}\n  - {name: web-v2, namespace: default, vips: [\"10.96.0.12\"], ports: [{port: 80, targetPort: 8080, name: http}], selector: {app: web2}}\n";
    let more = Settings {
        extra: format!("{}{versions}", settings.extra),
        ..Settings::default()
    };
    mesh::write_config(cluster, config, &["client", "web", "web2"], &more)?;
    // Services first, then the routes that name them (else their share
    // would be 503 NC, no such backend, until the services arrive).
    mesh::poll(Duration::from_secs(20), || {
        Ok(waypoint
            .logs()
            .iter()
            .any(|l| l["message"] == "enrolment file reloaded" && l["services"] == 3)
            .then_some(()))
    })
    .context("the waypoint did not reload the enrolment file")?;
    std::fs::write(routes, DEMO_ROUTES)?;
    mesh::poll(Duration::from_secs(20), || {
        Ok(waypoint
            .logs()
            .iter()
            .any(|l| l["message"] == "route accepted" && l["object"] == "VirtualService default/web")
            .then_some(()))
    })
    .context("the waypoint did not accept the VirtualService")?;
    println!(
        "   waypoint: route accepted: VirtualService default/web ({})",
        routes.display()
    );
    let curl = |path: &str| -> Result<String> {
        let out = cluster
            .pod("client")
            .try_command("curl")?
            .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://{SERVICE_VIP}{path}"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Until the agent on node2 has enrolled web2, v2 cannot answer.
    mesh::poll(Duration::from_secs(20), || {
        Ok(curl("/flaky")?.ends_with("200").then_some(()))
    })
    .context("web2 never answered through the waypoint")?;
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..100 {
        let out = curl("/")?;
        if out.contains("\"pod\":\"web2\"") {
            v2 += 1;
        } else if out.ends_with("200") {
            v1 += 1;
        }
    }
    println!("   client: 100 x GET http://{SERVICE_VIP}/ -> v1 {v1}, v2 {v2} (weights 90/10)");
    let out = curl("/flaky?fail=2&key=demo")?;
    println!(
        "   client: GET /flaky (v2 fails twice first) -> {} (the waypoint retried: waypoint_retries_total {})",
        out.rsplit('\n').next().unwrap_or("?"),
        waypoint
            .metrics()?
            .lines()
            .find(|l| l.starts_with("waypoint_retries_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("0")
    );
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        *codes
            .entry(curl("/fault")?.rsplit('\n').next().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    println!("   client: 20 x GET /fault (abort 503 at 50 %) -> {codes:?}");
    println!("   waypoint metrics (istio_requests_total by destination, code, response flags):");
    for line in waypoint
        .metrics()?
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("destination_service_name=\"web"))
    {
        let label = |k: &str| label_of(line, k);
        println!(
            "     -> {} code {} flags {}: {}",
            label("destination_service_name"),
            label("response_code"),
            label("response_flags"),
            line.rsplit(' ').next().unwrap_or("?"),
        );
    }
    Ok(())
}

/// The `istio_tcp_connections_opened_total` series of a node's agent, short.
fn print_metrics(cluster: &Cluster, node: &str) -> Result<()> {
    let out = cluster
        .node(node)
        .try_command("curl")?
        .args(["-s", "http://127.0.0.1:15020/metrics"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
    {
        let label = |k: &str| label_of(line, k);
        let count = line.rsplit(' ').next().unwrap_or("?");
        println!(
            "   {node}: {} connections opened, reporter={}, {} -> {}, security={}",
            count,
            label("reporter"),
            label("source_workload"),
            label("destination_workload"),
            label("connection_security_policy"),
        );
    }
    Ok(())
}

/// An agent with the CA, waiting until its pod's certificate is issued.
fn start_agent(
    cluster: &Cluster,
    ca: &MeshCa,
    node: &str,
    pod: &str,
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Agent> {
    let args = ca.client_args(node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Agent::start(cluster, node, config, dir, &args)?;
    a.wait_for("agent ready", Duration::from_secs(20))?;
    let id = format!("spiffe://cluster.local/ns/default/sa/{pod}");
    let ready = a.wait_access(Duration::from_secs(20), |_| {
        a.logs()
            .iter()
            .any(|l| l["message"] == "workload certificate ready" && l["identity"] == id.as_str())
    });
    ready.with_context(|| format!("no certificate for {id}; CA log:\n{}", ca.log()))?;
    println!("   {node}: agent ready, certificate issued for {id}");
    Ok(a)
}

/// Sends one flow with an ordinary tool; returns (ok, detail, destination).
fn send(cluster: &Cluster, f: &Flow) -> Result<(bool, String, String)> {
    let (from, to) = (cluster.pod(f.from), cluster.pod(f.to));
    let host = if f.ipv6 { to.ip6.to_string() } else { to.ip4.to_string() };
    match f.tool {
        Tool::Curl | Tool::CurlService => {
            let service = matches!(f.tool, Tool::CurlService);
            let url = if service {
                format!("http://{SERVICE_VIP}/")
            } else if f.ipv6 {
                format!("http://[{host}]:8080/")
            } else {
                format!("http://{host}:8080/")
            };
            let out = from
                .try_command("curl")?
                .args([
                    "-sS",
                    "-g",
                    "-o",
                    "/dev/null",
                    "-w",
                    "HTTP %{http_code} in %{time_total}s",
                    "--max-time",
                    "5",
                ])
                .arg(&url)
                .output()?;
            let detail = format!(
                "curl {url}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let dst = if service {
                format!("{SERVICE_VIP}:80")
            } else if f.ipv6 {
                format!("[{host}]:8080")
            } else {
                format!("{host}:8080")
            };
            Ok((out.status.success(), detail, dst))
        }
        Tool::Python => {
            let r: Value = mesh::client(from, "once", &host, 5432, &[])?;
            let detail = format!(
                "python socket: getpeername()={} ; the server saw the client as {}",
                r["peername"].as_str().unwrap_or("?"),
                r["server"]["server_peer"].as_str().unwrap_or("?")
            );
            Ok((r["echo_ok"] == true, detail, format!("{host}:5432")))
        }
    }
}

/// Access-log lines for `dst` that appeared after `before` (bounded wait).
fn wait_captured(agents: &[Agent], before: &[usize], dst: &str) -> Vec<(String, Value)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let all: Vec<(String, Value)> = agents
            .iter()
            .zip(before)
            .flat_map(|(a, n)| a.access_logs().into_iter().skip(*n).map(|l| (a.node.clone(), l)))
            .collect();
        // A service VIP reaches the destination agent as its endpoint.
        let endpoints: Vec<Value> = all
            .iter()
            .filter(|(_, l)| l["dst"] == dst)
            .map(|(_, l)| l["endpoint"].clone())
            .collect();
        let new: Vec<(String, Value)> = all
            .into_iter()
            .filter(|(_, l)| l["dst"] == dst || endpoints.contains(&l["dst"]))
            .collect();
        let both_sides = new.len() >= 2 || std::time::Instant::now() > deadline;
        if both_sides || (!new.is_empty() && std::time::Instant::now() + Duration::from_millis(1500) > deadline) {
            return new;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until web answers HTTP, from the node itself.
fn wait_http(cluster: &Cluster, ip: String) -> Result<()> {
    for _ in 0..100 {
        let ok = cluster
            .node("node2")
            .try_command("curl")?
            .args(["-s", "-o", "/dev/null", "--max-time", "1"])
            .arg(format!("http://{ip}:8080/"))
            .status()
            .context("curl")?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the web pod's HTTP server did not start")
}
