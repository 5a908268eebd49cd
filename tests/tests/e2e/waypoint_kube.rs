//! Controller, waypoint pods and agents together on the stand-in API
//! server, nothing configured by hand but what a user applies: a waypoint
//! Gateway as `waypoint generate` prints it and a Service labelled to use
//! it. The real `waypoint controller` (with the deploy manifest's waypoint
//! command line) makes the Deployment; the test plays the ReplicaSet
//! controller and the kubelet and runs its two replicas from the pod
//! template as real `waypoint run --kubernetes` processes in pods of both
//! nodes (projected token for the CA, the controller's root ConfigMap,
//! in-cluster API credentials of their own); the real agents (Kubernetes
//! source, certificates from the CA checking tokens with TokenReview) steer
//! the client pod's HTTP requests to Service web through the waypoint.
//!
//!   node1: client (enrolled), wp1 (replica of waypoint wp)
//!   node2: web (enrolled, echo backend), wp2 (replica of waypoint wp)
//!   wire:  the stand-in API server; node1: the CA
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use testbed::{
    apiserver::ApiServer,
    mesh::{self, poll, Agent, MeshCa, Server},
    waypoint::WaypointPod,
    Cluster, ClusterSpec, NodeSpec,
};

use crate::{
    controller::{
        condition, deployment_available, generate, grants, message, repo, wait_condition, wait_object_condition,
        Controller, BOUND,
    },
    kube::{namespace, node, pod, run_pod_app, run_pod_app_on, web_service, Apps},
    steering::wait_binding,
    waypoint::{curl, requests},
    APP_PORT, WAIT,
};

const VIP: &str = "10.96.0.10";
const GW: &str = "gateway.networking.k8s.io/v1";
const WP_ID: &str = "spiffe://cluster.local/ns/apps/sa/wp";
/// The testbed pods the replicas run in, and their Pod objects' names.
const REPLICAS: [(&str, &str); 2] = [("wp1", "wp-6b8f9d7c4-x2k9p"), ("wp2", "wp-6b8f9d7c4-q7m4t")];

/// The waypoint command line of the deploy manifest's controller
/// (`--waypoint-arg=...`), with the CA at `ca_address` (no cluster DNS here).
fn deployed_waypoint_args(ca_address: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(repo().join("deploy/waypoint-controller.yaml"))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v["kind"] != "Deployment" {
            continue;
        }
        let command: Vec<String> =
            serde_yaml::from_value(v["spec"]["template"]["spec"]["containers"][0]["command"].clone())?;
        return Ok(command
            .into_iter()
            .filter(|w| w.starts_with("--waypoint-arg="))
            .map(|w| w.replace("https://mesh-ca.mesh-system.svc:15012", ca_address))
            .collect());
    }
    anyhow::bail!("no Deployment in deploy/waypoint-controller.yaml")
}

#[test]
fn controller_waypoint_pods_and_agents_together_carry_http_through_the_waypoint() -> Result<()> {
    let started = Instant::now();
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["client", "wp1"]),
        NodeSpec::new("node2", &["web", "wp2"]),
    ]);
    let cluster = Cluster::create("wpkube", &spec)?;
    let dir = cluster.scratch_dir()?;
    let api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = |token: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(format!("{token}.kubeconfig"));
        api.write_kubeconfig(&p, token)?;
        Ok(p)
    };

    // The cluster: an ambient namespace, its nodes, client and web (kubelet
    // layout, found by UID), Service web and its EndpointSlice.
    api.apply(&namespace("apps", true))?;
    api.apply(&node(&cluster, "node1"))?;
    api.apply(&node(&cluster, "node2"))?;
    api.apply(&pod(&cluster, "client", "apps", &[("app", "client")], true))?;
    api.apply(&pod(&cluster, "web", "apps", &[("app", "web")], true))?;
    let (mut web, slice) = web_service();
    api.apply(&web)?;
    api.apply(&slice)?;
    let _apps = Apps(vec![
        run_pod_app(&cluster, "client")?,
        run_pod_app_on(&cluster, "web", &["9090"])?,
    ]);
    let _echo = Server::echo(cluster.pod("web"), APP_PORT)?;

    // The mesh: the CA (TokenReview for the waypoints' tokens) and one agent
    // per node with the Kubernetes source.
    let ca = MeshCa::start_kube(&cluster, "node1", &dir.join("ca"), &kubeconfig("ca-token")?)?;
    let mut agents = Vec::new();
    for n in ["node1", "node2"] {
        let ca_args = ca.client_args(n);
        let args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
        agents.push(Agent::start_kube(
            &cluster,
            n,
            &kubeconfig("agent-token")?,
            &dir,
            &args,
        )?);
    }
    for a in &mut agents {
        a.wait_for("agent ready", WAIT)?;
    }

    // What the user applies: the waypoint, and the label that binds web to it.
    let root = ca.dir.join("root-cert.pem");
    let args = deployed_waypoint_args(&ca.address)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let in_node1 = cluster.node("node1").try_command(mesh::binary("waypoint")?)?;
    let ctl = Controller::start_args(in_node1, &dir, &kubeconfig("controller-token")?, &root, &args)?;
    api.apply(&generate(&["--name", "wp", "-n", "apps"])?[0])?;
    web.metadata
        .labels
        .get_or_insert_default()
        .insert("istio.io/use-waypoint".into(), "wp".into());
    api.apply(&web)?;

    // The ReplicaSet controller and the kubelet: the Deployment's replicas,
    // each ready once its readiness probe says so; then the Deployment's status.
    let deployment = poll(WAIT, || Ok(api.get("apps/v1", "Deployment", "apps", "wp")))
        .with_context(|| format!("no Deployment\n{}", ctl.log()))?;
    ensure!(deployment["spec"]["replicas"] == REPLICAS.len(), "{deployment}");
    let waypoints = REPLICAS
        .iter()
        .map(|(pod, name)| WaypointPod::start_replica(&cluster, &api, &deployment, pod, name, &dir))
        .collect::<Result<Vec<_>>>()?;
    deployment_available(&api, "apps", "wp", REPLICAS.len() as u32)?;

    // The Gateway is programmed, the Service bound, and the client's agent
    // steers web's VIP to the waypoint.
    wait_condition(&api, "apps", "wp", "Programmed", "True", "Programmed").with_context(|| ctl.log())?;
    let bound = (BOUND, "True", "WaypointAccepted");
    let svc = wait_object_condition(&api, ("v1", "Service"), ("apps", "web"), bound).with_context(|| ctl.log())?;
    ensure!(
        message(&svc, BOUND).starts_with("Successfully attached to waypoint apps/wp"),
        "{svc}"
    );
    wait_binding(&agents[0], "apps/web", "Bound")?;

    // HTTP/1.1 keep-alive from the client: every request answered by web,
    // through the waypoint (it adds x-forwarded-for with the client's address).
    let urls: Vec<String> = (0..4).map(|i| format!("http://{VIP}/together/{i}")).collect();
    let (answers, _) = curl(&cluster, &[], &urls)?;
    let client_ip = cluster.pod("client").ip4.to_string();
    for a in &answers {
        ensure!(a["pod"] == "web" && a["host"] == VIP, "{a}");
        ensure!(a["headers"]["x-forwarded-for"].to_string().contains(&client_ip), "{a}");
    }
    // The waypoint's access log and Istio metrics have them, with the client
    // as source principal; the destination agent saw the waypoint's identity.
    let logs: Vec<Value> = poll(WAIT, || {
        let logs: Vec<Value> = waypoints.iter().flat_map(WaypointPod::access_logs).collect();
        Ok((logs.len() >= urls.len()).then_some(logs))
    })?;
    ensure!(
        logs.iter()
            .all(|l| l["source_principal"] == "spiffe://cluster.local/ns/apps/sa/client"),
        "{logs:?}"
    );
    let counted = requests(
        &waypoints,
        &[
            "reporter=\"waypoint\"",
            "destination_service_name=\"web\"",
            "response_code=\"200\"",
        ],
    )?;
    ensure!(counted >= urls.len() as u64, "istio_requests_total for web: {counted}");
    ensure!(
        crate::waypoint::opened_from(&cluster, &agents[1].node, WP_ID)?,
        "the destination never saw the waypoint"
    );
    let g = api.get(GW, "Gateway", "apps", "wp").context("Gateway wp")?;
    ensure!(
        condition(&g, "ambient-mesh.io/WaypointBindings").is_some_and(|c| c["status"] == "True"),
        "{g}"
    );

    // Everything the waypoints asked the API for, their ClusterRole grants
    // (on a cluster a missing grant leaves the waypoint unready forever).
    let granted = grants(&repo().join("deploy/waypoint-controller.yaml"), "ambient-mesh-waypoint")?;
    let tokens: Vec<&str> = waypoints.iter().filter_map(WaypointPod::api_token).collect();
    let asked: Vec<(String, String, String)> = api
        .requests()
        .into_iter()
        .filter(|r| !r.resource.is_empty() && r.bearer.as_deref().is_some_and(|b| tokens.contains(&b)))
        .map(|r| (r.group, r.resource, r.verb))
        .collect();
    ensure!(!asked.is_empty(), "no request of the waypoints recorded");
    let missing: std::collections::BTreeSet<_> = asked
        .iter()
        .filter(|(g, r, v)| !granted.iter().any(|(gg, rr, vv, _)| (gg, rr, vv) == (g, r, v)))
        .collect();
    ensure!(
        missing.is_empty(),
        "ClusterRole ambient-mesh-waypoint lacks what the waypoints ask for: {missing:?}"
    );
    eprintln!("together: {:?}", started.elapsed());
    Ok(())
}
