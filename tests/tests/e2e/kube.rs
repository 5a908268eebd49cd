//! The Kubernetes source end to end: a real agent watches a stand-in API
//! server (objects built with k8s-openapi), enrolls pods of ambient
//! namespaces found on the node by UID, follows label changes, resolves
//! services through EndpointSlices, translates Istio policies, survives the
//! API going away (ready on its last good state, re-list after 410), reads
//! Istio policies served only as v1beta1, and enrolls new pods through the
//! real CNI plugin before they start (which, with the agent down, asks the
//! API and fails closed). The CA's TokenReview checks meet a stand-in that
//! answers as kube-apiserver does (audiences, legacy, expired and
//! deleted-pod tokens).
use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use agent::k8s::crd;
use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;
use testbed::{
    apiserver::{meta, ApiServer},
    mesh::{self, poll, Agent},
    Cluster, ClusterSpec, NodeSpec,
};

use crate::{access_to, node_get as get, succeeded, WAIT};

pub(crate) use testbed::kube::{namespace, node, pod, pod_cgroup, uid_of};

/// Lays the pod out as a kubelet would (kubepods/burstable/pod<uid>/<ctr>)
/// and runs its app there, in the pod's netns.
pub(crate) fn run_pod_app(cluster: &Cluster, name: &str) -> Result<Child> {
    run_pod_app_on(cluster, name, &["8080"])
}

pub(crate) fn run_pod_app_on(cluster: &Cluster, name: &str, ports: &[&str]) -> Result<Child> {
    let cg = testbed::kube::container_cgroup(cluster, name);
    let mut args = vec!["server", "--ports"];
    args.extend_from_slice(ports);
    let (app, line) = mesh::app_in_cgroup(cluster.pod(name), &cg, &args)?;
    anyhow::ensure!(line.contains("listening"), "{line}");
    Ok(app)
}

pub(crate) struct Apps(pub(crate) Vec<Child>);
impl Drop for Apps {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn dump(cluster: &Cluster) -> Result<Value> {
    Ok(serde_json::from_str(
        &get(cluster, "node1", "http://127.0.0.1:15000/config_dump")?.0,
    )?)
}

fn enrolled(cluster: &Cluster) -> Result<Vec<String>> {
    let d = dump(cluster)?;
    Ok(serde_json::from_value(d["enrolled"].clone())?)
}

fn wait_enrolled(cluster: &Cluster, want: &[&str]) -> Result<()> {
    poll(WAIT, || Ok((enrolled(cluster)? == want).then_some(())))
        .with_context(|| format!("enrolled never became {want:?}: {:?}", enrolled(cluster)))
}

pub(crate) fn web_service() -> (Service, EndpointSlice) {
    let svc = Service {
        metadata: meta(Some("apps"), "web", &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            cluster_ips: Some(vec!["10.96.0.10".into()]),
            selector: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let slice = EndpointSlice {
        metadata: meta(Some("apps"), "web-abc12", &[("kubernetes.io/service-name", "web")]),
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec!["10.1.2.11".into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    (svc, slice)
}

/// An ALLOW policy for the `db` pods of `apps`, to `operation`.
fn allow_db(name: &str, operation: crd::Operation) -> crd::AuthorizationPolicy {
    crd::AuthorizationPolicy::new(
        "apps",
        name,
        crd::AuthorizationPolicySpec {
            selector: Some(crd::WorkloadSelector {
                match_labels: BTreeMap::from([("app".into(), "db".into())]),
            }),
            rules: Some(vec![crd::Rule {
                to: vec![crd::To { operation }],
                ..Default::default()
            }]),
            ..Default::default()
        },
    )
}

fn policies() -> (
    crd::AuthorizationPolicy,
    crd::AuthorizationPolicy,
    crd::PeerAuthentication,
) {
    let deny = crd::AuthorizationPolicy::new(
        "apps",
        "deny-legacy",
        crd::AuthorizationPolicySpec {
            action: Some("DENY".into()),
            rules: Some(vec![crd::Rule {
                from: vec![crd::From {
                    source: crd::Source {
                        namespaces: vec!["legacy".into()],
                        ..Default::default()
                    },
                }],
                to: vec![crd::To {
                    operation: crd::Operation {
                        ports: vec!["8080".into()],
                        methods: vec!["POST".into()],
                        ..Default::default()
                    },
                }],
                ..Default::default()
            }]),
            ..Default::default()
        },
    );
    let allow_l7 = allow_db(
        "allow-get",
        crd::Operation {
            paths: vec!["/api".into()],
            ..Default::default()
        },
    );
    let strict = crd::PeerAuthentication::new(
        "apps",
        "strict",
        crd::PeerAuthenticationSpec {
            mtls: Some(crd::Mtls {
                mode: Some("STRICT".into()),
            }),
            ..Default::default()
        },
    );
    (deny, allow_l7, strict)
}

#[test]
fn kubernetes_source_drives_enrolment_services_policies_and_survives_the_api_going_away() -> Result<()> {
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["client", "opted", "oldapp"]),
        NodeSpec::new("node2", &["web"]),
    ]);
    let cluster = Cluster::create("kube", &spec)?;
    let dir = cluster.scratch_dir()?;
    let mut api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "agent-token")?;

    // client: ambient namespace; opted: same namespace, label `none`;
    // oldapp: a namespace without the label; web: on the other node.
    api.apply(&namespace("apps", true))?;
    api.apply(&namespace("legacy", false))?;
    api.apply(&node(&cluster, "node1"))?;
    api.apply(&pod(&cluster, "client", "apps", &[("app", "client")], true))?;
    api.apply(&pod(
        &cluster,
        "opted",
        "apps",
        &[("istio.io/dataplane-mode", "none")],
        true,
    ))?;
    api.apply(&pod(&cluster, "oldapp", "legacy", &[("app", "old")], true))?;
    api.apply(&pod(&cluster, "web", "apps", &[("app", "web")], true))?;
    let (svc, slice) = web_service();
    api.apply(&svc)?;
    api.apply(&slice)?;
    let (deny, allow_l7, strict) = policies();
    api.apply(&deny)?;
    api.apply(&allow_l7)?;
    api.apply(&strict)?;
    let _apps = Apps(vec![
        run_pod_app(&cluster, "client")?,
        run_pod_app(&cluster, "opted")?,
        run_pod_app(&cluster, "oldapp")?,
        run_pod_app(&cluster, "web")?,
    ]);

    let mut agent = Agent::start_kube(&cluster, "node1", &kubeconfig, &dir, &[])?;
    agent.wait_for("agent ready", WAIT)?;

    // Enrolled: only the ambient pod of this node, found by UID.
    wait_enrolled(&cluster, &["apps/client"])?;
    let d = dump(&cluster)?;
    let by_pod = |key: &str| {
        d["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pod"] == key)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_pod("apps/web")["tunnel"], "HBONE", "a mesh pod of another node: {d}");
    assert_eq!(by_pod("apps/web")["identity"], "spiffe://cluster.local/ns/apps/sa/web");
    assert_eq!(by_pod("legacy/oldapp")["tunnel"], "NONE", "{d}");
    assert_eq!(by_pod("apps/opted")["tunnel"], "NONE", "opted out: {d}");
    // The service: VIP, named target port resolved through the slice, the
    // port's name kept (the waypoint reads the protocol from it).
    let svc = &d["services"][0];
    assert_eq!(svc["hostname"], "web.apps.svc.cluster.local");
    assert_eq!(svc["vips"], serde_json::json!(["10.96.0.10"]));
    assert_eq!(
        svc["ports"],
        serde_json::json!([{"port": 80, "targetPort": 8080, "name": "http"}])
    );
    assert_eq!(svc["endpoints"], serde_json::json!(["10.1.2.11"]));
    // Policies: the DENY keeps its L4 part, the L7-only ALLOW rule is dropped
    // (so it denies, as in ztunnel), STRICT is carried.
    let pols = d["authorizationPolicies"].as_array().unwrap();
    let pol = |name: &str| pols.iter().find(|p| p["name"] == name).cloned().unwrap();
    assert_eq!(pol("deny-legacy")["action"], "DENY");
    assert_eq!(
        pol("deny-legacy")["rules"][0]["from"][0]["source"]["namespaces"][0],
        "legacy"
    );
    assert_eq!(pol("deny-legacy")["rules"][0]["to"][0]["operation"]["ports"][0], 8080);
    assert_eq!(pol("allow-get")["rules"], serde_json::json!([]));
    assert_eq!(d["peerAuthentications"][0]["mode"], "STRICT");
    assert!(agent.raw_log().contains("never matches at L4"), "{}", agent.raw_log());
    assert!(d["degraded"].is_null(), "{d}");

    // A kubelet-style probe from the node (source: the pod bridge's address,
    // not the Node's InternalIP) reaches the app directly despite STRICT.
    let client_ip = cluster.pod("client").ip4.to_string();
    let out = cluster
        .node("node1")
        .try_command("python3")?
        .arg(mesh::meshapp())
        .args(["once", "--host", &client_ip, "--port", "8080"])
        .output()?;
    let r: Value = serde_json::from_slice(&out.stdout)?;
    assert!(succeeded(&r), "probe: {r}\n{}", agent.raw_log());
    assert!(
        access_to(&agent.access_logs(), &format!("{client_ip}:8080")).is_empty(),
        "the probe bypasses the agent"
    );

    // Traffic of the enrolled pod is captured, to the VIP and direct.
    let r = mesh::client(cluster.pod("client"), "once", "10.96.0.10", 80, &[])?;
    assert!(succeeded(&r), "{r}");
    let logs = agent.wait_access(WAIT, |l| !access_to(l, "10.96.0.10:80").is_empty())?;
    assert_eq!(access_to(&logs, "10.96.0.10:80")[0]["direction"], "outbound");

    // Label changes: the namespace loses the label -> unenrolled; the pod
    // label `ambient` on a pod of a plain namespace enrolls it.
    api.apply(&namespace("apps", false))?;
    wait_enrolled(&cluster, &[])?;
    api.apply(&pod(
        &cluster,
        "oldapp",
        "legacy",
        &[("istio.io/dataplane-mode", "ambient")],
        true,
    ))?;
    wait_enrolled(&cluster, &["legacy/oldapp"])?;
    api.apply(&namespace("apps", true))?;
    wait_enrolled(&cluster, &["apps/client", "legacy/oldapp"])?;

    // The API goes away: the agent keeps its state and stays ready, saying why.
    api.stop();
    let (body, code) = poll(WAIT, || {
        let (body, code) = get(&cluster, "node1", "http://127.0.0.1:15021/healthz/ready")?;
        Ok(body.contains("degraded").then_some((body, code)))
    })?;
    assert_eq!(code, "200", "{body}");
    assert_eq!(enrolled(&cluster)?, ["apps/client", "legacy/oldapp"]);
    let r = mesh::client(cluster.pod("client"), "once", "10.96.0.10", 80, &[])?;
    assert!(succeeded(&r), "the last good state still serves: {r}");

    // Changes made meanwhile, then a restart with a compacted history: the
    // watches get 410 Gone, re-list, and catch up.
    api.apply(&pod(&cluster, "oldapp", "legacy", &[("app", "old")], true))?;
    api.delete("v1", "Pod", "apps", "opted")?;
    api.compact();
    api.start_again()?;
    wait_enrolled(&cluster, &["apps/client"])?;
    poll(WAIT, || {
        let (body, _) = get(&cluster, "node1", "http://127.0.0.1:15021/healthz/ready")?;
        Ok((body == "ready\n").then_some(()))
    })?;
    let gone_seen = api
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "pods")
        .count();
    assert!(gone_seen >= 2, "pods were re-listed after 410");
    assert!(dump(&cluster)?["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["pod"] != "apps/opted"));

    // The pod goes away: so does its capture.
    api.delete("v1", "Pod", "apps", "client")?;
    wait_enrolled(&cluster, &[])?;

    // Every request carried the kubeconfig's token, and RBAC covers exactly
    // what the agent asked for (deploy/rbac.yaml).
    assert!(api
        .requests()
        .iter()
        .all(|r| r.bearer.as_deref() == Some("agent-token")));
    let granted = rbac_rules(&repo().join("deploy/rbac.yaml"), "mesh-agent")?;
    assert_eq!(
        api.verbs_seen(),
        granted,
        "the mesh-agent ClusterRole must match the requests"
    );
    agent.terminate()?;
    Ok(())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// (apiGroup, resource, verb) a ClusterRole grants.
fn rbac_rules(path: &Path, role: &str) -> Result<std::collections::BTreeSet<(String, String, String)>> {
    use serde::Deserialize;
    let text = fs::read_to_string(path)?;
    let mut out = std::collections::BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v["kind"] != "ClusterRole" || v["metadata"]["name"] != role {
            continue;
        }
        let r: k8s_openapi::api::rbac::v1::ClusterRole = serde_yaml::from_value(v)?;
        for rule in r.rules.unwrap_or_default() {
            for g in rule.api_groups.iter().flatten() {
                for res in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        out.insert((g.clone(), res.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "no ClusterRole {role} in {}", path.display());
    Ok(out)
}

#[test]
fn istio_policies_served_only_as_v1beta1_are_read_and_enforced() -> Result<()> {
    let spec = ClusterSpec::new(vec![NodeSpec::new("node1", &["db"]), NodeSpec::new("node2", &["peer"])]);
    let cluster = Cluster::create("kbeta", &spec)?;
    let dir = cluster.scratch_dir()?;
    let api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "agent-token")?;
    // An older Istio: its security CRDs are served as v1beta1 only.
    for plural in ["authorizationpolicies", "peerauthentications"] {
        api.serve_versions("security.istio.io", plural, &["v1beta1"]);
    }
    api.apply(&namespace("apps", true))?;
    api.apply(&namespace("legacy", false))?;
    api.apply(&node(&cluster, "node1"))?;
    api.apply(&pod(&cluster, "db", "apps", &[("app", "db")], true))?;
    api.apply(&pod(&cluster, "peer", "legacy", &[], true))?;
    let allow_9090 = allow_db(
        "allow-9090",
        crd::Operation {
            ports: vec!["9090".into()],
            ..Default::default()
        },
    )
    .in_version("v1beta1");
    let permissive = crd::PeerAuthentication::new(
        "apps",
        "permissive",
        crd::PeerAuthenticationSpec {
            mtls: Some(crd::Mtls {
                mode: Some("PERMISSIVE".into()),
            }),
            ..Default::default()
        },
    )
    .in_version("v1beta1");
    api.apply(&allow_9090)?;
    api.apply(&permissive)?;
    let _apps = Apps(vec![run_pod_app_on(&cluster, "db", &["8080", "9090"])?]);

    let mut agent = Agent::start_kube(&cluster, "node1", &kubeconfig, &dir, &[])?;
    agent.wait_for("agent ready", WAIT)?;
    wait_enrolled(&cluster, &["apps/db"])?;
    let d = dump(&cluster)?;
    assert_eq!(d["authorizationPolicies"][0]["name"], "allow-9090", "{d}");
    assert_eq!(
        d["authorizationPolicies"][0]["rules"][0]["to"][0]["operation"]["ports"][0], 9090,
        "{d}"
    );
    assert_eq!(d["peerAuthentications"][0]["mode"], "PERMISSIVE", "{d}");
    let log = agent.raw_log();
    for plural in ["authorizationpolicies", "peerauthentications"] {
        assert!(
            log.contains(&format!("reading security.istio.io/v1beta1 {plural}")),
            "{log}"
        );
    }
    // Only v1beta1 was listed and watched (v1 was asked for in discovery only).
    let paths: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.group == "security.istio.io")
        .map(|r| r.path)
        .collect();
    assert!(
        !paths.is_empty() && paths.iter().all(|p| p.contains("/v1beta1/")),
        "{paths:?}"
    );

    // Enforced: a plaintext client outside the mesh reaches only port 9090.
    let db = cluster.pod("db").ip4.to_string();
    let r = mesh::client(cluster.pod("peer"), "once", &db, 9090, &[])?;
    assert!(succeeded(&r), "the allowed port: {r}");
    let r = mesh::client(cluster.pod("peer"), "once", &db, 8080, &[])?;
    assert!(!succeeded(&r), "not allowed by the v1beta1 policy: {r}");
    agent.terminate()?;
    Ok(())
}

/// How the runtime calls the plugin: its socket, its kubeconfig (from the
/// installer), its timeout.
struct CniConf {
    socket: PathBuf,
    kubeconfig: Option<PathBuf>,
    timeout_seconds: u64,
}

/// Runs the real mesh-cni binary as a container runtime would, on node1
/// (whence it reaches the API).
#[allow(clippy::too_many_arguments)]
fn cni(
    cluster: &Cluster,
    conf: &CniConf,
    command: &str,
    sandbox: &str,
    netns: &Path,
    ns: &str,
    name: &str,
    ips: &[String],
) -> Result<(i32, Value, String)> {
    let prev = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": ips.iter().map(|ip| serde_json::json!({"address": format!("{ip}/24"), "interface": 0})).collect::<Vec<_>>(),
    });
    let mut net = serde_json::json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "socket": conf.socket, "timeoutSeconds": conf.timeout_seconds, "prevResult": prev,
    });
    if let Some(k) = &conf.kubeconfig {
        net["kubeconfig"] = serde_json::json!(k);
    }
    let mut child = cluster
        .node("node1")
        .try_command(mesh::binary("mesh-cni")?)?
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={}",
                uid_of(name)
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(net.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok((
        out.status.code().unwrap_or(-1),
        stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Node1's agent's whole-model assemblies so far, whatever triggered them.
fn assemblies(cluster: &Cluster) -> Result<u64> {
    let (metrics, _) = get(cluster, "node1", "http://127.0.0.1:15020/metrics")?;
    let series = "mesh_agent_model_assemblies_total{";
    anyhow::ensure!(metrics.contains(series), "no {series} in:\n{metrics}");
    Ok(crate::sum_samples(&metrics, series))
}

/// The installer as the mesh-cni DaemonSet runs it: it writes the plugin's
/// kubeconfig from its service-account token and names it in the entry.
fn install_cni(dir: &Path, api: &ApiServer, token: &str) -> Result<PathBuf> {
    let (conf_dir, bin_dir, sa) = (dir.join("net.d"), dir.join("bin"), dir.join("cni-sa"));
    for d in [&conf_dir, &bin_dir, &sa] {
        fs::create_dir_all(d)?;
    }
    fs::write(sa.join("token"), format!("{token}\n"))?;
    fs::write(
        conf_dir.join("10-ptp.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "ptp"}]}"#,
    )?;
    let out = Command::new(mesh::binary("mesh-cni")?)
        .env_remove("CNI_COMMAND")
        .args(["install", "--once", "--holder", "e2e", "--api-server", &api.url()])
        .arg("--kubeconfig-token")
        .arg(sa.join("token"))
        .arg("--conf-dir")
        .arg(&conf_dir)
        .arg("--host-conf-dir")
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&fs::read(conf_dir.join("10-ptp.conflist"))?)?;
    let kubeconfig = list["plugins"][1]["kubeconfig"]
        .as_str()
        .context("no kubeconfig in the entry")?;
    Ok(PathBuf::from(kubeconfig))
}

#[test]
fn cni_plugin_enrolls_new_pods_before_they_start_and_fails_closed_without_the_agent() -> Result<()> {
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["fresh", "known", "plain", "found"]),
        NodeSpec::new("node2", &["peer"]),
    ]);
    let cluster = Cluster::create("kcni", &spec)?;
    let dir = cluster.scratch_dir()?;
    let mut api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "agent-token")?;
    api.apply(&namespace("apps", true))?;
    api.apply(&namespace("legacy", false))?;
    api.apply(&node(&cluster, "node1"))?;
    api.apply(&pod(&cluster, "peer", "legacy", &[], true))?;
    let socket = dir.join("run/cni.sock");
    let sock = socket.to_str().unwrap();
    let conf = CniConf {
        socket: socket.clone(),
        kubeconfig: Some(install_cni(&dir, &api, "cni-token")?),
        timeout_seconds: 3,
    };
    let in_sandbox = |command: &str, sandbox: &str, pod: &str, ns: &str, ips: &[String]| {
        cni(
            &cluster,
            &conf,
            command,
            sandbox,
            &cluster.pod(pod).netns_path,
            ns,
            pod,
            ips,
        )
    };
    let cni = |command: &str, pod: &str, ns: &str, ips: &[String]| {
        in_sandbox(command, &format!("sandbox-{pod}"), pod, ns, ips)
    };
    let mut agent = Agent::start_kube(&cluster, "node1", &kubeconfig, &dir, &["--cni-socket", sock])?;
    agent.wait_for("agent ready", WAIT)?;

    // The kubelet made the pod's cgroup; the pod is scheduled, not running.
    let fresh = cluster.pod("fresh");
    fs::create_dir_all(pod_cgroup(&cluster, "fresh"))?;
    api.apply(&pod(&cluster, "fresh", "apps", &[], false))?;
    let ips = vec![fresh.ip4.to_string(), fresh.ip6.to_string()];
    let (code, out, _) = cni("ADD", "fresh", "apps", &ips)?;
    assert_eq!(code, 0, "{out}\n{}", agent.raw_log());
    assert_eq!(
        out["ips"][0]["address"],
        format!("{}/24", fresh.ip4),
        "prevResult passed through"
    );
    wait_enrolled(&cluster, &["apps/fresh"])?;
    // Captured before the whole model was assembled again (the kubelet
    // waits on the reply), and the model follows with the next debounced
    // batch: until then the pod is no workload and connections to it are
    // refused.
    let line = agent.wait_for("pod enrolled before start (CNI)", WAIT)?;
    assert_eq!(line["ahead_of_model"], true, "{line}");
    assert_eq!(line["model_follows"], true, "the API has no IPs of it: {line}");
    let ip = Value::from(fresh.ip4.to_string());
    poll(WAIT, || {
        let d = dump(&cluster)?;
        let workloads = d["workloads"].as_array().cloned().unwrap_or_default();
        Ok(workloads
            .iter()
            .any(|w| w["ip"] == ip && w["pod"] == "apps/fresh")
            .then_some(()))
    })
    .context("the CNI-enrolled pod never became a workload: the model did not follow the ADD")?;
    // Its very first connection is captured.
    let _apps = Apps(vec![run_pod_app(&cluster, "peer")?]);
    let dst = format!("{}:8080", cluster.pod("peer").ip4);
    let r = mesh::client(fresh, "once", &cluster.pod("peer").ip4.to_string(), 8080, &[])?;
    assert!(succeeded(&r), "{r}");
    agent.wait_access(WAIT, |l| !access_to(l, &dst).is_empty())?;

    // A pod the API listed with its IPs before its ADD: only its location
    // is new, which the data plane's workload state never reads, so no
    // whole model has to follow this ADD (each one costs O(cluster) and
    // holds up the ADDs behind it).
    let known = cluster.pod("known");
    fs::create_dir_all(pod_cgroup(&cluster, "known"))?;
    api.apply(&pod(&cluster, "known", "apps", &[], true))?;
    let known_ip = Value::from(known.ip4.to_string());
    poll(WAIT, || {
        let d = dump(&cluster)?;
        let w = d["workloads"].as_array().cloned().unwrap_or_default();
        Ok(w.iter().any(|w| w["ip"] == known_ip).then_some(()))
    })?;
    let (code, out, _) = cni("ADD", "known", "apps", &[known.ip4.to_string(), known.ip6.to_string()])?;
    assert_eq!(code, 0, "{out}\n{}", agent.raw_log());
    let line = agent
        .logs()
        .into_iter()
        .find(|l| l["message"] == "pod enrolled before start (CNI)" && l["pod"] == "apps/known")
        .context("apps/known was not enrolled ahead of the model")?;
    assert_eq!(line["model_follows"], false, "{line}");
    let r = mesh::client(known, "once", &cluster.pod("peer").ip4.to_string(), 8080, &[])?;
    assert!(succeeded(&r), "{r}");
    agent.wait_access(WAIT, |l| access_to(l, &dst).len() >= 2)?;
    // Out of the capture by the DEL's reply: the runtime frees its IPs then.
    let (code, _, stderr) = cni("DEL", "known", "apps", &[known.ip4.to_string()])?;
    assert!(code == 0 && stderr.contains("done: out of the capture"), "{stderr}");
    assert_eq!(enrolled(&cluster)?, ["apps/fresh"]);

    // A pod of a plain namespace passes through, not enrolled.
    let plain_ips = vec![cluster.pod("plain").ip4.to_string()];
    api.apply(&pod(&cluster, "plain", "legacy", &[], false))?;
    let (code, _, _) = cni("ADD", "plain", "legacy", &plain_ips)?;
    assert_eq!(code, 0);
    assert_eq!(enrolled(&cluster)?, ["apps/fresh"]);

    // Each ADD's time to the reply is measured, by outcome.
    let (metrics, _) = crate::node_get(&cluster, "node1", "http://127.0.0.1:15020/metrics")?;
    for (outcome, n) in [("captured", 2), ("not_in_mesh", 1)] {
        let count = format!("mesh_agent_cni_add_duration_seconds_count{{outcome=\"{outcome}\"}} {n}");
        assert!(metrics.lines().any(|l| l == count), "no `{count}` in:\n{metrics}");
    }

    // The kubelet repeats DELs, also for an old sandbox of a pod that runs
    // in a new one by then: that DEL must not take the running pod out of
    // the capture.
    let (code, _, _) = in_sandbox("DEL", "sandbox-fresh-before", "fresh", "apps", &ips)?;
    assert_eq!(code, 0);
    let line = agent.wait_for("CNI DEL of a sandbox the pod no longer runs in: ignored", WAIT)?;
    assert_eq!(line["sandbox"], "sandbox-fresh-before", "{line}");
    assert_eq!(enrolled(&cluster)?, ["apps/fresh"]);

    // A pod no ADD of this agent located (found by discovery: it ran
    // before the agent saw an ADD of it, as after an agent restart) has no
    // recorded sandbox, so a DEL tears it down only when it comes from the
    // netns the pod is captured in: an old sandbox's (another netns, or one
    // gone by now) leaves it captured, its own takes it out by the reply.
    let found = cluster.pod("found");
    api.apply(&pod(&cluster, "found", "apps", &[], true))?;
    let _found_app = Apps(vec![run_pod_app(&cluster, "found")?]);
    wait_enrolled(&cluster, &["apps/found", "apps/fresh"])?;
    let found_ips = [found.ip4.to_string()];
    let gone = dir.join("netns-gone");
    for (sandbox, netns) in [("sandbox-found-0", &known.netns_path), ("sandbox-found-1", &gone)] {
        let (code, _, stderr) = self::cni(&cluster, &conf, "DEL", sandbox, netns, "apps", "found", &found_ips)?;
        assert!(
            code == 0 && stderr.contains("done: another sandbox of the pod: ignored"),
            "{stderr}"
        );
        let ignored = |l: &Value| {
            l["message"] == "CNI DEL of a sandbox the pod no longer runs in: ignored" && l["sandbox"] == sandbox
        };
        poll(WAIT, || Ok(agent.logs().into_iter().find(ignored)))
            .with_context(|| format!("the DEL of {sandbox} in {} was not ignored", netns.display()))?;
        assert_eq!(enrolled(&cluster)?, ["apps/found", "apps/fresh"]);
    }
    // The reply says what the agent did, so it came once the pod was out,
    // in the kernel too: its IP and netns are out of the capture maps.
    let in_maps = || -> Result<(bool, usize)> {
        let s = agent.status()?;
        let ip = Value::from(found.ip4.to_string());
        let ips = s["pod_ips"].as_array().context("no pod_ips in agent status")?;
        let netns = s["enrolled_netns"].as_array().context("no enrolled_netns")?;
        Ok((ips.contains(&ip), netns.len()))
    };
    let (ip_in, netns_before) = in_maps()?;
    assert!(ip_in, "the ignored DELs took its IP out of the maps");
    let (code, _, stderr) = self::cni(
        &cluster,
        &conf,
        "DEL",
        "sandbox-found-2",
        &found.netns_path,
        "apps",
        "found",
        &found_ips,
    )?;
    assert!(code == 0 && stderr.contains("done: out of the capture"), "{stderr}");
    assert_eq!(enrolled(&cluster)?, ["apps/fresh"], "the DEL from its own netns");
    assert_eq!(
        in_maps()?,
        (false, netns_before - 1),
        "still in the capture maps after the reply"
    );

    // Its sandbox torn down and made again (as the kubelet does after a
    // sandbox died): the pod is captured anew in the new sandbox, not left
    // on the old one's capture, whose netns may be another one by now under
    // the same path. The DEL takes it out at once, so the ADD right behind
    // it enrolls it again.
    // Straight to the agent's socket, one right behind the other: the model
    // follows a DEL only 50 ms on, and the plugin's process takes longer.
    let request = |command, sandbox: &str| -> Result<mesh_cni::proto::Reply> {
        let req = mesh_cni::proto::Request {
            command,
            container_id: sandbox.into(),
            netns: fresh.netns_path.display().to_string(),
            pod_namespace: "apps".into(),
            pod_name: "fresh".into(),
            pod_uid: uid_of("fresh"),
            ips: vec![fresh.ip4.into(), fresh.ip6.into()],
        };
        Ok(mesh_cni::proto::call(&socket, &req, WAIT)?)
    };
    let del = request(mesh_cni::proto::Command::Del, "sandbox-fresh")?;
    let add = request(mesh_cni::proto::Command::Add, "sandbox-fresh-2")?;
    assert!(del.ok && add.ok && add.enrolled, "{del:?} {add:?}");
    assert_eq!(del.message, "out of the capture");
    let logs = agent.logs();
    let del = logs
        .iter()
        .rposition(|l| l["message"] == "CNI DEL" && l["sandbox"] == "sandbox-fresh")
        .context("no CNI DEL of sandbox-fresh logged")?;
    let after_del: Vec<&str> = logs[del..]
        .iter()
        .filter(|l| l["pod"] == "apps/fresh")
        .filter_map(|l| l["message"].as_str())
        .filter(|m| m.starts_with("pod "))
        .collect();
    assert_eq!(
        after_del.get(..2),
        Some(&["pod unenrolled", "pod enrolled"][..]),
        "the new sandbox was not captured anew"
    );
    assert_eq!(enrolled(&cluster)?, ["apps/fresh"]);

    // DEL: the sandbox is gone, capture with it at once. A burst of DELs (a
    // node stopping its pods; the kubelet repeats them too) is then one
    // assembly of the whole model, not one each: each is O(cluster) on the
    // control thread, and ADDs wait behind it.
    let before = assemblies(&cluster)?;
    let dels = std::thread::scope(|s| {
        let ips = &ips;
        let burst: Vec<_> = (0..20)
            .map(|i| {
                [
                    ("fresh", "sandbox-fresh-2"),
                    ("known", "sandbox-known"),
                    ("plain", "sandbox-plain"),
                ][i % 3]
            })
            .map(|(pod, sandbox)| s.spawn(move || in_sandbox("DEL", sandbox, pod, "apps", ips)))
            .collect();
        burst
            .into_iter()
            .map(|t| t.join().expect("DEL thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    assert!(dels.iter().all(|(code, _, _)| *code == 0), "{dels:?}");
    assert!(enrolled(&cluster)?.is_empty(), "out of the capture by the replies");
    let after = poll(WAIT, || Ok(Some(assemblies(&cluster)?).filter(|n| *n > before)))
        .context("the model never followed the DELs")?;
    assert!(
        after - before <= 4,
        "{} assemblies of the model for 20 DELs at once, want one per batch",
        after - before
    );
    // An ADD that reaches the agent after its sandbox's DEL (it waited for
    // the pod to reach the API while the runtime gave up and cleaned up)
    // must not capture the pod in the gone sandbox.
    let late = request(mesh_cni::proto::Command::Add, "sandbox-fresh-2")?;
    assert!(!late.ok && late.message.contains("was torn down"), "{late:?}");
    assert!(enrolled(&cluster)?.is_empty());
    // No agent: the plugin asks the API and applies the agent's rule. A pod
    // that belongs in the mesh cannot start (CNI error 11, with the label
    // that decided), a plain one can, and DEL never blocks.
    agent.terminate()?;
    let must_wait = |pod: &str, ns: &str, ips: &[String], why: &str| -> Result<()> {
        let (code, out, stderr) = cni("ADD", pod, ns, ips)?;
        assert_eq!((code, &out["code"]), (1, &Value::from(11)), "{out}\n{stderr}");
        let msg = out["msg"].as_str().unwrap_or("");
        assert!(msg.contains(why) && msg.contains("not reachable"), "{msg}");
        Ok(())
    };
    must_wait(
        "fresh",
        "apps",
        &ips,
        "namespace apps has label istio.io/dataplane-mode=ambient",
    )?;
    let (code, out, stderr) = cni("ADD", "plain", "legacy", &plain_ips)?;
    assert_eq!(code, 0, "plain pods start without the agent: {out}\n{stderr}");
    assert!(stderr.contains("not in the mesh per the Kubernetes API"), "{stderr}");
    // The pod's own label, in a plain namespace.
    let ambient = [("istio.io/dataplane-mode", "ambient")];
    api.apply(&pod(&cluster, "plain", "legacy", &ambient, false))?;
    must_wait(
        "plain",
        "legacy",
        &plain_ips,
        "the pod has label istio.io/dataplane-mode=ambient",
    )?;
    // The namespace labelled while the agent was down.
    api.apply(&pod(&cluster, "plain", "legacy", &[], false))?;
    api.apply(&namespace("legacy", true))?;
    must_wait("plain", "legacy", &plain_ips, "namespace legacy has label")?;
    api.apply(&namespace("legacy", false))?;
    let (code, _, _) = cni("DEL", "fresh", "apps", &ips)?;
    assert_eq!(code, 0);

    // The plugin's requests are exactly what its ClusterRole grants.
    let granted = rbac_rules(&repo().join("deploy/rbac.yaml"), "mesh-cni")?;
    assert_eq!(
        api.verbs_seen_by("cni-token"),
        granted,
        "the mesh-cni ClusterRole must match the plugin's requests"
    );

    // Neither agent nor API: fail closed, except the system namespaces.
    api.stop();
    let (code, out, _) = cni("ADD", "plain", "legacy", &plain_ips)?;
    assert_eq!((code, &out["code"]), (1, &Value::from(11)), "{out}");
    let msg = out["msg"].as_str().unwrap_or("");
    assert!(
        msg.contains("Kubernetes API cannot tell whether pod legacy/plain belongs in the mesh")
            && msg.contains("failing closed"),
        "{msg}"
    );
    let (code, out, _) = cni("ADD", "plain", "kube-system", &plain_ips)?;
    assert_eq!(code, 0, "kube-system starts without agent and API: {out}");
    Ok(())
}

/// `agent ca request` with a token, run in a node's netns.
fn request_cert(cluster: &Cluster, ca: &mesh::MeshCa, token_file: &Path, id: &str) -> Result<(bool, String)> {
    let out = cluster
        .node("node1")
        .try_command(mesh::binary("agent")?)?
        .args(["ca", "request", "--ca-address", &ca.address, "--id", id, "--ca-root"])
        .arg(ca.dir.join("root-cert.pem"))
        .arg("--ca-token")
        .arg(token_file)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).to_string(),
    ))
}

/// An agent pod of the DaemonSet (the pod a projected token is bound to).
fn agent_pod(name: &str, uid: &str, node: &str) -> Pod {
    let mut m = meta(Some("mesh-system"), name, &[("app", "mesh-agent")]);
    m.uid = Some(uid.into());
    Pod {
        metadata: m,
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("mesh-agent".into()),
            host_network: Some(false),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

/// A pod of waypoint `gateway` on node1, with the labels and service
/// account of the pod template the waypoint controller makes
/// (`waypoint generate --resources`), so the CA's check and the
/// controller's objects cannot drift apart.
fn waypoint_pod(cluster: &Cluster, name: &str, gateway: &str, uid: &str) -> Result<Pod> {
    let dir = cluster.scratch_dir()?;
    let root = dir.join("wp-root.pem");
    fs::write(&root, "root\n")?;
    let root = root.display().to_string();
    let docs = crate::controller::generate(&["--name", gateway, "-n", "apps", "--resources", "--ca-root-file", &root])?;
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment generated")?;
    let template = &deployment["spec"]["template"];
    let labels: BTreeMap<String, String> = serde_json::from_value(template["metadata"]["labels"].clone())?;
    let mut p = pod(cluster, "client", "apps", &[], true);
    p.metadata.name = Some(name.into());
    p.metadata.uid = Some(uid.into());
    p.metadata.labels = Some(labels);
    if let Some(spec) = p.spec.as_mut() {
        spec.service_account_name = template["spec"]["serviceAccountName"].as_str().map(str::to_string);
    }
    Ok(p)
}

/// `agent ca request` until the CA answers (it may still be starting).
fn first_request(cluster: &Cluster, ca: &mesh::MeshCa, token: &Path, id: &str) -> Result<(bool, String)> {
    poll(WAIT, || {
        let r = request_cert(cluster, ca, token, id)?;
        Ok((!r.1.contains("connect")).then_some(r))
    })
}

#[test]
fn ca_on_kubernetes_checks_tokens_and_nodes_and_agents_tunnel_hbone_with_its_certificates() -> Result<()> {
    use testbed::apiserver::SaToken;
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["client"]),
        NodeSpec::new("node2", &["web"]),
    ]);
    let cluster = Cluster::create("kca", &spec)?;
    let dir = cluster.scratch_dir()?;
    let api = ApiServer::in_cluster(&cluster)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "ca-token")?;
    api.apply(&namespace("apps", true))?;
    api.apply(&pod(&cluster, "client", "apps", &[], true))?;
    api.apply(&pod(&cluster, "web", "apps", &[], true))?;
    api.apply(&agent_pod("mesh-agent-x1", "uid-x1", "node1"))?;
    api.apply(&agent_pod("mesh-agent-x2", "uid-x2", "node1"))?;
    let (agent_ns, agent_sa, aud) = ("mesh-system", "mesh-agent", agent::ca::TOKEN_AUDIENCE);
    let node1 = Some(("node1", "node-uid-1"));
    // node1's agent: a projected token of its pod (node in the extras).
    api.issue_token(
        "tok-node1",
        SaToken::bound(agent_ns, agent_sa, aud, ("mesh-agent-x1", "uid-x1"), node1),
    );
    // The same from an API server before 1.30: no node, the CA looks the pod up.
    api.issue_token(
        "tok-old-api",
        SaToken::bound(agent_ns, agent_sa, aud, ("mesh-agent-x2", "uid-x2"), None),
    );
    // Tokens the CA must refuse, each for its own reason.
    api.issue_token(
        "tok-other",
        SaToken::bound("apps", "client", aud, ("client", &uid_of("client")), node1),
    );
    api.issue_token(
        "tok-wrong-audience",
        SaToken::bound(agent_ns, agent_sa, "vault", ("mesh-agent-x1", "uid-x1"), node1),
    );
    api.issue_token("tok-legacy", SaToken::legacy(agent_ns, agent_sa));
    api.issue_token(
        "tok-expired",
        SaToken {
            expires: Some(std::time::SystemTime::now() - std::time::Duration::from_secs(1)),
            ..SaToken::bound(agent_ns, agent_sa, aud, ("mesh-agent-x1", "uid-x1"), node1)
        },
    );
    api.issue_token(
        "tok-deleted-pod",
        SaToken::bound(agent_ns, agent_sa, aud, ("mesh-agent-gone", "uid-gone"), node1),
    );
    api.audience_unaware_token(
        "tok-unaware",
        serde_json::json!({"username": "system:serviceaccount:mesh-system:mesh-agent", "uid": "u-1",
                           "extra": {"authentication.kubernetes.io/node-name": ["node1"]}}),
    );
    let ca_dir = dir.join("ca");
    let ca = mesh::MeshCa::start_kube(&cluster, "node1", &ca_dir, &kubeconfig)?;
    let token = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        fs::write(&p, format!("{name}\n"))?;
        Ok(p)
    };

    // node1's agent gets the identity of a pod on node1 ...
    let client_id = "spiffe://cluster.local/ns/apps/sa/client";
    let (ok, out) = first_request(&cluster, &ca, &token("tok-node1")?, client_id)?;
    assert!(ok, "{out}\n{}", ca.log());
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");
    // ... and so does a token of an older API server, through its pod.
    let (ok, out) = request_cert(&cluster, &ca, &token("tok-old-api")?, client_id)?;
    assert!(ok, "pod-name fallback: {out}");
    // Not the identity of a pod on node2, and other tokens get nothing, each
    // refusal with its reason.
    let refused = |tok: &str, id: &str, why: &[&str]| -> Result<()> {
        let (ok, out) = request_cert(&cluster, &ca, &token(tok)?, id)?;
        assert!(!ok, "{tok} must be refused: {out}");
        for w in why {
            assert!(out.contains(w), "{tok}: expected {w:?} in: {out}");
        }
        Ok(())
    };
    refused(
        "tok-node1",
        "spiffe://cluster.local/ns/apps/sa/web",
        &["runs on node node1"],
    )?;
    refused("tok-other", client_id, &["not the agents' service account"])?;
    refused("tok-forged", client_id, &["invalid bearer token"])?;
    refused(
        "tok-wrong-audience",
        client_id,
        &[
            r#"token audiences ["vault"] is invalid for the target audiences ["mesh-ca"]"#,
            "audience mesh-ca",
        ],
    )?;
    refused(
        "tok-legacy",
        client_id,
        &[
            r#"token audiences ["https://kubernetes.default.svc.cluster.local"] is invalid"#,
            "not a legacy",
        ],
    )?;
    refused("tok-expired", client_id, &["service account token has expired"])?;
    refused(
        "tok-deleted-pod",
        client_id,
        &["has been invalidated", "gone or was re-created"],
    )?;
    refused(
        "tok-unaware",
        client_id,
        &["does not confirm the audience mesh-ca", "ignores audiences"],
    )?;

    // A waypoint pod asks with its own token: its own identity only, and
    // only as a pod of a Gateway of class istio-waypoint (it reads the Gateway).
    api.apply(&waypoint_pod(&cluster, "wp-1", "wp", "uid-wp1")?)?;
    api.apply(&waypoint_pod(&cluster, "ingress-1", "ingress", "uid-in1")?)?;
    for (name, class) in [("wp", "istio-waypoint"), ("ingress", "istio")] {
        api.apply(
            &serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        )?;
    }
    api.issue_token(
        "tok-waypoint",
        SaToken::bound("apps", "wp", aud, ("wp-1", "uid-wp1"), node1),
    );
    api.issue_token(
        "tok-ingress",
        SaToken::bound("apps", "ingress", aud, ("ingress-1", "uid-in1"), node1),
    );
    let waypoint_id = "spiffe://cluster.local/ns/apps/sa/wp";
    let (ok, out) = poll(WAIT, || {
        let r = request_cert(&cluster, &ca, &token("tok-waypoint")?, waypoint_id)?;
        Ok((r.0 || !r.1.contains("not in the CA's pod list")).then_some(r))
    })?;
    assert!(ok && out.contains("BEGIN CERTIFICATE"), "waypoint: {out}\n{}", ca.log());
    refused(
        "tok-waypoint",
        client_id,
        &["waypoint pod apps/wp-1 may have only its own service account's identity (apps/wp), not apps/client"],
    )?;
    refused(
        "tok-other",
        client_id,
        &["pod apps/client is not a waypoint (no label gateway.networking.k8s.io/gateway-name)"],
    )?;
    refused(
        "tok-ingress",
        "spiffe://cluster.local/ns/apps/sa/ingress",
        &["Gateway apps/ingress is of class istio, not istio-waypoint"],
    )?;

    // The agent pod of the old-API token is re-created (same name, new UID).
    // The API server refuses its token; and while its cache still holds
    // the old pod, the CA's own UID check refuses it.
    api.freeze_token_pod_cache(true);
    api.delete("v1", "Pod", agent_ns, "mesh-agent-x2")?;
    api.apply(&agent_pod("mesh-agent-x2", "uid-x2-new", "node1"))?;
    let (_, out) = poll(WAIT, || {
        let r = request_cert(&cluster, &ca, &token("tok-old-api")?, client_id)?;
        Ok((!r.0).then_some(r))
    })?;
    assert!(
        out.contains("bound to pod mesh-system/mesh-agent-x2 with UID uid-x2, but that pod now has UID uid-x2-new"),
        "{out}"
    );
    api.freeze_token_pod_cache(false);
    refused(
        "tok-old-api",
        client_id,
        &["pod UID (uid-x2-new) does not match service account pod ref claim (uid-x2)"],
    )?;

    // RBAC grants exactly what the CA used: TokenReview create, the pod
    // watch and Gateway get (deploy/rbac.yaml, ClusterRole mesh-ca).
    let granted = rbac_rules(&repo().join("deploy/rbac.yaml"), "mesh-ca")?;
    assert_eq!(
        api.verbs_seen(),
        granted,
        "the mesh-ca ClusterRole must match the requests"
    );
    Ok(())
}
