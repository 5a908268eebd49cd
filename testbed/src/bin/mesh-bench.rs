//! `cargo xtask bench [--rounds N] [--seconds S] [--json PATH]`: pod to pod
//! across two nodes, the direct path against the captured path (both agents
//! in the way), interleaved in one run.
//!
//! Cluster: node1 {cdirect, cmesh}, node2 {sdirect, smesh}; cmesh and smesh
//! are enrolled. Direct = cdirect -> sdirect; mesh = cmesh -> smesh (captured
//! outbound by node1's agent, inbound by node2's agent). Each measurement runs
//! as R rounds, direct then mesh within a round; the table shows medians.
//! 1. 16-byte TCP request/response round trip (sockperf ping-pong --full-rtt), p50/p99;
//! 2. bulk TCP throughput, one stream (iperf3);
//! 3. CPU of both agents (utime+stime from /proc/<pid>/stat) per GB carried in 2.
//!
//! Afterwards the agents' access logs must show that they carried the mesh
//! connections (and none of the direct ones), or the run fails.
use std::{
    fs::{self, File},
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::{json, Value};
use testbed::{
    mesh::{self, Agent, Settings},
    Cluster, ClusterSpec, NodeSpec, Pod,
};

const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
/// sockperf's smallest message is 14 bytes.
const MSG_SIZE: u32 = 16;
/// How long a client may run beyond its nominal duration before it is killed.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const ACCESS_TIMEOUT: Duration = Duration::from_secs(10);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    install_signal_handlers();
    let code = match parse_args(std::env::args().skip(1)) {
        Ok(None) => 0,
        Ok(Some(opts)) => match bench(&opts) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mesh-bench failed: {e:#}");
                1
            }
        },
        Err(e) => {
            eprintln!("mesh-bench: {e:#}\n\n{USAGE}");
            2
        }
    };
    // Everything is gone by now (Drop); make sure of it.
    if let Err(e) = testbed::teardown_all() {
        eprintln!("teardown: {e:#}");
    }
    // An interrupted run fails in the main thread too (its clients get the
    // signal); let the exit code say it was interrupted.
    std::process::exit(if STOP.load(Ordering::SeqCst) { 130 } else { code });
}

/// Ctrl-C/SIGTERM only set a flag; a watcher thread tears the cluster down.
fn install_signal_handlers() {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
    std::thread::spawn(|| loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: tearing the benchmark cluster down");
            if let Err(e) = testbed::teardown_all() {
                eprintln!("teardown: {e:#}");
            }
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

const USAGE: &str = "usage: mesh-bench [--] [--rounds N] [--seconds S] [--json PATH]
  --rounds N    rounds of direct-then-mesh per measurement, median reported (default 5)
  --seconds S   duration of each measurement in whole seconds (default 3)
  --json PATH   raw per-round numbers (default <workspace>/target/bench/capture.json)
Set MESH_KEEP_LOGS=1 to keep the agents' logs.";

#[derive(Debug)]
struct Opts {
    rounds: usize,
    seconds: u32,
    json: PathBuf,
}

/// Accepts `--rounds 3`, `--rounds=3` and a `--` anywhere (cargo passes it on).
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Opts>> {
    let mut opts = Opts {
        rounds: 5,
        seconds: 3,
        json: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/capture.json"),
    };
    while let Some(arg) = args.next() {
        if arg == "--" {
            continue;
        }
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().with_context(|| format!("{key} needs a value")),
            }
        };
        match key.as_str() {
            "--rounds" => {
                let v = value()?;
                opts.rounds = v.parse().with_context(|| format!("--rounds {v:?}"))?;
                ensure!(opts.rounds >= 1, "--rounds must be at least 1");
            }
            "--seconds" => {
                let v = value()?;
                opts.seconds = v.parse().with_context(|| format!("--seconds {v:?} (whole seconds)"))?;
                ensure!((1..=600).contains(&opts.seconds), "--seconds must be 1..=600");
            }
            "--json" => opts.json = PathBuf::from(value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(opts))
}

fn bench(opts: &Opts) -> Result<()> {
    for tool in ["sockperf", "iperf3"] {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("`{tool}` is not installed: run `cargo xtask setup`"))?;
    }
    mesh::binary("agent")?;
    testbed::sweep_stale()?;
    let started = Instant::now();
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["cdirect", "cmesh"]),
        NodeSpec::new("node2", &["sdirect", "smesh"]),
    ]);
    let cluster = Cluster::create("bench", &spec)?;
    // Agents and servers live inside `run` and are gone before the cluster,
    // whose teardown also removes the log directory.
    run(&cluster, &cluster.scratch_dir()?, opts, started)
}

/// One way from a client pod to a server pod.
struct Route<'a> {
    name: &'static str,
    client: &'a Pod,
    server: &'a Pod,
}

fn run(cluster: &Cluster, dir: &Path, opts: &Opts, started: Instant) -> Result<()> {
    let config = dir.join("mesh.yaml");
    mesh::write_config(cluster, &config, &["cmesh", "smesh"], &Settings::default())?;
    let mut agents = [
        Agent::start_ready(cluster, "node1", &config, dir)?,
        Agent::start_ready(cluster, "node2", &config, dir)?,
    ];
    let pids = agents
        .iter()
        .map(|a| a.pid().context("agent has no pid"))
        .collect::<Result<Vec<u32>>>()?;
    let agent_cgroups: Vec<PathBuf> = ["node1", "node2"]
        .iter()
        .map(|n| cluster.node(n).agent_cgroup.clone())
        .collect();

    let routes = [
        Route {
            name: "direct",
            client: cluster.pod("cdirect"),
            server: cluster.pod("sdirect"),
        },
        Route {
            name: "mesh",
            client: cluster.pod("cmesh"),
            server: cluster.pod("smesh"),
        },
    ];
    let port = |p: u16| p.to_string();
    let mut servers = Vec::new();
    for r in &routes {
        servers.push(Background::start(
            r.server,
            "sockperf",
            &["server", "--tcp", "-i", "0.0.0.0", "-p", &port(SOCKPERF_PORT)],
            SOCKPERF_PORT,
            dir,
        )?);
        servers.push(Background::start(
            r.server,
            "iperf3",
            &["-s", "-p", &port(IPERF_PORT)],
            IPERF_PORT,
            dir,
        )?);
    }

    // Idle: enrolled, listening, no traffic yet.
    let idle_kb = pids
        .iter()
        .map(|p| proc_status_kb(*p, "VmRSS"))
        .collect::<Result<Vec<u64>>>()?;
    let ticks = clock_ticks()?;
    let mut raw: Vec<Value> = Vec::new();
    eprintln!(
        "mesh-bench: {} rounds x {} s; direct {} -> {}, mesh {} -> {}",
        opts.rounds,
        opts.seconds,
        routes[0].client.ip4,
        routes[0].server.ip4,
        routes[1].client.ip4,
        routes[1].server.ip4
    );
    for round in 1..=opts.rounds {
        let mut rec = json!({ "round": round });
        for r in &routes {
            let rtt = sockperf(r, opts.seconds).with_context(|| format!("round {round}: {} latency", r.name))?;
            eprintln!(
                "  round {round}/{}: {:<6} rtt p50 {:>8.1} us  p99 {:>8.1} us",
                opts.rounds, r.name, rtt.p50, rtt.p99
            );
            rec[r.name]["rtt"] = rtt.to_json();
        }
        for r in &routes {
            let before = CpuSnapshot::take(&pids, &agent_cgroups, r)?;
            let bulk = iperf3(r, opts.seconds).with_context(|| format!("round {round}: {} throughput", r.name))?;
            let after = CpuSnapshot::take(&pids, &agent_cgroups, r)?;
            let cpu = after.since(&before, ticks);
            let per_gb = cpu.agent_s / (bulk.bytes as f64 / 1e9);
            eprintln!(
                "  round {round}/{}: {:<6} bulk {:>7.2} Gb/s  agents {:.2} CPU-s ({:.3}/GB)  host busy {:.0}%",
                opts.rounds, r.name, bulk.gbps, cpu.agent_s, per_gb, cpu.host_busy_pct
            );
            rec[r.name]["bulk"] = json!({
                "gbps": bulk.gbps,
                "bytes_received": bulk.bytes,
                "seconds": bulk.seconds,
                "retransmits": bulk.retransmits,
                "agent_cpu_s": cpu.agent_s,
                "agent_cpu_s_per_gb": per_gb,
                "agent_cgroup_cpu_s": cpu.agent_cgroup_s,
                "client_pod_cpu_s": cpu.client_s,
                "server_pod_cpu_s": cpu.server_s,
                "host_busy_pct": cpu.host_busy_pct,
            });
        }
        raw.push(rec);
    }
    let peak_kb = pids
        .iter()
        .map(|p| proc_status_kb(*p, "VmHWM"))
        .collect::<Result<Vec<u64>>>()?;
    let mut capture = verify_capture(&agents, &routes, opts.rounds)?;
    capture["agent_rss_kb"] = json!({ "idle": idle_kb, "peak": peak_kb });
    drop(servers);
    for a in &mut agents {
        if let Err(e) = a.terminate() {
            eprintln!("warning: stopping the agent on {}: {e:#}", a.node);
        }
    }

    report(opts, &raw, capture, started)
}

/// The median of the values of `key` (a JSON pointer) over rounds.
fn median_of(raw: &[Value], pointer: &str) -> f64 {
    let mut v: Vec<f64> = raw.iter().filter_map(|r| r.pointer(pointer)?.as_f64()).collect();
    median(&mut v)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn report(opts: &Opts, raw: &[Value], capture: Value, started: Instant) -> Result<()> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel.trim();
    let date = utc_now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // (label, key, decimals, whether mesh/direct means something): the agents
    // are not on the direct path, their CPU there is idle housekeeping.
    let rows: [(&str, &str, usize, bool); 4] = [
        ("RTT p50 (us)", "rtt/p50_us", 1, true),
        ("RTT p99 (us)", "rtt/p99_us", 1, true),
        ("bulk (Gb/s)", "bulk/gbps", 2, true),
        ("agent CPU-s/GB", "bulk/agent_cpu_s_per_gb", 3, false),
    ];
    let mut summary = json!({});
    let mut table = format!(
        "Pod to pod across two nodes, {date}, kernel {kernel}, {cores} cores, median of {} rounds x {} s \
         (direct and mesh interleaved)\n\n\
         | metric | direct | mesh | ratio mesh/direct |\n|---|---:|---:|---:|\n",
        opts.rounds, opts.seconds
    );
    for (label, key, decimals, comparable) in rows {
        let d = median_of(raw, &format!("/direct/{key}"));
        let m = median_of(raw, &format!("/mesh/{key}"));
        let ratio = if comparable && d > 0.0 && d.is_finite() && m.is_finite() {
            format!("{:.2}", m / d)
        } else {
            "n/a".to_string()
        };
        table.push_str(&format!("| {label} | {d:.decimals$} | {m:.decimals$} | {ratio} |\n"));
        summary[key.replace('/', "_")] = json!({ "direct": d, "mesh": m });
    }
    let mb = |k: &str| {
        let v: Vec<String> = capture["agent_rss_kb"][k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|kb| format!("{:.1}", kb.as_f64().unwrap_or(0.0) / 1024.0))
            .collect();
        v.join(" / ")
    };
    table.push_str(&format!(
        "| agent RSS idle / peak (MB, node1 / node2) | | {} ; {} | |\n",
        mb("idle"),
        mb("peak")
    ));
    let busy_d = median_of(raw, "/direct/bulk/host_busy_pct");
    let busy_m = median_of(raw, "/mesh/bulk/host_busy_pct");
    let elapsed = started.elapsed().as_secs_f64();
    println!("{table}");
    println!(
        "Host CPU busy during bulk (of {cores} cores): direct {busy_d:.0}%, mesh {busy_m:.0}%. \
         16-byte messages (sockperf ping-pong --tcp --full-rtt), one iperf3 stream; \
         agent CPU = utime+stime of both agents \
         (in the direct column: their idle housekeeping, they are not on that path)."
    );
    println!(
        "Reproduce: cargo xtask bench -- --rounds {} --seconds {}",
        opts.rounds, opts.seconds
    );

    let doc = json!({
        "date": date,
        "kernel": kernel,
        "cores": cores,
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "message_bytes": MSG_SIZE,
        "elapsed_s": elapsed,
        "command": format!("cargo xtask bench -- --rounds {} --seconds {}", opts.rounds, opts.seconds),
        "median": summary,
        "capture_check": capture,
        "per_round": raw,
    });
    if let Some(parent) = opts.json.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    fs::write(&opts.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    let shown = opts.json.canonicalize().unwrap_or_else(|_| opts.json.clone());
    println!("Raw numbers: {} (run took {elapsed:.0} s)", shown.display());
    Ok(())
}

/// The agents must have carried every mesh connection and none of the direct
/// ones; otherwise the mesh numbers describe an uncaptured path.
fn verify_capture(agents: &[Agent], routes: &[Route], rounds: usize) -> Result<Value> {
    let smesh = routes[1].server.ip4.to_string();
    let sdirect = format!("{}:", routes[0].server.ip4);
    let want = |port: u16| format!("{smesh}:{port}");
    let carried = |logs: &[Value], dst: &str| logs.iter().filter(|l| l["dst"] == dst).count();
    // Each sockperf run is one connection, each iperf3 run at least two.
    let enough = |logs: &[Value]| {
        carried(logs, &want(SOCKPERF_PORT)) >= rounds && carried(logs, &want(IPERF_PORT)) >= 2 * rounds
    };
    let mut out = json!({});
    for (a, direction) in agents.iter().zip(["outbound", "inbound"]) {
        let logs = a.wait_access(ACCESS_TIMEOUT, enough).with_context(|| {
            format!(
                "the {} agent did not carry the mesh connections to {smesh}: \
                 the mesh path was not captured, its numbers would be worthless",
                a.node
            )
        })?;
        let mesh_logs: Vec<&Value> = logs
            .iter()
            .filter(|l| l["dst"].as_str().is_some_and(|d| d.starts_with(&format!("{smesh}:"))))
            .collect();
        // A connection the agent could not forward (connect_failed, no original
        // destination) or saw the wrong way round means the path was broken.
        // `reset` or `error: ...` at the end is normal: sockperf and iperf3
        // close with data in flight.
        let forwarded = |l: &Value| {
            l["result"]
                .as_str()
                .is_some_and(|r| !r.starts_with("connect_failed") && r != "no_original_destination")
        };
        let bad: Vec<&&Value> = mesh_logs
            .iter()
            .filter(|l| !forwarded(l) || l["direction"] != direction)
            .collect();
        ensure!(
            bad.is_empty(),
            "the {} agent failed to forward mesh connections: {bad:?}",
            a.node
        );
        let resets = mesh_logs.iter().filter(|l| l["result"] != "ok").count();
        let leaked: Vec<&Value> = logs
            .iter()
            .filter(|l| l["dst"].as_str().is_some_and(|d| d.starts_with(&sdirect)))
            .collect();
        ensure!(
            leaked.is_empty(),
            "the {} agent captured direct-path connections: {leaked:?}",
            a.node
        );
        let bytes: u64 = mesh_logs
            .iter()
            .map(|l| l["bytes_sent"].as_u64().unwrap_or(0) + l["bytes_received"].as_u64().unwrap_or(0))
            .sum();
        eprintln!(
            "capture check: {} agent carried {} {direction} connections to {smesh} \
             ({resets} ended in an error such as a reset; the others logged {:.2} GB)",
            a.node,
            mesh_logs.len(),
            bytes as f64 / 1e9
        );
        out[&a.node] = json!({
            "direction": direction,
            "connections": mesh_logs.len(),
            "ended_in_error": resets,
            "bytes_logged": bytes,
        });
    }
    Ok(out)
}

struct Rtt {
    p50: f64,
    p99: f64,
    avg: f64,
    observations: u64,
}

impl Rtt {
    fn to_json(&self) -> Value {
        json!({ "p50_us": self.p50, "p99_us": self.p99, "avg_us": self.avg, "observations": self.observations })
    }
}

fn sockperf(r: &Route, seconds: u32) -> Result<Rtt> {
    let mut cmd = r.client.try_command("sockperf")?;
    cmd.args(["ping-pong", "--tcp", "--full-rtt", "-i"])
        .arg(r.server.ip4.to_string())
        .args(["-p", &SOCKPERF_PORT.to_string(), "-m", &MSG_SIZE.to_string()])
        .args(["-t", &seconds.to_string()]);
    let out = run_bounded(cmd, Duration::from_secs(seconds.into()) + CLIENT_SLACK)?;
    let text = strip_ansi(&format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ));
    if !out.status.success() {
        bail!("sockperf ping-pong failed ({}):\n{text}", out.status);
    }
    parse_sockperf(&text).with_context(|| format!("unexpected sockperf output:\n{text}"))
}

fn parse_sockperf(text: &str) -> Result<Rtt> {
    ensure!(
        text.contains("Round trip is"),
        "no round-trip summary (was --full-rtt honoured?)"
    );
    let mut p50 = None;
    let mut p99 = None;
    let mut avg = None;
    let mut observations = None;
    for line in text.lines() {
        if let Some(rest) = line.split("---> percentile ").nth(1) {
            let (pct, val) = rest.split_once('=').context("percentile line without '='")?;
            let val: f64 = val.trim().parse()?;
            match pct.trim() {
                "50.000" => p50 = Some(val),
                "99.000" => p99 = Some(val),
                _ => {}
            }
        } else if let Some(rest) = line.split("avg-rtt=").nth(1) {
            avg = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.split("Total ").nth(1) {
            // "Total 31142 observations" (not "[Total Run] ...").
            if let Some(n) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                observations = Some(n);
            }
        }
    }
    let observations: u64 = observations.context("no observation count")?;
    ensure!(observations > 0, "no round trips completed");
    Ok(Rtt {
        p50: p50.context("no 50th percentile")?,
        p99: p99.context("no 99th percentile")?,
        avg: avg.unwrap_or(f64::NAN),
        observations,
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Bulk {
    gbps: f64,
    bytes: u64,
    seconds: f64,
    retransmits: u64,
}

fn iperf3(r: &Route, seconds: u32) -> Result<Bulk> {
    let mut cmd = r.client.try_command("iperf3")?;
    cmd.arg("-c")
        .arg(r.server.ip4.to_string())
        .args(["-p", &IPERF_PORT.to_string(), "-t", &seconds.to_string()])
        .args(["-J", "--connect-timeout", "5000"]);
    let out = run_bounded(cmd, Duration::from_secs(seconds.into()) + CLIENT_SLACK)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = doc["error"].as_str() {
        bail!("iperf3: {e}");
    }
    ensure!(out.status.success(), "iperf3 failed ({}): {text}", out.status);
    let recv = &doc["end"]["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    let bytes = recv["bytes"].as_u64().context("no end.sum_received.bytes")?;
    ensure!(bytes > 0, "iperf3 moved no data: {recv}");
    Ok(Bulk {
        gbps: bps / 1e9,
        bytes,
        seconds: recv["seconds"].as_f64().unwrap_or(f64::NAN),
        retransmits: doc["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Runs `cmd` to completion with captured output; killed after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// A server process in a pod, logging to a file; killed on drop.
struct Background {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Background {
    /// Starts `program args` in `pod` and waits (bounded) until it listens on `port`.
    fn start(pod: &Pod, program: &str, args: &[&str], port: u16, dir: &Path) -> Result<Background> {
        let log = dir.join(format!("{program}-{}.log", pod.name));
        let file = File::create(&log)?;
        let child = pod
            .try_command(program)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {program} in {}", pod.name))?;
        let mut bg = Background {
            what: format!("{program} in {}", pod.name),
            child,
            log,
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !listening(bg.child.id(), port) {
            if let Some(status) = bg.child.try_wait()? {
                bail!("{} exited ({status}):\n{}", bg.what, bg.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {port} within {LISTEN_TIMEOUT:?}:\n{}",
                    bg.what,
                    bg.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bg)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the netns of process `pid` has a TCP listener on `port`
/// (/proc/<pid>/net is the view of that process's netns; no connection is
/// made, so nothing reaches the agents' access logs).
fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3
                    && fields[3] == "0A"
                    && fields[1]
                        .rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

/// A `kB` line of /proc/<pid>/status (VmRSS, VmHWM).
fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn clock_ticks() -> Result<f64> {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(t > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(t as f64)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn proc_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("agent {pid} is gone"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "short /proc/{pid}/stat");
    ensure!(f[0] != "Z", "agent {pid} is a zombie");
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// `usage_usec` of a cgroup's cpu.stat.
fn cgroup_usec(cg: &Path) -> u64 {
    fs::read_to_string(cg.join("cpu.stat"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
fn host_jiffies() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal (guest is in user)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

struct CpuSnapshot {
    agent_ticks: u64,
    agent_cg_usec: u64,
    client_usec: u64,
    server_usec: u64,
    host: (u64, u64),
}

struct CpuUse {
    agent_s: f64,
    agent_cgroup_s: f64,
    client_s: f64,
    server_s: f64,
    host_busy_pct: f64,
}

impl CpuSnapshot {
    fn take(pids: &[u32], agent_cgroups: &[PathBuf], r: &Route) -> Result<CpuSnapshot> {
        Ok(CpuSnapshot {
            agent_ticks: pids.iter().map(|p| proc_ticks(*p)).sum::<Result<u64>>()?,
            agent_cg_usec: agent_cgroups.iter().map(|c| cgroup_usec(c)).sum(),
            client_usec: cgroup_usec(&r.client.cgroup),
            server_usec: cgroup_usec(&r.server.cgroup),
            host: host_jiffies(),
        })
    }

    fn since(&self, before: &CpuSnapshot, ticks: f64) -> CpuUse {
        let busy = self.host.0.saturating_sub(before.host.0) as f64;
        let total = self.host.1.saturating_sub(before.host.1) as f64;
        CpuUse {
            agent_s: self.agent_ticks.saturating_sub(before.agent_ticks) as f64 / ticks,
            agent_cgroup_s: self.agent_cg_usec.saturating_sub(before.agent_cg_usec) as f64 / 1e6,
            client_s: self.client_usec.saturating_sub(before.client_usec) as f64 / 1e6,
            server_s: self.server_usec.saturating_sub(before.server_usec) as f64 / 1e6,
            // Percent of all cores.
            host_busy_pct: if total > 0.0 { 100.0 * busy / total } else { f64::NAN },
        }
    }
}

/// Now as `YYYY-MM-DD HH:MM UTC` (civil-from-days, proleptic Gregorian).
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}
