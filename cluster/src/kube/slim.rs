//! What the watches of Pods and EndpointSlices decode (the objects there
//! are many of, and that change often): only the fields the records read.
//! serde skips
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

/// Serves a slim type under the resource of the k8s type it projects:
/// the same group, version, kind and URL, so kube-rs lists and watches it.
macro_rules! served_as {
    ($slim:ty, $k8s:ty) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$k8s as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$k8s as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$k8s as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$k8s as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$k8s as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$k8s as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

served_as!(Pod, k8s_openapi::api::core::v1::Pod);
served_as!(EndpointSlice, k8s_openapi::api::discovery::v1::EndpointSlice);

/// An EndpointSlice as the model reads it (`records::SliceRecord`): its
/// ports, and each endpoint's addresses and readiness (a real endpoint
/// also carries its target reference, node, zone and hints).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
}

impl From<&k8s_openapi::api::discovery::v1::EndpointSlice> for EndpointSlice {
    /// The same projection from a whole EndpointSlice.
    fn from(s: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Self {
        EndpointSlice {
            metadata: slim_meta(&s.metadata),
            ports: s.ports.as_ref().map(|ps| {
                ps.iter()
                    .map(|p| EndpointPort {
                        name: p.name.clone(),
                        port: p.port,
                    })
                    .collect()
            }),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: e.addresses.clone(),
                    conditions: e.conditions.as_ref().map(|c| EndpointConditions { ready: c.ready }),
                })
                .collect(),
        }
    }
}

/// The metadata fields [`meta`] keeps, from a whole object's.
fn slim_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        labels: m.labels.clone(),
        resource_version: m.resource_version.clone(),
        ..Default::default()
    }
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl From<&k8s_openapi::api::core::v1::Pod> for Pod {
    /// The same projection from a whole Pod (tests, inputs built in code).
    fn from(p: &k8s_openapi::api::core::v1::Pod) -> Self {
        Pod {
            metadata: slim_meta(&p.metadata),
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

    /// An EndpointSlice as the API serves it decodes to the projection of
    /// the whole object.
    #[test]
    fn an_endpoint_slice_decodes_to_what_the_records_read() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abc", "namespace": "shop", "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": "web"},
                "managedFields": [{"manager": "endpointslice-controller", "fieldsV1": {"f:endpoints": {}}}]},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.1.11"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-1", "zone": "a", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "u"}},
                {"addresses": ["10.1.1.12"], "conditions": {"ready": false}},
                {"addresses": ["10.1.1.13"]}
            ]
        });
        let slim: EndpointSlice = serde_json::from_value(json.clone()).unwrap();
        let whole: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json).unwrap();
        assert_eq!(format!("{slim:?}"), format!("{:?}", EndpointSlice::from(&whole)));
        assert_eq!(slim.endpoints.len(), 3);
        assert_eq!(slim.endpoints[1].conditions.as_ref().and_then(|c| c.ready), Some(false));
        assert!(slim.metadata.managed_fields.is_none());
        let empty: EndpointSlice = serde_json::from_str(r#"{"metadata": {"name": "x"}, "endpoints": null}"#).unwrap();
        assert!(empty.endpoints.is_empty() && empty.ports.is_none());
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
