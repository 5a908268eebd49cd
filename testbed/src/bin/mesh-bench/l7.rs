//! The L7 half of `cargo xtask bench` (issue #10): HTTP/1.1 keep-alive GETs
//! answered with 1 KB, over four paths, at a fixed rate and at saturation,
//! driven by a real load generator (oha), all in one run.
//!
//! Layout: one cluster ("l7"), agents with the CA (served on node1); the
//! identity of pod P is spiffe://cluster.local/ns/default/sa/P, the
//! waypoint's is sa/wp.
//!   node1: cdirect (not in the mesh), cmesh (enrolled)
//!   node2: sdirect (not in the mesh), smesh (enrolled), wp (the waypoint's
//!          pod, never captured), proxy (nginx, not in the mesh)
//!
//! Paths. Every one ends in `mesh-echo serve` on :8080 answering
//! `GET /bytes/1024`, so they differ only in what lies between:
//! * direct:   cdirect -> sdirect:8080, no mesh;
//! * mesh:     cmesh -> smesh:8080 (pod IP): captured by node1's agent,
//!   pooled HBONE to node2's agent, which connects to the app;
//! * waypoint: cmesh -> Service `web` (VIP:80, port named `http`, -> smesh:8080),
//!   bound to waypoint `wp` by its `istio.io/use-waypoint` label (the
//!   Service only: `forServiceAccount` would bind smesh as a workload too,
//!   and take the mesh path through the waypoint): node1's agent tunnels
//!   to `waypoint run` in pod wp, which routes each request over its own
//!   HBONE to node2's agent;
//! * nginx:    cdirect -> proxy:8080 (nginx, upstream keep-alive pool) ->
//!   sdirect:8080, no mesh: the yardstick for "one L7 proxy hop".
//!
//! The backend is the project's echo rather than nginx serving a file, so
//! nginx is only ever the proxy under test, never also the backend, and all
//! four paths share one backend program. Waypoint and nginx both sit on
//! the server's node, both with their defaults (the waypoint's one
//! data-plane thread, `--worker-threads 0`; nginx `worker_processes auto`,
//! one worker per core) and an access-log line per request to a file.
//!
//! Load: oha (pinned by `cargo xtask bench`, which installs it into
//! target/tools) in the client pod, one worker thread, `--connections`
//! keep-alive connections, `--l7-seconds` per run. The fixed rate uses
//! `-q` with `--latency-correction` (latency counted from when a request was
//! due, so a stall is not hidden by the requests it delayed); saturation
//! has no limit. A round measures the four paths back to back at the fixed
//! rate, then at saturation; the table shows medians over rounds, the
//! "added" rows medians of per-round differences.
//!
//! Per run: the waypoint's utime+stime from /proc/<pid>/stat, the agents'
//! likewise, nginx's from its pod's cgroup (master and workers); VmRSS of
//! the waypoint and of all nginx processes sampled every 100 ms. Idle RSS
//! is read once the waypoint is ready, before any request.
//!
//! Afterwards the logs must show that each path was the one named: every
//! waypoint request in its access log, the mesh path's connections as HBONE
//! in both agents' logs, and no direct or nginx connection in any agent's.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    idle::Idle,
    mesh::{self, Agent, MeshCa, Server, Settings},
    waypoint::WaypointPod,
    Cluster, ClusterSpec, NodeSpec, Pod,
};

use super::{
    cgroup_usec, clock_ticks, cpu_ticks, host_jiffies, json_stdout, median, run_bounded, start_agent, status_kb,
    write_json, Background, Machine, ACCESS_TIMEOUT, CLIENT_SLACK, READY_TIMEOUT, TRUST_DOMAIN_NS,
};

/// Where the echo backends and nginx listen.
const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";
const VIP_PORT: u16 = 80;
/// Response body size.
const BODY_BYTES: u64 = 1024;
/// Each path's check before the rounds (also fills pools and caches).
const WARMUP_SECONDS: u32 = 2;
const RSS_SAMPLE: Duration = Duration::from_millis(100);
/// A run with more failed requests than this measures a broken path.
const MAX_ERROR_RATE: f64 = 0.001;
/// Issue #10's targets.
const TARGET_ADDED_P99_MS: f64 = 0.3;
const TARGET_CPU_PER_1000: f64 = 0.10;
const TARGET_IDLE_RSS_MB: f64 = 20.0;

#[derive(Debug)]
pub struct Opts {
    pub rounds: usize,
    pub seconds: u32,
    pub rate: u32,
    pub connections: u32,
    pub json: PathBuf,
}

const PATHS: [&str; 4] = ["direct", "mesh", "waypoint", "nginx"];
/// Fixed rate, then saturation.
const MODES: [&str; 2] = ["fixed", "saturation"];

/// Cluster, CA, agents, backends, the waypoint and nginx. Fields drop in
/// order: nginx and the waypoint, backends, agents, CA, the cluster.
struct World {
    nginx: Background,
    waypoint: WaypointPod,
    _echo: Vec<Server>,
    agents: Vec<Agent>,
    _ca: MeshCa,
    cluster: Cluster,
}

pub fn bench(opts: &Opts, idle: &Idle) -> Result<()> {
    let oha = oha_binary()?;
    let nginx_version = tool_version(Command::new("nginx").arg("-v"))
        .context("`nginx` is not installed: `cargo xtask bench` installs nginx-light")?;
    mesh::binary("waypoint")?;
    mesh::binary("mesh-echo")?;
    testbed::sweep_stale()?;
    let started = Instant::now();
    let load_before = machine_load();
    let mut w = World::start()?;
    let result = measure(&w, &oha, opts);
    // Stopped in any case, so they drain and unpin before the cluster goes.
    if let Err(e) = w.nginx.terminate(Duration::from_secs(5)) {
        eprintln!("warning: {e:#}");
    }
    for a in &mut w.agents {
        if let Err(e) = a.terminate() {
            eprintln!("warning: stopping the agent on {}: {e:#}", a.node);
        }
    }
    let measured = result?;
    drop(w);
    report(opts, idle, measured, &nginx_version, load_before, started)
}

impl World {
    fn start() -> Result<World> {
        let spec = ClusterSpec::new(vec![
            NodeSpec::new("node1", &["cdirect", "cmesh"]),
            NodeSpec::new("node2", &["sdirect", "smesh", "wp", "proxy"]),
        ]);
        let cluster = Cluster::create("l7", &spec)?;
        let dir = cluster.scratch_dir()?;
        let config = dir.join("mesh.yaml");
        write_mesh(&cluster, &config)?;
        let ca = MeshCa::start(&cluster, "node1", &dir.join("ca"), &config)?;
        let agents = vec![
            start_agent(&cluster, "node1", &config, &dir, Some(&ca), "cmesh", super::NO_SOCKMAP)?,
            start_agent(&cluster, "node2", &config, &dir, Some(&ca), "smesh", super::NO_SOCKMAP)?,
        ];
        let echo = ["sdirect", "smesh"]
            .iter()
            .map(|p| Server::echo(cluster.pod(p), PORT))
            .collect::<Result<Vec<_>>>()?;
        let waypoint = WaypointPod::start(&cluster, "wp", "wp", &config, &ca, &dir, 0)?;
        wait_bound(&agents[0])?;
        let nginx = start_nginx(cluster.pod("proxy"), cluster.pod("sdirect"), &dir)?;
        Ok(World {
            nginx,
            waypoint,
            _echo: echo,
            agents,
            _ca: ca,
            cluster,
        })
    }

    /// (client pod, server pod, URL) of a path.
    fn path(&self, name: &str) -> (&Pod, &Pod, String) {
        let c = &self.cluster;
        let url = |ip: String, port: u16| format!("http://{ip}:{port}/bytes/{BODY_BYTES}");
        let (client, server) = match name {
            "direct" | "nginx" => (c.pod("cdirect"), c.pod("sdirect")),
            _ => (c.pod("cmesh"), c.pod("smesh")),
        };
        let url = match name {
            "direct" | "mesh" => url(server.ip4.to_string(), PORT),
            "waypoint" => url(VIP.to_string(), VIP_PORT),
            "nginx" => url(c.pod("proxy").ip4.to_string(), PORT),
            other => unreachable!("no path {other}"),
        };
        (client, server, url)
    }

    fn waypoint_pid(&self) -> Result<u32> {
        self.waypoint.pid().context("the waypoint is not running")
    }

    fn agent_pids(&self) -> Result<Vec<u32>> {
        self.agents
            .iter()
            .map(|a| a.pid().context("an agent is not running"))
            .collect()
    }

    /// VmRSS of every nginx process (master and workers), in kB.
    fn nginx_rss_kb(&self) -> u64 {
        fs::read_to_string(self.cluster.pod("proxy").cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|p| status_kb(p.parse().ok()?, "VmRSS").ok())
            .sum()
    }
}

/// The enrolment file: cmesh and smesh in the mesh; the waypoint's pod wp;
/// Service `web` in front of smesh, its port named `http` (so the waypoint
/// parses HTTP without sniffing, as for a declared port under Istio),
/// bound to waypoint `wp` by its label, which binds its VIP traffic only.
fn write_mesh(cluster: &Cluster, path: &Path) -> Result<()> {
    // Appended to `pods:`; healthy (the default), so ready for the agents.
    let mut y = mesh::pod_entry(cluster.pod("wp"), "wp", "gateway.networking.k8s.io/gateway-name: wp");
    let _ = write!(
        y,
        "services:\n  - {{name: web, namespace: default, vips: [\"{VIP}\"], ports: [{{port: {VIP_PORT}, targetPort: {PORT}, name: http}}], selector: {{app: smesh}}, labels: {{istio.io/use-waypoint: wp}}}}\nnamespaces:\n  - {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\nwaypoints:\n  - {{name: wp, namespace: default}}\n"
    );
    let settings = Settings {
        extra: y,
        ..Default::default()
    };
    mesh::write_config(cluster, path, &["cmesh", "smesh"], &settings)
}

/// Waits until the client's agent has bound Service `web` to the waypoint.
fn wait_bound(a: &Agent) -> Result<()> {
    mesh::poll(READY_TIMEOUT, || {
        Ok(a.logs()
            .iter()
            .any(|l| l["message"] == "waypoint binding" && l["object"] == "default/web" && l["status"] == "Bound")
            .then_some(()))
    })
    .with_context(|| format!("Service web was not bound to the waypoint:\n{}", a.raw_log()))
}

/// nginx in `pod` as a keep-alive reverse proxy to `backend`:8080, with
/// its configuration, logs and temp files in `dir`. The master runs as
/// root (it must enter the netns and bind); the workers that carry the
/// traffic run as nobody.
fn start_nginx(pod: &Pod, backend: &Pod, dir: &Path) -> Result<Background> {
    let d = dir.join("nginx");
    fs::create_dir_all(&d)?;
    let d = d.display().to_string();
    let conf = format!(
        "daemon off;
master_process on;
worker_processes auto;
user nobody nogroup;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream echo {{
        server {}:{PORT};
        keepalive 32;
    }}
    server {{
        listen {PORT};
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        backend.ip4
    );
    let path = format!("{d}/nginx.conf");
    fs::write(&path, conf)?;
    // -e: the error log before the configuration is read (else /var/log/nginx).
    Background::start(
        pod,
        "nginx",
        &["-p", &d, "-c", &path, "-e", &format!("{d}/error.log")],
        PORT,
        dir,
    )
}

/// oha as `cargo xtask bench` installs it (the version is pinned there),
/// else the one on PATH; the report records which version ran.
fn oha_binary() -> Result<PathBuf> {
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/oha");
    [installed, PathBuf::from("oha")]
        .into_iter()
        .find(|oha| tool_version(Command::new(oha).arg("--version")).is_some())
        .context("oha is not installed: `cargo xtask bench` installs it into target/tools")
}

/// The first line a `--version`-like command prints (nginx prints to stderr).
fn tool_version(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// What one oha run reported.
struct Load {
    ok: u64,
    failed: u64,
    /// Requests cut off by the end of the run (not failures).
    aborted: u64,
    first_error: Option<String>,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    max_ms: f64,
}

impl Load {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// oha in `client` against `url` for `seconds`, at `rate` requests/s or
/// else as fast as `conns` connections go; JSON on stdout.
fn oha_command(oha: &Path, client: &Pod, url: &str, seconds: u32, rate: Option<u32>, conns: u32) -> Result<Command> {
    let mut cmd = client.try_command(oha)?;
    cmd.args(["--no-tui", "--output-format", "json", "--worker-threads", "1"])
        .args(["-z", &format!("{seconds}s"), "-c", &conns.to_string()]);
    if let Some(q) = rate {
        cmd.args(["-q", &q.to_string(), "--latency-correction"]);
    }
    cmd.arg(url);
    Ok(cmd)
}

/// oha's JSON report; every answer must have been 1 KB, and failures
/// (statuses other than 200, connection errors) are counted apart from
/// the requests the end of the run cut off.
fn parse_oha(out: &Output) -> Result<Load> {
    let doc = json_stdout("oha", out)?;
    ensure!(out.status.success(), "oha failed ({}): {doc}", out.status);
    let mut ok = 0;
    let mut failed = 0;
    let mut first_error = None;
    for (code, n) in doc["statusCodeDistribution"].as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if code == "200" {
            ok += n;
        } else {
            failed += n;
            first_error.get_or_insert_with(|| format!("status {code}"));
        }
    }
    let mut aborted = 0;
    for (what, n) in doc["errorDistribution"].as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if what.contains("deadline") {
            aborted += n;
        } else {
            failed += n;
            first_error.get_or_insert_with(|| what.clone());
        }
    }
    ensure!(ok > 0, "no request succeeded: {doc}");
    let size = doc["summary"]["sizePerRequest"].as_u64().unwrap_or(0);
    ensure!(size == BODY_BYTES, "answers of {size} bytes, expected {BODY_BYTES}");
    let secs = |v: &Value| v.as_f64().map(|s| s * 1e3).context("missing latency");
    Ok(Load {
        ok,
        failed,
        aborted,
        first_error,
        seconds: doc["summary"]["total"].as_f64().context("no summary.total")?,
        p50_ms: secs(&doc["latencyPercentiles"]["p50"])?,
        p99_ms: secs(&doc["latencyPercentiles"]["p99"])?,
        mean_ms: secs(&doc["summary"]["average"])?,
        max_ms: secs(&doc["summary"]["slowest"])?,
    })
}

/// CPU counters around one run.
struct Snapshot {
    waypoint: u64,
    agents: u64,
    nginx_usec: u64,
    host: (u64, u64),
}

impl Snapshot {
    fn take(w: &World) -> Result<Snapshot> {
        Ok(Snapshot {
            waypoint: cpu_ticks(w.waypoint_pid()?)?,
            agents: w.agent_pids()?.into_iter().map(cpu_ticks).sum::<Result<u64>>()?,
            nginx_usec: cgroup_usec(&w.cluster.pod("proxy").cgroup),
            host: host_jiffies(),
        })
    }
}

/// One load run on one path with its CPU and memory figures.
fn point(w: &World, oha: &Path, path: &str, opts: &Opts, rate: Option<u32>, seconds: u32) -> Result<Value> {
    let (client, server, url) = w.path(path);
    let cmd = oha_command(oha, client, &url, seconds, rate, opts.connections)?;
    let ticks = clock_ticks()?;
    let wp_pid = w.waypoint_pid()?;
    let before = Snapshot::take(w)?;
    let limit = Duration::from_secs(seconds.into()) + CLIENT_SLACK;
    let run = std::thread::spawn(move || run_bounded(cmd, limit));
    let (mut wp_rss, mut nginx_rss) = (0, 0);
    while !run.is_finished() {
        // A waypoint gone meanwhile fails the run at the snapshot below.
        wp_rss = wp_rss.max(status_kb(wp_pid, "VmRSS").unwrap_or(0));
        nginx_rss = nginx_rss.max(w.nginx_rss_kb());
        std::thread::sleep(RSS_SAMPLE);
    }
    let out = run.join().map_err(|_| anyhow::anyhow!("the oha thread panicked"))??;
    let after = Snapshot::take(w)?;
    let load = parse_oha(&out).with_context(|| format!("{path}: {url}"))?;
    let total = load.ok + load.failed;
    ensure!(
        load.failed as f64 <= MAX_ERROR_RATE * total as f64,
        "{path}: {} of {total} requests failed (first: {}): the path is broken, its numbers would be worthless",
        load.failed,
        load.first_error.as_deref().unwrap_or("?")
    );
    let k = load.ok as f64 / 1000.0;
    let cpu = |b: u64, a: u64| a.saturating_sub(b) as f64 / ticks;
    let wp_s = cpu(before.waypoint, after.waypoint);
    let agents_s = cpu(before.agents, after.agents);
    let nginx_s = after.nginx_usec.saturating_sub(before.nginx_usec) as f64 / 1e6;
    let busy = after.host.0.saturating_sub(before.host.0) as f64;
    let all = after.host.1.saturating_sub(before.host.1) as f64;
    Ok(json!({
        "rps": load.rps(),
        "requests": load.ok,
        "failed": load.failed,
        "aborted_at_end": load.aborted,
        "first_error": load.first_error,
        "seconds": load.seconds,
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "mean_ms": load.mean_ms,
        "max_ms": load.max_ms,
        "waypoint_cpu_s": wp_s,
        "waypoint_cpu_s_per_1000": wp_s / k,
        "agents_cpu_s": agents_s,
        "agents_cpu_s_per_1000": agents_s / k,
        "nginx_cpu_s": nginx_s,
        "nginx_cpu_s_per_1000": nginx_s / k,
        "waypoint_rss_max_kb": wp_rss,
        "nginx_rss_max_kb": nginx_rss,
        "host_busy_pct": if all > 0.0 { 100.0 * busy / all } else { f64::NAN },
        "server_time_wait": time_wait(server),
    }))
}

/// TIME_WAIT sockets in `pod`'s netns: connections closed there that still
/// hold their local port (60 s). A proxy that opens a connection to the
/// app per request leaves one per request, and a source address runs out
/// of ports at a rate of one bound port per request (bind(2) with port 0
/// cannot take a port that one of them holds).
fn time_wait(pod: &Pod) -> u64 {
    pod.try_command("ss")
        .ok()
        .and_then(|mut c| c.args(["-Htan", "state", "time-wait"]).output().ok())
        .map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().count() as u64)
}

/// What `measure` hands to the report.
struct Measured {
    raw: Vec<Value>,
    memory: Value,
    capture: Value,
    oha_version: String,
}

fn measure(w: &World, oha: &Path, opts: &Opts) -> Result<Measured> {
    let wp_pid = w.waypoint_pid()?;
    // Idle: ready, certificate fetched, bound, no request yet.
    let idle = json!({
        "waypoint_rss_kb": status_kb(wp_pid, "VmRSS")?,
        "nginx_rss_kb": w.nginx_rss_kb(),
    });
    eprintln!(
        "mesh-bench L7: {} rounds x {} s per path and mode, fixed rate {} req/s, {} connections, cluster {}",
        opts.rounds,
        opts.seconds,
        opts.rate,
        opts.connections,
        w.cluster.prefix()
    );
    for p in PATHS {
        let (client, _, url) = w.path(p);
        eprintln!("  {p:<8} {} -> {url}", client.name);
    }
    for p in PATHS {
        let v = point(w, oha, p, opts, Some(opts.rate), WARMUP_SECONDS).with_context(|| format!("warm-up of {p}"))?;
        eprintln!(
            "  warm-up  {p:<8} ok, p50 {:.3} ms",
            v["p50_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let n = opts.rounds;
    let mut raw = Vec::new();
    for round in 1..=n {
        let mut rec = json!({ "round": round });
        for mode in MODES {
            let rate = (mode == "fixed").then_some(opts.rate);
            for p in PATHS {
                let v = point(w, oha, p, opts, rate, opts.seconds)
                    .with_context(|| format!("round {round}: {p} at {mode}"))?;
                eprintln!(
                    "  round {round}/{n}: {mode:<10} {p:<8} {:>7.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  \
                     waypoint {:.3} agents {:.3} nginx {:.3} CPU-s/1000  host busy {:.0}%",
                    v["rps"].as_f64().unwrap_or(f64::NAN),
                    v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                    v["p99_ms"].as_f64().unwrap_or(f64::NAN),
                    v["waypoint_cpu_s_per_1000"].as_f64().unwrap_or(f64::NAN),
                    v["agents_cpu_s_per_1000"].as_f64().unwrap_or(f64::NAN),
                    v["nginx_cpu_s_per_1000"].as_f64().unwrap_or(f64::NAN),
                    v["host_busy_pct"].as_f64().unwrap_or(f64::NAN),
                );
                rec[p][mode] = v;
            }
            // Differences within the round: both sides ran within seconds
            // of each other, so slow drift of the machine's load cancels.
            for p in PATHS {
                for q in ["p50_ms", "p99_ms"] {
                    let at = |path: &str| rec[path][mode][q].as_f64().unwrap_or(f64::NAN);
                    let (added, over_mesh) = (at(p) - at("direct"), at(p) - at("mesh"));
                    rec[p][mode][format!("added_{q}")] = json!(added);
                    rec[p][mode][format!("over_mesh_{q}")] = json!(over_mesh);
                }
            }
        }
        raw.push(rec);
    }
    let memory = json!({
        "idle": idle,
        "after": {
            "waypoint_rss_kb": status_kb(wp_pid, "VmRSS")?,
            "nginx_rss_kb": w.nginx_rss_kb(),
        },
        "waypoint_peak_kb": status_kb(wp_pid, "VmHWM")?,
    });
    let capture = verify(w, &raw)?;
    let oha_version = tool_version(Command::new(oha).arg("--version")).unwrap_or_default();
    Ok(Measured {
        raw,
        memory,
        capture,
        oha_version,
    })
}

/// Sum over rounds of `key` of `path` in every mode (and the warm-ups are
/// not in `raw`, so this is a lower bound of what went through).
fn total(raw: &[Value], path: &str, key: &str) -> u64 {
    raw.iter()
        .flat_map(|r| MODES.map(|m| r[path][m][key].as_u64().unwrap_or(0)))
        .sum()
}

/// Each path must have been the one its name says; also counts the
/// destination agent's connections per waypoint request (the waypoint's
/// upstream reuse, or not).
fn verify(w: &World, raw: &[Value]) -> Result<Value> {
    let c = &w.cluster;
    let ip = |p: &str| c.pod(p).ip4.to_string();
    let smesh = format!("{}:{PORT}", ip("smesh"));
    let (cmesh_id, smesh_id, wp_id) = (
        format!("{TRUST_DOMAIN_NS}/cmesh"),
        format!("{TRUST_DOMAIN_NS}/smesh"),
        format!("{TRUST_DOMAIN_NS}/wp"),
    );
    let wp_requests = total(raw, "waypoint", "requests");
    // Counted by its metrics: access-log lines may be dropped by design
    // when the writer falls behind.
    let counted = mesh::poll(ACCESS_TIMEOUT, || {
        let (mut ok, mut other) = (0, 0);
        for l in w
            .waypoint
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
        {
            let n = l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if l.contains("response_code=\"200\"") && l.contains(&format!("source_principal=\"{cmesh_id}\"")) {
                ok += n;
            } else {
                other += n;
            }
        }
        Ok((ok >= wp_requests).then_some((ok, other)))
    })
    .with_context(|| {
        format!(
            "the waypoint counted fewer 200s from cmesh than the {wp_requests} that went through it: \
             the waypoint path was not the waypoint:\n{}",
            w.waypoint.raw_log()
        )
    })?;
    ensure!(
        counted.1 == 0,
        "the waypoint answered {} requests other than 200s from cmesh",
        counted.1
    );
    let logs = w.waypoint.access_logs();
    let bad: Vec<&Value> = logs
        .iter()
        .filter(|l| {
            l["response_code"] != 200
                || l["upstream_host"] != smesh.as_str()
                || l["source_principal"] != cmesh_id.as_str()
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "{} of {} waypoint requests were not 200s from cmesh to {smesh}, e.g. {:?}",
        bad.len(),
        logs.len(),
        &bad[..bad.len().min(3)]
    );
    let direct_dsts = [ip("sdirect"), ip("proxy")];
    let vip = format!("{VIP}:{VIP_PORT}");
    let mut out = json!({ "waypoint_requests_counted": counted.0, "waypoint_access_log_lines": logs.len() });
    for (a, direction) in w.agents.iter().zip(["outbound", "inbound"]) {
        // The mesh path's keep-alive connections, logged when oha closes
        // them (the waypoint's own, to the same pod, have its identity).
        let mesh_conn = |l: &Value| {
            l["dst"] == smesh.as_str() && l["src_identity"] == cmesh_id.as_str() && l["direction"] == direction
        };
        let logs = a
            .wait_access(ACCESS_TIMEOUT, |logs| logs.iter().any(mesh_conn))
            .with_context(|| format!("the {} agent logged no connection of the mesh path", a.node))?;
        let leaked: Vec<&Value> = logs
            .iter()
            .filter(|l| {
                let dst = l["dst"].as_str().unwrap_or("");
                direct_dsts.iter().any(|d| dst.starts_with(&format!("{d}:")))
            })
            .collect();
        ensure!(
            leaked.is_empty(),
            "the {} agent carried {} connections of the direct or nginx path, e.g. {:?}",
            a.node,
            leaked.len(),
            &leaked[..leaked.len().min(3)]
        );
        let mine: Vec<&Value> = logs.iter().filter(|l| mesh_conn(l)).collect();
        let bad: Vec<&&Value> = mine
            .iter()
            .filter(|l| l["protocol"] != "hbone" || l["mtls"] != true || l["dst_identity"] != smesh_id.as_str())
            .collect();
        ensure!(
            bad.is_empty(),
            "the {} agent carried the mesh path other than as HBONE from cmesh to smesh, e.g. {:?}",
            a.node,
            &bad[..bad.len().min(3)]
        );
        out[&a.node] = json!({ "mesh_path_connections": mine.len() });
        if direction == "outbound" {
            // The waypoint path leaves the client's node towards the waypoint.
            let to_vip: Vec<&Value> = logs.iter().filter(|l| l["dst"] == vip.as_str()).collect();
            ensure!(
                !to_vip.is_empty()
                    && to_vip
                        .iter()
                        .all(|l| l["waypoint"].as_str().is_some_and(|w| !w.is_empty())),
                "the {} agent did not steer every connection to {vip} to the waypoint: {:?}",
                a.node,
                &to_vip[..to_vip.len().min(3)]
            );
            out[&a.node]["waypoint_path_connections"] = json!(to_vip.len());
        }
    }
    // Inbound at the server's agent from the waypoint, logged when closed:
    // one per upstream connection the waypoint opened and closed again
    // (connections it keeps for later requests are not counted yet).
    let from_wp = w.agents[1]
        .access_logs()
        .iter()
        .filter(|l| l["direction"] == "inbound" && l["src_identity"] == wp_id.as_str())
        .count();
    out["node2"]["closed_connections_from_waypoint"] = json!(from_wp);
    out["node2"]["closed_connections_from_waypoint_per_request"] = json!(from_wp as f64 / counted.0.max(1) as f64);
    Ok(out)
}

/// Other processes competing for the two cores: rustc/cargo processes and
/// the load average, at start and at the end of the run.
fn machine_load() -> Value {
    let mut builds = 0;
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "rustc" | "cargo" | "cc1" | "cc1plus" | "ld" | "rust-lld") {
            builds += 1;
        }
    }
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({ "build_processes": builds, "loadavg": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ") })
}

/// The median over rounds of `key` of `path` in `mode`.
fn med(raw: &[Value], path: &str, mode: &str, key: &str) -> f64 {
    let mut v: Vec<f64> = raw.iter().filter_map(|r| r[path][mode][key].as_f64()).collect();
    median(&mut v)
}

fn mb(kb: &Value) -> f64 {
    kb.as_f64().unwrap_or(f64::NAN) / 1024.0
}

fn report(opts: &Opts, idle: &Idle, m: Measured, nginx: &str, load_before: Value, started: Instant) -> Result<()> {
    let raw = &m.raw;
    let machine = Machine::now(idle);
    let cores = machine.cores;
    let load_after = machine_load();
    let cell = |v: f64, d: usize| {
        if v.is_finite() {
            format!("{v:.d$}")
        } else {
            "—".into()
        }
    };
    // (label, key, decimals, paths it means something for)
    type Row = (&'static str, &'static str, usize, &'static [&'static str]);
    let rows: [Row; 11] = [
        ("requests/s", "rps", 0, &PATHS),
        ("p50 (ms)", "p50_ms", 3, &PATHS),
        ("p99 (ms)", "p99_ms", 3, &PATHS),
        (
            "added p50 vs direct (ms)",
            "added_p50_ms",
            3,
            &["mesh", "waypoint", "nginx"],
        ),
        (
            "added p99 vs direct (ms)",
            "added_p99_ms",
            3,
            &["mesh", "waypoint", "nginx"],
        ),
        ("added p50 vs mesh (ms)", "over_mesh_p50_ms", 3, &["waypoint"]),
        ("added p99 vs mesh (ms)", "over_mesh_p99_ms", 3, &["waypoint"]),
        (
            "agents CPU-s per 1000 req (both)",
            "agents_cpu_s_per_1000",
            3,
            &["mesh", "waypoint"],
        ),
        (
            "waypoint CPU-s per 1000 req",
            "waypoint_cpu_s_per_1000",
            3,
            &["waypoint"],
        ),
        ("nginx CPU-s per 1000 req", "nginx_cpu_s_per_1000", 3, &["nginx"]),
        (
            "server pod's TIME_WAIT sockets after the run",
            "server_time_wait",
            0,
            &PATHS,
        ),
    ];
    let mut table = format!(
        "L7: HTTP/1.1 keep-alive GET, 1 KB answers, {}, median of {} rounds x {} s \
         per path and mode ({}, {} connections, 1 worker thread)\n\n| metric | {} |\n|---|{}\n",
        machine.header(),
        opts.rounds,
        opts.seconds,
        m.oha_version,
        opts.connections,
        PATHS.join(" | "),
        "---:|".repeat(PATHS.len()),
    );
    let mut summary = json!({});
    for mode in MODES {
        let title = match mode {
            "fixed" => format!("**at {} req/s**", opts.rate),
            _ => "**at saturation**".to_string(),
        };
        let _ = writeln!(table, "| {title} |{}", " |".repeat(PATHS.len()));
        for (label, key, d, paths) in rows {
            let cells: Vec<String> = PATHS
                .iter()
                .map(|p| {
                    if paths.contains(p) {
                        cell(med(raw, p, mode, key), d)
                    } else {
                        "—".into()
                    }
                })
                .collect();
            let _ = writeln!(table, "| {label} | {} |", cells.join(" | "));
            summary[mode][key] = PATHS
                .iter()
                .map(|p| (p.to_string(), json!(med(raw, p, mode, key))))
                .collect();
        }
        let busy: Vec<String> = PATHS
            .iter()
            .map(|p| cell(med(raw, p, mode, "host_busy_pct"), 0))
            .collect();
        let _ = writeln!(table, "| host CPU busy (% of {cores} cores) | {} |", busy.join(" | "));
    }
    // The largest sample of the proxy's own path over rounds.
    let max_of = |path: &str, mode: &str, key: &str| {
        raw.iter()
            .filter_map(|r| r[path][mode][key].as_f64())
            .fold(f64::NAN, f64::max)
    };
    let mem = &m.memory;
    let _ = writeln!(
        table,
        "\n| RSS (MB) | idle (before any request) | max at {} req/s | max at saturation | idle after the run | peak (VmHWM) |\n|---|---:|---:|---:|---:|---:|",
        opts.rate
    );
    // nginx is several processes: no one peak to read.
    let peak = format!("{:.1}", mb(&mem["waypoint_peak_kb"]));
    for (label, path, peak) in [
        ("waypoint", "waypoint", peak),
        ("nginx (master + workers)", "nginx", String::new()),
    ] {
        let key = format!("{path}_rss_kb");
        let max_kb = format!("{path}_rss_max_kb");
        let _ = writeln!(
            table,
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {peak} |",
            mb(&mem["idle"][&key]),
            max_of(path, "fixed", &max_kb) / 1024.0,
            max_of(path, "saturation", &max_kb) / 1024.0,
            mb(&mem["after"][&key]),
        );
    }
    let over_mesh = med(raw, "waypoint", "fixed", "over_mesh_p99_ms");
    let cpu = med(raw, "waypoint", "fixed", "waypoint_cpu_s_per_1000");
    let idle_mb = mb(&mem["idle"]["waypoint_rss_kb"]);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let targets = json!({
        "waypoint_added_p99_over_mesh_ms": { "measured": over_mesh, "target": TARGET_ADDED_P99_MS, "met": over_mesh <= TARGET_ADDED_P99_MS },
        "waypoint_vcpu_per_1000_rps": { "measured": cpu, "target": TARGET_CPU_PER_1000, "met": cpu <= TARGET_CPU_PER_1000 },
        "waypoint_idle_rss_mb": { "measured": idle_mb, "target": TARGET_IDLE_RSS_MB, "met": idle_mb <= TARGET_IDLE_RSS_MB },
    });
    let _ = writeln!(
        table,
        "\nIssue #10's targets:\n\
         * the waypoint's added p99 over the L4 mesh at {} req/s: {over_mesh:.3} ms (≤ {TARGET_ADDED_P99_MS}): {}\n\
         * waypoint CPU at {} req/s: {cpu:.3} vCPU per 1000 req/s (≤ {TARGET_CPU_PER_1000:.2}; Istio's Envoy waypoint ~0.25): {}\n\
         * waypoint RSS idle: {idle_mb:.1} MB (≤ {TARGET_IDLE_RSS_MB}): {}",
        opts.rate,
        verdict(over_mesh <= TARGET_ADDED_P99_MS),
        opts.rate,
        verdict(cpu <= TARGET_CPU_PER_1000),
        verdict(idle_mb <= TARGET_IDLE_RSS_MB),
    );
    let per_request = m.capture["node2"]["closed_connections_from_waypoint_per_request"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let elapsed = started.elapsed().as_secs_f64();
    println!("{table}");
    println!(
        "Paths: direct = cdirect -> sdirect; mesh = cmesh -> smesh by pod IP (both agents, HBONE); waypoint = cmesh -> \
         Service VIP bound to the waypoint (node1's agent -> waypoint on node2 -> node2's agent -> smesh); nginx = \
         cdirect -> nginx on node2 -> sdirect. Backend: mesh-echo GET /bytes/{BODY_BYTES}. CPU-s per 1000 requests \
         is also vCPU per 1000 req/s. The server's agent saw {per_request:.4} connections from the waypoint \
         closed per waypoint request (kept ones still open are not counted). Other load: {} build processes and load average {} at the start, {} and {} at the end; \
         client, servers, agents, waypoint and nginx share the {cores} cores.",
        load_before["build_processes"],
        load_before["loadavg"].as_str().unwrap_or(""),
        load_after["build_processes"],
        load_after["loadavg"].as_str().unwrap_or(""),
    );
    let command = format!(
        "cargo xtask bench -- --only l7 --l7-rounds {} --l7-seconds {} --rate {} --connections {}{}",
        opts.rounds,
        opts.seconds,
        opts.rate,
        opts.connections,
        idle.halt_poll_arg(),
    );
    println!("Reproduce: {command}");
    let doc = machine.stamp(json!({
        "binaries": super::binaries(),
        "oha": m.oha_version,
        "nginx": nginx,
        "paths": PATHS,
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "rate": opts.rate,
        "connections": opts.connections,
        "body_bytes": BODY_BYTES,
        "elapsed_s": elapsed,
        "command": command,
        "machine_load": { "start": load_before, "end": load_after },
        "median": summary,
        "memory": m.memory,
        "targets": targets,
        "capture_check": m.capture,
        "per_round": raw,
    }));
    let shown = write_json(&opts.json, &doc)?;
    println!("Raw numbers: {} (L7 took {elapsed:.0} s)", shown.display());
    Ok(())
}
