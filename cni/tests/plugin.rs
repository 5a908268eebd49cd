//! Runs the real `mesh-cni` binary the way a container runtime does (environment + stdin)
//! against a real Unix socket server, and the installer against real directories.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_cni::proto::{Reply, Request};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cni");

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mesh-cni-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A stand-in agent: answers every request with `reply` and records the requests.
struct Agent {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Agent {
    fn start(socket: PathBuf, reply: Reply) -> Self {
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                seen.lock().unwrap().push(serde_json::from_str(&line).unwrap());
                let mut out = serde_json::to_vec(&reply).unwrap();
                out.push(b'\n');
                conn.write_all(&out).unwrap();
            }
        });
        Agent { socket, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

const POD_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sandbox1;K8S_POD_UID=uid-42";

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [
            {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
            {"address": "fd00:10:244:1::7/64", "gateway": "fd00:10:244:1::1", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(socket: &Path, prev: Option<Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "mesh-cni",
        "socket": socket,
        "timeoutSeconds": 1,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf
}

/// Runs the plugin like a runtime: CNI_* environment, config on stdin.
fn cni(command: &str, args: &str, stdin: &Value) -> Output {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "sandbox1")
        .env("CNI_NETNS", "/var/run/netns/cni-1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that reads no config (VERSION) may exit before we write:
    // a broken pipe then is expected; the outputs are what the tests check.
    let written = child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout {:?} is not JSON: {e}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn add_passes_prev_result_through() {
    let t = TempDir::new("add");
    let agent = Agent::start(t.path("cni.sock"), Reply::success(true, "captured"));
    let out = cni("ADD", POD_ARGS, &config(&agent.socket, Some(prev_result())));
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let mut want = prev_result();
    want["cniVersion"] = json!("1.1.0");
    assert_eq!(stdout_json(&out), want);

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(serde_json::to_value(r.command).unwrap(), json!("ADD"));
    assert_eq!(r.container_id, "sandbox1");
    assert_eq!(r.netns, "/var/run/netns/cni-1");
    assert_eq!(
        (r.pod_namespace.as_str(), r.pod_name.as_str(), r.pod_uid.as_str()),
        ("shop", "web-0", "uid-42")
    );
    assert_eq!(
        r.ips,
        [
            "10.244.1.7".parse::<std::net::IpAddr>().unwrap(),
            "fd00:10:244:1::7".parse().unwrap()
        ]
    );
}

#[test]
fn add_fails_when_the_agent_refuses() {
    let t = TempDir::new("refuse");
    let agent = Agent::start(t.path("cni.sock"), Reply::failure("cannot attach eBPF programs"));
    let out = cni("ADD", POD_ARGS, &config(&agent.socket, Some(prev_result())));
    assert_eq!(out.status.code(), Some(1));
    let err = stdout_json(&out);
    assert_eq!(err["cniVersion"], "1.1.0");
    assert_eq!(err["code"], 11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("shop/web-0") && msg.contains("cannot attach eBPF programs"),
        "{msg}"
    );
    assert!(err["details"].is_string());
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn add_fails_closed_without_agent() {
    let t = TempDir::new("noagent");
    let socket = t.path("missing.sock");
    let started = Instant::now();
    let out = cni("ADD", POD_ARGS, &config(&socket, Some(prev_result())));
    assert_eq!(out.status.code(), Some(1));
    // It retried for at most the configured timeout (1 s) plus process overhead.
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = stdout_json(&out);
    assert_eq!(err["code"], 11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!("mesh agent not reachable at {}", socket.display())),
        "{msg}"
    );
    assert!(msg.contains("mesh-agent DaemonSet"), "{msg}");
}

#[test]
fn add_requires_chaining_and_container_id() {
    let t = TempDir::new("badinput");
    let socket = t.path("cni.sock");
    let out = cni("ADD", POD_ARGS, &config(&socket, None));
    assert_eq!(out.status.code(), Some(1));
    let err = stdout_json(&out);
    assert_eq!(err["code"], 7);
    assert!(err["msg"].as_str().unwrap().contains("chained"));

    let out = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_ARGS", POD_ARGS)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["code"], 6, "empty stdin is not a config");

    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_ARGS", POD_ARGS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let conf = config(&socket, Some(prev_result())).to_string();
    child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stdout_json(&out);
    assert_eq!(err["code"], 4);
    assert!(err["msg"].as_str().unwrap().contains("CNI_CONTAINERID"), "{err}");
}

#[test]
fn del_without_agent_succeeds() {
    let t = TempDir::new("del");
    let out = cni("DEL", POD_ARGS, &config(&t.path("missing.sock"), None));
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"));

    // With an agent, DEL is forwarded.
    let agent = Agent::start(t.path("cni.sock"), Reply::success(false, "released"));
    let out = cni("DEL", POD_ARGS, &config(&agent.socket, Some(prev_result())));
    assert!(out.status.success());
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(serde_json::to_value(reqs[0].command).unwrap(), json!("DEL"));
}

#[test]
fn non_kubernetes_sandbox_passes_through() {
    let t = TempDir::new("nonk8s");
    let agent = Agent::start(t.path("cni.sock"), Reply::failure("must not be asked"));
    let out = cni("ADD", "IgnoreUnknown=1", &config(&agent.socket, Some(prev_result())));
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let mut want = prev_result();
    want["cniVersion"] = json!("1.1.0");
    assert_eq!(stdout_json(&out), want);
    assert!(agent.requests().is_empty());
}

#[test]
fn check_and_status() {
    let t = TempDir::new("check");
    let agent = Agent::start(t.path("cni.sock"), Reply::success(true, "captured"));
    let out = cni("CHECK", POD_ARGS, &config(&agent.socket, Some(prev_result())));
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        serde_json::to_value(agent.requests()[0].command).unwrap(),
        json!("CHECK")
    );
    let out = cni("STATUS", "", &config(&agent.socket, None));
    assert!(out.status.success());

    let missing = t.path("missing.sock");
    let out = cni("CHECK", POD_ARGS, &config(&missing, Some(prev_result())));
    assert_eq!(stdout_json(&out)["code"], 11);
    let out = cni("STATUS", "", &config(&missing, None));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["code"], 50);
}

#[test]
fn version() {
    let out = cni("VERSION", "", &json!({"cniVersion": "1.0.0"}));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
}

// ---- installer ----

const CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "ptp", "ipMasq": true, "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

fn installer(t: &TempDir, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("CNI_COMMAND")
        .arg(args[0])
        .arg("--bin-dir")
        .arg(t.path("bin"))
        .arg("--conf-dir")
        .arg(t.path("net.d"))
        .args(&args[1..]);
    cmd
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm_and_wait(mut child: Child) -> Output {
    // SAFETY: signalling our own child by PID.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("installer did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn installer_once_then_daemon_with_sigterm() {
    let t = TempDir::new("install");
    fs::create_dir_all(t.path("bin")).unwrap();
    fs::create_dir_all(t.path("net.d")).unwrap();
    let list = t.path("net.d/10-ptp.conflist");
    fs::write(&list, CONFLIST).unwrap();
    let bin = t.path("bin/mesh-cni");

    let out = installer(
        &t,
        &["install", "--socket", "/run/mesh/test.sock", "--holder", "a", "--once"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v = read_json(&list);
    assert_eq!(plugin_types(&v), ["ptp", "portmap", "mesh-cni"]);
    assert_eq!(v["plugins"][2]["socket"], "/run/mesh/test.sock");
    assert_eq!(v["plugins"][0]["ipam"]["subnet"], "10.244.1.0/24");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(BIN).unwrap());
    assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
    assert!(t.path("net.d/.mesh-cni-holders/a").exists());
    // The copied binary is a working plugin.
    let out = Command::new(&bin).env("CNI_COMMAND", "VERSION").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));

    // A second installer (the new DaemonSet pod), running until SIGTERM.
    let child = installer(
        &t,
        &[
            "install",
            "--socket",
            "/run/mesh/test.sock",
            "--holder",
            "b",
            "--interval",
            "0.2",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for("holder b", || t.path("net.d/.mesh-cni-holders/b").exists());
    // The main CNI rewrites its config: the running installer puts the entry back.
    fs::write(&list, CONFLIST).unwrap();
    wait_for("re-inserted entry", || {
        plugin_types(&read_json(&list)).last().map(String::as_str) == Some("mesh-cni")
    });
    let out = sigterm_and_wait(child);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!t.path("net.d/.mesh-cni-holders/b").exists());
    // Holder `a` remains: everything stays.
    assert_eq!(plugin_types(&read_json(&list)), ["ptp", "portmap", "mesh-cni"]);
    assert!(bin.exists());

    // The last holder leaves: the entry and the binary go.
    let out = installer(&t, &["uninstall", "--holder", "a"]).output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_json(&list), serde_json::from_str::<Value>(CONFLIST).unwrap());
    assert!(!bin.exists());
    assert!(!t.path("net.d/.mesh-cni-holders").exists());
}

#[test]
fn installer_waits_for_config_converts_conf_and_restores_on_sigterm() {
    let t = TempDir::new("waitconf");
    fs::create_dir_all(t.path("bin")).unwrap();
    fs::create_dir_all(t.path("net.d")).unwrap();

    // --once with no config fails and leaves nothing behind.
    let out = installer(&t, &["install", "--holder", "x", "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CNI config"));
    assert!(!t.path("bin/mesh-cni").exists());

    let child = installer(&t, &["install", "--holder", "x", "--socket", "/s.sock"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("binary", || t.path("bin/mesh-cni").exists());
    // The main CNI installs after us, as a single-plugin .conf.
    let original = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true}}"#;
    fs::write(t.path("net.d/10-flannel.conf"), original).unwrap();
    let list = t.path("net.d/10-flannel.conflist");
    wait_for("conversion", || {
        list.exists() && !t.path("net.d/10-flannel.conf").exists()
    });
    let v = read_json(&list);
    assert_eq!(plugin_types(&v), ["flannel", "mesh-cni"]);
    assert_eq!(
        (v["name"].as_str(), v["cniVersion"].as_str()),
        (Some("cbr0"), Some("0.3.1"))
    );

    let out = sigterm_and_wait(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert_eq!(fs::read_to_string(t.path("net.d/10-flannel.conf")).unwrap(), original);
    assert!(!list.exists());
    assert!(!t.path("bin/mesh-cni").exists());
    let left: Vec<_> = fs::read_dir(t.path("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["10-flannel.conf"]);
}

#[test]
fn installer_writes_the_plugin_kubeconfig_0600_refreshes_its_token_and_removes_it() {
    let t = TempDir::new("kubeconfig");
    fs::create_dir_all(t.path("bin")).unwrap();
    fs::create_dir_all(t.path("net.d")).unwrap();
    fs::create_dir_all(t.path("sa")).unwrap();
    let list = t.path("net.d/10-ptp.conflist");
    fs::write(&list, CONFLIST).unwrap();
    fs::write(t.path("sa/token"), "token-1\n").unwrap();
    fs::write(
        t.path("sa/ca.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let token = t.path("sa/token");
    let child = installer(
        &t,
        &[
            "install",
            "--holder",
            "k",
            "--interval",
            "0.2",
            "--kubeconfig-token",
            token.to_str().unwrap(),
            "--api-server",
            "https://10.96.0.1:443",
            "--host-conf-dir",
            "/etc/cni/net.d",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let kubeconfig = t.path("net.d/mesh-cni-kubeconfig");
    let user_token = |p: &Path| -> Option<String> {
        let v: Value = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
        v["users"][0]["user"]["token"].as_str().map(str::to_owned)
    };
    wait_for("kubeconfig", || user_token(&kubeconfig).as_deref() == Some("token-1"));
    wait_for("entry", || {
        plugin_types(&read_json(&list)).last().map(String::as_str) == Some("mesh-cni")
    });
    // A credential: readable by root only. The entry names it as the node sees it.
    assert_eq!(fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(
        read_json(&list)["plugins"][2]["kubeconfig"],
        "/etc/cni/net.d/mesh-cni-kubeconfig"
    );
    let v = read_json(&kubeconfig);
    assert_eq!(v["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
    assert_eq!(
        v["clusters"][0]["cluster"]["certificate-authority-data"],
        "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
    );
    // The kubelet refreshed the projected token: so does the kubeconfig.
    fs::write(&token, "token-2\n").unwrap();
    wait_for("refreshed token", || {
        user_token(&kubeconfig).as_deref() == Some("token-2")
    });
    assert_eq!(fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777, 0o600);
    // The last holder leaves: the credential goes with the entry.
    let out = sigterm_and_wait(child);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!kubeconfig.exists());
    assert_eq!(read_json(&list), serde_json::from_str::<Value>(CONFLIST).unwrap());
}
