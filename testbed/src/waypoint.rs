//! Real waypoints and echo backends on a [`Cluster`]: `waypoint run` in a
//! pod's network namespace (its identity from the mesh CA with the node's
//! credential, as the local source has it). Shared by the end-to-end tests
//! and the demo; the echo backend is `mesh::Server::echo`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
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

    fn wait_ready(&mut self) -> Result<()> {
        poll(READY_WITHIN, || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("waypoint in {} exited ({status}):\n{}", self.pod.name, self.raw_log());
            }
            Ok((self.get("/healthz/ready")?.1 == "200").then_some(()))
        })
        .with_context(|| format!("waypoint in {} not ready:\n{}", self.pod.name, self.raw_log()))
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
