//! The CNI plugin role (CNI spec 1.0/1.1, chained after the node's main plugin).
//!
//! ADD and CHECK fail closed: a pod that cannot be told to the agent does not start, since it
//! could otherwise run outside the mesh unnoticed. While the agent is not reachable, ADD asks the
//! Kubernetes API (the `kubeconfig` of the plugin's configuration) whether the pod belongs in the
//! mesh, with the agent's own rule: a pod outside the mesh starts, a pod in it waits for the
//! agent, and when the API cannot answer either, the pod does not start (except in the excluded
//! system namespaces). DEL never fails: pod deletion must not block.

use std::net::IpAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_cni::membership::Membership;
use mesh_cni::proto::{self, CallError, Command, Reply, Request};

use crate::api::Verdict;
use serde::Deserialize;
use serde_json::{json, Value};

/// The versions this plugin speaks (0.2.0 lacks `prevResult.ips`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const LATEST_VERSION: &str = "1.1.0";
const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
/// How often ADD/CHECK retry connecting while the agent is (re)starting, within the timeout.
const CONNECT_RETRY: Duration = Duration::from_millis(250);
/// At most this long (within the timeout) for the API while the agent is not reachable.
const API_TIMEOUT: Duration = Duration::from_secs(5);

// Well-known CNI error codes.
const ERR_INCOMPATIBLE_VERSION: u32 = 1;
const ERR_INVALID_ENV: u32 = 4;
const ERR_DECODE: u32 = 6;
const ERR_INVALID_CONFIG: u32 = 7;
const ERR_TRY_AGAIN_LATER: u32 = 11;
const ERR_NOT_AVAILABLE: u32 = 50;

/// The `CNI_*` environment the runtime passes.
#[derive(Debug, Default, Clone)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What to print to stdout and the exit status.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub stdout: Option<String>,
    pub status: i32,
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The network configuration on stdin (only the fields this plugin reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
    /// Read-only credentials for the API, used while the agent is not reachable (written by
    /// `mesh-cni install --kubeconfig`).
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    /// Namespaces never sent to the agent (the agent's own and the system's
    /// must start even while no agent runs, or nothing could start it).
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into(), "mesh-system".into()]
}

impl NetConf {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(
            self.timeout_seconds
                .filter(|&s| s > 0)
                .unwrap_or(DEFAULT_TIMEOUT_SECONDS),
        )
    }
}

/// The Kubernetes keys of `CNI_ARGS`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct K8sArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// Parses `CNI_ARGS` (`K1=V1;K2=V2`). Unknown keys are ignored, empty values count as absent.
pub fn parse_cni_args(args: &str) -> Result<K8sArgs, String> {
    let mut out = K8sArgs::default();
    for pair in args.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"))?;
        let v = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        match k.trim() {
            "K8S_POD_NAMESPACE" => out.pod_namespace = v,
            "K8S_POD_NAME" => out.pod_name = v,
            "K8S_POD_UID" => out.pod_uid = v,
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v,
            _ => {}
        }
    }
    Ok(out)
}

/// The addresses in `prevResult.ips[].address` (CIDR notation), without their prefix length.
pub fn prev_result_ips(prev: &Value) -> Result<Vec<IpAddr>, String> {
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(_) => return Err("prevResult.ips is not a list".into()),
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("prevResult.ips[{i}] has no address"))?;
            let host = addr.split_once('/').map_or(addr, |(host, _)| host);
            host.parse()
                .map_err(|_| format!("prevResult.ips[{i}].address {addr:?} is not an IP address"))
        })
        .collect()
}

fn version_output() -> String {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

fn log(line: impl AsRef<str>) {
    eprintln!("mesh-cni: {}", line.as_ref());
}

/// Runs one plugin invocation: `stdin` is the network configuration.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let command = env.command.to_ascii_uppercase();
    if command == "VERSION" {
        return Outcome {
            stdout: Some(version_output()),
            status: 0,
        };
    }
    // The version for error results: the config's if it has one we can read.
    let raw: Result<Value, _> = serde_json::from_slice(stdin);
    let version = raw
        .as_ref()
        .ok()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .unwrap_or(LATEST_VERSION)
        .to_owned();
    let result = raw
        .map_err(|e| {
            CniError::new(
                ERR_DECODE,
                "cannot decode the network configuration on stdin as JSON",
                e.to_string(),
            )
        })
        .and_then(|raw| {
            serde_json::from_value::<NetConf>(raw).map_err(|e| {
                CniError::new(
                    ERR_INVALID_CONFIG,
                    "invalid mesh-cni network configuration",
                    e.to_string(),
                )
            })
        })
        .and_then(|conf| {
            if SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
                Ok(conf)
            } else {
                Err(CniError::new(
                    ERR_INCOMPATIBLE_VERSION,
                    format!("incompatible CNI version {:?}", conf.cni_version),
                    format!("mesh-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
                ))
            }
        })
        .and_then(|conf| match command.as_str() {
            "ADD" => add(env, &conf),
            "DEL" => Ok(del(env, &conf)),
            "CHECK" => check(env, &conf).map(|()| None),
            "STATUS" => status(&conf).map(|()| None),
            // Nothing is kept on the node for GC to collect: the agent reconciles on its own.
            "GC" => Ok(None),
            other => Err(CniError::new(
                ERR_INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
            )),
        });
    match result {
        Ok(stdout) => Outcome { stdout, status: 0 },
        Err(e) if command == "DEL" => {
            // Never block pod deletion (only reached for unreadable configs).
            log(format!(
                "DEL {}: ignoring error: {}: {}",
                env.container_id, e.msg, e.details
            ));
            Outcome {
                stdout: None,
                status: 0,
            }
        }
        Err(e) => {
            log(format!(
                "{command} {}: error {}: {}: {}",
                env.container_id, e.code, e.msg, e.details
            ));
            let out = json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details });
            Outcome {
                stdout: Some(out.to_string()),
                status: 1,
            }
        }
    }
}

/// The pod and its IPs, or `None` for a sandbox that is not a Kubernetes pod.
fn pod_request(env: &CniEnv, conf: &NetConf, command: Command) -> Result<Option<Request>, CniError> {
    let args = parse_cni_args(&env.args).map_err(|e| CniError::new(ERR_INVALID_ENV, "invalid CNI_ARGS", e))?;
    let Some(pod_name) = args.pod_name else { return Ok(None) };
    let pod_namespace = args.pod_namespace.ok_or_else(|| {
        CniError::new(
            ERR_INVALID_ENV,
            "invalid CNI_ARGS",
            "K8S_POD_NAME is set but K8S_POD_NAMESPACE is not",
        )
    })?;
    let ips = match &conf.prev_result {
        Some(prev) => prev_result_ips(prev).map_err(|e| CniError::new(ERR_INVALID_CONFIG, "invalid prevResult", e))?,
        None => Vec::new(),
    };
    Ok(Some(Request {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        pod_namespace,
        pod_name,
        pod_uid: args.pod_uid.unwrap_or_default(),
        ips,
    }))
}

fn require_env(name: &str, value: &str) -> Result<(), CniError> {
    if value.is_empty() {
        Err(CniError::new(
            ERR_INVALID_ENV,
            format!("{name} is not set"),
            "the container runtime must set it",
        ))
    } else {
        Ok(())
    }
}

/// Asks the agent; while it is not reachable (e.g. restarting), retries until the timeout.
fn ask(socket: &Path, req: &Request, timeout: Duration, retry: bool) -> Result<Reply, CallError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match proto::call(socket, req, left) {
            Err(e) if retry && e.is_unreachable() && Instant::now() + CONNECT_RETRY < deadline => {
                std::thread::sleep(CONNECT_RETRY)
            }
            other => return other,
        }
    }
}

fn unreachable(socket: &Path, e: &CallError) -> CniError {
    let msg = if e.is_unreachable() {
        format!(
            "mesh agent not reachable at {}: is the mesh-agent DaemonSet running on this node? \
             Pods in ambient namespaces cannot start without it",
            socket.display()
        )
    } else {
        format!(
            "mesh agent at {} did not answer properly: check the mesh-agent logs on this node; \
             pods in ambient namespaces cannot start until it does",
            socket.display()
        )
    };
    CniError::new(ERR_TRY_AGAIN_LATER, msg, e.to_string())
}

/// ADD's error when the agent stayed unreachable: why the pod may not start without it.
fn agent_down(socket: &Path, req: &Request, verdict: &Result<Verdict, String>, e: &CallError) -> CniError {
    if !e.is_unreachable() {
        return unreachable(socket, e);
    }
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    let msg = match verdict {
        Ok(v) => format!(
            "pod {pod} belongs in the mesh ({}) but the mesh agent is not reachable at {}: \
             it may not start without capture; is the mesh-agent DaemonSet running on this node? The kubelet retries",
            v.why,
            socket.display()
        ),
        Err(api) => format!(
            "mesh agent not reachable at {} and the Kubernetes API cannot tell whether pod {pod} belongs in the mesh ({api}): \
             failing closed; start the mesh-agent DaemonSet on this node, or fix the plugin's API access (mesh-cni install --kubeconfig)",
            socket.display()
        ),
    };
    CniError::new(ERR_TRY_AGAIN_LATER, msg, e.to_string())
}

fn pod_label(req: &Request) -> String {
    format!("{}/{} ({})", req.pod_namespace, req.pod_name, req.container_id)
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Option<String>, CniError> {
    require_env("CNI_CONTAINERID", &env.container_id)?;
    require_env("CNI_NETNS", &env.netns)?;
    let prev = match &conf.prev_result {
        Some(Value::Object(prev)) => prev,
        Some(_) => {
            return Err(CniError::new(
                ERR_INVALID_CONFIG,
                "invalid prevResult",
                "prevResult is not an object",
            ))
        }
        None => {
            return Err(CniError::new(
                ERR_INVALID_CONFIG,
                "mesh-cni must be chained after the main CNI plugin (no prevResult)",
                "add {\"type\":\"mesh-cni\"} as the last entry of the plugins list of a .conflist",
            ))
        }
    };
    let mut out = prev.clone();
    out.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    let out = Value::Object(out).to_string();

    let Some(req) = pod_request(env, conf, Command::Add)? else {
        log(format!(
            "ADD {}: not a Kubernetes pod, passing through",
            env.container_id
        ));
        return Ok(Some(out));
    };
    if conf.exclude_namespaces.contains(&req.pod_namespace) {
        log(format!("ADD {}: namespace excluded, passing through", pod_label(&req)));
        return Ok(Some(out));
    }
    let socket = conf.socket();
    let deadline = Instant::now() + conf.timeout();
    // One quick try first: when the agent is down, the API may tell that
    // the pod need not wait for it.
    let reply = match ask(&socket, &req, conf.timeout(), false) {
        Err(e) if e.is_unreachable() => {
            let verdict = match &conf.kubeconfig {
                Some(k) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    crate::api::membership_of(
                        k,
                        &req.pod_namespace,
                        &req.pod_name,
                        &req.pod_uid,
                        left.min(API_TIMEOUT),
                    )
                }
                None => Err("the plugin configuration has no kubeconfig (mesh-cni install --kubeconfig)".into()),
            };
            match &verdict {
                Ok(v) if v.membership != Membership::Ambient => {
                    log(format!(
                        "ADD {}: agent not reachable; not in the mesh per the Kubernetes API ({}), passing through",
                        pod_label(&req),
                        v.why
                    ));
                    return Ok(Some(out));
                }
                Ok(v) => log(format!(
                    "ADD {}: in the mesh ({}); waiting for the agent",
                    pod_label(&req),
                    v.why
                )),
                Err(e) => log(format!(
                    "ADD {}: agent and Kubernetes API both unavailable: {e}",
                    pod_label(&req)
                )),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ask(&socket, &req, left, true).map_err(|e| agent_down(&socket, &req, &verdict, &e))?
        }
        other => other.map_err(|e| unreachable(&socket, &e))?,
    };
    if !reply.ok {
        return Err(CniError::new(
            ERR_TRY_AGAIN_LATER,
            format!(
                "mesh agent failed to set up pod {}/{}: {}",
                req.pod_namespace, req.pod_name, reply.message
            ),
            format!("agent socket {}", socket.display()),
        ));
    }
    let state = if reply.enrolled { "enrolled" } else { "not in the mesh" };
    log(format!("ADD {}: {state}: {}", pod_label(&req), reply.message));
    Ok(Some(out))
}

fn del(env: &CniEnv, conf: &NetConf) -> Option<String> {
    let req = match pod_request(env, conf, Command::Del) {
        Ok(Some(req)) => req,
        Ok(None) => return None,
        Err(e) => {
            log(format!(
                "DEL {}: ignoring error: {}: {}",
                env.container_id, e.msg, e.details
            ));
            return None;
        }
    };
    let socket = conf.socket();
    match ask(&socket, &req, conf.timeout(), false) {
        Ok(r) if r.ok => log(format!("DEL {}: done: {}", pod_label(&req), r.message)),
        Ok(r) => log(format!(
            "DEL {}: agent reported an error (ignored): {}",
            pod_label(&req),
            r.message
        )),
        Err(e) => log(format!(
            "DEL {}: mesh agent not reachable at {} (ignored; it cleans up when it restarts): {e}",
            pod_label(&req),
            socket.display()
        )),
    }
    None
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    require_env("CNI_CONTAINERID", &env.container_id)?;
    let Some(req) = pod_request(env, conf, Command::Check)? else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&req.pod_namespace) {
        return Ok(());
    }
    let socket = conf.socket();
    let reply = ask(&socket, &req, conf.timeout(), true).map_err(|e| unreachable(&socket, &e))?;
    if reply.ok {
        Ok(())
    } else {
        Err(CniError::new(
            ERR_TRY_AGAIN_LATER,
            format!(
                "mesh agent reports pod {}/{} is not set up: {}",
                req.pod_namespace, req.pod_name, reply.message
            ),
            format!("agent socket {}", socket.display()),
        ))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let socket = conf.socket();
    match std::fs::metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(CniError::new(
            ERR_NOT_AVAILABLE,
            format!("{} is not a socket", socket.display()),
            "expected the mesh agent's Unix socket",
        )),
        Err(e) => Err(CniError::new(
            ERR_NOT_AVAILABLE,
            format!(
                "mesh agent socket {} is missing: is the mesh-agent DaemonSet running on this node?",
                socket.display()
            ),
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args() {
        let a = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=5f1c-uid",
        )
        .unwrap();
        assert_eq!(
            a,
            K8sArgs {
                pod_namespace: Some("default".into()),
                pod_name: Some("web-0".into()),
                pod_uid: Some("5f1c-uid".into()),
                infra_container_id: Some("abc123".into()),
            }
        );
        assert_eq!(parse_cni_args("").unwrap(), K8sArgs::default());
        assert_eq!(parse_cni_args("IgnoreUnknown=1;;").unwrap(), K8sArgs::default());
        let a = parse_cni_args("K8S_POD_NAME=;K8S_POD_NAMESPACE=ns;").unwrap();
        assert_eq!(a.pod_name, None);
        assert_eq!(a.pod_namespace.as_deref(), Some("ns"));
        assert!(parse_cni_args("K8S_POD_NAME").is_err());
    }

    #[test]
    fn ips_from_prev_result() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [
                {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
                {"address": "fd00:10:244::7/64", "interface": 0},
                {"address": "192.168.0.9"}
            ]
        });
        let want: Vec<IpAddr> = vec![
            "10.244.1.7".parse().unwrap(),
            "fd00:10:244::7".parse().unwrap(),
            "192.168.0.9".parse().unwrap(),
        ];
        assert_eq!(prev_result_ips(&prev).unwrap(), want);
        assert!(prev_result_ips(&json!({"cniVersion": "1.0.0"})).unwrap().is_empty());
        assert!(prev_result_ips(&json!({"ips": [{"address": "nope/24"}]})).is_err());
        assert!(prev_result_ips(&json!({"ips": [{"gateway": "10.0.0.1"}]})).is_err());
        assert!(prev_result_ips(&json!({"ips": {}})).is_err());
    }

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: cmd.into(),
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            args: "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b".into(),
        }
    }

    fn error_code(o: &Outcome) -> u64 {
        assert_eq!(o.status, 1);
        let v: Value = serde_json::from_str(o.stdout.as_deref().unwrap()).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn input_errors() {
        assert_eq!(error_code(&run(&env("ADD"), b"{not json")), 6);
        assert_eq!(error_code(&run(&env("ADD"), br#"{"name":"x"}"#)), 7);
        assert_eq!(error_code(&run(&env("ADD"), br#"{"cniVersion":"0.2.0"}"#)), 1);
        assert_eq!(error_code(&run(&env("ADD"), br#"{"cniVersion":"1.0.0"}"#)), 7);
        let prev = br#"{"cniVersion":"1.0.0","prevResult":{"ips":[]}}"#;
        assert_eq!(
            error_code(&run(
                &CniEnv {
                    container_id: String::new(),
                    ..env("ADD")
                },
                prev
            )),
            4
        );
        assert_eq!(
            error_code(&run(
                &CniEnv {
                    args: "K8S_POD_NAME=b".into(),
                    ..env("ADD")
                },
                prev
            )),
            4
        );
        assert_eq!(error_code(&run(&env("FROB"), prev)), 4);
        // DEL never fails.
        assert_eq!(
            run(&env("DEL"), b"{not json"),
            Outcome {
                stdout: None,
                status: 0
            }
        );
        // GC has nothing to do.
        assert_eq!(
            run(&env("GC"), prev),
            Outcome {
                stdout: None,
                status: 0
            }
        );
    }
}
