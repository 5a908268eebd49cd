//! `agent run --bpf-log`: the kernel programs' decisions (aya-log) reach the
//! agent's log through tracing, and only when asked for.
use anyhow::Result;
use serde_json::Value;
use testbed::mesh::{self, Agent, Server, Settings};

use super::{succeeded, World, APP_PORT, ENROLLED, WAIT};

const EXCLUDED_PORT: u16 = 9090;

/// The log lines that came from the kernel programs.
fn kernel_lines(a: &Agent) -> Vec<String> {
    a.logs()
        .iter()
        .filter(|l| l["target"] == "bpf")
        .filter_map(|l| l["message"].as_str().map(str::to_string))
        .collect()
}

fn has(lines: &[String], parts: &[&str]) -> bool {
    lines.iter().any(|l| parts.iter().all(|p| l.contains(p)))
}

#[test]
fn bpf_log_gives_the_reason_of_a_captured_and_a_skipped_connect_only_with_the_flag() -> Result<()> {
    let w = World::new("bpflog")?;
    let settings = Settings {
        exclude_ports: vec![EXCLUDED_PORT],
        ..Settings::default()
    };
    mesh::write_config(&w.cluster, &w.config, ENROLLED, &settings)?;
    let _backend = Server::start(w.cluster.pod("backend"), &[APP_PORT, EXCLUDED_PORT])?;
    let backend = w.ip4("backend");
    let (captured, skipped) = (format!("{backend}]:{APP_PORT}"), format!("{backend}]:{EXCLUDED_PORT}"));

    let mut a = Agent::start(&w.cluster, "node1", &w.config, &w.dir, &["--bpf-log"])?;
    a.wait_for("agent ready", WAIT)?;
    assert!(succeeded(&w.once("client", &backend, APP_PORT)?));
    assert!(succeeded(&w.once("client", &backend, EXCLUDED_PORT)?));
    let lines = mesh::poll(WAIT, || {
        let lines = kernel_lines(&a);
        let both = has(&lines, &["connect4", &captured, "redirected to the agent"])
            && has(&lines, &["connect4", &skipped, "excluded port: pass"]);
        Ok(both.then_some(lines))
    })
    .map_err(|e| anyhow::anyhow!("{e}: kernel lines: {:#?}", kernel_lines(&a)))?;
    // The original destination reached the agent too (sockops).
    assert!(
        has(&lines, &["sockops", "original destination published"]),
        "{lines:#?}"
    );
    let line: &Value = &a.logs().into_iter().find(|l| l["target"] == "bpf").unwrap();
    assert_eq!(line["bpf_level"], "DEBUG", "{line}");
    a.terminate()?;

    // Without the flag the next agent's programs log nothing: the same two
    // connects, and once the captured one is in the access log (after the
    // programs ran), no kernel line.
    let b = w.agent("node1")?;
    assert!(succeeded(&w.once("client", &backend, APP_PORT)?));
    assert!(succeeded(&w.once("client", &backend, EXCLUDED_PORT)?));
    b.wait_access(WAIT, |l| l.len() == 1)?;
    assert_eq!(kernel_lines(&b), Vec::<String>::new());
    Ok(())
}
