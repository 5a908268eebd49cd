//! The agent's side of the chained CNI plugin (`mesh-cni`): a Unix socket
//! that enrolls a pod during sandbox creation, before any of its containers
//! runs, so a new pod's first connection is already captured. An error
//! reply fails the sandbox (the kubelet retries), so an ambient pod never
//! starts outside the mesh.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_cni::proto::{self, Command, Reply, Request};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{model, Kube};

/// How long ADD waits for the pod to reach the agent's store: the pod object
/// exists before its sandbox, so this only covers watch latency.
const POD_WAIT: Duration = Duration::from_secs(5);
/// The plugin gives up after its own timeout (10 s by default).
const REPLY_WAIT: Duration = Duration::from_secs(8);
/// How long a DEL's reply waits for the pod to be out of the capture: the
/// runtime frees the pod's IPs once the plugins reply, and a new pod may
/// take them. A busy agent replies anyway (the DEL must not fail: the
/// kubelet would retry it for good) and takes the pod out when it gets to
/// the DEL. Not a hard bound: the control path's runtime has one thread,
/// so the timer fires once the control loop yields.
const DEL_WAIT: Duration = Duration::from_secs(2);
/// How long a DEL may wait for a place in the control loop's queue after
/// its reply went (bounds the tasks a stuck control loop leaves behind).
const DEL_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// What the main loop must do for the plugin.
pub enum CniEvent {
    /// Enroll this pod of this node now and reply when it is captured.
    Enroll {
        key: String,
        uid: String,
        /// The sandbox's `CNI_CONTAINERID`.
        sandbox: String,
        netns: PathBuf,
        ips: Vec<std::net::IpAddr>,
        reply: oneshot::Sender<Reply>,
    },
    /// The sandbox `sandbox` (its `CNI_CONTAINERID`, in `netns`, which may
    /// be empty or gone) of pod `uid` is gone. The kubelet repeats DELs,
    /// also for an old sandbox of a pod that runs in a new one by then.
    TornDown {
        key: String,
        uid: String,
        sandbox: String,
        netns: String,
        /// What the agent did, for the reply, which waits for it.
        done: oneshot::Sender<&'static str>,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddLabels {
    /// `captured`, `not_in_mesh` or `failed`.
    outcome: &'static str,
}

/// How long a CNI ADD takes from its request to the agent's reply: the
/// time a new pod's sandbox waits for capture (issue #11's
/// enroll-to-capture).
#[derive(Clone)]
pub struct CniMetrics {
    add: Family<AddLabels, Histogram, fn() -> Histogram>,
}

impl CniMetrics {
    /// `mesh_agent_cni_add_duration_seconds{outcome}`.
    pub fn register(registry: &mut Registry) -> Self {
        // 0.25 ms to ~8 s.
        let add: Family<AddLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_25, 2.0, 16)));
        registry.sub_registry_with_prefix("mesh_agent").register(
            "cni_add_duration_seconds",
            "CNI ADD requests from arrival to the agent's reply (the pod captured, or why not), by outcome",
            add.clone(),
        );
        Self { add }
    }

    fn observe(&self, reply: &Reply, since: Instant) {
        let outcome = match (reply.ok, reply.enrolled) {
            (true, true) => "captured",
            (true, false) => "not_in_mesh",
            (false, _) => "failed",
        };
        self.add
            .get_or_create(&AddLabels { outcome })
            .observe(since.elapsed().as_secs_f64());
    }
}

/// Binds the socket (replacing a stale one of a previous agent: new
/// requests then reach this agent).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    kube: Kube,
    own_uid: Option<String>,
    tx: mpsc::Sender<CniEvent>,
    metrics: CniMetrics,
) {
    let mut backoff = crate::proxy::AcceptBackoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted(listener.accept().await, "CNI socket").await else {
            continue;
        };
        let (kube, own_uid, tx, metrics) = (kube.clone(), own_uid.clone(), tx.clone(), metrics.clone());
        tokio::spawn(async move {
            // A caller that never finishes its request must not hold the
            // connection: the plugin itself gives up after 10 s.
            let served = tokio::time::timeout(
                POD_WAIT + REPLY_WAIT,
                connection(stream, &kube, own_uid.as_deref(), &tx, &metrics),
            );
            let r = served.await.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request took too long",
                ))
            });
            if let Err(e) = r {
                tracing::warn!(error = %e, "CNI request failed");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    kube: &Kube,
    own_uid: Option<&str>,
    tx: &mpsc::Sender<CniEvent>,
    metrics: &CniMetrics,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(r.take(proto::MAX_LINE as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    let arrived = Instant::now();
    let reply = match proto::decode_request(&line) {
        Ok(req) => {
            let add = req.command == Command::Add;
            let reply = handle(req, kube, own_uid, tx).await;
            if add {
                metrics.observe(&reply, arrived);
            }
            reply
        }
        Err(e) => failure(format!("bad request from the CNI plugin: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

async fn handle(req: Request, kube: &Kube, own_uid: Option<&str>, tx: &mpsc::Sender<CniEvent>) -> Reply {
    let key = format!("{}/{}", req.pod_namespace, req.pod_name);
    match req.command {
        Command::Del => {
            tracing::info!(pod = %key, sandbox = %req.container_id, "CNI DEL");
            if req.pod_uid.is_empty() {
                return ok(false, "no pod UID: the pod leaves the capture with the model");
            }
            let (done, handled) = oneshot::channel();
            let ev = CniEvent::TornDown {
                key: key.clone(),
                uid: req.pod_uid,
                sandbox: req.container_id,
                netns: req.netns,
                done,
            };
            // The DEL reaches the control loop even when the reply cannot
            // wait for it (a full queue, or the agent still waiting for its
            // first list from the API): lost, it would leave the pod
            // captured until the model drops it, and a late ADD of its
            // sandbox unrefused.
            let tx = tx.clone();
            tokio::spawn(async move {
                if tokio::time::timeout(DEL_QUEUE_WAIT, tx.send(ev)).await.is_err() {
                    tracing::warn!("CNI DEL dropped: the agent's control loop took no event for a minute; the pod leaves the capture with the model");
                }
            });
            match tokio::time::timeout(DEL_WAIT, handled).await {
                Ok(Ok(outcome)) => ok(false, outcome),
                Ok(Err(_)) => ok(false, "the agent is shutting down"),
                Err(_) => {
                    tracing::warn!(pod = %key, "CNI DEL: the agent is busy; replying before the pod is out of the capture (it follows)");
                    ok(false, "the agent is busy: the pod leaves the capture shortly")
                }
            }
        }
        Command::Check => ok(true, "agent running"),
        Command::Add => add(req, key, kube, own_uid, tx).await,
    }
}

async fn add(req: Request, key: String, kube: &Kube, own_uid: Option<&str>, tx: &mpsc::Sender<CniEvent>) -> Reply {
    let deadline = tokio::time::Instant::now() + POD_WAIT;
    let pod = loop {
        match kube.pod(&req.pod_namespace, &req.pod_name) {
            Some(p) if req.pod_uid.is_empty() || p.uid == *req.pod_uid => break p,
            _ if tokio::time::Instant::now() >= deadline => {
                return failure(format!(
                    "pod {key} ({}) is not known to the mesh agent yet: check the agent's logs for Kubernetes API errors; the kubelet will retry the sandbox",
                    req.pod_uid
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let uid = pod.uid.to_string();
    let member = kube.membership(&pod);
    if member != model::Membership::Ambient || own_uid == Some(uid.as_str()) {
        tracing::debug!(pod = %key, membership = ?member, "CNI ADD: not in the mesh");
        return ok(false, &format!("not in the mesh ({member:?})"));
    }
    if req.netns.is_empty() || req.ips.is_empty() {
        return failure(format!(
            "CNI ADD for {key} has no netns or no IPs: mesh-cni must be chained after the plugin that sets up the pod network"
        ));
    }
    let (reply, rx) = oneshot::channel();
    let ev = CniEvent::Enroll {
        key: key.clone(),
        uid,
        sandbox: req.container_id.clone(),
        netns: PathBuf::from(&req.netns),
        ips: req.ips.clone(),
        reply,
    };
    if tx.send(ev).await.is_err() {
        return failure("the mesh agent is shutting down".into());
    }
    match tokio::time::timeout(REPLY_WAIT, rx).await {
        Ok(Ok(r)) => r,
        _ => failure(format!("enrolling {key} timed out in the mesh agent; see its logs")),
    }
}

pub fn ok(enrolled: bool, message: &str) -> Reply {
    Reply {
        ok: true,
        enrolled,
        message: message.to_string(),
    }
}

pub fn failure(message: String) -> Reply {
    tracing::error!(error = %message, "CNI request refused");
    Reply {
        ok: false,
        enrolled: false,
        message,
    }
}
