//! `waypoint generate`: the waypoint Gateway as YAML (as `istioctl waypoint
//! generate` prints it), and with `--resources` also what the controller
//! would create for it, for GitOps users who apply everything themselves.
//! The objects come from the same code the controller applies
//! ([`objects::desired`]); printed without ownerReferences (there is no
//! Gateway uid yet, and GitOps owns them).
use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    gateway::{
        Gateway, GatewaySpec, Listener, FOR_SERVICE_ACCOUNT_ANNOTATION, HBONE_PORT, HBONE_PROTOCOL, MESH_LISTENER,
        WAYPOINT_CLASS, WAYPOINT_FOR_LABEL,
    },
    objects, WaypointFlags,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum For {
    Service,
    Workload,
    All,
    None,
}

impl For {
    fn label(self) -> &'static str {
        match self {
            For::Service => "service",
            For::Workload => "workload",
            For::All => "all",
            For::None => "none",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The waypoint's (Gateway's) name; also its service account's.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Bind the waypoint to the workloads of this service account (same namespace).
    #[arg(long)]
    pub for_service_account: Option<String>,
    /// Which traffic the waypoint takes (istio.io/waypoint-for).
    #[arg(long = "for", value_enum, default_value_t = For::Service)]
    pub for_: For,
    /// Also print the objects the controller would create (needs --ca-root-file).
    #[arg(long)]
    pub resources: bool,
    #[command(flatten)]
    pub waypoint: WaypointFlags,
}

pub fn gateway(args: &Args) -> Gateway {
    let mut gw = Gateway::new(
        &args.namespace,
        &args.name,
        GatewaySpec {
            gateway_class_name: WAYPOINT_CLASS.into(),
            listeners: vec![Listener {
                name: MESH_LISTENER.into(),
                port: HBONE_PORT,
                protocol: HBONE_PROTOCOL.into(),
                other: BTreeMap::new(),
            }],
            other: BTreeMap::new(),
        },
    );
    gw.metadata.labels = Some(BTreeMap::from([(
        WAYPOINT_FOR_LABEL.to_string(),
        args.for_.label().to_string(),
    )]));
    if let Some(sa) = &args.for_service_account {
        gw.metadata.annotations = Some(BTreeMap::from([(
            FOR_SERVICE_ACCOUNT_ANNOTATION.to_string(),
            sa.clone(),
        )]));
    }
    gw
}

/// The YAML documents `waypoint generate` prints.
pub fn render(args: &Args) -> anyhow::Result<String> {
    let gw = gateway(args);
    let mut docs = vec![to_yaml(&gw)?];
    if args.resources {
        let d = objects::desired(&gw, &args.waypoint.settings()?);
        docs.push(to_yaml(&d.service_account)?);
        docs.push(to_yaml(&d.ca_root)?);
        docs.push(to_yaml(&d.binding)?);
        docs.push(to_yaml(&d.service)?);
        docs.push(to_yaml(&d.pdb)?);
        docs.push(to_yaml(&d.deployment)?);
    }
    Ok(docs.join("---\n"))
}

fn to_yaml<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(v)?)
}

pub fn print(args: &Args) -> anyhow::Result<()> {
    print!("{}", render(args)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use k8s_openapi::{
        api::{
            apps::v1::Deployment,
            core::v1::{ConfigMap, Service, ServiceAccount},
            policy::v1::PodDisruptionBudget,
            rbac::v1::ClusterRoleBinding,
        },
        serde::de::DeserializeOwned,
    };
    use serde::Deserialize;
    use serde_json::Value;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str], root: &std::path::Path) -> Args {
        let mut argv = vec![
            "generate".to_string(),
            "--ca-root-file".into(),
            root.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::parse_from(argv).args
    }

    fn reparse<T: Serialize + DeserializeOwned>(doc: &Value) -> Value {
        let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{doc}: {e}"));
        serde_json::to_value(typed).unwrap()
    }

    /// Every printed document parses into its type and back unchanged (a
    /// field the type does not know would be dropped and show here).
    #[test]
    fn output_parses_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("wp-generate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n").unwrap();
        let a = args(
            &[
                "--name",
                "wp",
                "-n",
                "apps",
                "--for-service-account",
                "web",
                "--for",
                "all",
                "--resources",
            ],
            &root,
        );
        let text = render(&a).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Gateway",
                "ServiceAccount",
                "ConfigMap",
                "ClusterRoleBinding",
                "Service",
                "PodDisruptionBudget",
                "Deployment"
            ]
        );
        for d in &docs {
            let back = match d["kind"].as_str().unwrap() {
                "Gateway" => reparse::<Gateway>(d),
                "ServiceAccount" => reparse::<ServiceAccount>(d),
                "ConfigMap" => reparse::<ConfigMap>(d),
                "ClusterRoleBinding" => reparse::<ClusterRoleBinding>(d),
                "Service" => reparse::<Service>(d),
                "PodDisruptionBudget" => reparse::<PodDisruptionBudget>(d),
                _ => reparse::<Deployment>(d),
            };
            assert_eq!(&back, d, "{} does not round-trip", d["kind"]);
        }
        let gw = &docs[0];
        assert_eq!(gw["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(gw["metadata"]["namespace"], "apps");
        assert_eq!(gw["metadata"]["labels"]["istio.io/waypoint-for"], "all");
        assert_eq!(gw["metadata"]["annotations"]["istio.io/for-service-account"], "web");
        assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
        assert_eq!(
            gw["spec"]["listeners"],
            serde_json::json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
        );
        // GitOps owns the printed objects: no owner the GC would act on.
        assert!(docs.iter().all(|d| d["metadata"]["ownerReferences"].is_null()));
        let pod = &docs[6]["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
        assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    }

    #[test]
    fn the_gateway_alone_by_default_and_without_a_root() {
        let a = args(&[], std::path::Path::new("/nonexistent"));
        let text = render(&a).unwrap();
        let gw: Gateway = serde_yaml::from_str(&text).unwrap();
        assert_eq!((gw.name(), gw.namespace()), ("waypoint", "default"));
        assert!(gw.is_waypoint() && gw.listener_problem().is_none());
        assert_eq!(gw.metadata.labels.unwrap()[WAYPOINT_FOR_LABEL], "service");
        assert!(gw.metadata.annotations.is_none());
        let e = render(&args(&["--resources"], std::path::Path::new("/nonexistent"))).unwrap_err();
        assert!(format!("{e:#}").contains("--ca-root-file"), "{e:#}");
    }
}
