//! `cargo xtask soak [--quick] [--connections N] [--bytes N] [--streams N]
//! [--cert-lifetime S] [--probe N] [--json PATH]`: the mesh under long
//! load and faults, on the Kubernetes source with HBONE between two nodes
//! (see `world.rs` for the layout). Not part of CI. Every phase is bounded
//! and the run stops by itself; it ends with a table and a JSON report
//! (`target/soak/soak.json`) and exits non-zero when a phase failed or any
//! data was lost.
//!
//! Phases, in order, with N connections held (and proven by an echo round
//! trip on each) through all of them but the kill:
//! 1. hold: N concurrent connections c* -> srv1/srv2 through the agents (HBONE);
//!    the agents' RSS at the peak;
//! 2. bulk: `--bytes` in `--streams` echoed streams, SHA-256 of what was sent,
//!    of the echo, and the server's own, compared; connect loops run meanwhile;
//! 3. handover: a new node1 agent, then SIGTERM to the old one, under the
//!    loops and a stream: zero failed connects; the held connections keep
//!    echoing through the draining agent and close with matching checksums;
//! 4. kill -9 of node1's agent under the loops: new connects from the
//!    enrolled pods are refused (fail closed: none gets through around the
//!    agent); a restarted agent resumes from its pins;
//! 5. CA stopped across a renewal (certificates of `--cert-lifetime`):
//!    the renewal fails, the old certificate stays in use (connects succeed
//!    until shortly before expiry); then, still without the CA, past the
//!    expiry (reported: new connects fail closed); the CA back, renewal
//!    resumes (new serials);
//! 6. API server stopped and started under the loops and a stream: traffic
//!    flows on the last good state; afterwards a new pod is enrolled.
//!
//! The wire between the nodes is captured for the whole run: the payload
//! marker must never appear in it, while a control pair outside the mesh
//! sends its own marker in plaintext and must appear (the capture works).
mod phases;
mod report;
mod worker;
mod world;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use testbed::{args::Args, mesh};

use phases::{
    apiserver_phase, bulk_phase, ca_phase, final_phase, handover_phase, hold_phase, kill_phase, Phase, PROBE_TIMEOUT,
};
use report::{print_table, summary, wire_check, write_report};
use world::Soak;

const USAGE: &str = "usage: mesh-soak [--quick] [--connections N] [--bytes N[KMG]] [--streams N]
                 [--cert-lifetime SECONDS] [--probe N] [--dwell SECONDS] [--json PATH]
  --quick            smoke run: 200 connections, 16 MiB (overridable by the flags after it)
  --connections N    connections held through the run (default 10000)
  --bytes N          bytes of the bulk phase, K/M/G suffixes (default 1G = 1 GiB)
  --streams N        parallel streams of the bulk phase (default 4)
  --cert-lifetime S  workload certificate lifetime in seconds (default 40; renewal at half)
  --probe N          new connects per client pod in each probe (default 50)
  --dwell S          seconds the load runs before, during and after each fault (default 10)
  --json PATH        the report (default <workspace>/target/soak/soak.json)
A full run holds /tmp/bench.lock (benchmarks wait for it); --quick does not.
Set MESH_KEEP_LOGS=1 to keep the agents' logs and the wire capture.";

#[derive(Debug, Clone)]
pub struct Opts {
    pub connections: usize,
    pub bytes: u64,
    pub streams: usize,
    pub cert_lifetime_s: u64,
    pub probe: u64,
    /// How long the load runs before, during and after each fault.
    pub dwell: Duration,
    pub json: PathBuf,
    pub quick: bool,
}

fn main() {
    testbed::signals::program_main(
        "mesh-soak",
        USAGE,
        "the soak cluster",
        || parse_args(std::env::args().skip(1)),
        soak,
    )
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>> {
    let mut o = Opts {
        connections: 10_000,
        bytes: 1 << 30,
        streams: 4,
        cert_lifetime_s: 40,
        probe: 50,
        dwell: Duration::from_secs(10),
        json: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak/soak.json"),
        quick: false,
    };
    let mut args = Args::new(args);
    while let Some(key) = args.next_key() {
        match key.as_str() {
            "--" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--quick" => {
                o.quick = true;
                o.connections = 200;
                o.bytes = 16 << 20;
                o.streams = 2;
                o.probe = 10;
                o.dwell = Duration::from_secs(2);
            }
            "--connections" => o.connections = args.number(1..=60_000)? as usize,
            "--bytes" => o.bytes = bytes(&args.value()?)?,
            "--streams" => o.streams = args.number(1..=64)? as usize,
            "--cert-lifetime" => o.cert_lifetime_s = args.number(20..=3600)?,
            "--probe" => o.probe = args.number(1..=10_000)?,
            "--dwell" => o.dwell = Duration::from_secs(args.number(1..=600)?),
            "--json" => o.json = PathBuf::from(args.value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(o))
}

/// `1073741824`, `1G`, `512M`, `64K`.
fn bytes(v: &str) -> Result<u64> {
    let (digits, shift) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("--bytes {v:?}"))?;
    ensure!(n > 0 && n << shift >> shift == n, "--bytes {v:?} out of range");
    Ok(n << shift)
}

/// Benchmarks on the shared machine do not run while it exists.
const BENCH_LOCK: &str = "/tmp/bench.lock";

/// `/tmp/bench.lock` while a full run goes on; removed on drop and on a signal.
struct BenchLock(PathBuf);

impl BenchLock {
    fn take() -> Result<BenchLock> {
        let path = PathBuf::from(BENCH_LOCK);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("{BENCH_LOCK} exists: a benchmark or soak is running; wait for it"))?;
        use std::io::Write;
        writeln!(f, "mesh-soak pid {}", std::process::id())?;
        testbed::signals::remove_when_interrupted(path.clone());
        Ok(BenchLock(path))
    }
}

impl Drop for BenchLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn soak(opts: &Opts) -> Result<bool> {
    let _lock = (!opts.quick).then(BenchLock::take).transpose()?;
    let nofile = raise_nofile(opts.connections)?;
    mesh::binary("agent")?;
    testbed::sweep_stale()?;
    let started = Instant::now();
    eprintln!(
        "mesh-soak: {} connections, {} bytes in {} streams, certificates of {} s, open files {nofile}",
        opts.connections, opts.bytes, opts.streams, opts.cert_lifetime_s
    );
    let mut s = Soak::build(opts)?;
    let mut phases = Vec::new();
    let mut aborted = None;
    let control = s.control.call(json!({"op": "probe", "n": 3}), PROBE_TIMEOUT)?;
    ensure!(control["tally"]["ok"] == 3, "the control pair cannot talk: {control}");
    type Step = fn(&mut Soak, &Opts, &mut Phase) -> Result<()>;
    let steps: [(&'static str, Option<&'static str>, Step); 7] = [
        ("hold", None, hold_phase),
        ("bulk", None, bulk_phase),
        ("handover", Some("graceful agent handover"), handover_phase),
        ("kill9", Some("agent kill -9"), kill_phase),
        ("ca", Some("CA stopped across a renewal"), ca_phase),
        ("apiserver", Some("API server restart"), apiserver_phase),
        ("final", None, final_phase),
    ];
    for (name, fault, step) in steps {
        if testbed::signals::interrupted() {
            bail!("interrupted");
        }
        eprintln!("== {name}");
        let t = Instant::now();
        let mut p = Phase::new(name, fault);
        if let Err(e) = step(&mut s, opts, &mut p) {
            p.problems.push(format!("{e:#}"));
            aborted = Some(name);
        }
        p.seconds = t.elapsed().as_secs_f64();
        phases.push(p);
        if aborted.is_some() {
            break;
        }
    }
    let wire = wire_check(&mut s)?;
    let report = summary(opts, &phases, wire, started, aborted);
    write_report(opts, &report)?;
    print_table(&phases, &report);
    Ok(report["passed"] == true)
}

/// The agents and the clients inherit it: 10,000 connections are 10,000+
/// descriptors in the node2 agent and in the echo. Raised as far as this
/// process may (a container may keep the hard limit: then up to that).
fn raise_nofile(connections: usize) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const WANT: u64 = 1 << 18;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_ok() {
        WANT
    } else {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        hard
    };
    // The echo's descriptors: every held connection, the loops', a margin.
    let need = connections as u64 + 2000;
    ensure!(
        limit >= need,
        "{connections} connections need an open-file limit of {need}, this process may have {limit}: raise the hard limit (ulimit -Hn) or lower --connections"
    );
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Opts {
        parse_args(args.iter().map(|s| s.to_string())).unwrap().unwrap()
    }

    #[test]
    fn defaults_are_the_issues_figures_and_quick_is_small() {
        let o = parse(&[]);
        assert_eq!((o.connections, o.bytes), (10_000, 1 << 30));
        let q = parse(&["--", "--quick", "--connections=300"]);
        assert_eq!((q.connections, q.bytes, q.quick), (300, 16 << 20, true));
    }

    #[test]
    fn byte_counts_take_suffixes_and_refuse_nonsense() {
        assert_eq!(bytes("512M").unwrap(), 512 << 20);
        assert_eq!(bytes("1G").unwrap(), 1 << 30);
        assert_eq!(bytes("4096").unwrap(), 4096);
        assert!(bytes("0").is_err() && bytes("1T").is_err() && bytes("99999999999G").is_err());
        assert!(parse_args(["--connections", "0"].iter().map(|s| s.to_string())).is_err());
    }
}
