//! The end of a run: the wire capture searched, the summary (JSON file and
//! table).
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use testbed::wire;

use crate::{
    phases::Phase,
    world::{Soak, CONTROL, MARKER},
    Opts,
};

/// Stops the capture and searches it: the payload marker never, the control's.
pub fn wire_check(s: &mut Soak) -> Result<Value> {
    let stats = s.capture.stop()?;
    let file = s.capture.file().to_path_buf();
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let marker = wire::occurrences(&file, MARKER.as_bytes())?;
    let control = wire::occurrences(&file, CONTROL.as_bytes())?;
    Ok(json!({
        "capture_bytes": size,
        "packets_captured": stats.captured,
        "packets_dropped": stats.dropped_by_kernel,
        "payload_marker_seen": marker,
        "control_marker_seen": control,
    }))
}

pub fn summary(opts: &Opts, phases: &[Phase], wire: Value, started: Instant, aborted: Option<&str>) -> Value {
    let peak = phases.iter().map(|p| p.held_alive).max().unwrap_or(0);
    let end = phases.iter().find(|p| p.name == "final").map_or(0, |p| p.held_alive);
    let lost: u64 = phases.iter().map(|p| p.data_lost_bytes).sum();
    let verified: u64 = phases.iter().map(|p| p.bytes_verified).sum();
    let faults: Vec<&str> = phases.iter().filter_map(|p| p.fault).collect();
    let survived: Vec<&str> = phases
        .iter()
        .filter(|p| p.fault.is_some() && p.problems.is_empty())
        .filter_map(|p| p.fault)
        .collect();
    let wire_ok = wire["payload_marker_seen"] == 0 && wire["control_marker_seen"].as_u64() > Some(0);
    let problems: usize = phases.iter().map(|p| p.problems.len()).sum();
    let at_peak = phases
        .iter()
        .find(|p| p.name == "hold")
        .map(|p| p.facts["agents_at_peak"].clone());
    json!({
        "date": utc_now(),
        "commit": commit(),
        "quick": opts.quick,
        "connections_wanted": opts.connections,
        "connections_held_peak": peak,
        "connections_alive_at_end": end,
        "bytes_wanted": opts.bytes,
        "bytes_verified": verified,
        "faults_injected": faults,
        "faults_survived": survived,
        "data_lost_bytes": lost,
        "agents_at_peak": at_peak,
        "connects": phases.iter().map(|p| (p.name, p.connects.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "wire": wire,
        "aborted_in": aborted,
        "duration_s": started.elapsed().as_secs(),
        "passed": problems == 0 && lost == 0 && wire_ok && aborted.is_none() && end == opts.connections as u64,
        "phases": phases,
    })
}

pub fn write_report(opts: &Opts, report: &Value) -> Result<()> {
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", opts.json.display()))?;
    eprintln!("report: {}", opts.json.display());
    Ok(())
}

pub fn print_table(phases: &[Phase], r: &Value) {
    println!(
        "\n{:<10} {:>7} {:>9} {:>8} {:>7} {:>11} {:>9}  problems",
        "phase", "secs", "connects", "failed", "held", "verified B", "lost B"
    );
    for p in phases {
        println!(
            "{:<10} {:>7.1} {:>9} {:>8} {:>7} {:>11} {:>9}  {}",
            p.name,
            p.seconds,
            p.connects.ok,
            p.connects.failed(),
            p.held_alive,
            p.bytes_verified,
            p.data_lost_bytes,
            p.problems.len()
        );
        for problem in &p.problems {
            println!("    - {problem}");
        }
    }
    let mib = |node: &str| r["agents_at_peak"][node]["rss_kb"].as_u64().unwrap_or(0) / 1024;
    println!(
        "\nconnections held: {} peak, {} alive at the end (echo on each)\nbytes verified:   {} (SHA-256 on both ends)\nfaults survived:  {} of {} {}\ndata lost:        {} bytes\nagent RSS at peak: node1 {} MiB (source), node2 {} MiB, node3 {} MiB\nwire: payload marker seen {} times, control marker {} times, {} packets dropped\nduration: {} s — {}",
        r["connections_held_peak"],
        r["connections_alive_at_end"],
        r["bytes_verified"],
        r["faults_survived"].as_array().map_or(0, Vec::len),
        r["faults_injected"].as_array().map_or(0, Vec::len),
        r["faults_survived"],
        r["data_lost_bytes"],
        mib("node1"),
        mib("node2"),
        mib("node3"),
        r["wire"]["payload_marker_seen"],
        r["wire"]["control_marker_seen"],
        r["wire"]["packets_dropped"],
        r["duration_s"],
        if r["passed"] == true { "PASSED" } else { "FAILED" }
    );
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
