//! Wiring: the cluster model from the enrolment file (re-read when it
//! changes) or the Kubernetes API (`cluster::kube`, the agents'
//! translation), the routing rules from a file or the same API (`routes`), the waypoint's own certificate from the CA, the HBONE
//! listener, metrics and readiness, the access log (its own writer thread), and SIGTERM's drain.
//!
//! Two runtimes, as ztunnel: control work (CA, config, metrics) on a
//! current-thread runtime of its own thread, the data plane on a runtime
//! of its own (`--worker-threads`, `mesh::runtime`), so scraping
//! or a slow CA never adds data-path latency.
use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use cluster::{
    config::LocalConfig,
    filewatch::{FileWatch, Polled},
    state::State,
};
use mesh::{
    ca::CaClient,
    certs::{CertStore, SecretManager},
    identity::SpiffeId,
    tls::Roots,
};
use prometheus_client::registry::Registry;

use crate::{
    accesslog::AccessLog,
    config::{Config, Source},
    inbound::{Certs, Parts},
    metrics::Metrics,
    routes::{RouteMetrics, RouteSource, Routes},
    Waypoint,
};

/// Changes from the API arriving within this are translated together.
const KUBE_DEBOUNCE: Duration = Duration::from_millis(50);

/// How often the enrolment file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Start-up is over once the first certificate is in, or after this (a CA
/// that never answers; the agent's `--cert-ready-timeout` default).
const STARTUP_BOUND: Duration = Duration::from_secs(60);

pub fn run(cfg: Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg)?, "waypoint starting");
    let state = State::default();
    let mut config_file = match &cfg.source {
        Source::File(path) => {
            let file = open_file(path)?;
            state.update(&LocalConfig::parse(path, file.text())?, &cfg.id.trust_domain);
            Some(file)
        }
        Source::Kubernetes { .. } => None,
    };
    // On Kubernetes the model is empty until the watches have listed
    // everything: not ready until then.
    let synced = Arc::new(AtomicBool::new(matches!(cfg.source, Source::File(_))));
    let root_pem = std::fs::read_to_string(&cfg.ca.root_cert)
        .with_context(|| format!("cannot read the mesh root certificate {}", cfg.ca.root_cert.display()))?;
    let roots = Roots::from_pem(&root_pem)?;
    let control = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The CA client's connection lives on the control runtime.
    let client = {
        let _rt = control.enter();
        CaClient::new(&cfg.ca)?
    };
    let data = mesh::runtime::data_plane(cfg.worker_threads, "waypoint-data")
        .context("cannot start the data-plane runtime")?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let routes = Routes::default();
    let route_source = Arc::new(Mutex::new(RouteSource::new(
        cfg.gateway.clone(),
        routes.clone(),
        RouteMetrics::register(&mut registry),
    )));
    let mut routes_file = None;
    if let Some(path) = &cfg.routes {
        // At start a broken file is an error the operator sees at once;
        // later, a broken file keeps the routes in force.
        let file = open_file(path)?;
        route_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .load_text(file.text())
            .map_err(|e| anyhow::anyhow!("routes file {}: {e}", path.display()))?;
        routes_file = Some(file);
    }
    let (access, lines) = if cfg.access_log {
        let (a, rx) = AccessLog::channel();
        a.register(&mut registry);
        (a, Some(rx))
    } else {
        (AccessLog::off(), None)
    };
    let mut secrets = SecretManager::new(client, cfg.cert_lifetime);
    let certs = Certs::Store {
        store: secrets.store(),
        id: cfg.id.clone(),
    };
    let wp = Waypoint::new(Parts {
        id: cfg.id.clone(),
        certs: certs.clone(),
        roots,
        state: state.clone(),
        limits: cfg.limits.clone(),
        upstream_port: cfg.upstream_hbone_port,
        metrics,
        access,
        routes,
    });

    let metrics_listener = control
        .block_on(tokio::net::TcpListener::bind(cfg.metrics_addr))
        .with_context(|| format!("cannot listen on --metrics-addr {}", cfg.metrics_addr))?;
    let readiness_listener = control
        .block_on(tokio::net::TcpListener::bind(cfg.readiness_addr))
        .with_context(|| format!("cannot listen on --readiness-addr {}", cfg.readiness_addr))?;
    let log_writer = lines
        .map(|rx| AccessLog::spawn_writer(rx, std::io::stdout()))
        .transpose()?;
    let control_thread = {
        let (cfg, state, registry) = (cfg.clone(), state.clone(), Arc::new(registry));
        std::thread::Builder::new()
            .name("waypoint-control".into())
            .spawn(move || {
                mesh::alloc::control_thread();
                control.block_on(async move {
                    secrets.set_wanted(&BTreeSet::from([cfg.id.clone()]));
                    tokio::spawn(release_startup_code(secrets.store(), cfg.id.clone()));
                    let ready = {
                        let synced = synced.clone();
                        move || certs.current().is_some() && synced.load(Ordering::Relaxed)
                    };
                    tokio::spawn(crate::metrics::serve(readiness_listener, None, ready.clone()));
                    tokio::spawn(crate::metrics::serve(metrics_listener, Some(registry), ready));
                    if let Some(file) = routes_file.take() {
                        tokio::spawn(crate::routes::watch_file(file, route_source.clone()));
                    }
                    match &cfg.source {
                        Source::File(_) => {
                            if let Some(file) = config_file.take() {
                                watch_config(file, &cfg, &state).await
                            }
                        }
                        Source::Kubernetes { kubeconfig } => {
                            if let Err(e) =
                                watch_kubernetes(kubeconfig.as_deref(), &cfg, &state, &synced, route_source).await
                            {
                                // Without a model the waypoint cannot route: stay
                                // unready (no agent steers to it) and say why.
                                tracing::error!(error = %format!("{e:#}"), "cannot watch the Kubernetes API; not ready");
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                })
            })?
    };

    data.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on --listen {}", cfg.listen))?;
        tracing::info!(listen = %cfg.listen, metrics = %cfg.metrics_addr, identity = %cfg.id, "waypoint serving HBONE");
        let serving = tokio::spawn({
            let wp = wp.clone();
            async move { wp.serve(listener).await }
        });
        terminated().await?;
        tracing::info!(open = wp.drain().open_connections(), within = ?cfg.limits.drain_timeout, "draining: GOAWAY to every connection");
        let clean = wp.shutdown(cfg.limits.drain_timeout).await;
        serving.abort();
        if clean {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(open = wp.drain().open_connections(), "drain timeout: closing the rest");
        }
        anyhow::Ok(())
    })?;
    // The last lines: every sender goes with the data plane, then the
    // writer writes what is queued and ends.
    drop(wp);
    drop(data);
    if let Some(writer) = log_writer {
        let _ = writer.join();
    }
    drop(control_thread);
    Ok(())
}

/// Unmaps the code only start-up ran once the waypoint's first certificate
/// is in (see [`mesh::alloc::release_startup_code`]): what it runs after
/// is mapped back as it runs.
async fn release_startup_code(store: CertStore, id: SpiffeId) {
    store.wait(&id, STARTUP_BOUND).await;
    mesh::alloc::startup_over();
}

/// SIGTERM or SIGINT.
async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Reads a file the waypoint watches, or says which one it cannot read.
fn open_file(path: &Path) -> anyhow::Result<FileWatch> {
    FileWatch::open(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Re-reads the enrolment file when it changes (a change is taken once
/// it has settled, see `FileWatch`); a bad file is logged and the last
/// good one stays in force.
async fn watch_config(mut file: FileWatch, cfg: &Config, state: &State) {
    loop {
        tokio::time::sleep(CONFIG_POLL).await;
        let path = file.path().to_owned();
        let text = match file.poll() {
            Ok(Polled::Taken(text)) => text,
            Ok(Polled::Nothing) => continue,
            Ok(Polled::RefusedEmpty) => {
                tracing::error!(file = %path.display(), "enrolment file is empty; the previous one stays in force (to serve no pod write `pods: []`)");
                continue;
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "enrolment file not reloaded; the previous one stays in force");
                continue;
            }
        };
        match LocalConfig::parse(&path, text) {
            Ok(local) => {
                state.update(&local, &cfg.id.trust_domain);
                tracing::info!(file = %path.display(), services = local.services.len(), pods = local.pods.len(), "enrolment file reloaded");
            }
            Err(e) => tracing::error!(error = %e, "enrolment file not reloaded; the previous one stays in force"),
        }
    }
}

/// The agents' translation of the cluster (`cluster::kube`), applied to the
/// state once the watches have listed everything and then on every change
/// (batched for [`KUBE_DEBOUNCE`]). Watch errors keep the last model and are
/// retried by the watches themselves.
async fn watch_kubernetes(
    kubeconfig: Option<&Path>,
    cfg: &Config,
    state: &State,
    synced: &AtomicBool,
    routes: Arc<Mutex<RouteSource>>,
) -> anyhow::Result<()> {
    let client = cluster::kube::client(kubeconfig).await?;
    let watch = cluster::kube::ClusterWatch::start(client);
    crate::routes::watch_kubernetes(&watch, routes);
    let mut batches = cluster::kube::Batches::new(watch.changes().clone(), KUBE_DEBOUNCE);
    loop {
        batches.next().await;
        if !watch.health.synced() {
            continue;
        }
        let translated = watch.model().translate(None);
        for w in &translated.warnings {
            tracing::warn!(warning = %w, "cluster translation");
        }
        state.update(&translated.model, &cfg.id.trust_domain);
        if !synced.swap(true, Ordering::Relaxed) {
            tracing::info!(
                services = translated.model.services.len(),
                pods = translated.model.pods.len(),
                "cluster model synced from the Kubernetes API"
            );
        }
    }
}
