//! Upgrades and downgrades of the kernel programs under continuous traffic:
//! release A, then the "next release" (`agent-next`: a changed program and a
//! changed map layout, STATS -> STATS_V2), then A again, each as a graceful
//! handover (the new agent starts beside the old one, then the old one gets
//! SIGTERM), as a DaemonSet rolls.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testbed::mesh::{self, Agent, Server};

use super::{access_to, stat, World, APP_PORT, WAIT};

/// The pinned links of an agent: link pin name -> id of the program it runs,
/// as the kernel reports it (bpftool, not the agent).
fn attached(pin_name: &str) -> Result<BTreeMap<String, u64>> {
    let dir = Path::new(mesh::BPFFS).join(pin_name).join("v1/links");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let link = bpftool(&["link", "show", "pinned", path.to_str().context("utf-8 path")?])?;
        let name = path.file_name().context("file name")?.to_string_lossy().into_owned();
        out.insert(name, link["prog_id"].as_u64().context("link without prog_id")?);
    }
    Ok(out)
}

/// The names of the maps program `id` uses.
fn maps_of(id: u64) -> Result<Vec<String>> {
    let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
    let ids = prog["map_ids"].as_array().context("program without map_ids")?;
    ids.iter()
        .map(|m| {
            let map = bpftool(&["map", "show", "id", &m.to_string()])?;
            Ok(map["name"].as_str().context("map without name")?.to_string())
        })
        .collect()
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    if !out.status.success() {
        bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Every link runs another program than before, and the outbound hook's
/// program uses the counters map `stats` (not the other release's).
fn assert_swapped(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, stats: &str) -> Result<()> {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same links stay pinned"
    );
    for (link, id) in after {
        assert_ne!(
            before[link], *id,
            "link {link} still runs program {id}: {before:?} -> {after:?}"
        );
    }
    let maps = maps_of(after["cg_mesh_connect4"])?;
    let other = if stats == "STATS" { "STATS_V2" } else { "STATS" };
    assert!(
        maps.iter().any(|m| m == stats) && !maps.iter().any(|m| m == other),
        "connect4 should use {stats}: {maps:?}"
    );
    Ok(())
}

/// The agent's access log has a connection to `dst` (the stream reached it).
fn carried(agent: &Agent, dst: &str) -> Result<()> {
    agent.wait_access(WAIT, |l| !access_to(l, dst).is_empty()).map(drop)
}

fn next_agent() -> Result<PathBuf> {
    mesh::binary("agent-next").context(
        "the upgrade test needs the next-layout agent: run `cargo xtask build-ebpf && cargo xtask build-next` (cargo xtask test does)",
    )
}

#[test]
fn upgrade_and_downgrade_swap_programs_and_maps_without_a_failed_or_uncaptured_connect() -> Result<()> {
    next_agent()?;
    let w = World::new("upgrade")?;
    let _backend = Server::start(w.cluster.pod("backend"), &[APP_PORT])?;
    // An app in the enrolled pod, for the inbound stream (sk_lookup).
    let _app = Server::start(w.cluster.pod("client"), &[APP_PORT])?;
    let out_dst = format!("{}:{APP_PORT}", w.ip4("backend"));
    let in_dst = format!("{}:{APP_PORT}", w.ip4("client"));

    let mut a = w.agent("node1")?;
    let pins = a.pin_name.clone();
    let v1 = attached(&pins)?;
    assert_eq!(v1.len(), 6, "five cgroup links and the client's sk_lookup: {v1:?}");
    assert!(maps_of(v1["cg_mesh_connect4"])?.contains(&"STATS".to_string()));

    // Two streams of new connections for the whole test: the enrolled pod
    // dialling out, and an outsider dialling into the enrolled pod.
    let stop = w.dir.join("stop-streams");
    let stream_args = [
        "--count",
        "4000",
        "--interval",
        "0.01",
        "--stop-file",
        stop.to_str().unwrap(),
    ];
    let out_stream = mesh::spawn_client(
        w.cluster.pod("client"),
        "loop",
        &w.ip4("backend"),
        APP_PORT,
        &stream_args,
    )?;
    let in_stream = mesh::spawn_client(
        w.cluster.pod("outsider"),
        "loop",
        &w.ip4("client"),
        APP_PORT,
        &stream_args,
    )?;
    carried(&a, &out_dst)?;
    carried(&a, &in_dst)?;

    // Upgrade: the next release starts beside A and swaps its programs in
    // (new counters map beside the old one); then A leaves.
    let mut b = Agent::start_bin("agent-next", &w.cluster, "node1", &w.config, &w.dir, &[])?;
    b.wait_for("agent ready", WAIT * 2)?;
    let v2 = attached(&pins)?;
    assert_swapped(&v1, &v2, "STATS_V2")?;
    a.signal_term();
    assert!(a.wait_exit(WAIT * 2)?.success());
    carried(&b, &out_dst)?;
    carried(&b, &in_dst)?;
    // One pass later the old counters are carried over and unpinned.
    b.wait_for("unpinned a map no attached program uses (another release's)", WAIT)?;
    let mid = mesh::status(&pins)?;
    assert!(mid["maps"].as_array().unwrap().contains(&"STATS_V2".into()), "{mid}");
    assert!(!mid["maps"].as_array().unwrap().contains(&"STATS".into()), "{mid}");

    // Downgrade: A again, the same way.
    let mut a2 = w.agent("node1")?;
    let v3 = attached(&pins)?;
    assert_swapped(&v2, &v3, "STATS")?;
    b.signal_term();
    assert!(b.wait_exit(WAIT * 2)?.success());
    carried(&a2, &out_dst)?;
    carried(&a2, &in_dst)?;
    a2.wait_for("unpinned a map no attached program uses (another release's)", WAIT)?;

    std::fs::write(&stop, "")?;
    let out = mesh::client_report(out_stream)?;
    let inb = mesh::client_report(in_stream)?;
    for r in [&out, &inb] {
        assert_eq!(
            r["failed"], 0,
            "no connect may fail across an upgrade and a downgrade: {r}"
        );
        // It ran through all three agents (checked above with their logs).
        assert!(r["ok"].as_u64().unwrap() >= 3, "{r}");
    }

    // Zero uncaptured: every connection the clients made was carried by
    // exactly one of the three agents (the last one logs its last
    // connections as they close: wait for them).
    let before: Vec<Value> = [&a, &b].iter().flat_map(|x| x.access_logs()).collect();
    let (out_ok, in_ok) = (
        out["ok"].as_u64().unwrap() as usize,
        inb["ok"].as_u64().unwrap() as usize,
    );
    let (out_before, in_before) = (access_to(&before, &out_dst).len(), access_to(&before, &in_dst).len());
    let counted = a2.wait_access(WAIT, |l| {
        access_to(l, &out_dst).len() + out_before >= out_ok && access_to(l, &in_dst).len() + in_before >= in_ok
    });
    let last = a2.access_logs();
    assert_eq!(
        access_to(&last, &out_dst).len() + out_before,
        out_ok,
        "outbound {out} ({counted:?})"
    );
    assert_eq!(access_to(&last, &in_dst).len() + in_before, in_ok, "inbound {inb}");
    // ...and the kernel redirected each outbound connect once, counted
    // across three map layouts (counters carried over at each swap).
    let end = mesh::status(&pins)?;
    assert_eq!(stat(&end, "outbound_redirected"), out["ok"].as_u64().unwrap(), "{end}");
    assert!(!end["maps"].as_array().unwrap().contains(&"STATS_V2".into()), "{end}");
    Ok(())
}
