//! `cargo xtask bench-kube [--pods N]`: what the Kubernetes source costs an
//! agent. A real agent watches the stand-in API server; the cluster grows to
//! N pods (10,000 by default) spread over 100 nodes and 100 ambient
//! namespaces, one Service + EndpointSlice per 10 pods; the agent must learn
//! them all (its config dump lists every workload and service). Prints the
//! agent's RSS before and after, per 1,000 pods, and the time to catch up.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
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
    Cluster, ClusterSpec, NodeSpec,
};

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 128 + i / 65536, (i / 256) % 256, i % 256)
}

fn pod(i: usize) -> Pod {
    let ns = format!("ns-{}", i % 100);
    let app = format!("app-{}", i / 10);
    Pod {
        metadata: ObjectMeta {
            uid: Some(format!("00000000-0000-4000-9000-{i:012}")),
            // What real pods carry besides: owner, annotations (the agent's
            // projection drops them).
            annotations: Some(BTreeMap::from([(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "x".repeat(400),
            )])),
            ..meta(Some(&ns), &format!("pod-{i}"), &[("app", &app), ("version", "v1")])
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % 100)),
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

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
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

// The shipped binaries' allocator (see agent/src/main.rs), here too, so that
// the benchmark's own load and echo processes are not slowed by musl's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let pods: usize = match args.iter().position(|a| a == "--pods") {
        Some(i) => args.get(i + 1).context("--pods N")?.parse()?,
        None => 10_000,
    };
    testbed::sweep_stale()?;
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
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.pid().context("agent pid")?;
    let before = rss_kb(pid)?;

    for i in 0..pods {
        api.apply(&pod(i))?;
    }
    let services = pods / 10;
    for s in 0..services {
        let (svc, slice) = service(s, &format!("ns-{}", s * 10 % 100));
        api.apply(&svc)?;
        api.apply(&slice)?;
    }
    let start = Instant::now();
    poll(Duration::from_secs(300), || {
        Ok((counts(&cluster)? == (pods, services)).then_some(()))
    })?;
    let caught_up = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kb(pid)?;
    let per_1k = (after.saturating_sub(before)) as f64 / 1024.0 / (pods as f64 / 1000.0);
    println!(
        "{}",
        serde_json::json!({
            "pods": pods, "services": services, "nodes": 100, "namespaces": 100,
            "rss_before_mb": before as f64 / 1024.0, "rss_after_mb": after as f64 / 1024.0,
            "mb_per_1000_pods": (per_1k * 100.0).round() / 100.0,
            "catch_up_s": caught_up.as_secs_f64(),
        })
    );
    agent.terminate()?;
    Ok(())
}
