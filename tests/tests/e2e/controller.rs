//! The waypoint controller end to end: the real `waypoint controller`
//! against the stand-in API server (server-side apply, status subresource,
//! garbage collection as kube-apiserver does them). A Gateway as `waypoint
//! generate` prints it becomes a ServiceAccount, ConfigMap, Service, PDB,
//! Deployment (owned by the Gateway) and a ClusterRoleBinding; status
//! conditions and addresses follow the objects; drift is reverted; deletion
//! removes everything; other Gateway classes are ignored; a failing API is
//! retried with backoff, not in a loop; RBAC is exactly what it asked for.
//! No network namespace is needed: everything is on loopback.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;
use serde_json::{json, Value};
use testbed::{
    apiserver::{meta, ApiServer, Propagation, Recorded},
    mesh::{self, poll},
};

use crate::WAIT;

const GW: &str = "gateway.networking.k8s.io/v1";
const TOKEN: &str = "controller-token";
const WAYPOINT_ROLE: &str = "ambient-mesh-waypoint";
/// Istio's binding condition (Services; ours on Namespaces too).
pub(crate) const BOUND: &str = "istio.io/WaypointBound";
/// Our binding summary on a waypoint Gateway.
const SUMMARY: &str = "ambient-mesh.io/WaypointBindings";

/// The running controller; killed on drop (also when the test fails).
pub(crate) struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn start(dir: &Path, kubeconfig: &Path, root: &Path) -> Result<Self> {
        Self::start_with(dir, kubeconfig, root, &[])
    }

    pub(crate) fn start_with(dir: &Path, kubeconfig: &Path, root: &Path, extra: &[&str]) -> Result<Self> {
        let mut args = vec!["--waypoint-arg=waypoint", "--waypoint-arg=run"];
        args.extend_from_slice(extra);
        Self::start_args(Command::new(mesh::binary("waypoint")?), dir, kubeconfig, root, &args)
    }

    /// `waypoint` (run by `cmd`, e.g. in a node's netns) with `args` after
    /// the kubeconfig, root and image (e.g. the waypoint's command line,
    /// `--waypoint-arg=...`).
    pub(crate) fn start_args(
        mut cmd: Command,
        dir: &Path,
        kubeconfig: &Path,
        root: &Path,
        args: &[&str],
    ) -> Result<Self> {
        let log = dir.join(format!("controller-{}.log", Instant::now().elapsed().as_nanos()));
        let child = cmd
            .args(["controller", "--log-format", "json", "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--ca-root-file")
            .arg(root)
            .args(["--waypoint-image", "example.test/waypoint:1"])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(fs::File::create(&log)?))
            .spawn()
            .context("starting waypoint controller (cargo build -p waypoint --bins)")?;
        Ok(Self { child, log })
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

fn scratch(label: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mesh-e2e-{label}-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A controller test's world: its scratch directory (removed on drop), the
/// stand-in API server on loopback, a kubeconfig with the controller's
/// token and a mesh root certificate (dir, api, kubeconfig, root, guard).
struct Standin(PathBuf, ApiServer, PathBuf, PathBuf, Scratch);

impl Standin {
    fn new(label: &str) -> Result<Self> {
        let dir = scratch(label)?;
        let cleanup = Scratch(dir.clone());
        let api = ApiServer::on_loopback()?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, TOKEN)?;
        let root = dir.join("root-cert.pem");
        fs::write(&root, "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n")?;
        Ok(Self(dir, api, kubeconfig, root, cleanup))
    }
}

/// The Deployment controller's report: `n` replicas of Deployment `ns/name` available.
pub(crate) fn deployment_available(api: &ApiServer, ns: &str, name: &str, n: u32) -> Result<()> {
    let status = json!({"replicas": n, "readyReplicas": n, "availableReplicas": n});
    ensure!(
        api.set_status("apps/v1", "Deployment", ns, name, status)?,
        "no Deployment {ns}/{name}"
    );
    Ok(())
}

/// `waypoint generate ...` as JSON documents.
pub(crate) fn generate(args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(mesh::binary("waypoint")?)
        .arg("generate")
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Ok(serde_json::to_value(serde_yaml::Value::deserialize(d)?)?))
        .collect()
}

fn get(api: &ApiServer, av: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
    api.get(av, kind, ns, name)
}

/// The waypoint's objects: (apiVersion, kind, namespace, name).
fn owned(ns: &str, name: &str) -> Vec<(&'static str, &'static str, String, String)> {
    let n = || name.to_string();
    vec![
        ("v1", "ServiceAccount", ns.into(), n()),
        ("v1", "ConfigMap", ns.into(), format!("{name}-mesh-ca-root")),
        ("v1", "Service", ns.into(), n()),
        ("policy/v1", "PodDisruptionBudget", ns.into(), n()),
        ("apps/v1", "Deployment", ns.into(), n()),
    ]
}

fn binding_name(ns: &str, name: &str) -> String {
    format!("{WAYPOINT_ROLE}:{ns}:{name}")
}

pub(crate) fn condition<'a>(gw: &'a Value, type_: &str) -> Option<&'a Value> {
    gw["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until Gateway `ns/name`'s condition `type_` has `status` and `reason`.
pub(crate) fn wait_condition(
    api: &ApiServer,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<Value> {
    wait_object_condition(api, (GW, "Gateway"), (ns, name), (type_, status, reason))
}

/// Waits until object `kind` `ns/name` has condition `type_` with `status`
/// and `reason`; the object then.
pub(crate) fn wait_object_condition(
    api: &ApiServer,
    (av, kind): (&str, &str),
    (ns, name): (&str, &str),
    (type_, status, reason): (&str, &str, &str),
) -> Result<Value> {
    poll(WAIT, || {
        let o = get(api, av, kind, ns, name).with_context(|| format!("{kind} {ns}/{name} gone"))?;
        Ok(condition(&o, type_)
            .is_some_and(|c| c["status"] == status && c["reason"] == reason)
            .then_some(o))
    })
    .with_context(|| {
        format!(
            "{kind} {ns}/{name}: {type_}={status} ({reason}): {:?}",
            get(api, av, kind, ns, name).map(|o| o["status"].clone())
        )
    })
}

/// `part` is `whole` but for fields the API server filled in (cluster IPs).
fn subset(part: &Value, whole: &Value) -> bool {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => p.iter().all(|(k, v)| w.get(k).is_some_and(|wv| subset(v, wv))),
        (Value::Array(p), Value::Array(w)) => p.len() == w.len() && p.iter().zip(w).all(|(a, b)| subset(a, b)),
        (p, w) => p == w,
    }
}

/// Waits until the controller is quiet: its last reconcile of apps/wp
/// (which ends with the Deployment) changed nothing, so no event of its own
/// making is on the way. Then only a change from outside (a drift) can
/// trigger the next reconcile, through the watch that sees it.
fn settle(api: &ApiServer) -> Result<()> {
    poll(WAIT, || {
        let writes: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.verb == "patch" && r.bearer.as_deref() == Some(TOKEN))
            .filter(|r| !r.path.contains("/gateways/broken") && !r.path.contains("/gateways/ingress"))
            .filter(|r| !binding_status_write(r))
            .collect();
        let Some(last) = writes.iter().rposition(|r| r.resource == "deployments") else {
            return Ok(None);
        };
        // A reconcile starts with the ServiceAccount.
        let Some(first) = writes[..last].iter().rposition(|r| r.resource == "serviceaccounts") else {
            return Ok(None);
        };
        Ok((last + 1 == writes.len() && writes[first..].iter().all(|r| !r.wrote)).then_some(()))
    })
    .with_context(|| {
        let tail: Vec<String> = api
            .requests()
            .iter()
            .filter(|r| r.verb == "patch")
            .map(|r| format!("{} wrote={}", r.path, r.wrote))
            .collect();
        format!(
            "the controller did not settle (it keeps changing objects): last writes {:#?}",
            &tail[tail.len().saturating_sub(10)..]
        )
    })
}

/// A write of a binding status (Services, Namespaces, the Gateway's
/// summary): another loop than the Gateway's reconcile.
fn binding_status_write(r: &Recorded) -> bool {
    matches!(r.resource.as_str(), "services/status" | "namespaces/status")
        || r.query
            .contains("fieldManager=ambient-mesh-waypoint-controller-bindings")
}

/// (apiGroup, resource, verb) the ClusterRole `role` of `path` grants,
/// resourceNames kept (for `bind`).
pub(crate) type Grant = (String, String, String, Vec<String>);

pub(crate) fn grants(path: &Path, role: &str) -> Result<BTreeSet<Grant>> {
    let text = fs::read_to_string(path)?;
    let mut out = BTreeSet::new();
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
                        let names = rule.resource_names.clone().unwrap_or_default();
                        out.insert((g.clone(), res.clone(), verb.clone(), names));
                    }
                }
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "no ClusterRole {role} in {}", path.display());
    Ok(out)
}

/// What the controller's requests needed: each (group, resource, verb), and
/// for `bind` the role it was checked on.
fn requested(api: &ApiServer) -> BTreeSet<Grant> {
    api.requests()
        .into_iter()
        .filter(|r| !r.resource.is_empty() && r.bearer.as_deref() == Some(TOKEN))
        .map(|r| {
            let names = if r.verb == "bind" {
                vec![r.path.rsplit('/').next().unwrap_or_default().to_string()]
            } else {
                Vec::new()
            };
            (r.group, r.resource, r.verb, names)
        })
        .collect()
}

fn labels(list: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

pub(crate) fn namespace(name: &str, l: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: meta(None, name, l),
        ..Default::default()
    }
}

/// A Service `ns/name` at cluster IP `ip` (port 80 "http" -> 8080) selecting `selector`.
pub(crate) fn service(ns: &str, name: &str, ip: &str, l: &[(&str, &str)], selector: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(Some(ns), name, l),
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            selector: labels(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A running, ready pod `ns/name` of service account `sa` at `ip` on node1.
fn running_pod(ns: &str, name: &str, sa: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: meta(Some(ns), name, l),
        spec: Some(PodSpec {
            node_name: Some("node1".into()),
            service_account_name: Some(sa.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Server-side applies of the status of Service `ns/name` (by whoever).
fn service_status_writes(api: &ApiServer, ns: &str, name: &str) -> usize {
    let path = format!("/api/v1/namespaces/{ns}/services/{name}/status");
    api.requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.path == path)
        .count()
}

/// Binding summary writes to Gateway `ns/name`.
fn summary_writes(api: &ApiServer, ns: &str, name: &str) -> usize {
    let path = format!("/apis/{GW}/namespaces/{ns}/gateways/{name}/status");
    api.requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.path == path && binding_status_write(r))
        .count()
}

pub(crate) fn message(o: &Value, type_: &str) -> String {
    condition(o, type_)
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Each binding's status where kubectl shows it, from the controller's own
/// copy of the agents' model: `istio.io/WaypointBound` on Services (True
/// when bound; False naming the missing Gateway of a typo, the mixed
/// service accounts of a per-service-account waypoint) and on a Namespace
/// whose label names a missing waypoint; a summary on each waypoint
/// Gateway. Fixing the typo flips it; a Service no longer bound loses the
/// condition; another writer's condition stays and ours comes back when
/// removed; nothing is written twice when nothing changed.
#[test]
fn controller_writes_each_bindings_status_on_services_namespaces_and_gateways() -> Result<()> {
    let Standin(dir, api, kubeconfig, root, _scratch) = Standin::new("wpctl-bind")?;
    let ctl = Controller::start(&dir, &kubeconfig, &root)?;

    // apps: waypoint `wp` (for Services) with a ready pod; waypoint `api-wp`
    // for service account api (no pod needed to judge a Service's accounts).
    api.apply(&namespace("apps", &[]))?;
    api.apply(&generate(&["--name", "wp", "-n", "apps"])?[0])?;
    api.apply(&generate(&["--name", "api-wp", "-n", "apps", "--for-service-account", "api"])?[0])?;
    let gw_label = [("gateway.networking.k8s.io/gateway-name", "wp")];
    api.apply(&running_pod("apps", "wp-1", "wp", "10.1.0.9", &gw_label))?;
    api.apply(&running_pod("apps", "web-1", "web", "10.1.0.1", &[("app", "web")]))?;
    let backend = |app| [("app", app), ("tier", "backend")];
    api.apply(&running_pod("apps", "api-1", "api", "10.1.0.2", &backend("api")))?;
    api.apply(&running_pod("apps", "other-1", "other", "10.1.0.3", &backend("other")))?;
    let use_wp = |name| [("istio.io/use-waypoint", name)];
    api.apply(&service("apps", "web", "10.96.0.11", &use_wp("wp"), &[("app", "web")]))?;
    api.apply(&service("apps", "typo", "10.96.0.12", &use_wp("wq"), &[("app", "web")]))?;
    api.apply(&service("apps", "mixed", "10.96.0.13", &[], &[("tier", "backend")]))?;
    api.apply(&service("apps", "probe", "10.96.0.14", &[], &[("app", "web")]))?;
    // Another namespace's label names a waypoint that does not exist.
    api.apply(&namespace("other", &use_wp("nope")))?;
    api.apply(&service("other", "front", "10.96.0.15", &[], &[("app", "front")]))?;

    let svc = |ns, name, status, reason| {
        wait_object_condition(&api, ("v1", "Service"), (ns, name), (BOUND, status, reason)).with_context(|| ctl.log())
    };
    let web = svc("apps", "web", "True", "WaypointAccepted")?;
    assert!(
        message(&web, BOUND).starts_with("Successfully attached to waypoint apps/wp"),
        "{web}"
    );
    let typo = svc("apps", "typo", "False", "WaypointNotFound")?;
    assert!(
        message(&typo, BOUND).contains("there is no Gateway apps/wq of class istio-waypoint"),
        "the missing Gateway is named: {typo}"
    );
    let mixed = svc("apps", "mixed", "False", "MixedServiceAccounts")?;
    assert!(
        message(&mixed, BOUND).contains("run as service accounts api, other")
            && message(&mixed, BOUND).contains("serves only api"),
        "{mixed}"
    );
    assert!(condition(&get(&api, "v1", "Service", "apps", "probe").unwrap(), BOUND).is_none());
    // The namespace label's typo: on the namespace and on what it binds.
    let typo = (BOUND, "False", "WaypointNotFound");
    let other = wait_object_condition(&api, ("v1", "Namespace"), ("", "other"), typo)?;
    assert!(message(&other, BOUND).contains("no Gateway other/nope"), "{other}");
    svc("other", "front", "False", "WaypointNotFound")?;
    // Each waypoint's summary, beside the reconcile's conditions.
    let g = wait_condition(&api, "apps", "wp", SUMMARY, "True", "AllBound")?;
    assert_eq!(message(&g, SUMMARY), "bound: 1 Service, 0 workloads");
    assert!(condition(&g, "Accepted").is_some(), "{g}");
    let g = wait_condition(&api, "apps", "api-wp", SUMMARY, "False", "SomeNotBound")?;
    assert!(
        message(&g, SUMMARY).contains("service apps/mixed (MixedServiceAccounts)")
            && message(&g, SUMMARY).contains("workload apps/api-1 (NoReadyPod)"),
        "{g}"
    );

    // Fixing the typo flips it.
    api.apply(&service("apps", "typo", "10.96.0.12", &use_wp("wp"), &[("app", "web")]))?;
    svc("apps", "typo", "True", "WaypointAccepted")?;
    let summary = |services: usize| {
        let want = format!("bound: {services} Services, 0 workloads");
        poll(WAIT, || {
            let g = get(&api, GW, "Gateway", "apps", "wp").context("gone")?;
            Ok((message(&g, SUMMARY) == want).then_some(()))
        })
        .with_context(|| format!("wp's summary never said {want:?}"))
    };
    summary(2)?;

    // Nothing is written twice: an unrelated change to a bound Service, then
    // `probe` bound and unbound (each waited for: the services watch delivers
    // in order, so the controller has seen the change and the echo of its
    // own writes before). Only probe's two writes and wp's two summaries.
    let counts =
        |names: &[&str]| -> Vec<usize> { names.iter().map(|n| service_status_writes(&api, "apps", n)).collect() };
    let before = counts(&["web", "typo", "mixed", "probe"]);
    let summaries = summary_writes(&api, "apps", "wp");
    api.apply(&service(
        "apps",
        "web",
        "10.96.0.11",
        &[("istio.io/use-waypoint", "wp"), ("team", "a")],
        &[("app", "web")],
    ))?;
    let probe = |to| service("apps", "probe", "10.96.0.14", &use_wp(to), &[("app", "web")]);
    api.apply(&probe("wp"))?;
    svc("apps", "probe", "True", "WaypointAccepted")?;
    api.apply(&probe("none"))?;
    poll(WAIT, || {
        let p = get(&api, "v1", "Service", "apps", "probe").context("gone")?;
        Ok(condition(&p, BOUND).is_none().then_some(()))
    })
    .context("a Service no longer bound keeps the condition")?;
    // One more round trip (a marker) so the echo of the removal is handled too.
    api.apply(&service(
        "apps",
        "mixed",
        "10.96.0.13",
        &use_wp("wp"),
        &[("tier", "backend")],
    ))?;
    svc("apps", "mixed", "True", "WaypointAccepted")?;
    summary(3)?;
    let after = counts(&["web", "typo", "mixed", "probe"]);
    assert_eq!(
        after,
        [before[0], before[1], before[2] + 1, before[3] + 2],
        "status writes of web, typo, mixed, probe: only the changed ones, once each\n{}",
        ctl.log()
    );
    assert_eq!(
        summary_writes(&api, "apps", "wp") - summaries,
        3,
        "wp's summary: probe bound, unbound, mixed bound"
    );

    // Another writer's condition stays beside ours; ours, removed by a
    // writer that replaced the list, comes back.
    api.set_status(
        "v1",
        "Service",
        "apps",
        "web",
        json!({"conditions": [{"type": "example.com/Other", "status": "True", "reason": "Other",
                               "message": "not ours", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    )?;
    let web = svc("apps", "web", "True", "WaypointAccepted")?;
    assert!(condition(&web, "example.com/Other").is_some(), "{web}");
    Ok(())
}

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn controller_turns_waypoint_gateways_into_owned_objects_reverts_drift_and_cleans_up() -> Result<()> {
    let Standin(dir, api, kubeconfig, root, _scratch) = Standin::new("wpctl")?;
    let mut ctl = Controller::start(&dir, &kubeconfig, &root)?;

    // The Gateway exactly as `waypoint generate` prints it (GitOps path).
    let gw_args = ["--name", "wp", "-n", "apps", "--for-service-account", "web"];
    let gw = api.apply(&generate(&gw_args)?[0])?;
    let uid = gw["metadata"]["uid"].as_str().unwrap().to_string();
    // Not waypoints: another class, and a waypoint without the HBONE listener.
    let mut ingress = generate(&["--name", "ingress", "-n", "apps"])?[0].clone();
    ingress["spec"]["gatewayClassName"] = json!("istio");
    api.apply(&ingress)?;
    let mut broken = generate(&["--name", "broken", "-n", "apps"])?[0].clone();
    broken["spec"]["listeners"] = json!([{"name": "http", "port": 80, "protocol": "HTTP"}]);
    api.apply(&broken)?;
    // The namespace uses the waypoint, so a Service of it has a binding status.
    api.apply(&namespace("apps", &[("istio.io/use-waypoint", "wp")]))?;
    api.apply(&service("apps", "web", "10.96.0.11", &[], &[("app", "web")]))?;

    // Every object, owned by the Gateway (controller=true), labelled.
    let objects = poll(WAIT, || {
        Ok(owned("apps", "wp")
            .iter()
            .map(|(av, k, ns, n)| get(&api, av, k, ns, n))
            .collect::<Option<Vec<_>>>())
    })
    .with_context(|| ctl.log())?;
    for o in &objects {
        let refs = &o["metadata"]["ownerReferences"];
        assert_eq!(
            refs,
            &json!([{"apiVersion": GW, "kind": "Gateway", "name": "wp", "uid": uid, "controller": true}]),
            "{} {}",
            o["kind"],
            o["metadata"]["name"]
        );
        assert_eq!(o["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "wp");
        assert_eq!(
            o["metadata"]["labels"]["gateway.istio.io/managed"],
            "ambient-mesh.io-waypoint-controller"
        );
    }
    let d = get(&api, "apps/v1", "Deployment", "apps", "wp").unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &d["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "wp"
    );
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "example.test/waypoint:1");
    assert_eq!(c["command"], json!(["waypoint", "run"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    let token = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "mesh-ca");
    let svc = get(&api, "v1", "Service", "apps", "wp").unwrap();
    let ports: Vec<(i64, &str)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_i64().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ports,
        [(15008, "mesh"), (15020, "http-metrics"), (15021, "status-port")]
    );
    let pdb = get(&api, "policy/v1", "PodDisruptionBudget", "apps", "wp").unwrap();
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let cm = get(&api, "v1", "ConfigMap", "apps", "wp-mesh-ca-root").unwrap();
    assert_eq!(cm["data"]["root-cert.pem"], fs::read_to_string(&root)?);
    let crb = poll(WAIT, || {
        Ok(get(
            &api,
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "",
            &binding_name("apps", "wp"),
        ))
    })?;
    assert_eq!(crb["roleRef"]["name"], WAYPOINT_ROLE);
    assert_eq!(
        crb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "wp", "namespace": "apps"}])
    );

    // What `waypoint generate --resources` prints is what the controller made
    // (but for the ownerReferences GitOps does not want).
    let root_arg = root.display().to_string();
    let mut gen_args = gw_args.to_vec();
    gen_args.extend([
        "--resources",
        "--ca-root-file",
        &root_arg,
        "--waypoint-image",
        "example.test/waypoint:1",
    ]);
    for doc in &generate(&gen_args)?[1..] {
        let (av, kind) = (doc["apiVersion"].as_str().unwrap(), doc["kind"].as_str().unwrap());
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or("");
        let live = get(&api, av, kind, ns, doc["metadata"]["name"].as_str().unwrap()).unwrap();
        for field in ["spec", "data", "roleRef", "subjects"] {
            assert!(
                subset(&doc[field], &live[field]),
                "{kind}.{field}: generated {} is not what the controller applied: {}",
                doc[field],
                live[field]
            );
        }
        assert_eq!(doc["metadata"]["labels"], live["metadata"]["labels"], "{kind} labels");
    }

    // Status: accepted, not programmed while no pod is available; the
    // address is the Service's cluster IP.
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let g = wait_condition(&api, "apps", "wp", "Programmed", "False", "NoResources")?;
    let accepted = condition(&g, "Accepted").unwrap();
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], g["metadata"]["generation"]);
    assert_eq!(g["status"]["addresses"], json!([{"type": "IPAddress", "value": ip}]));
    let since = condition(&g, "Accepted").unwrap()["lastTransitionTime"].clone();
    // The Deployment controller reports two available replicas: programmed.
    deployment_available(&api, "apps", "wp", 2)?;
    let g = wait_condition(&api, "apps", "wp", "Programmed", "True", "Programmed")?;
    let programmed = condition(&g, "Programmed").unwrap();
    assert!(
        programmed["message"]
            .as_str()
            .unwrap()
            .contains("assigned to service(s) wp.apps.svc.cluster.local:15008"),
        "{programmed}"
    );
    // A condition whose status did not change keeps its transition time.
    assert_eq!(condition(&g, "Accepted").unwrap()["lastTransitionTime"], since);
    // The namespace's binding status: the waypoint has no ready pod (the
    // Deployment's status says so, but no Pod object is there).
    let bound =
        |kind, name, status, reason| wait_object_condition(&api, ("v1", kind), ("apps", name), (BOUND, status, reason));
    bound("Service", "web", "False", "WaypointIsNotReady")?;
    bound("Namespace", "apps", "False", "WaypointIsNotReady")?;

    // Other classes are left alone; a waypoint without its listener is refused, and says why.
    let g = wait_condition(&api, "apps", "broken", "Accepted", "False", "ListenersNotValid")?;
    assert!(condition(&g, "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("port 15008 with protocol HBONE"));
    assert!(get(&api, "apps/v1", "Deployment", "apps", "broken").is_none());
    assert!(get(&api, "apps/v1", "Deployment", "apps", "ingress").is_none());
    assert!(get(&api, GW, "Gateway", "apps", "ingress").unwrap()["status"].is_null());

    // Drift is reverted, each kind on its own (so each watch is what
    // brings the Gateway back): replicas edited, the managed label removed
    // from the Service, the PDB and the binding deleted.
    let reverted = |what: &str, ok: &dyn Fn() -> bool| {
        poll(WAIT, || Ok(ok().then_some(()))).with_context(|| format!("{what} not reverted\n{}", ctl.log()))
    };
    settle(&api)?;
    let mut edited = get(&api, "apps/v1", "Deployment", "apps", "wp").unwrap();
    edited["spec"]["replicas"] = json!(5);
    api.apply(&edited)?;
    reverted("replicas", &|| {
        get(&api, "apps/v1", "Deployment", "apps", "wp").is_some_and(|d| d["spec"]["replicas"] == 2)
    })?;
    settle(&api)?;
    let mut unlabelled = get(&api, "v1", "Service", "apps", "wp").unwrap();
    unlabelled["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("gateway.istio.io/managed");
    api.apply(&unlabelled)?;
    reverted("service label", &|| {
        get(&api, "v1", "Service", "apps", "wp")
            .is_some_and(|s| s["metadata"]["labels"]["gateway.istio.io/managed"].is_string())
    })?;
    settle(&api)?;
    api.delete("policy/v1", "PodDisruptionBudget", "apps", "wp")?;
    reverted("deleted PDB", &|| {
        get(&api, "policy/v1", "PodDisruptionBudget", "apps", "wp").is_some()
    })?;
    settle(&api)?;
    let crb = binding_name("apps", "wp");
    api.delete("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", &crb)?;
    reverted("deleted binding", &|| {
        get(&api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", &crb).is_some()
    })?;
    // ... and the status the reverting reconcile wrote is unchanged.
    wait_condition(&api, "apps", "wp", "Programmed", "True", "Programmed")?;

    // Converged: the last reconcile wrote nothing, so nothing triggers the
    // next one (a controller that keeps changing something never settles).
    settle(&api)?;

    // Deleting the Gateway deletes everything: the owned objects by the
    // garbage collector, the binding by the controller.
    api.delete_with(GW, "Gateway", "apps", "wp", Propagation::Foreground)?;
    poll(WAIT, || {
        let left = owned("apps", "wp")
            .iter()
            .any(|(av, k, ns, n)| get(&api, av, k, ns, n).is_some())
            || get(
                &api,
                "rbac.authorization.k8s.io/v1",
                "ClusterRoleBinding",
                "",
                &binding_name("apps", "wp"),
            )
            .is_some();
        Ok((!left).then_some(()))
    })
    .with_context(|| format!("objects left after the Gateway was deleted\n{}", ctl.log()))?;
    // ... and what used it now says the waypoint is missing.
    bound("Service", "web", "False", "WaypointNotFound")?;

    // A binding whose Gateway went while the controller was down is removed
    // when it starts again.
    api.apply(&generate(&["--name", "wp2", "-n", "other"])?[0])?;
    let crb2 = binding_name("other", "wp2");
    poll(WAIT, || {
        Ok(get(
            &api,
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "",
            &crb2,
        ))
    })?;
    ctl.stop();
    api.delete(GW, "Gateway", "other", "wp2")?;
    assert!(get(&api, "apps/v1", "Deployment", "other", "wp2").is_none(), "GC");
    assert!(get(&api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", &crb2).is_some());
    let ctl = Controller::start(&dir, &kubeconfig, &root)?;
    poll(WAIT, || {
        Ok(
            get(&api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", &crb2)
                .is_none()
                .then_some(()),
        )
    })
    .with_context(|| format!("orphan binding kept\n{}", ctl.log()))?;

    // RBAC (deploy/waypoint-controller.yaml) is exactly what the controller
    // asked for, `bind` only on the waypoint role.
    let granted = grants(
        &repo().join("deploy/waypoint-controller.yaml"),
        "mesh-waypoint-controller",
    )?;
    assert_eq!(
        requested(&api),
        granted,
        "ClusterRole mesh-waypoint-controller must match the requests"
    );
    Ok(())
}

/// A failing API (the Deployment resource is not served) is retried with a
/// growing delay, not in a loop, and the Gateway converges once it is back.
#[test]
fn controller_backs_off_while_the_api_fails_and_converges_after() -> Result<()> {
    let Standin(dir, api, kubeconfig, root, _scratch) = Standin::new("wpctl-backoff")?;
    api.serve_versions("apps", "deployments", &[]);
    let ctl = Controller::start(&dir, &kubeconfig, &root)?;
    api.apply(&generate(&["--name", "wp", "-n", "apps"])?[0])?;
    // Each attempt applies SA, ConfigMap, binding, Service, PDB, then fails
    // on the Deployment; count attempts by the Service applies.
    let attempts = || {
        api.requests()
            .iter()
            .filter(|r| r.verb == "patch" && r.resource == "services")
            .count()
    };
    poll(WAIT, || Ok((attempts() >= 3).then_some(()))).with_context(|| format!("no retries\n{}", ctl.log()))?;
    let start = Instant::now();
    let first = attempts();
    while start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Backoff 0.5, 1, 2, 4 s ...: at most 3 more attempts in 2 s.
    let more = attempts() - first;
    assert!(more <= 3, "{more} attempts in 2 s: not backing off\n{}", ctl.log());
    assert!(ctl.log().contains("reconcile failed"), "{}", ctl.log());
    api.serve_versions("apps", "deployments", &["v1"]);
    poll(Duration::from_secs(90), || {
        Ok(get(&api, "apps/v1", "Deployment", "apps", "wp"))
    })
    .with_context(|| format!("did not converge\n{}", ctl.log()))?;

    // Another waypoint role: the API server never changes a binding's
    // roleRef, so the controller re-creates the binding.
    drop(ctl);
    let ctl = Controller::start_with(&dir, &kubeconfig, &root, &["--waypoint-cluster-role", "other-role"])?;
    let crb = binding_name("apps", "wp");
    poll(WAIT, || {
        Ok(
            get(&api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", &crb)
                .filter(|b| b["roleRef"]["name"] == "other-role")
                .map(drop),
        )
    })
    .with_context(|| format!("binding not moved to the new role\n{}", ctl.log()))?;
    Ok(())
}
