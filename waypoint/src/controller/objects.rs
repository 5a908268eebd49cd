//! What a waypoint Gateway becomes: the objects the controller applies and
//! `waypoint generate --resources` prints (one definition for both).
//!
//! Names: the ServiceAccount, Deployment, Service and PodDisruptionBudget
//! are named after the Gateway (so the waypoint's identity is
//! `spiffe://<td>/ns/<ns>/sa/<gateway>`), the ConfigMap holding the mesh
//! root `<gateway>-mesh-ca-root`, and the ClusterRoleBinding
//! `ambient-mesh-waypoint:<ns>:<gateway>` (cluster-scoped, so unique per
//! namespace and name).
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
            HTTPGetAction, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe,
            ProjectedVolumeSource, SeccompProfile, SecurityContext, Service, ServiceAccount,
            ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
            WeightedPodAffinityTerm,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{ClusterRoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use cluster::kube::gateway::{Gateway, GATEWAY_NAME_LABEL, HBONE_PORT};

/// Marks what this controller manages (Istio's key; our value, so neither
/// controller takes the other's objects).
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_VALUE: &str = "ambient-mesh.io-waypoint-controller";
/// On the ClusterRoleBinding, which cannot be owned by the (namespaced)
/// Gateway: which Gateway it is for, so orphans can be found.
pub const GATEWAY_NAMESPACE_LABEL: &str = "ambient-mesh.io/gateway-namespace";
/// Waypoint pods are never captured (they speak HBONE themselves).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The audience of the projected token the waypoint shows the CA (as the agents').
pub const CA_TOKEN_AUDIENCE: &str = "mesh-ca";
pub const CA_TOKEN_DIR: &str = "/var/run/secrets/mesh";
pub const CA_ROOT_DIR: &str = "/etc/mesh/ca-root";
pub const CA_ROOT_KEY: &str = "root-cert.pem";
pub const METRICS_PORT: i32 = 15020;
pub const STATUS_PORT: i32 = 15021;
pub const READY_PATH: &str = "/healthz/ready";
pub const BINDING_PREFIX: &str = "ambient-mesh-waypoint";

/// The controller's choices for every waypoint (its flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub image: String,
    /// The waypoint container's command line.
    pub command: Vec<String>,
    pub replicas: i32,
    /// The fixed, read-only ClusterRole every waypoint is bound to.
    pub cluster_role: String,
    /// The mesh root certificate (PEM) the waypoint verifies the CA with.
    pub ca_root_pem: String,
}

/// Everything one waypoint Gateway becomes, in apply order.
#[derive(Debug, Clone)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub ca_root: ConfigMap,
    pub binding: ClusterRoleBinding,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    pub deployment: Deployment,
}

pub fn binding_name(namespace: &str, gateway: &str) -> String {
    format!("{BINDING_PREFIX}:{namespace}:{gateway}")
}

pub fn ca_root_name(gateway: &str) -> String {
    format!("{gateway}-mesh-ca-root")
}

/// The owner reference every namespaced object carries (the garbage
/// collector deletes them with the Gateway); None without a uid (e.g.
/// `waypoint generate`, where GitOps owns the objects).
fn owner(gw: &Gateway) -> Option<Vec<OwnerReference>> {
    let uid = gw.metadata.uid.clone()?;
    Some(vec![OwnerReference {
        api_version: cluster::kube::gateway::API_VERSION.into(),
        kind: cluster::kube::gateway::KIND.into(),
        name: gw.name().into(),
        uid,
        controller: Some(true),
        // Not blockOwnerDeletion: that needs `update` on gateways/finalizers,
        // and nothing waits for a foreground deletion of a waypoint.
        block_owner_deletion: None,
    }])
}

fn labels(gw: &Gateway) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_string(), gw.name().to_string()),
        (MANAGED_LABEL.to_string(), MANAGED_VALUE.to_string()),
    ])
}

fn selector(gw: &Gateway) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), gw.name().to_string())])
}

fn meta(gw: &Gateway, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(gw.namespace().into()),
        labels: Some(labels(gw)),
        owner_references: owner(gw),
        ..Default::default()
    }
}

pub fn desired(gw: &Gateway, s: &Settings) -> Desired {
    Desired {
        service_account: ServiceAccount {
            metadata: meta(gw, gw.name()),
            ..Default::default()
        },
        ca_root: ConfigMap {
            metadata: meta(gw, &ca_root_name(gw.name())),
            data: Some(BTreeMap::from([(CA_ROOT_KEY.to_string(), s.ca_root_pem.clone())])),
            ..Default::default()
        },
        binding: binding(gw, s),
        service: service(gw),
        pdb: PodDisruptionBudget {
            metadata: meta(gw, gw.name()),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector(gw)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        deployment: deployment(gw, s),
    }
}

/// Grants the waypoint's service account the fixed read-only ClusterRole.
/// Cluster-wide (it watches namespaces, and services of any namespace may
/// use it), hence a ClusterRoleBinding; a cluster-scoped object cannot be
/// owned by a namespaced one, so the controller deletes it itself.
fn binding(gw: &Gateway, s: &Settings) -> ClusterRoleBinding {
    let mut labels = labels(gw);
    labels.insert(GATEWAY_NAMESPACE_LABEL.into(), gw.namespace().into());
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name(gw.namespace(), gw.name())),
            labels: Some(labels),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: s.cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: gw.name().into(),
            namespace: Some(gw.namespace().into()),
            ..Default::default()
        }]),
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn service(gw: &Gateway) -> Service {
    Service {
        metadata: meta(gw, gw.name()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector(gw)),
            ports: Some(vec![
                port("mesh", HBONE_PORT),
                port("http-metrics", METRICS_PORT),
                port("status-port", STATUS_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn deployment(gw: &Gateway, s: &Settings) -> Deployment {
    let mut pod_labels = labels(gw);
    pod_labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    let container = Container {
        name: "waypoint".into(),
        image: Some(s.image.clone()),
        command: Some(s.command.clone()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("WAYPOINT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            EnvVar {
                name: "GATEWAY_NAME".into(),
                value: Some(gw.name().into()),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            container_port("mesh", HBONE_PORT),
            container_port("http-metrics", METRICS_PORT),
            container_port("status-port", STATUS_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(READY_PATH.into()),
                port: IntOrString::Int(STATUS_PORT),
                ..Default::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(1337),
            run_as_group: Some(1337),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "mesh-token".into(),
                mount_path: CA_TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "ca-root".into(),
                mount_path: CA_ROOT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let volumes = vec![
        // The waypoint's credential towards the CA: its own pod-bound token.
        Volume {
            name: "mesh-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(CA_TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "ca-root".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca_root_name(gw.name()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    // Spread the replicas over nodes, so one node going away leaves one.
    let spread = PodAntiAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector(gw)),
                    ..Default::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..Default::default()
            },
        }]),
        ..Default::default()
    };
    Deployment {
        metadata: meta(gw, gw.name()),
        spec: Some(DeploymentSpec {
            replicas: Some(s.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(gw)),
                ..Default::default()
            },
            // A new pod is ready before an old one goes: the waypoint's
            // capacity never drops during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_string(), "/stats/prometheus".to_string()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gw.name().into()),
                    termination_grace_period_seconds: Some(30),
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(spread),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}
