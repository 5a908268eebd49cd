//! `cargo xtask bench-kube [--pods N]`: what the Kubernetes source costs an
//! agent. A real agent watches the stand-in API server; the cluster grows to
//! N pods (10,000 by default) spread over 100 nodes and 100 ambient
//! namespaces, one Service + EndpointSlice per 10 pods; the agent must learn
//! them all (its config dump lists every workload and service). Prints the
//! agent's RSS before and after, per 1,000 pods, and the time to catch up;
//! beside it the anonymous part alone (heap and stacks: the pages of the
//! agent's program that handling pods faults back in are a fixed cost, not
//! one per pod) and the growth over the second half of the pods alone.
//!
//! `--enroll N [--measure M]`: enroll-to-capture (issue #11). N pods of the
//! agent's own node are enrolled through the CNI socket one after another,
//! then M more; each ADD is timed from the request to the agent's reply
//! (the pod captured). Every pod has a real network namespace and a
//! kubelet-style cgroup; the API server knows each pod before its ADD, as
//! it does when the kubelet creates the sandbox.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use testbed::{
    apiserver::{meta, ApiServer},
    mesh::{poll, Agent},
    procfs::{cpu_seconds, settled_rss_kb, status_kb, thread_cpu_seconds},
    Cluster, ClusterSpec, NodeSpec,
};

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 128 + i / 65536, (i / 256) % 256, i % 256)
}

fn pod(i: usize) -> Pod {
    pod_on(i, &format!("ns-{}", i % 100), &format!("node-{}", i % 100))
}

fn uid(i: usize) -> String {
    format!("00000000-0000-4000-9000-{i:012}")
}

fn pod_on(i: usize, ns: &str, node: &str) -> Pod {
    let app = format!("app-{}", i / 10);
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid(i)),
            // What real pods carry besides: owner, annotations (the agent's
            // projection drops them).
            annotations: Some(BTreeMap::from([(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "x".repeat(400),
            )])),
            ..meta(Some(ns), &format!("pod-{i}"), &[("app", &app), ("version", "v1")])
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            service_account_name: Some(app.clone()),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "app".into(),
                image: Some("registry.example/app:1.0".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip(i)),
            pod_ips: Some(vec![PodIP { ip: ip(i) }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn service(s: usize, ns: &str) -> (Service, EndpointSlice) {
    let name = format!("app-{s}");
    let svc = Service {
        metadata: meta(Some(ns), &name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", s / 256, s % 256)),
            selector: Some(BTreeMap::from([("app".to_string(), name.clone())])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let slice = EndpointSlice {
        metadata: meta(Some(ns), &format!("{name}-x"), &[("kubernetes.io/service-name", &name)]),
        address_type: "IPv4".into(),
        endpoints: (s * 10..s * 10 + 10)
            .map(|i| Endpoint {
                addresses: vec![ip(i)],
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    };
    (svc, slice)
}

fn counts(cluster: &Cluster) -> Result<(usize, usize)> {
    let out = cluster
        .node("node1")
        .try_command("curl")?
        .args(["-s", "http://127.0.0.1:15000/config_dump"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let n = |k: &str| v[k].as_array().map_or(0, Vec::len);
    Ok((n("workloads"), n("services")))
}

/// The agent's whole-model assemblies by trigger, and the seconds they took
/// (`seconds_sum`), from its metrics.
fn assemblies(cluster: &Cluster) -> Result<BTreeMap<String, f64>> {
    let (metrics, _) = testbed::mesh::node_get(cluster, "node1", "http://127.0.0.1:15020/metrics")?;
    let mut by = BTreeMap::new();
    for line in metrics.lines() {
        let (series, value) = line.rsplit_once(' ').unwrap_or_default();
        let key = if let Some(t) = series.strip_prefix("mesh_agent_model_assemblies_total{trigger=\"") {
            t.trim_end_matches("\"}")
        } else if series == "mesh_agent_model_assembly_seconds_sum" {
            "seconds_sum"
        } else {
            continue;
        };
        by.insert(key.to_string(), value.parse().context("metric value")?);
    }
    anyhow::ensure!(by.contains_key("seconds_sum"), "no assembly metrics from the agent");
    Ok(by)
}

/// The value of `--name N`, or `default`.
fn arg(args: &[String], name: &str, default: Option<usize>) -> Result<Option<usize>> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(Some(
            args.get(i + 1)
                .with_context(|| format!("{name} N"))?
                .parse()
                .with_context(|| format!("{name} takes a number"))?,
        )),
        None => Ok(default),
    }
}

/// The agent's resident memory (kB) once it has settled: all of it, its
/// heap and stacks (anonymous), and the pages of its program (file).
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
    file: u64,
}

impl Memory {
    fn read(pid: u32) -> Result<Self> {
        Ok(Self {
            rss: settled_rss_kb(pid)?,
            anon: status_kb(pid, "RssAnon")?,
            file: status_kb(pid, "RssFile")?,
        })
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// The shipped binaries' allocator (see agent/src/main.rs), here too, so that
// the benchmark's own load and echo processes are not slowed by musl's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    testbed::sweep_stale()?;
    if let Some(n) = arg(&args, "--enroll", None)? {
        let m = arg(&args, "--measure", Some(200))?.unwrap_or(200);
        return enroll(n, m);
    }
    let pods = arg(&args, "--pods", Some(10_000))?.unwrap_or(10_000);
    let cluster = Cluster::create("kscale", &ClusterSpec::new(vec![NodeSpec::new("node1", &[])]))?;
    let dir = cluster.scratch_dir()?;
    let api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "t")?;
    for n in 0..100 {
        api.apply(&Namespace {
            metadata: meta(None, &format!("ns-{n}"), &[("istio.io/dataplane-mode", "ambient")]),
            ..Default::default()
        })?;
    }
    let mut agent = Agent::start_kube(&cluster, "node1", &kubeconfig, &dir, &[])?;
    agent.wait_for("agent ready", Duration::from_secs(30))?;
    let pid = agent.pid().context("agent pid")?;
    let before = Memory::read(pid)?;
    // The control thread's CPU over the growth (watches, translations,
    // State): what a batch of changes costs the agent, which the catch-up
    // time (mostly the stand-in API server's and this program's) hides.
    let control_before = thread_cpu_seconds(pid, "control")?;

    // The cluster grows in two halves, RSS read after each: the second
    // half's growth is what a pod costs once the code that handles pods is
    // resident (the first half also faults back pages of the agent's own
    // program, unmapped when it went idle, which 1,000 more pods do not).
    let services = pods / 10;
    let half = pods / 2;
    let mut caught_up = Duration::ZERO;
    let mut at = Vec::new();
    for (from, to) in [(0, half), (half, pods)] {
        for i in from..to {
            api.apply(&pod(i))?;
        }
        for s in from / 10..to / 10 {
            let (svc, slice) = service(s, &format!("ns-{}", s * 10 % 100));
            api.apply(&svc)?;
            api.apply(&slice)?;
        }
        let start = Instant::now();
        let mut listed = (0, 0);
        let caught = poll(Duration::from_secs(300), || {
            listed = counts(&cluster)?;
            Ok((listed == (to, to / 10)).then_some(()))
        });
        if let Err(e) = caught {
            // What the next engineer needs: how far it got, whether it
            // still runs, and what it said last.
            let log = agent.raw_log();
            let lines: Vec<&str> = log.lines().collect();
            let state = if Path::new(&format!("/proc/{pid}")).exists() {
                "running"
            } else {
                "gone"
            };
            bail!(
                "{e}: the agent ({state}) lists {} of {to} pods and {} of {} services; its log ends:\n{}",
                listed.0,
                listed.1,
                to / 10,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        caught_up = start.elapsed();
        at.push(Memory::read(pid)?);
    }
    let control_cpu = thread_cpu_seconds(pid, "control")? - control_before;
    let (mid, after) = (at[0], at[1]);
    let per_1k = |a: u64, b: u64, n: usize| (mb(a.saturating_sub(b)) / (n as f64 / 1000.0) * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "pods": pods, "services": services, "nodes": 100, "namespaces": 100,
            "rss_before_mb": mb(before.rss), "rss_after_mb": mb(after.rss),
            "anon_before_mb": mb(before.anon), "anon_after_mb": mb(after.anon),
            "file_before_mb": mb(before.file), "file_after_mb": mb(after.file),
            "mb_per_1000_pods": per_1k(after.rss, before.rss, pods),
            "anon_mb_per_1000_pods": per_1k(after.anon, before.anon, pods),
            "second_half_mb_per_1000_pods": per_1k(after.rss, mid.rss, pods - half),
            "catch_up_s": caught_up.as_secs_f64(),
            "control_cpu_s": (control_cpu * 100.0).round() / 100.0,
        })
    );
    agent.terminate()?;
    Ok(())
}

/// Percentile `q` (0..=1) of sorted durations, in ms.
fn pct(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn summary(d: &mut [Duration]) -> serde_json::Value {
    d.sort();
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "adds": d.len(), "p50_ms": r(pct(d, 0.5)), "p90_ms": r(pct(d, 0.9)),
        "p99_ms": r(pct(d, 0.99)), "max_ms": r(pct(d, 1.0)),
    })
}

const BENCH_NS: &str = "bench";

/// Pods made and captured at once, as a node starts them: the API and the
/// cgroup know a pod shortly before its CNI ADD, not all pods long before.
const BATCH: usize = 10;

/// Pods `range` of node1, [`BATCH`] at a time: netns, kubelet-style
/// cgroup and API object; once the agent's model lists them, one CNI ADD
/// each, timed from request to reply. Every reply must say the pod is
/// captured.
fn enroll_pods(
    cluster: &Cluster,
    api: &ApiServer,
    socket: &Path,
    range: std::ops::Range<usize>,
) -> Result<Vec<Duration>> {
    let kubepods = cluster.node("node1").cgroup.join("kubepods/burstable");
    std::fs::create_dir_all(&kubepods)?;
    let mut took = Vec::with_capacity(range.len());
    let end = range.end;
    for first in range.step_by(BATCH) {
        let mut batch = Vec::new();
        for i in first..(first + BATCH).min(end) {
            let netns = cluster.add_bare_netns(&format!("p{i}"))?;
            std::fs::create_dir(kubepods.join(format!("pod{}", uid(i))))?;
            api.apply(&pod_on(i, BENCH_NS, "node1"))?;
            batch.push((i, netns));
        }
        let known = batch.last().map_or(0, |(i, _)| i + 1);
        poll(Duration::from_secs(60), || {
            Ok((counts(cluster)?.0 == known).then_some(()))
        })?;
        for (i, netns) in batch {
            took.push(add(socket, i, &netns)?);
        }
    }
    Ok(took)
}

/// One CNI ADD, timed from request to reply.
fn add(socket: &Path, i: usize, netns: &Path) -> Result<Duration> {
    use mesh_cni::proto::{call, Command, Request};
    let req = Request {
        command: Command::Add,
        container_id: format!("sandbox-{i}"),
        netns: netns.display().to_string(),
        pod_namespace: BENCH_NS.into(),
        pod_name: format!("pod-{i}"),
        pod_uid: uid(i),
        ips: vec![ip(i).parse()?],
    };
    let start = Instant::now();
    let reply = call(socket, &req, Duration::from_secs(30))?;
    let took = start.elapsed();
    anyhow::ensure!(reply.ok && reply.enrolled, "pod-{i} not captured: {}", reply.message);
    Ok(took)
}

fn enroll(n: usize, m: usize) -> Result<()> {
    let cluster = Cluster::create("kenroll", &ClusterSpec::new(vec![NodeSpec::new("node1", &[])]))?;
    let dir = cluster.scratch_dir()?;
    let api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "t")?;
    api.apply(&Namespace {
        metadata: meta(None, BENCH_NS, &[("istio.io/dataplane-mode", "ambient")]),
        ..Default::default()
    })?;
    let socket = dir.join("cni.sock");
    let sock = socket.to_str().context("socket path")?;
    let mut agent = Agent::start_kube(&cluster, "node1", &kubeconfig, &dir, &["--cni-socket", sock])?;
    agent.wait_for("agent ready", Duration::from_secs(30))?;
    let pid = agent.pid().context("agent pid")?;
    let idle = settled_rss_kb(pid)?;

    let start = Instant::now();
    let mut filling = enroll_pods(&cluster, &api, &socket, 0..n)?;
    let made = start.elapsed();
    let rss_n = settled_rss_kb(pid)?;
    let cpu_before = cpu_seconds(pid)?;
    let assembled_before = assemblies(&cluster)?;
    let mut measured = enroll_pods(&cluster, &api, &socket, n..n + m)?;
    let cpu_ms_per_add = (cpu_seconds(pid)? - cpu_before) * 1e3 / m.max(1) as f64;
    let mut assembled = assemblies(&cluster)?;
    for (k, v) in &mut assembled {
        *v -= assembled_before.get(k).copied().unwrap_or(0.0);
    }
    let enrolled = agent.logs().iter().filter(|l| l["message"] == "pod enrolled").count();
    anyhow::ensure!(enrolled == n + m, "{enrolled} pods enrolled, want {}", n + m);
    println!(
        "{}",
        serde_json::json!({
            "enrolled_before": n, "measured": summary(&mut measured),
            "while_filling": summary(&mut filling),
            "rss_idle_mb": idle as f64 / 1024.0, "rss_enrolled_mb": rss_n as f64 / 1024.0,
            "rss_per_enrolled_pod_kb": (rss_n.saturating_sub(idle)) as f64 / n.max(1) as f64,
            "fill_s": made.as_secs_f64(),
            "agent_cpu_ms_per_add_measured": (cpu_ms_per_add * 100.0).round() / 100.0,
            "model_assemblies_measured": assembled,
        })
    );
    agent.terminate()?;
    Ok(())
}
