//! Real waypoints and echo backends on a [`Cluster`]: `waypoint run` in a
//! pod's network namespace, with its identity from the mesh CA either with
//! the node's credential (as the local source has it) or, for a replica of
//! the Deployment the waypoint controller made, started as a kubelet would
//! ([`WaypointPod::start_replica`]), with its projected token. Shared by
//! the end-to-end tests and the demo; the echo backend is
//! `mesh::Server::echo`.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use k8s_openapi::{
    api::core::v1::{Container, Pod as PodObject, PodCondition, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::Value;

use crate::{
    apiserver::{ApiServer, SaToken, DEFAULT_API_AUDIENCE},
    mesh::{binary, poll, MeshCa},
    Cluster, Pod,
};

/// How long a waypoint may take to fetch its certificate and get ready.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// One `waypoint run` process in a pod's netns; killed on drop.
pub struct WaypointPod {
    pub pod: Pod,
    /// JSON logs (stderr) and the access log (stdout, one JSON line per request).
    pub log: PathBuf,
    pub access: PathBuf,
    api_token: Option<String>,
    child: Option<Child>,
}

impl WaypointPod {
    /// Starts the waypoint of service account `sa` (namespace `default`) in
    /// `pod`, reading the enrolment file `config`, and waits until it is
    /// ready (it holds its certificate). `generation` tells restarts apart
    /// in the log file names.
    pub fn start(
        cluster: &Cluster,
        pod: &str,
        sa: &str,
        config: &Path,
        ca: &MeshCa,
        dir: &Path,
        generation: u32,
    ) -> Result<WaypointPod> {
        let pod = cluster.pod(pod).clone();
        let routes = Self::routes_file(dir, &pod.name);
        if !routes.exists() {
            fs::write(&routes, "")?;
        }
        let log = dir.join(format!("waypoint-{}-{generation}.log", pod.name));
        let access = dir.join(format!("waypoint-{}-{generation}.access", pod.name));
        let child = pod
            .try_command(binary("waypoint")?)?
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .arg("--routes")
            .arg(&routes)
            .args(["--namespace", "default", "--service-account", sa])
            .args(ca.client_args(&pod.node))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&access)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("cannot start the waypoint")?;
        let mut wp = WaypointPod {
            pod,
            log,
            access,
            api_token: None,
            child: Some(child),
        };
        wp.wait_ready()?;
        Ok(wp)
    }

    /// The routes file the waypoint in `pod` reads (HTTPRoute,
    /// VirtualService, DestinationRule documents; re-read when written).
    pub fn routes_file(dir: &Path, pod: &str) -> std::path::PathBuf {
        dir.join(format!("routes-{pod}.yaml"))
    }

    /// Runs replica `name` of waypoint Deployment `deployment` (as the
    /// controller applied it, read back from `api`) in testbed pod `pod`,
    /// playing the ReplicaSet controller and the kubelet: the Pod object
    /// from the template (running at the testbed pod's IPs, on its node,
    /// not ready), the volumes (a projected service-account token minted
    /// by `api` for this pod and the template's audience; ConfigMaps read
    /// from `api`) as directories under `<dir>/<name>/volumes`, the
    /// container's command with each word that starts with a mount path
    /// pointed at its volume's directory (what a mount namespace would do),
    /// its environment (values and the fieldRefs the template uses), and
    /// `KUBECONFIG` with a token of its own (its in-cluster credentials;
    /// [`WaypointPod::api_token`]). Marks the Pod ready once the template's
    /// readiness probe answers 200 from the node.
    pub fn start_replica(
        cluster: &Cluster,
        api: &ApiServer,
        deployment: &Value,
        pod: &str,
        name: &str,
        dir: &Path,
    ) -> Result<WaypointPod> {
        let host = cluster.pod(pod).clone();
        let ns = deployment["metadata"]["namespace"]
            .as_str()
            .context("the Deployment has no namespace")?;
        let template = &deployment["spec"]["template"];
        let mut spec: PodSpec = serde_json::from_value(template["spec"].clone()).context("the pod template's spec")?;
        spec.node_name = Some(host.node.clone());
        let sa = spec
            .service_account_name
            .clone()
            .context("the template names no service account")?;
        let labels: BTreeMap<String, String> = serde_json::from_value(template["metadata"]["labels"].clone())?;
        let uid = format!("{name}-uid");
        let object = |ready: bool| PodObject {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(uid.clone()),
                labels: Some(labels.clone()),
                ..Default::default()
            },
            spec: Some(spec.clone()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(host.ip4.to_string()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: host.ip4.to_string(),
                    },
                    PodIP {
                        ip: host.ip6.to_string(),
                    },
                ]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        api.apply(&object(false))?;

        let root = dir.join(name);
        let volumes = root.join("volumes");
        for v in spec.volumes.iter().flatten() {
            let vdir = volumes.join(&v.name);
            fs::create_dir_all(&vdir)?;
            let tokens = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
            for t in tokens.filter_map(|s| s.service_account_token.as_ref()) {
                let token = format!("{name}-{}", v.name);
                let audience = t.audience.as_deref().unwrap_or(DEFAULT_API_AUDIENCE);
                let node = (host.node.as_str(), format!("{}-uid", host.node));
                api.issue_token(
                    &token,
                    SaToken::bound(ns, &sa, audience, (name, &uid), Some((node.0, &node.1))),
                );
                fs::write(vdir.join(&t.path), &token)?;
            }
            if let Some(cm) = &v.config_map {
                let found = api
                    .get("v1", "ConfigMap", ns, &cm.name)
                    .with_context(|| format!("volume {}: no ConfigMap {ns}/{}", v.name, cm.name))?;
                for (key, value) in found["data"].as_object().into_iter().flatten() {
                    fs::write(vdir.join(key), value.as_str().unwrap_or_default())?;
                }
            }
        }
        let container: &Container = spec.containers.first().context("the template has no container")?;
        let mounts: Vec<(String, PathBuf)> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), volumes.join(&m.name)))
            .collect();
        let resolve = |word: &str| -> String {
            mounts
                .iter()
                .find_map(|(path, dir)| Some(format!("{}{}", dir.display(), word.strip_prefix(path.as_str())?)))
                .unwrap_or_else(|| word.to_string())
        };
        let argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|w| resolve(w))
            .collect();
        let (program, args) = argv.split_first().context("the container has no command")?;
        let mut env = Vec::new();
        for e in container.env.iter().flatten() {
            let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
            let value = match (&e.value, field.map(|f| f.field_path.as_str())) {
                (Some(v), _) => v.clone(),
                (None, Some("metadata.name")) => name.into(),
                (None, Some("metadata.namespace")) => ns.into(),
                (None, Some("spec.nodeName")) => host.node.clone(),
                (None, Some("spec.serviceAccountName")) => sa.clone(),
                (None, other) => bail!("env {}: the kubelet stand-in cannot resolve {other:?}", e.name),
            };
            env.push((e.name.clone(), value));
        }
        let api_token = format!("{name}-api");
        let kubeconfig = root.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, &api_token)?;
        let log = root.join("waypoint.log");
        let access = root.join("access.log");
        let child = host
            .try_command(binary(program)?)?
            .args(args)
            .envs(env)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&access)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {program} for replica {name}"))?;
        let mut wp = WaypointPod {
            pod: host.clone(),
            log,
            access,
            api_token: Some(api_token),
            child: Some(child),
        };
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("the container has no HTTP readiness probe")?;
        let IntOrString::Int(port) = probe.port else {
            bail!("readiness probe port {:?}: the stand-in takes numbers", probe.port)
        };
        let url = format!("http://{}:{port}{}", wp.pod.ip4, probe.path.as_deref().unwrap_or("/"));
        let node = cluster.node(&wp.pod.node).clone();
        poll(READY_WITHIN, || {
            wp.exited()?;
            let out = node
                .try_command("curl")?
                .args(["-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}", &url])
                .output()?;
            Ok((out.stdout == b"200").then_some(()))
        })
        .with_context(|| format!("replica {name} not ready ({url}):\n{}", wp.raw_log()))?;
        api.apply(&object(true))?;
        Ok(wp)
    }

    /// The bearer token its API requests carry (replicas only).
    pub fn api_token(&self) -> Option<&str> {
        self.api_token.as_deref()
    }

    fn exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("waypoint in {} exited ({status}):\n{}", self.pod.name, self.raw_log());
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        poll(READY_WITHIN, || {
            self.exited()?;
            Ok((self.get("/healthz/ready")?.1 == "200").then_some(()))
        })
        .with_context(|| format!("waypoint in {} not ready:\n{}", self.pod.name, self.raw_log()))
    }

    /// Its process id while it runs (for /proc: CPU time, memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET `path` on its metrics/readiness port from inside its pod: (body, status).
    pub fn get(&self, path: &str) -> Result<(String, String)> {
        let out = self
            .pod
            .try_command("curl")?
            .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:15020{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        Ok((body.to_string(), code.to_string()))
    }

    /// Its Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        Ok(self.get("/metrics")?.0)
    }

    /// The access-log lines so far.
    pub fn access_logs(&self) -> Vec<Value> {
        fs::read_to_string(&self.access)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn logs(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn raw_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (bounded) for the drain to finish.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("waypoint already stopped")
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        crate::mesh::wait_bounded(&mut child, within)
    }
}

impl Drop for WaypointPod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
