//! What the watches decode: only the fields the records read. serde skips
//! every other field of the API's JSON without allocating, where a
//! `k8s_openapi::Pod` would allocate its managed fields, annotations,
//! containers and conditions first, only to be dropped by the projection
//! a moment later. Those short-lived allocations land amid the records
//! that stay, so the allocator cannot hand their pages back: measured as
//! resident memory per pod watched (README, "Kubernetes at scale").
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Pod as the model reads it (`records::PodRecord`), served by the API
/// under the Pod's own group, version and kind.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<&k8s_openapi::api::core::v1::Pod> for Pod {
    /// The same projection from a whole Pod (tests, inputs built in code).
    fn from(p: &k8s_openapi::api::core::v1::Pod) -> Self {
        let m = &p.metadata;
        Pod {
            metadata: ObjectMeta {
                name: m.name.clone(),
                namespace: m.namespace.clone(),
                uid: m.uid.clone(),
                labels: m.labels.clone(),
                resource_version: m.resource_version.clone(),
                ..Default::default()
            },
            spec: p.spec.as_ref().map(|s| PodSpec {
                node_name: s.node_name.clone(),
                service_account_name: s.service_account_name.clone(),
                host_network: s.host_network,
            }),
            status: p.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s
                    .pod_ips
                    .as_ref()
                    .map(|ips| ips.iter().map(|i| PodIp { ip: i.ip.clone() }).collect()),
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .map(|c| Condition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                        })
                        .collect()
                }),
            }),
        }
    }
}

/// The object metadata a record and the watcher read: name, namespace,
/// UID, labels, and the resourceVersion a watch resumes from.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    resource_version: Option<String>,
}

fn meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Option::<Meta>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        labels: m.labels,
        resource_version: m.resource_version,
        ..Default::default()
    })
    .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod as the API serves it: the slim decode keeps what the records
    /// read and equals the projection of the whole object.
    #[test]
    fn a_pod_decodes_to_what_the_records_read() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "0b5e7a1c-3f2d-4e8a-9c61-5d2f4b7a8e90",
                "resourceVersion": "42", "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "u"}]
            },
            "spec": {
                "nodeName": "node-1", "serviceAccountName": "web", "hostNetwork": false,
                "containers": [{"name": "app", "image": "registry.example/app:1.0", "env": [{"name": "A", "value": "b"}]}]
            },
            "status": {
                "phase": "Running", "podIP": "10.1.1.11", "podIPs": [{"ip": "10.1.1.11"}, {"ip": "fd00::11"}],
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-04T00:00:00Z"},
                    {"type": "PodScheduled", "status": "True"}
                ],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "x", "imageID": "y"}]
            }
        });
        let slim: Pod = serde_json::from_value(json.clone()).unwrap();
        let whole: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json).unwrap();
        let projected = Pod::from(&whole);
        for p in [&slim, &projected] {
            assert_eq!(p.metadata.name.as_deref(), Some("web-1"));
            assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
            assert!(p.metadata.annotations.is_none() && p.metadata.managed_fields.is_none());
        }
        assert_eq!(format!("{slim:?}"), format!("{projected:?}"));
        let status = slim.status.unwrap();
        assert_eq!(status.pod_ips.unwrap().len(), 2);
        assert_eq!(status.conditions.unwrap()[0].type_, "Ready");
    }

    /// Fields the API may leave out or send as null.
    #[test]
    fn a_pod_without_spec_status_or_metadata_fields_decodes() {
        let p: Pod = serde_json::from_str(r#"{"metadata": {"name": "x"}, "spec": null}"#).unwrap();
        assert!(p.spec.is_none() && p.status.is_none() && p.metadata.labels.is_none());
        let p: Pod = serde_json::from_str(r#"{"metadata": null, "status": {"podIPs": null}}"#).unwrap();
        assert!(p.metadata.name.is_none() && p.status.unwrap().pod_ips.is_none());
    }
}
