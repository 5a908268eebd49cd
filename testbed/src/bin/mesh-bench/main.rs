//! `cargo xtask bench [--only l4|l7] [--mode plain|hbone|all] [--rounds N] [--seconds S] [--json PATH]
//! [--l7-rounds N] [--l7-seconds S] [--rate R] [--connections C] [--l7-json PATH] [--halt-poll-ns NS]`:
//! pod to pod across two nodes, the direct path against the captured paths
//! (both agents in the way), interleaved in one run. This file is the L4
//! half (below); `l7.rs` the L7 half (HTTP through the mesh, a waypoint and
//! nginx), which runs after it on a cluster of its own.
//!
//! Columns:
//! * direct: cdirect -> sdirect, neither pod enrolled, no agent in the way;
//! * plain:  cplain -> splain, both enrolled, agents WITHOUT a CA: captured
//!   outbound by node1's agent and inbound by node2's, plain TCP forwarded
//!   with splice in between;
//! * hbone:  chbone -> shbone, both enrolled, agents WITH the CA: HTTP/2
//!   CONNECT over mutual TLS 1.3 from node1's agent to shbone:15008,
//!   terminated by node2's agent (since d9321c5 the agent pools the TLS
//!   connections: one per identity pair carries many CONNECT streams, so the
//!   connection test measures stream setup, not handshakes).
//!
//! Layout. An agent either has a CA or not, and with one every connection
//! between two enrolled pods goes HBONE, so the plain and HBONE paths need
//! different agents. Rather than restarting agents inside every round (new
//! pids for the CPU and RSS figures, a certificate fetch and eBPF load in
//! each round), `--mode all` builds two independent clusters side by side
//! (each with its own namespaces, cgroups and bpffs pins):
//!   cluster "plain": node1 {cdirect, cplain}, node2 {sdirect, splain}, agents without a CA;
//!   cluster "hbone": node1 {chbone}, node2 {shbone}, agents with the CA (served on its node1).
//! Both sets of agents run for the whole run and the three columns are still
//! measured back to back within every round (direct, plain, hbone). The
//! agents of the other cluster only idle meanwhile (a config poll every
//! 200 ms). With `--mode plain` or `--mode hbone` only that cluster is
//! built and it holds the direct pair. The identity of pod P is
//! spiffe://cluster.local/ns/default/sa/P (write_config uses the pod name as
//! service account).
//!
//! Each measurement runs as R rounds; the table shows medians.
//! 1. 16-byte TCP request/response round trip (sockperf ping-pong --full-rtt), p50/p99;
//! 2. bulk TCP throughput, one stream (iperf3), and the CPU of both agents of
//!    the column's cluster (utime+stime from /proc/<pid>/stat) per GB carried,
//!    and of it their user time alone (the agents' own code: it resolves a
//!    change to the agent that the kernel's share, which follows the
//!    scheduler, hides);
//! 3. new connections per second: a sequential Python loop in the client pod
//!    (connect, 1 byte there and back, the server closes, close) against a
//!    Python echo server, S seconds; agent CPU per 1000 connections, and the
//!    loop's own CPU (it bounds the direct column);
//! 4. new connections per second with many clients at once: `mesh-echo
//!    connect-load` (tokio) keeps 32 connections in setup at once against
//!    `mesh-echo tcp-echo` (same exchange as 3), S seconds: the capacity of
//!    the path, and agent CPU per 1000 connections under concurrency;
//! 5. agent RSS idle (ready, certificates fetched, no traffic), after the run
//!    and peak (VmHWM).
//!
//! Afterwards the agents' access logs must show that they carried every
//! column's connections with the right protocol ("tcp" for plain, "hbone"
//! with the expected SPIFFE identities for hbone), and none of the direct
//! ones, or the run fails.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    args::Args,
    idle::Idle,
    mesh::{self, Agent, MeshCa, Settings},
    procfs::{clock_ticks, cpu_ticks, settled_rss_kb, status_kb, user_system_ticks},
    Cluster, ClusterSpec, NodeSpec, Pod,
};

mod l7;

const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
/// The Python echo server of the connection test.
const ECHO_PORT: u16 = 9007;
/// The concurrent connection test's server (`mesh-echo tcp-echo`).
const BURST_PORT: u16 = 9008;
/// Connections in setup at once in the concurrent connection test.
const BURST_CONCURRENCY: usize = 32;
/// sockperf's smallest message is 14 bytes.
const MSG_SIZE: u32 = 16;
/// How long a client may run beyond its nominal duration before it is killed.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const ACCESS_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const TRUST_DOMAIN_NS: &str = "spiffe://cluster.local/ns/default/sa";

/// Echo server for the connection test: one connection at a time (the client
/// is sequential), echoes what the first read returns, then closes first so
/// TIME_WAIT stays on the accepting sides and the client's ports never run out.
const ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        d = c.recv(16)
        if d:
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
"#;

/// Connection-rate client: for SECONDS, sequentially connect, send 1 byte,
/// read the echo up to EOF (the server closes first), close. Prints one JSON
/// line; `cpu_s` is the loop's own CPU time (process_time), not the start-up.
const CONN_CLIENT: &str = r#"
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = errors = 0
first = None
cpu0 = time.process_time()
start = time.monotonic()
end = start + secs
while time.monotonic() < end:
    try:
        s = socket.create_connection((host, port), timeout=5)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            got = b""
            while True:
                b = s.recv(16)
                if not b:
                    break
                got += b
        finally:
            s.close()
        if got != b"x":
            raise ConnectionError("echo was %r" % got)
        ok += 1
    except Exception as e:
        errors += 1
        first = first or repr(e)
        if errors >= 100:
            break
print(json.dumps({"connections": ok, "errors": errors, "seconds": time.monotonic() - start,
                  "cpu_s": time.process_time() - cpu0, "first_error": first}))
"#;

// The shipped binaries' allocator (see agent/src/main.rs), here too, so that
// the benchmark's own load and echo processes are not slowed by musl's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    testbed::signals::program_main(
        "mesh-bench",
        USAGE,
        "the benchmark clusters",
        || parse_args(std::env::args().skip(1)),
        |opts| bench(opts).map(|()| true),
    )
}

const USAGE: &str =
    "usage: mesh-bench [--] [--only l4|l7] [--mode plain|hbone|all] [--sockmap] [--sockmap-to-app] [--sockmap-forward]
                  [--rounds N] [--seconds S]
                  [--json PATH] [--l7-rounds N] [--l7-seconds S] [--rate R] [--connections C] [--l7-json PATH]
                  [--halt-poll-ns NS]
  --only P        run only that half (default: both, L4 first)
  --halt-poll-ns NS  poll NS ns before an idle vCPU halts, for this run (the guest haltpoll
                  driver's guest_halt_poll_ns, restored afterwards): on VMs whose idle vCPUs
                  halt at once every wake-up pays a trip through the host, and the mesh's
                  hops are wake-ups; every run's header says the setting it ran under
 L4 (TCP: sockperf, iperf3, new connections):
  --mode M        captured paths to measure against direct (default all):
                  plain = agents without a CA (splice forward), hbone = agents with
                  the CA (HTTP/2 CONNECT over mTLS to :15008), all = both
  --sockmap       also each captured path with `agent run --sockmap` (columns
                  plainsm, hbonesm: a cluster of their own, measured in the same rounds)
  --sockmap-to-app  also each captured path with phase two, `agent run --sockmap
                  --sockmap-to-app` (columns plains2, hbones2, the same way)
  --sockmap-forward  also the plain path with the kernel path, `agent run --sockmap
                  --sockmap-to-app --sockmap-forward` (column plainsk, the same way;
                  HBONE never takes it)
  --rounds N      rounds of direct-then-captured per measurement, median reported (default 5)
  --seconds S     duration of each measurement in whole seconds (default 3)
  --json PATH     raw per-round numbers (default <workspace>/target/bench/capture.json)
 L7 (HTTP/1.1 keep-alive, 1 KB responses; direct, mesh, mesh + waypoint, nginx; oha):
  --l7-rounds N   rounds of all four paths at the fixed rate, then at saturation (default 3)
  --l7-seconds S  duration of each load run in whole seconds (default 10)
  --rate R        the fixed rate in requests/s (default 1000)
  --connections C keep-alive connections of the load generator (default 16)
  --l7-json PATH  raw per-round numbers (default <workspace>/target/bench/l7.json)
Set MESH_KEEP_LOGS=1 to keep the agents' logs.";

/// The agents' sockmap flags of a column: none, phase one, phase two.
const NO_SOCKMAP: &[&str] = &[];
const PHASE_ONE: &[&str] = &["--sockmap"];
const PHASE_TWO: &[&str] = &["--sockmap", "--sockmap-to-app"];
const KERNEL_PATH: &[&str] = &["--sockmap", "--sockmap-to-app", "--sockmap-forward"];

/// Which halves run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    Both,
    L4,
    L7,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Hbone,
    All,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "plain" => Mode::Plain,
            "hbone" => Mode::Hbone,
            "all" => Mode::All,
            other => bail!("--mode {other:?}: expected plain, hbone or all"),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Hbone => "hbone",
            Mode::All => "all",
        }
    }

    /// The captured columns, in measuring order: (name, agents with the CA,
    /// the agents' sockmap flags). With `sockmap`, each column is followed
    /// by its sockmap-accelerated twin (`plainsm`, `hbonesm`), with
    /// `to_app` by its phase-two twin (`plains2`, `hbones2`), with `forward`
    /// the plain column by its kernel-path twin (`plainsk`), in the same
    /// run.
    fn meshes(self, sockmap: bool, to_app: bool, forward: bool) -> Vec<(&'static str, bool, &'static [&'static str])> {
        let base: &[(&'static str, &'static str, &'static str, bool)] = match self {
            Mode::Plain => &[("plain", "plainsm", "plains2", false)],
            Mode::Hbone => &[("hbone", "hbonesm", "hbones2", true)],
            Mode::All => &[
                ("plain", "plainsm", "plains2", false),
                ("hbone", "hbonesm", "hbones2", true),
            ],
        };
        base.iter()
            .flat_map(|&(name, sm, s2, ca)| {
                let one = sockmap.then_some((sm, ca, PHASE_ONE));
                let two = to_app.then_some((s2, ca, PHASE_TWO));
                let kernel = (forward && !ca).then_some(("plainsk", ca, KERNEL_PATH));
                std::iter::once((name, ca, NO_SOCKMAP))
                    .chain(one)
                    .chain(two)
                    .chain(kernel)
            })
            .collect()
    }
}

#[derive(Debug)]
struct Opts {
    only: Only,
    mode: Mode,
    rounds: usize,
    seconds: u32,
    json: PathBuf,
    /// Also measure each captured path with `agent run --sockmap`.
    sockmap: bool,
    /// Also measure each captured path with phase two on.
    to_app: bool,
    /// Also measure the plain path with the kernel path on.
    forward: bool,
    /// Guest halt polling for the run (`testbed::idle`).
    halt_poll_ns: Option<u64>,
    l7: l7::Opts,
}

/// Accepts `--rounds 3`, `--rounds=3` and a `--` anywhere (cargo passes it on).
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>> {
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut opts = Opts {
        only: Only::Both,
        mode: Mode::All,
        rounds: 5,
        seconds: 3,
        json: bench_dir.join("capture.json"),
        sockmap: false,
        to_app: false,
        forward: false,
        halt_poll_ns: None,
        l7: l7::Opts {
            rounds: 3,
            seconds: 10,
            rate: 1000,
            connections: 16,
            json: bench_dir.join("l7.json"),
        },
    };
    let mut args = Args::new(args);
    while let Some(key) = args.next_key() {
        match key.as_str() {
            "--" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--only" => {
                opts.only = match args.value()?.as_str() {
                    "l4" => Only::L4,
                    "l7" => Only::L7,
                    other => bail!("--only {other:?}: expected l4 or l7"),
                }
            }
            "--mode" => opts.mode = Mode::parse(&args.value()?)?,
            "--sockmap" => opts.sockmap = true,
            "--sockmap-to-app" => opts.to_app = true,
            "--sockmap-forward" => opts.forward = true,
            "--rounds" => opts.rounds = args.number(1..=1000)? as usize,
            "--seconds" => opts.seconds = args.number(1..=600)? as u32,
            "--json" => opts.json = PathBuf::from(args.value()?),
            "--l7-rounds" => opts.l7.rounds = args.number(1..=1000)? as usize,
            "--l7-seconds" => opts.l7.seconds = args.number(1..=600)? as u32,
            "--rate" => opts.l7.rate = args.number(1..=1_000_000)? as u32,
            "--connections" => opts.l7.connections = args.number(1..=1000)? as u32,
            "--l7-json" => opts.l7.json = PathBuf::from(args.value()?),
            "--halt-poll-ns" => {
                // The haltpoll driver's own ceiling is far above this.
                let ns = args.number(0..=10_000_000)?;
                opts.halt_poll_ns = Some(ns);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(opts))
}

fn bench(opts: &Opts) -> Result<()> {
    // Restored when the run ends, fails or is interrupted.
    let _halt_poll = opts.halt_poll_ns.map(testbed::idle::HaltPoll::set).transpose()?;
    let idle = Idle::read(opts.halt_poll_ns.is_some());
    if opts.only != Only::L7 {
        bench_l4(opts, &idle)?;
    }
    if opts.only != Only::L4 {
        l7::bench(&opts.l7, &idle)?;
    }
    Ok(())
}

/// The L4 half: every cluster it builds is gone when it returns, so the
/// L7 half after it has the machine to itself.
fn bench_l4(opts: &Opts, idle: &Idle) -> Result<()> {
    for tool in ["sockperf", "iperf3", "python3"] {
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
    let mut meshes = Vec::new();
    for (i, (name, with_ca, sockmap)) in opts
        .mode
        .meshes(opts.sockmap, opts.to_app, opts.forward)
        .into_iter()
        .enumerate()
    {
        // The direct pair lives in the first cluster.
        meshes.push(Mesh::start(name, with_ca, i == 0, sockmap)?);
    }
    let columns: Vec<&str> = std::iter::once("direct").chain(meshes.iter().map(|m| m.name)).collect();
    // Servers live inside `run`; agents (stopped here, so they drain and
    // unpin) and CAs are gone before their clusters, whose teardown also
    // removes the log directories.
    let (raw, capture) = run(&meshes, opts)?;
    for m in &mut meshes {
        for a in &mut m.agents {
            if let Err(e) = a.terminate() {
                eprintln!("warning: stopping the {} agent on {}: {e:#}", m.name, a.node);
            }
        }
    }
    report(opts, idle, &columns, &raw, capture, started)
}

/// One cluster with its two agents (and its CA for HBONE); carries the
/// captured column `name` (pods c<name> on node1 -> s<name> on node2).
/// Fields drop in order: agents, CA, then the cluster.
struct Mesh {
    /// "plain" or "hbone".
    name: &'static str,
    agents: Vec<Agent>,
    ca: Option<MeshCa>,
    /// The agents run with sockmap flags (phase one or two).
    sockmap: bool,
    pids: Vec<u32>,
    agent_cgroups: Vec<PathBuf>,
    client: String,
    server: String,
    dir: PathBuf,
    cluster: Cluster,
}

impl Mesh {
    /// Builds the cluster, enrols c<name> and s<name>, and starts both agents
    /// (with the CA if `with_ca`), waiting until they are ready and, with the
    /// CA, until each holds its pod's workload certificate.
    fn start(name: &'static str, with_ca: bool, with_direct: bool, sockmap: &[&str]) -> Result<Mesh> {
        let (client, server) = (format!("c{name}"), format!("s{name}"));
        let pods = |direct: &'static str, mesh: &str| -> Vec<String> {
            let mut v = Vec::new();
            if with_direct {
                v.push(direct.to_string());
            }
            v.push(mesh.to_string());
            v
        };
        let spec = ClusterSpec::new(vec![
            NodeSpec {
                name: "node1".into(),
                pods: pods("cdirect", &client),
            },
            NodeSpec {
                name: "node2".into(),
                pods: pods("sdirect", &server),
            },
        ]);
        let cluster = Cluster::create(name, &spec)?;
        let dir = cluster.scratch_dir()?;
        let config = dir.join("mesh.yaml");
        mesh::write_config(&cluster, &config, &[&client, &server], &Settings::default())?;
        let ca = with_ca
            .then(|| MeshCa::start(&cluster, "node1", &dir.join("ca"), &config))
            .transpose()?;
        let mut agents = Vec::new();
        for (node, pod) in [("node1", &client), ("node2", &server)] {
            agents.push(start_agent(&cluster, node, &config, &dir, ca.as_ref(), pod, sockmap).context(name)?);
        }
        let pids = agents
            .iter()
            .map(|a| a.pid().context("agent has no pid"))
            .collect::<Result<Vec<u32>>>()?;
        let agent_cgroups = ["node1", "node2"]
            .iter()
            .map(|n| cluster.node(n).agent_cgroup.clone())
            .collect();
        Ok(Mesh {
            name,
            agents,
            ca,
            sockmap: !sockmap.is_empty(),
            pids,
            agent_cgroups,
            client,
            server,
            dir,
            cluster,
        })
    }

    /// A `kB` field of both agents' /proc/<pid>/status.
    fn rss_kb(&self, field: &str) -> Result<Vec<u64>> {
        self.pids.iter().map(|p| status_kb(*p, field)).collect()
    }

    /// Both agents' sockmap counters (`agent status`: phase one's as
    /// `sockmap/<slot>`, phase two's as `to_app/<slot>`), summed; `None`
    /// (said) when `agent status` fails: they only explain a round.
    fn sockmap_counts(&self) -> Option<BTreeMap<String, u64>> {
        let mut sum = BTreeMap::new();
        for a in &self.agents {
            let status = match a.status() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("warning: {} agent on {}: no sockmap counters: {e:#}", self.name, a.node);
                    return None;
                }
            };
            for (field, prefix) in [
                ("sockmap", "sockmap"),
                ("sockmap_to_app", "to_app"),
                ("sockmap_forward", "forward"),
            ] {
                for (slot, n) in status[field].as_object().into_iter().flatten() {
                    *sum.entry(format!("{prefix}/{slot}")).or_default() += n.as_u64().unwrap_or(0);
                }
            }
        }
        Some(sum)
    }
}

/// What the counters of [`Mesh::sockmap_counts`] moved by between two reads
/// (`null` for one that went backwards: its map was made anew).
fn counts_since(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Value {
    after
        .iter()
        .map(|(k, n)| (k.clone(), json!(n.checked_sub(before.get(k).copied().unwrap_or(0)))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Starts the agent of `node` (with the `sockmap` flags) and waits
/// until it is ready and, with a CA, until it holds the workload
/// certificate of its pod `pod`.
fn start_agent(
    cluster: &Cluster,
    node: &str,
    config: &Path,
    dir: &Path,
    ca: Option<&MeshCa>,
    pod: &str,
    sockmap: &[&str],
) -> Result<Agent> {
    let mut args = ca.map(|c| c.client_args(node)).unwrap_or_default();
    args.extend(sockmap.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Agent::start(cluster, node, config, dir, &args)?;
    a.wait_for("agent ready", READY_TIMEOUT)?;
    if let Some(ca) = ca {
        let id = format!("{TRUST_DOMAIN_NS}/{pod}");
        mesh::poll(READY_TIMEOUT, || {
            Ok(a.logs()
                .iter()
                .any(|l| l["message"] == "workload certificate ready" && l["identity"] == id.as_str())
                .then_some(()))
        })
        .with_context(|| {
            format!(
                "the agent on {node} got no certificate for {id}:\n{}\nCA log:\n{}",
                a.raw_log(),
                ca.log()
            )
        })?;
    }
    Ok(a)
}

/// One way from a client pod to a server pod, and the agents measured for it
/// (for direct: those of the cluster it runs in, idle).
struct Column<'a> {
    name: &'static str,
    client: &'a Pod,
    server: &'a Pod,
    mesh: &'a Mesh,
}

fn run(meshes: &[Mesh], opts: &Opts) -> Result<(Vec<Value>, Value)> {
    let first = &meshes[0];
    let mut cols = vec![Column {
        name: "direct",
        client: first.cluster.pod("cdirect"),
        server: first.cluster.pod("sdirect"),
        mesh: first,
    }];
    for m in meshes {
        cols.push(Column {
            name: m.name,
            client: m.cluster.pod(&m.client),
            server: m.cluster.pod(&m.server),
            mesh: m,
        });
    }
    let port = |p: u16| p.to_string();
    let echo_bin = mesh::binary("mesh-echo")?.to_string_lossy().into_owned();
    let mut servers = Vec::new();
    for c in &cols {
        let dir = &c.mesh.dir;
        servers.push(Background::start(
            c.server,
            "sockperf",
            &["server", "--tcp", "-i", "0.0.0.0", "-p", &port(SOCKPERF_PORT)],
            SOCKPERF_PORT,
            dir,
        )?);
        servers.push(Background::start(
            c.server,
            "iperf3",
            &["-s", "-p", &port(IPERF_PORT)],
            IPERF_PORT,
            dir,
        )?);
        servers.push(Background::start(
            c.server,
            "python3",
            &["-c", ECHO_SERVER, &port(ECHO_PORT)],
            ECHO_PORT,
            dir,
        )?);
        servers.push(Background::start(
            c.server,
            &echo_bin,
            &["tcp-echo", "--listen", &format!("0.0.0.0:{BURST_PORT}")],
            BURST_PORT,
            dir,
        )?);
    }

    // Idle: enrolled, certificates fetched, listening, no traffic yet.
    let idle_kb = meshes
        .iter()
        .map(|m| m.pids.iter().map(|p| settled_rss_kb(*p)).collect())
        .collect::<Result<Vec<Vec<u64>>>>()?;
    let ticks = clock_ticks()?;
    let mut raw: Vec<Value> = Vec::new();
    eprintln!(
        "mesh-bench: mode {}, {} rounds x {} s",
        opts.mode.as_str(),
        opts.rounds,
        opts.seconds
    );
    for c in &cols {
        eprintln!(
            "  {:<6} {} -> {} in cluster {} (agents {})",
            c.name,
            c.client.ip4,
            c.server.ip4,
            c.mesh.cluster.prefix(),
            if c.mesh.ca.is_some() {
                "with the CA"
            } else {
                "without a CA"
            }
        );
    }
    let n = opts.rounds;
    for round in 1..=n {
        let mut rec = json!({ "round": round });
        for c in &cols {
            // Whether this round's connection was redirected at all: each
            // round is one connection, decided at its first bytes.
            let sockmap = c.name != "direct" && c.mesh.sockmap;
            let counts_before = sockmap.then(|| c.mesh.sockmap_counts()).flatten();
            let before = CpuSnapshot::take(c)?;
            let rtt = sockperf(c, opts.seconds).with_context(|| format!("round {round}: {} latency", c.name))?;
            let cpu = CpuSnapshot::take(c)?.since(&before, ticks);
            // What both agents spend per message and its answer, over the
            // whole run (the CPU window holds the warm-up too). CPU, not a
            // part of the latency: some of it runs after the hand-off.
            let per_rt_us = cpu.agent_s * 1e6 / rtt.replies.max(1) as f64;
            eprintln!(
                "  round {round}/{n}: {:<6} rtt p50 {:>8.1} us  p99 {:>8.1} us  agents {per_rt_us:.1} CPU-us per round trip",
                c.name, rtt.p50, rtt.p99
            );
            rec[c.name]["rtt"] = rtt.to_json();
            rec[c.name]["rtt"]["agent_cpu_s"] = json!(cpu.agent_s);
            rec[c.name]["rtt"]["agent_cpu_us_per_round_trip"] = json!(per_rt_us);
            if let Some((before, after)) = counts_before.and_then(|b| Some((b, c.mesh.sockmap_counts()?))) {
                let moved = counts_since(&before, &after);
                eprintln!("  round {round}/{n}: {:<6} rtt sockmap counters {moved}", c.name);
                rec[c.name]["rtt"]["sockmap"] = moved;
            }
        }
        for c in &cols {
            let before = CpuSnapshot::take(c)?;
            let bulk = iperf3(c, opts.seconds).with_context(|| format!("round {round}: {} throughput", c.name))?;
            let cpu = CpuSnapshot::take(c)?.since(&before, ticks);
            let per_gb = cpu.agent_s / (bulk.bytes as f64 / 1e9);
            eprintln!(
                "  round {round}/{n}: {:<6} bulk {:>7.2} Gb/s  agents {:.2} CPU-s ({:.3}/GB)  host busy {:.0}%",
                c.name, bulk.gbps, cpu.agent_s, per_gb, cpu.host_busy_pct
            );
            rec[c.name]["bulk"] = json!({
                "gbps": bulk.gbps,
                "bytes_received": bulk.bytes,
                "seconds": bulk.seconds,
                "retransmits": bulk.retransmits,
                "agent_cpu_s": cpu.agent_s,
                "agent_cpu_s_per_gb": per_gb,
                "agent_user_cpu_s_per_gb": cpu.agent_user_s / (bulk.bytes as f64 / 1e9),
                "agent_cgroup_cpu_s": cpu.agent_cgroup_s,
                "client_pod_cpu_s": cpu.client_s,
                "server_pod_cpu_s": cpu.server_s,
                "host_busy_pct": cpu.host_busy_pct,
            });
        }
        for c in &cols {
            let before = CpuSnapshot::take(c)?;
            let conns = conn_rate(c, opts.seconds).with_context(|| format!("round {round}: {} connections", c.name))?;
            let cpu = CpuSnapshot::take(c)?.since(&before, ticks);
            let k = conns.count as f64 / 1000.0;
            let rate = conns.count as f64 / conns.seconds;
            eprintln!(
                "  round {round}/{n}: {:<6} conns {:>7.0} /s  agents {:.2} CPU-s ({:.3}/1000)  \
                 client loop {:.3} CPU-s/1000  host busy {:.0}%{}",
                c.name,
                rate,
                cpu.agent_s,
                cpu.agent_s / k,
                conns.cpu_s / k,
                cpu.host_busy_pct,
                conns.failures()
            );
            rec[c.name]["conn"] = json!({
                "per_s": rate,
                "connections": conns.count,
                "errors": conns.errors,
                "first_error": conns.first_error,
                "seconds": conns.seconds,
                "agent_cpu_s": cpu.agent_s,
                "agent_cpu_s_per_1000": cpu.agent_s / k,
                "client_loop_cpu_s": conns.cpu_s,
                "client_cpu_s_per_1000": conns.cpu_s / k,
                "agent_cgroup_cpu_s": cpu.agent_cgroup_s,
                "client_pod_cpu_s": cpu.client_s,
                "server_pod_cpu_s": cpu.server_s,
                "host_busy_pct": cpu.host_busy_pct,
            });
        }
        for c in &cols {
            let before = CpuSnapshot::take(c)?;
            let burst = conn_burst(c, &echo_bin, opts.seconds)
                .with_context(|| format!("round {round}: {} concurrent connections", c.name))?;
            let cpu = CpuSnapshot::take(c)?.since(&before, ticks);
            let k = burst.count as f64 / 1000.0;
            let rate = burst.count as f64 / burst.seconds;
            eprintln!(
                "  round {round}/{n}: {:<6} conns {:>7.0} /s ({BURST_CONCURRENCY} at once)  agents {:.2} CPU-s \
                 ({:.3}/1000)  host busy {:.0}%{}",
                c.name,
                rate,
                cpu.agent_s,
                cpu.agent_s / k,
                cpu.host_busy_pct,
                burst.failures()
            );
            rec[c.name]["burst"] = json!({
                "per_s": rate,
                "concurrency": BURST_CONCURRENCY,
                "connections": burst.count,
                "errors": burst.errors,
                "first_error": burst.first_error,
                "seconds": burst.seconds,
                "agent_cpu_s": cpu.agent_s,
                "agent_cpu_s_per_1000": cpu.agent_s / k,
                "client_cpu_s": burst.cpu_s,
                "host_busy_pct": cpu.host_busy_pct,
            });
        }
        raw.push(rec);
    }
    let mut capture = json!({});
    for (i, (m, c)) in meshes.iter().zip(&cols[1..]).enumerate() {
        let sum = |test: &str| -> u64 { raw.iter().filter_map(|r| r[c.name][test]["connections"].as_u64()).sum() };
        let direct = std::ptr::eq(m, first).then_some(cols[0].server);
        let mut v = verify_capture(c, direct, opts.rounds, sum("conn"), sum("burst"))?;
        v["agent_rss_kb"] = json!({
            "idle": idle_kb[i],
            "after": m.rss_kb("VmRSS")?,
            "peak": m.rss_kb("VmHWM")?,
        });
        capture[m.name] = v;
    }
    drop(servers);
    Ok((raw, capture))
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

/// Where the measured agent and waypoint are: `cargo xtask bench` runs the
/// image's (static musl) build, recorded with the numbers.
fn binaries() -> String {
    mesh::binary("agent")
        .ok()
        .and_then(|p| Some(p.parent()?.display().to_string()))
        .unwrap_or_default()
}

/// `a / b` with two decimals, or "n/a".
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && b.is_finite() && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "n/a".to_string()
    }
}

/// When and on what a report was made: both halves give it in their
/// header and JSON.
struct Machine<'a> {
    date: String,
    kernel: String,
    cores: usize,
    idle: &'a Idle,
}

impl<'a> Machine<'a> {
    fn now(idle: &'a Idle) -> Machine<'a> {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Machine {
            date: utc_now(),
            kernel: kernel.trim().to_string(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            idle,
        }
    }

    /// `<date>, kernel <release>, <n> cores, <idle setting>`.
    fn header(&self) -> String {
        format!(
            "{}, kernel {}, {} cores, {}",
            self.date,
            self.kernel,
            self.cores,
            self.idle.describe_run()
        )
    }

    /// A report's JSON object `doc`, led by `date`, `kernel`, `cores` and
    /// `idle` (serde_json keeps the order here: a dependency turns on its
    /// `preserve_order`).
    fn stamp(&self, doc: Value) -> Value {
        let mut out = json!({
            "date": self.date,
            "kernel": self.kernel,
            "cores": self.cores,
            "idle": self.idle.to_json(),
        });
        if let (Some(out), Value::Object(rest)) = (out.as_object_mut(), doc) {
            out.extend(rest);
        }
        out
    }
}

fn report(opts: &Opts, idle: &Idle, columns: &[&str], raw: &[Value], capture: Value, started: Instant) -> Result<()> {
    let machine = Machine::now(idle);
    let cores = machine.cores;
    let meshes = &columns[1..];
    // Ratio columns: each captured path to direct, and hbone to plain.
    let mut ratios: Vec<(&str, &str)> = meshes.iter().map(|m| (*m, "direct")).collect();
    if meshes.contains(&"plain") && meshes.contains(&"hbone") {
        ratios.push(("hbone", "plain"));
    }
    // Sockmap on against off, same path, same rounds.
    for (on, off) in [
        ("plainsm", "plain"),
        ("hbonesm", "hbone"),
        ("plainsk", "plain"),
        ("plainsk", "plains2"),
    ] {
        if meshes.contains(&on) && meshes.contains(&off) {
            ratios.push((on, off));
        }
    }
    // (label, key, decimals, whether <captured>/direct means something): the
    // agents are not on the direct path, their CPU there is idle housekeeping.
    let rows: [(&str, &str, usize, bool); 11] = [
        ("RTT p50 (us)", "rtt/p50_us", 1, true),
        ("RTT p99 (us)", "rtt/p99_us", 1, true),
        (
            "agent CPU-us per round trip",
            "rtt/agent_cpu_us_per_round_trip",
            1,
            false,
        ),
        ("bulk (Gb/s)", "bulk/gbps", 2, true),
        ("agent CPU-s/GB", "bulk/agent_cpu_s_per_gb", 3, false),
        ("agent user CPU-s/GB", "bulk/agent_user_cpu_s_per_gb", 3, false),
        ("new connections/s", "conn/per_s", 0, true),
        (
            "agent CPU-s per 1000 connections",
            "conn/agent_cpu_s_per_1000",
            3,
            false,
        ),
        (
            "client loop (Python) CPU-s per 1000 conn.",
            "conn/client_cpu_s_per_1000",
            3,
            true,
        ),
        ("new connections/s, 32 at once", "burst/per_s", 0, true),
        (
            "agent CPU-s per 1000 conn., 32 at once",
            "burst/agent_cpu_s_per_1000",
            3,
            false,
        ),
    ];
    let mut summary = json!({});
    let mut table = format!(
        "Pod to pod across two nodes, {}, median of {} rounds x {} s \
         ({} interleaved)\n\n| metric | {} | {} |\n|---|{}\n",
        machine.header(),
        opts.rounds,
        opts.seconds,
        columns.join(", "),
        columns.join(" | "),
        ratios
            .iter()
            .map(|(a, b)| format!("{a}/{b}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(columns.len() + ratios.len()),
    );
    for (label, key, decimals, comparable) in rows {
        let med = |col: &str| median_of(raw, &format!("/{col}/{key}"));
        let mut cells: Vec<String> = columns.iter().map(|c| format!("{:.decimals$}", med(c))).collect();
        for (a, b) in &ratios {
            cells.push(if comparable || *b != "direct" {
                ratio(med(a), med(b))
            } else {
                "n/a".to_string()
            });
        }
        table.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
        summary[key.replace('/', "_")] = columns.iter().map(|c| (c.to_string(), json!(med(c)))).collect();
    }
    for (what, label) in [("idle", "idle"), ("after", "after the run"), ("peak", "peak (VmHWM)")] {
        let mut cells = vec![String::new()];
        for m in meshes {
            let v: Vec<String> = capture[m]["agent_rss_kb"][what]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kb| format!("{:.1}", kb.as_f64().unwrap_or(0.0) / 1024.0))
                .collect();
            cells.push(v.join(" / "));
        }
        cells.extend(ratios.iter().map(|_| String::new()));
        table.push_str(&format!(
            "| agent RSS {label} (MB, node1 / node2) | {} |\n",
            cells.join(" | ")
        ));
    }
    let busy = |test: &str| {
        columns
            .iter()
            .map(|c| format!("{c} {:.0}%", median_of(raw, &format!("/{c}/{test}/host_busy_pct"))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let elapsed = started.elapsed().as_secs_f64();
    println!("{table}");
    println!(
        "Host CPU busy (of {cores} cores) during bulk: {}; during new connections: {}.\n\
         16-byte messages (sockperf ping-pong --tcp --full-rtt); one iperf3 stream; new connections = \
         one Python loop in the client pod, sequential connect + 1 byte each way + close against a \
         Python echo server (its own CPU is the last row: it bounds the direct column, and client, \
         server and agents share the {cores} cores); \"32 at once\" = mesh-echo connect-load, 32 such \
         connections in setup at once against mesh-echo tcp-echo. Agent CPU = utime+stime of both agents of the \
         column's cluster (in the direct column: their idle housekeeping, they are not on that path); \
         agent user CPU = their utime alone; per round trip = over the whole ping-pong, divided by the \
         replies of its whole run (warm-up included).",
        busy("bulk"),
        busy("conn")
    );
    let command = format!(
        "cargo xtask bench -- {}--mode {}{}{}{} --rounds {} --seconds {}{}",
        if opts.only == Only::L4 { "--only l4 " } else { "" },
        opts.mode.as_str(),
        if opts.sockmap { " --sockmap" } else { "" },
        if opts.to_app { " --sockmap-to-app" } else { "" },
        if opts.forward { " --sockmap-forward" } else { "" },
        opts.rounds,
        opts.seconds,
        idle.halt_poll_arg(),
    );
    println!("Reproduce: {command}");

    let doc = machine.stamp(json!({
        "binaries": binaries(),
        "mode": opts.mode.as_str(),
        "columns": columns,
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "message_bytes": MSG_SIZE,
        "elapsed_s": elapsed,
        "command": command,
        "median": summary,
        "capture_check": capture,
        "per_round": raw,
    }));
    let shown = write_json(&opts.json, &doc)?;
    println!("Raw numbers: {} (run took {elapsed:.0} s)", shown.display());
    Ok(())
}

/// Writes `doc` as pretty JSON to `path` (creating its directory); returns
/// the path to show.
fn write_json(path: &Path, doc: &Value) -> Result<PathBuf> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path.canonicalize().unwrap_or_else(|_| path.to_owned()))
}

/// The agents of `c`'s cluster must have carried every connection of the
/// column, the right way round and with the column's protocol, and none of
/// the direct ones (`direct`: the direct server if it is in that cluster);
/// otherwise the numbers describe another path than the column says.
fn verify_capture(c: &Column, direct: Option<&Pod>, rounds: usize, conns: u64, bursts: u64) -> Result<Value> {
    let hbone = c.mesh.ca.is_some();
    let protocol = if hbone { "hbone" } else { "tcp" };
    let client_id = format!("{TRUST_DOMAIN_NS}/{}", c.client.name);
    let server_id = format!("{TRUST_DOMAIN_NS}/{}", c.server.name);
    let server = c.server.ip4.to_string();
    let prefix = format!("{server}:");
    let want = |port: u16| format!("{server}:{port}");
    let carried = |logs: &[Value], dst: &str| logs.iter().filter(|l| l["dst"] == dst).count();
    // Each sockperf run is one connection, each iperf3 run at least two, and
    // every completed connection of the connection tests one.
    let enough = |logs: &[Value]| {
        carried(logs, &want(SOCKPERF_PORT)) >= rounds
            && carried(logs, &want(IPERF_PORT)) >= 2 * rounds
            && carried(logs, &want(ECHO_PORT)) as u64 >= conns
            && carried(logs, &want(BURST_PORT)) as u64 >= bursts
    };
    // A connection the agent could not carry (connect_failed, tunnel_failed,
    // no_certificate, a refused CONNECT, no original destination) means the
    // path was broken. `reset` or `error: ...` at the end is normal: sockperf
    // and iperf3 close with data in flight.
    let problem = |l: &Value, direction: &str| -> Option<String> {
        let result = l["result"].as_str().unwrap_or_default();
        let (src_id, dst_id) = (l["src_identity"].as_str(), l["dst_identity"].as_str());
        if !(result == "ok" || result == "reset" || result.starts_with("error: ")) {
            Some(format!("not carried: {result}"))
        } else if l["direction"] != direction {
            Some(format!("direction {}", l["direction"]))
        } else if l["protocol"] != protocol {
            Some(format!("protocol {} (expected {protocol})", l["protocol"]))
        } else if hbone && (src_id != Some(&client_id) || dst_id != Some(&server_id) || l["mtls"] != true) {
            Some(format!("identities {src_id:?} -> {dst_id:?}, mtls {}", l["mtls"]))
        } else {
            None
        }
    };
    let mut out = json!({ "protocol": protocol });
    for (a, direction) in c.mesh.agents.iter().zip(["outbound", "inbound"]) {
        let node = &a.node;
        let logs = a.wait_access(ACCESS_TIMEOUT, enough).with_context(|| {
            format!(
                "the {node} agent of the {} column did not carry all its connections to {server} \
                 ({rounds} sockperf, {} iperf3, {conns} + {bursts} new connections): \
                 the path was not captured, its numbers would be worthless",
                c.name,
                2 * rounds
            )
        })?;
        let mine: Vec<&Value> = logs
            .iter()
            .filter(|l| l["dst"].as_str().is_some_and(|d| d.starts_with(&prefix)))
            .collect();
        let bad: Vec<(String, &Value)> = mine
            .iter()
            .filter_map(|l| problem(l, direction).map(|p| (p, *l)))
            .collect();
        ensure!(
            bad.is_empty(),
            "the {node} agent of the {} column failed {} of {} connections, e.g. {:?}",
            c.name,
            bad.len(),
            mine.len(),
            &bad[..bad.len().min(3)]
        );
        if let Some(d) = direct {
            let sdirect = format!("{}:", d.ip4);
            let leaked: Vec<&Value> = logs
                .iter()
                .filter(|l| l["dst"].as_str().is_some_and(|d| d.starts_with(&sdirect)))
                .collect();
            ensure!(
                leaked.is_empty(),
                "the {node} agent captured {} direct-path connections, e.g. {:?}",
                leaked.len(),
                &leaked[..leaked.len().min(3)]
            );
        }
        let resets = mine.iter().filter(|l| l["result"] != "ok").count();
        let bytes: u64 = mine
            .iter()
            .map(|l| l["bytes_sent"].as_u64().unwrap_or(0) + l["bytes_received"].as_u64().unwrap_or(0))
            .sum();
        eprintln!(
            "capture check: {:<5} {node} agent carried {} {direction} {protocol} connections to {server} \
             ({resets} ended in an error such as a reset; together {:.2} GB logged)",
            c.name,
            mine.len(),
            bytes as f64 / 1e9
        );
        out[node] = json!({
            "direction": direction,
            "connections": mine.len(),
            "new_connections_measured": conns + bursts,
            "ended_in_error": resets,
            "bytes_logged": bytes,
        });
    }
    Ok(out)
}

struct Conns {
    count: u64,
    errors: u64,
    seconds: f64,
    cpu_s: f64,
    first_error: Option<String>,
}

impl Conns {
    /// `  N FAILED, first: ...` when any connection failed.
    fn failures(&self) -> String {
        match (&self.first_error, self.errors) {
            (Some(e), n) if n > 0 => format!("  {n} FAILED, first: {e}"),
            _ => String::new(),
        }
    }

    /// Runs a connection client (bounded) and reads the JSON report of
    /// its last line: connections, errors, seconds, cpu_s, first_error.
    fn run(cmd: Command, what: &str, seconds: u32) -> Result<Conns> {
        let out = run_bounded(cmd, Duration::from_secs(seconds.into()) + CLIENT_SLACK)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let doc: Value = serde_json::from_str(text.lines().last().unwrap_or_default()).with_context(|| {
            format!(
                "{what} printed no report ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let count = doc["connections"].as_u64().context("no connection count")?;
        ensure!(count > 0, "{what}: no connection completed: {doc}");
        Ok(Conns {
            count,
            errors: doc["errors"].as_u64().unwrap_or(0),
            seconds: doc["seconds"].as_f64().context("no duration")?,
            cpu_s: doc["cpu_s"].as_f64().unwrap_or(f64::NAN),
            first_error: doc["first_error"].as_str().map(str::to_string),
        })
    }
}

fn conn_rate(c: &Column, seconds: u32) -> Result<Conns> {
    let mut cmd = c.client.try_command("python3")?;
    cmd.args(["-c", CONN_CLIENT])
        .arg(c.server.ip4.to_string())
        .arg(ECHO_PORT.to_string())
        .arg(seconds.to_string());
    Conns::run(cmd, "the connection loop", seconds)
}

fn conn_burst(c: &Column, echo_bin: &str, seconds: u32) -> Result<Conns> {
    let mut cmd = c.client.try_command(echo_bin)?;
    cmd.args(["connect-load", "--addr"])
        .arg(format!("{}:{BURST_PORT}", c.server.ip4))
        .arg("--concurrency")
        .arg(BURST_CONCURRENCY.to_string())
        .arg("--seconds")
        .arg(seconds.to_string());
    Conns::run(cmd, "connect-load", seconds)
}

fn sockperf(r: &Column, seconds: u32) -> Result<testbed::sockperf::Rtt> {
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
    testbed::sockperf::parse(&text).with_context(|| format!("unexpected sockperf output:\n{text}"))
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

fn iperf3(r: &Column, seconds: u32) -> Result<Bulk> {
    let mut cmd = r.client.try_command("iperf3")?;
    cmd.arg("-c")
        .arg(r.server.ip4.to_string())
        .args(["-p", &IPERF_PORT.to_string(), "-t", &seconds.to_string()])
        .args(["-J", "--connect-timeout", "5000"]);
    let out = run_bounded(cmd, Duration::from_secs(seconds.into()) + CLIENT_SLACK)?;
    let doc = json_stdout("iperf3", &out)?;
    if let Some(e) = doc["error"].as_str() {
        bail!("iperf3: {e}");
    }
    ensure!(out.status.success(), "iperf3 failed ({}): {doc}", out.status);
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

/// The JSON document a tool printed on stdout (whatever its exit status:
/// some print their error in it).
fn json_stdout(tool: &str, out: &Output) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{tool} printed no JSON ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
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
        let name = Path::new(program)
            .file_name()
            .map_or(program.into(), |n| n.to_string_lossy());
        let log = dir.join(format!("{name}-{}.log", pod.name));
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

    /// SIGTERM and a bounded wait: a server with worker processes (nginx)
    /// stops them itself, where SIGKILL would leave them running until the
    /// cluster's cgroups are torn down.
    fn terminate(&mut self, within: Duration) -> Result<()> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        mesh::wait_bounded(&mut self.child, within).with_context(|| format!("stopping {}", self.what))?;
        Ok(())
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
    agent_user_ticks: u64,
    agent_cg_usec: u64,
    client_usec: u64,
    server_usec: u64,
    host: (u64, u64),
}

struct CpuUse {
    agent_s: f64,
    /// Of `agent_s`, the agents' own code (TLS, HTTP/2, copies): what a
    /// change to the agent moves, without the kernel's share that follows
    /// the scheduler.
    agent_user_s: f64,
    agent_cgroup_s: f64,
    client_s: f64,
    server_s: f64,
    host_busy_pct: f64,
}

impl CpuSnapshot {
    /// The agents of `r`'s cluster (their cgroups also hold its CA, if any), its pods, the host.
    fn take(r: &Column) -> Result<CpuSnapshot> {
        let agents = r
            .mesh
            .pids
            .iter()
            .map(|p| user_system_ticks(*p))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuSnapshot {
            agent_ticks: agents.iter().map(|(u, s)| u + s).sum(),
            agent_user_ticks: agents.iter().map(|(u, _)| u).sum(),
            agent_cg_usec: r.mesh.agent_cgroups.iter().map(|c| cgroup_usec(c)).sum(),
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
            agent_user_s: self.agent_user_ticks.saturating_sub(before.agent_user_ticks) as f64 / ticks,
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
