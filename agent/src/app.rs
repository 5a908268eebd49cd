//! Wires the agent together: join the node netns, start capture, enroll the
//! configured pods, hot-reload the configuration, drain on SIGTERM.
use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use std::sync::{
    atomic::{AtomicBool, Ordering},
    RwLock,
};

use crate::{
    admin::{Addrs, Admin, DumpFn},
    capture::Capture,
    config::{AgentConfig, LocalConfig},
    identity::{CertStore, SecretManager},
    inpod::{DataPlane, InPod},
    metrics::TcpMetrics,
    netns::Netns,
    proxy::{MeshCtx, Tracker},
    state::State,
};
use mesh::tls::Roots;

/// The kernel programs, embedded by build.rs (empty when not built).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

/// Runs the agent until SIGTERM/SIGINT and a drain.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // setns affects only the calling thread: do it before any thread exists
    // so every runtime thread lives in the node's netns.
    if let Some(ns) = &cfg.node_netns {
        Netns::open(ns)?.enter_for_good()?;
    }
    let rt = match cfg.worker_threads {
        // One thread that polls epoll and runs the ready task itself: no
        // cross-thread wake-ups on the forwarding path.
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg)?, "agent starting");
    let object = match &cfg.bpf_object {
        Some(p) => std::fs::read(p).map_err(|source| crate::capture::CaptureError::ReadObject {
            path: p.clone(),
            source,
        })?,
        None => EBPF_OBJECT.to_vec(),
    };
    let mut good = LocalConfig::load(&cfg.config_path)?;
    let mut seen = std::fs::read_to_string(&cfg.config_path).unwrap_or_default();
    let (capture, orig) = Capture::start(&object, &cfg.bpffs, &cfg.pin_name, &cfg.cgroup_parent)?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    let state = State::default();
    state.update(&good, &cfg.trust_domain);
    let (mut secrets, mesh_ctx) = match &cfg.ca {
        Some(ca) => {
            let secrets = SecretManager::new(mesh::ca::CaClient::new(ca)?, cfg.cert_lifetime);
            let roots = std::fs::read_to_string(&ca.root_cert)
                .with_context(|| format!("cannot read --ca-root {}", ca.root_cert.display()))?;
            let mesh_ctx = MeshCtx {
                certs: secrets.store(),
                roots: Roots::from_pem(&roots)?,
                pool: mesh::pool::Pool::default(),
            };
            (Some(secrets), Some(Arc::new(mesh_ctx)))
        }
        None => {
            tracing::warn!("no --ca-address: capture only; connections are forwarded as plain TCP without mTLS");
            (None, None)
        }
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = TcpMetrics::register(&mut registry);
    let certs = secrets.as_ref().map(SecretManager::store);
    let ready = Arc::new(AtomicBool::new(false));
    let enrolled = Arc::new(RwLock::new(Vec::<String>::new()));
    let dump = config_dump(cfg.node.clone(), state.clone(), certs, enrolled.clone());
    Admin {
        registry: Arc::new(registry),
        ready: ready.clone(),
        dump,
    }
    .start(Addrs {
        metrics: cfg.metrics_addr,
        readiness: cfg.readiness_addr,
        admin: cfg.admin_addr,
    })?;

    let dp = DataPlane {
        mesh: mesh_ctx,
        state: state.clone(),
        metrics,
    };
    let mut inpod = InPod::new(&cfg, capture, orig, tracker.clone(), shutdown, dp);
    inpod.apply(&good)?;
    sync_identities(&inpod, &mut secrets);
    *enrolled.write().unwrap_or_else(|e| e.into_inner()) = inpod.enrolled().map(str::to_string).collect();
    ready.store(true, Ordering::SeqCst);
    tracing::info!(node = %cfg.node, enrolled = ?inpod.enrolled().collect::<Vec<_>>(), "agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.reload_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                reload(&cfg, &mut seen, &mut good, &mut inpod, &state);
                sync_identities(&inpod, &mut secrets);
                *enrolled.write().unwrap_or_else(|e| e.into_inner()) = inpod.enrolled().map(str::to_string).collect();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    ready.store(false, Ordering::SeqCst);
    // Stop accepting (queued connections migrate to a successor agent, if
    // any), let open connections finish, leave every pin in place so capture
    // and fail-closed stay in force.
    let _ = shutdown_tx.send(true);
    tracing::info!(open = tracker.open(), stats = ?inpod.capture().stats(), "draining");
    drop(inpod);
    let left = tracker.drain(cfg.drain_timeout).await;
    tracing::info!(left_open = left, "agent stopped");
    Ok(())
}

/// The admin `/config_dump`: workloads, policies, enrolled pods and
/// certificates with their expiry (never keys).
fn config_dump(node: String, state: State, certs: Option<CertStore>, enrolled: Arc<RwLock<Vec<String>>>) -> DumpFn {
    Arc::new(move || {
        let snap = state.snapshot();
        let mut workloads: Vec<serde_json::Value> = snap
            .workloads
            .iter()
            .map(|(ip, w)| {
                serde_json::json!({
                    "ip": ip, "pod": w.key, "identity": w.identity.to_string(), "labels": w.labels,
                    "tunnel": if w.hbone { "HBONE" } else { "NONE" }, "waypoint": w.waypoint,
                })
            })
            .collect();
        workloads.sort_by_key(|w| w["ip"].to_string());
        serde_json::json!({
            "node": node,
            "enrolled": *enrolled.read().unwrap_or_else(|e| e.into_inner()),
            "workloads": workloads,
            "services": snap.services.iter().map(|s| serde_json::json!({
                "hostname": s.spec.hostname(), "vips": s.spec.vips, "ports": s.spec.ports,
                "endpoints": s.endpoints, "loadBalancing": s.spec.load_balancing, "waypoint": s.spec.waypoint,
            })).collect::<Vec<_>>(),
            "authorizationPolicies": snap.policies,
            "peerAuthentications": snap.peer_auths,
            "certificates": certs.as_ref().map(CertStore::dump).unwrap_or_default(),
        })
    })
}

/// Certificates for exactly the service accounts of the enrolled pods.
fn sync_identities(inpod: &InPod, secrets: &mut Option<SecretManager>) {
    if let Some(s) = secrets {
        s.set_wanted(&inpod.identities());
    }
}

/// Re-reads the config file; a bad file is reported and the last good
/// configuration stays in force. Unchanged files still retry failed pods.
fn reload(cfg: &AgentConfig, seen: &mut String, good: &mut LocalConfig, inpod: &mut InPod, state: &State) {
    let text = match std::fs::read_to_string(&cfg.config_path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(path = %cfg.config_path.display(), error = %e, "cannot read config; keeping the last good configuration");
            return;
        }
    };
    if text != *seen {
        *seen = text;
        match LocalConfig::parse(&cfg.config_path, seen) {
            Ok(new) => {
                tracing::info!(path = %cfg.config_path.display(), "configuration reloaded");
                state.update(&new, &cfg.trust_domain);
                *good = new;
                inpod.recheck_open_connections();
            }
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration; keeping the last good configuration");
                return;
            }
        }
    }
    if let Err(e) = inpod.apply(good) {
        tracing::error!(error = %e, "cannot apply configuration");
    }
}

/// Parses `500ms`, `30s`, `2m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: write e.g. 500ms, 30s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}`; use ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
    }
}
