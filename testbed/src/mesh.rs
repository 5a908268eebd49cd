//! A mesh on a [`Cluster`]: the enrolment file, real `agent` processes (one
//! per node, in the node's netns and its `agent` cgroup, host mount
//! namespace) and the ordinary test application `apps/meshapp.py`.
//! Shared by the end-to-end tests, the demo and the benchmark.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{Cluster, Pod};

/// The bpffs the agents pin under.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Where the built binaries are: the directory of the running executable
/// (`target/<profile>/` for bins) or its parent (`target/<profile>/deps/` for tests).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` is not built next to {}: run `cargo build -p agent` (cargo xtask test does)",
        exe.display()
    )
}

/// The test application.
pub fn meshapp() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps/meshapp.py")
}

/// The sequence-checked echo of the sockmap tests.
pub fn seqapp() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps/seqapp.py")
}

/// Capture settings written into the enrolment file.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<String>,
    /// Appended verbatim (top-level keys such as `authorizationPolicies:`).
    pub extra: String,
}

/// Writes the enrolment file listing `enrolled` pods (by name) of the cluster;
/// node addresses are the nodes' pod gateways (what kubelet probes come from).
pub fn write_config(cluster: &Cluster, path: &Path, enrolled: &[&str], settings: &Settings) -> Result<()> {
    let mut y = String::from("capture:\n");
    let _ = writeln!(y, "  excludePorts: {:?}", settings.exclude_ports);
    let _ = writeln!(y, "  excludeCidrs: {:?}", settings.exclude_cidrs);
    y.push_str("  nodeAddresses:\n");
    for n in cluster.nodes() {
        let _ = writeln!(y, "    - \"{}\"\n    - \"{}\"", n.gw_ip4, n.gw_ip6);
    }
    y.push_str("pods:\n");
    for name in enrolled {
        let p = cluster.pod(name);
        y.push_str(&pod_entry(p, &p.name, &format!("app: {}", p.name)));
    }
    y.push_str(&settings.extra);
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, y)?;
    // Rename so a reloading agent never reads a half-written file.
    fs::rename(&tmp, path)?;
    Ok(())
}

/// One entry of the enrolment file's `pods:` for `p` (namespace `default`),
/// running as service account `sa`, with `labels` (YAML flow-map contents,
/// e.g. `app: web`).
pub fn pod_entry(p: &Pod, sa: &str, labels: &str) -> String {
    format!(
        "  - name: {}\n    namespace: default\n    serviceAccount: {sa}\n    node: {}\n    netns: {}\n    cgroup: {}\n    ips: [\"{}\", \"{}\"]\n    labels: {{{labels}}}\n",
        p.name,
        p.node,
        p.netns_path.display(),
        p.cgroup.display(),
        p.ip4,
        p.ip6
    )
}

/// Runs `meshapp.py <args>` in `pod`'s netns but in `cgroup` (created if
/// missing): a pod laid out as a kubelet would, e.g.
/// `kubepods/burstable/pod<uid>/<container>`. Returns once it prints its
/// first line (servers: "listening").
pub fn app_in_cgroup(pod: &Pod, cgroup: &Path, args: &[&str]) -> Result<(Child, String)> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    fs::create_dir_all(cgroup)?;
    let netns = fs::File::open(&pod.netns_path)?;
    let procs = fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs"))?;
    let (ns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
    let mut cmd = Command::new("python3");
    cmd.arg(meshapp())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls (write, setns) on fds opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut app = cmd.spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(app.stdout.as_mut().expect("piped")),
        &mut line,
    )?;
    Ok((app, line))
}

/// One running `agent run` process.
pub struct Agent {
    pub node: String,
    pub pin_name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent of `node` with the enrolment file `config`, logging
    /// JSON to `<log_dir>/agent-<node>-<n>.log`.
    pub fn start(cluster: &Cluster, node: &str, config: &Path, log_dir: &Path, extra: &[&str]) -> Result<Agent> {
        Agent::start_bin("agent", cluster, node, config, log_dir, extra)
    }

    /// [`Agent::start`] with another build of the agent beside `agent`
    /// (the upgrade test's `agent-next`).
    pub fn start_bin(
        bin: &str,
        cluster: &Cluster,
        node: &str,
        config: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        Agent::start_file(bin, cluster, node, config, log_dir, extra, None)
    }

    /// Like [`Agent::start`], in a cgroup outside the node's pod parent
    /// ([`crate::Node::outside_cgroup`]): as on a node whose
    /// `--cgroup-parent` leaves the agent out, our cgroup programs never
    /// see the agent's own sockets.
    pub fn start_outside(
        cluster: &Cluster,
        node: &str,
        config: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let cgroup = cluster.node(node).outside_cgroup();
        Agent::start_file("agent", cluster, node, config, log_dir, extra, Some(&cgroup))
    }

    /// The agent `bin` with the enrolment file `config`, in `cgroup` (the
    /// node's agent cgroup when `None`).
    fn start_file(
        bin: &str,
        cluster: &Cluster,
        node: &str,
        config: &Path,
        log_dir: &Path,
        extra: &[&str],
        cgroup: Option<&Path>,
    ) -> Result<Agent> {
        let source = [std::ffi::OsStr::new("--config"), config.as_os_str()];
        Agent::start_with(bin, cluster, node, &source, log_dir, extra, cgroup)
    }

    /// Starts the agent of `node` with the Kubernetes source: `kubeconfig`
    /// points at a stand-in API server; the node's netns plays the host's.
    pub fn start_kube(
        cluster: &Cluster,
        node: &str,
        kubeconfig: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let n = cluster.node(node);
        let source = [
            std::ffi::OsStr::new("--kubernetes"),
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
            "--host-netns".as_ref(),
            n.netns_path.as_os_str(),
        ];
        Agent::start_with("agent", cluster, node, &source, log_dir, extra, None)
    }

    fn start_with(
        bin: &str,
        cluster: &Cluster,
        node: &str,
        source: &[&std::ffi::OsStr],
        log_dir: &Path,
        extra: &[&str],
        cgroup: Option<&Path>,
    ) -> Result<Agent> {
        let n = cluster.node(node);
        let pin_name = format!("{}-{}", cluster.prefix(), node);
        cluster.own_bpffs_path(Path::new(BPFFS).join(&pin_name));
        fs::create_dir_all(log_dir)?;
        let log = (0..)
            .map(|i| log_dir.join(format!("agent-{node}-{i}.log")))
            .find(|p| !p.exists())
            .expect("unbounded");
        let file = fs::File::create(&log)?;
        let mut cmd = match cgroup {
            Some(c) => n.try_command_in(binary(bin)?, c)?,
            None => n.try_command(binary(bin)?)?,
        };
        cmd.args(["--log-format", "json", "run", "--node", node])
            .args(source)
            .arg("--netns")
            .arg(&n.netns_path)
            .arg("--cgroup-parent")
            .arg(&n.cgroup)
            .args([
                "--bpffs",
                BPFFS,
                "--pin-name",
                &pin_name,
                "--reload-interval",
                "200ms",
                "--drain-timeout",
                "10s",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().context("cannot start the agent")?;
        Ok(Agent {
            node: node.to_string(),
            pin_name,
            log,
            child: Some(child),
        })
    }

    /// Starts and waits until it logs "agent ready".
    pub fn start_ready(cluster: &Cluster, node: &str, config: &Path, log_dir: &Path) -> Result<Agent> {
        let mut a = Agent::start(cluster, node, config, log_dir, &[])?;
        a.wait_for("agent ready", Duration::from_secs(20))?;
        Ok(a)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every JSON log line so far.
    pub fn logs(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The access-log lines (one per closed connection).
    pub fn access_logs(&self) -> Vec<Value> {
        self.logs().into_iter().filter(|l| l["target"] == "access").collect()
    }

    /// Waits (bounded) for a log line whose message is `message`; fails early if the agent exits.
    pub fn wait_for(&mut self, message: &str, timeout: Duration) -> Result<Value> {
        poll(timeout, || {
            if let Some(l) = self.logs().into_iter().find(|l| l["message"] == message) {
                return Ok(Some(l));
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // It may have logged the line and exited since the read above.
                if let Some(l) = self.logs().into_iter().find(|l| l["message"] == message) {
                    return Ok(Some(l));
                }
                bail!(
                    "agent on {} exited ({status}) before `{message}`:\n{}",
                    self.node,
                    self.raw_log()
                );
            }
            Ok(None)
        })
        .with_context(|| format!("agent on {} did not log `{message}`:\n{}", self.node, self.raw_log()))
    }

    /// Waits (bounded) until `pred` holds for the access log.
    pub fn wait_access(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
        poll(timeout, || {
            let logs = self.access_logs();
            Ok(pred(&logs).then_some(logs))
        })
        .with_context(|| {
            format!(
                "access log of {} did not reach the expected state:\n{}",
                self.node,
                self.raw_log()
            )
        })
    }

    pub fn raw_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the drain to finish (bounded).
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_bounded(&mut child, Duration::from_secs(20))
    }

    /// SIGTERM without waiting (for handover tests).
    pub fn signal_term(&self) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits for an agent that was signalled to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        wait_bounded(&mut child, timeout)
    }

    /// kill -9: no drain, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `agent status` for this agent's pins.
    pub fn status(&self) -> Result<Value> {
        status(&self.pin_name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `agent status --pin-name <pin_name>` as JSON.
pub fn status(pin_name: &str) -> Result<Value> {
    let out = agent_cli(&["status", "--bpffs", BPFFS, "--pin-name", pin_name])?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs the `agent` binary in the host namespaces (for status, cleanup, unenroll).
pub fn agent_cli(args: &[&str]) -> Result<Output> {
    let out = Command::new(binary("agent")?).args(args).output()?;
    if !out.status.success() {
        bail!("agent {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// GET `url` from inside `node` (the admin endpoints listen in its netns):
/// (body, HTTP status).
pub fn node_get(cluster: &Cluster, node: &str, url: &str) -> Result<(String, String)> {
    let out = cluster
        .node(node)
        .try_command("curl")?
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", url])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    Ok((body.to_string(), code.to_string()))
}

/// Calls `f` every 20 ms until it yields a value, fails, or `timeout` passes.
pub fn poll<T>(timeout: Duration, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    poll_every(Duration::from_millis(20), timeout, f)
}

/// [`poll`] with another period (for checks that are costly themselves,
/// such as parsing long logs).
pub fn poll_every<T>(period: Duration, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(period);
    }
}

pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let status = poll(timeout, || Ok(child.try_wait()?));
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status.context("process did not exit in time; killed")
}

/// A `meshapp.py server` in a pod; killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn start(pod: &Pod, ports: &[u16]) -> Result<Server> {
        let mut cmd = pod.try_command("python3")?;
        cmd.arg(meshapp()).arg("server").arg("--ports");
        for p in ports {
            cmd.arg(p.to_string());
        }
        Server::spawn(cmd, pod)
    }

    /// Starts `cmd` (a server that prints its first line once listening).
    fn spawn(mut cmd: Command, pod: &Pod) -> Result<Server> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let first = child.stdout.take().context("no stdout")?;
        Server::listening(child, first, pod)
    }

    /// `seqapp.py server` on `port` of `pod`; `greet`: it speaks first.
    pub fn seq(pod: &Pod, port: u16, greet: bool) -> Result<Server> {
        let mut cmd = pod.try_command("python3")?;
        cmd.arg(seqapp()).args(["server", "--port", &port.to_string()]);
        if greet {
            cmd.arg("--greet");
        }
        Server::spawn(cmd, pod)
    }

    /// `python3 -c script args` in `pod`: a test's own server, which prints
    /// a line with "listening" once it listens.
    pub fn script(pod: &Pod, script: &str, args: &[&str]) -> Result<Server> {
        let mut cmd = pod.try_command("python3")?;
        cmd.arg("-c").arg(script).args(args);
        Server::spawn(cmd, pod)
    }

    /// `mesh-echo serve` (HTTP/1.1, h2, gRPC) on `port` of `pod`, answering
    /// as the pod's name.
    pub fn echo(pod: &Pod, port: u16) -> Result<Server> {
        let mut child = pod
            .try_command(binary("mesh-echo")?)?
            .args(["serve", "--listen", &format!("[::]:{port}"), "--pod", &pod.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start mesh-echo")?;
        let first = child.stderr.take().context("no stderr")?;
        Server::listening(child, first, pod)
    }

    /// The server once the first line of `first` says it is listening.
    fn listening(mut child: Child, first: impl std::io::Read, pod: &Pod) -> Result<Server> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(first), &mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("server in {} did not start: {line}", pod.name);
        }
        Ok(Server { child })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `meshapp.py <mode> --host <host> --port <port> [args]` in `pod` and
/// returns its JSON report (bounded by the app's own timeouts and counts).
pub fn client(pod: &Pod, mode: &str, host: &str, port: u16, args: &[&str]) -> Result<Value> {
    client_report(spawn_client(pod, mode, host, port, args)?).with_context(|| format!("client in {}", pod.name))
}

/// Starts a client without waiting (for clients that run during other steps).
pub fn spawn_client(pod: &Pod, mode: &str, host: &str, port: u16, args: &[&str]) -> Result<Child> {
    Ok(pod
        .try_command("python3")?
        .arg(meshapp())
        .args([mode, "--host", host, "--port", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// The first JSON line a client started with [`spawn_client`] prints (an
/// event: `hold` prints `{"connected": true}` once connected, `burst`
/// `{"open_at_once": N}` once all are open). Read byte by byte, so the rest
/// stays for [`client_report`]; bounded by the client's own timeouts.
pub fn first_line(child: &mut Child) -> Result<Value> {
    use std::io::Read;
    let out = child.stdout.as_mut().context("the client's stdout is not piped")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    serde_json::from_slice(&line).with_context(|| format!("client printed {:?}", String::from_utf8_lossy(&line)))
}

/// A connection from `pod` that exchanges a line every 0.1 s, `count` times,
/// returned once it is established end to end (its first line).
pub fn held_client(pod: &Pod, host: &str, port: u16, count: u32) -> Result<Child> {
    let mut held = spawn_client(
        pod,
        "hold",
        host,
        port,
        &["--count", &count.to_string(), "--interval", "0.1"],
    )?;
    let first = first_line(&mut held)?;
    if first["connected"] != true {
        bail!("hold client in {} did not connect: {first}", pod.name);
    }
    Ok(held)
}

/// `count` connections from `pod`, all open at once and held `hold` seconds
/// before each echoes; returned once all are open.
pub fn burst_open(pod: &Pod, host: &str, port: u16, count: u32, hold: f32) -> Result<Child> {
    let mut burst = spawn_client(
        pod,
        "burst",
        host,
        port,
        &[
            "--count",
            &count.to_string(),
            "--hold",
            &hold.to_string(),
            "--timeout",
            "10",
        ],
    )?;
    let first = first_line(&mut burst)?;
    if first["open_at_once"] != count {
        bail!("burst client in {} opened only {first} of {count}", pod.name);
    }
    Ok(burst)
}

/// The JSON report of a finished client started with [`spawn_client`].
pub fn client_report(child: Child) -> Result<Value> {
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| {
        format!(
            "client printed no report: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A running `agent ca serve` on a node, with its CA directory made by `agent ca init`.
pub struct MeshCa {
    pub dir: PathBuf,
    /// `https://<node link IP>:15012`.
    pub address: String,
    /// How to serve again after [`MeshCa::stop`]: the node's netns command.
    serve: Vec<std::ffi::OsString>,
    netns: PathBuf,
    child: Option<Child>,
}

impl MeshCa {
    /// Creates the CA (root, server certificate, a credential per node) in
    /// `dir` and serves it in `node`'s netns, deciding from `config`.
    pub fn start(cluster: &Cluster, node: &str, dir: &Path, config: &Path) -> Result<MeshCa> {
        let source = [std::ffi::OsStr::new("--config"), config.as_os_str()];
        MeshCa::start_with(cluster, node, dir, &source)
    }

    /// The same, deciding from the Kubernetes API behind `kubeconfig`
    /// (agents authenticate with tokens, checked by TokenReview).
    pub fn start_kube(cluster: &Cluster, node: &str, dir: &Path, kubeconfig: &Path) -> Result<MeshCa> {
        let source = [
            std::ffi::OsStr::new("--kubernetes"),
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
        ];
        MeshCa::start_with(cluster, node, dir, &source)
    }

    fn start_with(cluster: &Cluster, node: &str, dir: &Path, source: &[&std::ffi::OsStr]) -> Result<MeshCa> {
        let mut init = vec![
            "ca".to_string(),
            "init".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        for n in cluster.nodes() {
            init.extend(["--node".to_string(), n.name.clone()]);
        }
        agent_cli(&init.iter().map(String::as_str).collect::<Vec<_>>())?;
        let n = cluster.node(node);
        let listen = format!("{}:15012", n.link_ip4);
        let mut serve: Vec<std::ffi::OsString> = ["--log-format", "json", "ca", "serve", "--listen", &listen, "--dir"]
            .iter()
            .map(Into::into)
            .collect();
        serve.push(dir.into());
        serve.extend(source.iter().map(|s| s.to_os_string()));
        let mut ca = MeshCa {
            dir: dir.to_owned(),
            address: format!("https://{listen}"),
            serve,
            netns: n.netns_path.clone(),
            child: None,
        };
        ca.restart(cluster, node)?;
        Ok(ca)
    }

    /// Stops the CA (its directory stays): agents keep their certificates
    /// and retry.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Serves again (after [`MeshCa::stop`]) from the same directory.
    pub fn restart(&mut self, cluster: &Cluster, node: &str) -> Result<()> {
        self.stop();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("ca.log"))?;
        debug_assert_eq!(cluster.node(node).netns_path, self.netns);
        let child = cluster
            .node(node)
            .try_command(binary("agent")?)?
            .args(&self.serve)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// The `agent run`/`agent ca request` flags for `node`'s credential.
    pub fn client_args(&self, node: &str) -> Vec<String> {
        let creds = self.dir.join("nodes").join(node);
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--ca-root".into(),
            self.dir.join("root-cert.pem").display().to_string(),
            "--node-cert".into(),
            creds.join("cert.pem").display().to_string(),
            "--node-key".into(),
            creds.join("key.pem").display().to_string(),
        ]
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("ca.log")).unwrap_or_default()
    }

    /// A certificate for `id` (`agent ca request --key-out`, run in `node`'s
    /// netns with its credential), written to `<out>/<sa>-chain.pem` (leaf
    /// first, root last) and `<out>/<sa>-key.pem`: for a stand-in peer such
    /// as a waypoint pod.
    pub fn request(&self, cluster: &Cluster, node: &str, id: &str, out: &Path) -> Result<(PathBuf, PathBuf)> {
        let name = id.rsplit('/').next().unwrap_or(id);
        let (chain, key) = (
            out.join(format!("{name}-chain.pem")),
            out.join(format!("{name}-key.pem")),
        );
        let child = cluster
            .node(node)
            .try_command(binary("agent")?)?
            .args(["ca", "request", "--id", id])
            .arg("--key-out")
            .arg(&key)
            .args(self.client_args(node))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = wait_output(child, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!(
                "agent ca request {id} as node {node} failed: {}\nCA log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        fs::write(&chain, &out.stdout)?;
        Ok((chain, key))
    }
}

/// The output of `child` (stdout/stderr piped), killing it if it outlives `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration) -> Result<Output> {
    use std::io::Read;
    // Readers on threads: a full pipe must not block the child.
    let mut out = child.stdout.take().context("stdout not piped")?;
    let mut err = child.stderr.take().context("stderr not piped")?;
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_bounded(&mut child, timeout)?;
    Ok(Output {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

impl Drop for MeshCa {
    fn drop(&mut self) {
        self.stop();
    }
}
