//! The Gateway API `Gateway` (gateway.networking.k8s.io/v1): one type for
//! the agents' and waypoints' watch (what marks a waypoint) and the
//! waypoint controller (listeners, the status it writes).
//! `kube::Resource` by hand, as the agent's Istio types (no schema
//! generator for one type).
use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "gateway.networking.k8s.io";
pub const VERSION: &str = "v1";
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
pub const KIND: &str = "Gateway";
pub use crate::waypoint::{
    FOR_SERVICE_ACCOUNT as FOR_SERVICE_ACCOUNT_ANNOTATION, GATEWAY_NAME_LABEL, WAYPOINT_CLASS,
    WAYPOINT_FOR as WAYPOINT_FOR_LABEL,
};
/// The listener every waypoint has: HBONE on 15008.
pub const MESH_LISTENER: &str = "mesh";
pub const HBONE_PORT: i32 = 15008;
pub const HBONE_PROTOCOL: &str = "HBONE";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<GatewayStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Fields this controller does not read (addresses, infrastructure, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct GatewayAddress {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub value: String,
}

impl Gateway {
    pub fn new(namespace: &str, name: &str, spec: GatewaySpec) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }

    /// A Gateway of `class` without listeners (tests, the stand-in API server).
    pub fn of_class(namespace: &str, name: &str, class: &str) -> Self {
        Self::new(
            namespace,
            name,
            GatewaySpec {
                gateway_class_name: class.into(),
                ..Default::default()
            },
        )
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }

    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// Why the Gateway cannot be a waypoint, if it cannot: it needs the
    /// HBONE listener on 15008 that agents tunnel to.
    pub fn listener_problem(&self) -> Option<String> {
        let ok = self
            .spec
            .listeners
            .iter()
            .any(|l| l.port == HBONE_PORT && l.protocol == HBONE_PROTOCOL);
        (!ok).then(|| {
            format!(
                "a waypoint needs a listener on port {HBONE_PORT} with protocol {HBONE_PROTOCOL} \
                 (add `- name: {MESH_LISTENER}, port: {HBONE_PORT}, protocol: {HBONE_PROTOCOL}` to spec.listeners, \
                 as `waypoint generate` prints)"
            )
        })
    }
}

impl kube::Resource for Gateway {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        API_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "gateways".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
