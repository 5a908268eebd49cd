//! `waypoint controller`: turns waypoint Gateways (class `istio-waypoint`)
//! into running waypoints (ServiceAccount, Deployment, Service,
//! PodDisruptionBudget, the mesh root ConfigMap and a ClusterRoleBinding to
//! the fixed read-only waypoint ClusterRole), keeps them as it made them and
//! reports on the Gateway's status; and writes each waypoint binding's
//! status on the Services and Namespaces that use a waypoint
//! ([`bindings`]). `waypoint generate`: the same objects as YAML, for GitOps.
//!
//! It runs under its own service account (deploy/waypoint-controller.yaml),
//! never the CA's: the process that holds the root key must not be able to
//! create Deployments.
pub use cluster::kube::gateway;
pub mod bindings;
pub mod generate;
pub mod objects;
mod reconcile;

use std::path::PathBuf;

use anyhow::Context;

/// What `cargo xtask image` builds (deploy/kustomization.yaml names it the same).
pub const DEFAULT_IMAGE: &str = concat!("localhost/ambient-mesh:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_CLUSTER_ROLE: &str = "ambient-mesh-waypoint";
pub const DEFAULT_CA_ROOT: &str = "/etc/mesh/ca-root/root-cert.pem";

/// How every waypoint is deployed (shared by `controller` and `generate --resources`).
#[derive(clap::Args, Debug, Clone)]
pub struct WaypointFlags {
    /// The waypoint pods' image (deploy/ sets it with the controller's own
    /// through kustomize's `images:` entry).
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub waypoint_image: String,
    /// One word of the waypoint container's command line, repeated in order
    /// (e.g. --waypoint-arg=waypoint --waypoint-arg=run --waypoint-arg=--ca-address ...).
    #[arg(long = "waypoint-arg", allow_hyphen_values = true, default_values_t = ["waypoint".to_string(), "run".to_string()])]
    pub waypoint_args: Vec<String>,
    /// Replicas per waypoint (two by default: one may be rescheduled while the other serves).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..))]
    pub replicas: i32,
    /// The fixed read-only ClusterRole every waypoint's service account is bound to
    /// (the controller holds `bind` on exactly this role).
    #[arg(long, default_value = DEFAULT_CLUSTER_ROLE)]
    pub waypoint_cluster_role: String,
    /// The mesh root certificate, copied into each waypoint's namespace (ConfigMap
    /// `<gateway>-mesh-ca-root`) so the waypoint can verify the CA.
    #[arg(long, default_value = DEFAULT_CA_ROOT)]
    pub ca_root_file: PathBuf,
}

impl WaypointFlags {
    pub fn settings(&self) -> anyhow::Result<objects::Settings> {
        let ca_root_pem = std::fs::read_to_string(&self.ca_root_file).with_context(|| {
            format!(
                "cannot read the mesh root certificate {} (mount ConfigMap mesh-ca-root there, or pass --ca-root-file)",
                self.ca_root_file.display()
            )
        })?;
        Ok(objects::Settings {
            image: self.waypoint_image.clone(),
            command: self.waypoint_args.clone(),
            replicas: self.replicas,
            cluster_role: self.waypoint_cluster_role.clone(),
            ca_root_pem,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    waypoint: WaypointFlags,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, else the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

/// `waypoint controller`: reconciles until the process is stopped.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let settings = args.waypoint.settings()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = cluster::kube::client(args.kubeconfig.as_deref()).await?;
        tracing::info!(image = %settings.image, replicas = settings.replicas, cluster_role = %settings.cluster_role, "waypoint controller starting");
        // Binding statuses beside the Gateways' reconcile, on the same
        // runtime (the controller has no data path to keep it off).
        let binding_status = tokio::spawn(bindings::run(client.clone()));
        reconcile::run(client, settings).await;
        binding_status.abort();
        tracing::info!("waypoint controller stopped");
        Ok(())
    })
}
